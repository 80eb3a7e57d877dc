"""Split evaluations: torchrun ranks (gloo on CPU) and --shard parts + merge give the per-sample outcomes of one
process; merge refuses parts that are not one evaluation; a killed part resumes; a model is trained once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from robustbench_knn.config import UsageError
from robustbench_knn.evaluation.distributed import Partition, parse_shard
from robustbench_knn.evaluation.evaluate import combine_parts

from .conftest import REPO, TINY_SETS

# ε small enough that the tiny model is partly robust (at 8/255 every point breaks and equality proves little);
# ta:pgd has a random start, so it checks the per-batch seeding; batches of 16 make 6 of them on ~97 points
EVAL = ["evaluate", "--attacks", "kfgsm,ta:pgd", "--eps", "1/255,2/255", "--n-test", "100", "--batch-size", "16",
        "--device", "cpu", "--quiet", *[a for s in TINY_SETS for a in ("--set", s)]]


def _env(cache: Path) -> dict[str, str]:
    # one thread per process, as torchrun sets it, so every process computes in the same order
    return {**os.environ, "ROBUSTBENCH_KNN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _cli(args: list[str], cache: Path, *, ranks: int = 0, check: bool = True, **kw) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks \
        else []
    cmd = [*launcher, *([] if ranks else [sys.executable]), "-m", "robustbench_knn", *args]
    proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained_cache(tmp_path_factory, tiny_data_dir) -> Path:
    """A cache holding the tiny model (trained once here) and no result cells."""
    cache = tmp_path_factory.mktemp("dist-cache")
    _cli(["train", "--data-dir", str(tiny_data_dir), "--quiet", *[a for s in TINY_SETS for a in ("--set", s)]], cache)
    return cache


def _fresh(trained_cache: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the trained cache without cells: every run computes its own."""
    cache = tmp_path / name
    shutil.copytree(trained_cache, cache, ignore=shutil.ignore_patterns("cells"))
    return cache


def _result(folder: Path) -> dict:
    (path,) = folder.glob("evaluate-*-potential.json")
    return json.loads(path.read_text())


def _outcomes(res: dict) -> dict:
    return {"clean": res["clean_pred"],
            **{f"{r['eps']:.4f}/{k}": a["robust"] for r in res["per_eps"] for k, a in r["attacks"].items()},
            **{f"{r['eps']:.4f}/worst": r["worst_case_robust"] for r in res["per_eps"]}}


@pytest.fixture(scope="module")
def single(trained_cache, tiny_data_dir, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("single")
    _cli([*EVAL, "--data-dir", str(tiny_data_dir), "--out", str(tmp / "out")], _fresh(trained_cache, tmp, "c"))
    res = _result(tmp / "out")
    worst = [r["worst_case_acc"] for r in res["per_eps"]]
    assert 0 < min(worst) and max(worst) < res["per_eps"][0]["clean_acc"], worst  # mixed outcomes: a real check
    return res


def test_torchrun_two_ranks_equal_one_process(single, trained_cache, tiny_data_dir, tmp_path):
    _cli([*EVAL, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "out")],
         _fresh(trained_cache, tmp_path, "c"), ranks=2)
    res = _result(tmp_path / "out")
    assert res["processes"] == 2
    assert _outcomes(res) == _outcomes(single)
    cell = res["per_eps"][0]["attacks"]["ta:pgd"]
    assert cell["batches"] == list(range(cell["n_batches"])) and cell["n_batches"] == 7
    assert len(list((tmp_path / "out").iterdir())) == 3  # rank 0 alone wrote the JSON, CSV and model card


def test_toolkits_and_audit_under_torchrun_equal_one_process(trained_cache, tiny_data_dir, tmp_path):
    common = ["--data-dir", str(tiny_data_dir), "--device", "cpu", "--quiet", "--n-test", "40", "--batch-size", "8",
              *[a for s in TINY_SETS for a in ("--set", s)]]
    runs = {}
    for ranks in (0, 2):
        out = tmp_path / f"r{ranks}"
        cache = _fresh(trained_cache, tmp_path, f"c{ranks}")
        _cli(["toolkits", *common, "--attacks", "kfgsm,pgd", "--surrogates", "potential", "--eps", "2/255",
              "--out", str(out / "tk")], cache, ranks=ranks)
        _cli(["audit", *common, "--quick", "--eps", "2/255", "--out", str(out / "au")], cache, ranks=ranks)
        (audit,) = (out / "au").glob("audit-*-eps2.json")
        runs[ranks] = (json.loads((out / "tk" / "toolkits.json").read_text()), json.loads(audit.read_text()))
    (tk1, au1), (tk2, au2) = runs[0], runs[2]
    assert [(c["key"], c["robust"]) for c in tk2["cells"]] == [(c["key"], c["robust"]) for c in tk1["cells"]]
    assert 0 < sum(tk1["cells"][0]["robust"]) < len(tk1["cells"][0]["robust"])  # mixed outcomes
    assert au2["verdict"] == au1["verdict"] and au2["checks"] == au1["checks"]
    for key in ("robust_acc", "worst_case_robust", "first_breaker", "eps_curves"):
        assert au2[key] == au1[key], key


