import torch

from robustbench_knn.knn import knn_predict, knn_votes, vote_margin


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
