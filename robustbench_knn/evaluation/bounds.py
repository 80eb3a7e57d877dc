"""Sound bounds for certification: the embedding of every input in a threat ball, and the distance from it to
each bank point, as intervals.

- ``input_box``: the ℓ∞ ball ∩ [0, 1] is a box; the ℓ2 ball ∩ [0, 1] lies inside the box x ± ε clipped to [0, 1]
  (the ℓ2 radius travels with the box for the layers that can use it).
- ``embedding_bounds``: interval bound propagation (IBP) through the layers of the paper's IdResNet (per-image or
  per-position normalisation, Linear, ReLU, identity-initialised residual layers) and of plain ``nn.Sequential``
  embeddings (Linear, Flatten, Identity, ReLU, Tanh, Sigmoid); any other layer is refused, never guessed. Where
  every layer after the normalisation is Linear or ReLU, the box is intersected with CROWN-style linear bounds
  (:mod:`.linear_bounds`) computed from the same pass.
- ``distance_intervals``: per test point and bank point, [lo, hi] ⊇ {dist(f(x'), b) : x' in the ball} for the
  defense's metric (``l2``, ``sum-l2:N``, ``cosine``). An identity embedding (raw pixels) gets the exact box
  distances, for ℓ2 intersected with ‖x − b‖ ± ε per sub-space.

Arithmetic is float64. The network itself runs in float32, so its computed embedding can differ from the real-number
function IBP bounds by rounding: network boxes are widened by ``FLOAT_SLACK`` (relative) to cover that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import UsageError
from ..defenses.defense import KNNDefense
from ..defenses.subjects import Penultimate, Pixels
from ..paper.model import IdRes, IdResNet
from .evaluate import TOL
from .linear_bounds import linear_bounds

FLOAT_SLACK = 1e-5  # relative widening of network boxes: float32 forward passes round by far less than this
EXACT_SLACK = 1e-9  # float64 rounding of the identity embedding's closed forms
MONOTONE = (nn.ReLU, nn.Tanh, nn.Sigmoid)  # elementwise non-decreasing: bounds map end to end
IDENTITY = (nn.Flatten, nn.Identity, Pixels)


@dataclass
class Box:
    """lo ≤ z ≤ hi per coordinate, (B, W) float64. ``center`` and ``l2`` (an ℓ2 radius around it, (B,)) are
    known for the input set only; a layer passes them on only where the values are unchanged."""

    lo: torch.Tensor
    hi: torch.Tensor
    center: torch.Tensor | None = None
    l2: torch.Tensor | None = None

    def plain(self, lo: torch.Tensor, hi: torch.Tensor) -> "Box":
        return Box(lo, hi)


def input_box(x: torch.Tensor, eps: torch.Tensor | float, norm: str) -> Box:
    """The threat set of each row of ``x`` (any image shape, flattened) at radius ``eps`` (a float or one per row),
    grown by the judge's float32 slack ``TOL``: every example the evaluator accepts as valid lies inside."""
    x = x.flatten(1).double()
    e = torch.as_tensor(eps, dtype=torch.float64, device=x.device).expand(len(x)).reshape(-1, 1)
    e = e + TOL * (e.clamp_min(1) if norm == "L2" else 1)  # the slack evaluate.valid_examples accepts
    lo, hi = (x - e).clamp(-TOL, 1 + TOL), (x + e).clamp(-TOL, 1 + TOL)
    return Box(lo, hi, center=x, l2=e[:, 0] if norm == "L2" else None)


def is_identity(net: nn.Module) -> bool:
    """An embedding that returns its input flattened (raw-pixel k-NN)."""
    if isinstance(net, nn.Sequential):
        return all(is_identity(m) for m in net)
    return isinstance(net, IDENTITY)


def _linear(m: nn.Linear, box: Box) -> Box:
    w = m.weight.double()
    mid, rad = (box.lo + box.hi) / 2, (box.hi - box.lo) / 2
    c = mid @ w.T + (m.bias.double() if m.bias is not None else 0)
    r = rad @ w.abs().T
    return Box(c - r, c + r)


def _image_normalisation(box: Box) -> Box:
    """Bounds on IdResNet's per-image standardisation z = (x − mean(x)) / max(‖Px‖, 1)·√D, with P the centring
    projection. The denominator: ‖Px'‖ is within r of ‖Pc‖ for any x' within ℓ2 distance r of c (P is an
    orthogonal projection, so ‖P(x' − c)‖ ≤ r). The numerator is linear in x'; its box is exact per coordinate."""
    lo, hi = box.lo, box.hi
    d = lo.shape[1]
    c = box.center if box.center is not None else (lo + hi) / 2
    r = torch.maximum(hi - c, c - lo).norm(dim=1)  # the box around c in ℓ2
    if box.l2 is not None:
        r = torch.minimum(r, box.l2)
    pc = (c - c.mean(1, keepdim=True)).norm(dim=1)
    s_lo = ((pc - r).clamp_min(1.0) / d ** 0.5)[:, None]
    s_hi = ((pc + r).clamp_min(1.0) / d ** 0.5)[:, None]
    n_lo = lo * (1 - 1 / d) - (hi.sum(1, keepdim=True) - hi) / d
    n_hi = hi * (1 - 1 / d) - (lo.sum(1, keepdim=True) - lo) / d
    return Box(torch.minimum(n_lo / s_lo, n_lo / s_hi), torch.maximum(n_hi / s_lo, n_hi / s_hi))


