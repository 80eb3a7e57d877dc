"""RobustBench-style model cards, and what a card says about its own reliability: the verdict of an audit of the
same model and ε when one exists (kept beside the model's cached cells), else the cheap checks of the run."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..attacks import get_attack
from ..store import read_json, write_json
from .checks import cheap_checks, family_of, reliability


def eps_label(eps: float, norm: str = "Linf") -> str:
    """ℓ∞ radii in the 8/255 form where they are whole steps of 1/255; ℓ2 radii as plain numbers (1.0 is "1", not
    "255/255")."""
    if norm != "Linf":
        return f"{eps:.4g}"
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def model_card(name: str, dataset: str, eps: float, clean_acc: float, robust_acc: float,
               per_attack: dict[str, float], n_examples: int, unreliable: bool | None = None,
               footnote: str | None = None, n_invalid: dict[str, int] | None = None,
               backbone: dict[str, Any] | None = None, threat_model: str = "Linf",
               certified_acc: float | None = None) -> dict[str, Any]:
    """RobustBench's ``model_info`` fields (accuracies as strings in %, as there), with the per-sample worst case
    over every attack in place of ``autoattack_acc`` and the per-attack breakdown; ``unreliable`` from an audit
    or the run's cheap checks (None only where no check ran); ``backbone``: the network a subject's features
    come from (its hashes and head accuracy), where there is one; ``certified_acc``: the certified lower bound at
    this ε on the same images, where one was computed."""
    card = {
        "name": name, "dataset": "cifar10", "dataset_detail": dataset, "threat_model": threat_model,
        "eps": eps_label(eps, threat_model),
        "clean_acc": f"{clean_acc:.2f}", "reported": None, "worst_case_robust_acc": f"{robust_acc:.2f}",
        "autoattack_acc": None, "unreliable": unreliable, "n_examples": n_examples,
        "footnote": footnote or ("Robust accuracy is the per-sample worst case over the attacks listed, judged by "
                                 "the model's own decision (the hard vote of a k-NN); no check was run."),
        "attacks": {k: f"{v:.2f}" for k, v in per_attack.items()},
        "invalid_examples": {k: v for k, v in (n_invalid or {}).items() if v},
    }
    if certified_acc is not None:
        card["certified_acc"] = f"{certified_acc:.2f}"
    return {**card, "backbone": backbone} if backbone else card


def audit_record_path(cells: str | os.PathLike, eps: float, norm: str = "Linf") -> Path:
    return Path(cells) / f"audit-{'' if norm == 'Linf' else norm + '-'}eps{eps:.6f}.json"


def save_audit_record(cells: str | os.PathLike | None, result: dict[str, Any]) -> None:
    """Keep an audit's verdict beside the model's cells, so later runs' cards at the same ε carry it."""
    if cells is None:
        return
    v = result["verdict"]
    write_json(audit_record_path(cells, result["eps"], result.get("threat_model", "Linf")),
               {"status": v["status"], "text": v["text"], "upper_bound_acc": v["upper_bound_acc"], "n": result["n"]})


def find_audit(cells: str | os.PathLike | None, eps: float, norm: str = "Linf") -> dict[str, Any] | None:
    path = audit_record_path(cells, eps, norm) if cells is not None else None
    return read_json(path) if path is not None and path.is_file() else None


def annotate_reliability(result: dict[str, Any], clf: torch.nn.Module, x: torch.Tensor,
                         cells: str | os.PathLike | None) -> None:
    """Add the cheap checks, ``unreliable`` and the card's footnote to each ε of a ``run_attacks`` result.
    ``x``: a few clean images for the surrogate/decision agreement."""
    keys = list(result["per_eps"][0]["attacks"]) if result["per_eps"] else []
    families = {k: family_of(get_attack(k), clf) for k in keys}
    n = max(result["n"], 1)  # accuracies are over every image, not only the clean-correct ones
    for r in result["per_eps"]:
        checks = cheap_checks(clf, r["attacks"], families, n, x)
        audit = find_audit(cells, r["eps"], result.get("threat_model", "Linf"))
        unreliable, footnote = reliability(checks, audit, r["worst_case_acc"], result["n"], r.get("worst_case_robust"))
        r.update({"checks": [asdict(c) for c in checks], "unreliable": unreliable, "footnote": footnote,
                  "families": families, "audit": audit})


def card_of(name: str, dataset: str, r: dict[str, Any], n: int, backbone: dict[str, Any] | None = None,
            threat_model: str = "Linf") -> dict[str, Any]:
    """The card of one ε of a result annotated by :func:`annotate_reliability`."""
    return model_card(name, dataset, r["eps"], r["clean_acc"], r["worst_case_acc"],
                      {k + (" (on survivors)" if a.get("on_survivors") else ""): a["robust_acc"]
                       for k, a in r["attacks"].items() if "robust_acc" in a}, n,
                      unreliable=r.get("unreliable"), footnote=r.get("footnote"),
                      n_invalid={k: a.get("n_invalid", 0) for k, a in r["attacks"].items()}, backbone=backbone,
                      threat_model=threat_model)
