import json
import subprocess
import sys

import pytest

from robustbench_knn.cli import main, parse_eps
from robustbench_knn.config import UsageError

from .conftest import TINY_SETS


def _sets():
    return [a for s in TINY_SETS for a in ("--set", s)]


def test_parse_eps():
    assert parse_eps("8/255,16/255") == pytest.approx([8 / 255, 16 / 255])
    assert parse_eps("0.031") == [0.031]
    for bad in ("8/0", "abc", "-0.1", "2", ""):
        with pytest.raises(UsageError):
            parse_eps(bad)


def test_train_then_evaluate_end_to_end(tiny_data_dir, tmp_path, capsys):
    common = ["--data-dir", str(tiny_data_dir), "--cache-dir", str(tmp_path / "cache"), "--quiet", *_sets()]
    assert main(["train", "--model", "full", *common]) == 0
    out_dir = tmp_path / "out"
    rc = main(["evaluate", "--model", "full", "--attacks", "kfgsm", "--eps", "8/255,0.1", "--n-test", "30",
               "--out", str(out_dir), *common])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "native:kfgsm" in printed and "clean accuracy" in printed
    files = sorted(out_dir.glob("*.json"))  # the results and their RobustBench-style model card
    assert [f.name.endswith(".model-card.json") for f in files] == [False, True]
    assert len(list(out_dir.glob("*.csv"))) == 1
    res = json.loads(files[0].read_text())
    card = json.loads(files[1].read_text())
    assert card["eps"] == "8/255" and card["more_eps"][0]["eps"] == "0.1" and card["n_examples"] == 30
    assert float(card["worst_case_robust_acc"]) == res["per_eps"][0]["worst_case_acc"]
    assert res["n_test"] == 30 and res["n_clean"] == 100 and res["eps"] == pytest.approx([8 / 255, 0.1])
    assert res["dataset_sha256"] and res["config"]["k"] == 5 and "torch" in res["versions"]
    assert res["machine"] and res["command"].startswith("robustbench-knn evaluate --model full")  # and how
    assert len(res["per_eps"][0]["attacks"]["native:kfgsm"]["robust"]) == 30
    assert res["clean_acc_full"] > 80
    # the result names the weights it judged, not only the recipe (another machine trains other weights)
    from robustbench_knn.cli import _model_config, build_parser
    from robustbench_knn.data import load_cifar10
    from robustbench_knn.paper.classifier import build_classifier
    from robustbench_knn.paper.train import train_model
    from robustbench_knn.store import state_digest

    cfg = _model_config(build_parser().parse_args(["evaluate", "--model", "full", *common]))
    trained = train_model(cfg, load_cifar10(tiny_data_dir), device="cpu", cache_dir=tmp_path / "cache", progress=False)
    assert res["weights_hash"] == state_digest(build_classifier(trained))


@pytest.mark.parametrize("args, msg", [
    (["evaluate", "--model", "zzz"], "unknown model"),
    (["evaluate", "--attacks", "kfgsm,nope"], "unknown attack"),
    (["evaluate", "--eps", "8/x"], "malformed eps"),
    (["evaluate", "--eps=-1/255"], "must be in [0, 1]"),
    (["evaluate", "--n-test", "0"], "--n-test"),
    (["evaluate", "--attacks", "kfgsm", "--attack-param", "kfgsm.stepz=3"], "no parameter"),
    (["train", "--set", "train.lr"], "key=value"),
    (["evaluate", "--bogus-flag"], "unrecognized"),
])
def test_bad_input_one_line_exit_2(args, msg, tmp_path, tiny_data_dir):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "robustbench_knn", *args, "--data-dir", str(tiny_data_dir),
                           "--cache-dir", str(tmp_path / "c"), *(["--out", str(out)] if args[0] == "evaluate" else [])],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "c").exists()  # nothing half-written


def test_missing_data_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from robustbench_knn import data

    monkeypatch.setattr(data, "_online", lambda *a, **k: False)
    rc = main(["evaluate", "--data-dir", str(tmp_path / "nothing"), "--cache-dir", str(tmp_path / "c"),
               "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "make_cifar10.py" in err[0]
    assert not (tmp_path / "out").exists()


def test_attacks_lists_registry(capsys):
    assert main(["attacks"]) == 0
    assert "native:kfgsm" in capsys.readouterr().out


def _bad_baseline(tmp_path, text):
    path = tmp_path / "baseline.json"
    path.write_text(text)
    return str(path)


def _a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return str(tmp_path / "afile" / "m.safetensors")


# (command builder, message): each used to crash with a traceback or start a training before checking its input
REFUSED_BEFORE_WORK = {
    "table-set-k-not-int": (lambda t: ["table", "--ablation", "--set", "k=abc"], "k must be an integer"),
    "set-epochs-not-int": (lambda t: ["train", "--set", "train.epochs=abc"], "train.epochs must be an integer"),
    "gate-baseline-not-json": (lambda t: ["gate", "--baseline", _bad_baseline(t, "{not json")], "is not JSON"),
    "gate-baseline-not-a-result": (lambda t: ["gate", "--baseline", _bad_baseline(t, "[1, 2]")], "not a gate result"),
    "evaluate-n-test-above-test-set": (lambda t: ["evaluate", "--n-test", "20000"], "<= 10000"),
    "evaluate-n-clean-above-test-set": (lambda t: ["evaluate", "--n-test", "30", "--n-clean", "10001"], "<= 10000"),
    "audit-eps-0": (lambda t: ["audit", "--eps", "0"], "--eps > 0"),
    "audit-n-test-above-test-set": (lambda t: ["audit", "--n-test", "10001"], "<= 10000"),
    "export-out-in-proc": (lambda t: ["export", "--out", "/proc/x.safetensors"], "cannot be written"),
    "export-out-under-a-file": (lambda t: ["export", "--out", _a_file(t)], "not a folder"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BEFORE_WORK))
def test_bad_input_refused_before_any_training(case, tmp_path, tiny_data_dir, monkeypatch, capsys):
    """One line on stderr, exit 2, no training (the one path every training takes refuses) and nothing written."""
    from robustbench_knn.paper import train as train_mod

    build, msg = REFUSED_BEFORE_WORK[case]
    args = build(tmp_path)
    monkeypatch.setattr(train_mod, "_load_or_train", lambda *a, **k: pytest.fail("trained before checking input"))
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    rc = main([*args, "--data-dir", str(tiny_data_dir), "--cache-dir", str(tmp_path / "c"), "--quiet",
               *([] if "--out" in args or args[0] == "train" else ["--out", str(out)])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache dir, no --out, no probe file left
    assert not (tmp_path / "afile").is_dir()


def test_writable_check_accepts_a_new_folder_and_leaves_nothing(tmp_path):
    from robustbench_knn.cli import check_writable_file

    check_writable_file(str(tmp_path / "new" / "sub" / "m.safetensors"))
    check_writable_file(str(tmp_path / "m.safetensors"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="is a folder"):
        check_writable_file(str(tmp_path))
