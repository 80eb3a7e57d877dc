"""k-NN over training-set embeddings (§2.4), chunked so 10k × 50k fits in memory on CPU and GPU.

Deterministic tie rules:
- neighbours: the k smallest distances; among training points tied at the k-th distance, the lower
  training index is taken first;
- votes: plurality; among classes tied for the most votes, the one whose selected neighbours have the
  smaller summed distance (the "closer" class) wins, then the lower class index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import pairwise_distance

DEFAULT_CHUNK = 256


def knn_votes(
    emb: torch.Tensor,
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    k: int = 800,
    n_spaces: int = 2,
    n_classes: int = 10,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vote counts (N, K) as int64 and summed neighbour distance per class (N, K)."""
    if not 1 <= k <= len(train_emb):
        raise ValueError(f"k={k} must be in [1, {len(train_emb)}] (the size of the training bank)")
    onehot = F.one_hot(train_labels, n_classes).to(train_emb.dtype)
    votes, dsum = [], []
    with torch.no_grad():
        for start in range(0, len(emb), chunk):
            dist = pairwise_distance(emb[start:start + chunk], train_emb, n_spaces)
            kth = torch.topk(dist, k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
            below = dist < kth
            at = dist == kth
            need = k - below.sum(1, keepdim=True)
            sel = below | (at & (at.cumsum(1) <= need))
            self_f = sel.to(dist.dtype)
            votes.append((self_f @ onehot).round().long())
            dsum.append((dist * self_f) @ onehot)
    return torch.cat(votes), torch.cat(dsum)


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
