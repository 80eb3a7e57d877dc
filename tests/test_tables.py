"""The paper's tables: rendering from stored results (exact), resume, literature rows, CLI input checks."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from robustbench_knn.cli import main
from robustbench_knn.config import UsageError, get_model_config
from robustbench_knn.reports import tables
from robustbench_knn.store import write_json

from .conftest import TINY_SETS

KFGSM = "native:kfgsm"
SHA = "ab" * 32


def _result(model: str, clean: float, robust: tuple, *, attacks=(KFGSM,), worst=None, wall=100.0) -> dict:
    """A stored benchmark_config() result as written by hand: only what the tables read."""
    per_eps = []
    for i, eps in enumerate(tables.EPS):
        atk = {k: {"robust_acc": robust[i], "params": {"steps": 30, "step_ratio": 0.1}} for k in attacks}
        per_eps.append({"eps": eps, "clean_acc": clean, "attacks": atk,
                        "worst_case_acc": worst[i] if worst else robust[i]})
    return {"model": model, "dataset": "CIFAR-10 (JPEG q75)", "dataset_sha256": SHA, "n_clean": 10000,
            "clean_acc_full": clean, "n_test": 1000, "seed": 0, "surrogate": "potential", "device": "cpu",
            "versions": {"python": "3.12.0", "torch": "2.14.1"}, "train_log": {"train_seconds": 60.0},
            "attacks": list(attacks), "eps": list(tables.EPS), "per_eps": per_eps, "rejected_attacks": [],
            "wall_seconds": wall}


def _store(out, table: str, row: str, result: dict, extra=()) -> None:
    specs = tables.attack_specs([tables.get_attack(a) for a in extra])
    settings = tables.row_settings(get_model_config(row), specs, 1000, SHA)
    write_json(tables.result_path(out, table, row), {"table": table, "row": row, "settings": settings,
                                                     "result": result})


def test_baselines_hold_every_published_row():
    b = tables.load_baselines()
    t1 = {(r["method"], r["citation"]): r for r in b["table1"]["rows"]}
    assert len(t1) == 6 and t1[("CROWN-LBP", "Lyu et al. (2021)")]["pgd_16"] is None
    assert t1[("l∞-distance Net", "Zhang et al. (2021a)")]["pgd_8"] == 41.84
    t2 = {r["row"]: r for r in b["table2"]["rows"]}
    assert list(t2) == ["A", "B", "C", "D", "E", "FULL"] and t2["D"]["pgd_8"] == 39.09
    assert [t2["B"][k] for k in ("identity_init", "parameter_sharing", "knn_exp_loss")] == [True, False, False]
    assert [r["model"] for r in b["table2"]["rows"]] == list(tables.TABLES["table2"].rows)
    u = {r["model"]: r for r in b["untrained"]["rows"]}
    assert (u["untrained"]["clean"], u["untrained"]["pgd_8"]) == (26.31, 9.94)
    assert (u["untrained-mlp"]["clean"], u["untrained-mlp"]["pgd_8"]) == (9.81, 0.0)


def test_table2_from_stored_results_is_exact(tmp_path):
    _store(tmp_path, "table2", "a", _result("a", 43.82, (5.1, 0.0), wall=100.0))
    _store(tmp_path, "table2", "full", _result("full", 37.0, (7.2, 3.1), wall=250.5))
    md = tables.render_table("table2", tmp_path).read_text()

    df = pd.read_csv(tmp_path / "table2.csv").set_index("model")
    assert list(df.index) == ["a", "full"]  # paper order, uncomputed rows absent
    full = df.loc["full"]
    assert (full["clean"], full["clean paper"], full["clean Δ"]) == (37.0, 53.38, -16.38)
    assert (full["ε=8/255 PGD"], full["ε=8/255 PGD paper"], full["ε=8/255 PGD Δ"]) == (7.2, 45.48, -38.28)
    assert (full["ε=16/255 PGD"], full["ε=16/255 PGD Δ"]) == (3.1, -32.59)
    assert df.loc["a", "ε=16/255 PGD Δ"] == -0.28 and not df.loc["a", "identity init"]
    assert "worst case" not in " ".join(df.columns)  # one attack: no worst-case column

    lines = md.splitlines()
    row_a = next(ln for ln in lines if ln.startswith("| A "))
    assert [c.strip() for c in row_a.split("|")[1:-1]] == [
        "A", "a", "×", "×", "×", "measured", "43.82", "54.27", "-10.45", "5.10", "7.25", "-2.15", "0.00", "0.28",
        "-0.28"]
    head = md.split("| row")[0]
    for needle in ("dataset: CIFAR-10 (JPEG q75)", "n-test: 1000", "epochs: 20; seed: 0; k: 800",
                   'native:kfgsm {"steps": 30, "step_ratio": 0.1}', "device: cpu", "torch 2.14.1",
                   "wall time: 350 s", "missing rows", ": b, c, d, e"):
        assert needle in head, needle
    tex = (tmp_path / "table2.tex").read_text()
    assert r"\toprule" in tex and r"FULL & full & \checkmark{}" in tex and "-16.38" in tex
    assert tex.startswith("% # Table 2") and r"$\varepsilon$=8/255 PGD $\Delta$" in tex


def test_table1_literature_rows_are_reported_never_measured(tmp_path):
    tables.render_table("table1", tmp_path)
    df = pd.read_csv(tmp_path / "table1.csv")
    assert len(df) == 5 and set(df["source"]) == {tables.REPORTED} and df["ε=8/255 PGD"].isna().all()
    assert "missing rows" in (tmp_path / "table1.md").read_text()

    _store(tmp_path, "table1", "full", _result("full", 37.0, (7.2, 3.1)))
    tables.render_table("table1", tmp_path)
    df = pd.read_csv(tmp_path / "table1.csv")
    assert list(df["source"]) == [tables.REPORTED] * 5 + [tables.MEASURED]
    assert df.loc[0, "row"] == "IBP (Gowal et al. (2018))" and df.loc[0, "ε=8/255 clean paper"] == 50.99
    ours = df.iloc[5]
    assert ours["row"] == "K-NN with Identity Initialized ResNet (ours)"
    assert (ours["ε=16/255 clean"], ours["ε=16/255 clean paper"], ours["ε=16/255 clean Δ"]) == (37.0, 53.38, -16.38)
    assert pd.isna(df.loc[2, "ε=16/255 PGD paper"])  # CROWN-LBP's "-" cell
    assert "missing rows" in (tmp_path / "table1.md").read_text() and ": full-100ep" in (tmp_path / "table1.md").read_text()

    # the labelled 100-epoch variant: under FULL, compared with the paper's FULL figures, its epochs in the label
    _store(tmp_path, "table1", "full-100ep", _result("full-100ep", 53.5, (9.0, 4.0)))
    tables.render_table("table1", tmp_path)
    df = pd.read_csv(tmp_path / "table1.csv")
    assert list(df["model"].fillna("")) == [""] * 5 + ["full", "full-100ep"]
    var = df.iloc[6]
    assert var["row"] == "K-NN with Identity Initialized ResNet (ours), variant: 100 epochs"
    assert (var["ε=8/255 clean"], var["ε=8/255 clean paper"], var["ε=8/255 clean Δ"]) == (53.5, 53.38, 0.12)
    assert (var["ε=16/255 PGD"], var["ε=16/255 PGD Δ"]) == (4.0, -31.69)
    assert "all measured rows computed" in (tmp_path / "table1.md").read_text()


def test_extra_attacks_add_worst_case_and_mixed_settings_are_named(tmp_path):
    _store(tmp_path, "untrained", "untrained", _result("untrained", 26.0, (9.0, 2.0), attacks=(KFGSM, "aa:apgd"),
                                                        worst=(8.5, 1.5)), extra=["apgd"])
    _store(tmp_path, "untrained", "untrained-mlp", _result("untrained-mlp", 10.0, (0.0, 0.0)))
    md = tables.render_table("untrained", tmp_path).read_text()
    df = pd.read_csv(tmp_path / "untrained.csv").set_index("model")
    assert df.loc["untrained", "ε=8/255 worst case"] == 8.5 and "ε=8/255 worst case paper" not in df.columns
    assert df.loc["untrained-mlp", "clean Δ"] == 0.19 and "|     +0.19 |" in md  # measured 10.00, paper 9.81
    assert pd.isna(df.loc["untrained-mlp", "ε=8/255 worst case"])  # attacked with kFGSM only
    assert df.loc["untrained", "ε=8/255 PGD Δ"] == -0.94 and pd.isna(df.loc["untrained", "ε=16/255 PGD paper"])
    assert "attacks: differs between rows" in md and "epochs: 0" in md


def _fake_benchmark(calls, fail_on=None):
    def fake(cfg, specs, eps_list, **kw):
        calls.append(cfg.name)
        if cfg.name == fail_on:
            raise KeyboardInterrupt  # as if killed while computing this row
        return _result(cfg.name, 30.0, (5.0, 1.0))
    return fake


def test_resume_skips_finished_rows(tmp_path, tiny_data_dir, monkeypatch):
    calls = []
    kw = dict(n_test=10, data_dir=str(tiny_data_dir), out_dir=tmp_path, progress=False, row_bar=False)
    monkeypatch.setattr(tables, "benchmark_config", _fake_benchmark(calls, fail_on="b"))
    with pytest.raises(KeyboardInterrupt):
        tables.run_table("table2", **kw)
    assert calls == ["a", "b"] and tables.result_path(tmp_path, "table2", "a").is_file()
    assert not tables.result_path(tmp_path, "table2", "b").exists()
    assert "missing rows" in (tmp_path / "table2.md").read_text()  # partial table rendered honestly

    calls.clear()
    monkeypatch.setattr(tables, "benchmark_config", _fake_benchmark(calls))
    tables.run_table("table2", **kw)
    assert calls == ["b", "c", "d", "e", "full"]  # a was not recomputed
    tables.run_table("table2", **kw)
    assert calls == ["b", "c", "d", "e", "full"]

    tables.run_table("table1", **kw)  # FULL under the same settings: reused, not recomputed
    assert calls == ["b", "c", "d", "e", "full", "full-100ep"]
    assert json.loads(tables.result_path(tmp_path, "table1", "full").read_text())["reused_from"] == "table2-full.json"

    tables.run_table("table2", **{**kw, "n_test": 11})  # other settings: every row again
    assert calls[6:] == ["a", "b", "c", "d", "e", "full"]
    stored = json.loads(tables.result_path(tmp_path, "table2", "a").read_text())
    assert stored["settings"]["n_test"] == 11 and stored["settings"]["attacks"] == [KFGSM]


def test_row_config_applies_overrides():
    cfg = tables.row_config("b", epochs=3, seed=7, sets=["model.w_r=32", "k=5"])
    assert (cfg.train.epochs, cfg.train.seed, cfg.model.w_r, cfg.k, cfg.model.head) == (3, 7, 32, 5, "logits")
    with pytest.raises(UsageError):
        tables.row_config("full", sets=["model.nope=1"])


@pytest.mark.parametrize("args, msg", [
    (["--ablation", "--untrained"], "not allowed with"),
    (["--n-test", "0"], "--n-test"),
    (["--attacks", "nope"], "unknown attack"),
    (["--render-only", "--epochs", "3"], "--render-only"),
    (["--set", "model.zz=1"], "unknown setting"),
    (["--epochs", "-1"], "epochs must be"),
])
def test_bad_input_one_line_exit_2(args, msg, tmp_path, tiny_data_dir, capsys):
    out = tmp_path / "out"
    rc = main(["table", *args, "--out", str(out), "--data-dir", str(tiny_data_dir), "--cache-dir",
               str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0]
    assert not out.exists() and not (tmp_path / "c").exists()


def test_bad_input_exit_code_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "robustbench_knn", "table", "--untrained", "--ablation",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_untrained_end_to_end_through_the_cli(tmp_path, tiny_data_dir, monkeypatch, capsys):
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    argv = ["table", "--untrained", "--n-test", "20", "--data-dir", str(tiny_data_dir), "--cache-dir",
            str(tmp_path / "c"), "--out", str(tmp_path / "t"), "--quiet", *sets]
    assert main(argv) == 0
    assert "untrained IdResNet + k-NN" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "t" / "untrained.csv").set_index("model")
    assert list(df.index) == ["untrained", "untrained-mlp"]
    for row in df.index:
        res = json.loads(tables.result_path(tmp_path / "t", "untrained", row).read_text())["result"]
        assert res["n_test"] == 20 and res["config"]["k"] == 5
        assert df.loc[row, "clean"] == res["clean_acc_full"]
        assert df.loc[row, "ε=8/255 PGD"] == res["per_eps"][0]["attacks"][KFGSM]["robust_acc"]
        assert df.loc[row, "clean Δ"] == round(res["clean_acc_full"] - df.loc[row, "clean paper"], 2)
    md = (tmp_path / "t" / "untrained.md").read_text()
    assert "n-test: 20" in md and "epochs: 0" in md and "all measured rows computed" in md

    def boom(*a, **k):
        raise AssertionError("finished rows must not be recomputed")

    monkeypatch.setattr(tables, "benchmark_config", boom)
    assert main(argv) == 0
    assert main(["table", "--untrained", "--render-only", "--out", str(tmp_path / "t")]) == 0
