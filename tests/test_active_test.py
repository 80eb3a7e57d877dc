"""The active test of attack strength (evaluation/active_test.py): on a decision where an adversarial example is
known to exist, correct attacks pass, an attack that does nothing and gradient attacks on a masked embedding fail,
the validity filter is real, and bad input is refused before any work."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import robustbench_knn.evaluation.active_test as at
from robustbench_knn.attacks import get_attack
from robustbench_knn.attacks.base import Attack, AttackSpec
from robustbench_knn.config import UsageError
from robustbench_knn.defenses.defense import KNNDefense, ModuleClassifier

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255
CHEAP = {"ta:pgd": {}, "native:softknn-apgd": {"steps": 20}, "native:vote-square": {"n_queries": 300}}


def blobs(n_per_class: int, protos: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(len(protos)).repeat_interleave(n_per_class)
    return (protos[y] + 0.15 * torch.randn(len(y), *protos.shape[1:], generator=gen)).clamp(0, 1), y


@pytest.fixture(scope="module")
def tiny():
    """10 classes of 3×8×8 images (a random prototype each + noise): 60 bank images, 20 test images."""
    gen = torch.Generator().manual_seed(0)
    protos = torch.rand(10, 3, 8, 8, generator=gen)
    return (*blobs(6, protos, gen), *blobs(2, protos, gen))


@pytest.fixture(scope="module")
def conv_defense(tiny):
    """A random (untrained) differentiable conv embedding + 3-NN: the defense itself does not matter to the test."""
    xb, yb, xt, yt = tiny
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten())
    defense = KNNDefense(net, yb, bank_images=xb, k=3)
    assert (defense.predict(xt) == yt).float().mean() > 0.8  # enough clean-correct points to draw from
    return defense


class Quantize(nn.Module):
    """x ↦ round(7x)/7, flattened: piecewise constant, so its input gradient is zero almost everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.round(x * 7) / 7).flatten(1)


class Identity(Attack):
    """The planted broken attack: returns the clean images."""

    name, toolkit, gradient_source = "identity", "test", None

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.clone()


IDENTITY = AttackSpec("identity", "test", lambda model, eps, **p: Identity(model, eps, **p))


def run(defense, tiny, names, n_points=12, **kw):
    _, _, xt, yt = tiny
    specs = [get_attack(n) if isinstance(n, str) else n for n in names]
    return at.active_test(defense, xt, yt, EPS, specs, n_points=n_points, overrides=CHEAP, **kw)


def test_correct_attacks_pass_and_transfer_is_skipped(conv_defense, tiny):
    # catches: a test decision on which x* is not adversarial (few valid points), a success rate inverted or taken
    # over the wrong points, and the transfer attack run (it would refuse: no source provider is installed)
    r = run(conv_defense, tiny, ["ta:pgd", "native:softknn-apgd", "native:transfer"])
    assert r["n_points"] == 12 and r["n_valid"] >= 10, r
    assert set(r["attacks"]) == {"ta:pgd", "native:softknn-apgd"}
    for key, a in r["attacks"].items():
        assert a["passed"] and a["success_rate"] >= 90, (key, a)
    assert [s["attack"] for s in r["skipped"]] == ["native:transfer"]
    assert json.loads(json.dumps(r)) == r  # JSON-able as returned


def test_an_attack_that_does_nothing_fails(conv_defense, tiny):
    # catches: counting a point broken because an adversarial example is known to exist (x*), not because the
    # attack returned one, and `passed` not following the success rate
    r = run(conv_defense, tiny, [IDENTITY, "native:vote-square"])
    assert r["n_valid"] >= 10
    assert r["attacks"]["test:identity"] == {"success_rate": 0.0, "passed": False,
                                             "seconds": r["attacks"]["test:identity"]["seconds"]}
    assert r["attacks"]["native:vote-square"]["passed"]  # the same points are breakable by a real attack


