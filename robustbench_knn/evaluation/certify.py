"""Certified lower bounds for k-NN defenses: per test point, a proof that no input in the threat ball changes the
hard vote away from the true label, and the largest radius such a proof is found for.

The distances from the embedding of any x' in the ball to each bank point j lie in [lo_j, hi_j]
(:mod:`.bounds`). The certificate asks whether *every* assignment d_j ∈ [lo_j, hi_j] elects the true class y
under the decision rule of ``defenses.knn`` (k smallest distances, ties at the k-th to the lower index; plurality,
ties to the smaller distance sum, then the lower class). Real inputs realise only some of those assignments, so a
bound over all of them is sound. The argument (:func:`vote_bound`):

1. j can precede i in the (distance, index) order only if d_j ≤ d_i, hence only if lo_j ≤ hi_i. So a bank point i
   with #{j ≠ i : lo_j ≤ hi_i} < k is among the k selected in every assignment. G1 = such points of class y.
2. i certainly precedes j if hi_i < lo_j. A point j with #{i : hi_i < lo_j} ≥ k is never selected. P_c = the
   class-c points that can be selected (at most k). At least k − Σ_{c≠y} P_c selected points are of class y: G2.
3. votes_y ≥ G = max(G1, G2); for c ≠ y, votes_c ≤ min(P_c, k − votes_y) ≤ min(P_c, k − G).
4. Certified iff G > min(P_c, k − G) for every c ≠ y: then votes_y > votes_c strictly for every c in every
   assignment, so no tie rule is ever reached (a possible tie counts against the certificate).

Wider intervals can only lower G and raise P, and the bounds of a larger ball contain those of a smaller one, so
certification is monotone in ε and the certified radius is found by bisection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import UsageError
from ..defenses.defense import KNNDefense
from ..store import state_digest, write_json, write_text
from .bounds import distance_intervals, is_identity


def vote_bound(lo: torch.Tensor, hi: torch.Tensor, labels: torch.Tensor, y: torch.Tensor, k: int,
               n_classes: int) -> torch.Tensor:
    """(B,) bool: every k-NN vote with distances in [lo, hi] (B, M) elects ``y`` (B,) by a strict plurality."""
    sorted_lo, sorted_hi = lo.sort(1).values, hi.sort(1).values
    # lo_i ≤ hi_i, so i itself is one of the lo values ≤ hi_i: subtract it
    may_precede = torch.searchsorted(sorted_lo, hi.contiguous(), right=True) - 1
    surely_precede = torch.searchsorted(sorted_hi, lo.contiguous(), right=False)
    lab = labels.view(1, -1).expand_as(lo)
    true = lab == y.view(-1, 1)
    g1 = ((may_precede < k) & true).sum(1)
    possible = torch.zeros(len(lo), n_classes, dtype=torch.long, device=lo.device)
    possible.scatter_add_(1, lab, (surely_precede < k).long())
    possible = possible.clamp_max(k)
    possible.scatter_(1, y.view(-1, 1), 0)  # the other classes only
    g = torch.maximum(g1, k - possible.sum(1))
    worst_other = torch.minimum(possible, (k - g).view(-1, 1)).amax(1)
    return g > worst_other


def certified_at(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | float,
                 norm: str = "Linf") -> torch.Tensor:
    """(B,) bool: the vote at every input within ``eps`` (a float or one per row) of ``x`` in ``norm``, inside
    [0, 1], is ``y``."""
    lo, hi = distance_intervals(defense, x, eps, norm)
    return vote_bound(lo, hi, defense.bank_labels, y.to(lo.device), defense.k, defense.n_classes).cpu()


def certified_radius(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, norm: str, radius_max: float,
                     steps: int) -> torch.Tensor:
    """(B,) the largest radius in [0, radius_max] certified by ``steps`` bisections (0 where not even ε = 0 is:
    a misclassified point, or one whose vote is tied)."""
    lo = torch.zeros(len(x), dtype=torch.float64)
    hi = torch.full((len(x),), float(radius_max), dtype=torch.float64)
    at_max = certified_at(defense, x, y, hi, norm)
    lo[at_max] = radius_max
    open_ = ~at_max & certified_at(defense, x, y, 0.0, norm)
    hi[~open_] = lo[~open_]
    for _ in range(steps):
        if not open_.any():
            break
        mid = (lo + hi) / 2
        ok = certified_at(defense, x[open_], y[open_], mid[open_], norm)
        rows = open_.nonzero().squeeze(1)
        lo[rows[ok]], hi[rows[~ok]] = mid[rows[ok]], mid[rows[~ok]]
    return lo


@dataclass
class Certificate:
    """Per test point and ε: ``certified`` (len(eps), N) bool; ``radius`` (N,) the certified radius by bisection."""

    eps: list[float]
    norm: str
    certified: torch.Tensor
    radius: torch.Tensor
    seconds: float
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    def accuracy(self) -> list[float]:
        """Certified accuracy (%) per ε: a lower bound on the robust accuracy of the same points."""
        return [round(100 * c.float().mean().item(), 2) for c in self.certified] if self.certified.shape[1] else []


def _check(defense: Any, norm: str, eps: Sequence[float]) -> None:
    if not isinstance(defense, KNNDefense):
        raise UsageError(f"certify needs a k-NN defense (KNNDefense), not a {type(defense).__name__}")
    if norm not in ("Linf", "L2"):
        raise UsageError(f"norm must be Linf or L2, not {norm!r}")
    if any(not e >= 0 for e in eps):
        raise UsageError(f"eps must be >= 0, not {list(eps)}")


def certify(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, eps: float | Sequence[float],
            norm: str = "Linf", *, radius_max: float | None = None, steps: int = 10,
            batch_size: int = 100) -> Certificate:
    """Certify each row of ``x`` (images in [0, 1]) with label ``y`` at every ε in ``eps``, and bisect its
    certified radius in [0, ``radius_max``] (default: twice the largest ε, at most 1 for ℓ∞)."""
    eps = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    _check(defense, norm, eps)
    if radius_max is None:
        radius_max = 2 * max(eps) if norm == "L2" else min(1.0, 2 * max(eps))
    y = torch.as_tensor(y).long()
    start = time.perf_counter()
    cert, radius = [], []
    for s in range(0, len(x), batch_size):
        xb, yb = x[s:s + batch_size].float(), y[s:s + batch_size]
        cert.append(torch.stack([certified_at(defense, xb, yb, e, norm) for e in eps]))
        radius.append(certified_radius(defense, xb, yb, norm, radius_max, steps))
    certified = torch.cat(cert, 1) if cert else torch.zeros(len(eps), 0, dtype=torch.bool)
    method = ("exact distance intervals of the identity embedding" if is_identity(defense.net)
              else "interval bound propagation (IBP) of the embedding") + " + pessimistic vote"
    return Certificate(eps, norm, certified, torch.cat(radius) if radius else torch.zeros(0),
                       time.perf_counter() - start, method, {"radius_max": radius_max, "bisection_steps": steps})


def save_certificate(cert: Certificate, out: str | Path, *, model: str, defense: KNNDefense,
                     info: dict[str, Any]) -> Path:
    """``certify-<model>-<hash>-<norm>.json`` (settings; per ε the certified accuracy and which of the first ``n``
    test images are certified; per-point radii) and a CSV of the per-ε figures beside it."""
    n = cert.certified.shape[1]
    digest = state_digest(defense)
    res = {"model": model, "weights_hash": digest, "k": defense.k, "metric": defense.metric, "n": n,
           "norm": cert.norm, "eps": cert.eps, "method": cert.method, **cert.extra, **info,
           "per_eps": [{"eps": e, "certified_acc": a, "certified": c.int().tolist()}
                       for e, a, c in zip(cert.eps, cert.accuracy(), cert.certified)],
           "seconds": round(cert.seconds, 3), "seconds_per_image": round(cert.seconds / max(n, 1), 5),
           "radius": [round(r, 6) for r in cert.radius.tolist()]}
    path = Path(out) / f"certify-{model}-{digest}-{cert.norm}.json"
    write_json(path, res)
    write_text(path.with_suffix(".csv"), "eps,certified_acc\n" + "".join(
        f"{e:g},{a}\n" for e, a in zip(cert.eps, cert.accuracy())))
    return path


def summary(cert: Certificate) -> str:
    rows = [f"  eps {e:.6g} ({cert.norm}): certified {a:.2f}%" for e, a in zip(cert.eps, cert.accuracy())]
    n = max(cert.certified.shape[1], 1)
    return "\n".join([f"certified lower bounds, {cert.method}:", *rows,
                      f"  {cert.seconds:.2f} s ({cert.seconds / n:.4f} s per image); median certified radius "
                      f"{cert.radius.median().item() if len(cert.radius) else 0:.4g}"])
