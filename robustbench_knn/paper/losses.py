"""The paper's exponential contrastive loss (§2.1) and kFGSM attack loss (§2.5), vectorised.

Distances are sums over the N_S sub-spaces of L2 distances. Square roots are taken with a guard so that
the gradient at zero distance (u = v, duplicate points) is 0 instead of NaN.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not inf/NaN) where the argument is 0."""
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def split_spaces(emb: torch.Tensor, n_spaces: int) -> torch.Tensor:
    """(N, n_spaces·d) → (n_spaces, N, d)."""
    n, width = emb.shape
    if width % n_spaces:
        raise ValueError(f"embedding width {width} is not divisible by n_spaces={n_spaces}")
    return emb.reshape(n, n_spaces, width // n_spaces).transpose(0, 1)


def space_norms(emb: torch.Tensor, n_spaces: int) -> torch.Tensor:
    """Σ_j ‖p^j‖ per row, shape (N,)."""
    return _safe_sqrt(split_spaces(emb, n_spaces).pow(2).sum(-1)).sum(0)


def _space_distances(sa: torch.Tensor, sb: torch.Tensor, out: torch.Tensor | None = None,
                     bank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(S, N, M) Euclidean distances per sub-space, in place: (‖a‖² + ‖b‖²) − 2a·b accumulated by the matmul
    into the norms (baddbmm, one rounding as in the out-of-place formula), clamped at 0 against rounding.
    ``out`` is an optional preallocated (S, ≥N, M) buffer: a fresh N×M allocation is page-faulted in by the
    OS on every call, which on the CPU costs the k-NN vote as much as the arithmetic. ``bank``: ``sb``'s
    squared norms (S, 1, M) and its (S, d, M) layout, from :func:`_bank_terms`, computed once per bank."""
    shape = (sa.shape[0], sa.shape[1], sb.shape[1])
    out = torch.empty(shape, dtype=sa.dtype, device=sa.device) if out is None else out[:, :shape[1]]
    norms_b, sb_t = _bank_terms(sb) if bank is None else bank
    torch.add(sa.pow(2).sum(-1, keepdim=True), norms_b, out=out)
    return torch.baddbmm(out, sa, sb_t, alpha=-2, out=out).clamp_min_(0).sqrt_()


def _bank_terms(sb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank's squared norms per sub-space (S, 1, M) and its sub-spaces laid out (S, d, M) for the matmul."""
    return sb.pow(2).sum(-1).unsqueeze(1), sb.transpose(1, 2).contiguous()


class _DistanceToFixedBank(torch.autograd.Function):
    """Σ_j ‖a^j − b^j‖ with the gradient for ``a`` only (``b`` is a fixed bank), written out:
    ∂D_uv/∂a_u^j = (a_u^j − b_v^j)/r_uv^j, so grad_a^j = rowsum(Q^j)·a^j − Q^j b^j with Q^j = G/r^j (0 where
    r = 0). Two matmuls and a few passes over N×M instead of autograd's chain of saved N×M temporaries:
    the attacks' distance to the 50k-image bank costs about as much as the network itself."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, n_spaces: int) -> torch.Tensor:  # type: ignore[override]
        sa, sb = split_spaces(a, n_spaces), split_spaces(b, n_spaces)
        r = _space_distances(sa, sb)
        ctx.save_for_backward(a, b, r)
        ctx.n_spaces = n_spaces
        return r.sum(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        a, b, r = ctx.saved_tensors
        sa, sb = split_spaces(a, ctx.n_spaces), split_spaces(b, ctx.n_spaces)
        q = torch.where(r > 0, grad.unsqueeze(0) / r, torch.zeros((), dtype=r.dtype, device=r.device))
        ga = q.sum(-1, keepdim=True) * sa - torch.bmm(q, sb)  # (S, N, d)
        return ga.transpose(0, 1).reshape(a.shape), None, None


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, n_spaces: int, *,
                      workspace: list[Any] | None = None) -> torch.Tensor:
    """d(a_u, b_v) = Σ_j ‖a_u^j − b_v^j‖ for all pairs, shape (len(a), len(b)).

    Uses ‖a‖² + ‖b‖² − 2a·b (matmul speed); clamped at 0 against rounding. Three paths with the same values:
    no gradient (the k-NN vote): in place, reusing the buffers in ``workspace`` (a list the caller keeps
    between chunks; filled on first use); gradient for ``a`` only (attacks against a fixed bank): a
    written-out backward; gradient for ``b`` too (training): plain autograd with a guarded square root.
    """
    grad_a = torch.is_grad_enabled() and a.requires_grad
    grad_b = torch.is_grad_enabled() and b.requires_grad
    if grad_b:
        sa, sb = split_spaces(a, n_spaces), split_spaces(b, n_spaces)
        norms = sa.pow(2).sum(-1, keepdim=True) + sb.pow(2).sum(-1).unsqueeze(1)
        sq = norms - 2 * torch.bmm(sa, sb.transpose(1, 2))
        return _safe_sqrt(sq.clamp_min(0)).sum(0)
    if grad_a:
        return _DistanceToFixedBank.apply(a, b, n_spaces)
    sa, sb = split_spaces(a, n_spaces), split_spaces(b, n_spaces)
    if workspace is None:
        return _space_distances(sa, sb).sum(0)
    if not workspace or workspace[0].shape[1] < len(a) or workspace[2] is not b:
        # the bank's norms and matmul layout once, not recomputed for every chunk
        workspace[:] = [torch.empty((n_spaces, len(a), len(b)), dtype=a.dtype, device=a.device),
                        torch.empty((len(a), len(b)), dtype=a.dtype, device=a.device), b, _bank_terms(sb)]
    r = _space_distances(sa, sb, workspace[0], workspace[3])
    out = torch.add(r[0], r[1], out=workspace[1][:len(a)]) if n_spaces > 1 else workspace[1][:len(a)].copy_(r[0])
    for j in range(2, n_spaces):  # in order, as sum(0) adds them
        out.add_(r[j])
    return out


def exp_contrastive_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_spaces: int = 2,
    lam: float = 0.5,
    l0: float = 7.0,
    k_mu: float = 0.25,
    n_classes: int = 10,
    reg_reduction: str = "mean",
) -> torch.Tensor:
    """§2.1: (1/B) Σ_u Σ_v I(y_u − y_v, D_uv)(e^{−λD_uv} − e^{−λl0}) + Kμ·Σ_i (Σ_j ‖p_i^j‖)² / R.

    I = 1/K for different classes, −1 for the same class at D ≥ l0, 0 for the same class below l0
    (u = v included; it contributes 0). ``reg_reduction`` sets R, i.e. how hard the regulariser pulls the
    embeddings towards 0 against the first term (which is O(B) per batch):
    - "sum" (R = 1) is the formula as printed. It is B times stronger than the first term and, with
      B = 2048, collapses the embeddings (median validation distance 0.10 within and across classes) where
      l0 = 7 never acts;
    - "mean" (R = B) balances the two; embeddings settle at a median 4.3 within a class, 5.0 across;
    - "mean2" (R = B²) makes the regulariser a weak tie-breaker (a per-pair average, like the first term's
      inner sum), so the first term sets the geometry: 6.0 within a class, 8.7 across, around l0 = 7. FULL's
      default since the 20-epoch search. (Medians of tables/recipe_search.md: image normalisation, Adam 3e-4
      for sum/mean, 1e-3 for mean2.)
    """
    if reg_reduction not in ("sum", "mean", "mean2"):
        raise ValueError("reg_reduction must be 'sum', 'mean' or 'mean2'")
    b = emb.shape[0]
    dist = pairwise_distance(emb, emb, n_spaces)
    # u = v has distance exactly 0; the matmul expansion leaves rounding residue there, so zero it.
    dist = dist * (1 - torch.eye(b, device=emb.device, dtype=emb.dtype))
    same = labels[:, None] == labels[None, :]
    weight = torch.where(
        same,
        torch.where(dist >= l0, -1.0, 0.0).to(emb.dtype),
        torch.full_like(dist, 1.0 / n_classes),
    )
    first = (weight * (torch.exp(-lam * dist) - math.exp(-lam * l0))).sum() / b
    reg = k_mu * space_norms(emb, n_spaces).pow(2).sum()
    return first + reg / {"sum": 1, "mean": b, "mean2": b * b}[reg_reduction]


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
    dist = pairwise_distance(emb, train_emb, n_spaces)
    a = torch.exp(-lam * dist) - math.exp(-lam * l0)
    onehot = F.one_hot(train_labels, n_classes).to(a.dtype)
    same_class = torch.relu(-a) @ onehot
    per_class_a = a @ onehot
    return same_class + (a.sum(1, keepdim=True) - per_class_a) / n_classes


def attack_loss(emb: torch.Tensor, labels: torch.Tensor, train_emb: torch.Tensor, train_labels: torch.Tensor,
                **options: float) -> torch.Tensor:
    """§2.5, one value per test point against all training embeddings, shape (N,). The attacker maximises it.
    ``options`` are those of :func:`class_potentials` (n_spaces, lam, l0, n_classes)."""
    pots = class_potentials(emb, train_emb, train_labels, **options)
    return pots.gather(1, labels.view(-1, 1)).squeeze(1)
