"""Adaptive attacks on the k-NN decision itself (tracker issue 5).

k-NN defenses are the textbook case of robustness overestimated by attacks that only follow a surrogate's
gradient (the paper's potential underflows to a zero gradient far from the bank). These attacks go after the
hard vote, and every one keeps per sample its best iterate as judged by that vote:

- ``feature``: pulls the embedding towards training points of a target class and pushes the true-class
  neighbours holding the vote out of the current k-ball (white-box on the embedding, not on a surrogate);
- ``softknn-apgd`` / ``softknn-apgd-dlr``: APGD on the soft-kNN surrogate, annealed from soft to sharp;
- ``vote-square``: Square attack on the hard vote margin, gradient-free;
- ``transfer`` (in :mod:`.transfer`): examples crafted on another model.

``adaptive`` in ``--attacks`` expands to all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import UsageError
from ..defenses.surrogate import SoftKNNSurrogate
from ..distances import pairwise_distance
from ..norms import ascent_direction
from .apgd_core import apgd
from .base import Attack, input_gradient, register, register_group
from .knn_tools import BestIterate, embed_batched, kth_distance, random_start, require_knn, set_distance


class AdaptiveAttack(Attack):
    """Base of the adaptive attacks. ``family`` tells the audit what kind of evidence an attack is
    (white-box / gradient-free / transfer); ``gradient_source`` is None because none of them follows the
    classifier's surrogate logits or ``attack_objective`` (what the evaluator's zero-gradient count measures);
    :meth:`guide_loss` is the loss a white-box one does follow, for the audit's own zero-gradient count."""

    family = "white-box"
    gradient_source = None

    def __init__(self, model: torch.nn.Module, eps: float, **params: Any) -> None:
        super().__init__(model, eps, **params)
        require_knn(model, self.name)

    def guide_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------- feature
@dataclass
class _Sets:
    """Per sample: target points, the current k nearest bank points (+ which are true-class), k-th distance."""

    targets: torch.Tensor  # (n, m, W)
    neighbours: torch.Tensor  # (n, k, W)
    same: torch.Tensor  # (n, k) bool
    radius: torch.Tensor  # (n,)

    def __getitem__(self, keep: torch.Tensor) -> "_Sets":
        return _Sets(self.targets[keep], self.neighbours[keep], self.same[keep], self.radius[keep])


@torch.no_grad()
def class_distances(clf: torch.nn.Module, emb: torch.Tensor, m: int) -> torch.Tensor:
    """(N, C): mean distance to the m nearest bank points of each class (inf for an absent class)."""
    out = torch.full((len(emb), clf.n_classes), float("inf"), device=emb.device)
    for s in range(0, len(emb), 256):
        dist = pairwise_distance(emb[s:s + 256], clf.bank, clf.n_spaces)
        for c in range(clf.n_classes):
            cols = clf.bank_labels == c
            if cols.any():
                near = torch.topk(dist[:, cols], min(m, int(cols.sum())), dim=1, largest=False, sorted=False).values
                out[s:s + 256, c] = near.mean(1)
    return out


def target_classes(clf: torch.nn.Module, emb: torch.Tensor, y: torch.Tensor, n_targets: int, m: int) -> torch.Tensor:
    """(N, n_targets): the other classes ordered nearest first (by the mean distance of their m nearest points)."""
    d = class_distances(clf, emb, m).scatter(1, y.view(-1, 1), float("inf"))
    return d.argsort(1)[:, :min(n_targets, clf.n_classes - 1)]


@torch.no_grad()
def select_sets(clf: torch.nn.Module, emb: torch.Tensor, y: torch.Tensor, target: torch.Tensor, m: int,
                mean: bool) -> _Sets:
    """The points the feature loss pulls towards (m nearest of the target class, or their mean) and the current
    k-NN neighbourhood whose true-class members it pushes out."""
    parts = []
    for s in range(0, len(emb), 256):
        e, yy, t = emb[s:s + 256], y[s:s + 256], target[s:s + 256]
        dist = pairwise_distance(e, clf.bank, clf.n_spaces)
        near = torch.topk(dist, clf.k, dim=1, largest=False)
        other = clf.bank_labels[None, :] != t[:, None]
        m_eff = max(1, min(m, int((~other).sum(1).min())))
        tgt = clf.bank[torch.topk(dist.masked_fill(other, float("inf")), m_eff, dim=1, largest=False).indices]
        parts.append(_Sets(tgt.mean(1, keepdim=True) if mean else tgt, clf.bank[near.indices],
                           clf.bank_labels[near.indices] == yy[:, None], near.values.amax(1)))
    return _Sets(*(torch.cat([getattr(p, f) for p in parts]) for f in ("targets", "neighbours", "same", "radius")))


def feature_loss(emb: torch.Tensor, sets: _Sets, n_spaces: int, mean: bool) -> torch.Tensor:
    """Per sample, to MINIMISE: targets beyond the k-th neighbour distance r (hinge; plain distance to the
    mean target), plus true-class neighbours still inside r (hinge), each term averaged."""
    d_t = set_distance(emb, sets.targets, n_spaces)
    pull = d_t.squeeze(1) if mean else torch.relu(d_t - sets.radius[:, None]).mean(1)
    d_n = set_distance(emb, sets.neighbours, n_spaces)
    push = (torch.relu(sets.radius[:, None] - d_n) * sets.same).sum(1) / sets.same.sum(1).clamp_min(1)
    return pull + push


