"""Evaluation engine: clean accuracy, then each attack at each ε, judged by ``predict`` (the real decision).

Every adversarial example is checked (finite, inside [0, 1], within ε of its clean image); an attack that
violates this is rejected and reported, never silently clipped. A sample is robust at an ε only if it is
correctly classified clean and survives every attack run at that ε (the per-sample worst case).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attacks import AttackSpec, input_gradient

TOL = 1e-6  # float32 slack on the ε-ball and [0, 1] checks


class AttackViolation(RuntimeError):
    """An attack returned an example outside the threat model."""


@dataclass
class ValidityReport:
    n_nonfinite: int
    n_out_of_box: int
    n_out_of_ball: int
    max_linf: float

    @property
    def ok(self) -> bool:
        return self.n_nonfinite == 0 and self.n_out_of_box == 0 and self.n_out_of_ball == 0


@torch.no_grad()
def check_adversarial(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> ValidityReport:
    if x_adv.shape != x.shape:
        raise AttackViolation(f"attack returned shape {tuple(x_adv.shape)} for input {tuple(x.shape)}")
    flat = x_adv.flatten(1)
    finite = torch.isfinite(flat).all(1)
    box = ((flat >= -TOL) & (flat <= 1 + TOL)).all(1)
    linf = (x_adv - x).flatten(1).abs().amax(1)
    linf = torch.where(finite, linf, torch.full_like(linf, float("inf")))
    return ValidityReport(int((~finite).sum()), int((~box).sum()), int((linf > eps + TOL).sum()),
                          float(linf[finite].max()) if finite.any() else float("inf"))


def bad_gradient_mask(clf: torch.nn.Module, attack: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Points whose guiding input-gradient at the clean point is exactly zero or non-finite (AutoAttack check)."""
    if attack.gradient_source is None:
        return torch.zeros(len(x), dtype=torch.bool)
    if attack.gradient_source == "objective":
        grad = input_gradient(lambda z: clf.attack_objective(z, y), x)
    else:
        grad = input_gradient(lambda z: F.cross_entropy(clf(z), y, reduction="none"), x)
    flat = grad.flatten(1)
    return ((flat == 0).all(1) | ~torch.isfinite(flat).all(1)).cpu()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("robustbench-knn", "torch", "torchattacks", "adversarial-robustness-toolbox", "pyautoattack"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_attacks(
    clf: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    specs: list[AttackSpec],
    eps_list: list[float],
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    batch_size: int = 250,
    progress: bool = True,
) -> dict[str, Any]:
    """Attack ``x`` (floats in [0, 1]) with every spec at every ε; return per-ε, per-attack and per-sample results."""
    dev = clf.device
    overrides = overrides or {}
    clean_pred = clf.predict(x).cpu()
    clean_ok = clean_pred == y.cpu()
    per_eps = []
    total = len(eps_list) * len(specs) * ((len(x) + batch_size - 1) // batch_size)
    bar = tqdm(total=total, desc="attacks", disable=not progress, unit="batch")
    for eps in eps_list:
        worst = clean_ok.clone()
        attacks_out: dict[str, Any] = {}
        for spec in specs:
            robust = torch.zeros(len(x), dtype=torch.bool)
            bad_grad = torch.zeros(len(x), dtype=torch.bool)
            violations = {"n_nonfinite": 0, "n_out_of_box": 0, "n_out_of_ball": 0, "max_linf": 0.0}
            t0 = time.perf_counter()
            attack = spec.build(clf, eps, **overrides.get(spec.key, {}))
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
                bar.set_postfix_str(f"eps={eps:.4f} {spec.key}")
                x_adv = attack(xb, yb).detach()
                rep = check_adversarial(xb, x_adv, eps)
                for key in ("n_nonfinite", "n_out_of_box", "n_out_of_ball"):
                    violations[key] += getattr(rep, key)
                violations["max_linf"] = max(violations["max_linf"], rep.max_linf)
                if rep.ok:
                    robust[i:i + batch_size] = clean_ok[i:i + batch_size] & (clf.predict(x_adv).cpu() == yb.cpu())
                bad_grad[i:i + batch_size] = bad_gradient_mask(clf, attack, xb, yb)
                bar.update(1)
            valid = violations["n_nonfinite"] + violations["n_out_of_box"] + violations["n_out_of_ball"] == 0
            entry: dict[str, Any] = {
                "toolkit": spec.toolkit, "params": {**spec.defaults, **overrides.get(spec.key, {})},
                "valid": valid, "violations": violations,
                "seconds": round(time.perf_counter() - t0, 2),
                "zero_or_nonfinite_grad_frac": round(bad_grad.float().mean().item(), 4),
            }
            if valid:
                entry["robust_acc"] = round(100 * robust.float().mean().item(), 2)
                entry["robust"] = robust.int().tolist()
                worst &= robust
            attacks_out[spec.key] = entry
        per_eps.append({
            "eps": eps, "clean_acc": round(100 * clean_ok.float().mean().item(), 2),
            "attacks": attacks_out,
            "worst_case_acc": round(100 * worst.float().mean().item(), 2) if attacks_out else None,
            "worst_case_robust": worst.int().tolist(),
        })
    bar.close()
    rejected = [f"{k} at eps={r['eps']:.4f}" for r in per_eps for k, a in r["attacks"].items() if not a["valid"]]
    return {"n": len(x), "clean_pred": clean_pred.tolist(), "clean_correct": clean_ok.int().tolist(),
            "per_eps": per_eps, "rejected_attacks": rejected}
