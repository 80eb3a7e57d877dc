import pytest
import torch

from robustbench_knn.attacks import Attack, AttackSpec, get_attack, parse_attack_list
from robustbench_knn.config import UsageError
from robustbench_knn.evaluation.evaluate import check_adversarial, run_attacks


def _test_batch(tiny_data, n=40):
    sub = tiny_data.test.head(n)
    return sub.floats(), sub.y


def test_tiny_model_learns(tiny_clf, tiny_data):
    x, y = _test_batch(tiny_data, 100)
    assert (tiny_clf.predict(x) == y).float().mean() > 0.8


def test_surrogate_argmax_agrees_with_knn(tiny_clf, tiny_data):
    x, _ = _test_batch(tiny_data, 100)
    with torch.no_grad():
        agree = (tiny_clf(x).argmax(1) == tiny_clf.predict(x)).float().mean()
    assert agree >= 0.8


@pytest.mark.parametrize("eps", [2 / 255, 8 / 255])
def test_kfgsm_stays_in_ball_and_raises_loss(tiny_clf, tiny_data, eps):
    x, y = _test_batch(tiny_data)
    x_adv = get_attack("kfgsm").build(tiny_clf, eps)(x, y)
    rep = check_adversarial(x, x_adv, eps)
    assert rep.ok and rep.max_linf <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        before, after = tiny_clf.attack_objective(x, y), tiny_clf.attack_objective(x_adv, y)
    assert (after >= before - 1e-6).float().mean() > 0.9 and after.mean() > before.mean()


def test_kfgsm_large_eps_breaks_tiny_model(tiny_clf, tiny_data):
    x, y = _test_batch(tiny_data)
    res = run_attacks(tiny_clf, x, y, [get_attack("kfgsm")], [0.0, 64 / 255], progress=False)
    clean, big = res["per_eps"][0], res["per_eps"][1]
    assert clean["attacks"]["native:kfgsm"]["robust_acc"] == clean["clean_acc"]  # ε = 0 changes nothing
    assert big["attacks"]["native:kfgsm"]["robust_acc"] < clean["clean_acc"] - 30


class _OutOfBall(Attack):
    name = "cheat"

    def perturb(self, x, y):
        return (x + 3 * self.eps).clamp(0, 1)


class _NaN(Attack):
    name = "nan"

    def perturb(self, x, y):
        out = x.clone()
        out[0, 0, 0, 0] = float("nan")
        return out


def test_invalid_examples_are_counted_not_clipped(tiny_clf, tiny_data):
    # planted bug caught: clipping examples into the ball (the counts would be 0) or judging them (the
    # out-of-ball examples break points; counted as the attack's failures they must leave every point robust)
    x, y = _test_batch(tiny_data, 20)
    specs = [AttackSpec("cheat", "test", _OutOfBall), AttackSpec("nan", "test", _NaN), get_attack("kfgsm")]
    res = run_attacks(tiny_clf, x, y, specs, [8 / 255], progress=False)
    r = res["per_eps"][0]
    atk = r["attacks"]
    n_attacked = atk["test:cheat"]["n_attacked"]
    assert atk["test:cheat"]["n_invalid"] == atk["test:cheat"]["violations"]["n_out_of_ball"] == n_attacked
    assert atk["test:cheat"]["robust_acc"] == r["clean_acc"]
    assert atk["test:nan"]["n_invalid"] == atk["test:nan"]["violations"]["n_nonfinite"] == 1
    assert atk["native:kfgsm"]["n_invalid"] == 0
    assert len(res["invalid_examples"]) == 2


