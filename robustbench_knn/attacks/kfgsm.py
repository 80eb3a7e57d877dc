"""kFGSM, the paper's Algorithm 2 (§2.5): n signed-gradient steps of size α on the model's attack objective,
projected onto the ε-ball and [0, 1] after each step; no random start. α = ε·step_ratio (paper: ε/10). In ℓ2 the
step is the normalised gradient α·g/‖g‖₂ and the projection the ℓ2 ball's."""

from __future__ import annotations

import torch

from ..norms import ascent_direction
from .base import Attack, input_gradient, register


@register("kfgsm", "native", {"steps": 30, "step_ratio": 0.1},
          "paper's Algorithm 2: signed-gradient ascent on the §2.5 attack loss (CE for logit models), α = ε·step_ratio")
class KFGSM(Attack):
    name = "kfgsm"

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        steps, alpha = int(self.params["steps"]), self.eps * float(self.params["step_ratio"])
        x0 = x.detach()
        x_adv = x0.clone()
        for _ in range(steps):
            grad = input_gradient(lambda z: self.model.attack_objective(z, y), x_adv)
            x_adv = self.project(x_adv + alpha * ascent_direction(grad, self.norm), x0)
        return x_adv.detach()
