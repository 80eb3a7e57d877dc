import pytest
import torch

from robustbench_knn.defenses.knn import knn_predict, knn_votes, vote_margin


def brute_knn(emb, bank, labels, k, n_spaces, n_classes):
    """Reference: exact distances, neighbours sorted by (distance, index), plurality with the documented ties."""
    d = emb.shape[1] // n_spaces
    out = []
    for p in emb:
        dists = [sum(float(torch.linalg.vector_norm(p[j*d:(j+1)*d] - q[j*d:(j+1)*d])) for j in range(n_spaces))
                 for q in bank]
        order = sorted(range(len(bank)), key=lambda i: (dists[i], i))[:k]
        votes = [0] * n_classes
        dsum = [0.0] * n_classes
        for i in order:
            votes[int(labels[i])] += 1
            dsum[int(labels[i])] += dists[i]
        best = max(votes)
        tied = [c for c in range(n_classes) if votes[c] == best]
        out.append(min(tied, key=lambda c: (dsum[c], c)))
    return torch.tensor(out)


def test_knn_matches_brute_force_random():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 6, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    emb = torch.randn(40, 6, generator=g)
    for k in (1, 7, 50):
        got = knn_predict(emb, bank, labels, k=k, n_spaces=2, n_classes=4, chunk=16)
        assert torch.equal(got, brute_knn(emb, bank, labels, k, 2, 4))


def test_knn_ties_at_kth_distance_and_in_votes():
    # integer lattice points: many exactly equal distances (exact in float32)
    bank = torch.tensor([[x, y] for x in range(-3, 4) for y in range(-3, 4)], dtype=torch.float32)
    labels = torch.tensor([(i * 7) % 3 for i in range(len(bank))])
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    for k in (2, 3, 4, 5, 6, 9, 12):
        got = knn_predict(emb, bank, labels, k=k, n_spaces=1, n_classes=3, chunk=3)
        assert torch.equal(got, brute_knn(emb, bank, labels, k, 1, 3)), k
        votes, _ = knn_votes(emb, bank, labels, k=k, n_spaces=1, n_classes=3)
        assert (votes.sum(1) == k).all()


def test_vote_tie_goes_to_closer_class():
    bank = torch.tensor([[1.0], [-1.5], [5.0]])
    labels = torch.tensor([1, 0, 2])
    assert knn_predict(torch.tensor([[0.0]]), bank, labels, k=2, n_spaces=1, n_classes=3).item() == 1


def test_vote_margin():
    votes = torch.tensor([[5, 3, 2], [1, 6, 3]])
    assert vote_margin(votes, torch.tensor([0, 0])).tolist() == [2, -5]


def reference_knn_votes(emb, train_emb, train_labels, *, k, n_spaces, n_classes, chunk=256):
    """The dense implementation the fast path replaced (every column masked, cumulative sum for ties at the
    k-th distance), kept verbatim as the reference."""
    from robustbench_knn.distances import pairwise_distance

    onehot = torch.nn.functional.one_hot(train_labels, n_classes).to(train_emb.dtype)
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


def _assert_same_as_reference(emb, bank, labels, k, n_spaces, n_classes, chunk):
    from robustbench_knn.defenses.knn import vote_decision

    want_v, want_d = reference_knn_votes(emb, bank, labels, k=k, n_spaces=n_spaces, n_classes=n_classes)
    got_v, got_d = knn_votes(emb, bank, labels, k=k, n_spaces=n_spaces, n_classes=n_classes, chunk=chunk)
    assert torch.equal(got_v, want_v)
    torch.testing.assert_close(got_d, want_d, rtol=1e-5, atol=1e-4, check_dtype=False)
    assert torch.equal(vote_decision(got_v, got_d), vote_decision(want_v, want_d))
    dense_v, _ = knn_votes(emb, bank, labels, k=k, n_spaces=n_spaces, n_classes=n_classes, chunk=chunk,
                           method="dense")
    assert torch.equal(dense_v, want_v)


