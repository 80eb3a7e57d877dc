"""What a full-test-set evaluation costs, predicted from a measured one: seconds per attacked image of every cell of
an ``evaluate`` result JSON, then the wall time of the same cells on ``--n`` images over 1, 8 and 64 processes.

    python benchmarks/cost_model.py tables/evaluate/evaluate-full-f37494becba4-potential.json --eps 8/255

Model: an evaluation attacks the clean-correct images (the measured clean fraction of ``--n``) in global batches
of ``--batch-size``; each process runs whole batches, so the wall time on N processes is
``ceil(batches / N) × batch seconds`` (a process with no batch idles: more processes than batches gain nothing;
a smaller batch spreads the work, and the per-image cost is assumed not to grow as batches shrink, which on a GPU
is optimistic). Model loading, the bank's embedding and the clean pass are not included: they are paid once per
process, in parallel (seconds on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustbench_knn.attacks import ADAPTIVE_SUITE, STANDARD_SUITE, get_attack  # noqa: E402

SUITES = {"standard": STANDARD_SUITE, "adaptive": ADAPTIVE_SUITE}


def per_image(result: dict, eps: float) -> dict[str, float]:
    """Seconds per attacked image of each cell at ``eps`` (a merged result's ``seconds`` sum every process's)."""
    (row,) = [r for r in result["per_eps"] if abs(r["eps"] - eps) < 1e-9]
    return {k: a["seconds"] / max(a["n_attacked"], 1) for k, a in row["attacks"].items()}


def wall(sec_per_image: float, n_attacked: int, batch: int, procs: int) -> float:
    batches = math.ceil(n_attacked / batch)
    return math.ceil(batches / procs) * min(batch, n_attacked) * sec_per_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="an evaluate result JSON (single run or merged)")
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--n", type=int, default=10_000, help="images of the predicted run")
    ap.add_argument("--procs", default="1,8,64")
    ap.add_argument("--batch-size", type=int, default=250)
    args = ap.parse_args()
    result = json.loads(Path(args.result).read_text())
    eps = float(Fraction(args.eps))
    costs = per_image(result, eps)
    frac = result["clean_acc_full"] / 100
    n_att = round(frac * args.n)
    procs = [int(p) for p in args.procs.split(",")]
    print(f"{result['model']} on {result['device']} ({result.get('dataset', '')}), ε = {args.eps}: measured on "
          f"{result['n_test']} images; predicted for {args.n} images, {n_att} of them clean-correct "
          f"({100 * frac:.2f}%), batches of {args.batch_size}")
    rows = [[k, f"{1000 * s:.2f}", *[f"{wall(s, n_att, args.batch_size, p):.0f}" for p in procs]]
            for k, s in costs.items()]
    for name, members in SUITES.items():
        keys = [get_attack(m).key for m in members]
        if all(k in costs for k in keys):
            s = sum(costs[k] for k in keys)
            rows.append([f"{name} suite ({len(keys)} attacks)", f"{1000 * s:.2f}",
                         *[f"{wall(s, n_att, args.batch_size, p):.0f}" for p in procs]])
            # with more processes than batches, smaller batches keep every process busy
            small = [max(1, min(args.batch_size, math.ceil(n_att / p))) for p in procs]
            rows.append([f"  … batch = attacked / procs ({', '.join(map(str, small))})", "",
                         *[f"{wall(s, n_att, b, p):.0f}" for b, p in zip(small, procs)]])
        else:
            missing = [k for k in keys if k not in costs]
            rows.append([f"{name} suite", "not measured: " + ", ".join(missing), *[""] * len(procs)])
    print(tabulate(rows, headers=["cell", "ms / attacked image", *[f"wall s, {p} proc" for p in procs]],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
