"""The cross-toolkit table: every standard attack through every toolkit that offers it, with each surrogate,
judged by the k-NN decision, plus the per-sample worst case over all of them and each cell's wall time.

Cells (one attack, one surrogate, one ε) are cached beside the model as they finish (shared with ``evaluate``
and ``audit``), cheapest attacks first, and the table is re-rendered after each attack, so an interrupted run
leaves a correct partial table and resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from ..attacks import REGISTRY, AttackSpec
from ..config import STANDARD_SUITE, ExperimentConfig, UsageError
from ..data import load_cifar10
from ..devices import resolve_device
from ..paper.classifier import build_classifier
from ..paper.train import train_model
from ..store import read_json, write_json, write_text
from .distributed import current
from .evaluate import provenance, robust_mask, run_attacks, versions
from .experiment import DATASET_NAME, _eps_label, cell_dir, weights_hash

PAPER = {8: 45.48, 16: 35.69}  # the paper's Table 1 robust accuracy of FULL at ε = 8/255, 16/255


def suite_specs(names: tuple[str, ...] | list[str] = STANDARD_SUITE, norm: str = "Linf") -> list[AttackSpec]:
    """Every registered implementation of each name that has a form for ``norm``, in the order of ``names``; a
    name with no such implementation is refused before any work."""
    known = {s.name for s in REGISTRY.values()}
    for n in names:
        if n not in known:
            raise UsageError(f"unknown attack name {n!r}; `robustbench-knn attacks` lists them")
        if not any(s.name == n and norm in s.norms for s in REGISTRY.values()):
            raise UsageError(f"no toolkit has a {norm} form of {n!r}; `robustbench-knn attacks` lists each one's norms")
    return [s for n in names for s in REGISTRY.values() if s.name == n and norm in s.norms]


def chosen_toolkits(toolkits: tuple[str, ...] | list[str] | None) -> set[str] | None:
    """The toolkit prefixes a run is limited to (None: every toolkit); an unknown prefix is refused before any
    work."""
    if toolkits is None:
        return None
    known = {s.toolkit for s in REGISTRY.values()}
    bad = [t for t in toolkits if t not in known]
    if bad or not toolkits:
        raise UsageError(f"unknown toolkit(s) {bad}; choose from {', '.join(sorted(known))}")
    return set(toolkits)


def _stem(norm: str) -> str:
    return "toolkits" if norm == "Linf" else f"toolkits-{norm}"


def run_compare(
    cfg: ExperimentConfig,
    eps_list: list[float],
    *,
    names: tuple[str, ...] | list[str] = STANDARD_SUITE,
    surrogates: tuple[str, ...] | list[str] = ("potential", "softknn"),
    n_test: int = 1000,
    out_dir: str | os.PathLike = "tables/toolkits",
    data_dir: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = True,
    aligned: bool = True,
    norm: str = "Linf",
    toolkits: tuple[str, ...] | list[str] | None = None,
) -> dict[str, Any]:
    """Train or load ``cfg``, then run (or resume) every cell (see :func:`compare_classifiers`); ``aligned``:
    decision-aligned surrogate logits (the default) or the raw surrogate."""
    chosen_toolkits(toolkits)  # refused before training
    dev = resolve_device(device)
    data = load_cifar10(data_dir)
    trained = train_model(cfg, data, device=dev, cache_dir=cache_dir, progress=progress)
    clfs = {s: build_classifier(trained, s, aligned=aligned) for s in surrogates}
    tag = "" if aligned else "-unaligned"
    return compare_classifiers(clfs, data, eps_list, name=cfg.name, config_hash=cfg.config_hash(), names=names,
                               n_test=n_test, out_dir=out_dir, seed=seed, batch_size=batch_size, progress=progress,
                               cells=lambda sur: cell_dir(cfg, sur + tag, data.sha256, cache_dir), norm=norm,
                               toolkits=toolkits)


def compare_classifiers(clfs: dict[str, torch.nn.Module], data: Any, eps_list: list[float], *, name: str,
                        config_hash: str, names: tuple[str, ...] | list[str] = STANDARD_SUITE, n_test: int = 1000,
                        out_dir: str | os.PathLike = "tables/toolkits", seed: int = 0, batch_size: int = 250,
                        progress: bool = True, cells: Any = None, norm: str = "Linf",
                        toolkits: tuple[str, ...] | list[str] | None = None) -> dict[str, Any]:
    """Every attack of ``names`` through every toolkit, once per surrogate (``clfs``: surrogate name → the
    defense with those logits), judged by the defense's decision; ``toolkits.{json,csv,md}`` are written into
    ``out_dir`` after each cell (``toolkits-L2.*`` for ℓ2). ``cells(surrogate)`` → a cell cache folder, or None.
    ``toolkits``: run only these toolkits' cells (e.g. ``["ta", "aa"]`` where another toolkit's attack is too slow
    for the machine); every toolkit's cells stay planned, so the ones left out read "not run" in the table."""
    specs = suite_specs(names, norm)
    only = chosen_toolkits(toolkits)
    surrogates = list(clfs)
    first = clfs[surrogates[0]]
    sub = data.test.head(min(n_test, len(data.test)))
    x, y = sub.floats(), sub.y
    out = Path(out_dir)
    result: dict[str, Any] = {
        # the weights judged, not only the recipe: a retrain of the same config elsewhere is another model
        "model": name, "config_hash": config_hash, "weights_hash": weights_hash(first),
        "k": getattr(first, "k", None), "dataset": DATASET_NAME,
        "dataset_sha256": data.sha256, "n_test": len(x), "seed": seed, "device": str(first.device).split(":")[0],
        "versions": versions(), **provenance(first.device), "eps": eps_list, "surrogates": surrogates, "cells": [],
        "aligned": bool(getattr(first, "aligned", False)), "threat_model": norm,
    }
    t0 = time.perf_counter()
    jobs = plan_jobs(specs, surrogates)
    result["planned"] = [_row_key(spec, sur) for spec, sur in jobs]
    if only is not None:
        result["toolkits_run"] = sorted(only)
        jobs = [(spec, sur) for spec, sur in jobs if spec.toolkit in only]
    for spec, sur in tqdm(jobs, desc="toolkit table", disable=not progress, unit="cell"):
        # the model's own cell cache: cells finished by `evaluate` or `audit` on the same images are reused
        res = run_attacks(clfs[sur], x, y, [spec], eps_list, batch_size=batch_size, progress=progress, seed=seed,
                          cell_dir=cells(sur) if cells else None, norm=norm)
        result["clean_correct"] = res["clean_correct"]
        for r in res["per_eps"]:
            entry = r["attacks"][spec.key]
            result["cells"].append({**_row_key(spec, sur), "key": spec.key, "eps": r["eps"], **entry})
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        save_compare(result, out)
    return result


