"""Certified lower bounds: sound (no certified point is ever broken by an exhaustive attack on 2-D toys, and a
planted unsound shortcut is caught by the same check), not vacuous, and the CLI's bad input is exit 2."""

import json
from itertools import combinations

import pytest
import torch
from torch import nn

from robustbench_knn import KNNDefense
from robustbench_knn.cli import main
from robustbench_knn.config import ModelConfig, UsageError
from robustbench_knn.defenses.subjects import Penultimate
from robustbench_knn.evaluation import bisector, bounds
from robustbench_knn.evaluation import certify as certify_module
from robustbench_knn.evaluation.bounds import embedding_bounds, input_box
from robustbench_knn.evaluation.certify import certify
from robustbench_knn.evaluation.evaluate import TOL
from robustbench_knn.paper.model import IdRes, IdResNet

from .conftest import USER_MODULE

EPS = (0.02, 0.05, 0.1)


def toy_identity(k: int, seed: int = 0) -> KNNDefense:
    """k-NN on 2-D inputs (identity embedding): 36 bank points, 3 classes by region, some label noise."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.rand(36, 2, generator=g)
    labels = (bank[:, 0] > 0.5).long() + (bank[:, 1] > 0.6).long()
    labels[:3] = torch.tensor([2, 0, 1])
    return KNNDefense(nn.Flatten(), labels, bank_embeddings=bank, k=k)


def toy_mlp(k: int, seed: int = 0) -> KNNDefense:
    """k-NN over a random-weight MLP embedding (Linear and ReLU, the paper network's layer types) of 2-D inputs."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(seed)
    inputs = torch.rand(40, 2, generator=g)
    labels = (inputs[:, 0] + inputs[:, 1] > 1).long()
    return KNNDefense(net, labels, bank_images=inputs, k=k)


def points(n: int = 24, seed: int = 1, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 2, generator=g)


def ball_grid(x0: torch.Tensor, eps: float, norm: str, n: int = 81) -> torch.Tensor:
    """A dense grid of the 2-D ball ∩ [0, 1]² around ``x0``, its boundary and (ℓ∞) corners included. Clipping to
    the box keeps a point in the ball: it moves each coordinate towards x0, which is in the box."""
    t = torch.linspace(-1, 1, n)
    if norm == "Linf":
        grid = torch.cartesian_prod(t, t) * eps
    else:
        radius, angle = torch.linspace(0, eps, n), torch.linspace(0, 2 * torch.pi, 4 * n)
        grid = torch.cartesian_prod(radius, angle)
        grid = torch.stack([grid[:, 0] * torch.cos(grid[:, 1]), grid[:, 0] * torch.sin(grid[:, 1])], 1)
    return (x0 + grid).clamp(0, 1)


def broken_certified(defense: KNNDefense, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> list[int]:
    """Certify every point at ``eps``, then attack each certified one exhaustively on a grid of its ball: the
    indices of certified points whose vote some grid point changes (a sound certificate gives none)."""
    cert = certify(defense, x, y, eps, norm, steps=0).certified[0]
    broken = []
    for i in cert.nonzero().flatten().tolist():
        if (defense.predict(ball_grid(x[i], eps, norm)) != y[i]).any():
            broken.append(i)
    return broken


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("k", [1, 3])
def test_identity_certificates_survive_exhaustive_attack(norm, k):
    defense = toy_identity(k)
    x = points()
    y = defense.predict(x)
    y[:2] = (y[:2] + 1) % 3  # two misclassified points: never certified
    n_certified = 0
    for eps in EPS:
        assert broken_certified(defense, x, y, eps, norm) == []
        n_certified += int(certify(defense, x, y, eps, norm, steps=0).certified.sum())
    assert n_certified > 0
    assert not certify(defense, x[:2], y[:2], 0.0, norm, steps=0).certified.any()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_ibp_certificates_survive_grid_attack(norm):
    defense = toy_mlp(k=3)
    x = points()
    y = defense.predict(x)
    certified = certify(defense, x, y, [0.01, 0.03], norm, steps=0).certified
    assert certified[0].sum() > 0
    for eps in (0.01, 0.03, 0.08):
        assert broken_certified(defense, x, y, eps, norm) == []


def test_certified_accuracy_is_monotone_and_not_vacuous():
    defense, x = toy_identity(3), points(40)
    y = defense.predict(x)
    for norm in ("Linf", "L2"):
        cert = certify(defense, x, y, [0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2], norm, steps=8)
        acc = cert.accuracy()
        assert all(a >= b for a, b in zip(acc, acc[1:])) and acc[1] > 50
        # the radius agrees with the per-ε certificates: certified at ε implies radius ≥ ε (up to bisection)
        for e, c in zip(cert.eps, cert.certified):
            assert (cert.radius[c] >= e - cert.extra["radius_max"] / 2 ** 8).all()


@pytest.mark.parametrize("toy", [toy_identity, toy_mlp])
def test_the_radius_ladder_gives_what_each_radius_alone_gives(toy):
    """certify() tries the radii in increasing order, each only on the points certified at the one before; the
    certified sets must be those of certifying every point at every radius on its own (ε given out of order)."""
    defense, x = toy(3), points(40)
    y = defense.predict(x)
    eps = [0.05, 0.0, 0.2, 0.01, 0.02]
    for norm in ("Linf", "L2"):
        cert = certify(defense, x, y, eps, norm, steps=0, batch_size=16)
        for e, c in zip(eps, cert.certified):
            alone = certify_module.certified_at(defense, x, y, e, norm)
            assert torch.equal(c, alone), (norm, e)
        assert any(c.any() and not c.all() for c in cert.certified)  # a ladder with something to skip


def test_a_killed_certify_resumes_from_its_kept_batches(tmp_path, monkeypatch):
    """certify(batch_dir=...) keeps each finished batch and reuses it for the same question only: the same images,
    radii and decision rule come back unchanged without recomputing; other radii or another k are computed."""
    defense, x = toy_identity(3), points(40)
    y = defense.predict(x)
    first = certify(defense, x, y, [0.02, 0.05], "Linf", steps=4, batch_size=16, batch_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3
    real, calls = certify_module._certify_batch, []

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(certify_module, "_certify_batch", counted)
    again = certify(defense, x, y, [0.02, 0.05], "Linf", steps=4, batch_size=16, batch_dir=tmp_path)
    assert calls == [] and again.extra["reused_batches"] == 3
    assert torch.equal(again.certified, first.certified) and torch.equal(again.radius, first.radius)
    assert again.seconds == pytest.approx(first.seconds)
    certify(defense, x, y, [0.01, 0.05], "Linf", steps=4, batch_size=16, batch_dir=tmp_path)
    assert calls == [16, 16, 8]  # other radii: a new question
    certify(toy_identity(1), x, y, [0.02, 0.05], "Linf", steps=4, batch_size=16, batch_dir=tmp_path)
    assert calls == [16, 16, 8] * 2  # same bank, another k: another decision
    moved = x.clone()
    moved[20] = moved[20] / 2
    certify(defense, moved, y, [0.02, 0.05], "Linf", steps=4, batch_size=16, batch_dir=tmp_path)
    assert calls == [16, 16, 8] * 2 + [16]  # one image moved, same labels: only its batch is a new question


def distance_to_cell(x: torch.Tensor, bank: torch.Tensor, j: int) -> float:
    """Exact ℓ2 distance from ``x`` to the Voronoi cell of bank point j (2-D): the nearest point of a convex
    polygon is ``x`` itself, its projection on an edge's line or a vertex; every feasible candidate is tried."""
    others = [m for m in range(len(bank)) if m != j]
    a = (bank[others] - bank[j]).double()  # the cell: a_m · z <= c_m
    c = ((bank[others].double() ** 2).sum(1) - (bank[j].double() ** 2).sum()) / 2
    x = x.double()
    m, n = torch.tensor(list(combinations(range(len(a)), 2))).T
    det = a[m, 0] * a[n, 1] - a[m, 1] * a[n, 0]
    keep = det.abs() > 1e-12
    m, n, det = m[keep], n[keep], det[keep]
    vertices = torch.stack([(c[m] * a[n, 1] - c[n] * a[m, 1]) / det, (a[m, 0] * c[n] - a[n, 0] * c[m]) / det], 1)
    z = torch.cat([x[None], x - ((a @ x - c) / (a * a).sum(1))[:, None] * a, vertices])
    feasible = (z @ a.T <= c + 1e-9).all(1)
    return float((z[feasible] - x).norm(dim=1).min())


def test_one_nn_l2_radius_is_the_closed_form_and_below_the_exact_one():
    """1-NN, ℓ2, balls inside the box. The intervals [d_j − ε, d_j + ε] alone certify while the nearest point a
    (class y, distance d_y) beats every other-class point: ε < (d_other − d_y) / 2. The bisectors certify while
    no other-class b can be as near as a: ε < min_b (‖x − b‖² − ‖x − a‖²) / (2‖b − a‖), the distance from x to
    their bisector, which is at least the interval form and at most the exact minimal perturbation (the distance
    to the nearest other-class Voronoi cell, which lies beyond b's bisector with a)."""
    defense = toy_identity(1)
    bank, labels = defense.bank.double(), defense.bank_labels
    x = points(12, seed=3, low=0.3, high=0.7)
    y = defense.predict(x)
    steps, radius_max = 14, 0.25
    radius = certify(defense, x, y, 0.01, "L2", radius_max=radius_max, steps=steps).radius
    gains = []
    for i in range(len(x)):
        d = (bank - x[i].double()).norm(dim=1)
        other = labels != y[i]
        a = bank[torch.where(other, torch.inf, d).argmin()]
        intervals = min(float((d[other].min() - d[~other].min()) / 2), radius_max)
        bisector = min(float(((d[other] ** 2 - (x[i].double() - a).norm() ** 2)
                              / (2 * (bank[other] - a).norm(dim=1))).min()), radius_max)
        exact = min(distance_to_cell(x[i], defense.bank, j) for j in other.nonzero().flatten().tolist())
        assert intervals <= bisector + 1e-9 and bisector <= exact + 1e-9
        assert bisector - radius_max / 2 ** steps - 2 * TOL <= radius[i] <= bisector
        gains.append(float(radius[i]) - intervals)
    assert max(gains) > 1e-3  # the bisectors are what make the difference on some points


def shrunk(real):
    """An unsound shortcut: intervals shrunk to half their width about their middle."""
    def intervals(*args, **kwargs):
        lo, hi = real(*args, **kwargs)
        mid, half = (lo + hi) / 2, (hi - lo) / 4
        return mid - half, mid + half
    return intervals


def half_radius(real):
    """An unsound shortcut in IBP: each Linear layer's output box keeps half its radius."""
    def linear(m, box):
        out = real(m, box)
        mid, quarter = (out.lo + out.hi) / 2, (out.hi - out.lo) / 4
        return bounds.Box(mid - quarter, mid + quarter)
    return linear


def at_centre(a, b, box, row):
    """An unsound shortcut in the bisectors: each pair compared at the centre of the set only."""
    mid = (box.lo[row] + box.hi[row]) / 2
    return ((mid - b) ** 2).sum(1) <= ((mid - a) ** 2).sum()


@pytest.mark.parametrize("plant", ["shrunk-intervals", "ibp-half-radius", "bisector-at-centre"])
def test_a_planted_unsound_shortcut_is_caught(monkeypatch, plant):
    if plant == "shrunk-intervals":
        monkeypatch.setattr(certify_module, "distance_intervals", shrunk(certify_module.distance_intervals))
        defense = toy_identity(1)
    elif plant == "bisector-at-centre":
        monkeypatch.setattr(bisector, "_beats", at_centre)
        defense = toy_identity(3)
    else:
        monkeypatch.setattr(bounds, "_linear", half_radius(bounds._linear))
        defense = toy_mlp(1)
    x = points(40)
    y = defense.predict(x)
    assert any(broken_certified(defense, x, y, eps, norm) for eps in (0.05, 0.1, 0.2) for norm in ("Linf", "L2"))


def tiny_idresnet(normalization: str) -> IdResNet:
    torch.manual_seed(0)
    net = IdResNet(ModelConfig(w_r=8, n_spaces=2, d=2, normalization=normalization, ots_activation="relu"))
    for m in net.modules():  # the residual branches start at zero: give them weights so they are bounded too
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.3)
    if normalization == "position":
        net.mean.fill_(0.5)
        net.std.uniform_(0.2, 0.3)
    return net.eval()


@pytest.mark.parametrize("normalization", ["image", "position"])
@pytest.mark.parametrize("norm, eps", [("Linf", 4 / 255), ("L2", 0.5)])
def test_ibp_box_holds_the_paper_networks_embedding(normalization, norm, eps):
    net = tiny_idresnet(normalization)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 32, 32, generator=g)
    for emb in (net, Penultimate(net)):
        defense = KNNDefense(emb, torch.arange(2), bank_embeddings=emb(x0[:2]).detach(), k=1, metric="sum-l2:2")
        box = embedding_bounds(defense, input_box(x0, eps, norm))
        for _ in range(20):
            delta = torch.randn(x0.shape, generator=g)
            delta = (delta.sign() * eps if norm == "Linf"
                     else delta * eps / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
            e = defense.embed((x0 + delta).clamp(0, 1)).double()
            assert (e >= box.lo).all() and (e <= box.hi).all()


def toy_residual() -> nn.Module:
    """A ReLU network with the paper's residual layers (skip + branch) on 2-D inputs, weights large enough that
    many ReLUs straddle 0 over the boxes below."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 8), IdRes(8, 8), nn.ReLU(), IdRes(8, 4))
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.8)
    return net.eval()


@pytest.mark.parametrize("make", [lambda: toy_mlp(1).net, toy_residual])
def test_linear_bounds_hold_on_a_dense_grid_and_beat_ibp(make):
    """The embedding box (IBP ∩ linear bounds) holds the embedding of every point of a dense grid of each ball,
    corners included, and is narrower than IBP's alone. Planted and caught: the ReLU's upper line without its
    offset; a residual layer's skip left out of the backward pass."""
    net = make()
    x = points(6, seed=4)
    defense = KNNDefense(net, torch.tensor([0, 1]), bank_embeddings=net(x[:2]).detach(), k=1)
    for eps in (0.05, 0.2):
        box = embedding_bounds(defense, input_box(x, eps, "Linf"))
        ibp = bounds.propagate(net, input_box(x, eps, "Linf"))
        for i in range(len(x)):
            e = net(ball_grid(x[i], eps, "Linf", n=61)).double()
            assert (e.min(0).values >= box.lo[i]).all() and (e.max(0).values <= box.hi[i]).all()
        assert (box.hi - box.lo).sum() < 0.9 * (ibp.hi - ibp.lo).sum()


def test_cosine_bounds_hold_and_unknown_layers_are_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3))
    defense = KNNDefense(net, torch.tensor([0, 1, 0, 1]), bank_images=torch.rand(4, 2), k=1, metric="cosine")
    x = points(8)
    box = embedding_bounds(defense, input_box(x, 0.05, "Linf"))
    for xs in ball_grid(x[0], 0.05, "Linf", n=21).split(1):
        e = defense.embed(xs).double()[0]
        assert (e >= box.lo[0]).all() and (e <= box.hi[0]).all()
    conv = KNNDefense(nn.Sequential(nn.Unflatten(1, (1, 2)), nn.Conv1d(1, 1, 1), nn.Flatten()), torch.tensor([0, 1]),
                      bank_embeddings=torch.rand(2, 2), k=1)
    with pytest.raises(UsageError, match="Unflatten"):
        certify(conv, x, conv.predict(x), 0.01)
    with pytest.raises(UsageError, match="KNNDefense"):
        certify(nn.Linear(2, 2), x, torch.zeros(8, dtype=torch.long), 0.01)


