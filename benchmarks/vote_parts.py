#!/usr/bin/env python3
"""The hard vote's CPU parts on FULL's shapes (random data; the cost does not depend on it), each path's best of
``--repeats`` calls, taking turns: the candidate selection (``topk`` against the C selection, c = 1,000 of the
bank's 50,000 float32 distances per point) and the whole vote with the C kernels on and off, with the float32 scan's
buffers fresh for every call (as before they were kept) and kept between calls.

    python benchmarks/vote_parts.py [--batch 250 --repeats 5 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import robustbench_knn.defenses.knn as knn
from robustbench_knn import native
from robustbench_knn.distances import pairwise_distance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bank, labels = torch.randn(50000, 30) * 3, torch.randint(0, 10, (50000,))
    emb = torch.randn(args.batch, 30) * 3
    dist = pairwise_distance(emb, bank, 2)
    c = 800 + 800 // 4  # _refine's candidate count for k = 800

    def vote(flag: str, kept: bool):
        def run() -> None:
            os.environ[native.NATIVE_ENV] = flag
            if not kept:
                knn._SCAN.buffers = []  # a fresh buffer, page-faulted in on its first write
            knn.knn_votes(emb, bank, labels, k=800, n_spaces=2, n_classes=10)
        return run

    parts = {
        "selection: topk": lambda: torch.topk(dist, c, dim=1, largest=False, sorted=False),
        "selection: C": lambda: native.smallest_candidates(dist, c),
        "vote: topk, fresh buffers": vote("0", False),
        "vote: C selection, fresh buffers": vote("1", False),
        "vote: C selection, kept buffers": vote("1", True),
    }
    a, b = native.smallest_candidates(dist, c), torch.topk(dist, c, dim=1, largest=False)
    same = all(set(a[0][r].tolist()) == set(b.indices[r].tolist()) for r in range(len(dist)))
    best = dict.fromkeys(parts, float("inf"))
    for name, fn in parts.items():
        fn()  # warm-up: the library, the bank's kept layout
    for _ in range(args.repeats):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    os.environ[native.NATIVE_ENV] = "1"
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__}; batch {args.batch}, bank 50000 x 30, k = 800, c = {c}; "
          f"C selection = topk's set: {same}")
    for name, t in best.items():
        print(f"{name}: {1e3 * t:.1f} ms (best of {args.repeats})")


if __name__ == "__main__":
    main()
