"""k-NN over training-set embeddings (§2.4), chunked so 10k × 50k fits in memory on CPU and GPU.

Deterministic tie rules:
- neighbours: the k smallest distances; among training points tied at the k-th distance, the lower
  training index is taken first;
- votes: plurality; among classes tied for the most votes, the one whose selected neighbours have the
  smaller summed distance (the "closer" class) wins, then the lower class index.

One judge: a point's decision does not depend on the batch it is in. Float32 matrix products (the fast
distance path) round differently for different batch shapes, so they only *propose* candidates: the k+slack
nearest by float32. The final neighbours, their order and the distance sums come from float64 distances
computed row by row from the differences (no matrix product), the same numbers in any batch. When a
training point beyond the candidates could, within a sound bound Δ on the float32 error (which grows with the
embeddings' norms: far from the origin |a|² + |b|² − 2ab cancels most of its digits), be nearer than the k-th
candidate's exact distance, the row is decided in float64 over every column whose float32 distance lies within
that distance + Δ: a superset of its true neighbours.

A wide single-space bank (deep features, raw pixels) is not scanned: a projection screen (``screen.py``) finds a
superset of each row's true neighbours from a thin copy of the bank, and the same float64 rule decides.
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import native
from ..distances import pairwise_distance
from ..memo import TensorMemo
from .exact import (
    ROWS_F64,
    exact_distances,  # noqa: F401  (re-exported: callers and tests import it from here)
    exact_order,
    exact_order_row,
    votes_from_order,
)
from .screen import screened_order, uses_screen

DEFAULT_CHUNK = 256
UNIT_ROUNDOFF_F32 = 2.0 ** -24


def _bank_space_norms(bank: torch.Tensor, n_spaces: int) -> torch.Tensor:
    """(M, S) per-sub-space norms of the bank, in float64 without a float64 copy of the bank."""
    return torch.linalg.vector_norm(bank.reshape(len(bank), n_spaces, -1), dim=-1, dtype=torch.float64)


_BANK_NORMS = TensorMemo(_bank_space_norms)


def _error_factor(width: int, n_spaces: int) -> float:
    """2γ + 2u for a sub-space of ``width // n_spaces`` coordinates (see :func:`float32_error_bound`)."""
    d = width // n_spaces
    u = 2 * UNIT_ROUNDOFF_F32
    gamma = d * u / (1 - d * u)
    return 2 * gamma + 2 * u


def float32_error_bound(emb: torch.Tensor, bank: torch.Tensor, n_spaces: int) -> torch.Tensor:
    """(n,) an upper bound on |float32 distance − exact distance| for each row of ``emb`` against any bank point.

    Per sub-space of width d, a float32 dot product errs by at most γ|a||b| with γ = d·u/(1 − d·u) (u = 2⁻²⁴),
    each squared norm by γ|a|², and the two additions by u each, so ‖a‖² + ‖b‖² − 2a·b errs by at most
    δ = (2γ + 2u)(‖a‖² + ‖b‖²); clamping at 0 and the square root turn that into at most √δ on the distance
    (|√x̃ − √x| ≤ √|x̃ − x|). The float32 square roots and the sum over sub-spaces add relative rounding,
    covered by a factor 2 on u and a relative term in the caller. Here ‖b‖ is the bank's largest norm."""
    a2 = emb.double().reshape(len(emb), n_spaces, -1).pow(2).sum(-1)  # (n, S)
    b2 = _BANK_NORMS.get(bank, n_spaces).amax(0) ** 2
    return (_error_factor(emb.shape[1], n_spaces) * (a2 + b2)).sqrt().sum(1)


