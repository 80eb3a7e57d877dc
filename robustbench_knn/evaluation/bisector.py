"""A second sound certificate for k-NN under one Euclidean distance (``l2``, ``cosine``): pairwise bisectors.

Whether bank point b is at least as near as bank point a to an embedding e is a half-space in e:
‖e − a‖² − ‖e − b‖² = 2 e·(b − a) + ‖a‖² − ‖b‖² ≥ 0. Its maximum over the embedding's box has a closed form
(per coordinate, the box end that the sign of b − a picks), and for the raw pixels under ℓ2 also over the ball
(x·w + ε‖w‖₂). Unlike distance intervals, which let a and b each take their worst embedding, the bisector asks
about one embedding for both: far tighter where the box is wide.

The argument: let S be m = ⌊k/2⌋ + 1 bank points of the true class y and R = max_{a∈S} ‖e − a‖, and N the
bank points at most R away (S ⊆ N). If |N| ≥ k, the k selected points all lie in N; else all of N, S with it,
is selected. Either way at least m selected points are of class y (a strict majority: every other class gets
at most k − m < m votes, so no tie rule is reached) unless more than k − m points of other classes lie in N.
A point b of another class can be at most R away only if it is at least as near as some a in S, for some e in the
set: its bisector's maximum is ≥ 0. So: certified if
#{b of another class : max over the set of ‖e − a‖² − ‖e − b‖² ≥ 0 for some a ∈ S} ≤ k − m.
S is the m true-class points with the smallest distance upper bound, and only the other-class points whose
distance lower bound is at most the largest of those upper bounds are tried (any other is never as near).
"""

from __future__ import annotations

import torch

from .bounds import Box

SLACK = 1e-9  # relative: float64 rounding of the closed forms counts against the certificate


def _beats(a: torch.Tensor, b: torch.Tensor, box: Box, row: int) -> torch.Tensor:
    """(len(b),) bool: some embedding in the set of ``row`` is at least as near b as a (one a, many b)."""
    w = b - a  # (n, W)
    lo, hi = box.lo[row], box.hi[row]
    # max over the box of e·w, per coordinate at the end that the sign of w picks
    top = torch.where(w > 0, w * hi, w * lo).sum(1)
    if box.l2 is not None:  # the ℓ2 ball: e·w ≤ x·w + ε‖w‖₂ (the set lies in both)
        top = torch.minimum(top, w @ box.center[row] + box.l2[row] * w.norm(dim=1))
    gap = 2 * top + (a * a).sum() - (b * b).sum(1)
    scale = (a * a).sum() + (b * b).sum(1) + 2 * (w.abs() * torch.maximum(lo.abs(), hi.abs())).sum(1)
    return gap >= -SLACK * (1 + scale)


def bisector_certified(box: Box, bank: torch.Tensor, labels: torch.Tensor, y: torch.Tensor, k: int,
                       lo: torch.Tensor, hi: torch.Tensor, rows: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """(len(rows),) bool for the given rows of ``box`` (the embedding set, float64, with ``center``/``l2`` for an
    identity embedding under ℓ2): the bisector certificate of the module docstring. ``lo``/``hi`` (B, M): distance
    bounds that pick S and the other-class points worth trying."""
    m = k // 2 + 1
    out = torch.zeros(len(rows), dtype=torch.bool)
    for n, row in enumerate(rows.tolist()):
        true = labels == y[row]
        if int(true.sum()) < m:
            continue
        ub = torch.where(true, hi[row], torch.full_like(hi[row], float("inf")))
        s = ub.topk(m, largest=False).indices
        reach = ub[s].max()
        others = (~true & (lo[row] <= reach)).nonzero().flatten()
        beaten = torch.zeros(len(others), dtype=torch.bool, device=bank.device)
        for start in range(0, len(others), block):
            cand = bank[others[start:start + block]].double()  # rows first: a float64 bank would be 2× its size
            for a in s.tolist():
                beaten[start:start + len(cand)] |= _beats(bank[a].double(), cand, box, row)
                if int(beaten.sum()) > k - m:
                    break
            if int(beaten.sum()) > k - m:
                break
        out[n] = int(beaten.sum()) <= k - m
    return out
