"""``benchmark_config()``: one of this project's model configs end to end — train or load it, measure clean accuracy,
attack it, save results as JSON + CSV and return them (what ``evaluate`` and ``table`` run; the user-facing
``robustbench_knn.benchmark()`` of ``api.py`` takes any defense)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..attacks import AttackSpec
from ..attacks.transfer import trained_sources, transfer_sources
from ..config import ExperimentConfig, UsageError
from ..data import DATASET_LABEL, load_cifar10
from ..devices import resolve_device
from ..paper.classifier import build_classifier
from ..paper.train import train_model
from ..store import model_dir, state_digest, write_json, write_text
from .cards import annotate_reliability, card_of, eps_label
from .distributed import current
from .evaluate import predict_split, provenance, run_attacks, versions

DATASET_NAME = f"{DATASET_LABEL} (JPEG q75)"


def benchmark_config(
    cfg: ExperimentConfig,
    specs: list[AttackSpec],
    eps_list: list[float],
    *,
    n_test: int = 1000,
    n_clean: int | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    seed: int = 0,
    surrogate: str = "potential",
    overrides: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 250,
    out_dir: str | os.PathLike | None = None,
    dataset_name: str = DATASET_NAME,
    progress: bool = True,
    resume: bool = True,
    aligned: bool = True,
    cascade: bool = False,
    norm: str = "Linf",
) -> dict[str, Any]:
    """Train (or load) ``cfg``, measure clean k-NN accuracy on ``n_clean`` test images, attack the first
    ``n_test``. With ``resume`` every finished (ε, attack) result is cached beside the model and reused."""
    if n_test < 1 or (n_clean is not None and n_clean < 1):
        raise UsageError("--n-test and --n-clean must be >= 1")
    t_start = time.perf_counter()
    dev = resolve_device(device)
    data = load_cifar10(data_dir)
    trained = train_model(cfg, data, device=dev, cache_dir=cache_dir, progress=progress)
    clf = build_classifier(trained, surrogate, aligned=aligned)
    cells = cell_dir(cfg, surrogate + ("" if aligned else "-unaligned"), data.sha256, cache_dir) if resume else None
    # `transfer` crafts on another model: trained (or loaded) on the same data at the target's size
    with transfer_sources(trained_sources(data, target_cfg=cfg, cache_dir=cache_dir, device=dev, progress=progress)):
        result = evaluate_classifier(clf, data, specs, eps_list, name=cfg.name, n_test=n_test, n_clean=n_clean,
                                     seed=seed, overrides=overrides, batch_size=batch_size, cell_dir=cells,
                                     dataset_name=dataset_name, progress=progress, cascade=cascade, norm=norm)
    head = {"model": cfg.name, "config": cfg.to_dict(), "config_hash": cfg.config_hash(),
            "surrogate": getattr(clf, "surrogate_name", "logits"),
            "device": str(dev)}
    result = {**head, **{k: v for k, v in result.items() if k not in head},
              "train_log": {k: trained.log[k] for k in ("train_seconds",)},
              "wall_seconds": round(time.perf_counter() - t_start, 1)}
    if out_dir is not None:
        save_results(result, out_dir)
    return result


def evaluate_classifier(clf: torch.nn.Module, data: Any, specs: list[AttackSpec], eps_list: list[float], *,
                        name: str, n_test: int = 1000, n_clean: int | None = None, seed: int = 0,
                        overrides: dict[str, dict[str, Any]] | None = None, batch_size: int = 250,
                        cell_dir: str | os.PathLike | None = None, dataset_name: str = DATASET_NAME,
                        progress: bool = True, cascade: bool = False, norm: str = "Linf") -> dict[str, Any]:
    """Any defense, known only through its interface: clean accuracy of ``predict`` on the first ``n_clean``
    test images, every attack at every ε on the first ``n_test``; the result ``save_results`` writes."""
    t_start = time.perf_counter()
    n_test = min(n_test, len(data.test))
    n_clean = min(n_clean or len(data.test), len(data.test))
    clean_x = data.test.head(n_clean)
    clean_pred = predict_split(clf, clean_x.floats())  # split over the ranks like the attacks
    clean_acc = 100 * (clean_pred == clean_x.y).float().mean().item()
    sub = data.test.head(n_test)
    attacked = run_attacks(clf, sub.floats(), sub.y, specs, eps_list, overrides=overrides, batch_size=batch_size,
                           progress=progress, seed=seed, cell_dir=cell_dir,
                           clean_pred=clean_pred[:n_test] if n_clean >= n_test else None, cascade=cascade,
                           norm=norm)
    annotate_reliability(attacked, clf, sub.floats()[:batch_size].to(clf.device), cell_dir)
    part = current()
    digest = weights_hash(clf)  # hashes the weights and the whole bank: once
    return {
        # a config's hash names the recipe; training on another machine gives other weights under the same recipe
        "model": name, "config_hash": digest, "weights_hash": digest, "backbone": getattr(clf, "backbone", None),
        "dataset": dataset_name, "dataset_sha256": data.sha256,
        "n_clean": n_clean, "clean_acc_full": round(clean_acc, 2), "n_test": n_test, "seed": seed,
        "batch_size": batch_size, "surrogate": getattr(clf, "surrogate_name", "logits"),
        # None for a logit classifier: its logits are its own, there is nothing to align
        "aligned": getattr(clf, "aligned", None), "device": str(clf.device), "versions": versions(),
        **provenance(clf.device),
        "attacks": [s.key for s in specs], "eps": eps_list, **attacked,
        "processes": part.world if part.group else 1,
        **({"shard": {"index": part.rank, "count": part.world}} if part.shard else {}),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def defense_cells(clf: torch.nn.Module, dataset_sha: str, cache_dir: str | None = None) -> Path:
    """The cell cache of a defense that has no config (a user's function, an exported file): keyed by its
    weights and bank, so a killed ``evaluate`` resumes and another defense never reuses its cells."""
    from ..store import cache_root

    tag = getattr(clf, "surrogate_name", "logits") + ("" if getattr(clf, "aligned", True) else "-unaligned")
    return cache_root(cache_dir) / "defenses" / weights_hash(clf) / "cells" / f"k{getattr(clf, 'k', 0)}-{tag}-{dataset_sha[:8]}"


def weights_hash(clf: torch.nn.Module) -> str:
    """12 hex digits of the defense's weights and buffers (the bank too): names a result of a model that has no
    config (a user's defense, an exported file)."""
    return state_digest(clf)


def cell_dir(cfg: ExperimentConfig, surrogate: str, dataset_sha: str, cache_dir: str | None = None) -> Path:
    """Where finished (ε, attack) results of one model + surrogate live (k changes the decision: it is in the name)."""
    return model_dir(cfg, cache_dir, dataset_sha) / "cells" / f"k{cfg.k}-{surrogate}-{dataset_sha[:8]}"


def summary_frame(result: dict[str, Any]) -> pd.DataFrame:
    """One row per (ε, attack) plus the worst case: robust accuracy, zero-gradient fraction, seconds."""
    rows = []
    norm = result.get("threat_model", "Linf")
    for r in result["per_eps"]:
        for key, a in r["attacks"].items():
            rows.append({"eps": _eps_label(r["eps"], norm), "attack": key + (" (on survivors)" if a.get("on_survivors") else ""),
                         "clean_acc": r["clean_acc"],
                         "robust_acc": a.get("robust_acc", "REJECTED"),
                         "zero_grad_frac": a["zero_or_nonfinite_grad_frac"],
                         "surrogate_only": a.get("surrogate_fooled_decision_right"), "seconds": a["seconds"]})
        if len(r["attacks"]) > 1:
            rows.append({"eps": _eps_label(r["eps"], norm), "attack": "worst case", "clean_acc": r["clean_acc"],
                         "robust_acc": r["worst_case_acc"], "zero_grad_frac": None, "surrogate_only": None,
                         "seconds": None})
    return pd.DataFrame(rows)


_eps_label = eps_label  # the name the table modules import


def save_results(result: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """``evaluate-<model>-<hash>-<surrogate>[-unaligned][-L2]``: .json (everything), .csv (per attack) and
    .model-card.json (RobustBench's fields for the first ε; the others under ``more_eps``)."""
    out = Path(out_dir)
    tag = ("-unaligned" if result.get("aligned") is False else "") + (
        f"-{result['threat_model']}" if result.get("threat_model", "Linf") != "Linf" else "")
    stem = out / f"evaluate-{result['model']}-{result['config_hash']}-{result['surrogate']}{tag}"
    if "shard" in result:  # raw material for `merge`: no table or card of a part
        path = Path(f"{stem}.part-{result['shard']['index']}-of-{result['shard']['count']}.json")
        write_json(path, result)
        return path
    if not current().writer:  # rank 0 writes what every rank holds
        return stem.with_suffix(".json")
    write_json(stem.with_suffix(".json"), result)
    write_text(stem.with_suffix(".csv"), summary_frame(result).to_csv(index=False))
    cards = [card_of(result["model"], result["dataset"], r, result["n_test"], result.get("backbone"),
                     result.get("threat_model", "Linf")) for r in result["per_eps"]]
    write_json(Path(f"{stem}.model-card.json"), {**cards[0], "more_eps": cards[1:]})
    return stem.with_suffix(".json")
