"""The cross-toolkit table: cells are cached and resumed, the worst case is per sample across every cell."""

import json

import pytest
import torch

from robustbench_knn.attacks import get_attack
from robustbench_knn.cli import main
from robustbench_knn.evaluation import toolkit_compare
from robustbench_knn.evaluation.evaluate import run_attacks

from .conftest import TINY_SETS


def test_cells_are_cached_and_reused(tiny_clf, tiny_data, tmp_path, monkeypatch):
    sub = tiny_data.test.head(30)
    specs = [get_attack("kfgsm")]
    first = run_attacks(tiny_clf, sub.floats(), sub.y, specs, [8 / 255, 32 / 255], progress=False,
                        cell_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2

    def boom(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr("robustbench_knn.evaluation.evaluate._attack_cell", boom)
    again = run_attacks(tiny_clf, sub.floats(), sub.y, specs, [8 / 255, 32 / 255], progress=False, cell_dir=tmp_path)
    assert again["per_eps"] == first["per_eps"]
    # other parameters are another cell: computed, not reused
    monkeypatch.undo()
    run_attacks(tiny_clf, sub.floats(), sub.y, specs, [8 / 255], overrides={"native:kfgsm": {"steps": 2}},
                progress=False, cell_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_a_cell_killed_between_batches_resumes_at_its_next_batch(tiny_clf, tiny_data, tmp_path, monkeypatch):
    from robustbench_knn.evaluation import evaluate

    sub = tiny_data.test.head(40)
    specs, eps = [get_attack("ta:pgd")], [2 / 255]  # a random start: each batch's own seed must hold
    whole = run_attacks(tiny_clf, sub.floats(), sub.y, specs, eps, progress=False, batch_size=4,
                        cell_dir=tmp_path / "whole")
    n_batches = whole["per_eps"][0]["attacks"]["ta:pgd"]["n_batches"]
    assert n_batches >= 4
    real, calls = evaluate._attack_batch, []

    def killed_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C, or the job's time limit
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "_attack_batch", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_attacks(tiny_clf, sub.floats(), sub.y, specs, eps, progress=False, batch_size=4, cell_dir=tmp_path / "run")
    kept = list((tmp_path / "run").glob("*.batches/batch*.json"))
    assert len(kept) == 2 and not list((tmp_path / "run").glob("*.json"))  # two batches kept, no cell yet
    calls.clear()
    monkeypatch.setattr(evaluate, "_attack_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run_attacks(tiny_clf, sub.floats(), sub.y, specs, eps, progress=False, batch_size=4,
                          cell_dir=tmp_path / "run")
    assert len(calls) == n_batches - 2  # only the batches not yet done
    cell, want = resumed["per_eps"][0]["attacks"]["ta:pgd"], whole["per_eps"][0]["attacks"]["ta:pgd"]
    assert cell["robust"] == want["robust"] and 0 < cell["robust_acc"] < resumed["per_eps"][0]["clean_acc"]
    assert {k: v for k, v in cell.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    assert not list((tmp_path / "run").glob("*.batches"))  # the stored cell replaces its batches


def test_only_clean_correct_points_are_attacked(tiny_clf, tiny_data):
    sub = tiny_data.test.head(40)
    y = sub.y.clone()
    y[:5] = (y[:5] + 1) % 10  # wrong labels: clean-misclassified, never attacked, never robust
    res = run_attacks(tiny_clf, sub.floats(), y, [get_attack("kfgsm")], [8 / 255], progress=False)
    cell = res["per_eps"][0]["attacks"]["native:kfgsm"]
    assert cell["n_attacked"] == sum(res["clean_correct"]) <= 35
    assert not any(cell["robust"][:5])


def test_toolkit_table_end_to_end(tiny_data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tk"
    args = ["toolkits", "--model", "full", "--data-dir", str(tiny_data_dir), "--cache-dir", str(tmp_path / "c"),
            "--attacks", "kfgsm,pgd", "--eps", "8/255,64/255", "--n-test", "20", "--out", str(out), "--quiet",
            *[a for s in TINY_SETS for a in ("--set", s)]]
    assert main(args) == 0
    res = json.loads((out / "toolkits.json").read_text())
    keys = {(c["key"], c["surrogate"]) for c in res["cells"]}
    # kfgsm follows the model's objective once; pgd runs in both toolkits with both surrogates
    assert keys == {("native:kfgsm", "objective"), ("ta:pgd", "potential"), ("ta:pgd", "softknn"),
                    ("art:pgd", "potential"), ("art:pgd", "softknn")}
    df = toolkit_compare.compare_frame(res)
    worst = df[(df["attack"] == "worst case") & (df["surrogate"] == "all surrogates")].iloc[0]
    clean = torch.tensor(res["clean_correct"], dtype=torch.bool)
    for eps in (8 / 255, 64 / 255):
        cells = [c for c in res["cells"] if abs(c["eps"] - eps) < 1e-9]
        expect = clean.clone()
        for c in cells:
            expect &= torch.tensor(c["robust"], dtype=torch.bool)
        lab = "8/255" if eps < 0.1 else "64/255"
        assert worst[f"robust {lab}"] == round(100 * expect.float().mean().item(), 2)
        assert worst[f"robust {lab}"] <= min(c["robust_acc"] for c in cells)
    md = (out / "toolkits.md").read_text()
    assert "Strongest single attack" in md and "Worst case at ε=8/255" in md
    assert "| pgd" in capsys.readouterr().out
    # a second run reuses every cell: nothing is recomputed
    monkeypatch.setattr("robustbench_knn.evaluation.evaluate._attack_cell",
                        lambda *a, **k: pytest.fail("cell recomputed"))
    assert main(args) == 0
    again = json.loads((out / "toolkits.json").read_text())
    assert [c["robust"] for c in again["cells"]] == [c["robust"] for c in res["cells"]]


def test_toolkits_bad_input(capsys):
    assert main(["toolkits", "--attacks", "nope"]) == 2
    assert main(["toolkits", "--surrogates", "bogus"]) == 2
    assert main(["toolkits", "--toolkits", "ta,bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("robustbench-knn: error:") for line in err)


def test_cells_are_tied_to_the_weights(tiny_clf, tiny_data, tmp_path):
    """A model with the same config but other weights (a retrain elsewhere) never reuses a cached cell."""
    from robustbench_knn.paper.classifier import KNNClassifier

    sub = tiny_data.test.head(20)
    run_attacks(tiny_clf, sub.floats(), sub.y, [get_attack("kfgsm")], [8 / 255], progress=False, cell_dir=tmp_path)
    other = KNNClassifier(tiny_clf.net, tiny_clf.bank + 1e-3, tiny_clf.bank_labels, tiny_clf.cfg)
    run_attacks(other, sub.floats(), sub.y, [get_attack("kfgsm")], [8 / 255], progress=False, cell_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_planned_cells_not_yet_run_show_as_not_run(tiny_data_dir, tmp_path, monkeypatch):
    """An interrupted table keeps a row for every planned cell; the unfinished ones read "not run"."""
    out = tmp_path / "tk"
    real = toolkit_compare.run_attacks
    calls = {"n": 0}

    def stop_after_first(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(toolkit_compare, "run_attacks", stop_after_first)
    args = ["toolkits", "--model", "full", "--data-dir", str(tiny_data_dir), "--cache-dir", str(tmp_path / "c"),
            "--attacks", "kfgsm,pgd", "--eps", "8/255", "--n-test", "20", "--out", str(out), "--quiet",
            *[a for s in TINY_SETS for a in ("--set", s)]]
    assert main(args) == 130  # interrupted after the first cell
    res = json.loads((out / "toolkits.json").read_text())
    assert len(res["planned"]) == 5 and len(res["cells"]) == 1
    df = toolkit_compare.compare_frame(res)
    assert len(df[df["attack"] == "pgd"]) == 4 and df[df["attack"] == "pgd"]["robust 8/255"].isna().all()
    md = (out / "toolkits.md").read_text()
    assert md.count("not run") == 4 * 3  # robust, zero-grad and seconds of each unfinished pgd cell
    # --render-only rebuilds the same files from the stored JSON without computing anything
    (out / "toolkits.md").unlink()
    monkeypatch.setattr(toolkit_compare, "run_attacks", lambda *a, **k: pytest.fail("computed in --render-only"))
    assert main([*args, "--render-only"]) == 0
    assert (out / "toolkits.md").read_text() == md
    assert main(["toolkits", "--render-only", "--out", str(tmp_path / "none")]) == 2


def test_toolkits_option_runs_only_those_toolkits_and_keeps_the_others_as_not_run(tiny_data_dir, tmp_path):
    """`--toolkits ta` runs torchattacks' cells only; ART's planned cells stay in the table, unrun."""
    out = tmp_path / "tk"
    args = ["toolkits", "--model", "full", "--data-dir", str(tiny_data_dir), "--cache-dir", str(tmp_path / "c"),
            "--attacks", "pgd", "--surrogates", "potential", "--toolkits", "ta", "--eps", "8/255", "--n-test", "20",
            "--out", str(out), "--quiet", *[a for s in TINY_SETS for a in ("--set", s)]]
    assert main(args) == 0
    res = json.loads((out / "toolkits.json").read_text())
    assert [(c["key"], c["surrogate"]) for c in res["cells"]] == [("ta:pgd", "potential")]
    df = toolkit_compare.compare_frame(res)
    art = df[(df["attack"] == "pgd") & (df["toolkit"] == "art")]
    assert len(art) == 1 and art["robust 8/255"].isna().all()
    md = (out / "toolkits.md").read_text()
    assert "Only the cells of ta were run" in md and md.count("not run") == 3


def test_the_table_names_the_weights_it_judged(tiny_clf, tiny_data, tmp_path):
    """Two models of one config (a retrain elsewhere) give two tables that say which weights each judged."""
    from robustbench_knn.evaluation.experiment import weights_hash
    from robustbench_knn.paper.classifier import KNNClassifier

    other = KNNClassifier(tiny_clf.net, tiny_clf.bank + 1e-3, tiny_clf.bank_labels, tiny_clf.cfg)
    tables = {}
    for tag, clf in (("own", tiny_clf), ("other", other)):
        res = toolkit_compare.compare_classifiers({"potential": clf}, tiny_data, [8 / 255], name="full",
                                                  config_hash=tiny_clf.cfg.config_hash(), names=["kfgsm"],
                                                  n_test=10, out_dir=tmp_path / tag, progress=False)
        stored = json.loads((tmp_path / tag / "toolkits.json").read_text())
        assert stored["weights_hash"] == res["weights_hash"] == weights_hash(clf)
        assert f"weights {weights_hash(clf)}" in (tmp_path / tag / "toolkits.md").read_text()
        tables[tag] = stored
    assert tables["own"]["config_hash"] == tables["other"]["config_hash"]
    assert tables["own"]["weights_hash"] != tables["other"]["weights_hash"]
