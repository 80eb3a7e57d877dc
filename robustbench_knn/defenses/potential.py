"""The paper's §2.5 class potentials: the attack loss of each point for each candidate label, from its distances
to the bank. A formula of distances and two constants (λ, l0), so any embedding defense given those constants
can use it: the ``potential`` surrogate's logits and the per-sample objective kFGSM ascends.

Against a fixed bank (every attack) the potentials and their gradient are computed block by block over the bank
(:class:`_BlockedPotentials`, on :class:`distances.BankBlocks`): as whole N × M tensors this chain and its backward
cost three times the network it sits on (``robustbench-knn bench --steps``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..distances import BankBlocks, pairwise_distance


def _potentials_autograd(emb: torch.Tensor, train_emb: torch.Tensor, train_labels: torch.Tensor, n_spaces: int,
                         lam: float, l0: float, n_classes: int) -> torch.Tensor:
    """Whole-matrix formula with plain autograd (a bank that itself needs a gradient)."""
    dist = pairwise_distance(emb, train_emb, n_spaces)
    a = torch.exp(-lam * dist) - math.exp(-lam * l0)
    onehot = F.one_hot(train_labels, n_classes).to(a.dtype)
    same_class = torch.relu(-a) @ onehot
    per_class_a = a @ onehot
    return same_class + (a.sum(1, keepdim=True) - per_class_a) / n_classes


class _BlockedPotentials(torch.autograd.Function):
    """L_c = Σ_{i∈c} relu(c0 − E_i) + (Σ_i E_i − Σ_{i∈c} E_i − (M − M_c)·c0)/K with E = e^{−λD}, c0 = e^{−λ l0},
    block by block over a fixed bank (:class:`BankBlocks`). Backward: with G the gradient of L and G_y = G[:, y_i],
    ∂L/∂D_i = λE_i·(G_y·(1/K + [E_i < c0]) − ΣG/K)."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, n_spaces: int, lam: float,
                l0: float, n_classes: int) -> torch.Tensor:  # type: ignore[override]
        c0 = math.exp(-lam * l0)
        blocks = BankBlocks(emb, bank, n_spaces)
        onehot = F.one_hot(labels, n_classes).to(emb.dtype)  # (M, K)
        same = emb.new_zeros(len(emb), n_classes)
        per_class = emb.new_zeros(len(emb), n_classes)
        for s, t in blocks.ranges():
            _, e = blocks.distances(s, t)
            e.mul_(-lam).exp_()
            per_class.addmm_(e, onehot[s:t])
            relu = torch.sub(c0, e, out=blocks.q[:, :t - s]).clamp_min_(0)  # relu(−a) = relu(c0 − E)
            same.addmm_(relu, onehot[s:t])
        total = per_class.sum(1, keepdim=True)
        ctx.save_for_backward(emb)
        ctx.bank = (bank, onehot)  # fixed, no gradient: kept as is, so the bank's kept layout is found again
        ctx.consts = (n_spaces, lam, l0, n_classes)
        return same + (total - per_class - (len(bank) - onehot.sum(0)) * c0) / n_classes

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (emb,), (bank, onehot) = ctx.saved_tensors, ctx.bank
        n_spaces, lam, l0, n_classes = ctx.consts
        c0 = math.exp(-lam * l0)
        blocks = BankBlocks(emb, bank, n_spaces)
        g_mean = grad.sum(1, keepdim=True) / n_classes
        gy_buf, coef_buf = torch.empty_like(blocks.d), torch.empty_like(blocks.d)
        for s, t in blocks.ranges():
            r, e = blocks.distances(s, t)
            e.mul_(-lam).exp_()
            gy = torch.mm(grad, onehot[s:t].t(), out=gy_buf[:, :t - s])
            coef = torch.add(torch.lt(e, c0), 1 / n_classes, out=coef_buf[:, :t - s])
            blocks.backprop(s, t, r, gy.mul_(coef).sub_(g_mean).mul_(e).mul_(lam))  # ∂L/∂D, in gy's buffer
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
