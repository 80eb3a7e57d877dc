"""Planted regressions make the gate fail; an unchanged run passes."""

import copy

import pytest

from robustbench_knn.cli import main
from robustbench_knn.evaluation.gate import GateConfig, compare, planted, run_gate

# the gate's machinery on tiny low-contrast data (no training noise, so the tiny k-NN learns something)
TINY_GATE = GateConfig(n_train=400, epochs=30, batch_size=100, k=5, n_test=100, attacks=("kfgsm", "ta:apgd"),
                       attack_overrides={"ta:apgd": {"steps": 20}},
                       config_overrides={"model": {"w_r": 32, "d": 3}, "train": {"lr": 1e-3, "noise": False}})
TOL, TOL_POINTS = TINY_GATE.tol_acc, TINY_GATE.tol_points


@pytest.fixture(scope="module")
def gate_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gatecache")


@pytest.fixture(scope="module")
def baseline(hard_data, gate_cache):
    res = run_gate(TINY_GATE, hard_data, device="cpu", cache_dir=gate_cache)
    assert res["reference"]["attacks"]["native:kfgsm"]["broken"]  # the reference is breakable
    assert res["model"]["clean_acc"] > 20
    return res


def test_unchanged_run_passes(baseline, hard_data, gate_cache):
    again = run_gate(TINY_GATE, hard_data, device="cpu", cache_dir=gate_cache)
    assert compare(baseline, again, TOL, TOL_POINTS) == []


@pytest.mark.parametrize("plant", ["perturbed-model", "one-epoch-model"])
def test_degraded_model_trips_check_1(plant, baseline, hard_data, gate_cache):
    g, noise = planted(TINY_GATE, plant)
    findings = compare(baseline, run_gate(g, hard_data, device="cpu", cache_dir=gate_cache, perturb_model=noise),
                       TOL, TOL_POINTS)
    assert findings and any(f.check == "model regression" for f in findings)
    if plant == "perturbed-model":  # same attacks, same reference: only check 1 can fire
        assert {f.check for f in findings} == {"model regression"}


@pytest.mark.parametrize("plant", ["attack-1-step", "attack-step-div100"])
def test_weakened_attack_trips_check_2(plant, baseline, hard_data, gate_cache):
    g, noise = planted(TINY_GATE, plant)
    assert g.attack_overrides["ta:apgd"] == {"steps": 20}  # the gate's own overrides are kept
    findings = compare(baseline, run_gate(g, hard_data, device="cpu", cache_dir=gate_cache, perturb_model=noise),
                       TOL, TOL_POINTS)
    assert findings and all(f.check == "evaluation regression" for f in findings)
    assert any("native:kfgsm" in f.what for f in findings)


def test_compare_flags_missing_breaks_only_beyond_tolerance(baseline):
    cur = copy.deepcopy(baseline)
    atk = cur["reference"]["attacks"]["native:kfgsm"]
    broken = list(atk["broken"])
    assert len(broken) > TOL_POINTS + 1
    # points broken in the baseline that now survive the attack: lost breaks
    atk["broken"], atk["robust"] = broken[TOL_POINTS:], atk["robust"] + broken[:TOL_POINTS]  # exactly the tolerance
    assert compare(baseline, cur, TOL, TOL_POINTS) == []
    atk["broken"], atk["robust"] = broken[TOL_POINTS + 1:], atk["robust"] + broken[TOL_POINTS:TOL_POINTS + 1]
    assert [f.check for f in compare(baseline, cur, TOL, TOL_POINTS)] == ["evaluation regression"]
    # points that are now misclassified clean (a moved reference) are not lost breaks
    cur = copy.deepcopy(baseline)
    cur["reference"]["attacks"]["native:kfgsm"]["broken"] = []
    assert compare(baseline, cur, TOL, TOL_POINTS) == []


def test_cli_gate_needs_a_message_and_a_baseline(tmp_path, capsys):
    assert main(["gate", "--update-baseline", "--baseline", str(tmp_path / "b.json")]) == 2
    assert main(["gate", "--baseline", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "--message" in err and "no gate baseline" in err
    assert main(["gate", "--plant", "nope", "--baseline", "tables/gate_baseline.json"]) == 2
