"""The paper's §2.5 class potentials: the attack loss of each point for each candidate label, from its distances
to the bank. A formula of distances and two constants (λ, l0), so any embedding defense given those constants
can use it: the ``potential`` surrogate's logits and the per-sample objective kFGSM ascends.

Against a fixed bank (every attack) the potentials and their gradient are computed block by block over the bank
(:class:`_BlockedPotentials`, on :class:`distances.BankBlocks`): as whole N × M tensors this chain and its backward
cost three times the network it sits on (``robustbench-knn bench --steps``). On the CPU in float32 the whole pass is
one C kernel (:mod:`native`: no rows × columns tensor at all); elsewhere each block's element-wise chain is one
compiled kernel where a compiler is at hand (:class:`devices.FusedKernel`), else the same arithmetic eagerly.
The attack loss (one potential per point, the objective kFGSM ascends) makes its gradient in the same pass as its
value (:class:`_BlockedAttackLoss`), so an attack step walks the bank once.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import native
from ..devices import FusedKernel
from ..distances import BankBlocks, grouped_bank, pairwise_distance


def _potentials_autograd(emb: torch.Tensor, train_emb: torch.Tensor, train_labels: torch.Tensor, n_spaces: int,
                         lam: float, l0: float, n_classes: int) -> torch.Tensor:
    """Whole-matrix formula with plain autograd (a bank that itself needs a gradient)."""
    dist = pairwise_distance(emb, train_emb, n_spaces)
    a = torch.exp(-lam * dist) - math.exp(-lam * l0)
    onehot = F.one_hot(train_labels, n_classes).to(a.dtype)
    same_class = torch.relu(-a) @ onehot
    per_class_a = a @ onehot
    return same_class + (a.sum(1, keepdim=True) - per_class_a) / n_classes


def _exp_terms(sq: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-space distances r (S, N, w) from their squares, and E = e^{−λ Σ_j r^j} (N, w)."""
    r = sq.clamp_min(0).sqrt()
    return r, torch.exp(-lam * r.sum(0))


def _q_terms(r: torch.Tensor, e: torch.Tensor, near: torch.Tensor, far: torch.Tensor, c0: float) -> torch.Tensor:
    """Q^j = ∂L/∂D / r^j with ∂L/∂D = E·(near if E < c0 else far); 0 where r^j = 0 (a duplicate point)."""
    return torch.where(r > 0, torch.where(e < c0, near, far) * e / r, 0.0)


