"""One uniform attack interface (after torchattacks' ``Attack``) and one registry of named attacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import UsageError


class Attack:
    """``attack(x, y) -> x_adv`` on images in [0, 1]; ``model`` is a classifier from ``classifier.py``.

    ``gradient_source`` says which differentiable quantity guides it ("objective": the model's
    ``attack_objective``; "logits": CE on the model's (surrogate) logits; None: gradient-free), so the
    evaluator can count points where that gradient is zero or non-finite.
    """

    name: str = "attack"
    toolkit: str = "native"
    gradient_source: str | None = "objective"

    def __init__(self, model: torch.nn.Module, eps: float, **params: Any) -> None:
        self.model = model
        self.eps = float(eps)
        self.params = params

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return x.clone()
        return self.perturb(x, y)


@dataclass(frozen=True)
class AttackSpec:
    name: str
    toolkit: str
    factory: Callable[..., Attack]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def key(self) -> str:
        return f"{self.toolkit}:{self.name}"

    def build(self, model: torch.nn.Module, eps: float, **overrides: Any) -> Attack:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise UsageError(f"attack {self.key} has no parameter(s) {', '.join(sorted(unknown))}; "
                             f"it takes {', '.join(self.defaults) or 'none'}")
        return self.factory(model, eps, **{**self.defaults, **overrides})


REGISTRY: dict[str, AttackSpec] = {}
DEFAULT_TOOLKIT: dict[str, str] = {}


def register(name: str, toolkit: str, defaults: dict[str, Any], description: str, *, default: bool = False
             ) -> Callable[[Callable[..., Attack]], Callable[..., Attack]]:
    def deco(factory: Callable[..., Attack]) -> Callable[..., Attack]:
        spec = AttackSpec(name, toolkit, factory, dict(defaults), description)
        REGISTRY[spec.key] = spec
        if default or name not in DEFAULT_TOOLKIT:
            DEFAULT_TOOLKIT[name] = toolkit
        return factory

    return deco


def get_attack(name: str) -> AttackSpec:
    """'kfgsm' (the default toolkit for that name) or 'toolkit:name'."""
    key = name.strip().lower()
    if ":" not in key:
        if key not in DEFAULT_TOOLKIT:
            raise UsageError(f"unknown attack {name!r}; `robustbench-knn attacks` lists them")
        key = f"{DEFAULT_TOOLKIT[key]}:{key}"
    if key not in REGISTRY:
        raise UsageError(f"unknown attack {name!r}; `robustbench-knn attacks` lists them")
    return REGISTRY[key]


GROUPS: dict[str, tuple[str, ...]] = {}


def register_group(name: str, members: tuple[str, ...] | list[str]) -> None:
    """A name in ``--attacks`` that stands for several attacks (e.g. ``adaptive``)."""
    GROUPS[name] = tuple(members)


def parse_attack_list(text: str) -> list[AttackSpec]:
    """Comma list of attack or group names → specs, groups expanded, duplicates dropped (first kept)."""
    names = [n for n in (p.strip() for p in text.split(",")) if n]
    if not names:
        raise UsageError("--attacks needs at least one attack name")
    specs: dict[str, AttackSpec] = {}
    for member in (m for n in names for m in GROUPS.get(n.lower(), (n,))):
        spec = get_attack(member)
        specs.setdefault(spec.key, spec)
    return list(specs.values())


def project(x_adv: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the ℓ∞ ball of radius ``eps`` around ``x0`` and the [0, 1] box."""
    return torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)


def input_gradient(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """∇_x Σ fn(x); weights are frozen, so only the input carries a gradient."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad
