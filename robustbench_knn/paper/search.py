"""Search of the recipe choices the paper leaves open, on a held-out validation split of the training set
(never the test set), at the paper's 20 epochs.

A variant is ``NORM_LR_REG[_cos]``: the reading of §3.1's normalisation (``image`` | ``position``), Adam's
learning rate, the regulariser's reduction (``sum`` | ``mean`` | ``mean2``, see losses.exp_contrastive_loss)
and optionally a cosine schedule with 5% linear warm-up (default: constant). Everything the paper states
(widths, loss constants, noise, B, k, 20 epochs) stays fixed. FULL's default is the variant with the best
validation accuracy at 20 epochs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from ..config import NORMALIZATIONS, REG_REDUCTIONS, ExperimentConfig, UsageError, apply_overrides, get_model_config
from ..data import CIFAR10
from ..devices import machine_name
from ..distances import pairwise_distance
from ..store import read_json, write_json, write_text
from .classifier import build_classifier
from .train import train_model

# The order `search --variants default` trains them: the most informative contrasts first, so a partial
# run (20 epochs of FULL take 8-17 min on a 2-core CPU) still answers the main questions.
DEFAULT_ORDER = (
    "image_3e-4_mean2",    # per-image normalisation, moderate lr, regulariser ÷B²
    "position_3e-4_mean2", # the same with per-position statistics (the normalisation's effect)
    "image_3e-4_mean",     # the same with ÷B (the reduction's effect)
    "image_1e-3_mean2",    # the previous default lr (the lr's effect)
    "position_1e-3_mean",  # the previous default recipe (Adam 1e-3, constant, ÷B, per-position)
    "image_1e-4_mean2",
    "image_3e-4_sum",      # the regulariser as printed
    "image_1e-3_mean",
    "image_1e-3_mean2_cos",
    "image_3e-4_mean2_cos",
)


def parse_variant(name: str) -> dict[str, dict[str, Any]]:
    """``image_3e-4_mean2_cos`` → config overrides; a clear error for anything else."""
    parts = name.split("_")
    usage = (f"variant {name!r} is not NORM_LR_REG[_cos] with NORM in {'/'.join(NORMALIZATIONS)}, "
             f"REG in {'/'.join(REG_REDUCTIONS)} (e.g. image_3e-4_mean2)")
    if len(parts) not in (3, 4) or parts[0] not in NORMALIZATIONS or parts[2] not in REG_REDUCTIONS:
        raise UsageError(usage)
    if len(parts) == 4 and parts[3] != "cos":
        raise UsageError(usage)
    try:
        lr = float(parts[1])
    except ValueError:
        raise UsageError(usage) from None
    if lr <= 0:
        raise UsageError(usage)
    train: dict[str, Any] = {"optimizer": "adam", "lr": lr, "schedule": "constant", "warmup_frac": 0.0}
    if len(parts) == 4:
        train.update(schedule="cosine", warmup_frac=0.05)
    return {"model": {"normalization": parts[0]}, "loss": {"reg_reduction": parts[2]}, "train": train}


def variant_config(name: str, *, epochs: int | None = None, val_size: int = 5000, seed: int = 0,
                   base: str = "full", n_train: int | None = None, sets: Sequence[str] = ()) -> ExperimentConfig:
    """FULL (``base``) with ``--set`` overrides (e.g. smaller widths for a quick try), then the variant's."""
    over = parse_variant(name)
    over["train"].update(val_size=val_size, seed=seed, n_train=n_train)
    if epochs is not None:
        over["train"]["epochs"] = epochs
    return apply_overrides(get_model_config(base), sets).replace(name=f"{base}-{name}", **over)


@torch.no_grad()
def embedding_scale(emb: torch.Tensor, labels: torch.Tensor, n_spaces: int, n: int = 1000) -> tuple[float, float]:
    """Median same-class and other-class distance among the first ``n`` validation embeddings: the scale the
    regulariser's reduction sets (compare with l0 = 7)."""
    e, y = emb[:n], labels[:n]
    dist = pairwise_distance(e, e, n_spaces)
    same = y[:, None] == y[None, :]
    off_diag = ~torch.eye(len(y), dtype=torch.bool, device=dist.device)
    return dist[same & off_diag].median().item(), dist[~same].median().item()


