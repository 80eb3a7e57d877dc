"""``robustbench-knn merge DIR``: join the parts that ``evaluate --shard I/N`` wrote into the result a single run
writes. Every part must be there once and carry the same settings, model hash and dataset hash."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..config import UsageError
from ..store import read_json
from .evaluate import assemble, combine_parts, is_complete

PART = re.compile(r"^(?P<stem>.+)\.part-(?P<i>\d+)-of-(?P<n>\d+)\.json$")
# what must agree between parts: they are one evaluation only if these are equal (clean_pred catches a model or
# data that differ in the last bits, versions a part run with other code)
SETTINGS = ("model", "config_hash", "dataset", "dataset_sha256", "n_clean", "clean_acc_full", "n_test", "seed",
            "batch_size", "surrogate", "aligned", "attacks", "eps", "versions", "clean_pred")


def find_parts(folder: str | os.PathLike) -> dict[str, dict[int, Path]]:
    """Part files of ``folder`` grouped by evaluation (file stem); refuses mixed part counts."""
    groups: dict[str, dict[int, Path]] = {}
    counts: dict[str, set[int]] = {}
    for path in sorted(Path(folder).glob("*.part-*-of-*.json")):
        m = PART.match(path.name)
        if m:
            groups.setdefault(m["stem"], {})[int(m["i"])] = path
            counts.setdefault(m["stem"], set()).add(int(m["n"]))
    for stem, ns in counts.items():
        if len(ns) != 1:
            raise UsageError(f"{stem}: parts written for different part counts {sorted(ns)}")
        n = ns.pop()
        missing = sorted(set(range(n)) - set(groups[stem]))
        if missing:
            raise UsageError(f"{stem}: part(s) {', '.join(map(str, missing))} of {n} missing (have "
                             f"{', '.join(map(str, sorted(groups[stem])))}); run them with --shard I/{n}")
    return groups


def merge_parts(parts: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
    """The single-run result from the results of all parts (``names``: their files, for messages)."""
    names = names or [f"part {i}" for i in range(len(parts))]
    first = parts[0]
    for key in SETTINGS:
        for part, name in zip(parts[1:], names[1:]):
            if part.get(key) != first.get(key):
                raise UsageError(f"{name} differs from {names[0]} in {key!r}: the parts are not one evaluation")
    for part, name in zip(parts, names):
        if "shard" not in part:
            raise UsageError(f"{name} is not a part written by evaluate --shard")
    keys = first["attacks"]
    cells = {}
    for i, eps in enumerate(first["eps"]):
        for key in keys:
            entries = [p["per_eps"][i]["attacks"][key] for p in parts]
            if len({repr(e["params"]) for e in entries}) != 1:
                raise UsageError(f"the parts ran {key} at eps={eps:.4f} with different parameters")
            try:
                cell = combine_parts(entries)
            except ValueError as e:
                raise UsageError(f"{key} at eps={eps:.4f}: {e}") from None
            if not is_complete(cell):
                raise UsageError(f"{key} at eps={eps:.4f}: the parts cover batches {cell['batches']} of "
                                 f"{cell['n_batches']}")
            cells[(eps, key)] = cell
    clean_ok = torch.tensor(first["clean_correct"], dtype=torch.bool)
    merged = {k: v for k, v in first.items() if k not in ("shard", "per_eps", "rejected_attacks", "invalid_examples",
                                                               "wall_seconds")}
    merged.update(assemble(clean_ok, first["eps"], keys, cells))
    merged.update({"processes": len(parts), "merged_from": names,
                   "wall_seconds": max(p["wall_seconds"] for p in parts),
                   "devices": sorted({p["device"] for p in parts})})
    return merged


def merge_dir(folder: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """Merge every complete set of parts in ``folder``; write each result beside them as a single run would."""
    from .experiment import save_results

    groups = find_parts(folder)
    if not groups:
        raise UsageError(f"no evaluate parts (*.part-I-of-N.json) in {folder}")
    merged = []
    for files in groups.values():  # every set checked before anything is written
        paths = [files[i] for i in sorted(files)]
        merged.append(merge_parts([read_json(p) for p in paths], [p.name for p in paths]))
    return [(save_results(m, folder), m) for m in merged]
