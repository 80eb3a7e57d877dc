"""The §2.5 potentials' C kernel (``native.py``, ``native_potentials.c``) against the whole-matrix formula in float64:
values and gradients of the potentials and of the attack loss, on shapes that cross its tiles (rows in fours, bank
columns in vectors of 16 and blocks of 256, a class absent, a sub-space count that does not divide 16), with bank
points at distance 0 and beyond exp's range; the same results on any number of threads; the torch path wherever
the kernel does not apply; and planted bugs in the C source that these comparisons catch."""

import warnings

import pytest
import torch

from robustbench_knn import devices, native
from robustbench_knn.defenses import potential


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.setenv(devices.COMPILE_ENV, "1")


def _data(seed, n=11, m=1203, w=6, classes=5, scale=3.0):
    """float32 inputs (and the labels); class 4 has no bank point, class sizes are not multiples of 16 and two of
    them span more than one 256-column block."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(m, w, generator=g) * scale
    labels = torch.randint(0, classes - 1, (m,), generator=g)
    emb = torch.randn(n, w, generator=g) * scale
    return emb, bank, labels


def _value_and_grad(fn, emb, upstream):
    e = emb.clone().requires_grad_(True)
    out = fn(e)
    return out.detach(), torch.autograd.grad((out * upstream).sum(), e)[0]


def _close(got, want):
    """float32 against float64: within 1e-4 of the largest value (a dropped column or row moves a sum by far more)."""
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


def _compare(emb, bank, labels, n_spaces, classes=5, lam=0.5, l0=7.0):
    kw = dict(n_spaces=n_spaces, lam=lam, l0=l0, n_classes=classes)
    gen = torch.Generator().manual_seed(3)
    upstream = torch.randn(len(emb), classes, dtype=torch.float64, generator=gen)
    ref = (emb.double(), bank.double(), labels)
    got = _value_and_grad(lambda e: potential.class_potentials(e, bank, labels, **kw), emb, upstream.float())
    want = _value_and_grad(lambda e: potential._potentials_autograd(e, *ref[1:], **kw), ref[0], upstream)
    _close(got, want)
    y = torch.arange(len(emb)) % classes
    got = _value_and_grad(lambda e: potential.attack_loss(e, y, bank, labels, **kw), emb, upstream[:, 0].float())
    want = _value_and_grad(lambda e: potential._potentials_autograd(e, *ref[1:], **kw).gather(1, y.view(-1, 1))
                           .squeeze(1), ref[0], upstream[:, 0])
    _close(got, want)


@pytest.mark.parametrize("n_spaces,w", [(1, 7), (2, 30), (3, 9)])
@pytest.mark.parametrize("scale", [0.5, 3.0])  # mostly within l0, mostly beyond
def test_native_kernel_matches_the_whole_matrix_formula(n_spaces, w, scale, monkeypatch):
    calls = []
    monkeypatch.setattr(native, "potential_sums", _counting(native.potential_sums, calls))
    emb, bank, labels = _data(1, w=w, scale=scale)
    assert native.usable(emb, n_spaces), native.KERNEL.failed
    _compare(emb, bank, labels, n_spaces)
    assert len(calls) == 3  # potentials forward and backward, attack loss forward (its backward scales): all native


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


def test_zero_distances_and_underflow():
    """Integer coordinates make (‖a‖² + ‖b‖²) − 2a·b exact, so a point on a bank point (in both sub-spaces, or in
    one) has distance exactly 0 there, whose gradient share is 0; points 400 apart have e^{−λD} below float32."""
    g = torch.Generator().manual_seed(5)
    bank = torch.randint(-4, 5, (700, 4), generator=g).float()
    labels = torch.randint(0, 3, (700,), generator=g)
    bank[650:] += 400.0
    emb = torch.randint(-4, 5, (6, 4), generator=g).float()
    emb[0] = bank[5]
    emb[1, :2] = bank[9, :2]
    emb[5] = bank[660]  # near the far points only
    _compare(emb, bank, labels, n_spaces=2, classes=3)


def test_same_results_on_any_number_of_threads():
    emb, bank, labels = _data(2, n=37, w=30)
    kw = dict(n_spaces=2, lam=0.5, l0=7.0, n_classes=5)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(_value_and_grad(lambda e: potential.class_potentials(e, bank, labels, **kw), emb,
                                        torch.ones(37, 5)))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # each row's arithmetic is its own


def test_torch_path_where_the_kernel_does_not_apply(monkeypatch):
    emb, bank, labels = _data(4, w=6)
    assert not native.usable(emb.double(), 2)  # float64: the torch path
    assert not native.usable(torch.zeros(3, 130), 2)  # wider than the kernel's maximum
    assert not native.usable(emb, 4)  # 6 dimensions do not split into 4 sub-spaces
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert not native.usable(emb, 2)
    _compare(emb, bank, labels, n_spaces=2)  # the compiled torch blocks, same values
    monkeypatch.setenv(native.NATIVE_ENV, "1")
    monkeypatch.setenv(devices.COMPILE_ENV, "0")
    assert not native.usable(emb, 2)
    _compare(emb, bank, labels, n_spaces=2)  # the eager torch code, same values


def test_no_compiler_says_so_once_and_the_torch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(native, "KERNEL", native._Kernel())
    emb, bank, labels = _data(6)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert not native.usable(emb, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.usable(emb, 2)
    _compare(emb, bank, labels, n_spaces=2)


def test_the_library_is_built_once_per_source(tmp_path, monkeypatch):
    first = native.build(native.source(), tmp_path)
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert native.build(native.source(), tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def _check_candidates(dist, c):
    """The contract of native.smallest_candidates: c distinct indices, their values the c smallest (as a multiset),
    every value left out ≥ the returned c-th value, which is the row's c-th smallest."""
    idx, kth = native.smallest_candidates(dist, c)
    assert idx.shape == (len(dist), c) and kth.shape == (len(dist),)
    for r in range(len(dist)):
        row, sel = dist[r], idx[r]
        assert len(set(sel.tolist())) == c
        smallest = torch.sort(row).values[:c]
        assert torch.equal(torch.sort(row[sel]).values, smallest)
        assert kth[r] == smallest[-1]
        rest = torch.ones(len(row), dtype=torch.bool)
        rest[sel] = False
        assert bool((row[rest] >= kth[r]).all())


