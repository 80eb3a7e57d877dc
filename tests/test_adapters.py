"""Every toolkit attack runs through its adapter; toolkits agree on an undefended model; surrogates have gradients."""

import pytest
import torch

from robustbench_knn.attacks import REGISTRY, get_attack
from robustbench_knn.attacks.transfer import transfer_sources
from robustbench_knn.evaluation.evaluate import bad_gradient_mask, check_adversarial, run_attacks
from robustbench_knn.paper.classifier import build_classifier
from robustbench_knn.paper.train import train_model

from .conftest import TINY_CFG

# cheap settings so every attack runs in seconds on the tiny model (the defaults are the published ones)
CHEAP = {"steps": 5, "n_queries": 30}


def _other_model():
    """A random linear classifier: a transfer source that shares no weights with the attacked model."""
    from robustbench_knn.defenses.defense import ModuleClassifier

    torch.manual_seed(0)
    return ModuleClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)))


def _cheap(spec):
    return {k: v for k, v in CHEAP.items() if k in spec.defaults}


@pytest.mark.parametrize("key", sorted(REGISTRY))
def test_every_registered_attack_returns_valid_examples(key, tiny_clf, tiny_data):
    spec = REGISTRY[key]
    sub = tiny_data.test.head(12)
    x, y = sub.floats(), sub.y
    eps = 8 / 255
    with transfer_sources(lambda name, seed, target: _other_model()):  # transfer: any other model will do
        x_adv = spec.build(tiny_clf, eps, **_cheap(spec))(x, y)
    rep = check_adversarial(x, x_adv, eps)
    assert rep.ok, (key, rep)
    pred = tiny_clf.predict(x_adv)
    assert pred.shape == y.shape


@pytest.fixture(scope="module")
def tiny_mlp(hard_data, cache_dir):
    cfg = TINY_CFG.replace(name="tiny-a", model={"head": "logits", "identity_init": False, "share_dec": False},
                           train={"epochs": 20, "noise": False})
    return build_classifier(train_model(cfg, hard_data, device="cpu", cache_dir=cache_dir, progress=False))


@pytest.mark.parametrize("pair", [("ta:pgd", "art:pgd"), ("ta:apgd", "aa:apgd")])
def test_same_attack_through_two_toolkits_agrees_on_undefended_mlp(pair, tiny_mlp, hard_data):
    sub = hard_data.test
    specs = [get_attack(k) for k in pair]
    res = run_attacks(tiny_mlp, sub.floats(), sub.y, specs, [8 / 255], progress=False)
    r = res["per_eps"][0]
    a, b = (r["attacks"][k]["robust_acc"] for k in pair)
    assert r["clean_acc"] > 80
    assert a < r["clean_acc"] - 20  # the attack does something here
    assert abs(a - b) <= 8, (pair, a, b)


@pytest.mark.parametrize("surrogate", ["potential", "softknn"])
def test_surrogates_have_nonzero_input_gradients(surrogate, tiny_trained, tiny_data):
    clf = build_classifier(tiny_trained, surrogate)
    sub = tiny_data.test.head(30)
    logits = clf(sub.floats())
    assert logits.shape == (30, 10) and torch.isfinite(logits).all()
    bad = bad_gradient_mask(clf, get_attack("ta:pgd").build(clf, 0.03), sub.floats(), sub.y)
    assert bad.float().mean() < 0.1


def test_softknn_logits_are_log_space_and_agree_with_knn(tiny_trained, tiny_data):
    clf = build_classifier(tiny_trained, "softknn", m=5, temperature=0.1)
    x = tiny_data.test.floats()
    with torch.no_grad():
        agree = (clf(x).argmax(1) == clf.predict(x)).float().mean()
    assert agree > 0.8
    far = build_classifier(tiny_trained, "softknn", m=5, temperature=1e-3)  # would underflow outside log-space
    assert torch.isfinite(far(x[:5])).all()


def test_torchattacks_autoattack_uses_the_published_standard_settings(tiny_clf):
    """torchattacks.AutoAttack ships 10-step APGD/APGD-T/FAB; AutoAttack's standard is 100 iterations."""
    import torchattacks as ta

    atk = get_attack("ta:autoattack").build(tiny_clf, 8 / 255).atk
    kinds = [type(a) for a in atk.attacks]
    assert kinds == [ta.APGD, ta.APGDT, ta.FAB, ta.Square]
    assert [a.steps for a in atk.attacks[:3]] == [100, 100, 100]
    assert atk.attacks[0].loss == "ce" and atk.attacks[2].multi_targeted and atk.attacks[3].n_queries == 5000
    assert all(a.eps == 8 / 255 for a in atk.attacks)


def test_art_points_with_non_finite_values_keep_their_clean_image(tiny_clf):
    """ART's ℓ2 Square can divide by a zero window norm and return NaN for a point; such a point is not broken."""
    from robustbench_knn.adapters import art_adapter

    class NaNOnSecond:
        def generate(self, x, y):
            out = x.copy() + 0.01
            out[1, 0, 0, 0] = float("nan")
            return out

    atk = art_adapter.ARTAttack(tiny_clf, 0.5, build=lambda *a, **k: NaNOnSecond(), seed=0)
    x, y = torch.rand(3, 3, 32, 32), torch.zeros(3, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="1 of 3 points"):
        x_adv = atk(x, y)
    assert torch.equal(x_adv[1], x[1]) and torch.isfinite(x_adv).all()
    torch.testing.assert_close(x_adv[[0, 2]], x[[0, 2]] + 0.01)
