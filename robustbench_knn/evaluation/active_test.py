"""An active test of attack strength for k-NN defenses (after Zimmermann, Brendel, Tramèr & Carlini, "Increasing
Confidence in Adversarial Robustness Evaluations", NeurIPS 2022).

A robust accuracy is only an upper bound if the attacks are strong on *this* defense. The test modifies the
defense so that an adversarial example inside the ℓ∞ ε-ball is known to exist for every test point, then runs
the attacks on the modified decision: a correct attack breaks (nearly) every point; one that does not cannot be
trusted on this defense, whatever it reports there.

The modification keeps the defense's own embedding, metric and surrogate and replaces its bank. For each point
x0 (label y): a vertex x* of the ε-ball (random signs, clamped to the box) and a few near copies of it are
labelled with a target class t ≠ y; x0 and a few points well inside the ball are labelled y. A k_test-NN over
these embeddings (k_test small and odd, the boundary copies a majority of it) decides y at x0 and t at x*, which
is checked per point (``n_valid``): only points where both hold count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..attacks import AttackSpec, parse_attack_list
from ..config import UsageError
from ..data import to_float
from ..defenses.defense import KNNDefense, embed_in_batches
from .evaluate import run_attacks

FLIP_FRACTION = 0.05  # signs flipped in each boundary copy: still a vertex of the ball, but not x* itself
FILLER_SCALE = 100.0  # filler embeddings sit this many bank spreads away: never among a test point's neighbours
NOT_APPLICABLE = "not applicable: its source model is trained without the test decision, so it cannot aim at it"


class EmbedOf(nn.Module):
    """The defense's embedding as a module, so the test decision embeds exactly as the defense does (the defense is
    a submodule, so ``.device`` follows it)."""

    def __init__(self, defense: nn.Module) -> None:
        super().__init__()
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense.embed(x)


@dataclass
class ActivePoints:
    """Per test point: clean image, label, target class, inner points (labelled y; the first is x0) and boundary
    points (labelled target; the first is the vertex x*)."""

    x0: torch.Tensor  # (P, C, H, W)
    y: torch.Tensor  # (P,)
    target: torch.Tensor  # (P,)
    inner: torch.Tensor  # (P, n_inner, C, H, W)
    boundary: torch.Tensor  # (P, n_b, C, H, W)

    @property
    def x_star(self) -> torch.Tensor:
        return self.boundary[:, 0]


def make_points(x0: torch.Tensor, y: torch.Tensor, eps: float, n_classes: int, *, k_test: int, n_inner: int,
                seed: int) -> ActivePoints:
    """The inner and boundary points of every test point, from one seeded CPU generator (the same on any device)."""
    gen = torch.Generator().manual_seed(seed)
    x0, y = x0.detach().float().cpu(), y.detach().long().cpu()
    p, shape = len(x0), tuple(x0.shape[1:])
    target = (y + 1 + torch.randint(0, n_classes - 1, (p,), generator=gen)) % n_classes
    sign = 2 * torch.randint(0, 2, (p, *shape), generator=gen).float() - 1
    n_b = (k_test + 1) // 2
    flip = torch.rand((p, n_b - 1, *shape), generator=gen) < FLIP_FRACTION
    signs = torch.cat([sign[:, None], torch.where(flip, -sign[:, None], sign[:, None])], 1)
    boundary = (x0[:, None] + eps * signs).clamp(0, 1)
    # half the radius: clearly inside the ball, so the vote at x0 stays y while x* is a full ε away
    noise = (torch.rand((p, n_inner - 1, *shape), generator=gen) - 0.5) * eps
    inner = torch.cat([x0[:, None], (x0[:, None] + noise).clamp(0, 1)], 1)
    return ActivePoints(x0, y, target, inner, boundary)


def build_decision(defense: KNNDefense, pts: ActivePoints, *, k_test: int, seed: int, batch_size: int = 250
                   ) -> KNNDefense:
    """The test decision: a k_test-NN with the defense's embedding, metric and surrogate over the points' embeddings
    (inner labelled y, boundary labelled target), plus one far filler per class absent from them."""
    n_in, n_b = pts.inner.shape[1], pts.boundary.shape[1]
    images = torch.cat([pts.inner.flatten(0, 1), pts.boundary.flatten(0, 1)])
    labels = torch.cat([pts.y.repeat_interleave(n_in), pts.target.repeat_interleave(n_b)])
    emb = embed_in_batches(defense.embed, images, defense.device, batch_size).float()
    absent = [c for c in range(defense.n_classes) if not (labels == c).any()]
    if absent:
        # a class with no bank point has a -inf surrogate logit (NaN in DLR-type losses): give it a point, far away
        gen = torch.Generator().manual_seed(seed + 1)
        u = torch.randn(len(absent), emb.shape[1], generator=gen)
        u = (u / u.norm(dim=1, keepdim=True)).to(emb.device)
        center = emb.mean(0)
        spread = float((emb - center).norm(dim=1).max()) + 1.0
        emb = torch.cat([emb, center + FILLER_SCALE * spread * u])
        labels = torch.cat([labels, torch.tensor(absent, dtype=torch.long)])
    return KNNDefense(EmbedOf(defense), labels, bank_embeddings=emb, k=k_test, metric=defense.metric,
                      surrogate=defense.surrogate_name, n_classes=defense.n_classes, lam=defense.lam, l0=defense.l0,
                      aligned=defense.aligned, **getattr(defense, "surrogate_options", {}))


def first_correct(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """Indices of the first ``n`` points the defense classifies correctly (predicting only as far as needed)."""
    picked: list[int] = []
    for s in range(0, len(x), batch_size):
        pred = defense.predict(x[s:s + batch_size]).cpu()
        picked += (torch.nonzero(pred == y[s:s + batch_size].cpu()).squeeze(1) + s).tolist()
        if len(picked) >= n:
            break
    return torch.tensor(picked[:n], dtype=torch.long)


def _check(defense: Any, x: torch.Tensor, y: torch.Tensor, eps: float, n_points: int, k_test: int, n_inner: int,
           threshold: float) -> None:
    if not isinstance(defense, KNNDefense):  # the test replaces the bank and reuses embed: a logit model has neither
        raise UsageError(f"the active test needs a k-NN defense (a KNNDefense with an embedding and a bank), "
                         f"not {type(defense).__name__}")
    if not eps > 0:
        raise UsageError(f"the active test needs eps > 0, not {eps}")
    if n_points < 1:
        raise UsageError(f"the active test needs n_points >= 1, not {n_points}")
    if k_test < 1 or k_test % 2 == 0:
        raise UsageError(f"k_test must be odd and >= 1 (a strict majority of boundary points), not {k_test}")
    if n_inner < (k_test + 1) // 2:
        raise UsageError(f"n_inner must be at least (k_test + 1) // 2 = {(k_test + 1) // 2} so the vote at the "
                         f"clean point stays its label, not {n_inner}")
    if not 0 <= threshold <= 100:
        raise UsageError(f"threshold is a success rate in percent (0 to 100), not {threshold}")
    if len(x) != len(y) or x.ndim < 2:
        raise UsageError(f"x must be a batch of images with one label each; got {tuple(x.shape)} and {len(y)} labels")


def active_test(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, eps: float,
                specs: Sequence[AttackSpec] | str, *, n_points: int = 50, k_test: int = 3, n_inner: int = 8,
                threshold: float = 90.0, seed: int = 0, batch_size: int = 250,
                overrides: dict[str, dict[str, Any]] | None = None, progress: bool = False) -> dict[str, Any]:
    """Run ``specs`` (AttackSpecs or an ``--attacks`` list) on the defense's active-test decision at ``eps``.

    ``x``: images in [0, 1] (uint8 is scaled), ``y``: labels; the first ``n_points`` the defense classifies
    correctly are used. Returns a JSON-able dict: ``eps``, ``k_test``, ``n_inner``, ``n_points`` (used),
    ``n_valid`` (points where the test decision is right at x0 and decides the target at x*), ``threshold``,
    ``attacks``: {key: {"success_rate" (% of valid points broken; None without valid points), "passed"
    (success_rate >= threshold), "seconds"}} and ``skipped``: [{"attack", "why"}] for attacks the test cannot
    apply to."""
    _check(defense, x, y, eps, n_points, k_test, n_inner, threshold)
    overrides = overrides or {}
    specs = parse_attack_list(specs) if isinstance(specs, str) else list(specs)
    run_specs, skipped = [], []
    for spec in specs:
        spec.check(overrides.get(spec.key, {}))  # a bad parameter fails here, before any embedding is computed
        if getattr(spec.factory, "family", None) == "transfer":
            skipped.append({"attack": spec.key, "why": NOT_APPLICABLE})
        else:
            run_specs.append(spec)
    x = to_float(x) if x.dtype == torch.uint8 else x.float()
    y = torch.as_tensor(y).long()

    idx = first_correct(defense, x, y, n_points, batch_size)
    out: dict[str, Any] = {"eps": eps, "k_test": k_test, "n_inner": n_inner, "n_points": len(idx), "n_valid": 0,
                           "threshold": threshold, "attacks": {}, "skipped": skipped}
    valid = torch.zeros(0, dtype=torch.bool)
    if len(idx):
        pts = make_points(x[idx], y[idx], eps, defense.n_classes, k_test=k_test, n_inner=n_inner, seed=seed)
        decision = build_decision(defense, pts, k_test=k_test, seed=seed, batch_size=batch_size)
        # an adversarial example is known to exist only where the test decision is right at x0 and wrong at x*
        valid = ((decision.predict(pts.x0, batch_size).cpu() == pts.y)
                 & (decision.predict(pts.x_star, batch_size).cpu() == pts.target))
        out["n_valid"] = int(valid.sum())
    if not valid.any():  # nothing is known to be breakable: no attack is shown to work
        out["attacks"] = {s.key: {"success_rate": None, "passed": False, "seconds": 0.0} for s in run_specs}
        return out

    res = run_attacks(decision, pts.x0[valid], pts.y[valid], run_specs, [eps], overrides=overrides,
                      batch_size=batch_size, progress=progress, seed=seed)
    # the same judge decided validity, so every valid point is clean-correct; count over those only regardless
    clean = torch.tensor(res["clean_correct"], dtype=torch.bool)
    for key, entry in res["per_eps"][0]["attacks"].items():
        broken = clean & ~torch.tensor(entry["robust"], dtype=torch.bool)
        rate = round(100 * int(broken.sum()) / max(int(clean.sum()), 1), 2)
        out["attacks"][key] = {"success_rate": rate, "passed": rate >= threshold, "seconds": entry["seconds"]}
    return out


def summary(result: dict[str, Any]) -> str:
    """One line per attack: PASS/FAIL with its success rate (for logs and the CLI)."""
    lines = [f"active test at eps={result['eps']:.4f}: {result['n_valid']} valid of {result['n_points']} points"]
    for key, a in result["attacks"].items():
        rate = "n/a" if a["success_rate"] is None else f"{a['success_rate']:.1f}%"
        lines.append(f"  {'PASS' if a['passed'] else 'FAIL'} {key}: {rate} broken (threshold {result['threshold']}%)")
    lines += [f"  skipped {s['attack']}: {s['why']}" for s in result["skipped"]]
    return "\n".join(lines)
