"""k-NN over training-set embeddings (§2.4), chunked so 10k × 50k fits in memory on CPU and GPU.

Deterministic tie rules:
- neighbours: the k smallest distances; among training points tied at the k-th distance, the lower
  training index is taken first;
- votes: plurality; among classes tied for the most votes, the one whose selected neighbours have the
  smaller summed distance (the "closer" class) wins, then the lower class index.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..distances import pairwise_distance

DEFAULT_CHUNK = 256


def _select_exact(dist: torch.Tensor, k: int) -> torch.Tensor:
    """The documented neighbour rule over every column: a 0/1 mask of the k selected training points
    (the k smallest distances; ties at the k-th distance go to the lower training index)."""
    kth = torch.topk(dist, k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    below = dist < kth
    at = dist == kth
    need = k - below.sum(1, keepdim=True)
    return below | (at & (at.cumsum(1) <= need))


def _vote_chunk(dist: torch.Tensor, labels: torch.Tensor, k: int, n_classes: int, method: str = "fast"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Votes and per-class distance sums of one chunk of rows.

    Fast path: the k+1 smallest distances (``topk`` indices). When the k-th is strictly below the (k+1)-th,
    the k nearest are one unambiguous set and only those k columns are summed. Rows where the two are
    equal have a tie at the k-th distance; only they go through the exact rule over all columns (masks and
    a cumulative sum, the slow part), so decisions equal the exact rule's on every row. ``method="dense"``
    sends every row through the exact rule (the implementation before the fast path; kept for the bench).
    """
    rows, n = dist.shape
    votes = torch.zeros(rows, n_classes, dtype=torch.long, device=dist.device)
    dsum = torch.zeros(rows, n_classes, dtype=dist.dtype, device=dist.device)
    if k < n and method == "fast":
        vals, idx = torch.topk(dist, k + 1, dim=1, largest=False, sorted=True)
        tie = vals[:, k - 1] == vals[:, k]
        lab = labels[idx[:, :k]]
        votes.scatter_add_(1, lab, torch.ones_like(lab))
        dsum.scatter_add_(1, lab, vals[:, :k])
    else:
        tie = torch.ones(rows, dtype=torch.bool, device=dist.device)  # dense, or k = n: the mask path
    if tie.any():
        rows_t = tie.nonzero().squeeze(1)
        dist_t = dist[rows_t]
        onehot = F.one_hot(labels, n_classes).to(dist.dtype)
        sel = _select_exact(dist_t, k).to(dist.dtype)
        votes[rows_t] = (sel @ onehot).round().long()
        dsum[rows_t] = (dist_t * sel) @ onehot
    return votes, dsum


def knn_votes(
    emb: torch.Tensor,
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    k: int = 800,
    n_spaces: int = 2,
    n_classes: int = 10,
    chunk: int = DEFAULT_CHUNK,
    method: str = "fast",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vote counts (N, K) as int64 and summed neighbour distance per class (N, K). ``method``: "fast"
    (``topk`` indices, the exact rule only for rows tied at the k-th distance) or "dense" (the exact rule on
    every row); both give the same votes."""
    return knn_votes_for_ks(emb, train_emb, train_labels, ks=(k,), n_spaces=n_spaces, n_classes=n_classes,
                            chunk=chunk, method=method)[k]


def knn_votes_for_ks(emb: torch.Tensor, train_emb: torch.Tensor, train_labels: torch.Tensor, *, ks: Sequence[int],
                     n_spaces: int = 2, n_classes: int = 10, chunk: int = DEFAULT_CHUNK, method: str = "fast"
                     ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`knn_votes` for several k from one pass over the distances (choosing k on a validation split:
    the distances, not the votes, are the cost)."""
    if method not in ("fast", "dense"):
        raise ValueError(f"method must be 'fast' or 'dense', not {method!r}")
    for k in ks:
        if not 1 <= k <= len(train_emb):
            raise ValueError(f"k={k} must be in [1, {len(train_emb)}] (the size of the training bank)")
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in ks}
    workspace: list = []  # the chunks' N×M buffers, allocated once
    with torch.no_grad():
        for start in range(0, len(emb), chunk):
            dist = pairwise_distance(emb[start:start + chunk], train_emb, n_spaces, workspace=workspace)
            for k in ks:
                parts[k].append(_vote_chunk(dist, train_labels, k, n_classes, method))
    if not len(emb):
        return {k: (torch.zeros(0, n_classes, dtype=torch.long, device=emb.device),
                    torch.zeros(0, n_classes, dtype=train_emb.dtype, device=emb.device)) for k in ks}
    return {k: (torch.cat([v for v, _ in p]), torch.cat([d for _, d in p])) for k, p in parts.items()}


def vote_decision(votes: torch.Tensor, dist_sum: torch.Tensor) -> torch.Tensor:
    """Plurality with the module's tie rule: most votes, then smaller summed distance, then lower index."""
    top = votes == votes.amax(1, keepdim=True)
    masked = torch.where(top, dist_sum, torch.full_like(dist_sum, float("inf")))
    return masked.argmin(1)  # argmin returns the first (lowest) index among exact ties


def knn_predict(emb: torch.Tensor, train_emb: torch.Tensor, train_labels: torch.Tensor, **options: int) -> torch.Tensor:
    """Hard k-NN labels (N,) as int64; ``options`` are those of :func:`knn_votes` (k, n_spaces, n_classes, chunk)."""
    return vote_decision(*knn_votes(emb, train_emb, train_labels, **options))


def vote_margin(votes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Votes for the true class minus the best other class (> 0: correct by a clear margin)."""
    true = votes.gather(1, labels.view(-1, 1)).squeeze(1)
    other = votes.scatter(1, labels.view(-1, 1), -1).amax(1)
    return true - other
