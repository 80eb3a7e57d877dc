"""The exact k-NN vote over a wide bank, through the projection screen (``defenses/screen.py``) against a scan of
the whole bank: deep k-NN (row A's 2078 penultimate features) and raw-pixel k-NN (3072 values), 50,000 points each,
at the batch sizes attacks ask about. Queries: the first test images and, as a query attack's iterates are, the same
images with every pixel moved by ±ε. Each size is timed as the best of ``--repeats`` calls per path, the two paths
taking turns (a drift of the host's speed hits both); votes and distance sums must be identical.

    python benchmarks/wide_bank_vote.py [--subjects deep_knn_a,raw_pixel_knn --batches 1,5,35,250 --repeats 3]

Deep k-NN's row A comes from the model cache (trained if missing); raw-pixel k-NN uses k = 3 (its validation
choice) unless ``--choose-k``. ``--attacks softknn-apgd,vote-square --n-attack 20`` also runs those attacks on the
first correctly classified test images twice, the vote scanning and screening, each from the same seed: their
seconds, and whether the adversarial examples are identical (they must be). ``--json FILE`` writes the figures with
the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from tabulate import tabulate

from robustbench_knn.attacks import get_attack
from robustbench_knn.cli.parser import parse_eps
from robustbench_knn.data import load_cifar10
from robustbench_knn.defenses import knn, screen, subjects
from robustbench_knn.defenses.knn import knn_votes


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def attack_both_ways(defense: torch.nn.Module, data, attack: str, eps: float, n: int) -> dict:
    """``attack`` on the first ``n`` correctly voted test images, the vote scanning then screening, same seed."""
    head = data.test.head(4 * n)
    x, y = head.floats().to(defense.device), head.y.to(defense.device)
    keep = (defense.predict(x) == y).nonzero().squeeze(1)[:n]
    x, y = x[keep], y[keep]
    out, seconds = [], []
    try:
        for on in (False, True):
            knn.uses_screen = screen.uses_screen if on else (lambda *_: False)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            out.append(get_attack(attack).build(defense, eps)(x, y))
            seconds.append(time.perf_counter() - t0)
    finally:  # the vote's own switch again, even when an attack fails
        knn.uses_screen = screen.uses_screen
    return {"attack": attack, "n": len(x), "scan_s": seconds[0], "screen_s": seconds[1],
            "identical": torch.equal(out[0], out[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="deep_knn_a,raw_pixel_knn")
    ap.add_argument("--batches", default="1,5,35,250")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--choose-k", action="store_true", help="raw-pixel k-NN: choose k on the validation split")
    ap.add_argument("--attacks", default="", help="comma list of attacks to run both ways, e.g. softknn-apgd")
    ap.add_argument("--n-attack", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    eps = parse_eps(args.eps)[0]
    data = load_cifar10()
    x = data.test.head(max(batches)).floats()
    g = torch.Generator().manual_seed(0)
    moved = (x + eps * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)).clamp(0, 1)
    rows, records, attack_rows = [], [], []
    for name in args.subjects.split(","):
        kwargs = {} if name != "raw_pixel_knn" or args.choose_k else {"k": 3}
        defense = getattr(subjects, name)(**kwargs)
        bank, labels = defense.bank, defense.bank_labels
        t0 = time.perf_counter()
        screen._SCREENS.get(bank)  # built once per bank, outside the per-call times
        build_s = time.perf_counter() - t0
        for kind, images in (("test images", x), ("±ε moved", moved)):
            with torch.no_grad():
                emb = defense.embed(images.to(defense.device))
            for b in batches:
                q = emb[:b]

                def vote(on: bool) -> tuple[torch.Tensor, torch.Tensor]:
                    return knn_votes(q, bank, labels, k=defense.k, n_spaces=1, n_classes=defense.n_classes,
                                     screen=on)
                same = all(torch.equal(a, c) for a, c in zip(vote(False), vote(True)))  # also the warm-up
                scan = screened = float("inf")
                for _ in range(args.repeats):  # turns: each path's best of the repeats
                    scan = min(scan, best_of(lambda: vote(False), 1))
                    screened = min(screened, best_of(lambda: vote(True), 1))
                rows.append([name, kind, b, f"{1e3 * scan:.1f}", f"{1e3 * screened:.1f}", f"{scan / screened:.1f}",
                             same])
                records.append({"subject": name, "k": defense.k, "queries": kind, "batch": b, "scan_s": scan,
                                "screen_s": screened, "speedup": scan / screened, "identical": same,
                                "screen_build_s": build_s})
        print(f"{name}: k = {defense.k}, bank {tuple(bank.shape)}, screen built in {build_s:.1f} s", flush=True)
        for attack in filter(None, args.attacks.split(",")):
            record = attack_both_ways(defense, data, attack, eps, args.n_attack)
            attack_rows.append([name, attack, record["n"], f"{record['scan_s']:.1f}", f"{record['screen_s']:.1f}",
                                f"{record['scan_s'] / record['screen_s']:.2f}", record["identical"]])
            records.append({"subject": name, **record})
            print(f"  {attack}: {attack_rows[-1][3:]}", flush=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "command": "python " + " ".join(sys.argv)}
    print(f"torch {meta['torch']}, {meta['processor']}, {meta['threads']} threads; eps {args.eps}; best of "
          f"{args.repeats}")
    print(tabulate(rows, headers=["subject", "queries", "batch", "scan ms", "screen ms", "scan / screen",
                                  "identical votes"], tablefmt="github"))
    if attack_rows:
        print(tabulate(attack_rows, headers=["subject", "attack", "images", "scan s", "screen s", "scan / screen",
                                             "identical examples"], tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": records}, f, indent=1)


if __name__ == "__main__":
    main()
