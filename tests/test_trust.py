"""A number you can trust by default: per-sample validity, the per-sample worst case across attacks, cache keys
that change with every setting, decision-aligned logits changing a toolkit's result, the cheap checks behind a
card's ``unreliable``, the audit's tolerance and verdict, and transfer sources that differ from the target.
Each test names the planted bug it catches."""

import copy
import json

import pytest
import torch
from torch import nn

from robustbench_knn.attacks import Attack, AttackSpec, get_attack
from robustbench_knn.config import UsageError
from robustbench_knn.defenses.defense import KNNDefense, as_classifier
from robustbench_knn.evaluation import evaluate as ev
from robustbench_knn.evaluation.api import benchmark, resolve_attacks
from robustbench_knn.evaluation.audit_checks import model_checks
from robustbench_knn.evaluation.cards import annotate_reliability
from robustbench_knn.evaluation.checks import binomial_tol
from robustbench_knn.evaluation.evaluate import run_attacks

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 64 / 255  # large: kFGSM breaks most of the tiny model's points


def _batch(tiny_data, n=40):
    sub = tiny_data.test.head(n)
    return sub.floats(), sub.y


class _Strong(Attack):
    """kFGSM at the cell's ε; subclasses keep its examples on some samples only."""

    name = "strong"

    def keep(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bool)

    def perturb(self, x, y):
        x_adv = get_attack("kfgsm").build(self.model, self.eps, steps=10)(x, y)
        k = self.keep(len(x)).view(-1, 1, 1, 1)
        return torch.where(k, x_adv, x)


class _Even(_Strong):
    name = "even"

    def keep(self, n):
        return torch.arange(n) % 2 == 0


class _Odd(_Strong):
    name = "odd"

    def keep(self, n):
        return torch.arange(n) % 2 == 1


class _HalfOutOfBall(_Strong):
    """Valid strong examples on even samples, examples far outside the ball on odd ones."""

    name = "half-cheat"

    def perturb(self, x, y):
        x_adv = super().perturb(x, y)
        odd = (torch.arange(len(x)) % 2 == 1).view(-1, 1, 1, 1)
        return torch.where(odd, (1 - x).clamp(0, 1), x_adv)


def _spec(cls):
    return AttackSpec(cls.name, "test", cls)


def test_an_invalid_example_fails_its_sample_only(tiny_clf, tiny_data):
    # planted bug caught: one invalid example rejecting the whole cell (its valid breaks lost), or an invalid
    # example counted as a break
    x, y = _batch(tiny_data)
    res = run_attacks(tiny_clf, x, y, [_spec(_HalfOutOfBall), _spec(_Strong)], [EPS], progress=False)
    r = res["per_eps"][0]
    cheat, strong = r["attacks"]["test:half-cheat"], r["attacks"]["test:strong"]
    clean = torch.tensor(res["clean_correct"], dtype=torch.bool)
    idx = torch.nonzero(clean).squeeze(1)
    odd = torch.zeros(len(x), dtype=torch.bool)
    odd[idx[1::2]] = True  # odd positions among the attacked points (one batch)
    rob_cheat, rob_strong = (torch.tensor(c["robust"], dtype=torch.bool) for c in (cheat, strong))
    assert cheat["n_invalid"] == int(odd.sum()) > 0 and cheat["violations"]["n_out_of_ball"] == cheat["n_invalid"]
    assert rob_cheat[odd].all()  # its invalid examples are its failures: those samples stay robust for it
    even = clean & ~odd
    assert torch.equal(rob_cheat[even], rob_strong[even])  # its valid examples are judged like any attack's
    assert (~rob_cheat[even]).sum() >= 5  # and its valid breaks count
    assert res["invalid_examples"] and "test:half-cheat" in res["invalid_examples"][0]


