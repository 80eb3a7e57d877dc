"""The paper's exponential contrastive loss (§2.1) and kFGSM attack loss (§2.5), vectorised.

Distances are sums over the N_S sub-spaces of L2 distances. Square roots are taken with a guard so that
the gradient at zero distance (u = v, duplicate points) is 0 instead of NaN.
"""

from __future__ import annotations

import math

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


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, n_spaces: int) -> torch.Tensor:
    """d(a_u, b_v) = Σ_j ‖a_u^j − b_v^j‖ for all pairs, shape (len(a), len(b)).

    Uses ‖a‖² + ‖b‖² − 2a·b (matmul speed); clamped at 0 against rounding.
    """
    sa, sb = split_spaces(a, n_spaces), split_spaces(b, n_spaces)
    sq = sa.pow(2).sum(-1, keepdim=True) + sb.pow(2).sum(-1).unsqueeze(1) - 2 * torch.bmm(sa, sb.transpose(1, 2))
    return _safe_sqrt(sq.clamp_min(0)).sum(0)


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
    """§2.1: (1/B) Σ_u Σ_v I(y_u − y_v, D_uv)(e^{−λD_uv} − e^{−λl0}) + Kμ·Σ_i (Σ_j ‖p_i^j‖)² [/B if "mean"].

    I = 1/K for different classes, −1 for the same class at D ≥ l0, 0 for the same class below l0
    (u = v included; it contributes 0). ``reg_reduction="sum"`` is the regulariser as printed; the default
    "mean" divides it by B, because the printed sum is B times stronger than the first term and, with
    B = 2048, collapses the embeddings to distances ≈ 0.2 where l0 = 7 never acts; with the mean they
    settle at ≈4 (same class) / ≈8 (other classes), the scale l0 = 7 and λ = 0.5 imply.
    """
    if reg_reduction not in ("mean", "sum"):
        raise ValueError("reg_reduction must be 'mean' or 'sum'")
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
    return first + (reg / b if reg_reduction == "mean" else reg)


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