@pytest.fixture
def user_dir(tmp_path, monkeypatch, tiny_data_dir):
    (tmp_path / "mycert.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USER_DATA", str(tiny_data_dir))
    return tmp_path


def _certify(model, data_dir, out, *extra):
    return main(["certify", "--model", model, "--n-test", "10", "--data-dir", str(data_dir), "--device", "cpu",
                 "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("extra, msg", [(["--norm", "L3"], "norm must be one of"),
                                        (["--eps", "8/0"], "malformed eps"), (["--eps", "2"], "must be in [0, 1]"),
                                        (["--n-test", "0"], "--n-test"), (["--steps", "-1"], "--steps")])
def test_cli_bad_input_exits_2_before_work(user_dir, tiny_data_dir, capsys, extra, msg):
    assert _certify("mycert:make", tiny_data_dir, user_dir / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and not (user_dir / "out").exists()


def test_cli_certifies_a_user_defense(user_dir, tiny_data_dir, capsys):
    assert _certify("mycert:make", tiny_data_dir, user_dir / "out", "--eps", "1/255,8/255", "--steps", "4") == 0
    (path,) = (user_dir / "out").glob("certify-make-*-Linf.json")
    res = json.loads(path.read_text())
    assert res["model"] == "make" and res["n"] == 10 and res["norm"] == "Linf" and len(res["radius"]) == 10
    assert [p["eps"] for p in res["per_eps"]] == [1 / 255, 8 / 255] and res["weights_hash"] in path.name
    assert {"versions", "seconds_per_image", "dataset_sha256", "method"} <= set(res)
    assert path.with_suffix(".csv").read_text().startswith("eps,certified_acc\n")
    assert _certify("mycert:plain", tiny_data_dir, user_dir / "out2") == 2
    assert "KNNDefense" in capsys.readouterr().err and not (user_dir / "out2").exists()
