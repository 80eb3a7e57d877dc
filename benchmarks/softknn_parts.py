"""Where the soft-kNN surrogate's forward goes, on FULL's shapes with random data (prints figures; no thresholds):
the network alone (forward + input gradient, the reference of ``bench --steps``), the block distances into the
N x M matrix that the vote reuses, the per-class column gather of that matrix, the per-class top-m on the gathered
columns (the selection before the soft-kNN logits measured distances to the bank in class order), the same top-m
on class-contiguous column ranges (the selection since), and the vote's own top-(k+1) over the whole row. Parts take
turns; each part's fastest of ``--repeats`` calls counts. ms per image and each part as a multiple of the network.

    python benchmarks/softknn_parts.py [--batch 250 --bank 50000 --m 50 --repeats 5 --threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch

from robustbench_knn.config import get_model_config
from robustbench_knn.distances import BankBlocks
from robustbench_knn.paper.model import IdResNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--bank", type=int, default=50000)
    ap.add_argument("--m", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_model_config("full")
    net = IdResNet(cfg.model).eval().requires_grad_(False)
    x = torch.rand(args.batch, 3, 32, 32)
    with torch.no_grad():
        emb = net(x)
    g = torch.randn_like(emb)
    bank = torch.randn(args.bank, emb.shape[1]) * 3
    labels = torch.randint(0, cfg.model.n_classes, (args.bank,))
    class_idx = [torch.nonzero(labels == c).squeeze(1) for c in range(cfg.model.n_classes)]
    bounds = [0, *torch.tensor([len(i) for i in class_idx]).cumsum(0).tolist()]

    def network() -> None:
        z = x.clone().requires_grad_(True)
        torch.autograd.grad((net(z) * g).sum(), z)

    def distances() -> torch.Tensor:
        blocks = BankBlocks(emb, bank, cfg.model.n_spaces)
        dist = emb.new_empty(len(emb), len(bank))
        for s, t in blocks.ranges():
            dist[:, s:t] = blocks.distances(s, t)[1]
        return dist

    dist = distances()
    by_class = dist[:, torch.cat(class_idx)].contiguous()
    parts: dict[str, Callable[[], object]] = {
        "network (forward + input gradient)": network,
        "block distances, N x M": distances,
        "per-class column gather": lambda: [dist[:, i] for i in class_idx],
        "per-class gather + top-m": lambda: [torch.topk(dist[:, i], args.m, dim=1, largest=False, sorted=False)
                                             for i in class_idx],
        "top-m on class-contiguous ranges": lambda: [
            torch.topk(by_class[:, s:t], args.m, dim=1, largest=False, sorted=False)
            for s, t in zip(bounds[:-1], bounds[1:])],
        "vote's top-(k+1), whole row": lambda: torch.topk(dist, cfg.k + 1, dim=1, largest=False, sorted=True),
    }
    best = dict.fromkeys(parts, float("inf"))
    for _ in range(args.repeats):
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"batch {args.batch}, bank {args.bank} x {emb.shape[1]}, m {args.m}, k {cfg.k}")
    ref = best["network (forward + input gradient)"]
    for name, t in best.items():
        print(f"{name}: {t * 1e3 / args.batch:.3f} ms/img, {t / ref:.2f}x network")


if __name__ == "__main__":
    main()