def test_shards_and_merge_equal_one_process(single, trained_cache, tiny_data_dir, tmp_path):
    cache = _fresh(trained_cache, tmp_path, "c")
    for i in range(2):
        out = _cli([*EVAL, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "out"), "--shard", f"{i}/2"],
                   cache).stdout
        assert f"part {i}/2" in out
    assert not list((tmp_path / "out").glob("*-potential.json"))  # parts only, until merged
    merged = _cli(["merge", str(tmp_path / "out")], cache).stdout
    assert "2 parts merged" in merged
    res = _result(tmp_path / "out")
    assert _outcomes(res) == _outcomes(single)
    assert [r["worst_case_acc"] for r in res["per_eps"]] == [r["worst_case_acc"] for r in single["per_eps"]]


def test_merge_refuses_missing_and_mismatched_parts(trained_cache, tiny_data_dir, tmp_path):
    cache = _fresh(trained_cache, tmp_path, "c")
    base = [*EVAL, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "out")]
    _cli([*base, "--shard", "0/2"], cache)
    proc = _cli(["merge", str(tmp_path / "out")], cache, check=False)
    assert proc.returncode == 2 and "part(s) 1 of 2 missing" in proc.stderr
    _cli([*base, "--shard", "1/2", "--n-test", "90"], cache)  # other images: not the same evaluation
    proc = _cli(["merge", str(tmp_path / "out")], cache, check=False)
    assert proc.returncode == 2 and "differs from" in proc.stderr and "'n_test'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("*-potential.json"))  # nothing merged was written