def _block_potentials(sq: torch.Tensor, c0: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of one class, fused: from the squared distances per sub-space (S, N, w), Σ_i E_i and
    Σ_i relu(c0 − E_i) per row."""
    _, e = _exp_terms(sq, lam)
    return e.sum(1), (c0 - e).clamp_min(0).sum(1)


def _block_potentials_q(sq: torch.Tensor, near: torch.Tensor, far: torch.Tensor, c0: float,
                        lam: float) -> torch.Tensor:
    """The backward of one block, fused: Q written over ``sq``, and its row sums (S, N, 1)."""
    r, e = _exp_terms(sq, lam)
    q = _q_terms(r, e, near, far, c0)
    sq.copy_(q)
    return q.sum(2, keepdim=True)


def _block_potentials_and_q(sq: torch.Tensor, near: torch.Tensor, far: torch.Tensor, c0: float,
                            lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward of one block in one pass (the attack loss, whose backward is known in its forward up
    to one factor per row): the two sums of :func:`_block_potentials`, and Q over ``sq`` with its row sums."""
    r, e = _exp_terms(sq, lam)
    q = _q_terms(r, e, near, far, c0)
    sq.copy_(q)
    return e.sum(1), (c0 - e).clamp_min(0).sum(1), q.sum(2, keepdim=True)


FUSED_POTENTIALS = FusedKernel(_block_potentials)
FUSED_POTENTIALS_Q = FusedKernel(_block_potentials_q)
FUSED_POTENTIALS_AND_Q = FusedKernel(_block_potentials_and_q)


def _exp_eager(blocks: BankBlocks, s: int, t: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    r, e = blocks.distances(s, t)
    return r, e.mul_(-lam).exp_()


def _add_sums_eager(blocks: BankBlocks, e: torch.Tensor, c: int, c0: float, per_class: torch.Tensor,
                    same: torch.Tensor) -> None:
    per_class[c] += e.sum(1)
    same[c] += torch.sub(c0, e, out=blocks.q[:, :e.shape[1]]).clamp_min_(0).sum(1)  # relu(−a) = relu(c0 − E)


def _backprop_from_eager(blocks: BankBlocks, s: int, t: int, r: torch.Tensor, e: torch.Tensor, near: torch.Tensor,
                         far: torch.Tensor, c0: float) -> None:
    w = t - s
    below = torch.lt(e, c0, out=blocks.below[:, :w])
    blocks.backprop(s, t, r, e.mul_(torch.where(below, near, far, out=blocks.q[:, :w])))  # ∂L/∂D, in e's buffer


def _sums_eager(blocks: BankBlocks, c: int, s: int, t: int, lam: float, c0: float, per_class: torch.Tensor,
                same: torch.Tensor) -> None:
    _add_sums_eager(blocks, _exp_eager(blocks, s, t, lam)[1], c, c0, per_class, same)


def _sums_fused(blocks: BankBlocks, c: int, s: int, t: int, lam: float, c0: float, per_class: torch.Tensor,
                same: torch.Tensor) -> None:
    e_sum, below_sum = FUSED_POTENTIALS(blocks.squared(s, t), c0, lam)
    per_class[c] += e_sum
    same[c] += below_sum


def _backprop_eager(blocks: BankBlocks, s: int, t: int, near: torch.Tensor, far: torch.Tensor, lam: float,
                    c0: float) -> None:
    _backprop_from_eager(blocks, s, t, *_exp_eager(blocks, s, t, lam), near, far, c0)


def _backprop_fused(blocks: BankBlocks, s: int, t: int, near: torch.Tensor, far: torch.Tensor, lam: float,
                    c0: float) -> None:
    q = blocks.squared(s, t)
    blocks.backprop_q(s, t, q, FUSED_POTENTIALS_Q(q, near, far, c0, lam))


def _sums_and_backprop_eager(blocks: BankBlocks, c: int, s: int, t: int, lam: float, c0: float,
                             per_class: torch.Tensor, same: torch.Tensor, near: torch.Tensor,
                             far: torch.Tensor) -> None:
    r, e = _exp_eager(blocks, s, t, lam)
    _add_sums_eager(blocks, e, c, c0, per_class, same)
    _backprop_from_eager(blocks, s, t, r, e, near, far, c0)


def _sums_and_backprop_fused(blocks: BankBlocks, c: int, s: int, t: int, lam: float, c0: float,
                             per_class: torch.Tensor, same: torch.Tensor, near: torch.Tensor,
                             far: torch.Tensor) -> None:
    q = blocks.squared(s, t)
    e_sum, below_sum, q_rows = FUSED_POTENTIALS_AND_Q(q, near, far, c0, lam)
    per_class[c] += e_sum
    same[c] += below_sum
    blocks.backprop_q(s, t, q, q_rows)


Step = Callable[..., None]


def _over_blocks(kernel: FusedKernel, fused: Step, eager: Step, make_blocks: Callable[[], BankBlocks],
                 run: Callable[[BankBlocks, Step], None]) -> BankBlocks:
    """``run(blocks, step)`` with the fused step where ``kernel`` compiles, else (or after it failed) the eager
    one; a failed try starts again on fresh blocks, so nothing it added is counted twice."""
    if kernel.usable():
        blocks = make_blocks()
        try:
            run(blocks, fused)
            return blocks
        except Exception as err:  # no compiler, no Triton, ...: the eager step computes the same values
            kernel.give_up(err)
    blocks = make_blocks()
    run(blocks, eager)
    return blocks


def _coefficients(grad: torch.Tensor, lam: float, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(near, far), each (N, K): ∂L/∂D_i / E_i for bank points of each class with E_i < c0 and E_i ≥ c0, from the
    gradient G of the potentials (N, K)."""
    far = lam * (grad / n_classes - grad.sum(1, keepdim=True) / n_classes)
    return far + lam * grad, far


def _class_sums(emb: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, n_spaces: int, lam: float,
                l0: float, n_classes: int, kernel: FusedKernel, fused: Step, eager: Step,
                coefficients: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, BankBlocks]:
    """The potentials (N, K) from per-class sums over a class-ordered bank (:func:`grouped_bank`), block by
    block; with ``coefficients`` (near, far) the steps also back-propagate them into the returned blocks."""
    c0 = math.exp(-lam * l0)
    terms, segments, _ = grouped_bank(bank, labels, n_spaces, n_classes)
    sums: list[torch.Tensor] = []

    def run(blocks: BankBlocks, step: Step) -> None:
        sums[:] = [emb.new_zeros(n_classes, len(emb)), emb.new_zeros(n_classes, len(emb))]
        for c, start, stop in segments:
            extra = () if coefficients is None else tuple(k[:, c:c + 1] for k in coefficients)
            for s, t in blocks.ranges(start, stop):
                step(blocks, c, s, t, lam, c0, *sums, *extra)

    blocks = _over_blocks(kernel, fused, eager, lambda: BankBlocks(emb, bank, n_spaces, terms), run)
    return _potentials_from_sums(sums[0].t(), sums[1].t(), segments, len(bank), c0, n_classes), blocks


def _class_sizes(segments: list[tuple[int, int, int]], n_classes: int) -> list[int]:
    sizes = [0] * n_classes
    for c, start, stop in segments:
        sizes[c] = stop - start
    return sizes


def _potentials_from_sums(per_class: torch.Tensor, same: torch.Tensor, segments: list[tuple[int, int, int]],
                          n_bank: int, c0: float, n_classes: int) -> torch.Tensor:
    """L_c from the per-class sums (N, K) of E and of relu(c0 − E)."""
    sizes = per_class.new_tensor(_class_sizes(segments, n_classes))
    return same + (per_class.sum(1, keepdim=True) - per_class - (n_bank - sizes) * c0) / n_classes


def _native_sums(emb: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, n_spaces: int, lam: float, l0: float,
                 n_classes: int, coefficients: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The potentials (N, K) and, with ``coefficients`` (near, far), the gradient they back-propagate into emb, by
    the C kernel (:func:`native.potential_sums`) over the class-ordered bank."""
    c0 = math.exp(-lam * l0)
    (norms_b, sb_t, _), segments, _ = grouped_bank(bank, labels, n_spaces, n_classes)
    seg = torch.tensor([0, *_class_sizes(segments, n_classes)]).cumsum(0)
    out = native.potential_sums(emb, sb_t.reshape(-1, sb_t.shape[2]), norms_b.reshape(n_spaces, -1), seg, n_spaces,
                                lam, c0, coefficients)
    pots = _potentials_from_sums(out[0], out[1], segments, len(bank), c0, n_classes)
    return pots, (out[2] if coefficients is not None else None)


class _BlockedPotentials(torch.autograd.Function):
    """L_c = Σ_{i∈c} relu(c0 − E_i) + (Σ_i E_i − Σ_{i∈c} E_i − (M − M_c)·c0)/K with E = e^{−λD}, c0 = e^{−λ l0},
    block by block over a fixed bank ordered by class (:func:`grouped_bank`), so each block belongs to one class
    and its class sums are row sums. Backward: with G the gradient of L and G_y = G[:, y_i],
    ∂L/∂D_i = λE_i·(G_y·(1/K + [E_i < c0]) − ΣG/K): per block two per-row coefficients, chosen by [E_i < c0].
    Each block's element-wise chain runs as one compiled kernel (:class:`devices.FusedKernel`) where a compiler
    is at hand: the chain's passes over N × M, not the matmuls, were most of its cost on the CPU."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, n_spaces: int, lam: float,
                l0: float, n_classes: int) -> torch.Tensor:  # type: ignore[override]
        if native.usable(emb, n_spaces):
            pots, _ = _native_sums(emb, bank, labels, n_spaces, lam, l0, n_classes)
        else:
            pots, _ = _class_sums(emb, bank, labels, n_spaces, lam, l0, n_classes, FUSED_POTENTIALS, _sums_fused,
                                  _sums_eager)
        ctx.save_for_backward(emb)
        ctx.bank = (bank, labels)  # fixed, no gradient: kept as is, so the kept class order is found again
        ctx.consts = (n_spaces, lam, l0, n_classes)
        return pots

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (emb,), (bank, labels) = ctx.saved_tensors, ctx.bank
        n_spaces, lam, l0, n_classes = ctx.consts
        near, far = _coefficients(grad, lam, n_classes)
        if native.usable(emb, n_spaces):
            return _native_sums(emb, bank, labels, n_spaces, lam, l0, n_classes, (near, far))[1], *[None] * 6
        c0 = math.exp(-lam * l0)
        terms, segments, _ = grouped_bank(bank, labels, n_spaces, n_classes)

        def run(blocks: BankBlocks, step: Step) -> None:
            for c, start, stop in segments:
                for s, t in blocks.ranges(start, stop):
                    step(blocks, s, t, near[:, c:c + 1], far[:, c:c + 1], lam, c0)

        blocks = _over_blocks(FUSED_POTENTIALS_Q, _backprop_fused, _backprop_eager,
                              lambda: BankBlocks(emb, bank, n_spaces, terms), run)
        return blocks.grad(), None, None, None, None, None, None


class _BlockedAttackLoss(torch.autograd.Function):
    """The attack loss L_y (each point's potential for its own label) and its gradient in one pass over the bank.
    Its backward is known in the forward up to one factor per row: G is g·onehot(y), so the coefficients of
    :class:`_BlockedPotentials` are g times those of onehot(y). The forward keeps ∂L_y/∂emb for g = 1 and the
    backward scales it, instead of recomputing every block's distances and exponentials (an attack step on the
    paper's objective always asks for the gradient)."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, y: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, n_spaces: int,
                lam: float, l0: float, n_classes: int) -> torch.Tensor:  # type: ignore[override]
        coefficients = _coefficients(F.one_hot(y, n_classes).to(emb.dtype), lam, n_classes)
        if native.usable(emb, n_spaces):
            pots, jacobian = _native_sums(emb, bank, labels, n_spaces, lam, l0, n_classes, coefficients)
        else:
            pots, blocks = _class_sums(emb, bank, labels, n_spaces, lam, l0, n_classes, FUSED_POTENTIALS_AND_Q,
                                       _sums_and_backprop_fused, _sums_and_backprop_eager, coefficients)
            jacobian = blocks.grad()
        ctx.save_for_backward(jacobian)
        return pots.gather(1, y.view(-1, 1)).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (jacobian,) = ctx.saved_tensors
        return grad.unsqueeze(1) * jacobian, None, None, None, None, None, None, None


def class_potentials(
    emb: torch.Tensor,
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    n_spaces: int = 2,
    lam: float = 0.5,
    l0: float = 7.0,
    n_classes: int = 10,
) -> torch.Tensor:
    """(N, K): column c is the §2.5 attack loss of each point if its label were c.

    With a_i = e^{−λD_i} − e^{−λl0}: same-class terms are −a_i·[D_i ≥ l0] = relu(−a_i), other-class terms
    a_i/K, so L_c = Σ_{i∈c} relu(−a_i) + (Σ_i a_i − Σ_{i∈c} a_i)/K: two matmuls with the one-hot labels.
    """
    if torch.is_grad_enabled() and train_emb.requires_grad:
        return _potentials_autograd(emb, train_emb, train_labels, n_spaces, lam, l0, n_classes)
    return _BlockedPotentials.apply(emb, train_emb, train_labels, n_spaces, float(lam), float(l0),
                                    int(n_classes))


def attack_loss(emb: torch.Tensor, labels: torch.Tensor, train_emb: torch.Tensor, train_labels: torch.Tensor,
                **options: float) -> torch.Tensor:
    """§2.5, one value per test point against all training embeddings, shape (N,). The attacker maximises it.
    ``options`` are those of :func:`class_potentials` (n_spaces, lam, l0, n_classes)."""
    if set(options) - _OPTION_DEFAULTS.keys():
        raise TypeError(f"attack_loss() got unknown options {sorted(set(options) - _OPTION_DEFAULTS.keys())}")
    if torch.is_grad_enabled() and emb.requires_grad and not train_emb.requires_grad:
        o = {**_OPTION_DEFAULTS, **options}
        return _BlockedAttackLoss.apply(emb, labels, train_emb, train_labels, int(o["n_spaces"]), float(o["lam"]),
                                        float(o["l0"]), int(o["n_classes"]))
    pots = class_potentials(emb, train_emb, train_labels, **options)
    return pots.gather(1, labels.view(-1, 1)).squeeze(1)


_OPTION_DEFAULTS = {k: v.default for k, v in inspect.signature(class_potentials).parameters.items()
                    if v.kind is inspect.Parameter.KEYWORD_ONLY}
