"""Distances between embeddings: the sum of Euclidean distances over N equal sub-spaces (``sum-l2:N``; N = 1 is
plain l2), the one geometry the k-NN vote, the surrogates, the attacks and the paper's loss all share.

Three paths with the same values (see :func:`pairwise_distance`). Square roots are taken with a guard so that
the gradient at zero distance (u = v, duplicate points) is 0 instead of NaN.
"""

from __future__ import annotations

from typing import Any

import torch

from .devices import block_elements
from .memo import TensorMemo


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


def _space_distances(sa: torch.Tensor, sb: torch.Tensor | None, out: torch.Tensor | None = None,
                     bank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(S, N, M) Euclidean distances per sub-space, in place: (‖a‖² + ‖b‖²) − 2a·b accumulated by the matmul
    into the norms (baddbmm, one rounding as in the out-of-place formula), clamped at 0 against rounding.
    ``out`` is an optional preallocated (S, ≥N, M) buffer: a fresh N×M allocation is page-faulted in by the
    OS on every call, which on the CPU costs the k-NN vote as much as the arithmetic. ``bank``: ``sb``'s
    squared norms (S, 1, M) and its (S, d, M) layout, from :func:`_bank_terms`, computed once per bank (then
    ``sb`` may be None)."""
    norms_b, sb_t = _bank_terms(sb) if bank is None else bank
    shape = (sa.shape[0], sa.shape[1], sb_t.shape[2])
    out = torch.empty(shape, dtype=sa.dtype, device=sa.device) if out is None else out[:, :shape[1]]
    torch.add(sa.pow(2).sum(-1, keepdim=True), norms_b, out=out)
    return torch.baddbmm(out, sa, sb_t, alpha=-2, out=out).clamp_min_(0).sqrt_()


def _bank_terms(sb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank's squared norms per sub-space (S, 1, M) and its sub-spaces laid out (S, d, M) for the matmul."""
    return sb.pow(2).sum(-1).unsqueeze(1), sb.transpose(1, 2).contiguous()


def _grouped(b: torch.Tensor, labels: torch.Tensor, n_spaces: int, n_classes: int
             ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[tuple[int, int, int]], torch.Tensor]:
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=n_classes).tolist()
    starts = [sum(counts[:c]) for c in range(n_classes)]
    segments = [(c, s, s + n) for c, (s, n) in enumerate(zip(starts, counts)) if n]
    sb = split_spaces(b[order], n_spaces)
    return (*_bank_terms(sb), sb), segments, order


# One entry each, so the vote's layout of the unordered bank is not evicted by the class-ordered one at every step.
_FIXED_TERMS = TensorMemo(lambda b, n_spaces: _bank_terms(split_spaces(b, n_spaces)))
_GROUPED = TensorMemo(_grouped)


