"""`toolkits --merge`: parts of one cross-toolkit table, run apart, make the table one run would make."""

import json

import pytest

from robustbench_knn.cli import main
from robustbench_knn.evaluation import toolkit_compare
from robustbench_knn.store import write_json

E8, E16 = 8 / 255, 16 / 255
CLEAN = [True] * 6 + [False] * 2


def _cell(attack: str, toolkit: str, surrogate: str, eps: float, robust: list[int], seconds: float = 1.0) -> dict:
    return {"attack": attack, "toolkit": toolkit, "surrogate": surrogate, "key": f"{toolkit}:{attack}", "eps": eps,
            "robust": [bool(r) for r in robust], "robust_acc": 100 * sum(robust) / len(robust), "valid": True,
            "zero_or_nonfinite_grad_frac": 0.0, "seconds": seconds, "params": {}}


def _part(folder, cells: list[dict], eps=(E8,), surrogates=("potential",), wall: float = 5.0, **over) -> str:
    result = {"model": "full", "config_hash": "cfg", "weights_hash": "w1", "k": 3, "dataset": "tiny",
              "dataset_sha256": "sha", "n_test": 8, "seed": 0, "aligned": True, "threat_model": "Linf",
              "versions": {"torch": "1"}, "clean_correct": CLEAN, "device": "cuda", "machine": "GPU X",
              "command": f"robustbench-knn toolkits --out {folder}", "eps": list(eps),
              "surrogates": list(surrogates), "cells": cells, "wall_seconds": wall, **over}
    write_json(folder / "toolkits.json", result)
    return str(folder)


def _merge(tmp_path, *folders: str, attacks: str = "pgd,apgd,square") -> int:
    return main(["toolkits", "--merge", ",".join(folders), "--attacks", attacks, "--out", str(tmp_path / "out")])


def test_merged_table_holds_every_part_and_the_per_sample_worst_case(tmp_path):
    a = _part(tmp_path / "a", [_cell("pgd", "ta", "potential", E8, [1, 1, 1, 0, 0, 0, 0, 0])], wall=30.0)
    b = _part(tmp_path / "b", [_cell("square", "ta", "potential", E8, [1, 0, 1, 1, 0, 0, 0, 0]),
                               _cell("square", "ta", "potential", E16, [0, 0, 1, 0, 0, 0, 0, 0])], eps=(E8, E16))
    c = _part(tmp_path / "c", [_cell("apgd", "aa", "softknn", E8, [0, 1, 1, 1, 1, 0, 0, 0])],
              surrogates=("softknn",), wall=12.0)
    assert _merge(tmp_path, a, b, c) == 0
    res = json.loads((tmp_path / "out" / "toolkits.json").read_text())
    assert [(x["key"], x["surrogate"], x["eps"]) for x in res["cells"]] == [
        ("ta:pgd", "potential", E8), ("aa:apgd", "softknn", E8),
        ("ta:square", "potential", E8), ("ta:square", "potential", E16)]
    assert res["surrogates"] == ["potential", "softknn"] and res["eps"] == [E8, E16]
    assert [p["wall_seconds"] for p in res["merged_from"]] == [30.0, 5.0, 12.0] and "wall_seconds" not in res
    df = toolkit_compare.compare_frame(res)
    worst = df[df["attack"] == "worst case"].set_index("surrogate")
    # 8/255: potential keeps points 0 and 2 (pgd ∧ square), softknn 1-4, all surrogates only point 2
    assert worst.loc["potential", "robust 8/255"] == 25.0
    assert worst.loc["softknn", "robust 8/255"] == 50.0
    assert worst.loc["all surrogates", "robust 8/255"] == 12.5
    assert worst.loc["all surrogates", "robust 16/255"] == 12.5
    # every planned row is there; the ones no part ran read "not run"
    assert len(df[df["attack"] != "worst case"]) == len(res["planned"]) == 4 + 6 + 6
    md = (tmp_path / "out" / "toolkits.md").read_text()
    assert "merged from 3 runs, whose cells took 4 s in all" in md  # the parts' cells, each counted once


@pytest.mark.parametrize("key, value", [("weights_hash", "w2"), ("clean_correct", [True] * 8),
                                        ("versions", {"torch": "2"}), ("aligned", False), ("n_test", 9)])
def test_parts_of_another_model_images_or_code_are_refused(tmp_path, capsys, key, value):
    a = _part(tmp_path / "a", [_cell("pgd", "ta", "potential", E8, [1] * 4 + [0] * 4)])
    b = _part(tmp_path / "b", [_cell("apgd", "ta", "potential", E8, [1] * 4 + [0] * 4)], **{key: value})
    assert _merge(tmp_path, a, b) == 2
    assert repr(key) in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_cell_two_parts_hold_is_kept_once_and_must_agree(tmp_path, capsys):
    cell = _cell("pgd", "ta", "potential", E8, [1, 1, 0, 0, 0, 0, 0, 0])
    a = _part(tmp_path / "a", [cell])
    b = _part(tmp_path / "b", [cell, _cell("apgd", "ta", "potential", E8, [1, 0, 0, 0, 0, 0, 0, 0])])
    assert _merge(tmp_path, a, b) == 0
    res = json.loads((tmp_path / "out" / "toolkits.json").read_text())
    assert [x["key"] for x in res["cells"]] == ["ta:pgd", "ta:apgd"]
    c = _part(tmp_path / "c", [_cell("pgd", "ta", "potential", E8, [1, 0, 0, 0, 0, 0, 0, 0])])
    assert _merge(tmp_path, a, c) == 2
    assert "differs from another part's result" in capsys.readouterr().err


def test_merge_bad_input_is_refused_before_any_work(tmp_path, capsys):
    a = _part(tmp_path / "a", [_cell("pgd", "ta", "potential", E8, [1] * 8)])
    b = _part(tmp_path / "b", [_cell("apgd", "ta", "potential", E8, [1] * 8)])
    assert _merge(tmp_path, a) == 2  # one folder
    assert _merge(tmp_path, a, str(tmp_path / "none")) == 2  # no table there
    assert _merge(tmp_path, a, a) == 2  # one folder twice
    assert main(["toolkits", "--merge", f"{a},{b}", "--out", a]) == 2  # would overwrite a part
    assert main(["toolkits", "--merge", f"{a},{b}", "--render-only", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("robustbench-knn: error:") for line in err)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "a" / "toolkits.json").read_text())["cells"][0]["key"] == "ta:pgd"
