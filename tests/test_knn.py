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
    torch.testing.assert_close(got_d, want_d, rtol=1e-5, atol=1e-4)
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
    for method in ("fast", "dense"):
        many = knn_votes_for_ks(emb, bank, labels, ks=ks, n_spaces=2, n_classes=4, chunk=32, method=method)
        assert set(many) == set(ks)
        for k in ks:
            one = knn_votes(emb, bank, labels, k=k, n_spaces=2, n_classes=4, chunk=32, method=method)
            assert torch.equal(many[k][0], one[0]) and torch.equal(many[k][1], one[1])
    with pytest.raises(ValueError, match="k=601"):
        knn_votes_for_ks(emb, bank, labels, ks=(5, 601), n_spaces=2, n_classes=4)
