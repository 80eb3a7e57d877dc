"""An exact screen for the k-NN vote over a wide bank (deep features, raw pixels: 50,000 × 2078 or × 3072).

A scan of such a bank reads all of it (415 MB for deep k-NN) for every batch of queries, so a vote on a few points
at a time is bound by memory, not arithmetic. The screen keeps a thin copy of the bank instead: each point's
coordinates along m = 128 orthonormal directions P (principal ones, fitted on a sample) and the norm of what is
left. With q and x less the bank mean, a = (Pᵀq, ‖q − PPᵀq‖) and b = (Pᵀx, ‖x − PPᵀx‖),

    ‖q − x‖² = ‖Pᵀq − Pᵀx‖² + ‖(q − PPᵀq) − (x − PPᵀx)‖² ≥ ‖Pᵀq − Pᵀx‖² + (‖q − PPᵀq‖ − ‖x − PPᵀx‖)² = ‖a − b‖²,

a lower bound that is itself a Euclidean distance, in m + 1 coordinates: one small matmul per batch. The exact
rule's neighbours are then found from two small candidate sets: the points with the smallest bounds, whose exact
distances give D (the k-th of them: k real points lie within D, so the true k-th distance is at most D); then every
point whose bound is at most D (a true neighbour has exact distance ≤ D, so its bound is too). Both sets are
ordered by the exact rule (``exact.py``): the same neighbours, order and votes as a scan of the whole bank. Rows
whose second set is large (the bound is loose there) go back to the scan.

The bound is made sound in floating point. a and b are kept in float32 and their distance is computed as the
float32 scan computes distances, whose error the scan's lemma bounds (``knn.float32_error_terms``: √c(‖a‖ + ‖b‖));
rounding a and b to float32 moves it by at most 2⁻²⁴(‖a‖ + ‖b‖); everything else (the directions' orthonormality,
checked when the screen is built; the float64 projections; the judge's own float64 rounding of the exact distances)
by far less than 10⁻⁹(‖q‖ + ‖x‖). A per-row and a per-point term, each with a margin, cover the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..memo import TensorMemo
from .exact import exact_order, exact_order_row

SCREEN_DIMS = 128  # directions kept: 1/16 of deep features' width, ~97% of their variance
MIN_WIDTH = 512  # narrower banks (the paper's 30 coordinates) cost less to scan than to screen
MIN_POINTS = 4096
FIT_POINTS = 8192  # bank points the directions are fitted on: any orthonormal directions keep the bound sound
MAX_FRACTION = 0.125  # a row with more candidates than this share of the bank is cheaper to scan
ROWS = 128  # query rows per screening block: (rows × M) floats
U32 = 2.0 ** -24
CHUNK = 4096  # bank rows per float64 block when the screen is built


@dataclass
class Screen:
    mean: torch.Tensor  # (W,) float64
    basis: torch.Tensor  # (W, m) float64, orthonormal columns
    points_t: torch.Tensor  # (m + 1, M) float32: the bank's bound coordinates b, laid out for the matmul
    points_sq: torch.Tensor  # (M,) float32: ‖b‖², summed in float32 as the scan sums norms
    margin: torch.Tensor  # (M,) float32: each point's term of the bound's error


def uses_screen(bank: torch.Tensor, n_spaces: int) -> bool:
    """Whether the exact vote screens this bank by default: one space (plain ℓ2), wide and large."""
    return n_spaces == 1 and bank.shape[1] >= MIN_WIDTH and len(bank) >= MIN_POINTS


def _error_scale(m: int) -> float:
    """κ with |computed bound − ‖a − b‖| + the neglected terms ≤ κ(‖q‖ + ‖x‖): the scan's √c for m + 1
    coordinates (u doubled for the square root, as there), 2u for rounding a and b to float32, 10⁻⁹ for the
    float64 terms, and 2⁻¹⁰ relative on top for the rounding of κ‖·‖ itself."""
    width, u = m + 1, 2 * U32
    gamma = width * u / (1 - width * u)
    return ((2 * gamma + 2 * u) ** 0.5 + 2 * U32 + 1e-9) * (1 + 2 ** -10)


def _coordinates(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, m + 1) float32 bound coordinates of rows of ``x`` (n, W), and each row's norm less the mean (float64).
    The residual's norm is taken from the residual itself, not by cancellation of two squared norms."""
    centred = x.double() - mean
    along = centred @ basis
    resid = torch.linalg.vector_norm(centred - along @ basis.T, dim=1, keepdim=True)
    return torch.cat([along, resid], 1).float(), torch.linalg.vector_norm(centred, dim=1)