@dataclass
class Trace:
    """What the linear bounds need from an IBP pass: the box an IdResNet's first layer reads (its normalised
    input; None for other networks, whose first layer reads the input box) and every ReLU's input box, in order."""

    first: Box | None = None
    relus: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


RELU = nn.ReLU()


def _idresnet(net: IdResNet, box: Box, features_only: bool = False, trace: Trace | None = None) -> Box:
    if net.cfg.normalization == "image":
        box = _image_normalisation(box)
    else:  # per position: an increasing affine map (std > 0)
        mean, std = net.mean.flatten().double(), net.std.flatten().double()
        box = Box((box.lo - mean) / std, (box.hi - mean) / std)
    if trace is not None:
        trace.first = box
    box = propagate(net.ots, box, trace)
    if net.cfg.ots_activation == "relu":
        box = propagate(RELU, box, trace)
    for i in range(net.cfg.n_dec):
        box = propagate(net.dec[0 if net.cfg.share_dec else i], box, trace)
    return box if features_only else propagate(net.cl, box, trace)


def propagate(m: nn.Module, box: Box, trace: Trace | None = None) -> Box:
    """IBP through one module: a box holding ``m(z)`` for every ``z`` in ``box``; ``trace`` records what
    :mod:`.linear_bounds` needs."""
    if isinstance(m, nn.Sequential):
        for layer in m:
            box = propagate(layer, box, trace)
        return box
    if isinstance(m, IDENTITY):
        return box  # values unchanged (inputs are already flat)
    if isinstance(m, nn.Linear):
        return _linear(m, box)
    if isinstance(m, MONOTONE):
        if trace is not None and isinstance(m, nn.ReLU):
            trace.relus.append((box.lo, box.hi))
        return Box(m(box.lo), m(box.hi))
    if isinstance(m, IdRes):
        out = propagate(m.branch, box, trace)
        if m.identity:  # the skip's values and the branch's vary together; adding their boxes is sound
            out = Box(out.lo + box.lo[:, -m.out_dim:], out.hi + box.hi[:, -m.out_dim:])
        return out
    if isinstance(m, IdResNet):
        return _idresnet(m, box, trace=trace)
    if isinstance(m, Penultimate) and isinstance(m.net, IdResNet):
        return _idresnet(m.net, box, features_only=True, trace=trace)
    raise UsageError(f"certify bounds embeddings built from Linear, ReLU, Tanh, Sigmoid, Flatten, Identity and the "
                     f"paper's IdResNet; this one has a {type(m).__name__}")


def _normalised(box: Box) -> Box:
    """Bounds on e / max(‖e‖, 1e-12) (``F.normalize``) over a box: each coordinate over the norm's interval,
    clipped to [−1, 1] (where a unit vector's coordinates lie)."""
    n_lo = torch.where((box.lo <= 0) & (box.hi >= 0), torch.zeros_like(box.lo),
                       torch.minimum(box.lo.abs(), box.hi.abs())).norm(dim=1, keepdim=True).clamp_min(1e-12)
    n_hi = torch.maximum(box.lo.abs(), box.hi.abs()).norm(dim=1, keepdim=True).clamp_min(1e-12)
    lo = torch.minimum(box.lo / n_lo, box.lo / n_hi).clamp(-1, 1)
    hi = torch.maximum(box.hi / n_lo, box.hi / n_hi).clamp(-1, 1)
    return Box(lo, hi)


def embedding_bounds(defense: KNNDefense, box: Box) -> Box:
    """A box holding ``defense.embed(x')`` for every x' in the input set ``box``."""
    if is_identity(defense.net):
        out = box
    else:
        trace = Trace()
        out = propagate(defense.net, box, trace)
        first = trace.first if trace.first is not None else box
        tight = linear_bounds(defense.net, first.lo, first.hi, trace.relus)
        if tight is not None:  # both hold: keep the tighter end of each
            out = Box(torch.maximum(out.lo, tight[0]), torch.minimum(out.hi, tight[1]))
        pad = FLOAT_SLACK * (1 + torch.maximum(out.lo.abs(), out.hi.abs()).amax(1, keepdim=True))
        out = Box(out.lo - pad, out.hi + pad)
    return _normalised(out) if defense.normalize else out