def test_fast_votes_equal_reference_on_random_data():
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(3000, 30, generator=g) * 3
    labels = torch.randint(0, 10, (3000,), generator=g)
    emb = torch.randn(200, 30, generator=g) * 3
    for k in (1, 10, 800, 3000):  # 3000 = the whole bank (the exact path)
        _assert_same_as_reference(emb, bank, labels, k, 2, 10, chunk=64)


def test_fast_votes_equal_reference_with_planted_ties_at_kth_distance():
    # one non-zero integer coordinate per sub-space: distances are small integers (exact in float32), so many
    # training points share the k-th distance and some classes tie in votes and in summed distance
    g = torch.Generator().manual_seed(6)
    bank = torch.zeros(2000, 6)
    bank[:, 0] = torch.randint(-4, 5, (2000,), generator=g).float()
    bank[:, 3] = torch.randint(-4, 5, (2000,), generator=g).float()
    labels = torch.randint(0, 5, (2000,), generator=g)
    emb = torch.zeros(100, 6)
    emb[:, 0] = torch.randint(-4, 5, (100,), generator=g).float()
    emb[:, 3] = torch.randint(-4, 5, (100,), generator=g).float()
    for k in (1, 7, 50, 333, 1999):
        _assert_same_as_reference(emb, bank, labels, k, 2, 5, chunk=32)
    # the planted data really has ties at the k-th distance (else the exact fallback is not exercised)
    from robustbench_knn.distances import pairwise_distance

    vals = torch.topk(pairwise_distance(emb, bank, 2), 51, dim=1, largest=False).values
    assert (vals[:, 49] == vals[:, 50]).float().mean() > 0.5



def test_votes_for_several_k_equal_one_k_at_a_time():
    # choosing k reads every candidate's votes from one pass over the distances: each equals its own run
    from robustbench_knn.defenses.knn import knn_votes_for_ks

    g = torch.Generator().manual_seed(7)
    bank = torch.randint(-3, 4, (600, 4), generator=g).float()  # integer coordinates: ties at the k-th distance
    labels = torch.randint(0, 4, (600,), generator=g)
    emb = torch.randint(-3, 4, (70, 4), generator=g).float()
    ks = (1, 5, 50, 200, 600)
    for method in ("exact", "fast", "dense"):
        many = knn_votes_for_ks(emb, bank, labels, ks=ks, n_spaces=2, n_classes=4, chunk=32, method=method)
        assert set(many) == set(ks)
        for k in ks:
            one = knn_votes(emb, bank, labels, k=k, n_spaces=2, n_classes=4, chunk=32, method=method)
            assert torch.equal(many[k][0], one[0]) and torch.equal(many[k][1], one[1])
    with pytest.raises(ValueError, match="k=601"):
        knn_votes_for_ks(emb, bank, labels, ks=(5, 601), n_spaces=2, n_classes=4)