@register("feature", "native",
          {"steps": 100, "restarts": 1, "n_targets": 3, "m": 0, "target": "nearest", "reselect": 10,
           "step_ratio": 0.25},
          "adaptive: embedding-space attack on the k-NN vote (pull towards target-class points, push true-class "
          "neighbours out of the k-ball), multi-targeted; m=0 means k; target nearest|mean")
class FeatureAttack(AdaptiveAttack):
    name = "feature"

    def __init__(self, model: torch.nn.Module, eps: float, **params: Any) -> None:
        super().__init__(model, eps, **params)
        if params["target"] not in ("nearest", "mean"):
            raise UsageError("feature.target must be 'nearest' or 'mean'")
        self.m = int(params["m"]) or model.k
        self.mean = params["target"] == "mean"

    def guide_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The feature loss towards the nearest other class, at ``x`` (for the zero-gradient count)."""
        with torch.no_grad():
            emb = embed_batched(self.model, x)
            sets = select_sets(self.model, emb, y, target_classes(self.model, emb, y, 1, self.m)[:, 0], self.m,
                               self.mean)
        return -feature_loss(self.model.embed(x), sets, self.model.n_spaces, self.mean)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        best = BestIterate(self.model, x, y)
        targets = target_classes(self.model, embed_batched(self.model, x), y, int(self.params["n_targets"]), self.m)
        for t in range(targets.shape[1]):
            for restart in range(int(self.params["restarts"])):
                idx = best.active()
                if len(idx) == 0:
                    return best.x_best
                start = x[idx] if restart == 0 else random_start(x[idx], self.eps, self.norm)
                self._descend(best, x[idx], y[idx], targets[idx, t], start, idx)
        return best.x_best

    def _descend(self, best: BestIterate, x0: torch.Tensor, y: torch.Tensor, target: torch.Tensor, x: torch.Tensor,
                 idx: torch.Tensor) -> None:
        """Steepest descent on the feature loss (signed gradient in ℓ∞, normalised in ℓ2), cosine step from
        ε·step_ratio to 0, sets re-selected every ``reselect`` steps; samples leave as soon as their vote flips."""
        clf, steps = self.model, int(self.params["steps"])
        alpha0, reselect = self.eps * float(self.params["step_ratio"]), max(1, int(self.params["reselect"]))
        sets = None
        for s in range(steps):
            if s % reselect == 0 or sets is None:
                sets = select_sets(clf, embed_batched(clf, x), y, target, self.m, self.mean)
            seen: dict[str, torch.Tensor] = {}

            def loss(z: torch.Tensor) -> torch.Tensor:
                seen["emb"] = emb = clf.embed(z)
                return feature_loss(emb, sets, clf.n_spaces, self.mean)

            grad = input_gradient(loss, x)
            keep = ~best.observe(x, seen["emb"], idx)
            if not keep.any():
                return
            x0, y, target, x, grad, idx = x0[keep], y[keep], target[keep], x[keep], grad[keep], idx[keep]
            sets = sets[keep]
            alpha = alpha0 * 0.5 * (1 + math.cos(math.pi * s / steps))
            x = self.project(x - alpha * ascent_direction(grad, self.norm), x0)
        best.observe(x, embed_batched(clf, x), idx)


# ---------------------------------------------------------------------------------------------- softknn-apgd
def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's DLR loss (to maximise): −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3); shift and scale
    invariant, so the temperature does not change its size."""
    srt = logits.sort(1, descending=True).values
    z_y = logits.gather(1, y.view(-1, 1)).squeeze(1)
    z_other = logits.scatter(1, y.view(-1, 1), -float("inf")).amax(1)
    return -(z_y - z_other) / (srt[:, 0] - srt[:, 2] + 1e-12)


