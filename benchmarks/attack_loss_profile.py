#!/usr/bin/env python3
"""Where the §2.5 attack loss with its gradient (kFGSM's k-NN part) spends its time: ``torch.profiler`` over a few
calls on FULL's architecture (random weights, 50,000 × 30 bank), the operators with the most self time.

    python benchmarks/attack_loss_profile.py --batch 250 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustbench_knn.config import get_model_config  # noqa: E402
from robustbench_knn.defenses.potential import attack_loss  # noqa: E402
from robustbench_knn.devices import block_elements, resolve_device  # noqa: E402
from robustbench_knn.paper.classifier import KNNClassifier  # noqa: E402
from robustbench_knn.paper.model import IdResNet  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3, help="profiled calls (after 3 warm-ups)")
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device("auto")
    cfg = get_model_config("full")
    torch.manual_seed(0)
    net = IdResNet(cfg.model).to(dev).eval()
    clf = KNNClassifier(net, torch.randn(50000, cfg.model.w_p, device=dev) * 3,
                        torch.randint(0, cfg.model.n_classes, (50000,), device=dev), cfg)
    emb = torch.randn(args.batch, cfg.model.w_p, device=dev) * 3
    y = torch.randint(0, cfg.model.n_classes, (args.batch,), device=dev)
    opts = dict(n_spaces=clf.n_spaces, lam=clf.lam, l0=clf.l0, n_classes=clf.n_classes)

    def call() -> None:
        e = emb.clone().requires_grad_(True)
        torch.autograd.grad(attack_loss(e, y, clf.bank, clf.bank_labels, **opts).sum(), e)

    for _ in range(3):
        call()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    seconds = (time.perf_counter() - t0) / args.calls
    print(f"device {dev}, {args.threads} thread(s), torch {torch.__version__}, batch {args.batch}, "
          f"block budget {block_elements(dev)}: {1e3 * seconds / args.batch:.3f} ms per image unprofiled")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.calls):
            call()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
