"""Sanity checks as first-class code (after AutoAttack's ``checks.py``): cheap checks every default run carries,
and the tolerance the audit compares attacks with.

A check is PASS / WARN / FAIL with its numbers. In a model card any FAIL sets ``unreliable: true`` and the
footnote names it; the masking audit (``audit.py``) adds its expensive checks on top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ZERO_GRAD_FAIL = 0.05  # more than this fraction of attacked points with a zero/non-finite guiding gradient
AGREEMENT_WARN = 90.0  # % of points on which the surrogate's argmax must agree with the decision
CERTIFICATE_CHECK = "certified points unbroken"  # the audit's: a certified point that an attack broke


@dataclass
class Check:
    """One check. ``decides``: in the audit, a FAIL here means the reported number itself is contradicted or the
    bound is not established (NOT TRUSTED); other checks diagnose the standard attacks (masking signs)."""

    name: str
    verdict: str  # PASS | WARN | FAIL
    numbers: str
    why: str
    decides: bool = False


def binomial_tol(acc: float, n: int, z: float = 1.96) -> float:
    """Half-width (accuracy points) of the normal-approximation confidence interval of an accuracy measured on
    ``n`` points, and at least one point's worth: two figures closer than this are not told apart."""
    p = min(max(acc / 100, 0.0), 1.0)
    return max(100 * z * math.sqrt(p * (1 - p) / max(n, 1)), 100 / max(n, 1))


def validity_check(cells: dict[str, Any]) -> Check:
    bad = {k: c.get("n_invalid", 0) for k, c in cells.items() if c.get("n_invalid", 0)}
    return Check("valid examples", "FAIL" if bad else "PASS",
                 ", ".join(f"{k}: {n} outside the threat model" for k, n in bad.items()) or
                 f"every example of {len(cells)} attacks finite, in [0, 1] and inside the ε-ball",
                 "an attack that returns examples outside the threat model is broken; its invalid examples count "
                 "as its failures, so its figure may be too high", decides=True)


def gradient_check(cells: dict[str, Any], families: dict[str, str]) -> Check:
    zero = {k: c["zero_or_nonfinite_grad_frac"] for k, c in cells.items() if families.get(k) == "white-box"}
    worst = max(zero, key=zero.get) if zero else None
    frac = zero[worst] if worst else 0.0
    return Check("zero/non-finite gradients", "PASS" if frac == 0 else "WARN" if frac <= ZERO_GRAD_FAIL else "FAIL",
                 f"max {100 * frac:.1f}% of points ({worst})" if worst else "no gradient-based attack",
                 "a gradient-based attack cannot move a point whose guiding gradient is zero or non-finite "
                 "(AutoAttack check_zero_gradients)", decides=True)


def gradient_free_check(cells: dict[str, Any], families: dict[str, str], n: int) -> Check | None:
    """A gradient-free attack beating every gradient-based one by more than the noise: masked gradients."""
    acc = {k: c["robust_acc"] for k, c in cells.items() if "robust_acc" in c}
    wb = [k for k in acc if families.get(k) == "white-box"]
    gf = [k for k in acc if families.get(k) == "gradient-free"]
    if not wb or not gf:
        return None
    best_wb, best_gf = min(wb, key=acc.get), min(gf, key=acc.get)
    tol = binomial_tol(acc[best_wb], n)
    fail = acc[best_wb] > acc[best_gf] + tol
    return Check("gradient-free not stronger", "FAIL" if fail else "PASS",
                 f"{best_gf} {acc[best_gf]:.1f}% vs best gradient-based {best_wb} {acc[best_wb]:.1f}% "
                 f"(tolerance {tol:.1f})",
                 "a gradient-free attack beating gradient attacks means the gradients are masked", decides=True)


@torch.no_grad()
def agreement_check(clf: torch.nn.Module, x: torch.Tensor) -> Check | None:
    """Does the surrogate's argmax (before any decision alignment) agree with the judged decision?"""
    raw = getattr(clf, "surrogate_logits", None)
    if raw is None or len(x) == 0:
        return None
    agree = 100 * (raw(x).argmax(1).cpu() == clf.predict(x).cpu()).float().mean().item()
    return Check("surrogate agrees with decision", "PASS" if agree >= AGREEMENT_WARN else "WARN",
                 f"{agree:.1f}% of {len(x)} points",
                 "surrogate-guided attacks aim at the surrogate's decision, not the judged one")