def test_worst_case_combines_disjoint_breaks_per_sample(tiny_clf, tiny_data):
    # planted bug caught: the worst case taken as the minimum of the per-attack figures, or only over the cells
    # without invalid examples
    x, y = _batch(tiny_data)
    specs = [_spec(_Even), _spec(_Odd), _spec(_HalfOutOfBall)]
    res = run_attacks(tiny_clf, x, y, specs, [EPS], progress=False)
    r = res["per_eps"][0]
    rob = {k: torch.tensor(c["robust"], dtype=torch.bool) for k, c in r["attacks"].items()}
    clean = torch.tensor(res["clean_correct"], dtype=torch.bool)
    assert not (clean & ~rob["test:even"] & ~rob["test:odd"]).any()  # the two break disjoint sets of points
    want = clean & rob["test:even"] & rob["test:odd"] & rob["test:half-cheat"]
    assert r["worst_case_robust"] == want.int().tolist()
    assert r["worst_case_acc"] < min(c["robust_acc"] for c in r["attacks"].values()) - 10


def _tiny_knn(tiny_clf, **kw):
    opts = dict(k=tiny_clf.k, metric="sum-l2:2", surrogate="softknn", lam=tiny_clf.lam, l0=tiny_clf.l0)
    opts.update(kw)
    return KNNDefense(tiny_clf.net, tiny_clf.bank_labels, bank_embeddings=tiny_clf.bank, **opts)


@pytest.mark.parametrize("change", ["metric", "k", "surrogate", "m", "temperature", "lam", "aligned", "steps",
                                    "seed", "version"])
