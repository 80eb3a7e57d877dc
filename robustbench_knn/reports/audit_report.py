"""An audit's result as files: the JSON, the checks and attacks as CSV, the RobustBench-style model card and the two
plots (robust accuracy against ε and against the attack's iterations)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..evaluation.api import model_card
from ..evaluation.checks import exact_zero
from ..evaluation.distributed import current
from ..store import write_json, write_text
from .plots import plot_eps_curves, plot_steps_curves


def checks_frame(result: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(result["checks"])[["name", "verdict", "numbers", "why"]]


def attacks_frame(result: dict[str, Any]) -> pd.DataFrame:
    r = result["main"]["per_eps"][0]["attacks"]
    rows = [{"attack": k, "family": result["families"][k], "standard": k in result["standard"],
             "robust_acc": a.get("robust_acc", "REJECTED"), "zero_grad_frac": a["zero_or_nonfinite_grad_frac"],
             "seconds": a["seconds"]} for k, a in r.items()]
    return pd.DataFrame(rows)


def audit_model_card(result: dict[str, Any]) -> dict[str, Any]:
    """RobustBench's ``model_info`` fields from an audit: the best upper bound (per-sample worst case over every
    run) as the robust accuracy. ``unreliable`` when a deciding check failed other than the standard suite being
    beaten by the other attacks (that failure discredits the standard suite's figure, not this bound), unless the
    bound is an exact 0.0% (:func:`exact_zero`), which no weakness of the attacks can have made too high."""
    verdict = result["verdict"]
    against_bound = [name for name in verdict["failed"] if name != "adaptive/all vs standard"]
    if exact_zero(result.get("worst_case_robust", [1]), result["checks"]):
        against_bound = []
    cert = result.get("certificate") or {}
    certified = (cert["certified_acc"][cert["eps"].index(result["eps"])]
                 if result["eps"] in cert.get("eps", []) else None)
    return model_card(result.get("model", "model"), result.get("dataset", ""), result["eps"], result["clean_acc"],
                      result["upper_bound_acc"], result["robust_acc"], result["n"],
                      unreliable=bool(against_bound), footnote=f"Audit verdict: {verdict['text']}",
                      backbone=result.get("backbone"), threat_model=result.get("threat_model", "Linf"),
                      certified_acc=certified)


def save_audit(result: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """``audit-<model>-<hash>-eps<N>.json`` (ℓ2: ``-L2-eps<ε>``) + ``.csv`` (checks) + ``-attacks.csv`` + the two
    PNG plots."""
    out = Path(out_dir)
    norm = result.get("threat_model", "Linf")
    label = (f"eps{result['eps'] * 255:g}" if norm == "Linf" else f"{norm}-eps{result['eps']:g}").replace(".", "p")
    stem = out / f"audit-{result.get('model', 'model')}-{result.get('config_hash', 'x')}-{label}"
    if not current().writer:  # rank 0 writes what every rank holds
        return stem.with_suffix(".json")
    write_json(stem.with_suffix(".json"), result)
    write_text(stem.with_suffix(".csv"), checks_frame(result).to_csv(index=False))
    write_text(Path(f"{stem}-attacks.csv"), attacks_frame(result).to_csv(index=False))
    write_json(Path(f"{stem}.model-card.json"), audit_model_card(result))
    plot_eps_curves(result["eps_curves"], Path(f"{stem}-eps.png"),
                    title=f"{result.get('model', '')}: robust accuracy vs ε", norm=norm)
    if result["steps_curves"]:
        plot_steps_curves(result["steps_curves"], Path(f"{stem}-steps.png"), eps=result["eps"], norm=norm)
    return stem.with_suffix(".json")
