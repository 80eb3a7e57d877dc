import json
import math

import pytest

from robustbench_knn.cli import main
from robustbench_knn.config import UsageError
from robustbench_knn.paper import search as search_mod
from robustbench_knn.paper.search import best_variant, parse_variant, run_search, variant_config

TINY = ["model.w_r=32", "model.d=3", "train.batch_size=100", "k=5"]


def test_parse_variant():
    over = parse_variant("image_3e-4_mean2_cos")
    assert over["model"] == {"normalization": "image"}
    assert over["loss"] == {"reg_reduction": "mean2"}
    assert over["train"]["lr"] == pytest.approx(3e-4) and over["train"]["schedule"] == "cosine"
    assert parse_variant("position_1e-3_sum")["train"]["schedule"] == "constant"
    for bad in ("image_3e-4", "pixel_1e-3_mean", "image_abc_mean", "image_1e-3_max", "image_1e-3_mean_step",
                "image_-1_mean"):
        with pytest.raises(UsageError):
            parse_variant(bad)


def test_variant_keeps_the_papers_settings():
    cfg = variant_config("image_1e-4_mean2")
    assert (cfg.model.w_r, cfg.model.n_spaces, cfg.model.d, cfg.k) == (2048, 2, 15, 800)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.noise) == (20, 2048, True)
    assert (cfg.loss.lam, cfg.loss.l0, cfg.loss.k_mu) == (0.5, 7.0, 0.25)
    assert cfg.train.val_size == 5000 and cfg.model.normalization == "image" and cfg.train.lr == 1e-4


def test_search_on_tiny_data_writes_table_and_resumes(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "search"
    names = ["image_1e-3_mean", "position_1e-3_mean2"]
    df = run_search(tiny_data, names, epochs=3, val_size=50, out=out, device="cpu", cache_dir=tmp_path / "c",
                    sets=TINY, report_test=True)
    assert list(df["variant"]) == names
    stored = json.loads(out.with_suffix(".json").read_text())
    assert stored["val_size"] == 50 and stored["n_fit"] == 350
    for row in stored["rows"]:
        assert 0 <= row["val_acc"] <= 100 and row["epochs"] == 3
        assert row["machine"] and row["median_dist_other"] > 0 and 0 <= row["test_acc_info"] <= 100
        # train_seconds comes from the model's train log; a tiny training may round to 0.0 s on a fast machine,
        # so it is checked for what it is (a finite, non-negative float equal to the log's), not for being > 0
        logs = list((tmp_path / "c" / "models").glob(f"*-{row['config_hash']}-{tiny_data.sha256[:8]}/train_log.json"))
        assert len(logs) == 1
        log = json.loads(logs[0].read_text())
        assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3] and log["dataset_sha256"] == tiny_data.sha256
        secs = [e["seconds"] for e in log["epochs"]]
        assert all(isinstance(t, float) and math.isfinite(t) and t >= 0 for t in [*secs, log["train_seconds"]])
        assert log["train_seconds"] == pytest.approx(sum(secs))
        assert isinstance(row["train_seconds"], float) and row["train_seconds"] == round(log["train_seconds"], 1)
        assert isinstance(row["wall_seconds"], float) and math.isfinite(row["wall_seconds"])
        assert row["wall_seconds"] >= 0
        assert row["final_loss"] == round(log["epochs"][-1]["loss"], 4)
    md = out.with_suffix(".md").read_text()
    assert "image_1e-3_mean" in md and "validation split, never the test set" in md
    assert best_variant(out, epochs=3)["val_acc"] == max(r["val_acc"] for r in stored["rows"])
    # a rerun with the same settings trains nothing
    monkeypatch.setattr(search_mod, "train_model", lambda *a, **k: pytest.fail("retrained a finished row"))
    run_search(tiny_data, names, epochs=3, val_size=50, out=out, device="cpu", cache_dir=tmp_path / "c", sets=TINY,
               report_test=True)


def test_search_validates_every_name_before_training(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(search_mod, "train_model", lambda *a, **k: pytest.fail("trained before checking names"))
    with pytest.raises(UsageError, match="NORM_LR_REG"):
        run_search(tiny_data, ["image_1e-3_mean", "bogus"], epochs=1, val_size=50, out=tmp_path / "s",
                   device="cpu", sets=TINY)


def test_search_cli(tiny_data_dir, tmp_path, capsys):
    sets = [a for s in TINY for a in ("--set", s)]
    rc = main(["search", "--variants", "image_1e-3_mean", "--epochs", "2", "--val-size", "50", "--data-dir",
               str(tiny_data_dir), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "s"), *sets])
    assert rc == 0 and (tmp_path / "s.md").is_file()
    assert main(["search", "--variants", "image_fast_mean", "--data-dir", str(tiny_data_dir)]) == 2
    assert "NORM_LR_REG" in capsys.readouterr().err