def plan_jobs(specs: list[AttackSpec], surrogates: tuple[str, ...] | list[str]) -> list[tuple[AttackSpec, str]]:
    """(attack, surrogate) cells in run order; native attacks follow the model's own objective, not a
    surrogate, so one run serves every surrogate."""
    return [(spec, s) for spec in specs for s in surrogates if not (spec.toolkit == "native" and s != surrogates[0])]


def _row_key(spec: AttackSpec, surrogate: str) -> dict[str, str]:
    return {"attack": spec.name, "toolkit": spec.toolkit,
            "surrogate": "objective" if spec.toolkit == "native" else surrogate}


def compare_frame(result: dict[str, Any]) -> pd.DataFrame:
    """Rows: attack × toolkit × surrogate, then worst cases; columns per ε: robust accuracy and seconds."""
    clean = torch.tensor(result["clean_correct"], dtype=torch.bool)
    # planned cells come first, so a cell that has not run yet shows as "not run" instead of vanishing
    rows: dict[tuple[str, str, str], dict[str, Any]] = {
        (p["attack"], p["toolkit"], p["surrogate"]): dict(p) for p in result.get("planned", [])}
    worst: dict[tuple[str, float], torch.Tensor] = {}
    for c in result["cells"]:
        lab = _eps_label(c["eps"])
        row = rows.setdefault((c["attack"], c["toolkit"], c["surrogate"]),
                              {"attack": c["attack"], "toolkit": c["toolkit"], "surrogate": c["surrogate"]})
        row[f"robust {lab}"] = c.get("robust_acc", "REJECTED")
        row[f"zero-grad {lab}"] = c["zero_or_nonfinite_grad_frac"]
        row[f"seconds {lab}"] = c["seconds"]
        rob = robust_mask(c)
        if rob is not None:
            for group in (c["surrogate"], "all"):
                key = (group, c["eps"])
                worst[key] = worst.get(key, clean) & rob
    groups = list(dict.fromkeys(g for g, _ in worst))
    for g in [g for g in groups if g not in ("all", "objective")] + ["all"]:
        row = {"attack": "worst case", "toolkit": "every", "surrogate": "all surrogates" if g == "all" else g}
        for (grp, eps), rob in worst.items():
            if grp == g:
                row[f"robust {_eps_label(eps)}"] = round(100 * rob.float().mean().item(), 2)
        rows[("~worst", g, "")] = row
    return pd.DataFrame(list(rows.values()))


def strongest(result: dict[str, Any]) -> dict[str, str]:
    """The single cell with the lowest robust accuracy at each ε."""
    best: dict[str, tuple[float, str]] = {}
    for c in result["cells"]:
        if c.get("valid"):
            lab = _eps_label(c["eps"])
            cand = (c["robust_acc"], f"{c['key']} ({c['surrogate']}) {c['robust_acc']:.2f}%")
            best[lab] = min(best.get(lab, cand), cand)
    return {k: v[1] for k, v in best.items()}


def _shown(df: pd.DataFrame) -> pd.DataFrame:
    """Missing cells as None (printed "not run"); per-cell columns of the worst-case rows as "–" (no such cell)."""
    shown = df.astype(object).where(df.notna(), None)
    worst = shown["attack"] == "worst case"
    for col in shown.columns:
        if col.startswith(("zero-grad", "seconds")):
            shown.loc[worst, col] = "–"
    return shown


def _wall_time(result: dict[str, Any]) -> str:
    parts = result.get("merged_from")
    if parts:  # parts run side by side, or resumed from cached cells, have no wall time in common: count the cells'
        return (f"merged from {len(parts)} runs, whose cells took {sum(c['seconds'] for c in result['cells']):.0f} s "
                "in all")
    return f"total wall time {result.get('wall_seconds', 0):.0f} s"


def render_compare(result: dict[str, Any]) -> str:
    df = compare_frame(result)
    clean = 100 * sum(result["clean_correct"]) / len(result["clean_correct"])
    lines = [
        f"# Cross-toolkit robust accuracy: {result['model']} ({result['config_hash']}"
        + (f", weights {result['weights_hash']}" if result.get("weights_hash") else "") + f", k={result['k']})",
        "",
        f"{result['dataset']}, first {result['n_test']} test images (clean k-NN accuracy on them {clean:.2f}%), "
        f"{'l∞' if result.get('threat_model', 'Linf') == 'Linf' else 'l2'}, judged by the hard k-NN vote; only clean-correct points are attacked. Seed {result['seed']}, "
        f"device {result['device']}, {_wall_time(result)}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "Surrogate `objective` = the paper's attack loss (kFGSM follows it, whatever the toolkits' surrogate). "
        "`zero-grad` = fraction of attacked points whose guiding gradient is exactly zero or non-finite.",
        *([f"Only the cells of {', '.join(result['toolkits_run'])} were run (`--toolkits`); the worst cases are over "
           "the cells that ran."] if result.get("toolkits_run") else []),
        "",
        tabulate(_shown(df), headers="keys", tablefmt="github", showindex=False, missingval="not run"),
        "",
        "Strongest single attack: " + "; ".join(f"ε={k}: {v}" for k, v in strongest(result).items()) + ".",
    ]
    worst_all = df[(df["attack"] == "worst case") & (df["surrogate"] == "all surrogates")]
    for lab, paper in ((f"{k}/255", v) for k, v in (PAPER if result.get("threat_model", "Linf") == "Linf" else {}).items()):
        col = f"robust {lab}"
        if col in df and len(worst_all) and pd.notna(worst_all[col].iloc[0]):
            val = float(worst_all[col].iloc[0])
            lines.append(f"Worst case at ε={lab}: {val:.2f}%, {paper - val:.2f} points below the paper's {paper}%.")
    return "\n".join(lines) + "\n"


def rerender(out_dir: str | os.PathLike, names: tuple[str, ...] | list[str] = STANDARD_SUITE, norm: str = "Linf"
             ) -> dict[str, Any]:
    """Rebuild ``toolkits.{md,csv}`` from the stored ``toolkits.json`` alone (no computing), with the cells
    planned for ``names`` (a table stored before plans were recorded gets them too)."""
    path = Path(out_dir) / f"{_stem(norm)}.json"
    if not path.is_file():
        raise UsageError(f"--render-only needs {path}; run the table first")
    result = read_json(path)
    result["planned"] = [_row_key(spec, sur) for spec, sur in plan_jobs(suite_specs(names, norm),
                                                                         result["surrogates"])]
    save_compare(result, out_dir)
    return result


def save_compare(result: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    stem = _stem(result.get("threat_model", "Linf"))
    if not current().writer:  # rank 0 writes what every rank holds
        return out / f"{stem}.md"
    write_json(out / f"{stem}.json", result)
    write_text(out / f"{stem}.csv", compare_frame(result).to_csv(index=False))
    write_text(out / f"{stem}.md", render_compare(result))
    return out / f"{stem}.md"