def _block_intervals(emb: Box, bank: torch.Tensor, n_spaces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] of Σ_s ‖e_s − b_s‖ over the box, (B, m): per sub-space the nearest and farthest point of the box."""
    b = bank.double()[None]  # (1, m, W)
    lo, hi = emb.lo[:, None], emb.hi[:, None]  # (B, 1, W)
    near = (lo - b).clamp_min(0) + (b - hi).clamp_min(0)
    far = torch.maximum(b - lo, hi - b)
    shape = (*near.shape[:2], n_spaces, near.shape[2] // n_spaces)
    return near.reshape(shape).pow(2).sum(-1).sqrt().sum(-1), far.reshape(shape).pow(2).sum(-1).sqrt().sum(-1)


def _around(centre: torch.Tensor, radius: torch.Tensor, bank: torch.Tensor, n_spaces: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] of Σ_s ‖e_s − b_s‖ for every e within ℓ2 distance radius_s (B, S) of ``centre`` in each sub-space
    (the triangle inequality), from matrix products: cheap for a wide bank. Their float64 cancellation error is
    covered by a slack of 10⁻⁶ of the norms."""
    sc = centre.reshape(len(centre), n_spaces, -1).transpose(0, 1)  # (S, B, d)
    sb = bank.double().reshape(len(bank), n_spaces, -1).transpose(0, 1)  # (S, m, d)
    d = torch.cdist(sc, sb)  # (S, B, m)
    slack = 1e-6 * (1 + sc.norm(dim=-1)[:, :, None] + sb.norm(dim=-1)[:, None, :])
    r = radius.T[:, :, None]
    return (d - r - slack).clamp_min(0).sum(0), (d + r + slack).sum(0)


def threat_boxes(defense: KNNDefense, x: torch.Tensor, eps: torch.Tensor | float, norm: str) -> tuple[Box, Box]:
    """The input set (``input_box``) of each row of ``x`` and the box of its embeddings (``embedding_bounds``)."""
    inp = input_box(x.to(defense.device), eps, norm)
    return inp, embedding_bounds(defense, inp)


def distance_intervals(defense: KNNDefense, x: torch.Tensor, eps: torch.Tensor | float, norm: str,
                       block_elements: int = 1 << 22, boxes: tuple[Box, Box] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (B, M) float64: lo ≤ dist(embed(x'), bank_j) ≤ hi for every x' in the ball of radius ``eps``
    (one per row or one for all) around each row of ``x``, intersected with [0, 1].

    First for every bank point from the ℓ2 ball around the embedding box's centre (and, for an identity embedding
    under ℓ2, around x itself): matrix products. Then the exact box distances only for the bank points whose lo
    is at most the k-th smallest hi: any other point is beaten for sure by k points, so its interval is never
    needed tighter (``certify.vote_bound`` neither selects it nor lets it precede a point that could count).
    ``boxes``: ``threat_boxes`` of the same arguments, when the caller has them already."""
    x = x.to(defense.device)
    inp, emb = boxes if boxes is not None else threat_boxes(defense, x, eps, norm)
    bank, n_spaces = defense.bank, defense.n_spaces
    half = ((emb.hi - emb.lo) / 2).reshape(len(x), n_spaces, -1).norm(dim=-1)  # (B, S)
    # per block (S, B, width) distances and a float64 copy of width bank rows
    width = max(1, min(block_elements // (len(x) * n_spaces), block_elements // bank.shape[1]))
    parts = [_around((emb.lo + emb.hi) / 2, half, bank[s:s + width], n_spaces) for s in range(0, len(bank), width)]
    lo, hi = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    if norm == "L2" and is_identity(defense.net) and not defense.normalize:
        # each sub-space moves by at most ε: its distance by at most ε
        ball = [_around(inp.center, inp.l2[:, None].expand(-1, n_spaces), bank[s:s + width], n_spaces)
                for s in range(0, len(bank), width)]
        lo = torch.maximum(lo, torch.cat([p[0] for p in ball], 1))
        hi = torch.minimum(hi, torch.cat([p[1] for p in ball], 1))
    kth = hi.kthvalue(defense.k, dim=1).values
    for row in range(len(x)):
        near = (lo[row] <= kth[row]).nonzero().flatten()
        one = Box(emb.lo[row:row + 1], emb.hi[row:row + 1])
        step = max(1, block_elements // max(1, one.lo.numel()))
        for s in range(0, len(near), step):
            cols = near[s:s + step]
            exact_lo, exact_hi = _block_intervals(one, bank[cols], n_spaces)
            lo[row, cols] = torch.maximum(lo[row, cols], exact_lo[0])
            hi[row, cols] = torch.minimum(hi[row, cols], exact_hi[0])
    slack = EXACT_SLACK * (1 + hi)
    return (lo - slack).clamp_min(0), hi + slack
