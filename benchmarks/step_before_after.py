"""An attack step on FULL, part by part (``robustbench-knn bench --steps``), for this checkout and an earlier
commit in one run on the same inputs, with the parts' outputs checked equal. Figures: ms per image, and each
part as a multiple of the network alone (forward + input gradient).

    python benchmarks/step_before_after.py 626e7ed [--batches 250,1000 --threads 1 --repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_commit import REPO, load_package_at  # noqa: E402

PARTS = ("network", "knn_potential", "knn_softknn", "vote", "step_potential", "step_softknn_aligned")


def _softknn_grads(surrogate_cls, emb: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-kNN logits (m = 50, T = 1, as the bench) and the gradient of their cross-entropy for the embedding."""
    clf = SimpleNamespace(bank=bank, bank_labels=labels, n_spaces=2, n_classes=10, lam=None, l0=None)
    e = emb.clone().requires_grad_(True)
    logits = surrogate_cls(clf, m=50, temperature=1.0)(e)
    return logits.detach(), torch.autograd.grad(F.cross_entropy(logits, y), e)[0]


def compare_outputs(n: int = 64) -> str:
    """The §2.5 loss, its gradient and the vote of both versions on one random input, and the soft-kNN logits and
    their gradient (float32: the loss is a sum of 5,000 terms of both signs, so its differences are given
    relative to its largest value)."""
    from rbk_ref.defenses.knn import knn_votes as old_votes
    from rbk_ref.defenses.potential import attack_loss as old_loss
    from rbk_ref.defenses.surrogate import SoftKNNSurrogate as OldSoftKNN

    from robustbench_knn.defenses.knn import knn_votes
    from robustbench_knn.defenses.potential import attack_loss
    from robustbench_knn.defenses.surrogate import SoftKNNSurrogate

    torch.manual_seed(1)
    bank, labels = torch.randn(5000, 30) * 3, torch.randint(0, 10, (5000,))
    emb, y = torch.randn(n, 30) * 3, torch.randint(0, 10, (n,))
    outs = []
    for loss_fn, votes_fn in ((old_loss, old_votes), (attack_loss, knn_votes)):
        e = emb.clone().requires_grad_(True)
        loss = loss_fn(e, y, bank, labels, n_spaces=2, lam=0.5, l0=7.0, n_classes=10)
        grad = torch.autograd.grad(loss.sum(), e)[0]
        outs.append((loss.detach(), grad, votes_fn(emb, bank, labels, k=800, n_spaces=2, n_classes=10)))
    (l_old, g_old, v_old), (l_new, g_new, v_new) = outs
    rel = lambda a, b: float((a - b).abs().max() / a.abs().max())  # noqa: E731
    same = all(torch.equal(a, b) for a, b in zip(v_old, v_new))
    (s_old, sg_old), (s_new, sg_new) = (_softknn_grads(cls, emb, bank, labels, y) for cls in (OldSoftKNN,
                                                                                               SoftKNNSurrogate))
    return (f"loss max diff {rel(l_old, l_new):.1e}, gradient {rel(g_old, g_new):.1e} (of the largest); "
            f"votes and distance sums identical: {same}; soft-kNN logits {rel(s_old, s_new):.1e}, "
            f"gradient {rel(sg_old, sg_new):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the earlier commit")
    ap.add_argument("--batches", default="250,1000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per part (after one warm-up call)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from robustbench_knn.config import get_model_config
    from robustbench_knn.evaluation.step_bench import step_breakdown

    with tempfile.TemporaryDirectory() as tmp:
        load_package_at(args.rev, Path(tmp))
        # the same bench, this checkout's, on the old code (the old one may time differently)
        shutil.copy(REPO / "robustbench_knn" / "evaluation" / "step_bench.py",
                    Path(tmp) / "rbk_ref" / "evaluation" / "step_bench.py")
        from rbk_ref.evaluation.step_bench import step_breakdown as old_breakdown
        cfg = get_model_config("full")
        print(compare_outputs())
        rows = []
        for b in map(int, args.batches.split(",")):
            kw = dict(batch=b, device="cpu", repeats=args.repeats)
            figs = {"before": old_breakdown(cfg, **kw), "after": step_breakdown(cfg, **kw)}
            for part in PARTS:
                row = {"batch": b, "part": part}
                for tag, f in figs.items():
                    row[f"{tag} ms/img"] = round(f[f"{part}_ms_per_image"], 3)
                    row[f"{tag} × network"] = round(f.get(f"{part}_vs_network", 1.0), 2)
                rows.append(row)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
