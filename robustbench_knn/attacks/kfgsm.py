"""kFGSM, the paper's Algorithm 2 (§2.5): n signed-gradient steps of size α on the model's attack objective,
projected onto the ε-ball and [0, 1] after each step; no random start. α = ε·step_ratio (paper: ε/10)."""

from __future__ import annotations

import torch

from .base import Attack, input_gradient, project, register


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
            x_adv = x_adv + alpha * grad.sign()
            x_adv = project(x_adv, x0, self.eps)
        return x_adv.detach()
