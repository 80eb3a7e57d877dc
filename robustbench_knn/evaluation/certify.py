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

Under one Euclidean distance (``l2``, ``cosine``) a point the intervals leave open may still be certified by the
pairwise bisectors (:mod:`.bisector`), which ask about one embedding for both points of a pair. Wider intervals
can only lower G and raise P, a larger box only raises a bisector's maximum, and the bounds of a larger ball
contain those of a smaller one, so certification is monotone in ε and the certified radius is found by bisection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..config import UsageError
from ..defenses.defense import KNNDefense
from ..store import fingerprint, read_json, state_digest, write_json, write_text
from .bisector import bisector_certified
from .bounds import distance_intervals, is_identity, threat_boxes
from .evaluate import versions
from .linear_bounds import supported


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
    boxes = threat_boxes(defense, x, eps, norm)
    lo, hi = distance_intervals(defense, x, eps, norm, boxes=boxes)
    y = y.to(lo.device)
    ok = vote_bound(lo, hi, defense.bank_labels, y, defense.k, defense.n_classes).cpu()
    rows = (~ok).nonzero().flatten()
    if defense.n_spaces == 1 and len(rows):  # one Euclidean distance: the bisectors may certify what intervals do not
        ok[rows] = bisector_certified(boxes[1], defense.bank, defense.bank_labels, y, defense.k, lo, hi, rows)
    return ok


def certified_radius(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, norm: str, lo: torch.Tensor,
                     hi: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) the largest radius certified by ``steps`` bisections of [lo, hi] (B,) float64, where each row is known
    certified at lo (or lo = 0 and nothing is known) and not certified at hi (or hi = the largest radius asked)."""
    lo, hi = lo.clone(), hi.clone()
    open_ = hi > lo
    for _ in range(steps):
        if not open_.any():
            break
        rows = open_.nonzero().squeeze(1)
        mid = (lo[rows] + hi[rows]) / 2
        ok = certified_at(defense, x[rows], y[rows], mid, norm)
        lo[rows[ok]], hi[rows[~ok]] = mid[ok], mid[~ok]
    return lo


def _certify_batch(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, eps: list[float], norm: str,
                   radius_max: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(eps), B) certified and (B,) radius. The radii are tried in increasing order, each only on the points
    certified at the one before: certification is monotone in ε (module docstring), so a point that fails at ε
    is reported uncertified at every larger radius without computing its bounds (sound either way: "not
    certified" claims nothing). Most points fail early, so a wide ball's costly intervals are rarely computed."""
    n = len(x)
    alive = torch.ones(n, dtype=torch.bool)
    best = torch.zeros(n, dtype=torch.float64)  # the largest radius each point is certified at so far
    # the smallest radius it failed at: 0 for a point not even certified at ε = 0, the ladder's first rung
    fail = torch.full((n,), float(radius_max), dtype=torch.float64)
    done: dict[float, torch.Tensor] = {}
    for e in sorted({*eps, 0.0, float(radius_max)}):
        rows = alive.nonzero().squeeze(1)
        if len(rows):
            ok = certified_at(defense, x[rows], y[rows], e, norm)
            best[rows[ok]] = e
            fail[rows[~ok]] = e
            alive[rows[~ok]] = False
        done[e] = alive.clone()
    radius = certified_radius(defense, x, y, norm, best, fail, steps)
    return torch.stack([done[e] for e in eps]), radius.clamp_max(radius_max)


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


def batch_key(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float], norm: str,
              radius_max: float, steps: int) -> str:
    """Names one batch's certificate: its images and labels, the radii, the bisection, the decision rule (k,
    metric, sub-spaces) and the package versions. With the defense's weights hash in the folder (the caller's),
    a kept batch is reused only for exactly the question it answered, by the same code."""
    rule = [int(defense.k), str(defense.metric), int(getattr(defense, "n_spaces", 1))]
    return fingerprint(list(eps), norm, radius_max, steps, rule, versions(), x.float(), torch.as_tensor(y).long())


def certify(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, eps: float | Sequence[float],
            norm: str = "Linf", *, radius_max: float | None = None, steps: int = 10,
            batch_size: int = 100, progress: bool = False, batch_dir: str | Path | None = None) -> Certificate:
    """Certify each row of ``x`` (images in [0, 1]) with label ``y`` at every ε in ``eps``, and bisect its
    certified radius in [0, ``radius_max``] (default: twice the largest ε, at most 1 for ℓ∞).

    ``batch_dir``: each finished batch is kept there (:func:`batch_key`) and a later call reuses it, so a long run
    killed half-way resumes at its next batch; ``seconds`` stays the certificates' own compute time."""
    eps = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    _check(defense, norm, eps)
    if radius_max is None:
        radius_max = 2 * max(eps) if norm == "L2" else min(1.0, 2 * max(eps))
    y = torch.as_tensor(y).long()
    seconds, reused = 0.0, 0
    cert, radius = [], []
    for s in tqdm(range(0, len(x), batch_size), desc="certify", unit="batch", disable=not progress):
        xb, yb = x[s:s + batch_size].float(), y[s:s + batch_size]
        file = (Path(batch_dir) / f"{batch_key(defense, xb, yb, eps, norm, radius_max, steps)}.json"
                if batch_dir is not None else None)
        if file is not None and file.is_file():
            kept = read_json(file)
            c, r = torch.tensor(kept["certified"], dtype=torch.bool), torch.tensor(kept["radius"], dtype=torch.float64)
            seconds, reused = seconds + kept["seconds"], reused + 1
        else:
            start = time.perf_counter()
            c, r = _certify_batch(defense, xb, yb, eps, norm, radius_max, steps)
            took = time.perf_counter() - start
            seconds += took
            if file is not None:
                write_json(file, {"certified": c.int().tolist(), "radius": r.tolist(), "seconds": took})
        cert.append(c)
        radius.append(r)
    certified = torch.cat(cert, 1) if cert else torch.zeros(len(eps), 0, dtype=torch.bool)
    method = ("exact distance intervals of the identity embedding" if is_identity(defense.net)
              else "interval bound propagation (IBP)" + (" ∩ linear bounds (CROWN-IBP)" if supported(defense.net)
                                                        else "") + " of the embedding") + " + pessimistic vote" + (
        "; else pairwise bisectors over the same set" if defense.n_spaces == 1 else "")
    extra = {"radius_max": radius_max, "bisection_steps": steps, **({"reused_batches": reused} if reused else {})}
    return Certificate(eps, norm, certified, torch.cat(radius) if radius else torch.zeros(0), seconds, method, extra)


CERTIFIED = "certified (lower bound)"  # the audit's curve of certified accuracy against ε


def certified_sweep(defense: Any, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float], norm: str
                    ) -> dict[str, Any]:
    """Certificates at an audit's radii and at two halvings below its smallest positive one (where certificates
    hold, if anywhere): ``{"eps", "certified_acc", "certified" (per ε, 0/1 per point), "method", "seconds"}``,
    or ``{"skipped": why}`` for a defense this module cannot bound (no bank, an unknown layer)."""
    positive = [e for e in eps if e > 0]
    radii = sorted({*eps, *([min(positive) / 2, min(positive) / 4] if positive else [])})
    try:
        cert = certify(defense, x, y, radii, norm, radius_max=max(radii), steps=0)
    except UsageError as e:
        return {"skipped": str(e)}
    return {"eps": radii, "certified_acc": cert.accuracy(), "certified": [c.int().tolist() for c in cert.certified],
            "method": cert.method, "seconds": round(cert.seconds, 2)}


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
