"""AutoAttack, the reference implementation (PyPI ``pyautoattack``, prefix ``aa:``). Single attacks run
inside a ``version="standard"`` AutoAttack restricted to that attack, so they keep AutoAttack's standard
settings (1 restart, 100 iterations, 9 target classes, 5000 Square queries). Device, ε and the norm are always
passed (the library defaults to eps=0.3); every attack has AutoAttack's own ℓ∞ and ℓ2 forms."""

from __future__ import annotations

import logging
from typing import Any

import torch
from pyautoattack import AutoAttack

from ..attacks.base import Attack, register

logging.getLogger("auto-attack").setLevel(logging.WARNING)


class AutoAttackRun(Attack):
    toolkit = "aa"
    gradient_source: str | None = "logits"

    def __init__(self, model: torch.nn.Module, eps: float, *, version: str, attacks: list[str] | None,
                 **params: Any) -> None:
        super().__init__(model, eps, **params)
        base = "standard" if version == "single" else version
        self.aa = AutoAttack(model, device=model.device, eps=self.eps, norm=self.norm, seed=params.get("seed", 0),
                             version=base, attacks=attacks if version == "custom" else None)
        if version == "single":  # standard settings, one attack
            self.aa.attacks_to_run = list(attacks or [])
        self.aa.verbose = False

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv, _ = self.aa.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv


def _register(name: str, version: str, attacks: list[str] | None, description: str) -> None:
    gradient_free = attacks == ["square"]
    cls = type(f"AA_{name}", (AutoAttackRun,), {"name": name, "gradient_source": None if gradient_free else "logits"})
    register(name, "aa", {"seed": 0}, description, default=True)(
        lambda model, eps, **p: cls(model, eps, version=version, attacks=attacks, **p))


_register("apgd", "single", ["apgd-ce"], "AutoAttack APGD-CE (100 iterations)")
_register("apgd-dlr", "single", ["apgd-dlr"], "AutoAttack APGD-DLR (100 iterations)")
_register("apgd-t", "single", ["apgd-t"], "AutoAttack APGD-T (9 target classes)")
_register("fab-t", "single", ["fab-t"], "AutoAttack FAB-T (9 target classes)")
_register("square", "single", ["square"], "AutoAttack Square (5000 queries)")
_register("autoattack", "standard", None, "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square")
_register("autoattack-plus", "plus", None, "AutoAttack plus: + APGD-DLR, FAB, more restarts")
