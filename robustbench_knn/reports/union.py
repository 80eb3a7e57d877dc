"""The per-sample worst case across runs of one model: a test image counts as robust only if every run that
attacked it left it robust. Each run's figure is an upper bound on the true robust accuracy; so is this union of
their breaks, and it is at most the lowest of them (two runs that break different images, each 50%, may together
leave 0%).

Every run of this project attacks the first N test images, so runs of different N join on a common prefix: on the
first n images, each image is judged by every run that reached it (image 300 of a 500-image join by the 500-image
runs alone, image 30 also by a 100-image run). The row takes the lowest such join over the n the runs used; a figure
on fewer images competes only when it is lower.
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


def lowest_union(runs: list[tuple[str, PerSample]]) -> tuple[float, float, int, list[str]] | None:
    """The lowest ``union`` over the image counts the runs used; on a tie, the one on more images."""
    joins = [j for n in sorted({len(p.robust) for _, p in runs}, reverse=True) if (j := union(runs, n))]
    return min(joins, key=lambda j: j[0]) if joins else None