@torch.no_grad()
def determinism_check(clf: torch.nn.Module, x: torch.Tensor) -> Check | None:
    """AutoAttack's check_randomized: three decisions and two forwards on the same clean images must agree."""
    if len(x) == 0:
        return None
    preds = [clf.predict(x) for _ in range(3)]
    outs = [clf(x) for _ in range(2)]
    same = all(torch.equal(preds[0], p) for p in preds[1:]) and torch.allclose(outs[0], outs[1], atol=1e-5)
    return Check("deterministic", "PASS" if same else "WARN", f"3 calls {'agree' if same else 'DIFFER'}",
                 "a randomised decision needs EOT attacks; fixed-input attacks overestimate its robustness")


def exact_zero(robust: Sequence[int] | torch.Tensor, checks: Sequence[Check | dict[str, Any]]) -> bool:
    """No point left robust (each robust flag already counts an invalid example as a failure of the attack, so every
    break is a valid example), a decision that gave the same answer on every call, and no certificate that
    contradicts a break (which would put the judge of validity itself in doubt): 0.0% is then exact, and no sign
    of weak or masked attacks can mean it is too high."""
    verdicts = {c["name"] if isinstance(c, dict) else c.name: c["verdict"] if isinstance(c, dict) else c.verdict
                for c in checks}
    return (verdicts.get("deterministic") == "PASS" and verdicts.get(CERTIFICATE_CHECK) != "FAIL"
            and not any(bool(v) for v in robust))


def cheap_checks(clf: torch.nn.Module, cells: dict[str, Any], families: dict[str, str], n: int,
                 x: torch.Tensor) -> list[Check]:
    """The checks a default run carries: validity, zero gradients, gradient-free vs gradient-based, and on ``x``
    (a few clean images) a deterministic decision and surrogate vs decision agreement."""
    checks = [validity_check(cells), gradient_check(cells, families)]
    checks += [c for c in (gradient_free_check(cells, families, n), determinism_check(clf, x),
                           agreement_check(clf, x)) if c is not None]
    return checks


def family_of(spec: Any, clf: torch.nn.Module) -> str:
    """white-box / gradient-free / transfer: the adaptive attacks say so; others by their gradient source."""
    family = getattr(spec.factory, "family", None)
    if family is None:
        attack = spec.build(clf, 1 / 255)
        family = "gradient-free" if attack.gradient_source is None else "white-box"
    return family


def reliability(checks: list[Check], audit: dict[str, Any] | None = None, worst: float | None = None,
                n: int = 0, robust: Sequence[int] | None = None) -> tuple[bool, str]:
    """(unreliable, footnote) for a model card. Any failed cheap check sets unreliable, with its numbers in the
    footnote. An audit of the same model and ε on the same images adds its bound: a worst case above it (beyond
    the binomial tolerance) is unreliable too, since the audit's attacks broke points this run counts robust.
    ``robust``: the per-sample worst case; when it leaves no point (:func:`exact_zero`) the 0.0% is exact and
    failed checks are named as masking signs without making the card unreliable."""
    failed = [c for c in checks if c.verdict == "FAIL"]
    if audit is not None and worst is not None and audit.get("n") == n:
        tol = binomial_tol(worst, n)
        above = worst > audit["upper_bound_acc"] + tol
        checks = [*checks, Check("matches the audit's bound", "FAIL" if above else "PASS",
                                 f"{worst:.1f}% vs the audit's {audit['upper_bound_acc']:.1f}% (tolerance {tol:.1f})",
                                 "the masking audit's attacks on the same images found more")]
        failed = [c for c in checks if c.verdict == "FAIL"]
    warned = [c for c in checks if c.verdict == "WARN"]
    text = ("Robust accuracy is the per-sample worst case over the attacks listed, judged by the model's own "
            "decision. Cheap checks: " + "; ".join(f"{c.name} {c.verdict} ({c.numbers})" for c in checks) + ".")
    exact = robust is not None and exact_zero(robust, checks)
    if failed and exact:
        text += (" The worst case 0.0% is exact (every point broken by a valid example of a deterministic decision);"
                 " masking signs: " + ", ".join(c.name for c in failed) + ".")
    elif failed:
        text += " UNRELIABLE: " + ", ".join(c.name for c in failed) + " failed" + \
            ("." if audit is not None else "; run `robustbench-knn audit`.")
    elif warned:
        text += " Warnings: " + ", ".join(c.name for c in warned) + "."
    if audit is not None:
        text += f" Masking audit of this model at this ε ({audit['n']} images): {audit['text']}"
    return bool(failed) and not exact, text