def run_search(data: CIFAR10, names: list[str], *, epochs: int | None, val_size: int, out: str | os.PathLike,
               device: str = "auto", cache_dir: str | None = None, seed: int = 0,
               n_train: int | None = None, sets: Sequence[str] = (), report_test: bool = False) -> pd.DataFrame:
    """Train each variant (cached, resumable), measure k-NN accuracy on the validation split, update
    ``out``.json/.md after each one (a killed search keeps what it finished). ``report_test`` also stores the
    clean accuracy on the test set as information (``test_acc_info``); the choice uses ``val_acc`` only."""
    for name in names:
        parse_variant(name)  # every name checked before hours of training
    out = Path(out)
    rows: dict[str, dict[str, Any]] = {}
    if out.with_suffix(".json").is_file():
        rows = {f"{r['variant']}@{r['epochs']}": r for r in read_json(out.with_suffix(".json"))["rows"]}
    for name in names:
        cfg = variant_config(name, epochs=epochs, val_size=val_size, seed=seed, n_train=n_train, sets=sets)
        key = f"{name}@{cfg.train.epochs}"
        if key in rows and rows[key]["config_hash"] == cfg.config_hash() and (
                not report_test or rows[key].get("test_acc_info") is not None):
            continue
        t0 = time.perf_counter()
        trained = train_model(cfg, data, device=device, cache_dir=cache_dir)
        clf = build_classifier(trained)
        val = trained.val_split
        assert val is not None
        x_val = val.floats().to(clf.device)
        acc = (clf.predict(x_val).cpu() == val.y).float().mean().item()
        same, other = embedding_scale(clf.embed(x_val[:1000]), val.y[:1000].to(clf.device), cfg.model.n_spaces)
        losses = [e["loss"] for e in trained.log["epochs"]]
        test_acc = None
        if report_test:
            test_acc = (clf.predict(data.test.floats().to(clf.device)).cpu() == data.test.y).float().mean().item()
        rows[key] = {
            "variant": name, "epochs": cfg.train.epochs, "val_acc": round(100 * acc, 2),
            "median_dist_same": round(same, 2), "median_dist_other": round(other, 2),
            "final_loss": round(losses[-1], 4) if losses else None,
            "test_acc_info": None if test_acc is None else round(100 * test_acc, 2),
            "train_seconds": round(trained.log["train_seconds"], 1),
            "machine": trained.log.get("machine") or machine_name(trained.log["device"]),
            "overrides": parse_variant(name), "config_hash": cfg.config_hash(),
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        _write(out, rows, val_size, len(trained.train_split))
    return pd.DataFrame(list(rows.values()))


def best_variant(out: str | os.PathLike, epochs: int = 20) -> dict[str, Any]:
    """The row with the highest validation accuracy at ``epochs`` (how FULL's default is chosen)."""
    rows = [r for r in read_json(Path(out).with_suffix(".json"))["rows"] if r["epochs"] == epochs]
    if not rows:
        raise UsageError(f"no {epochs}-epoch rows in {out}.json")
    return max(rows, key=lambda r: r["val_acc"])


def _write(out: Path, rows: dict[str, dict[str, Any]], val_size: int, n_fit: int) -> None:
    ordered = sorted(rows.values(), key=lambda r: (-r["epochs"], -r["val_acc"]))
    write_json(out.with_suffix(".json"), {"val_size": val_size, "n_fit": n_fit, "rows": ordered})
    cols = ["variant", "epochs", "val_acc", "test_acc_info", "median_dist_same", "median_dist_other",
            "final_loss", "train_seconds", "machine"]
    df = pd.DataFrame(ordered).reindex(columns=cols)
    header = (f"Recipe search on CIFAR-10 (JPEG q75): FULL trained on the first {n_fit} training images, k-NN "
              f"(k=800) accuracy (%) on the last {val_size} (a validation split, never the test set). Variant = "
              f"normalisation (image: per-image standardisation; position: per-position training-set "
              f"statistics) _ Adam learning rate _ regulariser reduction (sum: as printed; mean: ÷B; mean2: "
              f"÷B²) [_cos: cosine schedule, 5% warm-up; else constant]. Everything the paper states is fixed "
              f"(widths, loss constants, noise, B=2048, k=800, seed 0). median_dist_*: median distance between "
              f"validation embeddings of the same / other classes (l0 = 7). test_acc_info: clean accuracy on the "
              f"10k test set of the same (45k-trained) model, for information only, never used to choose "
              f"(`--report-test`). Train seconds measured on the machine named per row. Regenerate: "
              f"`robustbench-knn search --report-test --variants NAMES` (one row per variant, resumable).\n\n")
    write_text(out.with_suffix(".md"), header + df.to_markdown(index=False) + "\n")


def rewrite_table(out: str | os.PathLike) -> None:
    """Re-render the markdown from the stored JSON (no training)."""
    out = Path(out)
    d = read_json(out.with_suffix(".json"))
    _write(out, {f"{r['variant']}@{r['epochs']}": r for r in d["rows"]}, d["val_size"], d["n_fit"])
