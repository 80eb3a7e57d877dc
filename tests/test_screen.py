"""The projection screen of the exact k-NN vote (``defenses/screen.py``): the same votes as a scan of the bank.

Each test names the bug it was checked against (planted briefly in defenses/screen.py; the test failed)."""

from __future__ import annotations

import pytest
import torch

from robustbench_knn.defenses import screen
from robustbench_knn.defenses.exact import exact_distances
from robustbench_knn.defenses.knn import knn_votes


def wide_data(seed: int = 0, n_bank: int = 3000, width: int = 600, n_query: int = 70):
    """A bank with most of its variance in 20 directions and the rest spread over the others (so the screen's
    first candidates miss true neighbours), far from the origin, with duplicate points, and queries that include
    bank points (distance 0, ties at the k-th distance) and points between them."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n_bank, 20, generator=g) @ torch.randn(20, width, generator=g)
    bank = 40.0 + low + 1.5 * torch.randn(n_bank, width, generator=g)
    bank[1::97] = bank[::97][:len(bank[1::97])]  # duplicates: exact ties
    labels = torch.randint(0, 10, (n_bank,), generator=g)
    between = 0.5 * (bank[:n_query // 2] + bank[n_query // 2:n_query])
    emb = torch.cat([bank[::53][:n_query - len(between)], between])
    return emb, bank, labels


def same_votes(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 7, 60])
def test_screened_votes_equal_the_scan_in_any_batch(k, device):
    # planted: the second candidate set skipped (the points with the smallest bounds only): votes differ for k=7, 60
    emb, bank, labels = (t.to(device) for t in wide_data())
    want = knn_votes(emb, bank, labels, k=k, n_spaces=1, n_classes=10, screen=False)
    for batch in (1, 9, len(emb)):
        got = [knn_votes(emb[i:i + batch], bank, labels, k=k, n_spaces=1, n_classes=10, screen=True)
               for i in range(0, len(emb), batch)]
        assert same_votes((torch.cat([v for v, _ in got]), torch.cat([d for _, d in got])), want), batch


def test_the_first_candidates_alone_are_not_enough():
    # the data must need the second set: with it skipped, some row's neighbours differ (else the test above
    # could not catch that bug)
    emb, bank, labels = wide_data()
    bound = screen.lower_bounds(screen.build_screen(bank), emb)
    first = torch.topk(bound, 60 + 16, dim=1, largest=False).indices
    exact = exact_distances(emb, bank[None].expand(len(emb), -1, -1), 1)
    true = torch.topk(exact, 60, dim=1, largest=False).indices
    missed = [len(set(true[i].tolist()) - set(first[i].tolist())) for i in range(len(emb))]
    assert max(missed) > 0


def test_lower_bounds_hold_far_from_the_bank_mean():
    # two clusters 2·10⁴ apart (each point ~10⁴ from the bank mean) in the span of the directions (residual 0: the
    # bound is tight), where the float32 matmul cancels most digits of a short distance. Planted: every error term
    # dropped (row and point margins, the 8u factor): the bound exceeds the exact distance on some pairs
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(700, 6, generator=g, dtype=torch.float64)).Q
    side = torch.where(torch.rand(2500, 1, generator=g) < 0.5, -1e4, 1e4).double()
    bank = ((side * torch.ones(1, 6, dtype=torch.float64) + torch.randn(2500, 6, generator=g, dtype=torch.float64))
            @ basis.T).float()
    emb = bank[:40] + 1e-2 * torch.randn(40, 700, generator=g)
    bound = screen.lower_bounds(screen.build_screen(bank, dims=6), emb).double()
    exact = exact_distances(emb, bank[None].expand(len(emb), -1, -1), 1)
    assert (bound <= exact).all()
    far = exact > 1e3  # the other cluster: the bound is close there, not vacuous
    assert (bound[far] > 0.99 * exact[far]).all()


def test_rows_with_too_many_candidates_go_to_the_scan(monkeypatch):
    # planted: the left rows' placeholders kept instead of scanning them: votes differ
    emb, bank, labels = wide_data()
    want = knn_votes(emb, bank, labels, k=60, n_spaces=1, n_classes=10, screen=False)
    monkeypatch.setattr(screen, "MAX_FRACTION", 0.0)
    *_, left = screen.screened_order(emb, bank, 60)
    assert len(left) > 0
    assert same_votes(knn_votes(emb, bank, labels, k=60, n_spaces=1, n_classes=10, screen=True), want)


def test_the_screen_follows_an_edited_bank():
    # planted: the memo keyed without the bank's version counter: the old screen answers for the edited bank, and
    # its bounds do not hold for the new points
    _, bank, labels = wide_data()
    screen._SCREENS.get(bank)  # built and kept for these points
    bank.mul_(2)  # in place: the same tensor, other points
    emb = bank[::53][:40]
    bound = screen.lower_bounds(screen._SCREENS.get(bank), emb).double()
    assert (bound <= exact_distances(emb, bank[None].expand(len(emb), -1, -1), 1)).all()
    want = knn_votes(emb, bank, labels, k=7, n_spaces=1, n_classes=10, screen=False)
    assert same_votes(knn_votes(emb, bank, labels, k=7, n_spaces=1, n_classes=10, screen=True), want)


def test_building_a_screen_leaves_the_global_random_state_alone():
    # planted: the randomised SVD drawing from the global generator (torch.randn without a generator): an attack's
    # next random draws would depend on whether a screen was built
    _, bank, _ = wide_data(n_bank=500)
    state = torch.random.get_rng_state()
    screen.build_screen(bank)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_screen_is_on_by_default_only_for_wide_large_single_space_banks():
    assert screen.uses_screen(torch.empty(50_000, 2078), 1)
    assert not screen.uses_screen(torch.empty(50_000, 30), 2)  # the paper's two 15-wide spaces
    assert not screen.uses_screen(torch.empty(50_000, 300), 1)
    assert not screen.uses_screen(torch.empty(1000, 2078), 1)
    with pytest.raises(ValueError, match="one space"):
        knn_votes(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(5, dtype=torch.long), k=1, screen=True)