def test_candidate_selection_keeps_its_contract():
    g = torch.Generator().manual_seed(8)
    m = 5000
    rows = [torch.rand(m, generator=g) * 10,  # distinct values
            torch.randint(0, 20, (m,), generator=g).float(),  # many ties at the c-th value
            torch.full((m,), 3.0),  # all equal
            torch.where(torch.arange(m) % 16 == 0, torch.rand(m, generator=g), 5 + torch.rand(m, generator=g)),
            # ↑ the sample (every 16th value) holds the row's smallest: its thresholds fall short until raised
            torch.cat([torch.rand(50, generator=g), torch.full((m - 50,), float("inf"))]),  # fewer finite than c
            ]
    dist = torch.stack(rows)
    for c in (1, 100, 333, m):
        _check_candidates(dist, c)
    _check_candidates(dist[:, ::2], 100)  # a strided view
    _check_candidates(dist.t().contiguous().t()[:3], 10)  # columns not contiguous: copied first


def test_candidate_selection_leaves_nan_rows_and_other_tensors_to_the_caller(monkeypatch):
    dist = torch.rand(3, 100)
    dist[1, 5] = float("nan")
    assert native.smallest_candidates(dist, 10) is None
    assert native.smallest_candidates(torch.rand(3, 100, dtype=torch.float64), 10) is None
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.smallest_candidates(torch.rand(3, 100), 10) is None


def test_the_vote_is_the_same_with_either_selection(monkeypatch):
    """The exact rule decides in float64 from the candidates, so the selection may not change a vote or a sum;
    integer coordinates make many distances equal, ties at the candidates' edge included."""
    from robustbench_knn.defenses.knn import knn_votes

    g = torch.Generator().manual_seed(12)
    bank = torch.randint(-3, 4, (4000, 6), generator=g).float()
    labels = torch.randint(0, 5, (4000,), generator=g)
    emb = torch.randint(-3, 4, (70, 6), generator=g).float()
    got = knn_votes(emb, bank, labels, k=300, n_spaces=2, n_classes=5)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    want = knn_votes(emb, bank, labels, k=300, n_spaces=2, n_classes=5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _potentials_checks(monkeypatch):
    test_native_kernel_matches_the_whole_matrix_formula(2, 14, 3.0, monkeypatch)  # 7 dimensions: a remainder
    test_zero_distances_and_underflow()


def _selection_checks(monkeypatch):
    test_candidate_selection_keeps_its_contract()


PLANTED = {  # a bug planted in the C sources: (what it replaces, by what, the checks that must catch it)
    "the last partial vector of columns is dropped": (
        "const int64_t mv = (m + VEC - 1) / VEC * VEC;", "const int64_t mv = m / VEC * VEC;", _potentials_checks),
    "the batch's last rows (fewer than four) are dropped": (
        "for (int64_t u0 = 0; u0 < n_rows; u0 += ROWS)", "for (int64_t u0 = 0; u0 + ROWS <= n_rows; u0 += ROWS)",
        _potentials_checks),
    "a class's second block is skipped": ("s0 += BLOCK)", "s0 += 2 * BLOCK)", _potentials_checks),
    "no guard at distance 0": ("q[v] = q[v] > 0.0f ? g[v] / q[v] : 0.0f;", "q[v] = g[v] / q[v];",
                               _potentials_checks),
    "the gradient's Σ Q b misses its remainder dimensions": ("for (; i0 < d; i0++) {", "for (; i0 < 0; i0++) {",
                                                             _potentials_checks),
    "no whole-row fallback in the selection": ("if (n < c) {  /* the whole row */", "if (0) {  /* the whole row */",
                                               _selection_checks),
    "the c-th value is the smallest selected, not the largest": (
        "top = vals[i] > top ? vals[i] : top;", "top = vals[i] < top ? vals[i] : top;", _selection_checks),
    "quickselect recurses into the wrong side": ("if (k - 1 <= j) hi = j;", "if (k - 1 <= i) hi = j;",
                                                 _selection_checks),
    "a swap leaves the indices behind": ("    ix[a] = ix[b];\n", "", _selection_checks),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_the_checks_catch_a_planted_bug(bug, tmp_path, monkeypatch):
    old, new, checks = PLANTED[bug]
    src = native.source()
    assert src.count(old) == 1, f"the planted bug's anchor moved: {old!r}"
    monkeypatch.setattr(native.KERNEL, "lib", native.load(native.build(src.replace(old, new), tmp_path)))
    with pytest.raises(AssertionError):
        checks(monkeypatch)
