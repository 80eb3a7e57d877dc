"""Threat models: the ℓ∞ and ℓ2 balls of radius ε around an image, intersected with the [0, 1] box. RobustBench's
spelling ("Linf", "L2"); ε is in pixel units of that norm (8/255 for ℓ∞, 0.5 for ℓ2 on CIFAR-10).

Every attack moves, projects and starts through these functions, and the evaluator measures an example's distance
with :func:`distance`, so an attack and its judge never disagree on what the ball is.
"""

from __future__ import annotations

import torch

from .config import UsageError

NORMS = ("Linf", "L2")
DEFAULT_EPS = {"Linf": "8/255,16/255", "L2": "0.5,1.0"}  # the usual CIFAR-10 radii (RobustBench: 8/255, 0.5)


def parse_norm(text: str) -> str:
    """``Linf`` | ``L2`` (any case; ``inf`` and ``2`` too) → the canonical spelling; a UsageError otherwise."""
    key = str(text).strip().lower()
    for norm, spellings in (("Linf", ("linf", "l_inf", "inf")), ("L2", ("l2", "2"))):
        if key in spellings:
            return norm
    raise UsageError(f"norm must be one of {', '.join(NORMS)}, not {text!r}")


def _per_sample(t: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (t.dim() - 1)


def distance(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample distance ‖x_adv − x‖ in ``norm``, shape (N,)."""
    flat = (x_adv - x).flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)


def project(x_adv: torch.Tensor, x0: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    """Into the ``norm`` ball of radius ``eps`` around ``x0``, then the [0, 1] box. For ℓ2 the ball is applied
    first: clipping to the box then only moves coordinates towards ``x0`` (which lies in the box), so the result
    stays in both."""
    if norm == "Linf":
        return torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    delta = x_adv - x0
    n = delta.flatten(1).norm(dim=1).view(_per_sample(delta))
    radius = max(eps - l2_rounding_margin(x0), 0.0)
    scale = torch.where(n > radius, radius / n.clamp_min(1e-30), torch.ones_like(n))
    return (x0 + delta * scale).clamp(0.0, 1.0)


def l2_rounding_margin(x0: torch.Tensor) -> float:
    """How far inside the ℓ2 ball a projection aims so that rounding cannot carry the example outside it: forming
    ``x0 + δ`` in ``x0``'s dtype moves each pixel in [0, 1] by at most half a unit in the last place of numbers
    just below 1 (2⁻²⁵ in float32), so ‖x_adv − x0‖₂ can exceed ‖δ‖₂ by √d of those (1.7e-6 for a 3072-pixel
    float32 image, above the judge's 1e-6 slack). The margin is four times that bound, leaving room for the
    judge's own rounding; it is 1.3e-5 of ε = 0.5."""
    d = x0[0].numel() if x0.dim() > 0 else 1
    return d ** 0.5 * torch.finfo(x0.dtype).eps


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent step of unit size in ``norm``: sign(g) for ℓ∞, g/‖g‖₂ for ℓ2 (0 where g = 0)."""
    if norm == "Linf":
        return grad.sign()
    n = grad.flatten(1).norm(dim=1).view(_per_sample(grad))
    return torch.where(n > 0, grad / n.clamp_min(1e-30), torch.zeros_like(grad))


def random_start(x0: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    """Uniform in the ball (then the box), from the global generator so runs are seeded by the caller. ℓ2: a
    uniform direction and radius ε·U^{1/d}."""
    if norm == "Linf":
        return project(x0 + eps * (2 * torch.rand_like(x0) - 1), x0, eps, norm)
    d = x0[0].numel()
    direction = ascent_direction(torch.randn_like(x0), "L2")
    radius = eps * torch.rand(len(x0), device=x0.device, dtype=x0.dtype) ** (1.0 / d)
    return project(x0 + direction * radius.view(_per_sample(x0)), x0, eps, norm)
