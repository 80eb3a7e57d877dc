"""The query memo answers exactly as its model, never memoises a randomised model or a gradient call, and makes
ART's Square ask the model about each point once while returning the uncached attack's examples."""

import numpy as np
import torch
from art.attacks.evasion import SquareAttack

from robustbench_knn.adapters.art_adapter import art_estimator
from robustbench_knn.adapters.query_cache import PROBE_ROWS, QueryCache
from robustbench_knn.attacks import get_attack


class RowModel(torch.nn.Module):
    """A 10-class linear model computed element-wise then summed per row: each row's logits are bit-identical in any
    batch, so a memoised answer can be compared with a fresh one exactly. ``noise`` makes it randomised."""

    n_classes = 10
    device = torch.device("cpu")

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.w = torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(0)) / 30
        self.noise = noise
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        out = (x.reshape(len(x), 1, -1) * self.w).sum(-1)
        return out + self.noise * torch.randn_like(out) if self.noise else out


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_memoised_answers_are_the_models_own():
    model = RowModel()
    cache = QueryCache(model)
    a, b = _images(8, 0), _images(5, 1)
    assert torch.equal(cache(a), model(a))
    mixed = torch.cat([a[[2, 3, 4]], b, a[[0, 0]], b[[1]]])  # seen rows, new rows, repeats within the call
    model.rows = 0
    cache.rows_computed = 0
    got = cache(mixed)
    assert cache.rows_computed == 5  # only b is new
    assert torch.equal(got, model(mixed))


def test_a_row_differing_in_one_bit_is_not_served_from_the_memo():
    model = RowModel()
    cache = QueryCache(model)
    a = _images(6, 0)
    cache(a)
    nudged = a.clone()
    nudged[3, 1, 7, 9] = torch.nextafter(nudged[3, 1, 7, 9], torch.tensor(2.0))
    assert torch.equal(cache(nudged), model(nudged))


def test_rows_sharing_a_fingerprint_are_told_apart(monkeypatch):
    model = RowModel()
    cache = QueryCache(model)
    monkeypatch.setattr(cache, "_fingerprints", lambda flat: [0] * len(flat))  # every row collides
    a, b = _images(5, 0), _images(5, 1)
    cache(a)
    mixed = torch.cat([b, a[[1]], b[[2]]])
    assert torch.equal(cache(mixed), model(mixed))


def test_memo_keeps_at_most_its_capacity():
    cache = QueryCache(RowModel(), capacity=10)
    for seed in range(4):
        cache(_images(6, seed))
    assert len(cache._memo) == 10
    cache.rows_computed = 0
    cache(_images(6, 3))  # the last call's rows are still held
    assert cache.rows_computed == 0


def test_randomised_model_is_never_memoised():
    model = RowModel(noise=1.0)
    cache = QueryCache(model)
    a = _images(6, 0)
    first, second = cache(a), cache(a)
    assert cache.deterministic is False
    assert not torch.equal(first, second)
    assert cache.rows_computed == 2 * PROBE_ROWS + 2 * len(a)


def test_gradient_calls_go_to_the_model():
    model = RowModel()
    cache = QueryCache(model)
    a = _images(4, 0)
    cache(a)
    x = a.clone().requires_grad_(True)
    cache(x)[:, 3].sum().backward()
    assert torch.allclose(x.grad.reshape(4, -1), model.w[3].expand(4, -1))


def test_art_square_through_the_memo_returns_the_uncached_examples_for_fewer_queries():
    x, y = _images(16, 2), torch.arange(16) % 10
    eps, n_queries = 8 / 255, 60
    direct = RowModel()
    np.random.seed(0)
    plain = SquareAttack(art_estimator(direct), norm=np.inf, eps=eps, max_iter=n_queries, p_init=0.8,
                         nb_restarts=1, batch_size=len(x), verbose=False).generate(x=x.numpy(), y=y.numpy())
    cached = RowModel()
    x_adv = get_attack("art:square").build(cached, eps, n_queries=n_queries)(x, y)
    assert np.array_equal(x_adv.numpy(), plain)
    assert (plain != x.numpy()).any()  # the attack moved points: there was something to compare
    assert cached.rows < 0.6 * direct.rows
