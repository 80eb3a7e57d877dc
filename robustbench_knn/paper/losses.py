"""The paper's exponential contrastive loss (§2.1), vectorised. Distances are sums over the N_S sub-spaces of L2
distances (``distances.py``); the §2.5 attack loss is the defense's, in ``defenses/potential.py``.
"""

from __future__ import annotations

import math

import torch

from ..distances import pairwise_distance, space_norms


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
