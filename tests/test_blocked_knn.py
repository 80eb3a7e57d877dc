"""The blocked k-NN loss paths (``distances.BankBlocks``: §2.5 potentials, soft-kNN logits, the vote fed the
surrogate's distances) against the whole-matrix implementations they replaced: same values, same gradients."""

import pytest
import torch

from robustbench_knn import devices
from robustbench_knn.config import UsageError
from robustbench_knn.defenses import potential
from robustbench_knn.defenses.defense import KNNDefense
from robustbench_knn.defenses.knn import knn_votes
from robustbench_knn.distances import pairwise_distance


@pytest.fixture(autouse=True, params=["64", "1000000000"])
def block_budget(request, monkeypatch):
    """Many blocks with a short last one (the CPU's way on a large bank), and one block per class (a GPU's)."""
    monkeypatch.setenv(devices.BLOCK_ENV, request.param)


def _data(seed, n=9, m=301, w=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    bank = (torch.randn(m, w, generator=g, dtype=torch.float64) * 3).float().double()  # as a float32 bank keeps it
    labels = torch.randint(0, classes, (m,), generator=g)
    emb = torch.randn(n, w, generator=g, dtype=torch.float64) * 3
    emb[0] = bank[5]  # a test point on a bank point: distance 0 in both sub-spaces
    emb[1, :3] = bank[7, :3]  # on a bank point in one sub-space only
    return emb, bank, labels


def _value_and_grad(fn, emb, upstream):
    e = emb.clone().requires_grad_(True)
    out = fn(e)
    return out.detach(), torch.autograd.grad((out * upstream).sum(), e)[0]


@pytest.mark.parametrize("compiled", ["1", "0"])  # fused kernels, and the eager code that stands in for them
@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])  # all within l0, mixed, mostly beyond
def test_blocked_potentials_match_whole_matrix_autograd(scale, compiled, monkeypatch):
    monkeypatch.setenv(devices.COMPILE_ENV, compiled)
    emb, bank, labels = _data(1)
    emb, bank = emb * scale, bank * scale
    kw = dict(n_spaces=2, lam=0.5, l0=7.0, n_classes=4)
    upstream = torch.randn(len(emb), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = _value_and_grad(lambda e: potential.class_potentials(e, bank, labels, **kw), emb, upstream)
    want = _value_and_grad(lambda e: potential._potentials_autograd(e, bank, labels, **kw), emb, upstream)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-7, atol=1e-7)  # rounding of near-zero distances
    if compiled == "1":  # the values above came from the compiled kernels, not from a fallback
        assert all(k.failed is None and k._compiled is not None
                   for k in (potential.FUSED_POTENTIALS, potential.FUSED_POTENTIALS_Q))


def test_blocked_potentials_follow_the_labels_and_a_class_absent_from_the_bank():
    emb, bank, labels = _data(9)
    kw = dict(n_spaces=2, lam=0.5, l0=7.0, n_classes=5)  # class 4 has no bank point
    upstream = torch.randn(len(emb), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10))

    def both():
        got = _value_and_grad(lambda e: potential.class_potentials(e, bank, labels, **kw), emb, upstream)
        want = _value_and_grad(lambda e: potential._potentials_autograd(e, bank, labels, **kw), emb, upstream)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], want[1], rtol=1e-7, atol=1e-7)

    both()
    labels[:100] = (labels[:100] + 1) % 4  # edited in place: the kept class order is stale
    both()
    bank.mul_(0.5)
    both()


class _FailingCompile:
    """Stands in for a compiled kernel: the real function for ``works`` calls, then a compiler error."""

    def __init__(self, fn, works):
        self.fn, self.works, self.calls = fn, works, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls > self.works:
            raise RuntimeError("InductorError: CppCompileError: C++ compile error")
        return self.fn(*args)


def _stand_in_kernels(monkeypatch, works: dict) -> dict:
    """The potentials' fused kernels, each compiled by a :class:`_FailingCompile` that works ``works[name]`` times."""
    kernels = {}
    for name, n in works.items():
        kernel = devices.FusedKernel(getattr(potential, name).fn)
        kernel._compiled = kernels[name] = _FailingCompile(kernel.fn, n)
        monkeypatch.setattr(potential, name, kernel)
    return kernels


