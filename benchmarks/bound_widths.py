"""How wide the certificates' embedding boxes are: per ε, the mean width of a model's embedding box over the first
test images from interval bound propagation alone and intersected with the linear (CROWN-IBP) bounds, beside the
embedding's own scale and its distances to the bank. A box far wider than those distances cannot certify a point.

    python benchmarks/bound_widths.py --model full --eps 0.001,1/255 --n 5
"""

from __future__ import annotations

import argparse
import platform

import torch
from tabulate import tabulate

from robustbench_knn.cli.parser import parse_eps
from robustbench_knn.config import get_model_config
from robustbench_knn.data import load_cifar10
from robustbench_knn.evaluation.bounds import embedding_bounds, input_box, propagate
from robustbench_knn.paper.classifier import build_classifier
from robustbench_knn.paper.train import train_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="full", help="a model of this project (trained or loaded from the cache)")
    ap.add_argument("--eps", default="0.001,1/255")
    ap.add_argument("--norm", default="Linf")
    ap.add_argument("--n", type=int, default=5, help="first N test images")
    args = ap.parse_args()
    data = load_cifar10(None)
    clf = build_classifier(train_model(get_model_config(args.model), data, device="cpu", progress=False))
    x = data.test.floats()[:args.n]
    with torch.no_grad():
        e = clf.embed(x).double()
        d = torch.cdist(e, clf.bank.double())
    rows = []
    for eps in parse_eps(args.eps, args.norm):
        box = input_box(x, eps, args.norm)
        ibp = propagate(clf.net, box)
        both = embedding_bounds(clf, box)
        rows.append([f"{eps:.6g}", f"{(ibp.hi - ibp.lo).mean():.4g}", f"{(both.hi - both.lo).mean():.4g}"])
    print(f"{args.model}, {args.norm}, first {args.n} test images, CPU {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print(f"embedding: mean |coordinate| {e.abs().mean():.4g}; distance to the nearest bank point {d.min(1).values.mean():.4g}, "
          f"median distance {d.median(1).values.mean():.4g}")
    print(tabulate(rows, headers=["eps", "IBP mean width", "IBP ∩ linear mean width"], tablefmt="github"))


if __name__ == "__main__":
    main()