def build_screen(bank: torch.Tensor, dims: int = SCREEN_DIMS, seed: int = 0) -> Screen:
    """The screen of ``bank`` (M, W): principal directions of a fixed random sample of its points (a randomised
    SVD with its own seeded generator: the global random state, which attacks draw from, is left alone),
    orthonormalised in float64, and every point's bound coordinates."""
    gen = torch.Generator().manual_seed(seed)
    mean = sum(bank[s:s + CHUNK].double().sum(0) for s in range(0, len(bank), CHUNK)) / len(bank)
    sample = bank[torch.randperm(len(bank), generator=gen)[:FIT_POINTS].to(bank.device)].double() - mean
    dims = min(dims, *sample.shape)
    # the range of the sample's top directions (two power iterations), then an SVD of the small projected matrix
    probe = torch.randn(sample.shape[1], min(dims + 8, sample.shape[1]), generator=gen, dtype=torch.float64)
    y = sample @ probe.to(bank.device)
    for _ in range(2):
        y = sample @ (sample.T @ torch.linalg.qr(y).Q)
    vh = torch.linalg.svd(torch.linalg.qr(y).Q.T @ sample, full_matrices=False).Vh
    basis = torch.linalg.qr(vh[:dims].T).Q.contiguous()
    eye = torch.eye(basis.shape[1], dtype=torch.float64, device=basis.device)
    if (basis.T @ basis - eye).abs().max() > 1e-12:  # the bound assumes orthonormal directions
        raise RuntimeError("the screen's directions are not orthonormal; scan the bank instead (screen=False)")
    parts = [_coordinates(bank[s:s + CHUNK], mean, basis) for s in range(0, len(bank), CHUNK)]
    points, norm = (torch.cat(p) for p in zip(*parts))
    return Screen(mean=mean, basis=basis, points_t=points.T.contiguous(), points_sq=points.pow(2).sum(1),
                  margin=(_error_scale(basis.shape[1]) * norm).float())


_SCREENS = TensorMemo(build_screen)


def lower_bounds(screen: Screen, emb: torch.Tensor) -> torch.Tensor:
    """(n, M) float32 lower bounds on the float64 exact distance (``exact.exact_distances``) from each row of
    ``emb`` to each bank point."""
    a, norm = _coordinates(emb, screen.mean, screen.basis)
    out = torch.add(a.pow(2).sum(1, keepdim=True), screen.points_sq)
    dist = torch.addmm(out, a, screen.points_t, alpha=-2, out=out).clamp_min_(0).sqrt_()
    # 8u, not the scan's 4u: the two subtractions below round too (each by at most u of a value below dist)
    row = (_error_scale(screen.basis.shape[1]) * norm).float()
    return dist.mul_(1 - 8 * U32).sub_(screen.margin).sub_(row[:, None])


def screened_order(emb: torch.Tensor, bank: torch.Tensor, k_max: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact rule's first ``k_max`` neighbours of each row of ``emb`` (indices, float64 distances; (n, k_max)
    each), found through the screen; and the rows (indices) left to a scan of the bank, whose entries here are
    placeholders."""
    screen = _SCREENS.get(bank)
    n, m_points = len(emb), len(bank)
    first = min(m_points, k_max + max(16, k_max // 4))
    order_idx = torch.empty(n, k_max, dtype=torch.long, device=bank.device)
    order_d = torch.empty(n, k_max, dtype=torch.float64, device=bank.device)
    left = []
    for s in range(0, n, ROWS):
        rows = emb[s:s + ROWS]
        bound = lower_bounds(screen, rows)
        cand = torch.topk(bound, first, dim=1, largest=False).indices
        idx, d = exact_order(rows, bank, cand, 1, k_max)
        # the k-th exact distance among the first candidates bounds every true neighbour's exact distance, and so
        # its bound; as a float32 no smaller than it
        reach_d = torch.nextafter(d[:, k_max - 1].float(), torch.tensor(float("inf"), device=d.device))
        reach = bound <= reach_d[:, None]
        reach.scatter_(1, cand, False)
        more = reach.sum(1)
        for i in more.nonzero().squeeze(1).tolist():
            if more[i] > MAX_FRACTION * m_points:
                left.append(s + i)
                continue
            cols = torch.cat([cand[i], reach[i].nonzero().squeeze(1)]).sort().values
            idx[i], d[i] = exact_order_row(rows[i:i + 1], bank, cols, 1, k_max)
        order_idx[s:s + ROWS], order_d[s:s + ROWS] = idx, d
    return order_idx, order_d, torch.tensor(left, dtype=torch.long, device=bank.device)
