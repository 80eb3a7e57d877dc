"""IdResNet (§2.2): OtS → Dec_1..3 → CL, with pixel-wise normalisation and the training noise inside the model.

Inputs are images in [0, 1] of shape (N, 3, 32, 32), so every attack works in pixel space with ε in pixel
units. The residual branch of an IdRes layer is ``relu → Linear`` repeated ``branch_depth`` times (one dense
layer by default, f(x) = W·relu(x) + b); its last Linear is zero-initialised so a fresh IdRes layer is
exactly the identity (on the last ``out_dim`` features of its input) and still trains. With
``identity_init=False`` each layer is that branch alone, randomly initialised: a plain pre-activation MLP,
which with OtS and CL is the "5-layer MLP" of Table 2.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..data import binomial_noise


def _branch(in_dim: int, out_dim: int, depth: int, zero_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.ReLU(), nn.Linear(in_dim, out_dim if i == depth - 1 else in_dim)]
    if zero_last:
        last = layers[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


class IdRes(nn.Module):
    """IdRes(x) = x[:, -out_dim:] + f(x) with f zero-initialised; or plain f(x) when ``identity=False``."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 1, identity: bool = True) -> None:
        super().__init__()
        if identity and out_dim > in_dim:
            raise ValueError("the identity branch needs out_dim <= in_dim")
        self.out_dim = out_dim
        self.identity = identity
        self.branch = _branch(in_dim, out_dim, depth, zero_last=identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        return x[:, -self.out_dim:] + out if self.identity else out


class IdResNet(nn.Module):
    """CL ∘ Dec_3 ∘ Dec_2 ∘ Dec_1 ∘ OtS, on pixel-normalised images; output (N, out_dim)."""

    def __init__(self, cfg: ModelConfig, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        width = cfg.w_r + cfg.w_p
        self.register_buffer("mean", mean.clone() if mean is not None else torch.zeros(3, 32, 32))
        self.register_buffer("std", std.clone() if std is not None else torch.ones(3, 32, 32))
        self.ots = nn.Linear(3 * 32 * 32, width)
        n_dec_modules = 1 if cfg.share_dec else cfg.n_dec
        self.dec = nn.ModuleList(
            IdRes(width, width, cfg.branch_depth, cfg.identity_init) for _ in range(n_dec_modules)
        )
        self.cl = IdRes(width, cfg.out_dim, cfg.branch_depth, cfg.identity_init)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """§3.1's "normalize each image (to μ = 0, σ = 1) pixelwise", differentiable, so ε stays in pixel units.

        "image": each image minus its own mean, divided by its own (population) std over its 3072 values. The
        variance is floored at 1/3072 before the square root (TensorFlow's per_image_standardization rule), so
        a constant image maps to 0 with finite gradients instead of dividing by zero (sqrt(0) has an infinite
        derivative). "position": the training set's mean/std per pixel position and channel (buffers).
        """
        if self.cfg.normalization == "image":
            flat = x.flatten(1)
            mu = flat.mean(1, keepdim=True)
            var = (flat - mu).pow(2).mean(1, keepdim=True)
            return ((flat - mu) / var.clamp_min(1.0 / flat.shape[1]).sqrt()).view_as(x)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor, noise: bool = False, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """The state the last layer (CL) reads: the penultimate features (width W_R + W_P)."""
        z = self.normalise(x)
        if noise:
            z = z + binomial_noise(z.shape, generator=generator, device=z.device)
        h = self.ots(z.flatten(1))
        if self.cfg.ots_activation == "relu":
            h = torch.relu(h)
        for i in range(self.cfg.n_dec):
            h = self.dec[0 if self.cfg.share_dec else i](h)
        return h

    def forward(self, x: torch.Tensor, noise: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Embedding (or logits). ``noise=True`` only in training: Δ = 2·Bin(5, ½) − 5 on the normalised image."""
        return self.cl(self.features(x, noise, generator))

    def flops_per_sample(self) -> int:
        """2 × multiply-adds of one forward pass (shared Dec layers count once per application)."""
        def macs(m: nn.Module) -> int:
            return sum(l.weight.numel() for l in m.modules() if isinstance(l, nn.Linear))

        dec = sum(macs(self.dec[0 if self.cfg.share_dec else i]) for i in range(self.cfg.n_dec))
        return 2 * (self.ots.weight.numel() + dec + macs(self.cl))
