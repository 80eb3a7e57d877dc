"""The gradient-masking audit flags a planted masking case and passes an honest one; CLI, files and plots."""

import json

import pytest
import torch

from robustbench_knn.cli import _model_config, build_parser, main
from robustbench_knn.data import load_cifar10
from robustbench_knn.evaluation.audit import attribution, run_audit
from robustbench_knn.evaluation.audit_checks import verdict
from robustbench_knn.evaluation.checks import Check, exact_zero
from robustbench_knn.paper.classifier import build_classifier
from robustbench_knn.paper.train import train_model
from robustbench_knn.reports.audit_report import audit_model_card, save_audit
from robustbench_knn.reports.plots import figure3_config, figure3_points, plot_eps_curves, plot_figure3
from robustbench_knn.store import state_digest

from .conftest import TINY_SETS

SMALL = dict(standard=("kfgsm", "aa:apgd"), adaptive=("feature", "softknn-apgd", "vote-square"),
             sweep_eps=(0.0, 8 / 255, 64 / 255), steps_factors=(2.0,),
             overrides={"native:feature": {"steps": 20}, "native:softknn-apgd": {"steps": 20},
                        "native:vote-square": {"n_queries": 300}})


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(tiny_data, n=30):
    sub = tiny_data.test.head(n)
    return sub.floats(), sub.y


def _checks(res):
    return {c["name"]: c["verdict"] for c in res["checks"]}


def test_audit_flags_planted_gradient_masking(masked_clf, tiny_data):
    x, y = _batch(tiny_data)
    res = run_audit(masked_clf, x, y, 16 / 255, **SMALL)
    checks = _checks(res)
    assert not res["verdict"]["trusted"] and res["verdict"]["status"] == "NOT TRUSTED"
    assert "cannot be trusted" in res["verdict"]["text"]
    assert checks["adaptive/all vs standard"] == "FAIL"
    assert checks["gradient-free not stronger"] == "FAIL"
    assert checks["zero/non-finite gradients"] == "FAIL"
    assert checks["large ε: standard attack"] == "FAIL" and checks["large ε: worst case"] == "PASS"
    assert res["reported_acc"] == res["clean_acc"] and res["upper_bound_acc"] < res["clean_acc"] - 50
    assert f"{res['upper_bound_acc']:.1f}%" in res["verdict"]["text"]
    # every break is credited to an adaptive attack: the standard ones found none
    firsts = set(res["first_breaker"]) - {"robust", "clean error"}
    assert firsts and not firsts & {"native:kfgsm", "aa:apgd"}


def test_audit_passes_an_honest_model(tiny_clf, tiny_data):
    x, y = _batch(tiny_data)
    res = run_audit(tiny_clf, x, y, 16 / 255, **SMALL)
    checks = _checks(res)
    assert res["verdict"]["trusted"], res["verdict"]["text"]
    assert checks["adaptive/all vs standard"] == "PASS" and checks["zero/non-finite gradients"] == "PASS"
    assert checks["gradient-free not stronger"] == "PASS" and checks["large ε: worst case"] == "PASS"
    worst = torch.tensor(res["worst_case_robust"], dtype=torch.bool)
    assert res["upper_bound_acc"] == pytest.approx(100 * worst.float().mean().item(), abs=0.01)


def _zero_grad_fail_checks(deterministic="PASS"):
    return [Check("zero/non-finite gradients", "FAIL", "max 7.3%", "why", decides=True),
            Check("deterministic", deterministic, "3 calls agree", "why")]


def test_an_exact_zero_needs_no_point_left_and_a_deterministic_decision():
    checks = _zero_grad_fail_checks()
    assert exact_zero([0, 0, 0], checks) and exact_zero(torch.zeros(3, dtype=torch.bool), checks)
    assert not exact_zero([0, 1, 0], checks)
    assert not exact_zero([0, 0, 0], _zero_grad_fail_checks("WARN"))  # a randomised vote: a break may not repeat
    assert exact_zero([0], [{"name": "deterministic", "verdict": "PASS"}])  # checks as read back from a JSON
    unsound = Check("certified points unbroken", "FAIL", "1 broken", "why", decides=True)
    assert not exact_zero([0, 0, 0], [*checks, unsound])  # a certified point broken: the judge itself is in doubt
    assert not exact_zero([0], [])


def test_a_failed_check_cannot_discredit_an_exact_zero():
    """Every check asks whether the standard suite's figure is too high: 0.0% with a valid example for every point
    cannot be. (Planted bugs caught: ``exact`` ignored → NOT TRUSTED; ``exact`` dropping the failures instead of
    naming them → no masking sign.)"""
    v = verdict(_zero_grad_fail_checks(), 0.0, 0.0, 9, ["white-box"], exact=True)
    assert v["status"] == "TRUSTED WITH WARNINGS" and v["trusted"] and v["failed"] == []
    assert v["masking_signs"] == ["zero/non-finite gradients"] and "is exact" in v["text"]
    v = verdict(_zero_grad_fail_checks(), 0.1, 0.0, 9, ["white-box"], exact=False)
    assert v["status"] == "NOT TRUSTED" and v["failed"] == ["zero/non-finite gradients"]