def float32_error_terms(emb: torch.Tensor, bank: torch.Tensor, n_spaces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) row terms and (M,) column terms with |float32 distance − exact distance| ≤ row_i + col_j for row i of
    ``emb`` and bank point j: :func:`float32_error_bound` with each point's own norm, √(c(‖a‖² + ‖b‖²)) ≤
    √c·‖a‖ + √c·‖b‖ per sub-space. Far tighter than the largest-norm bound for a bank whose norms spread (deep
    features: the farthest point is 4× the typical one), and a sum of two vectors, so a row's per-column bounds
    cost one pass."""
    root_c = _error_factor(emb.shape[1], n_spaces) ** 0.5
    rows = torch.linalg.vector_norm(emb.reshape(len(emb), n_spaces, -1), dim=-1, dtype=torch.float64).sum(1)
    return root_c * rows, root_c * _BANK_NORMS.get(bank, n_spaces).sum(1)


def within_reach(dist: torch.Tensor, kth: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Where a float32 distance could, within ``bound`` on its error, be as near as the exact ``kth`` (or nearer)."""
    return dist.double() * (1 - 4 * UNIT_ROUNDOFF_F32) - bound <= kth


def _refine(emb: torch.Tensor, bank: torch.Tensor, dist: torch.Tensor, n_spaces: int,
            k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k_max`` neighbours of each row of one chunk, in (float64 distance, training index) order, with
    candidates proposed by its float32 distances ``dist``: their indices and float64 distances."""
    rows, n = dist.shape
    c = min(n, k_max + max(16, k_max // 4))
    # the c smallest in any order (exact_order orders them itself) and the largest of them; by the C kernel on the
    # CPU (a third of the vote's time went to topk), else topk
    picked = native.smallest_candidates(dist, c)
    if picked is None:
        vals, idx = torch.topk(dist, c, dim=1, largest=False, sorted=False)
        picked = idx, vals.amax(1)
    idx, cth = picked
    order_idx, order_d = exact_order(emb, bank, idx, n_spaces, k_max)
    if c < n:  # near ties at the candidates' edge: float32 rounding could hide a true neighbour beyond them
        # a point j outside the candidates has float32 distance ≥ cth, so exact distance ≥ cth − Δ;
        # the k-th candidate's exact distance bounds the true k-th from above (k real points lie within it):
        # when the first lies strictly above the second, j is neither nearer nor tied, so it is not a neighbour
        kth = order_d[:, k_max - 1]  # the largest k's: a superset of every smaller k's reach
        bound = float32_error_bound(emb, bank, n_spaces).to(cth.device)
        wide = within_reach(cth, kth, bound).nonzero().squeeze(1)
        if len(wide):
            # such a row: every true neighbour j has exact distance ≤ kth, so its float32 distance minus its own
            # error bound (each point's norm, not the bank's largest) is ≤ kth; the exact order over just those
            # columns (in index order, sorted stably) is the exact rule's
            row_terms, col_terms = (t.to(cth.device) for t in float32_error_terms(emb[wide], bank, n_spaces))
            for s in range(0, len(wide), ROWS_F64):
                rs = wide[s:s + ROWS_F64]
                own = torch.minimum(bound[rs, None], row_terms[s:s + ROWS_F64, None] + col_terms)
                within = within_reach(dist[rs], kth[rs, None], own)
                for i, r in enumerate(rs.tolist()):
                    cols = within[i].nonzero().squeeze(1)
                    order_idx[r], order_d[r] = exact_order_row(emb[r:r + 1], bank, cols, n_spaces, k_max)
    return order_idx, order_d


def _exact_chunk(emb: torch.Tensor, bank: torch.Tensor, n_spaces: int, k_max: int, dist: torch.Tensor | None,
                 screen: bool, workspace: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rule's first ``k_max`` neighbours of one chunk: through the projection screen where it is on (its
    rows with too many candidates, and only they, scan the whole bank), else from a float32 scan of the bank."""
    if dist is not None or not screen:
        if dist is None:
            dist = pairwise_distance(emb, bank, n_spaces, workspace=workspace)
        return _refine(emb, bank, dist, n_spaces, k_max)
    order_idx, order_d, left = screened_order(emb, bank, k_max)
    if len(left):
        scanned = pairwise_distance(emb[left], bank, n_spaces, workspace=workspace)
        order_idx[left], order_d[left] = _refine(emb[left], bank, scanned, n_spaces, k_max)
    return order_idx, order_d


KEPT_SCAN_BYTES = 1 << 29  # the scan's buffers kept between votes up to this size (FULL's chunk: 150 MB)
_SCAN = threading.local()


def _scan_workspace(device: torch.device) -> list:
    """The float32 scan's buffers: on the CPU kept between calls (per thread), since a fresh 100 MB buffer is mapped
    by the OS page by page on its first write, a sixth of a vote's time on FULL's bank at 250 points; on a GPU the
    caching allocator keeps them already."""
    if device.type != "cpu":
        return []
    if not hasattr(_SCAN, "buffers"):
        _SCAN.buffers = []
    return _SCAN.buffers


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
    method: str = "exact",
    dist: torch.Tensor | None = None,
    screen: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vote counts (N, K) as int64 and summed neighbour distance per class (N, K), float64. ``method``:
    "exact" (the default: float32 candidates decided in float64, the same for a point in any batch), "fast"
    (float32 ``topk``, the exact rule only for rows tied at the k-th distance) or "dense" (float32, the exact
    rule on every row); the float32 methods are kept for the speed bench. ``dist``: the float32 distances of
    ``emb`` to the bank if the caller already has them (a surrogate's forward of the same embedding); with the
    exact method they only propose candidates, so the decision is the same as without them. ``screen``: find the
    exact method's candidates through the projection screen (``screen.py``) instead of a float32 scan of the
    whole bank; None (the default) turns it on where it pays (a wide single-space bank); the votes are the same
    either way."""
    return knn_votes_for_ks(emb, train_emb, train_labels, ks=(k,), n_spaces=n_spaces, n_classes=n_classes,
                            chunk=chunk, method=method, dist=dist, screen=screen)[k]


def knn_votes_for_ks(emb: torch.Tensor, train_emb: torch.Tensor, train_labels: torch.Tensor, *, ks: Sequence[int],
                     n_spaces: int = 2, n_classes: int = 10, chunk: int = DEFAULT_CHUNK, method: str = "exact",
                     dist: torch.Tensor | None = None,
                     screen: bool | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`knn_votes` for several k from one pass over the distances (choosing k on a validation split:
    the distances, not the votes, are the cost)."""
    if method not in ("exact", "fast", "dense"):
        raise ValueError(f"method must be 'exact', 'fast' or 'dense', not {method!r}")
    for k in ks:
        if not 1 <= k <= len(train_emb):
            raise ValueError(f"k={k} must be in [1, {len(train_emb)}] (the size of the training bank)")
    if dist is not None and (method != "exact" or dist.shape != (len(emb), len(train_emb))):
        raise ValueError("precomputed distances need method='exact' and shape (len(emb), len(train_emb))")
    screen = uses_screen(train_emb, n_spaces) if screen is None else screen
    if screen and (method != "exact" or n_spaces != 1):
        raise ValueError("the projection screen needs method='exact' and one space (n_spaces=1)")
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in ks}
    workspace = _scan_workspace(emb.device)  # the chunks' N×M buffers
    with torch.no_grad():
        for start in range(0, len(emb), chunk):
            rows = emb[start:start + chunk]
            if method == "exact":
                part = None if dist is None else dist[start:start + chunk]
                order = _exact_chunk(rows, train_emb, n_spaces, max(ks), part, screen, workspace)
                for k, votes in votes_from_order(*order, train_labels, ks, n_classes).items():
                    parts[k].append(votes)
            else:
                part = pairwise_distance(rows, train_emb, n_spaces, workspace=workspace)
                for k in ks:
                    parts[k].append(_vote_chunk(part, train_labels, k, n_classes, method))
    if sum(t.numel() * t.element_size() for t in workspace) > KEPT_SCAN_BYTES:
        workspace.clear()
    if not len(emb):
        return {k: (torch.zeros(0, n_classes, dtype=torch.long, device=emb.device),
                    torch.zeros(0, n_classes, dtype=torch.float64, device=emb.device)) for k in ks}
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
