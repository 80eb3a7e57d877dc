"""CI gate: a fixed-seed, CPU-sized benchmark compared with a committed baseline.

It fails (exit 1) when
1. the model regresses: its clean, per-attack or worst-case robust accuracy falls below the baseline by
   more than the tolerance;
2. the evaluation regresses (weaker attacks make every model look better): the reference model's robust
   accuracy rises above its baseline by more than the tolerance, or an attack no longer breaks more than
   ``tol_points`` of the reference points it broke in the baseline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..attacks import get_attack
from ..config import ExperimentConfig, UsageError, get_model_config
from ..data import CIFAR10
from ..devices import resolve_device
from ..paper.classifier import build_classifier
from ..paper.train import train_model
from .evaluate import run_attacks, versions


@dataclass(frozen=True)
class GateConfig:
    n_train: int = 5000  # first N training images
    epochs: int = 6
    model_epochs: int | None = None  # the model under test only (None: ``epochs``); plants an under-trained model
    batch_size: int = 500
    k: int = 100  # k ≤ the bank; 800 would vote over 16% of a 5000-image bank
    n_test: int = 300
    eps: float = 8 / 255
    norm: str = "Linf"  # the threat model (an ℓ2 gate: norm "L2" with eps 0.5)
    attacks: tuple[str, ...] = ("kfgsm", "aa:apgd")
    seed: int = 0
    model: str = "full"
    reference: str = "a"  # an undefended CE MLP: attacks must keep breaking it
    tol_acc: float = 3.0  # points: 2x the largest same-seed move measured across machines (1.33), rounded up
    tol_points: int = 4  # lost reference breaks allowed: 2x the most measured across machines (2)
    attack_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    config_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"model": {"w_r": 32}} (tests)

    def experiment(self, which: str) -> ExperimentConfig:
        base = get_model_config(self.model if which == "model" else self.reference)
        epochs = self.model_epochs if which == "model" and self.model_epochs is not None else self.epochs
        train = {"n_train": self.n_train, "epochs": epochs, "batch_size": self.batch_size, "seed": self.seed}
        cfg = base.replace(name=f"gate-{base.name}", k=self.k, train=train)
        return cfg.replace(**self.config_overrides) if self.config_overrides else cfg


def run_gate(gcfg: GateConfig, data: CIFAR10, *, device: str = "auto", cache_dir: str | None = None,
             perturb_model: float = 0.0, progress: bool = False, model: torch.nn.Module | None = None
             ) -> dict[str, Any]:
    """Train (cached) and evaluate the model and the reference. ``perturb_model`` adds Gaussian noise of that
    relative size to the model's weights (used to plant a model regression). ``model``: a ready defense (a
    user's ``MODULE:FUNCTION`` or an exported file) evaluated in place of ``gcfg.model``'s training."""
    t0 = time.perf_counter()
    specs = [get_attack(a) for a in gcfg.attacks]
    overrides = {get_attack(k).key: v for k, v in gcfg.attack_overrides.items()}
    sub = data.test.head(gcfg.n_test)
    out: dict[str, Any] = {"settings": _settings(gcfg), "versions": versions()}
    for which in ("model", "reference"):
        if which == "model" and model is not None:
            clf = model.to(resolve_device(device))
            if perturb_model:
                _perturb(clf.net, perturb_model)
        else:
            trained = train_model(gcfg.experiment(which), data, device=device, cache_dir=cache_dir,
                                  progress=progress)
            if which == "model" and perturb_model:
                _perturb(trained.net, perturb_model)
            clf = build_classifier(trained, cache_bank=not (which == "model" and perturb_model))
        res = run_attacks(clf, sub.floats(), sub.y, specs, [gcfg.eps], overrides=overrides, progress=progress,
                          seed=gcfg.seed, norm=gcfg.norm)
        r = res["per_eps"][0]
        clean = torch.tensor(res["clean_correct"], dtype=torch.bool)
        out[which] = {
            "clean_acc": r["clean_acc"], "worst_case_acc": r["worst_case_acc"],
            "attacks": {k: {"robust_acc": a["robust_acc"],
                            "broken": [i for i, (c, rob) in enumerate(zip(clean.tolist(), a["robust"])) if c and not rob],
                            "robust": [i for i, rob in enumerate(a["robust"]) if rob]}
                        for k, a in r["attacks"].items()},
        }
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _perturb(net: torch.nn.Module, relative: float) -> None:
    """Gaussian noise of ``relative`` × each tensor's std on the weights (a planted model regression)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in net.parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.device)
            p.add_(noise * relative * (p.std() if p.numel() > 1 else p.abs()))


# Planted regressions (`robustbench-knn gate --plant NAME`): a self-test showing the gate can fail.
# name → (GateConfig changes, relative weight noise on the model)
PLANTS: dict[str, tuple[dict[str, Any], float]] = {
    "perturbed-model": ({}, 1.0),  # check 1: weights + N(0, std) noise
    "one-epoch-model": ({"model_epochs": 1}, 0.0),  # check 1: an under-trained model
    "attack-1-step": ({"attack_overrides": {"kfgsm": {"steps": 1}}}, 0.0),  # check 2: a weakened attack
    "attack-step-div100": ({"attack_overrides": {"kfgsm": {"step_ratio": 0.001}}}, 0.0),  # check 2
}


