"""The sandwich: certified accuracy (``certify``, a sound lower bound) ≤ robust accuracy ≤ the attacks' worst case
(``audit`` / ``evaluate``, an upper bound), per ε, for one model's weights and one threat model.

The attack figure at an ε is an audit's "worst case" curve point, its per-sample worst case at the audited ε, or an
evaluate result's per-ε ``worst_case_acc``; the lowest where several. Where both sides hold per-point data (the
certificate's per-ε ``certified`` lists, else ``radius`` ≥ ε; the results' ``worst_case_robust``), both figures are
computed on the common first min(N_certified, N_attacked) test images and every certified point the attacks broke
is counted. Without per-point data, results on another number of images are shown with both n's and
``n_differs``; no figure is made up for the common points. A certified point broken by an attack, or a certified
figure above the worst case on the same points, is a soundness violation: listed in ``violations``, never hidden.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import UsageError
from ..evaluation.cards import eps_label
from ..evaluation.experiment import DATASET_NAME
from ..store import read_json, write_json, write_text
from .plots import plot_sandwich

RADIUS_ROUNDING = 5e-7  # certify stores radii to 6 decimals; a rounded-up radius must not certify an ε


@dataclass
class Point:
    """One figure of a file at one ε: accuracy (%) and, where stored, the per-point verdicts (first N images)."""

    eps: float
    acc: float
    mask: list[bool] | None = None
    what: str = ""


@dataclass
class Result:
    """A certificate or an attack result, reduced to what the sandwich compares."""

    path: Path
    kind: str  # "certify", "audit" or "evaluate"
    model: str | None
    weights_hash: str | None
    norm: str
    n: int
    dataset_sha256: str | None
    points: list[Point] = field(default_factory=list)
    config_hash: str | None = None


def _read(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        res = read_json(p)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(res, dict):
        raise UsageError(f"{path}: not a result file (a JSON object was expected)")
    return res


def _mask(values: Any, n: int) -> list[bool] | None:
    return [bool(v) for v in values] if isinstance(values, list) and len(values) == n else None


def load_certificate(path: str | os.PathLike) -> Result:
    """A ``certify-*.json`` (UsageError if it is not one)."""
    res = _read(path)
    try:
        n, norm = int(res["n"]), str(res["norm"])
        radius = res.get("radius")
        points = []
        for r in res["per_eps"]:
            e = float(r["eps"])
            mask, what = _mask(r.get("certified"), n), "certified"
            if mask is None and _mask(radius, n) is not None:  # bisection radius: a subset of the certified points
                mask, what = [float(v) - RADIUS_ROUNDING >= e for v in radius], "radius"
            points.append(Point(e, float(r["certified_acc"]), mask, what))
        return Result(Path(path), "certify", str(res["model"]), str(res["weights_hash"]), norm, n,
                      res.get("dataset_sha256"), points)
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path}: not a certificate of `robustbench-knn certify`") from None


def load_attack_result(path: str | os.PathLike) -> Result:
    """An ``audit-*.json`` or ``evaluate-*.json`` (UsageError for anything else, a shard part included)."""
    res = _read(path)
    if "radius" in res and "eps_curves" not in res:
        raise UsageError(f"{path}: a certificate, not an attack result (audit or evaluate JSON)")
    if "shard" in res:
        raise UsageError(f"{path}: one part of a sharded evaluate; join the parts with `robustbench-knn merge`")
    head = {"model": res.get("model"), "weights_hash": res.get("weights_hash"),
            "norm": str(res.get("threat_model", "Linf")), "dataset_sha256": res.get("dataset_sha256"),
            "config_hash": res.get("config_hash")}
    try:
        if "eps_curves" in res:
            n = int(res["n"])
            points = [Point(float(e), float(a), None, "worst case curve") for e, a in res["eps_curves"]["worst case"]]
            mask = _mask(res.get("worst_case_robust"), n)
            if mask is not None:
                points.append(Point(float(res["eps"]), 100 * sum(mask) / max(n, 1), mask, "per-sample worst case"))
            return Result(Path(path), "audit", n=n, points=points, **head)
        if "per_eps" in res and any("worst_case_acc" in r for r in res["per_eps"]):
            n = int(res.get("n_test", res.get("n")))
            points = [Point(float(r["eps"]), float(r["worst_case_acc"]), _mask(r.get("worst_case_robust"), n),
                            "worst case") for r in res["per_eps"] if r.get("worst_case_acc") is not None]
            return Result(Path(path), "evaluate", n=n, points=points, **head)
    except (KeyError, TypeError, ValueError):
        pass
    raise UsageError(f"{path}: not an attack result (the JSON of `robustbench-knn audit` or `evaluate`)")


def check_compatible(src: Result, *, norm: str, model: str | None = None, weights_hash: str | None = None,
                     dataset_sha256: str | None = None, what: str = "the certificate") -> bool:
    """Refuse (UsageError) an attack result of another threat model, data set or model; True when the weights
    were compared, False when ``src`` records no weights hash to compare (the model names then agree).
    ``model`` / ``weights_hash`` None: not known yet, not checked."""
    if src.norm != norm:
        raise UsageError(f"different threat models: {what} is {norm}, {src.path.name} is {src.norm}")
    if dataset_sha256 and src.dataset_sha256 and dataset_sha256 != src.dataset_sha256:
        raise UsageError(f"different data: {what} is on data set {dataset_sha256[:12]}, {src.path.name} on "
                         f"{src.dataset_sha256[:12]}")
    if weights_hash is None:
        return True
    if src.weights_hash is not None:
        if src.weights_hash != weights_hash:
            raise UsageError(f"different weights: {what} is of {model} ({weights_hash}), {src.path.name} of "
                             f"{src.model} ({src.weights_hash})")
        return True
    if src.config_hash == weights_hash:  # a defense without a config is named by its weights
        return True
    if model is not None and src.model is not None and src.model != model:
        raise UsageError(f"different models: {what} is of {model}, {src.path.name} of {src.model} (and records no "
                         f"weights hash)")
    return False


def same_eps(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def check_common_eps(eps: Sequence[float], sources: Sequence[Result]) -> None:
    """Refuse when no ε of ``eps`` is among the attack results' ε."""
    theirs = sorted({p.eps for s in sources for p in s.points})
    if not any(same_eps(e, t) for e in eps for t in theirs):
        raise UsageError(f"no ε in common: certified at {', '.join(f'{e:g}' for e in eps)}; the attack results at "
                         f"{', '.join(f'{e:g}' for e in theirs) or 'none'}")