def test_audit_calls_a_standard_suite_that_breaks_every_point_exact(tiny_clf, tiny_data):
    x, y = _batch(tiny_data, 15)
    small = {**SMALL, "adaptive": ("feature",), "standard": ("kfgsm", "aa:apgd"), "sweep_eps": (0.0, 0.5)}
    res = run_audit(tiny_clf, x, y, 0.5, **small)
    assert res["reported_acc"] == 0.0 and "is exact" in res["verdict"]["text"], res["verdict"]["text"]


def test_attribution_first_breaker_in_run_order():
    clean = torch.tensor([True, True, True, False])
    order = [("a", torch.tensor([False, True, True, False])), ("b", torch.tensor([False, False, True, False]))]
    first, table = attribution(order, clean)
    assert first == ["a", "b", "robust", "clean error"]
    rows = {r["attack"]: r for r in table.to_dict("records")}
    assert rows["a"]["breaks"] == 1 and rows["b"]["breaks"] == 2 and rows["b"]["only breaker"] == 1


def test_save_audit_writes_json_csv_and_plots(tiny_clf, tiny_data, tmp_path):
    x, y = _batch(tiny_data, 15)
    small = {**SMALL, "adaptive": ("feature",), "standard": ("kfgsm",)}
    res = run_audit(tiny_clf, x, y, 16 / 255, **small)
    path = save_audit({**res, "model": "tiny", "config_hash": "abc"}, tmp_path)
    assert json.loads(path.read_text())["verdict"]["status"] == res["verdict"]["status"]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"audit-tiny-abc-eps16.csv", "audit-tiny-abc-eps16-attacks.csv", "audit-tiny-abc-eps16-eps.png",
            "audit-tiny-abc-eps16-steps.png"} <= names
    assert "verdict" in (tmp_path / "audit-tiny-abc-eps16.csv").read_text()
    card = json.loads((tmp_path / "audit-tiny-abc-eps16.model-card.json").read_text())
    assert card["eps"] == "16/255"
    # the bound is unreliable only when a check other than "the standard suite was beaten" failed (planted bug
    # caught: a card that calls every NOT TRUSTED bound unreliable, or none)
    survivor = [1] + [0] * (len(res["worst_case_robust"]) - 1)
    for failed, want in ((["adaptive/all vs standard"], False), (["zero/non-finite gradients"], True), ([], False)):
        other = {**res, "verdict": {**res["verdict"], "failed": failed}, "worst_case_robust": survivor}
        assert audit_model_card(other)["unreliable"] is want
    # ... but never on an exact 0.0% bound (planted bug caught: the card ignoring exactness)
    none_left = {**res, "verdict": {**res["verdict"], "failed": ["zero/non-finite gradients"]},
                 "worst_case_robust": [0] * len(survivor)}
    assert audit_model_card(none_left)["unreliable"] is False
    assert float(card["worst_case_robust_acc"]) == res["upper_bound_acc"] and "Audit verdict" in card["footnote"]


def test_audit_draws_certified_bounds_and_catches_a_certified_point_broken(tiny_clf, masked_clf, tiny_data,
                                                                          monkeypatch):
    """The sweep's certified lower curve sits under the worst case at every shared ε; a planted unsound certificate
    (every point certified) contradicts the attacks' breaks and makes the verdict NOT TRUSTED."""
    from robustbench_knn.evaluation import audit as audit_module
    from robustbench_knn.evaluation.certify import CERTIFIED

    x, y = _batch(tiny_data, 15)
    small = {**SMALL, "adaptive": ("feature",), "standard": ("kfgsm",)}
    res = run_audit(tiny_clf, x, y, 16 / 255, **small)
    cert = res["certificate"]
    assert cert["eps"] == pytest.approx([0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 64 / 255])
    lower, upper = dict(res["eps_curves"][CERTIFIED]), dict(res["eps_curves"]["worst case"])
    assert all(lower[e] <= upper[e] for e in upper) and lower[0.0] > 0
    assert _checks(res)["certified points unbroken"] == "PASS" and res["verdict"]["trusted"]
    assert "skipped" in run_audit(masked_clf, x, y, 16 / 255, **small)["certificate"]  # an unknown layer

    def unsound(clf, x, y, eps, norm):
        return {"eps": list(eps), "certified_acc": [100.0] * len(eps), "certified": [[1] * len(x)] * len(eps),
                "method": "planted", "seconds": 0.0}

    monkeypatch.setattr(audit_module, "certified_sweep", unsound)
    res = run_audit(tiny_clf, x, y, 16 / 255, **small)
    assert _checks(res)["certified points unbroken"] == "FAIL" and not res["verdict"]["trusted"]
    assert audit_model_card({**res, "model": "tiny"})["certified_acc"] == "100.00"


