"""The audit's checks and its verdict: each check PASS / WARN / FAIL with its numbers, after Carlini et al.'s
checklist ("On Evaluating Adversarial Robustness", 2019), AutoAttack's ``checks.py`` and the active test of attack
strength (Zimmermann et al. 2022). ``audit.py`` runs the attacks; this module only judges their results."""

from __future__ import annotations

from typing import Any

import torch

from .checks import (
    CERTIFICATE_CHECK,
    Check,
    agreement_check,
    determinism_check,
    gradient_check,
    validity_check,
)


# --------------------------------------------------------------------------------------------------- checks
def _gt(a: float, b: float, tol: float) -> bool:
    return a > b + tol


def bound_check(reported: float, bound: float, tol: float) -> Check:
    """The standard suite's figure must survive every other attack (within ``tol`` points)."""
    return Check("adaptive/all vs standard", "FAIL" if _gt(reported, bound, tol) else "PASS",
                 f"standard suite {reported:.1f}% → all attacks {bound:.1f}% (tolerance {tol:.1f})",
                 "attacks that go after the k-NN vote itself find what the standard suite missed", decides=True)


def model_checks(clf: torch.nn.Module, x: torch.Tensor) -> list[Check]:
    """AutoAttack's check_randomized and check_range_output, and whether the surrogate agrees with the vote."""
    checks = [c for c in (determinism_check(clf, x),) if c is not None]
    with torch.no_grad():
        out = clf(x)
    probs = bool(out.min() > -1e-5 and out.max() < 1 + 1e-5 and ((out.sum(1) - 1).abs() < 1e-5).all())
    checks.append(Check("logits not probabilities", "WARN" if probs else "PASS",
                        f"outputs in [{out.min():.3g}, {out.max():.3g}]",
                        "CE on probabilities saturates and hides gradients (AutoAttack check_range_output)"))
    # the surrogate's own logits: decision-aligned ones (the default forward) agree with the vote by construction
    agreement = agreement_check(clf, x)
    if agreement is not None:
        checks.append(agreement)
    return checks


def attack_checks(r: dict[str, Any], families: dict[str, str], standard: list[str], tol: float) -> list[Check]:
    """Checks from one ε's results: validity, adaptive vs standard, gradient-free/transfer vs white-box,
    zero gradients (of every gradient-based attack, the adaptive ones' own losses included)."""
    att = r["attacks"]
    acc = {k: a["robust_acc"] for k, a in att.items()}
    checks = [validity_check(att)]
    std_wb = [k for k in standard if families.get(k) == "white-box" and k in acc]
    best_wb = min((acc[k] for k in std_wb), default=None)
    for fam, name in (("gradient-free", "gradient-free not stronger"), ("transfer", "transfer not stronger")):
        ks = [k for k in acc if families.get(k) == fam]
        if not ks or best_wb is None:
            continue
        k_min = min(ks, key=lambda k: acc[k])
        fail = _gt(best_wb, acc[k_min], tol)
        checks.append(Check(name, "FAIL" if fail else "PASS",
                            f"{k_min} {acc[k_min]:.1f}% vs best standard white-box {best_wb:.1f}%",
                            f"a {fam} attack beating gradient attacks means the gradients are masked"))
    checks.append(gradient_check(att, families))
    return checks


def sweep_checks(curves: dict[str, list[tuple[float, float]]], std_key: str, n_classes: int, tol: float,
                 norm: str = "Linf") -> list[Check]:
    """Accuracy must reach ~0 at a large ε (Carlini et al. §5.2) and not rise with ε."""
    chance = 100 / n_classes
    checks = []
    for label, key, decides in (("large ε: standard attack", std_key, False),
                                ("large ε: worst case", "worst case", True)):
        if key not in curves:
            continue
        eps_max, acc = curves[key][-1]
        verdict = "PASS" if acc <= chance / 2 else "WARN" if acc <= chance else "FAIL"
        where = f"ε = {eps_max * 255:.0f}/255" if norm == "Linf" else f"ℓ2 ε = {eps_max:g}"
        checks.append(Check(label, verdict, f"{acc:.1f}% at {where} ({key})",
                            "an (almost) unbounded attack must succeed; accuracy above chance means it is not "
                            "finding adversarial examples", decides))
    rises = {k: max((c[j][1] - c[i][1] for i in range(len(c)) for j in range(i + 1, len(c))), default=0.0)
             for k, c in curves.items()}
    k_max = max(rises, key=rises.get)
    checks.append(Check("monotone in ε", "WARN" if rises[k_max] > tol else "PASS",
                        f"largest rise {rises[k_max]:.1f} points ({k_max})",
                        "accuracy rising with ε means the attack is not converging (step sizes, masking)"))
    return checks


