"""The exact k-NN rule's arithmetic, shared by every way of finding candidates (``knn.py``'s float32 scan,
``screen.py``'s projection screen): float64 distances from the differences, the (distance, training index) order,
and votes with distance sums in fixed point. A candidate set that holds every true neighbour gives the same
neighbours, order and votes whichever way it was found."""

from __future__ import annotations

from typing import Sequence

import torch

ROWS_F64 = 16  # rows per float64 block: (rows × candidates × width) doubles stay small for wide embeddings
FIXED_POINT = 2.0 ** 20  # distance sums for the vote's tie rule are added as integers in these units


def exact_distances(emb: torch.Tensor, points: torch.Tensor, n_spaces: int) -> torch.Tensor:
    """Float64 sum-over-sub-spaces ℓ2 distance from each row of ``emb`` (n, W) to its own points (n, c, W),
    from the differences (each value depends on its own row only: the same in any batch)."""
    n, c, w = points.shape
    d = w // n_spaces
    diff = points.double() - emb.double()[:, None, :]
    return diff.reshape(n, c, n_spaces, d).pow(2).sum(-1).sqrt().sum(-1)


def exact_order(emb: torch.Tensor, bank: torch.Tensor, cand: torch.Tensor, n_spaces: int,
                k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k_max`` of each row's candidates (rows, c) in (float64 distance, training index) order: their
    indices and distances, (rows, k_max) each."""
    rows = len(cand)
    order_idx = torch.empty(rows, k_max, dtype=torch.long, device=cand.device)
    order_d = torch.empty(rows, k_max, dtype=torch.float64, device=cand.device)
    for s in range(0, rows, ROWS_F64):
        block = cand[s:s + ROWS_F64]
        d64 = exact_distances(emb[s:s + ROWS_F64], bank[block], n_spaces)
        by_index = block.sort(1)  # (distance, training index) order: by index, then a stable sort by distance
        d64, block = d64.gather(1, by_index.indices), by_index.values
        order = torch.sort(d64, dim=1, stable=True).indices[:, :k_max]
        order_idx[s:s + ROWS_F64], order_d[s:s + ROWS_F64] = block.gather(1, order), d64.gather(1, order)
    return order_idx, order_d


def exact_order_row(emb_row: torch.Tensor, bank: torch.Tensor, cols: torch.Tensor, n_spaces: int,
                    k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`exact_order` of one row (1, W) over its own columns ``cols`` (in increasing index order)."""
    d64 = exact_distances(emb_row, bank[cols][None], n_spaces)[0]
    order = torch.sort(d64, stable=True).indices[:k_max]
    return cols[order], d64[order]


def votes_from_order(order_idx: torch.Tensor, order_d: torch.Tensor, labels: torch.Tensor, ks: Sequence[int],
                     n_classes: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Votes (int64) and per-class distance sums (float64) of each row's first k neighbours, for every k. The sums
    are added in fixed point (int64, units of 2⁻²⁰), so they do not depend on the order of addition: the same on
    any device, in any batch."""
    rows = len(order_idx)
    fixed = torch.round(order_d * FIXED_POINT).long()
    out = {}
    for k in ks:
        lab = labels[order_idx[:, :k]]
        votes = torch.zeros(rows, n_classes, dtype=torch.long, device=order_idx.device)
        votes.scatter_add_(1, lab, torch.ones_like(lab))
        dsum = torch.zeros(rows, n_classes, dtype=torch.long, device=order_idx.device)
        dsum.scatter_add_(1, lab, fixed[:, :k])  # integer sums: exact in any order
        out[k] = (votes, dsum.double() / FIXED_POINT)
    return out
