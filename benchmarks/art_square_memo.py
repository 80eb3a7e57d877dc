"""ART's Square through the harness's query memo (``adapters.query_cache``) against ART's Square asking the model
directly, with AutoAttack's Square beside them: on one trained model, the same images and surrogate logits, how many
input rows each sent through the model, its seconds, and whether the memo changed ART's examples (it must not).

    python benchmarks/art_square_memo.py [--model full --n-test 100 --n-queries 300 --eps 8/255 --surrogate potential]

The model is loaded from the cache (or trained) as every command does; the logits are the raw surrogate's unless
``--aligned``.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from art.attacks.evasion import SquareAttack
from tabulate import tabulate

from robustbench_knn.adapters.art_adapter import art_estimator
from robustbench_knn.attacks import get_attack
from robustbench_knn.cli.parser import parse_eps
from robustbench_knn.config import get_model_config
from robustbench_knn.data import load_cifar10
from robustbench_knn.paper.classifier import build_classifier
from robustbench_knn.paper.train import train_model


class Counted(torch.nn.Module):
    """The classifier's logits, counting the input rows it is asked about."""

    def __init__(self, clf: torch.nn.Module) -> None:
        super().__init__()
        self.clf = clf
        self.n_classes = clf.n_classes
        self.rows = 0

    @property
    def device(self) -> torch.device:
        return self.clf.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.clf(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--n-queries", type=int, default=300)
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--surrogate", default="potential")
    ap.add_argument("--aligned", action="store_true")
    args = ap.parse_args()
    eps = parse_eps(args.eps)[0]
    data = load_cifar10()
    trained = train_model(get_model_config(args.model), data)
    clf = build_classifier(trained, args.surrogate, aligned=args.aligned).eval()
    sub = data.test.head(args.n_test)
    x, y = sub.floats().to(clf.device), sub.y.to(clf.device)

    def art_direct(model: torch.nn.Module) -> torch.Tensor:
        np.random.seed(0)  # as the adapter seeds it
        atk = SquareAttack(art_estimator(model), norm=np.inf, eps=eps, max_iter=args.n_queries, p_init=0.8,
                           nb_restarts=1, batch_size=len(x), verbose=False)
        return torch.from_numpy(atk.generate(x=x.cpu().numpy(), y=y.cpu().numpy())).to(x.device)

    def aa_square(model: torch.nn.Module) -> torch.Tensor:
        atk = get_attack("aa:square").build(model, eps)
        atk.aa.square.n_queries = args.n_queries  # AutoAttack's standard run fixes 5000
        return atk(x, y)

    paths = {
        "ART Square, memo (the harness's art:square)":
            lambda m: get_attack("art:square").build(m, eps, n_queries=args.n_queries)(x, y),
        "ART Square, direct": art_direct,
        "AutoAttack Square (aa:square)": aa_square,
    }
    with torch.no_grad():
        clf(x)  # first call: the bank's layout and any compiled kernel, outside every path's time
    rows, advs = [], {}
    for name, run in paths.items():
        counted = Counted(clf)
        t0 = time.perf_counter()
        with torch.no_grad():
            advs[name] = run(counted)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            still = (clf(advs[name]).argmax(1) == y).float().mean().item()
        rows.append([name, counted.rows, f"{counted.rows / len(x):.0f}", f"{seconds:.1f}", f"{100 * still:.1f}"])
    memo, direct = (advs[k] for k in list(paths)[:2])
    print(f"{args.model}, surrogate {args.surrogate} ({'aligned' if args.aligned else 'raw'} logits), "
          f"{len(x)} test images, eps {args.eps}, {args.n_queries} queries; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers=["path", "rows through the model", "per image", "seconds",
                                  "surrogate argmax still right %"], tablefmt="github"))
    print(f"memo and direct ART examples identical: {torch.equal(memo, direct)}")


if __name__ == "__main__":
    main()