class SoftKNNAPGD(AdaptiveAttack):
    """APGD on ``SoftKNNSurrogate`` logits (logsumexp over the m nearest of each class of −D/T) with T annealed
    geometrically from t0 to t1 (in units of the batch's median clean k-th-neighbour distance, so the schedule
    does not depend on the embedding's scale) at APGD's checkpoints."""

    loss_name = "ce"

    def __init__(self, model: torch.nn.Module, eps: float, **params: Any) -> None:
        super().__init__(model, eps, **params)
        if min(float(params["t0"]), float(params["t1"])) <= 0:
            raise UsageError(f"{self.name}: t0 and t1 must be > 0")
        if self.loss_name == "dlr" and model.n_classes < 3:
            raise UsageError(f"{self.name}: the DLR loss needs at least 3 classes")
        self.surrogate = SoftKNNSurrogate(model, m=int(params["m"]) or model.k)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none") if self.loss_name == "ce" else dlr_loss(logits, y)

    def _set_temperature(self, frac: float, scale: float) -> bool:
        t0, t1 = float(self.params["t0"]), float(self.params["t1"])
        self.surrogate.temperature = scale * t0 * (t1 / t0) ** frac
        return t0 != t1

    def _scale(self, x: torch.Tensor) -> float:
        clf = self.model
        return float(kth_distance(embed_batched(clf, x), clf.bank, clf.k, clf.n_spaces).median().clamp_min(1e-12))

    def guide_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._set_temperature(0.0, self._scale(x))
        return self._loss(self.surrogate(self.model.embed(x)), y)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        clf, best = self.model, BestIterate(self.model, x, y)
        scale = self._scale(x)

        def loss_grad(z: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            seen: dict[str, torch.Tensor] = {}

            def loss(u: torch.Tensor) -> torch.Tensor:
                seen["emb"] = emb = clf.embed(u)
                seen["loss"] = out = self._loss(self.surrogate(emb), y[idx])
                return out

            grad = input_gradient(loss, z)
            return seen["loss"].detach(), grad, best.observe(z, seen["emb"], idx)

        for _ in range(int(self.params["restarts"])):
            idx = best.active()
            if len(idx) == 0:
                break
            self._set_temperature(0.0, scale)
            x_end = apgd(lambda z, i: loss_grad(z, idx[i]), x[idx], self.eps, int(self.params["steps"]),
                         on_checkpoint=lambda frac: self._set_temperature(frac, scale), norm=self.norm)
            best.observe(x_end, embed_batched(clf, x_end), idx)
        return best.x_best


_SOFTKNN = {"steps": 100, "restarts": 1, "m": 0, "t0": 1.0, "t1": 0.05}
for _name, _loss in (("softknn-apgd", "ce"), ("softknn-apgd-dlr", "dlr")):
    register(_name, "native", _SOFTKNN,
             f"adaptive: APGD-{_loss.upper()} on the soft-kNN surrogate (m nearest per class; m=0 means k), "
             "temperature annealed t0→t1 × median k-th-neighbour distance, best iterate by the hard vote")(
        type(f"SoftKNNAPGD_{_loss}", (SoftKNNAPGD,), {"name": _name, "loss_name": _loss}))


# ----------------------------------------------------------------------------------------------- vote-square
def square_fraction(p_init: float, it: int, n_queries: int) -> float:
    """Square attack's schedule of the patch area fraction (halved at fixed fractions of 10 000 queries)."""
    it = int(it / n_queries * 10000)
    for i, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= bound:
            return p_init / 2 ** i
    return p_init / 512


def _random_sign(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """±1 uniformly, from the global generator."""
    return 2 * torch.randint(0, 2, shape, device=like.device).to(like.dtype) - 1


@register("vote-square", "native", {"n_queries": 1000, "p_init": 0.8},
          "adaptive: Square attack (Andriushchenko et al.) on the HARD vote margin, swap gap as tie-breaker; "
          "gradient-free, stops per sample when the vote flips; ℓ2: windows of norm ε, then the ℓ2 projection")
class VoteSquare(AdaptiveAttack):
    """ℓ∞: the paper's update (a random ±2ε window, projected). ℓ2: a simplification of the paper's mass-preserving
    update: the window's perturbation is replaced by ±ε/(s·√C) per channel (norm ε on its own), then the whole
    perturbation is projected onto the ℓ2 ball."""

    name = "vote-square"
    family = "gradient-free"

    def guide_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - no gradient
        raise TypeError("vote-square is gradient-free")

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        n, c, h, w = x.shape
        stripes = _random_sign(x, n, c, 1, w).expand(n, c, h, w)
        stripes = stripes if self.norm == "Linf" else ascent_direction(stripes, "L2")
        best = BestIterate(self.model, x, y, with_gap=True, x_init=self.project(x + self.eps * stripes, x))
        n_queries, p_init = int(self.params["n_queries"]), float(self.params["p_init"])
        for i in range(n_queries):
            idx = best.active()
            if len(idx) == 0:
                break
            s = min(max(int(round(math.sqrt(square_fraction(p_init, i, n_queries) * h * w))), 1), h - 1)
            vh, vw = (int(v) for v in torch.randint(0, h - s + 1, (2,)))
            signs = _random_sign(x, len(idx), c, 1, 1)
            if self.norm == "Linf":
                delta = torch.zeros(len(idx), c, h, w, device=x.device, dtype=x.dtype)
                delta[:, :, vh:vh + s, vw:vw + s] = 2 * self.eps * signs
                x_new = self.project(best.x_best[idx] + delta, x[idx])
            else:
                delta = best.x_best[idx] - x[idx]
                delta[:, :, vh:vh + s, vw:vw + s] = self.eps / (s * math.sqrt(c)) * signs
                x_new = self.project(x[idx] + delta, x[idx])
            best.observe(x_new, self.model.embed(x_new), idx)
        return best.x_best


from . import transfer  # noqa: E402,F401  (registers "transfer")

ADAPTIVE_SUITE = ("feature", "softknn-apgd", "softknn-apgd-dlr", "vote-square", "transfer")
register_group("adaptive", ADAPTIVE_SUITE)