def _pct(mask: Sequence[bool]) -> float:
    return round(100 * sum(mask) / len(mask), 2) if mask else 0.0


def _candidate(cert: Result, c: Point, src: Result, a: Point) -> dict[str, Any]:
    """Certified and worst case figures of one attack figure at one ε, on common points where both have them."""
    out: dict[str, Any] = {"source": src.path.name, "attack_figure": a.what}
    if c.mask is not None and a.mask is not None:
        m = min(len(c.mask), len(a.mask))
        broken = [i for i in range(m) if c.mask[i] and not a.mask[i]]
        # a radius-derived mask undercounts the certified points; on all of them the stored figure is exact
        cert_acc = c.acc if c.what == "radius" and m == cert.n else _pct(c.mask[:m])
        return {**out, "certified_acc": cert_acc, "worst_case_acc": _pct(a.mask[:m]), "n_certified": m,
                "n_attacked": m, "per_point": True, "certified_from": c.what, "certified_broken": len(broken),
                "broken_points": broken[:20], "n_differs": False}
    return {**out, "certified_acc": round(c.acc, 2), "worst_case_acc": round(a.acc, 2), "n_certified": cert.n,
            "n_attacked": src.n, "per_point": False, "certified_from": "certified_acc", "certified_broken": None,
            "broken_points": [], "n_differs": cert.n != src.n}