def test_audit_cli_quick_end_to_end(tiny_data_dir, cache_dir, tmp_path, capsys):
    common = ["--data-dir", str(tiny_data_dir), "--cache-dir", str(cache_dir), "--quiet",
              *[a for s in TINY_SETS for a in ("--set", s)]]
    rc = main(["audit", "--model", "full", "--eps", "16/255", "--n-test", "20", "--quick", "--out", str(tmp_path),
               *common])
    assert rc == 0
    out = capsys.readouterr().out
    assert "TRUSTED" in out and "native:vote-square" in out and "native:transfer" in out
    res = json.loads(next(tmp_path.glob("audit-*-eps16.json")).read_text())
    assert res["n"] == 20 and res["quick"] and len(res["eps_curves"]["worst case"]) == 5  # 0, 8, 16, 32, 64 /255
    assert list(tmp_path.glob("*.png"))
    # the audit names the weights it judged (the leaderboard keys rows by them)
    cfg = _model_config(build_parser().parse_args(["audit", "--model", "full", *common]))
    trained = train_model(cfg, load_cifar10(tiny_data_dir), device="cpu", cache_dir=cache_dir, progress=False)
    assert res["weights_hash"] == state_digest(build_classifier(trained))


def test_audit_cli_rejects_several_eps(tmp_path, capsys):
    assert main(["audit", "--eps", "8/255,16/255", "--out", str(tmp_path / "o")]) == 2
    assert "one --eps" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_figure3_points_and_plot(tiny_trained, tiny_data, tmp_path):
    pts = figure3_points(tiny_trained.net, 2, tiny_trained.train_split, tiny_data.test, max_train=100)
    assert pts["train"]["points"].shape == (2, 100, 3) and pts["test"]["points"].shape == (2, 100, 3)
    assert len(pts["train"]["labels"]) == 100
    png = plot_figure3(pts, tmp_path / "fig3.png")
    assert png.is_file() and png.stat().st_size > 1000
    cfg = figure3_config()
    assert (cfg.model.n_spaces, cfg.model.d, cfg.train.noise, cfg.name) == (4, 3, False, "fig3")


def test_figure3_cli_on_tiny_data(tiny_data_dir, cache_dir, tmp_path, capsys):
    rc = main(["audit", "--figure3", "--data-dir", str(tiny_data_dir), "--cache-dir", str(cache_dir), "--quiet",
               "--set", "model.w_r=32", "--set", "train.epochs=2", "--set", "train.batch_size=100",
               "--out", str(tmp_path)])
    assert rc == 0 and "Figure 3" in capsys.readouterr().out
    assert len(list(tmp_path.glob("figure3-*.png"))) == 1


def test_eps_plot(tmp_path):
    png = plot_eps_curves({"a": [(0, 90.0), (8 / 255, 40.0)], "worst case": [(0, 90.0), (8 / 255, 30.0)]},
                          tmp_path / "e.png")
    assert png.is_file() and png.stat().st_size > 1000


def test_audit_refuses_the_active_test_on_a_logit_model_before_training(tiny_data_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    rc = main(["audit", "--model", "a", "--eps", "8/255", "--active-test", "5", "--n-test", "10", "--quiet",
               "--data-dir", str(tiny_data_dir), "--cache-dir", str(cache), "--out", str(tmp_path / "o"),
               *[a for s in TINY_SETS for a in ("--set", s)]])
    assert rc == 2 and "logit classifier" in capsys.readouterr().err
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # refused before any model was trained
    assert not (tmp_path / "o").exists()


def test_audit_of_a_config_model_crafts_transfer_on_the_named_source(tiny_data_dir, cache_dir, monkeypatch):
    import robustbench_knn.evaluation.audit as audit_module

    seen = {}

    def record(clf, x, y, eps, **kw):  # the audit's inputs, without running its attacks
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(audit_module, "run_audit", record)
    cfg = _model_config(build_parser().parse_args(["audit", "--model", "a",
                                                   *[a for s in TINY_SETS for a in ("--set", s)]]))
    with pytest.raises(RuntimeError, match="stop"):
        audit_module.audit(cfg, 8 / 255, n_test=10, data_dir=str(tiny_data_dir), cache_dir=str(cache_dir),
                           device="cpu", progress=False, transfer_source="b")
    assert seen["overrides"]["native:transfer"]["source"] == "b"
    assert "transfer" in seen["adaptive"] and not seen["notes"]  # not skipped as row A's own weights


def test_run_audit_refuses_the_active_test_on_a_logit_classifier_before_attacking(tiny_data, monkeypatch):
    import robustbench_knn.evaluation.audit as audit_module
    from robustbench_knn.config import UsageError
    from robustbench_knn.defenses.defense import ModuleClassifier

    def no_attacks(*args, **kw):
        raise AssertionError("attacked before refusing the active test")

    monkeypatch.setattr(audit_module, "run_attacks", no_attacks)
    logits = ModuleClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)))
    x, y = _batch(tiny_data, 10)
    with pytest.raises(UsageError, match="logit classifier"):
        run_audit(logits, x, y, 8 / 255, active_points=5, **SMALL)