def fixed_bank_terms(b: torch.Tensor, n_spaces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_bank_terms` of a fixed bank, kept between calls (:class:`~robustbench_knn.memo.TensorMemo`): an
    attack computes the distance to the same bank at every step, and laying out a wide bank (50k × 2078 for deep
    k-NN) cost 40% of each step at batch 250 on the CPU (76% at 16 points)."""
    return _FIXED_TERMS.get(b, n_spaces)


def grouped_bank(b: torch.Tensor, labels: torch.Tensor, n_spaces: int, n_classes: int
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[tuple[int, int, int]], torch.Tensor]:
    """The bank's rows ordered by label (stable: bank order within a class), as :class:`BankBlocks` terms (squared
    norms, matmul layout, rows split into sub-spaces), each class's columns ``(c, start, stop)`` in that order, and
    the order itself (``order[i]``: the bank row of column i). A loss that sums over each
    class's bank points (the §2.5 potentials) then reduces contiguous column ranges instead of multiplying
    every block by an M × K one-hot matrix. Kept between calls like :func:`fixed_bank_terms`."""
    return _GROUPED.get(b, labels, n_spaces, n_classes)


class _DistanceToFixedBank(torch.autograd.Function):
    """Σ_j ‖a^j − b^j‖ with the gradient for ``a`` only (``b`` is a fixed bank), written out:
    ∂D_uv/∂a_u^j = (a_u^j − b_v^j)/r_uv^j, so grad_a^j = rowsum(Q^j)·a^j − Q^j b^j with Q^j = G/r^j (0 where
    r = 0). Two matmuls and a few passes over N×M instead of autograd's chain of saved N×M temporaries:
    the attacks' distance to the 50k-image bank costs about as much as the network itself."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, n_spaces: int) -> torch.Tensor:  # type: ignore[override]
        r = _space_distances(split_spaces(a, n_spaces), None, bank=fixed_bank_terms(b, n_spaces))
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


class BankBlocks:
    """Distances from a batch to a fixed bank, block by block over the bank's columns, and the backward of any
    loss of those distances from its gradient ∂L/∂D, also per block. For losses over every bank point (the §2.5
    potentials, soft-kNN over k neighbours): written over whole N × M tensors, the chain distance → loss and its
    backward walked 250 × 50,000 matrices a dozen times and page-faulted fresh ones in at every attack step. Here
    each block lives in buffers reused across blocks, and the backward recomputes a block's distances instead of
    keeping them."""

    def __init__(self, emb: torch.Tensor, bank: torch.Tensor, n_spaces: int,
                 terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """``terms``: the bank's (squared norms, matmul layout, sub-spaces) when the caller keeps its own (the
        class-ordered bank of :func:`grouped_bank`); else those of ``bank``, kept by :func:`fixed_bank_terms`."""
        self.sa = split_spaces(emb, n_spaces)  # (S, N, d)
        self.na = self.sa.pow(2).sum(-1, keepdim=True)  # (S, N, 1)
        if terms is None:
            terms = (*fixed_bank_terms(bank, n_spaces), split_spaces(bank, n_spaces))
        self.norms_b, self.sb_t, self.sb = terms  # (S, 1, M), (S, d, M), (S, M, d)
        n, self.m = emb.shape[0], self.sb.shape[1]
        self.width = max(64, min(self.m, block_elements(emb.device) // max(1, n)))
        self.r = torch.empty((n_spaces, n, self.width), dtype=emb.dtype, device=emb.device)
        self.d = torch.empty((n, self.width), dtype=emb.dtype, device=emb.device)
        self.q = torch.empty_like(self.d)
        self.below = torch.empty(self.d.shape, dtype=torch.bool, device=emb.device)
        # contiguous (zeros_like would copy sa's transposed strides, and every addmm_ into it would copy back)
        self.grad_sa = torch.zeros(self.sa.shape, dtype=emb.dtype, device=emb.device)
        self.q_rows = torch.zeros_like(self.na)  # (S, N, 1): Σ_i Q_ui per sub-space
        self.shape = emb.shape

    def ranges(self, start: int = 0, stop: int | None = None):
        """Blocks of at most ``width`` columns covering start..stop (the whole bank by default)."""
        stop = self.m if stop is None else stop
        return ((s, min(s + self.width, stop)) for s in range(start, stop, self.width))

    def squared(self, s: int, t: int) -> torch.Tensor:
        """Squared distances per sub-space (S, N, t−s) to bank columns s..t, (‖a‖² + ‖b‖²) − 2a·b as in
        :func:`_space_distances` (same rounding, not yet clamped): a contiguous view of one buffer, so a fused
        kernel sees one layout for every block width (valid until the next call)."""
        n_spaces, n = self.sa.shape[:2]
        sq = self.r.view(-1)[:n_spaces * n * (t - s)].view(n_spaces, n, t - s)
        torch.add(self.na, self.norms_b[:, :, s:t], out=sq)
        return torch.baddbmm(sq, self.sa, self.sb_t[:, :, s:t], alpha=-2, out=sq)

    def distances(self, s: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sub-space distances (S, N, t−s) and their sum D (N, t−s) to bank columns s..t (buffers: valid until
        the next call)."""
        r = self.squared(s, t).clamp_min_(0).sqrt_()
        d = self.d[:, :t - s]
        return r, (torch.sum(r, 0, out=d) if r.shape[0] > 1 else d.copy_(r[0]))

    def backprop_q(self, s: int, t: int, q: torch.Tensor, q_rows: torch.Tensor) -> None:
        """Add block s..t's share of ∂L/∂emb from Q^j = ∂L/∂D / r^j (S, N, t−s), already 0 where r^j = 0, and its
        row sums (S, N, 1): the part of :meth:`backprop` after a fused kernel has made Q."""
        self.q_rows += q_rows
        self.grad_sa.baddbmm_(q, self.sb[:, s:t], alpha=-1)

    def backprop(self, s: int, t: int, r: torch.Tensor, grad_d: torch.Tensor) -> None:
        """Add block s..t's share of ∂L/∂emb from ∂L/∂D: ∂D/∂a^j = (a^j − b^j)/r^j, so with Q = ∂L/∂D / r^j
        (0 where r^j = 0, a duplicate point) grad a^j = rowsum(Q)·a^j − Q·b^j."""
        for j in range(r.shape[0]):
            q = torch.div(grad_d, r[j], out=self.q[:, :t - s])
            # a zero distance (a duplicate point) is rare: on the CPU one read of r finds it, instead of writing a
            # mask and filling through it for every block; NaN elsewhere stays
            if r.device.type != "cpu" or bool(r[j].amin() == 0):
                q.masked_fill_(r[j] == 0, 0.0)
            self.q_rows[j] += q.sum(1, keepdim=True)
            self.grad_sa[j].addmm_(q, self.sb[j, s:t], alpha=-1)

    def grad(self) -> torch.Tensor:
        """∂L/∂emb (N, W) from every block :meth:`backprop` has seen."""
        return (self.grad_sa + self.q_rows * self.sa).transpose(0, 1).reshape(self.shape)


GATHER_ELEMENTS = 1 << 22  # rows × selected points × width gathered at a time by selected_distance_grad


def selected_distance_grad(emb: torch.Tensor, bank: torch.Tensor, sel: torch.Tensor, grad_sel: torch.Tensor,
                           n_spaces: int) -> torch.Tensor:
    """∂L/∂emb when ∂L/∂D is non-zero only on a few bank points per row: ``sel`` (N, P) their indices,
    ``grad_sel`` (N, P) ∂L/∂D there. Σ_v g_uv (a_u^j − b_v^j)/‖a_u^j − b_v^j‖ over the P points (0 where the
    distance is 0), from the differences themselves: the soft-kNN surrogate's gradient touches m points per class,
    and a pass over all M columns for them cost as much as the forward. Rows go in chunks of at most
    ``GATHER_ELEMENTS`` gathered values (a wide bank's P × 3072 per row)."""
    n, width = emb.shape
    out = torch.empty_like(emb)
    rows = max(1, GATHER_ELEMENTS // max(1, sel.shape[1] * width))
    for u in range(0, n, rows):
        diff = emb[u:u + rows].unsqueeze(1) - bank[sel[u:u + rows]]  # (n', P, W)
        diff = diff.view(*diff.shape[:2], n_spaces, width // n_spaces)
        r = torch.linalg.vector_norm(diff, dim=-1)  # (n', P, S)
        q = torch.where(r > 0, grad_sel[u:u + rows].unsqueeze(-1) / r, torch.zeros((), dtype=r.dtype,
                                                                                     device=r.device))
        out[u:u + rows] = (q.unsqueeze(-1) * diff).sum(1).reshape(-1, width)
    return out


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, n_spaces: int, *,
                      workspace: list[Any] | None = None) -> torch.Tensor:
    """d(a_u, b_v) = Σ_j ‖a_u^j − b_v^j‖ for all pairs, shape (len(a), len(b)).

    Uses ‖a‖² + ‖b‖² − 2a·b (matmul speed); clamped at 0 against rounding. Three paths with the same values:
    no gradient (the k-NN vote): in place, reusing the buffers in ``workspace`` (a list the caller keeps
    between chunks and calls; filled on first use, refilled for another bank size), the bank's layout kept by
    :func:`fixed_bank_terms`; gradient for ``a`` only (attacks against a fixed bank): a
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
    sa, bank = split_spaces(a, n_spaces), fixed_bank_terms(b, n_spaces)  # the bank's layout: kept, not redone
    if workspace is None:  # e.g. a query-only attack's forward
        return _space_distances(sa, None, bank=bank).sum(0)
    buf = workspace[0] if workspace else None
    if (buf is None or buf.shape[0] != n_spaces or buf.shape[1] < len(a) or buf.shape[2] != len(b)
            or buf.dtype != a.dtype or buf.device != a.device):  # the buffers depend on the bank's size only
        workspace[:] = [torch.empty((n_spaces, len(a), len(b)), dtype=a.dtype, device=a.device),
                        torch.empty((len(a), len(b)), dtype=a.dtype, device=a.device)]
    r = _space_distances(sa, None, workspace[0], bank)
    out = torch.add(r[0], r[1], out=workspace[1][:len(a)]) if n_spaces > 1 else workspace[1][:len(a)].copy_(r[0])
    for j in range(2, n_spaces):  # in order, as sum(0) adds them
        out.add_(r[j])
    return out
