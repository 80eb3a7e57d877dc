"""adversarial-robustness-toolbox (prefix ``art:``): a ``PyTorchClassifier`` over the classifier's logits.
Defaults: PGD as torchattacks (10 steps, ε/4, random start); APGD 100 iterations, 1 restart, initial step
2ε (AutoAttack's); Square 5000 queries; ART's AutoAttack with its default attack list. Every one takes ART's
``norm=2`` for ℓ2. A query-only attack (Square) asks the model through :class:`QueryCache`, which answers the
points ART asks about again from a memo: the same attack at AutoAttack's cost per query."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, ProjectedGradientDescentPyTorch, SquareAttack
from art.estimators.classification import PyTorchClassifier

from ..attacks.base import Attack, register
from .query_cache import QueryCache


def art_estimator(model: torch.nn.Module) -> PyTorchClassifier:
    return PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 32, 32),
                             nb_classes=model.n_classes, clip_values=(0.0, 1.0),
                             device_type="gpu" if model.device.type == "cuda" else "cpu")


class ARTAttack(Attack):
    toolkit = "art"
    gradient_source: str | None = "logits"

    def __init__(self, model: torch.nn.Module, eps: float, *, build: Callable[..., Any], **params: Any) -> None:
        super().__init__(model, eps, **params)
        self.build = build

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seed = self.params.get("seed", 0)
        np.random.seed(seed)  # ART draws random starts and Square's squares from numpy's global generator
        model = self.model if self.gradient_source else QueryCache(self.model, capacity=max(4096, 4 * len(x)))
        atk = self.build(art_estimator(model), self.eps, len(x), np.inf if self.norm == "Linf" else 2,
                         **self.params)
        x_adv = torch.from_numpy(atk.generate(x=x.detach().cpu().numpy(), y=y.detach().cpu().numpy()))
        return _finite_or_clean(x_adv.to(x.device, x.dtype), x)


def _finite_or_clean(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The clean image for every point where ART returned a non-finite value: its ℓ2 Square divides by a window's
    norm, which can be 0 (NaN), and such a point was not broken. Said, since it weakens the attack on that point."""
    bad = ~torch.isfinite(x_adv.flatten(1)).all(1)
    if bad.any():
        warnings.warn(f"ART returned non-finite values for {int(bad.sum())} of {len(x)} points; those points keep "
                      f"their clean image", RuntimeWarning, stacklevel=3)
        x_adv = torch.where(bad.view(-1, *[1] * (x.dim() - 1)), x, x_adv)
    return x_adv


def _register(name: str, defaults: dict[str, Any], description: str, build: Callable[..., Any],
              gradient_free: bool = False) -> None:
    cls = type(f"ART_{name}", (ARTAttack,), {"name": name, "gradient_source": None if gradient_free else "logits"})
    register(name, "art", {**defaults, "seed": 0}, description)(lambda model, eps, **p: cls(model, eps, build=build, **p))


_register("pgd", {"steps": 10, "step_ratio": 0.25, "random_start": True}, "ART ProjectedGradientDescentPyTorch",
          lambda est, eps, bs, norm, steps, step_ratio, random_start, seed: ProjectedGradientDescentPyTorch(
              est, norm=norm, eps=eps, eps_step=eps * step_ratio, max_iter=steps, num_random_init=int(random_start),
              batch_size=bs, verbose=False))
_register("apgd", {"steps": 100, "n_restarts": 1}, "ART AutoProjectedGradientDescent, CE loss",
          lambda est, eps, bs, norm, steps, n_restarts, seed: AutoProjectedGradientDescent(
              est, norm=norm, eps=eps, eps_step=2 * eps, max_iter=steps, nb_random_init=n_restarts, batch_size=bs,
              loss_type="cross_entropy", verbose=False))
_register("apgd-dlr", {"steps": 100, "n_restarts": 1}, "ART AutoProjectedGradientDescent, DLR loss",
          lambda est, eps, bs, norm, steps, n_restarts, seed: AutoProjectedGradientDescent(
              est, norm=norm, eps=eps, eps_step=2 * eps, max_iter=steps, nb_random_init=n_restarts, batch_size=bs,
              loss_type="difference_logits_ratio", verbose=False))
_register("square", {"n_queries": 5000, "p_init": 0.8, "n_restarts": 1}, "ART SquareAttack",
          lambda est, eps, bs, norm, n_queries, p_init, n_restarts, seed: SquareAttack(
              est, norm=norm, eps=eps, max_iter=n_queries, p_init=p_init, nb_restarts=n_restarts, batch_size=bs,
              verbose=False), gradient_free=True)
_register("autoattack", {}, "ART AutoAttack (its default attack list)",
          lambda est, eps, bs, norm, seed: AutoAttack(est, norm=norm, eps=eps, eps_step=eps / 4, batch_size=bs))