def test_gradient_attacks_fail_on_a_masked_embedding(tiny):
    # catches: a test decision built on anything but the defense's own embedding (e.g. raw pixels), on which the
    # gradient attacks would pass although they cannot attack this defense
    xb, yb, _, _ = tiny
    masked = KNNDefense(Quantize(), yb, bank_images=xb, k=3)
    r = run(masked, tiny, ["ta:pgd", "native:softknn-apgd", "native:vote-square"], n_points=8)
    assert r["n_valid"] >= 6, r
    for key in ("ta:pgd", "native:softknn-apgd"):
        assert not r["attacks"][key]["passed"] and r["attacks"][key]["success_rate"] < 50, (key, r["attacks"][key])
    assert r["attacks"]["native:vote-square"]["passed"], r["attacks"]["native:vote-square"]


def test_validity_filter_is_real(conv_defense, tiny, monkeypatch):
    build = at.build_decision

    def boundary_labelled(mask):
        def planted(defense, pts, **kw):
            return build(defense, dataclasses.replace(pts, target=torch.where(mask[:len(pts.y)], pts.y, pts.target)),
                         **kw)
        return planted

    # every boundary point labelled y: no adversarial example is known anywhere (catches a missing validity check)
    monkeypatch.setattr(at, "build_decision", boundary_labelled(torch.ones(12, dtype=torch.bool)))
    r = run(conv_defense, tiny, ["ta:pgd"])
    assert r["n_points"] == 12 and r["n_valid"] == 0
    assert r["attacks"]["ta:pgd"] == {"success_rate": None, "passed": False, "seconds": 0.0}
    # half of them: only the other half count, and a correct attack still passes on those (catches invalid points
    # attacked or counted as the attack's failures)
    half = torch.arange(12) % 2 == 0
    monkeypatch.setattr(at, "build_decision", boundary_labelled(half))
    r = run(conv_defense, tiny, ["ta:pgd"])
    assert 4 <= r["n_valid"] <= 6, r
    assert r["attacks"]["ta:pgd"]["passed"], r


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("embedded before the arguments were checked")


def test_bad_input_is_refused_before_any_work(tiny):
    xb, yb, xt, yt = tiny
    boom = KNNDefense(Boom(), yb, bank_embeddings=torch.randn(len(yb), 4), k=3)  # any embedding call fails
    pgd = [get_attack("ta:pgd")]
    with pytest.raises(UsageError, match="k-NN defense"):
        at.active_test(ModuleClassifier(nn.Sequential(nn.Flatten(), nn.Linear(192, 10))), xt, yt, EPS, pgd)
    with pytest.raises(UsageError, match="k-NN defense"):
        at.active_test(nn.Linear(4, 2), xt, yt, EPS, pgd)
    for bad, match in (({"n_points": 0}, "n_points"), ({"k_test": 2}, "k_test"), ({"k_test": 0}, "k_test"),
                       ({"n_inner": 1, "k_test": 5}, "n_inner"), ({"threshold": 150.0}, "threshold"),
                       ({"overrides": {"ta:pgd": {"stepz": 3}}}, "stepz")):
        with pytest.raises(UsageError, match=match):
            at.active_test(boom, xt, yt, EPS, pgd, **bad)
    with pytest.raises(UsageError, match="eps"):
        at.active_test(boom, xt, yt, 0.0, pgd)


def test_active_test_command(tmp_path, tiny_data_dir, cache_dir, capsys):
    # planted bugs caught: the command not wired (exit != 0 / no file), bad ε accepted
    import json

    from robustbench_knn.cli import main

    from .conftest import TINY_SETS

    common = ["--model", "full", *(x for s in TINY_SETS for x in ("--set", s)), "--data-dir", str(tiny_data_dir),
              "--cache-dir", str(cache_dir), "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    assert main(["active-test", *common, "--eps", "0"]) == 2
    assert main(["active-test", *common, "--eps", "16/255", "--n-points", "6", "--attacks", "kfgsm,vote-square"]) == 0
    (path,) = tmp_path.glob("active-full-*-eps16.json")
    res = json.loads(path.read_text())
    assert res["n_points"] == 6 and set(res["attacks"]) == {"native:kfgsm", "native:vote-square"}
    out = capsys.readouterr().out
    assert "native:kfgsm" in out and "results:" in out
