"""--model MODULE:FUNCTION and FILE.safetensors (export round trip); every bad form is exit 2, one line, no files."""

import json

import pytest
import torch

from robustbench_knn.cli import main
from robustbench_knn.defenses.loading import load_exported
from robustbench_knn.paper.classifier import build_classifier
from robustbench_knn.paper.train import train_model
from robustbench_knn.reports.tables import row_config

from .conftest import REPO, TINY_SETS, USER_MODULE


@pytest.fixture
def user_dir(tmp_path, monkeypatch, tiny_data_dir):
    (tmp_path / "mydefense.py").write_text(USER_MODULE)
    (tmp_path / "broken.py").write_text("raise RuntimeError('missing weights file')\n")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USER_DATA", str(tiny_data_dir))
    monkeypatch.setenv("ROBUSTBENCH_KNN_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _evaluate(model, tiny_data_dir, out, *extra):
    return main(["evaluate", "--model", model, "--attacks", "kfgsm", "--eps", "8/255", "--n-test", "12",
                 "--data-dir", str(tiny_data_dir), "--device", "cpu", "--out", str(out), "--quiet", *extra])


def test_user_function_through_the_cli(user_dir, tiny_data_dir):
    assert _evaluate("mydefense:make", tiny_data_dir, user_dir / "out", "--attacks", "kfgsm,feature") == 0
    (path,) = (user_dir / "out").glob("evaluate-make-*-softknn.json")
    res = json.loads(path.read_text())
    assert res["model"] == "make" and res["attacks"] == ["native:kfgsm", "native:feature"]
    card = json.loads(path.with_suffix("").with_name(path.stem + ".model-card.json").read_text())
    assert card["threat_model"] == "Linf" and card["n_examples"] == 12
    assert float(card["worst_case_robust_acc"]) == res["per_eps"][0]["worst_case_acc"]
    # its cells are cached by the defense's weights: a rerun (or a killed run) reuses them
    (cells,) = (user_dir / "cache" / "defenses").glob("*/cells/k5-softknn-*")
    assert len(list(cells.glob("*.json"))) == 2
    assert _evaluate("mydefense:make", tiny_data_dir, user_dir / "out", "--attacks", "kfgsm,feature") == 0
    assert json.loads(path.read_text())["per_eps"] == res["per_eps"]
    assert _evaluate("mydefense:plain", tiny_data_dir, user_dir / "out2") == 0  # a plain logit module


@pytest.mark.parametrize("model, msg", [
    ("nosuchmodule:make", "no module 'nosuchmodule'"),
    ("mydefense:missing", "has no function 'missing'"),
    ("broken:make", "importing broken raised RuntimeError: missing weights file"),
    ("mydefense:not_a_model", "returned a int"),
    ("nowhere.safetensors", "no such file"),
    ("garbage.safetensors", "not a robustbench-knn export"),
    ("mydefense:", "PACKAGE.MODULE:FUNCTION"),
])
def test_bad_model_forms_exit_2_with_one_line(user_dir, tiny_data_dir, capsys, model, msg):
    assert _evaluate(model, tiny_data_dir, user_dir / "out") == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not (user_dir / "out").exists()


def test_adaptive_attacks_on_a_plain_module_refused_before_work(user_dir, tiny_data_dir, capsys):
    assert _evaluate("mydefense:plain", tiny_data_dir, user_dir / "out", "--attacks", "feature") == 2
    assert "k-NN vote" in capsys.readouterr().err and not (user_dir / "out").exists()


@pytest.mark.parametrize("param, msg", [("kfgsm.steps=-3", "integer >= 1"), ("kfgsm.step_ratio=0", "number > 0"),
                                        ("feature.target=far", "nearest, mean"), ("transfer.source=zz", "one of")])
def test_bad_attack_values_rejected_before_training(tmp_path, tiny_data_dir, capsys, param, msg):
    attack = param.split(".")[0]
    rc = main(["evaluate", "--model", "full", "--attacks", attack, "--attack-param", param,
               "--data-dir", str(tiny_data_dir), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    assert rc == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()  # nothing trained, nothing written


def test_export_round_trip_gives_identical_decisions(tmp_path, tiny_data, tiny_data_dir, cache_dir):
    f = tmp_path / "tiny.safetensors"
    rc = main(["export", "--model", "full", *(x for s in TINY_SETS for x in ("--set", s)), "--data-dir",
               str(tiny_data_dir), "--cache-dir", str(cache_dir), "--device", "cpu", "--quiet", "--out", str(f)])
    assert rc == 0 and f.is_file()
    cfg = row_config("full", sets=TINY_SETS)
    original = build_classifier(train_model(cfg, tiny_data, device="cpu", cache_dir=cache_dir, progress=False))
    loaded, loaded_cfg = load_exported(f)
    x = tiny_data.test.floats()
    assert loaded_cfg == cfg and torch.equal(loaded.predict(x), original.predict(x))
    assert torch.equal(loaded(x), original(x))  # the surrogate logits too
    assert _evaluate(str(f), tiny_data_dir, tmp_path / "out") == 0
    assert list((tmp_path / "out").glob("evaluate-tiny-*-potential.model-card.json"))


def test_toolkits_and_audit_take_a_user_function(user_dir, tiny_data_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    common = ["--model", "mydefense:make", "--eps", "8/255", "--n-test", "12", "--data-dir", str(tiny_data_dir),
              "--device", "cpu", "--quiet", "--cache-dir", str(cache)]
    assert main(["toolkits", *common, "--attacks", "kfgsm,pgd", "--out", str(user_dir / "tk")]) == 0
    res = json.loads((user_dir / "tk" / "toolkits.json").read_text())
    # no loss constants in the user's defense: the potential surrogate is left out, softknn runs
    assert res["model"] == "make" and res["surrogates"] == ["softknn"]
    assert {(c["attack"], c["toolkit"]) for c in res["cells"]} == {("kfgsm", "native"), ("pgd", "ta"), ("pgd", "art")}
    assert main(["audit", *common, "--quick", "--out", str(user_dir / "au")]) == 0
    (path,) = (user_dir / "au").glob("audit-make-*-eps8.json")
    audit = json.loads(path.read_text())
    assert audit["verdict"]["text"] and "native:feature" in audit["robust_acc"]
    # a user's defense caches its cells too (keyed by its weights and bank): a rerun recomputes nothing
    assert list(cache.glob("defenses/*/cells/*/native_feature-*.json"))

    def boom(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr("robustbench_knn.evaluation.evaluate._attack_cell", boom)
    assert main(["audit", *common, "--quick", "--out", str(user_dir / "au2")]) == 0
    assert main(["toolkits", *common, "--attacks", "kfgsm,pgd", "--out", str(user_dir / "tk2")]) == 0


def test_toolkits_run_on_aligned_logits_unless_turned_off(tmp_path, tiny_data_dir, cache_dir):
    # planted bug caught: the default left unaligned (the first file would be "-unaligned" / aligned false), or
    # --unaligned not reaching the model
    common = ["--model", "full", *(x for s in TINY_SETS for x in ("--set", s)), "--attacks", "aa:apgd",
              "--eps", "16/255", "--n-test", "20", "--data-dir", str(tiny_data_dir), "--cache-dir", str(cache_dir),
              "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    assert main(["evaluate", *common]) == 0
    (path,) = tmp_path.glob("evaluate-full-*-potential.json")
    assert json.loads(path.read_text())["aligned"] is True
    assert main(["evaluate", *common, "--unaligned"]) == 0
    (path,) = tmp_path.glob("evaluate-full-*-potential-unaligned.json")
    assert json.loads(path.read_text())["aligned"] is False


def test_gate_takes_a_user_function(user_dir, tiny_data, tiny_data_dir, capsys):
    from robustbench_knn.defenses.loading import resolve_model
    from robustbench_knn.evaluation.gate import GateConfig, compare, run_gate

    # the committed baseline is FULL's: comparing a user's model with it is refused before any work
    assert main(["gate", "--model", "mydefense:make", "--data-dir", str(tiny_data_dir), "--baseline",
                 str(REPO / "tables" / "gate_baseline.json")]) == 2
    assert "baseline is for model 'full'" in capsys.readouterr().err
    clf, _, _ = resolve_model("mydefense:make")
    gcfg = GateConfig(n_train=400, epochs=2, batch_size=100, k=5, n_test=30, model="mydefense:make",
                      config_overrides={"model": {"w_r": 32, "d": 3}})
    current = run_gate(gcfg, tiny_data, device="cpu", model=clf)
    assert current["settings"]["model"] == "mydefense:make" and set(current) >= {"model", "reference"}
    assert current["model"]["clean_acc"] == pytest.approx(
        100 * (clf.predict(tiny_data.test.head(30).floats()) == tiny_data.test.head(30).y).float().mean().item(),
        abs=0.01)
    worse = json.loads(json.dumps(current))
    worse["model"]["clean_acc"] -= 20  # planted regression: the gate must name it
    assert compare(current, worse, gcfg.tol_acc, gcfg.tol_points)  # baseline first, then the current run
