"""torchattacks (prefix ``ta:``). Defaults: torchattacks' own for PGD/BIM (10 steps, α = ε/4, i.e. 2/255 at
8/255); AutoAttack's standard settings for APGD, APGD-T, FAB-T and Square (100 iterations, 9 target
classes, 5000 queries). ℓ2: ``pgd`` is torchattacks' PGDL2, the APGD family, FAB and Square take ``norm="L2"``;
BIM has no ℓ2 form."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torchattacks as ta

from ..attacks.base import Attack, register


class TorchattacksAttack(Attack):
    toolkit = "ta"
    gradient_source: str | None = "logits"

    def __init__(self, model: torch.nn.Module, eps: float, *, build: Callable[..., Any], **params: Any) -> None:
        super().__init__(model, eps, **params)
        self.atk = build(model, self.eps, norm=self.norm, **self.params)
        self.atk.set_device(model.device)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.atk(x, y)


def _register(name: str, defaults: dict[str, Any], description: str, build: Callable[..., Any],
              gradient_free: bool = False, norms: tuple[str, ...] = ("Linf", "L2")) -> None:
    """``build(model, eps, norm=..., **params)`` makes the torchattacks object."""
    cls = type(f"TA_{name}", (TorchattacksAttack,), {"name": name, "gradient_source": None if gradient_free else "logits"})
    register(name, "ta", defaults, description, norms=norms)(lambda model, eps, **p: cls(model, eps, build=build, **p))


N = 10  # classes

_register("pgd", {"steps": 10, "step_ratio": 0.25, "random_start": True},
          "torchattacks.PGD (Madry et al.); ℓ2: torchattacks.PGDL2",
          lambda m, eps, norm, steps, step_ratio, random_start: (ta.PGD if norm == "Linf" else ta.PGDL2)(
              m, eps=eps, alpha=eps * step_ratio, steps=steps, random_start=random_start))
_register("bim", {"steps": 10, "step_ratio": 0.25}, "torchattacks.BIM",
          lambda m, eps, norm, steps, step_ratio: ta.BIM(m, eps=eps, alpha=eps * step_ratio, steps=steps),
          norms=("Linf",))
_register("apgd", {"steps": 100, "n_restarts": 1, "seed": 0}, "torchattacks.APGD, CE loss",
          lambda m, eps, norm, **p: ta.APGD(m, norm=norm, eps=eps, loss="ce", **p))
_register("apgd-dlr", {"steps": 100, "n_restarts": 1, "seed": 0}, "torchattacks.APGD, DLR loss",
          lambda m, eps, norm, **p: ta.APGD(m, norm=norm, eps=eps, loss="dlr", **p))
_register("apgd-t", {"steps": 100, "n_restarts": 1, "seed": 0}, "torchattacks.APGDT (9 target classes)",
          lambda m, eps, norm, **p: ta.APGDT(m, norm=norm, eps=eps, n_classes=N, **p))
_register("fab-t", {"steps": 100, "n_restarts": 1, "seed": 0}, "torchattacks.FAB, multi-targeted (9 targets)",
          lambda m, eps, norm, **p: ta.FAB(m, norm=norm, eps=eps, multi_targeted=True, n_classes=N, **p))
_register("square", {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8, "seed": 0}, "torchattacks.Square (margin loss)",
          lambda m, eps, norm, **p: ta.Square(m, norm=norm, eps=eps, **p), gradient_free=True)
def _ensemble(m: torch.nn.Module, eps: float, norm: str, seed: int, steps: int, plus: bool) -> Any:
    """AutoAttack through torchattacks' public classes at AutoAttack's published settings.

    ``torchattacks.AutoAttack`` leaves APGD, APGD-T and FAB at torchattacks' 10-step defaults; the reference
    (Croce & Hein 2020) runs them for 100 iterations. ``MultiAttack`` keeps torchattacks' own logic (each
    attack runs on the points the previous ones did not break)."""
    kw = {"norm": norm, "eps": eps, "seed": seed}
    if not plus:
        attacks = [ta.APGD(m, loss="ce", steps=steps, n_restarts=1, **kw),
                   ta.APGDT(m, steps=steps, n_restarts=1, n_classes=N, **kw),
                   ta.FAB(m, steps=steps, multi_targeted=True, n_restarts=1, n_classes=N, **kw),
                   ta.Square(m, n_queries=5000, n_restarts=1, **kw)]
    else:
        attacks = [ta.APGD(m, loss="ce", steps=steps, n_restarts=5, **kw),
                   ta.APGD(m, loss="dlr", steps=steps, n_restarts=5, **kw),
                   ta.FAB(m, steps=steps, n_restarts=5, n_classes=N, **kw),
                   ta.Square(m, n_queries=5000, n_restarts=1, **kw),
                   ta.APGDT(m, steps=steps, n_restarts=1, n_classes=N, **kw),
                   ta.FAB(m, steps=steps, multi_targeted=True, n_restarts=1, n_classes=N, **kw)]
    return ta.MultiAttack(attacks)


_register("autoattack", {"seed": 0, "steps": 100},
          "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5000) from torchattacks' classes, 100 iterations",
          lambda m, eps, norm, seed, steps: _ensemble(m, eps, norm, seed, steps, plus=False))
_register("autoattack-plus", {"seed": 0, "steps": 100},
          "AutoAttack plus (+ APGD-DLR, FAB, 5 restarts) from torchattacks' classes, 100 iterations",
          lambda m, eps, norm, seed, steps: _ensemble(m, eps, norm, seed, steps, plus=True))
