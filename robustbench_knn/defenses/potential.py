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


class _BlockedPotentials(torch.autograd.Function):
    """L_c = Σ_{i∈c} relu(c0 − E_i) + (Σ_i E_i − Σ_{i∈c} E_i − (M − M_c)·c0)/K with E = e^{−λD}, c0 = e^{−λ l0},
    block by block over a fixed bank ordered by class (:func:`grouped_bank`), so each block belongs to one class
    and its class sums are row sums. Backward: with G the gradient of L and G_y = G[:, y_i],
    ∂L/∂D_i = λE_i·(G_y·(1/K + [E_i < c0]) − ΣG/K): per block two per-row coefficients, chosen by [E_i < c0]."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, n_spaces: int, lam: float,
                l0: float, n_classes: int) -> torch.Tensor:  # type: ignore[override]
        c0 = math.exp(-lam * l0)
        terms, segments = grouped_bank(bank, labels, n_spaces, n_classes)
        blocks = BankBlocks(emb, bank, n_spaces, terms)
        same = emb.new_zeros(n_classes, len(emb))
        per_class = emb.new_zeros(n_classes, len(emb))
        sizes = [0] * n_classes
        for c, start, stop in segments:
            sizes[c] = stop - start
            for s, t in blocks.ranges(start, stop):
                _, e = blocks.distances(s, t)
                e.mul_(-lam).exp_()
                per_class[c] += e.sum(1)
                same[c] += torch.sub(c0, e, out=blocks.q[:, :t - s]).clamp_min_(0).sum(1)  # relu(−a) = relu(c0 − E)
        per_class, same = per_class.t(), same.t()
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
        blocks = BankBlocks(emb, bank, n_spaces, terms)
        g_mean = grad.sum(1, keepdim=True) / n_classes
        far = lam * (grad / n_classes - g_mean)  # (N, K): ∂L/∂D_i / E_i for E_i ≥ c0, by the class of i
        near = far + lam * grad  # ... and for E_i < c0
        below = torch.empty(blocks.d.shape, dtype=torch.bool, device=emb.device)
        for c, start, stop in segments:
            for s, t in blocks.ranges(start, stop):
                r, e = blocks.distances(s, t)
                e.mul_(-lam).exp_()
                w = t - s
                coef = torch.where(torch.lt(e, c0, out=below[:, :w]), near[:, c:c + 1], far[:, c:c + 1],
                                   out=blocks.q[:, :w])
                blocks.backprop(s, t, r, e.mul_(coef))  # ∂L/∂D, in e's buffer
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
