"""The shared distance: every path against brute force, and the fixed bank's kept layout never served stale."""

from __future__ import annotations

import torch

from robustbench_knn import distances
from robustbench_knn.distances import pairwise_distance


def brute(a: torch.Tensor, b: torch.Tensor, n_spaces: int) -> torch.Tensor:
    d = a.shape[1] // n_spaces
    return sum(torch.cdist(a[:, j * d:(j + 1) * d], b[:, j * d:(j + 1) * d]) for j in range(n_spaces))


def attack_step(a: torch.Tensor, b: torch.Tensor, n_spaces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacks' path: gradient for ``a`` only, against a fixed bank."""
    a = a.clone().requires_grad_(True)
    dist = pairwise_distance(a, b, n_spaces)
    (grad,) = torch.autograd.grad(dist.sum(), a)
    return dist.detach(), grad


def test_every_path_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 12, generator=g, dtype=torch.float64), torch.randn(40, 12, generator=g, dtype=torch.float64)
    for n_spaces in (1, 2, 3):
        want = brute(a, b, n_spaces)
        torch.testing.assert_close(pairwise_distance(a, b, n_spaces), want)
        torch.testing.assert_close(pairwise_distance(a, b, n_spaces, workspace=[]), want)
        torch.testing.assert_close(attack_step(a, b, n_spaces)[0], want)
        a_ref = a.clone().requires_grad_(True)
        (want_grad,) = torch.autograd.grad(brute(a_ref, b, n_spaces).sum(), a_ref)
        torch.testing.assert_close(attack_step(a, b, n_spaces)[1], want_grad)


def test_the_kept_bank_layout_follows_the_bank():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    first = attack_step(a, b, 2)
    assert distances._FIXED_TERMS.holds(b, 2)  # kept
    kept = distances.fixed_bank_terms(b, 2)
    again = attack_step(a, b, 2)
    assert distances.fixed_bank_terms(b, 2) is kept  # reused, same values
    torch.testing.assert_close(again[0], first[0])
    torch.testing.assert_close(pairwise_distance(a, b, 2), first[0])  # a query-only attack's path: kept too
    assert distances.fixed_bank_terms(b, 2) is kept
    b.mul_(2)  # an in-place edit: the kept layout is stale and must not be used
    torch.testing.assert_close(pairwise_distance(a, b, 2), brute(a, b, 2))
    torch.testing.assert_close(attack_step(a, b, 2)[0], brute(a, b, 2))
    torch.testing.assert_close(pairwise_distance(a, b, 2, workspace=[]), brute(a, b, 2))
    torch.testing.assert_close(attack_step(a, b, 1)[0], brute(a, b, 1))  # another split of the same bank
    other = b.clone() + 1  # another bank
    torch.testing.assert_close(attack_step(a, other, 2)[0], brute(a, other, 2))


def test_an_inference_mode_bank_is_never_kept():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 6, generator=g)
    with torch.inference_mode():
        b = torch.randn(20, 6, generator=g)
    distances._FIXED_TERMS.clear()
    torch.testing.assert_close(pairwise_distance(a, b, 1, workspace=[]), brute(a, b, 1), rtol=1e-4, atol=1e-4)
    assert distances._FIXED_TERMS._refs == ()  # nothing kept