def near_tie_data(n_bank=600, n_query=40, width=6, seed=8):
    """Points around a far-away centre at distinct distances a float32 matrix product cannot resolve
    (|a|² + |b|² − 2ab cancels ~6 significant digits at |a| ≈ 1000), plus exact duplicates (ties)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.full((width,), 1000.0)
    step = 2.0 ** -13  # representable offsets around 1000 in float32
    bank = centre + step * torch.randint(-40, 41, (n_bank, width), generator=g).float()
    bank[n_bank // 2:n_bank // 2 + 50] = bank[:50]  # duplicated points: ties broken by the lower index
    labels = torch.randint(0, 5, (n_bank,), generator=g)
    emb = centre + step * torch.randint(-40, 41, (n_query, width), generator=g).float()
    return emb, bank, labels


def brute_knn64(emb, bank, labels, k, n_spaces, n_classes):
    return brute_knn(emb.double(), bank.double(), labels, k, n_spaces, n_classes)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_decision_is_exact_and_the_same_in_any_batch(k, device):
    emb, bank, labels = near_tie_data()
    want = brute_knn64(emb, bank, labels, k, 2, 5).to(device)
    emb, bank, labels = emb.to(device), bank.to(device), labels.to(device)
    for batch in (1, 7, 500):
        got = torch.cat([knn_predict(emb[i:i + batch], bank, labels, k=k, n_spaces=2, n_classes=5)
                         for i in range(0, len(emb), batch)])
        assert torch.equal(got, want), batch
        votes, dsum = knn_votes(emb[:batch], bank, labels, k=k, n_spaces=2, n_classes=5)
        full_v, full_d = knn_votes(emb, bank, labels, k=k, n_spaces=2, n_classes=5)
        assert torch.equal(votes, full_v[:batch]) and torch.equal(dsum, full_d[:batch])


def test_float32_decision_is_not_exact_on_near_ties():
    # the planted bug the test above catches: deciding by the float32 distances (the "fast" method) gets
    # these points wrong, so the data really needs the float64 decision
    emb, bank, labels = near_tie_data()
    fast = knn_predict(emb, bank, labels, k=5, n_spaces=2, n_classes=5, method="fast")
    assert not torch.equal(fast, brute_knn64(emb, bank, labels, 5, 2, 5))


def test_both_decision_paths_give_the_same_bits(monkeypatch):
    # a row goes through the candidates or, near a tie at their edge, through every column; which one depends on
    # float32 rounding and so on the batch. Planted bug caught: summing the class distances in another order on
    # the two paths (a matrix product on one, a scatter on the other), which flips near-tied votes by batch.
    import robustbench_knn.defenses.knn as knn

    g = torch.Generator().manual_seed(9)
    bank = torch.randn(2000, 8, generator=g) * 3
    labels = torch.randint(0, 4, (2000,), generator=g)
    emb = torch.randn(64, 8, generator=g) * 3
    def bound(value):
        return lambda e, b, s: torch.full((len(e),), value, dtype=torch.float64)

    monkeypatch.setattr(knn, "float32_error_bound", bound(-1e9))  # never wide: every row from the candidates
    v1, d1 = knn_votes(emb, bank, labels, k=50, n_spaces=2, n_classes=4)
    monkeypatch.setattr(knn, "float32_error_bound", bound(1e9))  # always wide: every row through the float64 path
    v2, d2 = knn_votes(emb, bank, labels, k=50, n_spaces=2, n_classes=4)
    assert torch.equal(v1, v2) and torch.equal(d1, d2)


@pytest.mark.parametrize("batch", [1, 7, 40])
def test_float32_error_bound_holds_far_from_the_origin(batch):
    # the candidates' safety test rests on this bound. Planted bug caught: a relative tolerance in place of the
    # bound (1e-3 of the distance), which on some CPUs' matrix-vector kernels let batch-1 rows of near_tie_data
    # skip the exact path and take a wrong neighbour set (the decisions differed from brute force in 4 of 40)
    from robustbench_knn.defenses.knn import exact_distances, float32_error_bound
    from robustbench_knn.distances import pairwise_distance

    emb, bank, _ = near_tie_data()
    emb = emb[:batch]
    err = (pairwise_distance(emb, bank, 2).double() - exact_distances(emb, bank[None].expand(batch, -1, -1), 2)).abs()
    bound = float32_error_bound(emb, bank, 2)
    assert (err.amax(1) <= bound).all()
    assert (err.amax(1) > 1e-3 * exact_distances(emb, bank[None].expand(batch, -1, -1), 2).amax(1)).any()


def spread_norm_data():
    """near_tie_data with every fifth bank point pushed 8× as far from the centre: a bank whose largest norm is
    far above the typical one (as deep features are), the case the per-point error bounds are for."""
    emb, bank, labels = near_tie_data()
    far = torch.zeros(len(bank), dtype=torch.bool)
    far[::5] = True
    bank = bank.clone()
    bank[far] = bank[far] * 8
    return emb, bank, labels


@pytest.mark.parametrize("batch", [1, 40])
def test_per_point_error_terms_hold_and_are_tighter(batch):
    # the wide rows' column band rests on |float32 − exact| ≤ row_i + col_j for every pair. Planted bugs caught:
    # the row's norm on both sides (2·√c‖a‖: the far bank points' error exceeds it), and the bank's largest norm
    # for every column (sound, but no tighter than the coarse bound, so wide rows keep thousands of columns)
    from robustbench_knn.defenses.knn import exact_distances, float32_error_bound, float32_error_terms
    from robustbench_knn.distances import pairwise_distance

    emb, bank, _ = spread_norm_data()
    emb = emb[:batch]
    exact = exact_distances(emb, bank[None].expand(batch, -1, -1), 2)
    err = (pairwise_distance(emb, bank, 2).double() - exact).abs()
    rows, cols = float32_error_terms(emb, bank, 2)
    assert (err <= rows[:, None] + cols[None]).all()
    coarse = float32_error_bound(emb, bank, 2)
    assert ((rows[:, None] + cols[None]) < coarse[:, None]).float().mean() > 0.5


def test_bank_norms_follow_the_bank_not_its_address():
    # the per-point bounds use cached bank norms. Planted bug caught: a cache keyed by (address, shape, version),
    # which hands the first bank's norms to a second bank over the same memory (here a reshaped transpose: same
    # address, shape and version counter, other points), and in a long test run handed a freed bank's norms to the
    # next bank allocated at its address, so the per-point bound failed to hold
    from robustbench_knn.defenses.knn import _error_factor, exact_distances, float32_error_terms
    from robustbench_knn.distances import pairwise_distance

    emb, first, _ = spread_norm_data()
    second = first.reshape(first.shape[1], -1).t()
    assert (first.data_ptr(), first.shape, first._version) == (second.data_ptr(), second.shape, second._version)
    assert not torch.equal(first, second)
    root_c = _error_factor(first.shape[1], 2) ** 0.5
    want = [root_c * torch.linalg.vector_norm(bank.double().reshape(len(bank), 2, -1), dim=-1).sum(1)
            for bank in (first, second)]
    for bank, want_cols in zip((first, second, first), want + want[:1]):
        rows, cols = float32_error_terms(emb, bank, 2)  # one after the other: a stale cache would answer
        assert torch.allclose(cols, want_cols, rtol=1e-12, atol=0)
        err = (pairwise_distance(emb, bank, 2).double()
               - exact_distances(emb, bank[None].expand(len(emb), -1, -1), 2)).abs()
        assert (err <= rows[:, None] + cols[None]).all()


@pytest.mark.parametrize("k", [5, 40])
def test_decision_is_exact_with_a_spread_norm_bank(k):
    # every row leaves the candidates here (the coarse bound is wide); its band of columns comes from the per-point
    # bounds. Planted bug caught: a band of the columns whose float32 distance is within the k-th exact distance
    # (no error bound), which drops true neighbours rounded just beyond it
    emb, bank, labels = spread_norm_data()
    want = brute_knn64(emb, bank, labels, k, 2, 5)
    for batch in (1, 500):
        got = torch.cat([knn_predict(emb[i:i + batch], bank, labels, k=k, n_spaces=2, n_classes=5)
                         for i in range(0, len(emb), batch)])
        assert torch.equal(got, want), batch


def test_the_scan_buffers_kept_between_votes_follow_the_bank():
    """The float32 scan's buffers outlive a vote on the CPU; a vote against a bank of another size, another
    sub-space count or another batch size gets buffers of its own shape, and the same votes as in a fresh process
    (planted bug caught: reusing buffers sized for another bank)."""
    import robustbench_knn.defenses.knn as knn

    g = torch.Generator().manual_seed(21)
    banks = [(torch.randn(m, 6, generator=g) * 3, torch.randint(0, 4, (m,), generator=g)) for m in (900, 400, 1300)]
    emb = torch.randn(30, 6, generator=g) * 3
    calls = [(b, lab, s, n) for b, lab in banks for s in (1, 2) for n in (30, 7)]
    first = []
    for bank, labels, spaces, n in calls:
        knn._SCAN.buffers = []  # as in a fresh process
        first.append(knn_votes(emb[:n], bank, labels, k=25, n_spaces=spaces, n_classes=4))
    for (bank, labels, spaces, n), want in zip(reversed(calls), reversed(first)):  # buffers kept from call to call
        got = knn_votes(emb[:n], bank, labels, k=25, n_spaces=spaces, n_classes=4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert knn._SCAN.buffers  # kept
