"""The paper's §2.5 class potentials: the attack loss of each point for each candidate label, from its distances
to the bank. A formula of distances and two constants (λ, l0), so any embedding defense given those constants
can use it: the ``potential`` surrogate's logits and the per-sample objective kFGSM ascends.

Against a fixed bank (every attack) the potentials and their gradient are computed block by block over the bank
(:class:`_BlockedPotentials`, on :class:`distances.BankBlocks`): as whole N × M tensors this chain and its backward
cost three times the network it sits on (``robustbench-knn bench --steps``). Each block's element-wise chain is one
compiled kernel where a compiler is at hand (:class:`devices.FusedKernel`), else the same arithmetic eagerly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

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


def _block_potentials(sq: torch.Tensor, c0: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of one class, fused: from the squared distances per sub-space (S, N, w), Σ_i E_i and
    Σ_i relu(c0 − E_i) per row."""
    e = torch.exp(-lam * sq.clamp_min(0).sqrt().sum(0))
    return e.sum(1), (c0 - e).clamp_min(0).sum(1)


def _block_potentials_q(sq: torch.Tensor, near: torch.Tensor, far: torch.Tensor, c0: float,
                        lam: float) -> torch.Tensor:
    """The backward of one block, fused: Q^j = ∂L/∂D / r^j (0 where r^j = 0, a duplicate point) written over
    ``sq``, and its row sums (S, N, 1)."""
    r = sq.clamp_min(0).sqrt()
    e = torch.exp(-lam * r.sum(0))
    q = torch.where(r > 0, torch.where(e < c0, near, far) * e / r, 0.0)
    sq.copy_(q)
    return q.sum(2, keepdim=True)


FUSED_POTENTIALS = FusedKernel(_block_potentials)
FUSED_POTENTIALS_Q = FusedKernel(_block_potentials_q)


def _sums_eager(blocks: BankBlocks, c: int, s: int, t: int, lam: float, c0: float, per_class: torch.Tensor,
                same: torch.Tensor) -> None:
    _, e = blocks.distances(s, t)
    e.mul_(-lam).exp_()
    per_class[c] += e.sum(1)
    same[c] += torch.sub(c0, e, out=blocks.q[:, :t - s]).clamp_min_(0).sum(1)  # relu(−a) = relu(c0 − E)


def _sums_fused(blocks: BankBlocks, c: int, s: int, t: int, lam: float, c0: float, per_class: torch.Tensor,
                same: torch.Tensor) -> None:
    e_sum, below_sum = FUSED_POTENTIALS(blocks.squared(s, t), c0, lam)
    per_class[c] += e_sum
    same[c] += below_sum


def _backprop_eager(blocks: BankBlocks, s: int, t: int, near: torch.Tensor, far: torch.Tensor, lam: float,
                    c0: float) -> None:
    r, e = blocks.distances(s, t)
    e.mul_(-lam).exp_()
    w = t - s
    below = torch.lt(e, c0, out=blocks.below[:, :w])
    blocks.backprop(s, t, r, e.mul_(torch.where(below, near, far, out=blocks.q[:, :w])))  # ∂L/∂D, in e's buffer


def _backprop_fused(blocks: BankBlocks, s: int, t: int, near: torch.Tensor, far: torch.Tensor, lam: float,
                    c0: float) -> None:
    q = blocks.squared(s, t)
    blocks.backprop_q(s, t, q, FUSED_POTENTIALS_Q(q, near, far, c0, lam))


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
        c0 = math.exp(-lam * l0)
        terms, segments = grouped_bank(bank, labels, n_spaces, n_classes)
        sums: list[torch.Tensor] = []

        def run(blocks: BankBlocks, step: Step) -> None:
            sums[:] = [emb.new_zeros(n_classes, len(emb)), emb.new_zeros(n_classes, len(emb))]
            for c, start, stop in segments:
                for s, t in blocks.ranges(start, stop):
                    step(blocks, c, s, t, lam, c0, *sums)

        _over_blocks(FUSED_POTENTIALS, _sums_fused, _sums_eager, lambda: BankBlocks(emb, bank, n_spaces, terms), run)
        per_class, same = sums[0].t(), sums[1].t()
        sizes = [0] * n_classes
        for c, start, stop in segments:
            sizes[c] = stop - start
        total = per_class.sum(1, keepdim=True)
        ctx.save_for_backward(emb)
        ctx.bank = (bank, labels)  # fixed, no gradient: kept as is, so the kept class order is found again
        ctx.consts = (n_spaces, lam, l0, n_classes)
        return same + (total - per_class - (len(bank) - emb.new_tensor(sizes)) * c0) / n_classes

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (emb,), (bank, labels) = ctx.saved_tensors, ctx.bank
        n_spaces, lam, l0, n_classes = ctx.consts
        c0 = math.exp(-lam * l0)
        terms, segments = grouped_bank(bank, labels, n_spaces, n_classes)
        g_mean = grad.sum(1, keepdim=True) / n_classes
        far = lam * (grad / n_classes - g_mean)  # (N, K): ∂L/∂D_i / E_i for E_i ≥ c0, by the class of i
        near = far + lam * grad  # ... and for E_i < c0

        def run(blocks: BankBlocks, step: Step) -> None:
            for c, start, stop in segments:
                for s, t in blocks.ranges(start, stop):
                    step(blocks, s, t, near[:, c:c + 1], far[:, c:c + 1], lam, c0)

        blocks = _over_blocks(FUSED_POTENTIALS_Q, _backprop_fused, _backprop_eager,
                              lambda: BankBlocks(emb, bank, n_spaces, terms), run)
        return blocks.grad(), None, None, None, None, None, None


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
    pots = class_potentials(emb, train_emb, train_labels, **options)
    return pots.gather(1, labels.view(-1, 1)).squeeze(1)