@pytest.mark.parametrize("compiled", ["1", "0"])
@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_attack_loss_with_its_gradient_in_one_pass_matches_whole_matrix_autograd(scale, compiled, monkeypatch):
    monkeypatch.setenv(devices.COMPILE_ENV, compiled)
    emb, bank, labels = _data(3)
    emb, bank = emb * scale, bank * scale
    kw = dict(n_spaces=2, lam=0.5, l0=7.0, n_classes=4)
    g = torch.Generator().manual_seed(4)
    y, upstream = torch.randint(0, 4, (len(emb),), generator=g), torch.randn(len(emb), dtype=torch.float64, generator=g)
    e = emb.clone().requires_grad_(True)
    loss = potential.attack_loss(e, y, bank, labels, **kw)
    assert type(loss.grad_fn).__name__ == "_BlockedAttackLossBackward"  # the one-pass path, not the potentials'
    want = _value_and_grad(lambda e: _gathered(potential._potentials_autograd(e, bank, labels, **kw), y), emb, upstream)
    torch.testing.assert_close(loss.detach(), want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad((loss * upstream).sum(), e)[0], want[1], rtol=1e-7, atol=1e-7)
    if compiled == "1":
        assert potential.FUSED_POTENTIALS_AND_Q.failed is None and potential.FUSED_POTENTIALS_AND_Q._compiled is not None


def _gathered(pots, y):
    return pots.gather(1, y.view(-1, 1)).squeeze(1)


_KERNELS = {  # the kernels each blocked path compiles
    "potentials": ("FUSED_POTENTIALS", "FUSED_POTENTIALS_Q"),
    "attack loss": ("FUSED_POTENTIALS_AND_Q",),
}


def _blocked_and_reference(path, bank, labels, y, kw):
    if path == "potentials":
        return (lambda e: potential.class_potentials(e, bank, labels, **kw),
                lambda e: potential._potentials_autograd(e, bank, labels, **kw))
    return (lambda e: potential.attack_loss(e, y, bank, labels, **kw),
            lambda e: _gathered(potential._potentials_autograd(e, bank, labels, **kw), y))


@pytest.mark.parametrize("path", sorted(_KERNELS))
def test_potentials_fall_back_to_eager_code_where_compiling_fails(path, monkeypatch):
    monkeypatch.setenv(devices.COMPILE_ENV, "1")
    emb, bank, labels = _data(11)
    kw = dict(n_spaces=2, lam=0.5, l0=7.0, n_classes=4)
    y = torch.arange(len(emb)) % 4
    blocked, reference = _blocked_and_reference(path, bank, labels, y, kw)
    upstream = torch.randn(len(emb), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    upstream = upstream if path == "potentials" else upstream[:, 0]
    kernels = _stand_in_kernels(monkeypatch, dict(zip(_KERNELS[path], (3, 2))))  # each fails after some blocks
    want = _value_and_grad(reference, emb, upstream)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = _value_and_grad(blocked, emb, upstream)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)  # the failed try's sums not counted
    torch.testing.assert_close(got[1], want[1], rtol=1e-7, atol=1e-7)
    assert not any(getattr(potential, name).usable() for name in _KERNELS[path])
    calls = {name: k.calls for name, k in kernels.items()}
    _value_and_grad(blocked, emb, upstream)
    assert calls == {name: k.calls for name, k in kernels.items()}  # given up: not tried again


def test_fused_kernels_are_not_called_when_compiling_is_switched_off(monkeypatch):
    monkeypatch.setenv(devices.COMPILE_ENV, "0")
    emb, bank, labels = _data(13)
    names = [name for names in _KERNELS.values() for name in names]
    kernels = _stand_in_kernels(monkeypatch, dict.fromkeys(names, 10**6))
    _value_and_grad(lambda e: potential.class_potentials(e, bank, labels, n_spaces=2, n_classes=4), emb,
                    torch.ones(len(emb), 4, dtype=torch.float64))
    _value_and_grad(lambda e: potential.attack_loss(e, torch.zeros(len(emb), dtype=torch.long), bank, labels,
                                                    n_spaces=2, n_classes=4), emb, torch.ones(len(emb)))
    assert [k.calls for k in kernels.values()] == [0] * len(names)


def _softknn_of(dist, labels, m, temperature, classes):
    """The soft-kNN logits from a whole distance matrix, through autograd."""
    cols = []
    for c in range(classes):
        idx = torch.nonzero(labels == c).squeeze(1)
        near = torch.topk(dist[:, idx], min(m, len(idx)), dim=1, largest=False).values
        cols.append(torch.logsumexp(-near / temperature, dim=1))
    return torch.stack(cols, 1)


def _softknn_whole_matrix(emb, bank, labels, n_spaces, m, temperature, classes):
    """The soft-kNN logits as written before the blocked path: autograd through the whole distance matrix."""
    return _softknn_of(pairwise_distance(emb, bank, n_spaces), labels, m, temperature, classes)


