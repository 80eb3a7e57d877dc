#!/usr/bin/env python3
"""Reproduce the committed results on one GPU machine with one command, under a wall-clock deadline.

Each plan is lists of ``robustbench-knn`` commands ("lanes", run side by side, each in-process: one import and
one CUDA context per lane), most important first:

- ``regenerate``: the recipe search at the paper's 20 epochs, which chooses FULL's recipe, then (A) Table 1, the
  audits of FULL at 8/255 and 16/255 on 1000 images, the standard + adaptive evaluation of FULL, Figure 3, the
  100-epoch variant's audits and (B) Table 2, §3.5 and the cross-toolkit table;
- ``trust``: FULL's toolkit attacks with and without aligned logits, the audits with the active test, the default
  suite, the two subjects and the masked example defense, AutoAttack standard on rows A, B and FULL;
- ``scale``: FULL on all 10,000 test images;
- ``step-deep16``: one attack step part by part (``bench --steps``), deep k-NN's full audit at 16/255 on 500
  and then 1000 test images (the second reusing the first's cells), and ``bench``.
- ``toolkits``: the whole cross-toolkit table on one FULL, one lane per slow attack, toolkit and surrogate
  (joined afterwards with ``robustbench-knn toolkits --merge``).

A step that would outrun the deadline is interrupted like Ctrl-C (the commands keep what they finished and
render partial tables honestly; their cells are cached, so a second run resumes); a failing step is logged and
the next one runs. Each step's rc and seconds go to ``tables/reproduce/<plan>/``; ``tables/`` and the cache's
small files are packed into ``OUT/results.tgz`` every minute and at the end.

    python3 benchmarks/reproduce.py --plan trust --out "$OUT" --deadline 540        # on the GPU machine
    python benchmarks/reproduce.py --plan trust --tiny --out /tmp/try --deadline 900  # CPU rehearsal, tiny settings
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLKIT_ATTACKS = "kfgsm,pgd,apgd,apgd-t,autoattack,apgd-dlr,fab-t,square"  # the must-haves first
EVALUATE_ATTACKS = ("kfgsm,aa:apgd,aa:apgd-t,aa:apgd-dlr,aa:square,feature,softknn-apgd,softknn-apgd-dlr,"
                    "vote-square,transfer")
# Tiny settings for the CPU rehearsal: every step runs, nothing is worth reporting.
TINY = ["--set", "model.w_r=64", "--set", "train.n_train=2000", "--set", "k=15"]


class Deadline(KeyboardInterrupt):
    """Raised by the alarm: the commands treat it as Ctrl-C (partial results saved)."""


def _alarm(signum, frame):  # noqa: ANN001
    raise Deadline()


def recipe_sets(search_out: Path, epochs: int) -> list[str]:
    """The best validation variant's settings as ``--set`` arguments (the search's choice, applied)."""
    from robustbench_knn.paper.search import best_variant

    best = best_variant(search_out, epochs)
    sets = []
    for section, values in best["overrides"].items():
        sets += [x for key, val in values.items() for x in ("--set", f"{section}.{key}={json.dumps(val)}")]
    print(f"chosen recipe: {best['variant']} (val {best['val_acc']}%) -> {' '.join(sets)}", flush=True)
    return sets


def plan(tiny: bool) -> tuple[list[str], dict[str, list[tuple[str, list[str]]]]]:
    """The search's argv, then two lanes of (step name, argv without the recipe's --set) run side by side:
    one attack run keeps the GPU a fraction busy (batches of 250 through a small MLP), so two lanes finish
    sooner. Lane A's Table 1 trains FULL first; lane B's Table 2 reaches FULL last and reuses its row."""
    t = TINY if tiny else []
    n = ["--n-test", "20"] if tiny else ["--n-test", "1000"]
    ep = ["--epochs", "1"] if tiny else []
    ep100 = ["--epochs", "2"] if tiny else []
    search = ["search", "--report-test", "--out", "tables/recipe_search"]
    if tiny:
        search += ["--epochs", "1", "--n-train", "2000", "--set", "model.w_r=64",
                   "--variants", "image_3e-4_mean2,position_3e-4_mean2"]
    q = ["--quiet"]

    def audit(model: str, eps: str, extra: list[str]) -> list[str]:
        return ["audit", "--model", model, *q, *n, *extra, "--eps", eps, "--out", "tables/audit", *t]

    lanes = {
        "A": [
            ("table1", ["table", *q, *n, *ep, "--out", "tables", *t]),
            ("audit-full-8", audit("full", "8/255", ep)),
            ("audit-full-16", audit("full", "16/255", ep)),
            # after the audits: their cells (same attacks, same images) are reused
            ("evaluate-full", ["evaluate", "--model", "full", *q, *n, *ep, "--eps", "8/255,16/255",
                               "--attacks", EVALUATE_ATTACKS, "--out", "tables/evaluate", *t]),
            ("figure3", ["audit", "--model", "full", "--figure3", *q, *ep, "--out", "tables/figures", *t]),
            ("audit-100ep-8", audit("full-100ep", "8/255", ep100)),
            ("audit-100ep-16", audit("full-100ep", "16/255", ep100)),
        ],
        "B": [
            ("table2", ["table", "--ablation", *q, *n, *ep, "--out", "tables", *t]),
            ("untrained", ["table", "--untrained", *q, *n, "--out", "tables", *t]),
            ("toolkits", ["toolkits", "--model", "full", *q, *n, *ep, "--attacks", TOOLKIT_ATTACKS,
                          "--out", "tables/toolkits", *t]),
        ],
    }
    return search, lanes


def trust_plan(tiny: bool) -> tuple[list[str] | None, dict[str, list[tuple[str, list[str]]]]]:
    """The default suite, the audits with the active test, and the subjects (no recipe search: FULL is the
    committed default). (A) FULL: AutoAttack's APGD-CE, APGD-T and Square with and without aligned logits, the
    audits at 8/255 and 16/255 with the active test, then the default suite (reusing the audits' cells);
    (B) deep k-NN on row A and (C) raw-pixel k-NN: audits with the active test, then the default suite;
    (D) the CE rows A and B and FULL under AutoAttack standard."""
    t = TINY if tiny else []
    n = ["--n-test", "20"] if tiny else ["--n-test", "1000"]
    n500 = ["--n-test", "20"] if tiny else ["--n-test", "500"]
    act = ["--active-test", "8" if tiny else "100"]
    ep = ["--epochs", "1"] if tiny else []
    q = ["--quiet"]
    both = ["--eps", "8/255,16/255"]

    def full(*argv: str, model: str = "full") -> list[str]:
        return [argv[0], "--model", model, *q, *n, *ep, *argv[1:], *t]

    lanes: dict[str, list[tuple[str, list[str]]]] = {
        "A": [
            ("full-aa-aligned", full("evaluate", "--eps", "8/255", "--attacks", "aa:apgd,aa:apgd-t,aa:square",
                                     "--out", "tables/aligned")),
            ("full-aa-unaligned", full("evaluate", "--eps", "8/255", "--attacks", "aa:apgd,aa:apgd-t,aa:square",
                                       "--unaligned", "--out", "tables/aligned")),
            ("audit-full-8", full("audit", "--eps", "8/255", *act, "--out", "tables/audit")),
            ("evaluate-full", full("evaluate", *both, "--out", "tables/evaluate")),
            ("audit-full-16", full("audit", "--eps", "16/255", *act, "--out", "tables/audit")),
        ],
        "B": [], "C": [],
        "D": [(f"autoattack-{m}", full("evaluate", *both, "--attacks", "aa:autoattack", "--out", "tables/autoattack",
                                       model=m)) for m in ("a", "b", "full")],
    }
    # the gradient-masked example defense (examples/masked_defense.py): must come out unreliable and not trusted
    masked = ["--model", "examples.masked_defense:build", *q, "--n-test", "20" if tiny else "100"]
    lanes["D"] = [("evaluate-masked", ["evaluate", *masked, "--eps", "8/255", "--out", "tables/masked"]),
                  ("audit-masked", ["audit", *masked, "--eps", "8/255", *act, "--out", "tables/masked"]),
                  *lanes["D"]]
    for lane, subject in (("B", "deep_knn_a"), ("C", "raw_pixel_knn")):
        model = ["--model", f"robustbench_knn.defenses.subjects:{subject}", *q, *n500, "--surrogate", "softknn"]
        lanes[lane] = [
            *((f"audit-{subject}-{e}", ["audit", *model, "--eps", f"{e}/255", *act, "--out", "tables/subjects"])
              for e in (8, 16)),
            (f"evaluate-{subject}", ["evaluate", *model, *both, "--out", "tables/subjects"]),
        ]
    return None, lanes


def scale_plan(tiny: bool) -> tuple[list[str], dict[str, list[tuple[str, list[str]]]]]:
    """Issue 13's GPU figures: FULL on all 10,000 test images at 8/255 under kFGSM, AutoAttack standard and the
    adaptive suite, one cell after another (each cached as it finishes, so a second call resumes), on one GPU.
    ``benchmarks/cost_model.py`` turns its per-cell seconds into the README's cost model."""
    search, _ = plan(tiny)
    t = TINY if tiny else []
    n = ["--n-test", "20"] if tiny else ["--n-test", "10000"]
    ep = ["--epochs", "1"] if tiny else []
    return search, {"A": [("evaluate-full-10k", ["evaluate", "--model", "full", "--quiet", *n, *ep, "--eps", "8/255",
                                                  "--attacks", "kfgsm,aa:autoattack,adaptive",
                                                  "--out", "tables/evaluate-10k-gpu", *t])]}


def step_deep16_plan(tiny: bool) -> tuple[None, dict[str, list[tuple[str, list[str]]]]]:
    """One lane, in order of worth: the attack step's parts against the network on the GPU (issue 22's ratios),
    deep k-NN on row A audited at 16/255 with the active test and transfer from row B on 500 test images, then
    on 1000 (its first 500 images' cells come from the cache), then ``bench``'s throughput pairs. The audits
    match the CPU's 300-image command (``--no-certify``: a certificate at 16/255 is not the gap)."""
    n500, n1000 = (["--n-test", "20"], ["--n-test", "40"]) if tiny else (["--n-test", "500"], ["--n-test", "1000"])
    model = ["--model", "robustbench_knn.defenses.subjects:deep_knn_a", "--quiet", "--eps", "16/255",
             "--surrogate", "softknn", "--transfer-source", "b", "--active-test", "8" if tiny else "100",
             "--no-certify"]
    if tiny:
        model += ["--batch-size", "10"]
    return None, {"A": [
        ("bench-steps", ["bench", "--steps", "--batches", "50,100" if tiny else "250,1000,10000",
                         "--repeats", "2" if tiny else "10"]),
        ("audit-deep_knn_a-16-500", ["audit", *model, *n500, "--out", "tables/eps16-audit-500"]),
        ("bench", ["bench", "--repeats", "1" if tiny else "3"]),
        ("audit-deep_knn_a-16-1000", ["audit", *model, *n1000, "--out", "tables/eps16-audit-1000"]),
    ]}


def toolkits_plan(tiny: bool) -> tuple[None, dict[str, list[tuple[str, list[str]]]]]:
    """The whole cross-toolkit table (every attack of ``TOOLKIT_ATTACKS``, toolkit and surrogate, both ε) on one
    FULL and the first 500 test images, split into one lane per slow attack × toolkit × surrogate (ART's
    AutoAttack at 8/255 also per ε) so that they run side by side; the lanes' first step trains FULL once (the
    others wait on the model's lock and load it). Each lane writes its own table into
    ``tables/toolkits/gpu-500/lanes/<lane>/``; ``robustbench-knn toolkits --merge`` joins them afterwards."""
    t = TINY if tiny else []
    n = ["--n-test", "20"] if tiny else ["--n-test", "500"]
    ep = ["--epochs", "1"] if tiny else []

    def part(lane: str, attacks: str, *extra: str) -> tuple[str, list[str]]:
        return (f"toolkits-{lane}", ["toolkits", "--model", "full", "--quiet", *n, *ep, "--attacks", attacks, *extra,
                                     "--out", f"tables/toolkits/gpu-500/lanes/{lane}", *t])

    lanes: dict[str, list[tuple[str, list[str]]]] = {
        "base": [part("base", "kfgsm,pgd,apgd,apgd-dlr")],
        "apgd-t": [part("apgd-t", "apgd-t")],
        "fab-t": [part("fab-t", "fab-t")],
    }
    for attack in ("square", "autoattack"):
        for tk in ("ta", "aa", "art"):
            for sur in ("potential", "softknn"):
                lane, sel = f"{attack}-{tk}-{sur}", ["--toolkits", tk, "--surrogates", sur]
                if attack == "autoattack" and tk == "art":  # ART's AutoAttack at 8/255 is the slowest cell by far
                    lanes[lane] = [part(lane, attack, *sel, "--eps", "8/255")]
                else:
                    lanes[lane] = [part(lane, attack, *sel)]
    lanes["autoattack-art-16"] = [part("autoattack-art-16", "autoattack", "--toolkits", "art", "--eps", "16/255")]
    return None, lanes


PLANS = {"regenerate": plan, "trust": trust_plan, "scale": scale_plan, "step-deep16": step_deep16_plan,
         "toolkits": toolkits_plan}


def machine() -> dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(Exception):
        info["nvidia-smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    return info


def pack(out: Path, cache: Path) -> None:
    """tables/ + the cache's small files (train logs, cells; no weights) → OUT/results.tgz."""
    tmp = out / ".results.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(ROOT / "tables", arcname="tables")
        if cache.is_dir():
            for f in sorted(cache.rglob("*")):
                if f.is_file() and f.suffix != ".safetensors" and f.stat().st_size < 4_000_000:
                    tar.add(f, arcname=f"cache/{f.relative_to(cache)}")
    os.replace(tmp, out / "results.tgz")


def run_steps(steps: list[tuple[str, list[str] | None]], sets: list[str], deadline: float, log_path: Path,
              search_epochs: int = 20) -> list[str]:
    """Run CLI steps in this process until the (epoch-seconds) deadline; log each to ``log_path``.
    Returns the recipe's --set list when a step is the choice (argv None)."""
    from robustbench_knn.cli import main as cli

    signal.signal(signal.SIGALRM, _alarm)
    log: list[dict] = []
    for name, argv in steps:
        left = deadline - time.time()
        entry: dict = {"step": name}
        if left < 5:
            entry["skipped"] = "deadline"
        else:
            print(f"== {name} ({left:.0f} s left)", flush=True)
            s0 = time.monotonic()
            try:
                if argv is None:
                    sets = recipe_sets(ROOT / "tables" / "recipe_search", search_epochs)
                    entry["sets"] = sets
                else:
                    entry["argv"] = [*argv, *sets]
                    signal.alarm(max(1, int(left)))
                    try:
                        entry["rc"] = cli(entry["argv"])
                    finally:
                        signal.alarm(0)
            except Deadline:
                entry["rc"] = "deadline"
            except BaseException as e:  # noqa: BLE001 - one failing step must not cost the others
                entry["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
                traceback.print_exc()
            entry["seconds"] = round(time.monotonic() - s0, 1)
        log.append(entry)
        print(f"== {name}: {json.dumps({k: v for k, v in entry.items() if k != 'argv'})}", flush=True)
        log_path.write_text(json.dumps(log, indent=2) + "\n")
    return sets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for results.tgz")
    ap.add_argument("--deadline", type=float, default=540, help="seconds from start until the last step is stopped")
    ap.add_argument("--reserve", type=float, default=15, help="seconds kept for packing the results")
    ap.add_argument("--tiny", action="store_true", help="CPU rehearsal with tiny settings")
    ap.add_argument("--only", help="comma list of step names (default: all)")
    ap.add_argument("--plan", choices=tuple(PLANS), default="regenerate",
                    help="regenerate: recipe search, tables, audits; trust: default suites, audits with the active "
                         "test, subjects and AutoAttack standard; scale: FULL on the 10k test set; step-deep16: "
                         "the attack step's parts, deep k-NN's audit at 16/255; toolkits: the whole "
                         "cross-toolkit table, one lane per slow attack")
    ap.add_argument("--threads", type=int, default=4, help="CPU threads per lane")
    ap.add_argument("--lane", help=argparse.SUPPRESS)  # internal: run one lane (with --sets, --deadline-at)
    ap.add_argument("--sets", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-at", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    cache = Path(os.environ.setdefault("ROBUSTBENCH_KNN_CACHE", str(Path.home() / ".cache" / "robustbench-knn")))
    logs = ROOT / "tables" / "reproduce" / args.plan
    logs.mkdir(parents=True, exist_ok=True)
    search, lanes = PLANS[args.plan](args.tiny)
    only = set(args.only.split(",")) if args.only else None

    def keep(steps: list) -> list:
        return [s for s in steps if only is None or s[0] in only or s[1] is None]

    if args.lane:
        import torch

        torch.set_num_threads(args.threads)
        run_steps(keep(lanes[args.lane]), json.loads(args.sets), args.deadline_at, logs / f"lane-{args.lane}.json")
        return 0

    t0 = time.time()
    deadline = t0 + args.deadline - args.reserve
    (logs / "machine.json").write_text(json.dumps(machine(), indent=2) + "\n")
    sets = (run_steps(keep([("search", search), ("choose", None)]), [], deadline, logs / "search.json",
                      1 if args.tiny else 20) if search is not None else [])
    procs = {lane: subprocess.Popen([sys.executable, __file__, "--out", str(out), "--lane", lane, "--plan", args.plan,
                                     "--sets", json.dumps(sets), "--deadline-at", str(deadline),
                                     "--threads", str(args.threads)]
                                    + (["--tiny"] if args.tiny else []) + (["--only", args.only] if args.only else []))
             for lane in lanes}
    while any(p.poll() is None for p in procs.values()):
        time.sleep(5)
        if time.time() > deadline + 10:  # a lane stuck in C code past its alarm
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
        elif int(time.time() - t0) % 60 < 5:
            pack(out, cache)
    (logs / "total.json").write_text(json.dumps({"seconds": round(time.time() - t0, 1),
                                                 "lanes_rc": {k: p.returncode for k, p in procs.items()}}) + "\n")
    pack(out, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