def test_every_setting_that_changes_an_outcome_is_in_the_cache_key(tiny_clf, tiny_data, tmp_path, monkeypatch,
                                                                    change):
    # planted bug caught: a cell key without the defense's settings or the versions (a fixed bug or another
    # decision rule would be served the old outcome)
    x, y = _batch(tiny_data, 12)
    spec = get_attack("kfgsm")
    base = _tiny_knn(tiny_clf)
    run_attacks(base, x, y, [spec], [8 / 255], overrides={spec.key: {"steps": 2}}, cell_dir=tmp_path,
                progress=False)
    calls = []
    real = ev._attack_cell
    monkeypatch.setattr(ev, "_attack_cell", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_attacks(base, x, y, [spec], [8 / 255], overrides={spec.key: {"steps": 2}}, cell_dir=tmp_path,
                progress=False)
    assert not calls  # unchanged: reused
    clf, steps, seed = base, 2, 0
    if change in ("metric", "k", "lam", "aligned"):
        clf = _tiny_knn(tiny_clf, **{"metric": {"metric": "l2"}, "k": {"k": tiny_clf.k + 2},
                                      "lam": {"lam": tiny_clf.lam * 2}, "aligned": {"aligned": False}}[change])
    elif change == "surrogate":
        clf = _tiny_knn(tiny_clf, surrogate="potential")
    elif change in ("m", "temperature"):
        clf = _tiny_knn(tiny_clf, **{change: 7 if change == "m" else 3.0})
    elif change == "steps":
        steps = 3
    elif change == "seed":
        seed = 1
    else:
        before = ev.versions()
        monkeypatch.setattr(ev, "versions", lambda: {**before, "torchattacks": "99.0"})
    run_attacks(clf, x, y, [spec], [8 / 255], overrides={spec.key: {"steps": steps}}, cell_dir=tmp_path, seed=seed,
                progress=False)
    assert calls, f"changing {change} reused a cached cell"


class _Lifted(nn.Module):
    """A surrogate whose argmax is class 0 almost everywhere (planted disagreement with the vote), gradient
    unchanged."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, emb):
        z = self.inner(emb)
        return z + torch.nn.functional.one_hot(torch.zeros(len(z), dtype=torch.long), z.shape[1]) * 1e3


def test_aligned_logits_change_a_toolkits_result(tiny_clf, tiny_data):
    # planted bug caught: aligned logits not reaching the toolkit (it would stop on every point the lifted
    # surrogate calls class 0 and report them robust)
    x, y = _batch(tiny_data)
    keep = y != 0
    x, y = x[keep], y[keep]
    res = {}
    for aligned in (False, True):
        clf = _tiny_knn(tiny_clf, aligned=aligned)
        clf.surrogate = _Lifted(clf.surrogate)
        res[aligned] = run_attacks(clf, x, y, [get_attack("aa:apgd")], [EPS], progress=False)["per_eps"][0]
    plain, aligned = res[False]["attacks"]["aa:apgd"], res[True]["attacks"]["aa:apgd"]
    assert plain["robust_acc"] == res[False]["clean_acc"]  # AutoAttack never attacked: the surrogate "was wrong"
    assert plain["surrogate_fooled_decision_right"] > 0
    assert aligned["surrogate_fooled_decision_right"] == 0
    assert aligned["robust_acc"] < plain["robust_acc"] - 30


def test_the_audit_checks_the_surrogates_own_agreement_not_the_aligned_logits(tiny_clf, tiny_data):
    # planted bug caught: the audit comparing the aligned forward with the vote (100% by construction, so a
    # surrogate that disagrees with the vote everywhere passed)
    x, y = _batch(tiny_data)
    x = x[y != 0]
    clf = _tiny_knn(tiny_clf, aligned=True)
    clf.surrogate = _Lifted(clf.surrogate)
    with torch.no_grad():
        assert torch.equal(clf(x).argmax(1), clf.predict(x))  # aligned: what the old check compared
    check = next(c for c in model_checks(clf, x) if c.name == "surrogate agrees with decision")
    assert check.verdict == "WARN", check.numbers


class _Rounded(nn.Module):
    """Raw pixels quantised to 8 levels: zero gradient almost everywhere (the issue's masked defense)."""

    def forward(self, x):
        return (torch.round(x * 7) / 7).flatten(1)


def test_default_benchmark_does_not_call_a_masked_defense_robust(hard_data, tmp_path):
    # planted bugs caught: a default suite of surrogate-guided attacks only (worst case = clean), adaptive
    # attacks' zero gradients not counted, or a card with "unreliable": null where checks ran
    defense = KNNDefense(_Rounded(), hard_data.train.y, bank_images=hard_data.train.x, k=1)
    res = benchmark(defense, n_examples=30, eps=16 / 255, data_dir=str(hard_data.root), device="cpu", out=tmp_path,
                    name="masked", progress=False, resume=False)
    cells = res.raw["per_eps"][0]["attacks"]
    assert "native:vote-square" in cells and "native:softknn-apgd" in cells
    assert cells["native:softknn-apgd"]["zero_or_nonfinite_grad_frac"] > 0.5
    assert res.robust_acc <= res.per_attack["native:vote-square"] < res.clean_acc
    card = json.loads((tmp_path / "masked.model-card.json").read_text())
    if res.robust_acc == 0.0:  # every point broken by a valid example of a deterministic decision: exact
        assert card["unreliable"] is False and "is exact" in card["footnote"]
        assert "masking signs: zero/non-finite gradients" in card["footnote"]
    else:
        assert card["unreliable"] is True and "zero/non-finite gradients FAIL" in card["footnote"]
    # the same cells without the gradient-free attack: the worst case is the clean accuracy, and the card must say
    # it cannot be trusted
    raw = copy.deepcopy(res.raw)
    r = raw["per_eps"][0]
    del r["attacks"]["native:vote-square"]
    r["worst_case_acc"], r["worst_case_robust"] = res.clean_acc, raw["clean_correct"]
    annotate_reliability(raw, as_classifier(defense), hard_data.test.head(8).floats(), None)
    assert r["worst_case_acc"] == 100.0 and r["unreliable"] is True
    assert "zero/non-finite gradients FAIL" in r["footnote"] and "UNRELIABLE" in r["footnote"]


def test_default_suite_depends_on_the_model(tiny_clf):
    assert {s.key for s in resolve_attacks("default", tiny_clf)} == {
        "native:feature", "native:softknn-apgd", "native:softknn-apgd-dlr", "native:vote-square"}
    assert [s.key for s in resolve_attacks("default", nn.Linear(3, 10))] == ["aa:autoattack"]


def test_binomial_tolerance():
    # 1.9% against 0.0% on 1000 points is a real difference; on 100 points it is within the noise
    assert 1.9 > 0.0 + binomial_tol(1.9, 1000)
    assert 1.9 < 0.0 + binomial_tol(1.9, 100)
    assert binomial_tol(0.0, 1000) == pytest.approx(0.1)  # at least one point's worth


def test_transfer_refuses_a_source_sharing_the_targets_weights(tiny_clf, tiny_data):
    # planted bug caught: the source compared by config hash only (a deep k-NN on row A's own backbone would be
    # "transferred to" from itself)
    from robustbench_knn.attacks.transfer import shared_weights, transfer_sources

    assert shared_weights(tiny_clf, tiny_clf) is not None
    other = _tiny_knn(tiny_clf)
    other.net = type(tiny_clf.net)(tiny_clf.net.cfg)  # fresh weights, same architecture
    assert shared_weights(other, tiny_clf) is None
    with transfer_sources(lambda name, seed, target: tiny_clf):
        with pytest.raises(UsageError, match="shares weights"):
            get_attack("transfer").build(tiny_clf, 8 / 255)


def test_a_card_with_an_audit_is_unreliable_when_the_audit_broke_more():
    # planted bug caught: a card that ignores the audit's bound (or compares it on other images)
    from robustbench_knn.evaluation.checks import Check, reliability

    ok = [Check("valid examples", "PASS", "", "")]
    audit = {"status": "NOT TRUSTED", "text": "…", "upper_bound_acc": 4.0, "n": 1000}
    assert reliability(ok, audit, 4.5, 1000)[0] is False  # within the tolerance of the bound
    unreliable, text = reliability(ok, audit, 10.3, 1000)
    assert unreliable and "matches the audit's bound FAIL" in text and "Masking audit" in text
    assert reliability(ok, audit, 10.3, 500)[0] is False  # other images: no comparison, the cheap checks decide
    assert reliability([Check("zero/non-finite gradients", "FAIL", "", "")], None)[0] is True


def test_a_card_with_an_exact_zero_is_not_unreliable():
    # planted bugs caught: a card that ignores exactness, or calls a 0.0% exact without a deterministic decision
    from robustbench_knn.evaluation.checks import Check, reliability

    grads = Check("zero/non-finite gradients", "FAIL", "max 7%", "")
    det = Check("deterministic", "PASS", "3 calls agree", "")
    unreliable, text = reliability([grads, det], None, 0.0, 3, robust=[0, 0, 0])
    assert unreliable is False and "is exact" in text and "zero/non-finite gradients" in text
    assert reliability([grads, det], None, 33.3, 3, robust=[0, 1, 0])[0] is True
    assert reliability([grads, Check("deterministic", "WARN", "3 calls DIFFER", "")], None, 0.0, 3,
                       robust=[0, 0, 0])[0] is True


class _Flip(nn.Module):
    """A decision that changes between calls: the tiny model's vote, shifted by one class on every second call."""

    def __init__(self, clf):
        super().__init__()
        self.clf, self.device, self.calls = clf, clf.device, 0

    def forward(self, x):
        return self.clf(x)

    def predict(self, x):
        self.calls += 1
        return (self.clf.predict(x) + self.calls % 2) % 10


def test_the_cheap_checks_catch_a_randomised_decision(tiny_clf, tiny_data):
    # planted bug caught: cheap checks without AutoAttack's check_randomized
    from robustbench_knn.evaluation.checks import cheap_checks

    x, _ = _batch(tiny_data, 20)
    checks = {c.name: c.verdict for c in cheap_checks(tiny_clf, {}, {}, 20, x)}
    assert checks["deterministic"] == "PASS"
    checks = {c.name: c.verdict for c in cheap_checks(_Flip(tiny_clf), {}, {}, 20, x)}
    assert checks["deterministic"] == "WARN"


def test_cascade_gives_the_same_worst_case_on_fewer_points(tiny_clf, tiny_data):
    # planted bugs caught: survivors never narrowed (every attack on every point), or a later attack's breaks
    # dropped from the worst case
    x, y = _batch(tiny_data)
    specs = [_spec(_Even), _spec(_Odd), get_attack("kfgsm")]
    full = run_attacks(tiny_clf, x, y, specs, [EPS], progress=False)["per_eps"][0]
    cas = run_attacks(tiny_clf, x, y, specs, [EPS], progress=False, cascade=True)["per_eps"][0]
    assert cas["worst_case_robust"] == full["worst_case_robust"]
    n = [cas["attacks"][s.key]["n_attacked"] for s in specs]
    assert n[0] == full["attacks"]["test:even"]["n_attacked"] and n[1] < n[0] and n[2] < n[1]
    accs = [cas["attacks"][s.key]["robust_acc"] for s in specs]
    assert accs == sorted(accs, reverse=True) and accs[-1] == cas["worst_case_acc"]  # cumulative
    assert all(cas["attacks"][s.key].get("on_survivors") for s in specs)
