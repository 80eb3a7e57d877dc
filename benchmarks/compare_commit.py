"""Speed of this checkout's k-NN vote and §2.5 attack loss against an earlier commit's, in one run on the same
inputs, with the outputs checked equal. Needs a git checkout (the earlier package is read with `git show`).

    python benchmarks/compare_commit.py d13cbf1 [--n-test 10000 --n-bank 50000 --k 800]
    python benchmarks/compare_commit.py 8bf4998 --dim 2078 --spaces 1 --n-test 1000   # deep k-NN's wide bank
    python benchmarks/compare_commit.py c874214 --subject deep_knn_a --n-test 500  # real features, the subject's k
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_package_at(rev: str, dest: Path, name: str = "rbk_ref"):
    """The package as it was at ``rev``, importable as ``name`` (its imports are relative)."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", rev, "robustbench_knn"],
                           check=True, capture_output=True, text=True).stdout.split()
    for f in files:
        target = dest / name / Path(f).relative_to("robustbench_knn")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{f}"], check=True,
                                          capture_output=True).stdout)
    sys.path.insert(0, str(dest))
    return importlib.import_module(name)


def import_either(*names: str):
    """The first of ``names`` that imports: a commit's layout is layered (``defenses/knn.py``) or, before it was,
    flat (``knn.py``)."""
    for name in names[:-1]:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            pass
    return importlib.import_module(names[-1])


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    out = fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t0) / repeats, out


def subject_embeddings(name: str, n_test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(test embeddings, bank, bank labels, sub-spaces, k) of a subject of ``defenses.subjects`` ($ROBUSTBENCH_KNN_DATA)."""
    from robustbench_knn.data import load_cifar10
    from robustbench_knn.defenses import subjects

    defense = getattr(subjects, name)(device="cpu")
    with torch.no_grad():
        emb = defense.embed(load_cifar10(None).test.head(n_test).floats())
    return emb, defense.bank, defense.bank_labels, defense.n_spaces, defense.k


def band_widths(knn, emb: torch.Tensor, bank: torch.Tensor, k: int, spaces: int) -> str:
    """Columns per row the judge would decide in float64 (mean / max): those whose float32 distance minus the error
    bound is within the k-th nearest exact distance, with the bank's largest norm for every column (coarse) and with
    each point's own norm (per point)."""
    with torch.no_grad():
        dist = knn.pairwise_distance(emb, bank, spaces).double()
        cand = dist.topk(k, dim=1, largest=False).indices
        kth = knn.exact_distances(emb, bank[cand], spaces).amax(1, keepdim=True)
        coarse = knn.float32_error_bound(emb, bank, spaces)[:, None]
        rows, cols = knn.float32_error_terms(emb, bank, spaces)
        out = []
        for name, bound in (("coarse", coarse), ("per point", torch.minimum(coarse, rows[:, None] + cols[None]))):
            n = knn.within_reach(dist, kth, bound).sum(1).float()
            out.append(f"{name} {n.mean().item():.0f} / {n.max().item():.0f}")
    norms = bank.norm(dim=1)
    return (f"bank norms largest {norms.max().item():.0f}, mean {norms.mean().item():.0f}; float64 band of the first "
            f"{len(emb)} rows, columns mean / max: " + ", ".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--n-bank", type=int, default=50000)
    ap.add_argument("--k", type=int, help="k of the vote (default: 800, or the subject's own)")
    ap.add_argument("--attack-batch", type=int, default=250)
    ap.add_argument("--dim", type=int, default=30, help="embedding width (30: FULL; 2078: row A's features)")
    ap.add_argument("--spaces", type=int, default=2, help="sub-spaces of the distance (2: FULL; 1: plain l2)")
    ap.add_argument("--query-batch", type=int, default=30, help="images per query of a query-only attack (Square)")
    ap.add_argument("--subject", choices=("deep_knn_a", "raw_pixel_knn"),
                    help="the real embeddings of the first N test images and the bank of this subject (trained or "
                         "loaded from the cache), instead of random ones; --dim and --spaces are the subject's")
    args = ap.parse_args()

    import robustbench_knn.defenses.knn as new_knn
    import robustbench_knn.defenses.potential as new_losses
    import robustbench_knn.distances as new_dist

    with tempfile.TemporaryDirectory() as tmp:
        load_package_at(args.rev, Path(tmp))
        old_knn = import_either("rbk_ref.defenses.knn", "rbk_ref.knn")
        old_losses = import_either("rbk_ref.defenses.potential", "rbk_ref.paper.losses", "rbk_ref.losses")
        old_dist = import_either("rbk_ref.distances", "rbk_ref.paper.losses", "rbk_ref.losses")
        g = torch.Generator().manual_seed(0)
        if args.subject:
            emb, bank, labels, args.spaces, k = subject_embeddings(args.subject, args.n_test)
            args.k = args.k or k
            args.n_bank, args.dim = bank.shape
        else:
            emb = torch.randn(args.n_test, args.dim, generator=g) * 3
            bank = torch.randn(args.n_bank, args.dim, generator=g) * 3
            labels = torch.randint(0, 10, (args.n_bank,), generator=g)
        args.k = args.k or 800
        kw = dict(k=args.k, n_spaces=args.spaces, n_classes=10)
        if args.subject:
            print(band_widths(new_knn, emb[:60], bank, args.k, args.spaces))
        t_old, p_old = timed(lambda: old_knn.knn_predict(emb, bank, labels, **kw))
        t_new, p_new = timed(lambda: new_knn.knn_predict(emb, bank, labels, **kw))
        print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}")
        print(f"width {args.dim}, {args.spaces} sub-space(s)" + (f", {args.subject}'s features of CIFAR-10 (JPEG q75)"
                                                                  if args.subject else ", random"))
        print(f"k-NN {args.n_test} x {args.n_bank}, k={args.k}: {args.rev} {t_old:.2f} s, this checkout "
              f"{t_new:.2f} s, speed-up {t_old / t_new:.2f}x, same predictions: {torch.equal(p_old, p_new)}")

        e = emb[:args.attack_batch].clone().requires_grad_(True)
        y = torch.randint(0, 10, (len(e),), generator=g)
        lk = dict(n_spaces=args.spaces, lam=0.5, l0=7.0)

        def loss_grad(mod):
            return lambda: torch.autograd.grad(mod.attack_loss(e, y, bank, labels, **lk).sum(), e)[0]

        t_old, g_old = timed(loss_grad(old_losses), 2)
        t_new, g_new = timed(loss_grad(new_losses), 2)
        err = (g_old - g_new).abs().max().item()
        print(f"attack loss + input gradient, {len(e)} x {args.n_bank}: {args.rev} {t_old:.3f} s, this checkout "
              f"{t_new:.3f} s, speed-up {t_old / t_new:.2f}x, max gradient difference {err:.2e}")

        q = emb[:args.query_batch]

        def query(mod):  # a query-only attack's forward: distances without gradient or workspace
            return lambda: mod.pairwise_distance(q, bank, args.spaces)

        with torch.no_grad():
            t_old, d_old = timed(query(old_dist), 3)
            t_new, d_new = timed(query(new_dist), 3)
        print(f"distance of a query, {len(q)} x {args.n_bank}: {args.rev} {t_old:.3f} s, this checkout {t_new:.3f} s, "
              f"speed-up {t_old / t_new:.2f}x, same distances: {torch.equal(d_old, d_new)}")


if __name__ == "__main__":
    main()
