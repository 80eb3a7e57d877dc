"""Linear bounds on an embedding over an input box, CROWN-style (Zhang et al. 2018; "CROWN-IBP", Zhang et al.
2020): every output coordinate is bounded above and below by a linear function of the network's input, carried
backward from the output through each layer, and the linear functions are then maximised and minimised over the
input box in closed form. A ReLU with pre-activation bounds [l, u] that straddle 0 (from IBP, :mod:`.bounds`)
is relaxed between the lines y ≥ α·x (α = 1 if u > −l else 0) and y ≤ u·(x − l)/(u − l); stable ones are exact.
Unlike IBP, the residual layers' skip and branch keep their shared dependence on the input, so the two do not add
up as if independent. auto_LiRPA, the library for this, requires torch < 1.13.

Supported: ``nn.Sequential`` of Linear, ReLU, Flatten and Identity, and the paper's IdResNet after its input
normalisation (whose IBP box becomes the input box here); anything else gets no linear bounds (None) and keeps
its IBP box. All in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..defenses.subjects import Penultimate, Pixels
from ..paper.model import IdRes, IdResNet

LINEAR_OK = (nn.Linear, nn.ReLU, nn.Flatten, nn.Identity, Pixels, nn.Sequential, IdRes)
# the backward pass costs one product per output coordinate and layer: a wide embedding (deep k-NN's 2048
# penultimate features) would cost thousands of forward passes per image, so it keeps its IBP box
MAX_OUTPUTS = 256


@dataclass
class Linear:
    """Bounds A_lo·x + c_lo ≤ output ≤ A_hi·x + c_hi over the input set; A (B, O, n), c (B, O)."""

    a_lo: torch.Tensor
    c_lo: torch.Tensor
    a_hi: torch.Tensor
    c_hi: torch.Tensor


def supported(m: nn.Module) -> bool:
    """Linear bounds apply: every layer after the input normalisation is Linear or ReLU (or a residual of them),
    and the output has at most ``MAX_OUTPUTS`` coordinates."""
    return 0 < _out_dim(nn.Sequential(*_layers(m))) <= MAX_OUTPUTS and _layer_types_ok(m)


def _layer_types_ok(m: nn.Module) -> bool:
    if isinstance(m, (IdResNet, Penultimate)):
        net = m.net if isinstance(m, Penultimate) else m
        return isinstance(net, IdResNet) and all(_layer_types_ok(d) for d in net.dec) and _layer_types_ok(net.cl)
    if isinstance(m, (nn.Sequential, IdRes)):
        return all(_layer_types_ok(c) for c in (m.branch if isinstance(m, IdRes) else m))
    return isinstance(m, LINEAR_OK)


def _backward(m: nn.Module, bound: Linear, relus: list[tuple[torch.Tensor, torch.Tensor]]) -> Linear:
    """Bounds in terms of ``m``'s output → bounds in terms of its input; pops the ReLU records in reverse."""
    if isinstance(m, nn.Sequential):
        for layer in reversed(m):
            bound = _backward(layer, bound, relus)
        return bound
    if isinstance(m, nn.Linear):
        w = m.weight.double()
        b = m.bias.double() if m.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return Linear(bound.a_lo @ w, bound.c_lo + bound.a_lo @ b, bound.a_hi @ w, bound.c_hi + bound.a_hi @ b)
    if isinstance(m, nn.ReLU):
        lo, hi = relus.pop()
        lo, hi = lo[:, None, :], hi[:, None, :]
        unstable = (lo < 0) & (hi > 0)
        up = torch.where(unstable, hi / (hi - lo).clamp_min(1e-30), (lo >= 0).double())  # y ≤ up·x + off
        off = torch.where(unstable, -up * lo, torch.zeros_like(lo))
        down = torch.where(unstable, (hi > -lo).double(), (lo >= 0).double())  # y ≥ down·x
        pos_hi, neg_hi = bound.a_hi.clamp_min(0), bound.a_hi.clamp_max(0)
        pos_lo, neg_lo = bound.a_lo.clamp_min(0), bound.a_lo.clamp_max(0)
        return Linear(pos_lo * down + neg_lo * up, bound.c_lo + (neg_lo * off).sum(-1),
                      pos_hi * up + neg_hi * down, bound.c_hi + (pos_hi * off).sum(-1))
    if isinstance(m, IdRes):
        inner = _backward(m.branch, bound, relus)
        if not m.identity:
            return inner
        skip = inner.a_lo.shape[-1] - m.out_dim  # the skip reads the last out_dim inputs
        pad = (skip, 0)
        return Linear(inner.a_lo + nn.functional.pad(bound.a_lo, pad), inner.c_lo,
                      inner.a_hi + nn.functional.pad(bound.a_hi, pad), inner.c_hi)
    return bound


def _layers(m: nn.Module) -> list[nn.Module]:
    """The modules after the input normalisation, in order (IdResNet: OtS, its ReLU, the Dec layers, CL)."""
    net = m.net if isinstance(m, Penultimate) else m
    if not isinstance(net, IdResNet):
        return [m]
    out: list[nn.Module] = [net.ots] + ([nn.ReLU()] if net.cfg.ots_activation == "relu" else [])
    out += [net.dec[0 if net.cfg.share_dec else i] for i in range(net.cfg.n_dec)]
    return out if isinstance(m, Penultimate) else out + [net.cl]


def linear_bounds(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor, relus: list[tuple[torch.Tensor, torch.Tensor]],
                  max_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lo, hi) (B, O) of ``m``'s output from linear bounds over the box [lo, hi] (B, n) float64 that its first
    layer reads (for an IdResNet: its normalised input), given ``relus``: every ReLU's input bounds in the order
    the IBP pass applied them (``bounds.propagate``); None where a layer is not supported. Rows in chunks, so
    that A (rows, O, widest layer) holds at most ``max_elements``."""
    if not supported(m):
        return None
    layers = nn.Sequential(*_layers(m))
    n_out = _out_dim(layers)
    width = max([lo.shape[1]] + [r[0].shape[1] for r in relus])
    rows = max(1, max_elements // (n_out * width))
    out_lo, out_hi = [], []
    for s in range(0, len(lo), rows):
        x_lo, x_hi = lo[s:s + rows], hi[s:s + rows]
        eye = torch.eye(n_out, dtype=lo.dtype, device=lo.device).expand(len(x_lo), -1, -1)
        zero = torch.zeros(len(x_lo), n_out, dtype=lo.dtype, device=lo.device)
        b = _backward(layers, Linear(eye, zero, eye, zero), [(r_lo[s:s + rows], r_hi[s:s + rows])
                                                              for r_lo, r_hi in relus])
        mid, rad = ((x_lo + x_hi) / 2)[:, :, None], ((x_hi - x_lo) / 2)[:, :, None]
        out_lo.append((b.a_lo @ mid)[..., 0] - (b.a_lo.abs() @ rad)[..., 0] + b.c_lo)
        out_hi.append((b.a_hi @ mid)[..., 0] + (b.a_hi.abs() @ rad)[..., 0] + b.c_hi)
    return torch.cat(out_lo), torch.cat(out_hi)


def _out_dim(m: nn.Module) -> int:
    """The output width: the last Linear's (an IdRes without identity, or with, outputs out_dim); 0 without one."""
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    return linears[-1].out_features if linears else 0
