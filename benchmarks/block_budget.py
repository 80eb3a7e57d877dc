#!/usr/bin/env python3
"""The blocked k-NN losses at two block budgets on one device: the CPU's (a few buffers in the last-level cache)
and the device's own (``devices.block_elements``; larger on a GPU, where each block costs kernel launches), each
with ``bench --steps``' parts, and the losses and gradients of the two compared on the same inputs (the vote
does not use the blocks).

    python benchmarks/block_budget.py --batches 250,1000,10000 --repeats 10      # on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustbench_knn import devices  # noqa: E402
from robustbench_knn.config import get_model_config  # noqa: E402
from robustbench_knn.defenses.potential import attack_loss  # noqa: E402
from robustbench_knn.evaluation.step_bench import breakdown_rows, random_step_inputs, step_breakdown  # noqa: E402


def outputs(dev: torch.device, batch: int) -> dict[str, torch.Tensor]:
    """Loss and embedding gradient of the §2.5 attack loss and of soft-kNN CE, on the step bench's inputs."""
    inp = random_step_inputs(get_model_config("full"), batch=batch, device=dev)
    clf, y = inp.clf, inp.y
    out = {}
    e = inp.emb.clone().requires_grad_(True)
    loss = attack_loss(e, y, clf.bank, clf.bank_labels, n_spaces=clf.n_spaces, lam=clf.lam, l0=clf.l0,
                       n_classes=clf.n_classes)
    out["potential loss"], out["potential grad"] = loss.detach(), torch.autograd.grad(loss.sum(), e)[0]
    e = inp.emb.clone().requires_grad_(True)
    ce = F.cross_entropy(inp.soft.surrogate(e), y, reduction="none")
    out["soft-kNN CE"], out["soft-kNN grad"] = ce.detach(), torch.autograd.grad(ce.sum(), e)[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", default="250,1000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=int, help="the second budget (default: the device's own)")
    args = ap.parse_args()
    dev = devices.resolve_device(args.device)
    os.environ.pop(devices.BLOCK_ENV, None)
    budgets = {"CPU budget": devices.CPU_BLOCK_ELEMENTS, f"{dev.type} budget": args.budget or devices.block_elements(dev)}
    print(f"device {dev} ({devices.machine_name(dev)}), torch {torch.__version__}, budgets {budgets}")
    results, outs = {}, {}
    for name, budget in budgets.items():
        os.environ[devices.BLOCK_ENV] = str(budget)
        outs[name] = outputs(dev, int(args.batches.split(",")[0]))
        results[name] = [step_breakdown(get_model_config("full"), batch=int(b), device=str(dev),
                                        repeats=args.repeats) for b in args.batches.split(",")]
    os.environ.pop(devices.BLOCK_ENV, None)
    first, second = outs.values()
    for key in first:
        scale = first[key].abs().max().clamp_min(1e-30)
        print(f"{key}: max difference {(first[key] - second[key]).abs().max().item() / scale.item():.2e} "
              "(relative to the largest value)")
    for name, res in results.items():
        print(f"\n{name} ({budgets[name]} floats per block buffer)")
        print(tabulate(breakdown_rows(res), headers="keys", tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