def planted(gcfg: GateConfig, name: str) -> tuple[GateConfig, float]:
    """The gate config and weight noise of a planted regression."""
    if name not in PLANTS:
        raise UsageError(f"unknown planted regression {name!r}; choose from {', '.join(PLANTS)}")
    changes, noise = PLANTS[name]
    if "attack_overrides" in changes:  # on top of the gate's own overrides
        merged = {**gcfg.attack_overrides}
        for key, params in changes["attack_overrides"].items():
            merged[key] = {**merged.get(key, {}), **params}
        changes = {**changes, "attack_overrides": merged}
    return dataclasses.replace(gcfg, **changes), noise


def _settings(gcfg: GateConfig) -> dict[str, Any]:
    d = dataclasses.asdict(gcfg)
    d["attacks"] = list(gcfg.attacks)
    return d


@dataclass
class Finding:
    check: str  # "model regression" | "evaluation regression"
    what: str
    baseline: float
    current: float
    limit: str

    @property
    def row(self) -> list[Any]:
        return [self.check, self.what, self.baseline, self.current, self.limit]


def compare(baseline: dict[str, Any], current: dict[str, Any], tol_acc: float, tol_points: int) -> list[Finding]:
    """Every way ``current`` is worse than ``baseline`` beyond the tolerances (empty: pass)."""
    found: list[Finding] = []
    bm, cm = baseline["model"], current["model"]
    for name, b, c in [("model clean", bm["clean_acc"], cm["clean_acc"]),
                       ("model worst case", bm["worst_case_acc"], cm["worst_case_acc"])] + \
            [(f"model {k}", bm["attacks"][k]["robust_acc"], cm["attacks"][k]["robust_acc"])
             for k in bm["attacks"] if k in cm["attacks"]]:
        if c < b - tol_acc:
            found.append(Finding("model regression", name, b, c, f">= {b - tol_acc:.2f}"))
    br, cr = baseline["reference"], current["reference"]
    for k in br["attacks"]:
        if k not in cr["attacks"]:
            found.append(Finding("evaluation regression", f"reference {k} missing", br["attacks"][k]["robust_acc"],
                                 float("nan"), "present"))
            continue
        b, c = br["attacks"][k]["robust_acc"], cr["attacks"][k]["robust_acc"]
        if c > b + tol_acc:
            found.append(Finding("evaluation regression", f"reference {k} robust acc", b, c, f"<= {b + tol_acc:.2f}"))
    # Broken sets are compared on the reference only: on the model under test they move whenever the model does.
    # A lost break is a point the attack broke in the baseline that now survives it; points that are now
    # misclassified clean (the retrained reference moved) are not the attack's doing and do not count.
    for k, a in br["attacks"].items():
        if k in cr["attacks"]:
            lost = set(a["broken"]) & set(cr["attacks"][k]["robust"])
            if len(lost) > tol_points:
                found.append(Finding("evaluation regression", f"reference {k}: baseline breaks no longer found",
                                     len(a["broken"]), len(a["broken"]) - len(lost), f"<= {tol_points} lost"))
    return found


def load_baseline(path: str | os.PathLike) -> dict[str, Any]:
    """The committed baseline, checked to be a gate result before any training (bad file: ``UsageError``)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no gate baseline at {path}; create one with --update-baseline --message ...")
    try:
        baseline = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"gate baseline {path} is not JSON ({e}); give a file written by --update-baseline") from None
    except OSError as e:
        raise UsageError(f"cannot read gate baseline {path}: {e.strerror or e}") from None
    ok = isinstance(baseline, dict) and isinstance(baseline.get("settings"), dict) and all(
        isinstance(baseline.get(w), dict) and isinstance(baseline[w].get("attacks"), dict)
        and all(k in baseline[w] for k in ("clean_acc", "worst_case_acc")) for w in ("model", "reference"))
    if not ok:
        raise UsageError(f"gate baseline {path} is not a gate result (settings, model, reference); "
                         f"give a file written by --update-baseline")
    return baseline


def check_baseline(baseline: dict[str, Any], gcfg: GateConfig) -> None:
    if baseline.get("settings", {}).get("model", "full") != gcfg.model:
        raise UsageError(f"the gate baseline is for model {baseline['settings'].get('model')!r}, not {gcfg.model!r}; "
                         f"give --baseline FILE made for it (--update-baseline --message ...)")
    if baseline.get("settings", {}).get("norm", "Linf") != gcfg.norm:
        raise UsageError(f"the gate baseline is for the {baseline['settings'].get('norm', 'Linf')} threat model, not "
                         f"{gcfg.norm}; give --baseline FILE made for it (--update-baseline --message ...)")
    if baseline.get("settings", {}).get("attacks") != list(gcfg.attacks):
        raise UsageError("the gate baseline was made with other settings; rerun with --update-baseline --message ...")