@pytest.mark.parametrize("m", [1, 7, 200])  # 200: more than any class has (every point of the class)
def test_blocked_softknn_matches_whole_matrix_autograd(m):
    emb, bank, labels = _data(3)
    defense = KNNDefense(torch.nn.Identity(), labels, bank_embeddings=bank, k=5, metric="sum-l2:2",
                         surrogate="softknn", m=m, temperature=0.7).double()
    bank = defense.bank  # the defense keeps its bank in float32
    upstream = torch.randn(len(emb), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = _value_and_grad(defense.surrogate, emb, upstream)
    want = _value_and_grad(lambda e: _softknn_whole_matrix(e, bank, labels, 2, m, 0.7, 4), emb, upstream)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-7, atol=1e-7)  # rounding of near-zero distances


def _softknn_by_differences(emb, bank, labels, m, temperature, classes):
    """The soft-kNN logits with distances from the differences themselves (exact next to a bank point, where
    ‖a‖² + ‖b‖² − 2a·b cancels)."""
    diff = (emb.unsqueeze(1) - bank.unsqueeze(0)).view(len(emb), len(bank), 2, -1)
    return _softknn_of(torch.linalg.vector_norm(diff, dim=-1).sum(-1), labels, m, temperature, classes)


def test_softknn_gradient_is_the_distances_own_next_to_a_bank_point():
    emb, bank, labels = _data(7)
    g = torch.Generator().manual_seed(8)
    emb[0] = bank[5] + 1e-7 * torch.randn(bank.shape[1], generator=g, dtype=torch.float64)  # nearest, not on it
    emb[1, :3] = bank[9, :3] + 1e-7 * torch.randn(3, generator=g, dtype=torch.float64)
    defense = KNNDefense(torch.nn.Identity(), labels, bank_embeddings=bank, k=5, metric="sum-l2:2",
                         surrogate="softknn", m=3, temperature=0.7).double()
    upstream = torch.randn(len(emb), 4, dtype=torch.float64, generator=g)
    got = _value_and_grad(defense.surrogate, emb, upstream)[1]
    want = _value_and_grad(lambda e: _softknn_by_differences(e, defense.bank, labels, 3, 0.7, 4), emb, upstream)[1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_vote_from_the_surrogates_distances_is_the_same_decision():
    emb, bank, labels = _data(5, n=40)
    emb, bank = emb.float(), bank.float()
    emb[2] = (bank[0] + bank[1]) / 2  # equidistant from two bank points: a tie at the edge
    defense = KNNDefense(torch.nn.Identity(), labels, bank_embeddings=bank, k=9, metric="sum-l2:2")
    _, dist = defense.surrogate.logits_and_distances(emb)
    # planted bug caught: the surrogate's class-ordered distances handed to the vote without putting them back in
    # bank order
    torch.testing.assert_close(dist, pairwise_distance(emb, bank, 2), rtol=1e-5, atol=1e-5)
    for k in (1, 9, 50):
        with_dist = knn_votes(emb, bank, labels, k=k, n_spaces=2, n_classes=4, dist=dist)
        without = knn_votes(emb, bank, labels, k=k, n_spaces=2, n_classes=4)
        assert all(torch.equal(a, b) for a, b in zip(with_dist, without))
    assert torch.equal(defense(emb).argmax(1), defense.predict(emb))  # aligned logits: argmax is the vote


def test_vote_refuses_distances_of_another_shape():
    emb, bank, labels = _data(6)
    with pytest.raises(ValueError, match="precomputed distances"):
        knn_votes(emb, bank, labels, k=3, n_spaces=2, n_classes=4, dist=torch.zeros(len(emb), 5))


@pytest.mark.parametrize("grad", [True, False])
def test_attack_loss_refuses_an_unknown_option(grad):
    emb, bank, labels = _data(15)
    with pytest.raises(TypeError, match="lamda"):
        potential.attack_loss(emb.requires_grad_(grad), torch.zeros(len(emb), dtype=torch.long), bank, labels,
                              lamda=0.5)


def test_block_budget_follows_the_device_and_refuses_a_bad_override(monkeypatch):
    monkeypatch.delenv(devices.BLOCK_ENV)
    assert devices.block_elements(torch.device("cpu")) < devices.block_elements(torch.device("cuda"))
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv(devices.BLOCK_ENV, bad)
        with pytest.raises(UsageError, match=devices.BLOCK_ENV):
            devices.block_elements(torch.device("cpu"))
