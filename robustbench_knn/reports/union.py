"""The per-sample worst case across runs of one model: a test image counts as robust only if every run that
attacked it left it robust. Each run's figure is an upper bound on the true robust accuracy; so is this union of
their breaks, and it is at most the lowest of them (two runs that break different images, each 50%, may together
leave 0%).

Every run of this project attacks the first N test images, so runs of different N join on a common prefix: on the
first n images, each image is judged by every run that reached it (image 300 of a 500-image join by the 500-image
runs alone, image 30 also by a 100-image run). Which n sets the row: the most images on which the shorter runs break
nothing that the runs reaching all n images left robust (there the longer runs are, on the evidence, as strong as
every run, so more images only sharpen the figure), or a larger n where its join is lower still. A strong audit on
100 images that breaks points a weak 10 000-image run missed thus keeps the row on its 100 images, while a 100-image
audit that only repeats the breaks of 500-image runs leaves the row on 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PerSample:
    """One run at one ε: 0/1 per test image (the first ``len(robust)``), clean-correct and robust."""

    clean: list[int]
    robust: list[int]


def _bits(values: Any) -> list[int] | None:
    if not isinstance(values, list) or not values or not all(v in (0, 1, True, False) for v in values):
        return None
    return [int(v) for v in values]


def per_sample(result: dict[str, Any] | None, kind: str, eps_value: float) -> PerSample | None:
    """The per-image vectors of an evaluate/benchmark result at ``eps_value`` (``per_eps[i].worst_case_robust``)
    or of an audit at its ε (``worst_case_robust``); None where the result holds none."""
    if not isinstance(result, dict):
        return None
    if kind == "audit":
        clean = _bits((result.get("main") or {}).get("clean_correct"))
        robust = _bits(result.get("worst_case_robust"))
    else:
        clean = _bits(result.get("clean_correct"))
        match = [r for r in result.get("per_eps") or [] if isinstance(r, dict)
                 and isinstance(r.get("eps"), (int, float)) and abs(r["eps"] - eps_value) <= 1e-9 * max(1, eps_value)]
        robust = _bits(match[0].get("worst_case_robust")) if match else None
    if clean is None or robust is None or len(clean) != len(robust):
        return None
    return PerSample(clean, robust)


def union(runs: list[tuple[str, PerSample]], n: int) -> tuple[float, float, int, list[str]] | None:
    """(worst case %, clean %, n, labels of the runs joined) on the first ``n`` images, each judged by every run that
    attacked it; None for fewer than two runs, or where none attacked ``n`` images."""
    full = [p for _, p in runs if len(p.robust) >= n]
    if len(runs) < 2 or not full or n < 1:
        return None
    robust = [int(all(p.robust[i] for _, p in runs if i < len(p.robust))) for i in range(n)]
    clean = full[0].clean[:n]
    return round(100 * sum(robust) / n, 2), round(100 * sum(clean) / n, 2), n, [label for label, _ in runs]


def shorter_runs_add_breaks(runs: list[tuple[str, PerSample]], n: int) -> bool:
    """Whether a run on fewer than ``n`` images breaks, among them, one that every run reaching ``n`` left robust."""
    longer = [p for _, p in runs if len(p.robust) >= n]
    return any(not p.robust[i] and all(q.robust[i] for q in longer)
               for _, p in runs if len(p.robust) < n for i in range(len(p.robust)))


def row_union(runs: list[tuple[str, PerSample]]) -> tuple[float, float, int, list[str]] | None:
    """The join that sets a leaderboard row (module docstring): the lowest ``union`` at or above the most images on
    which the shorter runs add no break; on a tie, the one on more images. None for fewer than two runs."""
    sizes = sorted({len(p.robust) for _, p in runs}, reverse=True)
    if not sizes:
        return None
    # the smallest size has no shorter runs, so some size always qualifies
    least = next(n for n in sizes if not shorter_runs_add_breaks(runs, n))
    joins = [j for n in sizes if n >= least and (j := union(runs, n))]
    return min(joins, key=lambda j: j[0]) if joins else None