def _violations(eps: float, label: str, cand: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    if cand["certified_broken"]:
        found.append({"eps": eps, "eps_label": label, "source": cand["source"], "kind": "certified point broken",
                      "count": cand["certified_broken"], "points": cand["broken_points"], "n": cand["n_certified"],
                      "text": f"{cand['certified_broken']} certified point(s) of the first {cand['n_certified']} "
                              f"broken by the attacks of {cand['source']} at ε = {label} (test images "
                              f"{cand['broken_points']})"})
    if not cand["n_differs"] and cand["certified_acc"] > cand["worst_case_acc"] + 1e-9:
        found.append({"eps": eps, "eps_label": label, "source": cand["source"], "kind": "certified above worst case",
                      "certified_acc": cand["certified_acc"], "worst_case_acc": cand["worst_case_acc"],
                      "n": cand["n_certified"],
                      "text": f"certified {cand['certified_acc']:.2f}% above the worst case "
                              f"{cand['worst_case_acc']:.2f}% of {cand['source']} at ε = {label} on the same "
                              f"{cand['n_certified']} points"})
    return found


def build_sandwich(cert: Result, sources: Sequence[Result]) -> dict[str, Any]:
    """Rows per ε the certificate and at least one attack result share; refuses results of another threat model,
    data set or weights (UsageError)."""
    if not sources:
        raise UsageError("the sandwich needs at least one attack result (audit or evaluate JSON)")
    unchecked = [s.path.name for s in sources if not check_compatible(
        s, norm=cert.norm, model=cert.model, weights_hash=cert.weights_hash, dataset_sha256=cert.dataset_sha256,
        what=cert.path.name)]
    check_common_eps([p.eps for p in cert.points], sources)
    rows, violations = [], []
    for c in sorted(cert.points, key=lambda p: p.eps):
        label = eps_label(c.eps, cert.norm)
        cands = [_candidate(cert, c, s, a) for s in sources for a in s.points if same_eps(a.eps, c.eps)]
        if not cands:
            continue
        for cand in cands:
            violations += _violations(c.eps, label, cand)
        same = [x for x in cands if not x["n_differs"]] or cands  # figures on the same points first
        best = min(same, key=lambda x: (x["worst_case_acc"], not x["per_point"]))
        rows.append({"eps": c.eps, "eps_label": label, "certified_acc": best["certified_acc"],
                     "worst_case_acc": best["worst_case_acc"],
                     "gap": round(best["worst_case_acc"] - best["certified_acc"], 2),
                     **{k: v for k, v in best.items() if k not in ("certified_acc", "worst_case_acc")}})
    return {"model": cert.model, "weights_hash": cert.weights_hash, "norm": cert.norm,
            "certificate": str(cert.path), "n_certificate": cert.n,
            "attack_results": [{"file": str(s.path), "kind": s.kind, "n": s.n, "model": s.model,
                                "weights_hash": s.weights_hash} for s in sources],
            "weights_unchecked": bool(unchecked), "weights_unchecked_files": unchecked,
            "n_differs": any(r["n_differs"] for r in rows), "rows": rows, "violations": violations,
            "curves": _curves(cert, sources)}


def _curves(cert: Result, sources: Sequence[Result]) -> dict[str, list[list[float]]]:
    """Every certified figure and every attack figure against ε, shared ε or not (the plot draws both whole):
    per ε the lowest attack figure of any source."""
    attacked: dict[float, float] = {}
    for src in sources:
        for a in src.points:
            key = next((e for e in attacked if same_eps(e, a.eps)), a.eps)
            attacked[key] = min(attacked.get(key, a.acc), a.acc)
    return {"certified": [[p.eps, round(p.acc, 2)] for p in sorted(cert.points, key=lambda p: p.eps)],
            "worst case": [[e, round(a, 2)] for e, a in sorted(attacked.items())]}


COLUMNS = ["eps", "eps_label", "certified_acc", "worst_case_acc", "gap", "n_certified", "n_attacked", "per_point",
           "certified_broken", "n_differs", "source", "attack_figure"]


def render_markdown(s: dict[str, Any]) -> str:
    from tabulate import tabulate

    lines = [f"# Sandwich: {s['model']} ({s['weights_hash']}), {s['norm']}", "",
             "certified % (sound lower bound) ≤ true robust accuracy ≤ worst case % of the attacks (upper bound).", "",
             f"- certificate: `{Path(s['certificate']).name}` (first {s['n_certificate']} test images)"]
    lines += [f"- attacks: `{Path(a['file']).name}` ({a['kind']}, first {a['n']} test images)"
              for a in s["attack_results"]]
    if s["weights_unchecked"]:
        lines.append(f"- weights NOT checked: {', '.join(s['weights_unchecked_files'])} record(s) no weights hash "
                     f"(the model names agree)")
    if s["n_differs"]:
        lines.append("- n differs: rows marked n_differs compare figures on different numbers of test images "
                     "(no per-point data to restrict them to the common ones)")
    table = [[r["eps_label"], f"{r['certified_acc']:.2f}",
              f"{r['worst_case_acc']:.2f}", f"{r['gap']:+.2f}", r["n_certified"], r["n_attacked"],
              "–" if r["certified_broken"] is None else r["certified_broken"], "yes" if r["n_differs"] else "",
              f"`{r['source']}` ({r['attack_figure']})"] for r in s["rows"]]
    lines += ["", tabulate(table, headers=["ε", "certified %", "worst case %", "gap (points)", "n certified",
                                           "n attacked", "certified but broken", "n differs", "attack result"],
                           tablefmt="github", disable_numparse=True), ""]
    if s["violations"]:
        lines += [f"**SOUNDNESS VIOLATION** ({len(s['violations'])}): the certificate or the attacks' judge is wrong."]
        lines += [f"- {v['text']}" for v in s["violations"]]
    else:
        lines.append("No soundness violation: no certified point broken, no certified figure above the worst case "
                     "on the same points.")
    return "\n".join(lines) + "\n"


def render_csv(s: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(s["rows"])
    return buf.getvalue()


def save_sandwich(s: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """``sandwich-<model>-<hash>-<norm>.{md,csv,json,png}`` in ``out_dir``."""
    stem = Path(out_dir) / f"sandwich-{s['model']}-{s['weights_hash']}-{s['norm']}"
    paths = [stem.with_suffix(x) for x in (".md", ".csv", ".json", ".png")]
    write_text(paths[0], render_markdown(s))
    write_text(paths[1], render_csv(s))
    write_json(paths[2], s)
    plot_sandwich(s["rows"], paths[3], norm=s["norm"], violations=[v["eps"] for v in s["violations"]],
                  curves=s.get("curves"),
                  title=f"{s['model']} ({s['weights_hash']}), {DATASET_NAME}: certified ≤ robust ≤ worst case")
    return paths


def sandwich(certificate: str | os.PathLike, results: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The sandwich of a ``certify-*.json`` and ``audit-*.json`` / ``evaluate-*.json`` files."""
    return build_sandwich(load_certificate(certificate), [load_attack_result(p) for p in results])