def test_zero_gradient_is_counted(tiny_clf, tiny_data):
    """Points far from every bank point make e^{-λD} underflow: the paper's loss has zero gradient there."""
    x, y = _test_batch(tiny_data, 10)

    from robustbench_knn.paper.classifier import KNNClassifier

    from .conftest import Scaled

    far = KNNClassifier(Scaled(tiny_clf.net), tiny_clf.bank, tiny_clf.bank_labels, tiny_clf.cfg)
    res = run_attacks(far, x, y, [get_attack("kfgsm")], [8 / 255], progress=False)
    assert res["per_eps"][0]["attacks"]["native:kfgsm"]["zero_or_nonfinite_grad_frac"] == 1.0
    res = run_attacks(tiny_clf, x, y, [get_attack("kfgsm")], [8 / 255], progress=False)
    assert res["per_eps"][0]["attacks"]["native:kfgsm"]["zero_or_nonfinite_grad_frac"] < 1.0


def test_registry_names_and_errors():
    assert get_attack("kfgsm").key == get_attack("native:kfgsm").key == "native:kfgsm"
    with pytest.raises(UsageError):
        get_attack("nope")
    with pytest.raises(UsageError):
        parse_attack_list(" , ")
    with pytest.raises(UsageError):
        get_attack("kfgsm").build(None, 0.1, stepz=3)


def test_surrogate_only_successes_are_counted(tiny_clf, tiny_data):
    """An attack whose examples fool the surrogate logits but not the k-NN vote is counted as such."""
    x, y = _test_batch(tiny_data, 20)

    class Liar(torch.nn.Module):  # surrogate logits never agree with the vote; the vote is untouched
        n_classes = 10

        def __init__(self, clf):
            super().__init__()
            self.clf = clf

        def forward(self, z):
            return torch.nn.functional.one_hot((self.clf.predict(z) + 1) % 10, 10).float()

        def predict(self, z, batch_size=500):
            return self.clf.predict(z)

        @property
        def device(self):
            return self.clf.device

    res = run_attacks(Liar(tiny_clf), x, y, [AttackSpec("noop", "test", _Noop)], [8 / 255], progress=False)
    cell = res["per_eps"][0]["attacks"]["test:noop"]
    assert cell["surrogate_fooled_decision_right"] == sum(res["clean_correct"]) == round(cell["robust_acc"] * 20 / 100)
    res = run_attacks(tiny_clf, x, y, [AttackSpec("noop", "test", _Noop)], [8 / 255], progress=False)
    assert res["per_eps"][0]["attacks"]["test:noop"]["surrogate_fooled_decision_right"] <= 2


class _Noop(Attack):
    name = "noop"
    gradient_source = None

    def perturb(self, x, y):
        return x.clone()


@pytest.fixture(scope="module")
def image_norm_clf(tiny_data, cache_dir):
    """The tiny model under FULL's default recipe (per-image standardisation, regulariser ÷B²)."""
    from robustbench_knn.paper.classifier import build_classifier
    from robustbench_knn.paper.train import train_model

    from .conftest import TINY_CFG

    cfg = TINY_CFG.replace(name="tiny-image", model={"normalization": "image"}, loss={"reg_reduction": "mean2"})
    return build_classifier(train_model(cfg, tiny_data, device="cpu", cache_dir=cache_dir, progress=False))


@pytest.mark.parametrize("key", ["kfgsm", "ta:pgd", "aa:apgd"])
def test_attacks_on_per_image_normalised_model_stay_in_the_pixel_ball(key, image_norm_clf, tiny_data):
    x, y = _test_batch(tiny_data)
    assert (image_norm_clf.predict(x) == y).float().mean() > 0.8  # it learned the tiny task
    eps = 8 / 255
    spec = get_attack(key)
    x_adv = spec.build(image_norm_clf, eps, **{k: 5 for k in ("steps",) if k in spec.defaults})(x, y)
    rep = check_adversarial(x, x_adv, eps)  # ε in pixel units: the normalisation is inside the model
    assert rep.ok and rep.max_linf <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    res = run_attacks(image_norm_clf, x, y, [get_attack("kfgsm")], [64 / 255], progress=False)
    assert res["per_eps"][0]["attacks"]["native:kfgsm"]["robust_acc"] < 50  # and it is still attackable
