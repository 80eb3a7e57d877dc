"""benchmarks/reproduce.py: one run of each plan on a GPU machine; every planned command is checked here without
running it."""

import importlib.util
import json
from pathlib import Path

import pytest

from robustbench_knn.attacks import parse_attack_list
from robustbench_knn.cli import build_parser
from robustbench_knn.config import apply_overrides, get_model_config
from robustbench_knn.paper.search import parse_variant

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def session():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("which", ["regenerate", "trust", "scale"])
def test_every_planned_command_parses(session, tiny, which):
    search, lanes = session.PLANS[which](tiny)
    steps = ([search] if search else []) + [argv for lane in lanes.values() for _, argv in lane]
    parser = build_parser()
    for argv in steps:
        args = parser.parse_args([*argv, "--set", "train.lr=0.001"])  # the recipe's --set is appended to each
        if getattr(args, "attacks", None) not in (None, "default") and args.command in ("evaluate", "table"):
            parse_attack_list(args.attacks)
    names = [name for lane in lanes.values() for name, _ in lane]
    assert len(names) == len(set(names))
    if which == "scale":  # the whole test set, the standard and adaptive suites
        (argv,) = [argv for lane in lanes.values() for _, argv in lane]
        args = parser.parse_args(argv)
        assert args.n_test == (20 if tiny else 10_000) and "aa:autoattack" in args.attacks
        return
    if which == "trust":  # aligned and unaligned on the same attacks; the subjects audited at both ε
        a = [argv for _, argv in lanes["A"]]
        assert "--unaligned" in a[1] and [x for x in a[1] if x != "--unaligned"] == a[0]
        assert {"audit-deep_knn_a-16", "audit-raw_pixel_knn-8", "evaluate-full"} <= set(names)
        assert all("--active-test" in argv for lane in lanes.values() for name, argv in lane if name.startswith("audit"))
        return
    assert "toolkits" in names
    if which == "regenerate":
        assert {"table1", "table2", "untrained"} <= set(names)
        # FULL is trained by lane A's first step; lane B reaches FULL only at Table 2's last row
        assert lanes["A"][0][0] == "table1" and lanes["B"][0][0] == "table2"


def test_toolkit_attack_list_is_valid(session):
    from robustbench_knn.evaluation.toolkit_compare import suite_specs

    assert [s.name for s in suite_specs(session.TOOLKIT_ATTACKS.split(","))][:1] == ["kfgsm"]
    assert len(parse_attack_list(session.EVALUATE_ATTACKS)) == len(session.EVALUATE_ATTACKS.split(","))


def test_recipe_sets_apply_the_best_variant(session, tmp_path):
    rows = [{"variant": v, "epochs": 20, "val_acc": acc, "overrides": parse_variant(v)}
            for v, acc in (("image_3e-4_mean2", 48.9), ("position_1e-3_mean_cos", 49.3))]
    (tmp_path / "s.json").write_text(json.dumps({"rows": rows}))
    sets = session.recipe_sets(tmp_path / "s", 20)
    cfg = apply_overrides(get_model_config("full"), [s for s in sets if s != "--set"])
    assert (cfg.model.normalization, cfg.train.lr, cfg.loss.reg_reduction) == ("position", 1e-3, "mean")
    assert (cfg.train.schedule, cfg.train.warmup_frac) == ("cosine", 0.05)


@pytest.mark.parametrize("tiny", [False, True])
def test_toolkits_plan_covers_every_cell_of_the_table_once(session, tiny):
    """The lanes split the whole cross-toolkit table: each (attack, toolkit, surrogate, ε) cell is run by exactly
    one lane, and each lane writes its own folder for `toolkits --merge`."""
    from robustbench_knn.cli.parser import parse_eps
    from robustbench_knn.evaluation.toolkit_compare import plan_jobs, suite_specs

    _, lanes = session.PLANS["toolkits"](tiny)
    parser = build_parser()
    runs: list[tuple] = []
    outs = []
    for lane in lanes.values():
        (_, argv), = lane
        args = parser.parse_args(argv)
        assert args.command == "toolkits" and args.n_test == (20 if tiny else 500) and args.aligned
        outs.append(args.out)
        tks = set(args.toolkits.split(",")) if args.toolkits else None
        for spec, sur in plan_jobs(suite_specs(args.attacks.split(",")), args.surrogates.split(",")):
            if tks is None or spec.toolkit in tks:
                runs += [(spec.key, sur if spec.toolkit != "native" else "objective", round(e, 8))
                         for e in parse_eps(args.eps or "8/255,16/255")]
    table = [(spec.key, sur if spec.toolkit != "native" else "objective", round(e, 8))
             for spec, sur in plan_jobs(suite_specs(session.TOOLKIT_ATTACKS.split(",")), ["potential", "softknn"])
             for e in (8 / 255, 16 / 255)]
    assert sorted(runs) == sorted(table) and len(table) == 37 * 2
    assert len(set(outs)) == len(outs)