def test_a_killed_shard_resumes_from_its_finished_cells(single, trained_cache, tiny_data_dir, tmp_path):
    cache = _fresh(trained_cache, tmp_path, "c")
    args = [*EVAL, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "out"), "--shard", "0/2"]
    proc = subprocess.Popen([sys.executable, "-m", "robustbench_knn", *args], env=_env(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    first: list[Path] = []
    while not first and time.time() < deadline and proc.poll() is None:
        first = list(cache.glob("models/*/cells/*/native_kfgsm-eps0.003922-*.part0of2.json"))
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(first) == 1, "the shard ended before its first cell was written"
    assert not list((tmp_path / "out").glob("*.part-0-of-2.json"))  # killed before its part was written
    stamp = first[0].stat().st_mtime_ns
    _cli(args, cache)
    assert first[0].stat().st_mtime_ns == stamp  # reused, not recomputed
    _cli([*EVAL, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "out"), "--shard", "1/2"], cache)
    _cli(["merge", str(tmp_path / "out")], cache)
    assert _outcomes(_result(tmp_path / "out")) == _outcomes(single)


def test_one_failing_rank_stops_the_job_with_its_error(trained_cache, tiny_data_dir, tmp_path):
    (tmp_path / "flaky.py").write_text(textwrap.dedent('''
        import os
        from torch import nn

        def make():
            if os.environ.get("RANK") == "1":
                raise RuntimeError("rank one lost its weights")
            return nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))
    '''))
    t0 = time.time()
    proc = _cli([*EVAL[:-2 * len(TINY_SETS)], "--attacks", "ta:pgd", "--model", "flaky:make", "--data-dir", str(tiny_data_dir),
                 "--out", str(tmp_path / "out")], _fresh(trained_cache, tmp_path, "c"), ranks=2, check=False,
                cwd=tmp_path)
    assert proc.returncode != 0
    assert "(rank 1 of 2)" in proc.stderr and "rank one lost its weights" in proc.stderr
    assert time.time() - t0 < 300  # stopped, not hung on the collective rank 1 never joins
    assert not (tmp_path / "out").exists()


def test_benchmark_in_a_script_started_by_torchrun_splits_and_equals_one_process(tiny_data_dir, tmp_path):
    (tmp_path / "script.py").write_text(textwrap.dedent(f'''
        import json, os, sys, torch
        from torch import nn
        from robustbench_knn import KNNDefense, benchmark
        from robustbench_knn.data import load_cifar10

        torch.manual_seed(0)
        train = load_cifar10({str(tiny_data_dir)!r}, download=False).train
        defense = KNNDefense(nn.Sequential(nn.Flatten(), nn.Linear(3072, 8)), train.y, bank_images=train.x, k=5)
        res = benchmark(defense, n_examples=60, eps=8/255, attacks="kfgsm,ta:pgd", device="cpu", batch_size=8,
                        data_dir={str(tiny_data_dir)!r},
                        progress=False, out=sys.argv[1])
        # one file per rank: two ranks printing long lines into one pipe can interleave them
        with open(sys.argv[2] + "-rank" + os.environ.get("RANK", "0") + ".json", "w") as f:
            json.dump({{"processes": res.raw["processes"], "robust": res.per_sample().to_dict("list")}}, f)
    '''))
    runs = {}
    for ranks in (0, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if ranks \
            else [sys.executable]
        proc = subprocess.run([*launcher, str(tmp_path / "script.py"), str(tmp_path / f"out{ranks}"),
                               str(tmp_path / f"res{ranks}")], env=_env(tmp_path / "c"), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[ranks] = [json.loads(f.read_text()) for f in sorted(tmp_path.glob(f"res{ranks}-rank*.json"))]
    assert [r["processes"] for r in runs[2]] == [2, 2] and runs[0][0]["processes"] == 1
    assert runs[2][0]["robust"] == runs[2][1]["robust"] == runs[0][0]["robust"]
    assert 0 < sum(runs[0][0]["robust"]["robust worst case"]) < 60  # mixed outcomes: a real check
    assert len(list((tmp_path / "out2").iterdir())) == len(list((tmp_path / "out0").iterdir())) > 0


def test_torchrun_refuses_commands_it_does_not_split(trained_cache, tmp_path):
    proc = _cli(["train", "--quiet"], tmp_path / "c", ranks=2, check=False)
    assert proc.returncode != 0 and "torchrun splits evaluate, audit, toolkits" in proc.stderr


def test_a_model_wanted_by_two_processes_is_trained_once(tiny_data_dir, tmp_path):
    script = textwrap.dedent(f'''
        from robustbench_knn.config import apply_overrides, get_model_config
        from robustbench_knn.data import load_cifar10
        from robustbench_knn.paper.train import train_model
        cfg = apply_overrides(get_model_config("full"), {TINY_SETS!r})
        t = train_model(cfg, load_cifar10({str(tiny_data_dir)!r}, download=False), device="cpu", progress=False)
        print("loaded" if t.from_cache else "trained")
    ''')
    procs = [subprocess.Popen([sys.executable, "-c", script], env=_env(tmp_path / "c"), stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    said = sorted(p.communicate(timeout=600)[0].strip() for p in procs)
    assert said == ["loaded", "trained"]


def test_parts_of_a_cell_combine_and_overlaps_are_refused():
    def part(batches, robust):
        return {"batches": batches, "n_batches": 3, "n_attacked": 4, "valid": True, "seconds": 1.0, "params": {},
                "violations": {"n_nonfinite": 0, "n_out_of_box": 0, "n_out_of_ball": 0, "max_linf": 0.01},
                "n_zero_or_nonfinite_grad": 1, "surrogate_fooled_decision_right": 2, "robust": robust}

    cell = combine_parts([part([0, 2], [1, 0, 0, 1, 0]), part([1], [0, 1, 0, 0, 0])])
    assert cell["robust"] == [1, 1, 0, 1, 0] and cell["robust_acc"] == 60.0 and cell["batches"] == [0, 1, 2]
    assert cell["seconds"] == 2.0 and cell["n_zero_or_nonfinite_grad"] == 2 and cell["zero_or_nonfinite_grad_frac"] == 0.5
    with pytest.raises(ValueError, match="overlap"):
        combine_parts([part([0, 1], [0] * 5), part([1, 2], [0] * 5)])


def test_shard_argument_and_ownership():
    assert parse_shard("1/3") == Partition(1, 3, group=False)
    assert [b for b in range(7) if Partition(1, 3).owns(b)] == [1, 4]
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)