def iteration_checks(pairs: dict[str, tuple[float, float]], fgsm: tuple[float, float] | None, tol: float
                     ) -> list[Check]:
    """Doubling steps/restarts must not lower accuracy much; one step must not beat many (Carlini et al.)."""
    checks = []
    for key, (base, doubled) in pairs.items():
        checks.append(Check(f"2× iterations: {key}", "WARN" if _gt(base, doubled, tol) else "PASS",
                            f"{base:.1f}% → {doubled:.1f}%",
                            "an attack still improving with more steps/restarts has not converged"))
    if fgsm is not None:
        one, many = fgsm
        checks.append(Check("iterative beats single-step", "FAIL" if _gt(many, one, tol) else "PASS",
                            f"FGSM {one:.1f}% vs kFGSM {many:.1f}%",
                            "a single step beating the iterative attack means the iterations are misled"))
    return checks


def active_checks(active: dict[str, Any], standard: list[str]) -> list[Check]:
    """Per attack: did it find the adversarial example the active test planted? And does the standard suite
    hold at least one attack that does (else its figure rests on attacks unable to break this defense)?"""
    out = []
    for key, a in active["attacks"].items():
        out.append(Check(f"active test: {key}", "PASS" if a["passed"] else "FAIL",
                         (f"{a['success_rate']:.0f}%" if a["success_rate"] is not None else "n/a")
                         + f" of {active['n_valid']} points with a known adversarial example",
                         "an attack that misses planted adversarial examples cannot be trusted on this defense"))
    std = [k for k in standard if k in active["attacks"]]
    if std:
        ok = [k for k in std if active["attacks"][k]["passed"]]
        out.append(Check("active test: standard suite", "PASS" if ok else "FAIL",
                         f"{len(ok)} of {len(std)} standard attacks pass", "the standard suite's figure needs at "
                         "least one attack that finds known adversarial examples on this defense", decides=True))
    return out


def certificate_check(certified: torch.Tensor, robust: torch.Tensor) -> Check:
    """No attack may break a point certified at the audited ε: one that does means the certificate is unsound or
    the judge accepted an example outside the threat set; either way a figure here is wrong."""
    broken = (certified & ~robust).nonzero().flatten().tolist()
    return Check(CERTIFICATE_CHECK, "FAIL" if broken else "PASS",
                 f"{int(certified.sum())} certified points, {len(broken)} broken by an attack"
                 + (f" (test indices {broken[:10]})" if broken else ""),
                 "a certified lower bound and a valid adversarial example cannot both hold for one point",
                 decides=True)


_FAMILY_WORDS = {"white-box": "adaptive white-box", "gradient-free": "gradient-free", "transfer": "transfer"}


def verdict(checks: list[Check], reported: float, bound: float, n_runs: int, confirmers: list[str] | None = None,
            notes: list[str] | None = None, exact: bool = False) -> dict[str, Any]:
    """Plain words: can the standard suite's number be trusted, and the best upper bound on true robustness.

    Trusted unless a deciding check fails; failed diagnostic checks (masking signs in the standard attacks)
    are named as warnings when the adaptive attacks confirm the number anyway. ``confirmers``: the families of
    the attacks that ran beyond the standard suite (the verdict speaks only of those). ``exact``: the standard
    suite left no point robust (:func:`exact_zero`); every check asks whether the figure is too high, which 0.0%
    cannot be, so its failures become masking signs."""
    failed = [c.name for c in checks if c.verdict == "FAIL" and c.decides and not exact]
    signs = [c.name for c in checks if c.verdict == "FAIL" and (exact or not c.decides)]
    warned = [c.name for c in checks if c.verdict == "WARN"]
    status = "NOT TRUSTED" if failed else "TRUSTED WITH WARNINGS" if signs or warned or not confirmers else "TRUSTED"
    words = [_FAMILY_WORDS.get(f, f) for f in confirmers or []]
    by = (", ".join(words[:-1]) + " and " + words[-1]) if len(words) > 1 else (words[0] if words else "")
    parts = [f"{status}: the standard suite's robust accuracy {reported:.1f}% "
             + (f"cannot be trusted (failed: {', '.join(failed)})" if failed else
                "is exact: every attacked point has a valid adversarial example against a deterministic decision"
                if exact else f"is confirmed by the {by} attacks" if by else "is not checked by any attack beyond it")]
    if signs:
        parts.append(f"masking signs in the attacks: {', '.join(signs)}")
    if warned:
        parts.append(f"warnings: {', '.join(warned)}")
    parts += notes or []
    text = "; ".join(parts) + (f". Best upper bound on the true robust accuracy: {bound:.1f}% (per-sample worst "
                               f"case over {n_runs} attack runs).")
    return {"status": status, "trusted": not failed, "failed": failed, "masking_signs": signs, "warned": warned,
            "text": text, "reported_acc": reported, "upper_bound_acc": bound}
