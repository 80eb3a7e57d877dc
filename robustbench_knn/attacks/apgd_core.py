"""A compact APGD (Croce & Hein 2020, Alg. 1): momentum 0.75, step 2ε halved at checkpoints where the loss
stalled, restart from the best point after each halving. ℓ∞ steps along sign(g), ℓ2 steps along g/‖g‖₂ (as
AutoAttack's ℓ2 APGD), each projected onto its own ball.

Written here (rather than wrapping AutoAttack's class) because the adaptive attacks need two things the
library does not offer: a loss that changes between checkpoints (the soft-kNN temperature schedule) and a
per-step hook that judges every iterate by the hard k-NN vote and drops the samples it has already broken.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..norms import ascent_direction, project, random_start

# (x of the active samples, their indices in the batch) -> (loss to maximise (n,), its input gradient, done (n,) | None)
LossGrad = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]"]


def checkpoints(steps: int) -> list[int]:
    """APGD's checkpoint iterations: p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps) for q in p[1:] if q <= 1 and math.ceil(q * steps) < steps})


def apgd(loss_grad: LossGrad, x0: torch.Tensor, eps: float, steps: int, *, x_init: torch.Tensor | None = None,
         on_checkpoint: Callable[[float], bool] | None = None, rho: float = 0.75, momentum: float = 0.75,
         norm: str = "Linf") -> torch.Tensor:
    """Maximise ``loss_grad``'s loss in the ε-ball around ``x0``; returns the highest-loss iterate per sample.

    Samples ``loss_grad`` reports done are dropped (their work is finished, e.g. the vote flipped).
    ``on_checkpoint(fraction)`` runs at each checkpoint; when it returns True the loss has changed (a new
    temperature) and the best loss is re-measured so the stall test compares like with like.
    """
    x = random_start(x0, eps, norm) if x_init is None else x_init.clone()
    idx = torch.arange(len(x0), device=x0.device)
    f, g, done = loss_grad(x, idx)
    x_best, f_best, g_best = x.clone(), f.detach().clone(), g.clone()
    x_prev, f_cur = x.clone(), f.detach()
    eta = torch.full((len(x0),), 2 * eps, device=x0.device)
    count = torch.zeros(len(x0), device=x0.device)
    eta_ckpt, f_ckpt = eta.clone(), f_best.clone()
    ckpts, last = set(checkpoints(steps)), 0
    view = (-1,) + (1,) * (x0.dim() - 1)
    for k in range(1, steps):
        if done is not None and done.any():
            keep = ~done
            idx, x, x_prev, g, f_cur, eta, count, eta_ckpt, f_ckpt = (
                t[keep] for t in (idx, x, x_prev, g, f_cur, eta, count, eta_ckpt, f_ckpt))
        if len(idx) == 0:
            break
        xo = x0[idx]
        z = project(x + eta.view(view) * ascent_direction(g, norm), xo, eps, norm)
        a = 1.0 if k == 1 else momentum
        x, x_prev = project(x + a * (z - x) + (1 - a) * (x - x_prev), xo, eps, norm), x
        f, g, done = loss_grad(x, idx)
        f = f.detach()
        count += (f > f_cur).float()
        f_cur = f
        better = f > f_best[idx]
        rows = idx[better]
        x_best[rows], f_best[rows], g_best[rows] = x[better], f[better], g[better]
        if k not in ckpts:
            continue
        if on_checkpoint is not None and on_checkpoint(k / steps):
            f_best[idx] = loss_grad(x_best[idx], idx)[0].detach()
        stalled = (count < rho * (k - last)) | ((eta == eta_ckpt) & (f_best[idx] == f_ckpt))
        eta_ckpt, f_ckpt = eta.clone(), f_best[idx].clone()
        eta = torch.where(stalled, eta / 2, eta)
        sv = stalled.view(view)
        x = torch.where(sv, x_best[idx], x)
        x_prev = torch.where(sv, x, x_prev)
        g = torch.where(sv, g_best[idx], g)
        count.zero_()
        last = k
    return x_best
