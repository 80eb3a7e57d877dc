"""The §2.5 potentials + gradient alone on FULL's shapes with random data, by each path: the C kernel (``native``, the
CPU's default), the compiled blocks (``fused``, ``ROBUSTBENCH_KNN_NATIVE=0``) and eager blocks
(``ROBUSTBENCH_KNN_COMPILE=0``): the first call in the process (which compiles, from the inductor cache when it is
filled), later calls of each path, the attack loss (kFGSM's objective: one potential per point, its gradient made in
the forward's pass) by each path, and the matmuls the torch blocks need (squared distances in the forward and again
in the backward, each with its add of the norms; the gradient's Q·B) timed by themselves.

    python benchmarks/fused_potentials.py [--batch 250 --bank 50000 --repeats 5 --threads 1]

Point TORCHINDUCTOR_CACHE_DIR at an empty folder to time a first compilation.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from robustbench_knn import distances, native
from robustbench_knn.defenses.potential import attack_loss, class_potentials
from robustbench_knn.devices import COMPILE_ENV


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--bank", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bank, labels = torch.randn(args.bank, 30) * 3, torch.randint(0, 10, (args.bank,))
    emb, y = torch.randn(args.batch, 30) * 3, torch.randint(0, 10, (args.batch,))

    def potentials() -> None:
        e = emb.clone().requires_grad_(True)
        class_potentials(e, bank, labels, n_spaces=2, lam=0.5, l0=7.0).sum().backward()

    def loss() -> None:
        e = emb.clone().requires_grad_(True)
        attack_loss(e, y, bank, labels, n_spaces=2, lam=0.5, l0=7.0).sum().backward()

    blocks = distances.BankBlocks(emb, bank, 2)
    sq = blocks.squared(0, blocks.width)

    def matmuls() -> None:
        for s, t in blocks.ranges():
            sq_block = blocks.squared(s, t)  # forward's distances; the backward computes them once more
            blocks.squared(s, t)
            blocks.backprop_q(s, t, sq_block, sq[:, :, :1])

    def seconds(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    paths = {"native": ("1", "1"), "fused": ("1", "0"), "eager": ("0", "0")}  # (COMPILE_ENV, NATIVE_ENV)

    def use(path: str) -> None:
        os.environ[COMPILE_ENV], os.environ[native.NATIVE_ENV] = paths[path]

    use("fused")
    first = seconds(potentials)
    seconds(loss)  # its own kernel compiles too
    use("native")
    first_native = seconds(potentials)
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so a change in the host's speed hits every path alike
        for name, fn in (("potentials", potentials), ("attack loss", loss)):
            for path in paths:
                use(path)
                best[f"{name}, {path}"] = min(best.get(f"{name}, {path}", float("inf")), seconds(fn))
        best["matmuls"] = min(best.get("matmuls", float("inf")), seconds(matmuls))
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"batch {args.batch}, bank {args.bank} x 30, 2 sub-spaces, block width {blocks.width}")
    print(f"first call of the compiled blocks (compiles): {first:.2f} s; of the C kernel (compiles unless the "
          f"cache holds it): {first_native:.2f} s")
    for name, t in best.items():
        print(f"{name}: {t:.3f} s (best of {args.repeats})")


if __name__ == "__main__":
    main()
