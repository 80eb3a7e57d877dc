"""One uniform attack interface (after torchattacks' ``Attack``) and one registry of named attacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import MODELS, UsageError
from ..norms import NORMS
from ..norms import project as _project

# Parameters with a fixed set of values, and the integer ones for which 0 means something (m = 0: k; seed).
CHOICES: dict[str, tuple[str, ...]] = {"target": ("nearest", "mean"), "craft": ("apgd", "kfgsm"), "source": tuple(MODELS)}
ZERO_OK = {"m", "seed", "source_seed"}


def check_param(key: str, param: str, value: Any, default: Any) -> None:
    """One attack parameter against the type and range its default implies (a clear error before any work)."""
    def bad(want: str) -> UsageError:
        return UsageError(f"attack {key}: {param} must be {want}, not {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int) or (default is None and param in ZERO_OK):
        if default is None and value is None:
            return
        low = 0 if param in ZERO_OK else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(f"an integer >= {low}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise bad("a number > 0")
        if param == "p_init" and value > 1:
            raise bad("in (0, 1]")
    elif isinstance(default, str):
        if not isinstance(value, str) or (param in CHOICES and value not in CHOICES[param]):
            raise bad("one of " + ", ".join(CHOICES.get(param, ("a string",))))


class Attack:
    """``attack(x, y) -> x_adv`` on images in [0, 1]; ``model`` is a classifier from ``paper/classifier.py``.

    ``gradient_source`` says which differentiable quantity guides it ("objective": the model's
    ``attack_objective``; "logits": CE on the model's (surrogate) logits; None: gradient-free), so the
    evaluator can count points where that gradient is zero or non-finite.
    """

    name: str = "attack"
    toolkit: str = "native"
    gradient_source: str | None = "objective"

    def __init__(self, model: torch.nn.Module, eps: float, norm: str = "Linf", **params: Any) -> None:
        self.model = model
        self.eps = float(eps)
        self.norm = norm  # "Linf" or "L2" (norms.NORMS); the spec refuses a norm the attack has no form for
        self.params = params

    def project(self, x_adv: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return _project(x_adv, x0, self.eps, self.norm)

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
    norms: tuple[str, ...] = ("Linf",)  # the threat models the attack has a form for

    @property
    def key(self) -> str:
        return f"{self.toolkit}:{self.name}"

    def check(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The parameters with ``overrides`` applied, each checked; a UsageError before any work otherwise."""
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise UsageError(f"attack {self.key} has no parameter(s) {', '.join(sorted(unknown))}; "
                             f"it takes {', '.join(self.defaults) or 'none'}")
        for param, value in overrides.items():
            check_param(self.key, param, value, self.defaults[param])
        return {**self.defaults, **overrides}

    def check_norm(self, norm: str) -> None:
        if norm not in self.norms:
            raise UsageError(f"attack {self.key} has no {norm} form (it runs in {', '.join(self.norms)}); "
                             f"`robustbench-knn attacks` lists each attack's norms")

    def build(self, model: torch.nn.Module, eps: float, norm: str = "Linf", **overrides: Any) -> Attack:
        self.check_norm(norm)
        return self.factory(model, eps, norm=norm, **self.check(overrides))


REGISTRY: dict[str, AttackSpec] = {}
DEFAULT_TOOLKIT: dict[str, str] = {}


def register(name: str, toolkit: str, defaults: dict[str, Any], description: str, *, default: bool = False,
             norms: tuple[str, ...] = NORMS) -> Callable[[Callable[..., Attack]], Callable[..., Attack]]:
    """Register an attack under ``toolkit:name``; ``norms``: the threat models it has a form for (its factory is
    called with ``norm=``)."""
    def deco(factory: Callable[..., Attack]) -> Callable[..., Attack]:
        spec = AttackSpec(name, toolkit, factory, dict(defaults), description, tuple(norms))
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


def project(x_adv: torch.Tensor, x0: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    """Into the ``norm`` ball of radius ``eps`` around ``x0`` and the [0, 1] box (``norms.project``)."""
    return _project(x_adv, x0, eps, norm)


def input_gradient(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """∇_x Σ fn(x); weights are frozen, so only the input carries a gradient."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad
