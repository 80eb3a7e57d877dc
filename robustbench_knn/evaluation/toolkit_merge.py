"""``robustbench-knn toolkits --merge DIR,DIR,...``: one cross-toolkit table from tables that ran parts of it
(other ``--attacks``, ``--toolkits``, ``--surrogates`` or ``--eps``), side by side on one machine or on several.

The parts must have judged one model on one set of images: the same weights, data, images, seed, logits and
threat model, the same clean decisions and the same code. A cell that two parts both hold must agree point for
point; the per-sample worst case is then taken over the union of the cells, as one run would."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import UsageError
from ..store import read_json
from .toolkit_compare import _row_key, _stem, plan_jobs, suite_specs

# what must agree between parts: they are one table only if these are equal (clean_correct catches a model or data
# that differ in the last bits, versions a part run with other code)
SETTINGS = ("model", "config_hash", "weights_hash", "k", "dataset", "dataset_sha256", "n_test", "seed", "aligned",
            "threat_model", "versions", "clean_correct")


def read_parts(dirs: list[str | os.PathLike], norm: str = "Linf") -> list[tuple[Path, dict[str, Any]]]:
    """Each folder's stored table (``toolkits.json``, ``toolkits-L2.json`` for ℓ2); refused before any work when
    one is missing or a folder is named twice."""
    if len(dirs) < 2:
        raise UsageError("--merge needs at least two folders, comma-separated")
    paths = [Path(d) / f"{_stem(norm)}.json" for d in dirs]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UsageError("--merge names one folder twice")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"--merge: no stored table at {', '.join(missing)}")
    return [(p, read_json(p)) for p in paths]


def _cell_id(cell: dict[str, Any]) -> tuple[str, str, float]:
    return cell["key"], cell["surrogate"], round(cell["eps"], 8)


def merge_compares(parts: list[tuple[Path, dict[str, Any]]], names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The table of one run holding every part's cells; planned rows: ``names`` × the parts' surrogates."""
    (first_path, first), rest = parts[0], parts[1:]
    for key in SETTINGS:
        for path, part in rest:
            if part.get(key) != first.get(key):
                raise UsageError(f"{path} differs from {first_path} in {key!r}: the parts are not one table")
    surrogates = list(dict.fromkeys(s for _, p in parts for s in p["surrogates"]))
    eps = sorted({round(e, 8): e for _, p in parts for e in p["eps"]}.values())
    cells: dict[tuple[str, str, float], dict[str, Any]] = {}
    for path, part in parts:
        for cell in part["cells"]:
            held = cells.setdefault(_cell_id(cell), cell)
            if held is not cell and held.get("robust") != cell.get("robust"):
                raise UsageError(f"{path}: {cell['key']} ({cell['surrogate']}) at eps={cell['eps']:.4f} differs "
                                 f"from another part's result for the same cell")
    norm = first.get("threat_model", "Linf")
    planned = [_row_key(spec, sur) for spec, sur in plan_jobs(suite_specs(names, norm), surrogates)]
    for cell in cells.values():
        if _row_key_of(cell) not in planned:
            planned.append(_row_key_of(cell))
    merged = {k: v for k, v in first.items() if k not in ("cells", "planned", "toolkits_run", "wall_seconds",
                                                            "command")}  # each part's wall time: merged_from
    merged.update({
        "eps": eps, "surrogates": surrogates, "planned": planned,
        # in planned order, then ε: the table reads as one run's, whatever order the parts finished in
        "cells": sorted(cells.values(), key=lambda c: (planned.index(_row_key_of(c)), c["eps"])),
        "merged_from": [{"folder": str(path.parent), "command": part.get("command"),
                         "wall_seconds": part.get("wall_seconds")} for path, part in parts],
        "devices": sorted({part["device"] for _, part in parts}),
        "machine": " + ".join(dict.fromkeys(str(part.get("machine")) for _, part in parts)),
    })
    return merged


def _row_key_of(cell: dict[str, Any]) -> dict[str, str]:
    return {"attack": cell["attack"], "toolkit": cell["toolkit"], "surrogate": cell["surrogate"]}
