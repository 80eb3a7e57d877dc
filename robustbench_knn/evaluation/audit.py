"""Gradient-masking audit: can a reported robust accuracy be trusted?

Runs a standard suite (the attacks a benchmark reports) and the adaptive suite through
``evaluate.run_attacks`` (every example checked and judged by the hard k-NN vote), then the checks of
Carlini et al.'s checklist ("On Evaluating Adversarial Robustness", 2019) and of AutoAttack's ``checks.py``.
Each check gets PASS / WARN / FAIL with its numbers. The verdict says whether the standard suite's number can
be trusted and gives the best upper bound on the true robust accuracy: the per-sample worst case over every
attack run at the audited ε.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from ..attacks import STANDARD_SUITE, AttackSpec, get_attack, input_gradient, parse_attack_list
from ..attacks.adaptive import ADAPTIVE_SUITE
from ..attacks.transfer import transfer_sources, trained_sources
from ..config import ExperimentConfig, UsageError
from .evaluate import robust_mask, run_attacks, versions

QUICK_STANDARD = ("kfgsm", "aa:apgd")
SWEEP_EPS = tuple(e / 255 for e in (0, 4, 8, 16, 32, 64))
QUICK_SWEEP_EPS = tuple(e / 255 for e in (0, 8, 32, 64))
# --quick: fewer steps/queries for the adaptive suite (a screening run, not a final number)
QUICK_OVERRIDES = {"native:feature": {"steps": 30, "n_targets": 2}, "native:softknn-apgd": {"steps": 30},
                   "native:softknn-apgd-dlr": {"steps": 30}, "native:vote-square": {"n_queries": 300},
                   "native:transfer": {"steps": 30}}
ITER_PARAMS = ("steps", "n_queries", "restarts")  # doubled by the convergence check


@dataclass
class Check:
    """One check. ``decides``: a FAIL here means the reported number itself is contradicted or the bound is not
    established (NOT TRUSTED); other checks diagnose the standard attacks (masking signs) and only warn when
    the adaptive attacks confirm the number anyway."""

    name: str
    verdict: str  # PASS | WARN | FAIL
    numbers: str
    why: str
    decides: bool = False


# ------------------------------------------------------------------------------------------- attack helpers
def attack_family(spec: AttackSpec, clf: torch.nn.Module) -> str:
    """white-box / gradient-free / transfer: the adaptive attacks say so; others by their gradient source."""
    family = getattr(spec.factory, "family", None)
    if family is None:
        attack = spec.build(clf, 1 / 255)
        family = "gradient-free" if attack.gradient_source is None else "white-box"
    return family


def _acc(mask: torch.Tensor) -> float:
    return round(100 * mask.float().mean().item(), 2)


def _scaled(params: dict[str, Any], factor: float) -> dict[str, Any]:
    return {k: max(1, round(v * factor)) for k, v in params.items() if k in ITER_PARAMS}


def guide_gradient_bad_frac(clf: torch.nn.Module, spec: AttackSpec, eps: float, x: torch.Tensor, y: torch.Tensor,
                            params: dict[str, Any]) -> float | None:
    """Fraction of points whose gradient of the loss an adaptive white-box attack follows is zero or
    non-finite (``run_attacks`` counts this only for surrogate/objective-guided attacks)."""
    attack = spec.build(clf, eps, **params)
    if not hasattr(attack, "guide_loss") or getattr(attack, "family", "") != "white-box" or len(x) == 0:
        return None
    grad = input_gradient(lambda z: attack.guide_loss(z, y), x).flatten(1)
    return round(((grad == 0).all(1) | ~torch.isfinite(grad).all(1)).float().mean().item(), 4)


# --------------------------------------------------------------------------------------------------- checks
def _gt(a: float, b: float, tol: float) -> bool:
    return a > b + tol


def model_checks(clf: torch.nn.Module, x: torch.Tensor, tol_agree: float = 90.0) -> list[Check]:
    """AutoAttack's check_randomized and check_range_output, and whether the surrogate agrees with the vote."""
    with torch.no_grad():
        preds = [clf.predict(x) for _ in range(3)]
        outs = [clf(x) for _ in range(2)]
    same = all(torch.equal(preds[0], p) for p in preds[1:]) and torch.allclose(outs[0], outs[1], atol=1e-5)
    checks = [Check("deterministic", "PASS" if same else "WARN", f"3 calls {'agree' if same else 'DIFFER'}",
                    "a randomised decision needs EOT attacks; fixed-input attacks overestimate its robustness")]
    out = outs[0]
    probs = bool(out.min() > -1e-5 and out.max() < 1 + 1e-5 and ((out.sum(1) - 1).abs() < 1e-5).all())
    checks.append(Check("logits not probabilities", "WARN" if probs else "PASS",
                        f"outputs in [{out.min():.3g}, {out.max():.3g}]",
                        "CE on probabilities saturates and hides gradients (AutoAttack check_range_output)"))
    agree = 100 * (out.argmax(1) == preds[0]).float().mean().item()
    checks.append(Check("surrogate agrees with decision", "PASS" if agree >= tol_agree else "WARN",
                        f"{agree:.1f}% of points",
                        "surrogate-guided attacks aim at the surrogate's decision, not the judged one"))
    return checks


def attack_checks(r: dict[str, Any], families: dict[str, str], standard: list[str], tol: float,
                  extra_zero: dict[str, float]) -> list[Check]:
    """Checks from one ε's results: validity, adaptive vs standard, gradient-free/transfer vs white-box,
    zero gradients."""
    att = r["attacks"]
    acc = {k: a["robust_acc"] for k, a in att.items() if a["valid"]}
    bad = [k for k, a in att.items() if not a["valid"]]
    checks = [Check("valid examples", "FAIL" if bad else "PASS", f"{len(bad)} of {len(att)} attacks rejected",
                    "an attack returned points outside the threat model: " + ", ".join(bad) if bad else
                    "every example finite, in [0, 1] and inside the ε-ball", decides=True)]
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
    zero = {k: att[k]["zero_or_nonfinite_grad_frac"] for k in att if families.get(k) == "white-box"}
    zero.update(extra_zero)
    worst_k = max(zero, key=zero.get) if zero else None
    frac = zero.get(worst_k, 0.0) if worst_k else 0.0
    checks.append(Check("zero/non-finite gradients", "PASS" if frac == 0 else "WARN" if frac <= 0.05 else "FAIL",
                        f"max {100 * frac:.1f}% ({worst_k})" if worst_k else "no white-box attack",
                        "points with a zero or non-finite guiding gradient cannot be attacked by it "
                        "(AutoAttack check_zero_gradients)"))
    return checks


def sweep_checks(curves: dict[str, list[tuple[float, float]]], std_key: str, n_classes: int, tol: float
                 ) -> list[Check]:
    """Accuracy must reach ~0 at a large ε (Carlini et al. §5.2) and not rise with ε."""
    chance = 100 / n_classes
    checks = []
    for label, key, decides in (("large ε: standard attack", std_key, False),
                                ("large ε: worst case", "worst case", True)):
        if key not in curves:
            continue
        eps_max, acc = curves[key][-1]
        verdict = "PASS" if acc <= chance / 2 else "WARN" if acc <= chance else "FAIL"
        checks.append(Check(label, verdict, f"{acc:.1f}% at ε = {eps_max * 255:.0f}/255 ({key})",
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


# ---------------------------------------------------------------------------------------------- the audit
@dataclass
class _Runner:
    """``run_attacks`` on the audited images with the audit's batch size, seed and result cache."""

    clf: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    opts: dict[str, Any]

    def entry(self, key: str, params: dict[str, Any]) -> dict[str, Any]:
        """One attack at the audited ε with ``params``."""
        res = run_attacks(self.clf, self.x, self.y, [get_attack(key)], [self.eps], overrides={key: params},
                          **self.opts)
        return res["per_eps"][0]["attacks"][key]

    def sweep(self, keys: list[str], eps_list: list[float], overrides: dict[str, dict[str, Any]]) -> dict[float, Any]:
        res = run_attacks(self.clf, self.x, self.y, [get_attack(k) for k in keys], eps_list,
                          overrides={k: overrides.get(k, {}) for k in keys}, **self.opts)
        return {r["eps"]: r["attacks"] for r in res["per_eps"]}


def attribution(order: list[tuple[str, torch.Tensor]], clean: torch.Tensor) -> tuple[list[str], pd.DataFrame]:
    """Per sample the first attack (in the order run) that broke it; per attack its first and only breaks."""
    first = ["clean error" if not c else "robust" for c in clean.tolist()]
    broke = {name: ~rob & clean for name, rob in order}
    for name, b in broke.items():
        for i in torch.nonzero(b).squeeze(1).tolist():
            if first[i] == "robust":
                first[i] = name
    n_breakers = torch.stack(list(broke.values())).sum(0) if broke else torch.zeros(len(clean))
    rows = [{"attack": name, "breaks": int(b.sum()), "first breaks": first.count(name),
             "only breaker": int((b & (n_breakers == 1)).sum())} for name, b in broke.items()]
    return first, pd.DataFrame(rows)


def convergence_runs(run: _Runner, keys: list[str], params: dict[str, dict[str, Any]], acc: dict[str, float],
                     factors: tuple[float, ...], order: list[tuple[str, torch.Tensor]]
                     ) -> dict[str, list[tuple[float, float]]]:
    """Accuracy vs multiples of each attack's steps/restarts/queries (1× is the main run); breaks join ``order``."""
    curves = {}
    for key in keys:
        curves[key] = [(1.0, acc[key])]
        for f in factors:
            entry = run.entry(key, {**params[key], **_scaled(params[key], f)})
            if entry["valid"]:
                curves[key].append((f, entry["robust_acc"]))
                order.append((f"{key} ×{f:g}", robust_mask(entry)))
        curves[key].sort()
    return curves


def single_step_run(run: _Runner, acc: dict[str, float], order: list[tuple[str, torch.Tensor]]
                    ) -> tuple[float, float] | None:
    """(FGSM accuracy, kFGSM accuracy): kFGSM with one step of size ε."""
    if "native:kfgsm" not in acc:
        return None
    entry = run.entry("native:kfgsm", {"steps": 1, "step_ratio": 1.0})
    if not entry["valid"]:
        return None
    order.append(("fgsm (kfgsm ×1 step)", robust_mask(entry)))
    return entry["robust_acc"], acc["native:kfgsm"]


def eps_curves(run: _Runner, swept: list[str], sweep_eps: tuple[float, ...] | list[float], main: dict[str, Any],
               overrides: dict[str, dict[str, Any]], clean: torch.Tensor) -> dict[str, list[tuple[float, float]]]:
    """Accuracy vs ε of the ``swept`` attacks and of their per-sample worst case (``main``: the audited ε)."""
    others = sorted(e for e in set(sweep_eps) if abs(e - run.eps) > 1e-12)
    by_eps = {**run.sweep(swept, others, overrides), run.eps: {k: main[k] for k in swept}}
    curves: dict[str, list[tuple[float, float]]] = {k: [] for k in swept + ["worst case"]}
    for e in sorted(by_eps):
        worst = clean.clone()
        for k in swept:
            if by_eps[e][k]["valid"]:
                curves[k].append((e, by_eps[e][k]["robust_acc"]))
                worst &= robust_mask(by_eps[e][k])
        curves["worst case"].append((e, _acc(worst)))
    return curves


def run_audit(clf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
              standard: list[str] | tuple[str, ...] = STANDARD_SUITE,
              adaptive: list[str] | tuple[str, ...] = ADAPTIVE_SUITE,
              sweep_eps: list[float] | tuple[float, ...] = SWEEP_EPS,
              overrides: dict[str, dict[str, Any]] | None = None, steps_factors: tuple[float, ...] = (0.5, 2.0),
              tol: float = 2.0, batch_size: int = 250, seed: int = 0, cell_dir: str | os.PathLike | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Audit ``clf`` on images ``x`` at ``eps``; returns checks, verdict, per-attack and per-sample results.

    ``tol`` (accuracy points, at least one sample) is how much a stronger attack may lower accuracy before it
    counts. ``steps_factors`` are the step/restart multiples run for the accuracy-vs-steps curve of kFGSM and
    of the strongest adaptive white-box attack; the factor 2 is the convergence check.
    """
    t0 = time.perf_counter()
    tol = max(tol, 100 / len(x))
    overrides = dict(overrides or {})
    opts: dict[str, Any] = {"batch_size": batch_size, "progress": progress, "seed": seed}
    if cell_dir is not None:
        opts["cell_dir"] = cell_dir
    run = _Runner(clf, x, y, eps, opts)
    std_specs = parse_attack_list(",".join(standard))
    std_keys = [s.key for s in std_specs]
    specs = std_specs + [s for s in (parse_attack_list(",".join(adaptive)) if adaptive else [])
                         if s.key not in std_keys]
    families = {s.key: attack_family(s, clf) for s in specs}
    params = {s.key: {**s.defaults, **overrides.get(s.key, {})} for s in specs}

    main = run_attacks(clf, x, y, specs, [eps], overrides=overrides, **opts)
    r = main["per_eps"][0]
    clean = torch.tensor(main["clean_correct"], dtype=torch.bool)
    acc = {k: a["robust_acc"] for k, a in r["attacks"].items() if a["valid"]}
    if not acc:
        raise UsageError("every attack was rejected; nothing to audit")
    order = [(k, robust_mask(r["attacks"][k])) for k in acc]
    std_valid = [k for k in std_keys if k in acc]
    adp_valid = [k for k in acc if k not in std_keys]
    wb_adaptive = [k for k in adp_valid if families[k] == "white-box"]

    to_scale = [k for k in ("native:kfgsm", min(wb_adaptive, key=acc.get, default=None))
                if k in acc and _scaled(params[k], 1)]
    steps_curves = convergence_runs(run, to_scale, params, acc, steps_factors, order)
    iter_pairs = {k: (acc[k], dict(c)[2.0]) for k, c in steps_curves.items() if 2.0 in dict(c)}
    fgsm = single_step_run(run, acc, order)
    strongest_std = min(std_valid or acc, key=acc.get)
    swept = list(dict.fromkeys([strongest_std] + ([min(adp_valid, key=acc.get)] if adp_valid else [])))
    curves = eps_curves(run, swept, sweep_eps, r["attacks"], overrides, clean)

    robust_all, robust_std = clean.clone(), clean.clone()
    for name, rob in order:
        robust_all &= rob
        if name in std_valid:
            robust_std &= rob
    dev = getattr(clf, "device", x.device)
    xs, ys = x[clean.to(x.device)][:batch_size].to(dev), y[clean.to(y.device)][:batch_size].to(dev)
    extra_zero = {k: f for k in wb_adaptive
                  if (f := guide_gradient_bad_frac(clf, get_attack(k), eps, xs, ys, params[k])) is not None}
    reported, bound = _acc(robust_std), _acc(robust_all)
    checks = [Check("adaptive/all vs standard", "FAIL" if _gt(reported, bound, tol) else "PASS",
                    f"standard suite {reported:.1f}% → all attacks {bound:.1f}%",
                    "attacks that go after the k-NN vote itself find what the standard suite missed", decides=True)]
    checks += attack_checks(r, families, std_keys, tol, extra_zero)
    checks += sweep_checks(curves, strongest_std, getattr(clf, "n_classes", 10), tol)
    checks += iteration_checks(iter_pairs, fgsm, tol)
    checks += model_checks(clf, x[:batch_size].to(dev))
    first, table = attribution(order, clean)
    return {
        "eps": eps, "n": len(x), "tol": tol, "clean_acc": r["clean_acc"], "standard": std_keys,
        "families": families, "robust_acc": acc, "reported_acc": reported, "upper_bound_acc": bound,
        "n_attack_runs": len(order), "checks": [asdict(c) for c in checks],
        "verdict": verdict(checks, reported, bound, len(order)), "eps_curves": curves, "steps_curves": steps_curves,
        "attribution": table.to_dict("records"), "first_breaker": first,
        "worst_case_robust": robust_all.int().tolist(), "main": main,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def verdict(checks: list[Check], reported: float, bound: float, n_runs: int) -> dict[str, Any]:
    """Plain words: can the standard suite's number be trusted, and the best upper bound on true robustness.

    Trusted unless a deciding check fails; failed diagnostic checks (masking signs in the standard attacks)
    are named as warnings when the adaptive attacks confirm the number anyway."""
    failed = [c.name for c in checks if c.verdict == "FAIL" and c.decides]
    signs = [c.name for c in checks if c.verdict == "FAIL" and not c.decides]
    warned = [c.name for c in checks if c.verdict == "WARN"]
    status = "NOT TRUSTED" if failed else "TRUSTED WITH WARNINGS" if signs or warned else "TRUSTED"
    parts = [f"{status}: the standard suite's robust accuracy {reported:.1f}% "
             + (f"cannot be trusted (failed: {', '.join(failed)})" if failed else
                "is confirmed by the adaptive, gradient-free and transfer attacks")]
    if signs:
        parts.append(f"masking signs in the attacks: {', '.join(signs)}")
    if warned:
        parts.append(f"warnings: {', '.join(warned)}")
    text = "; ".join(parts) + (f". Best upper bound on the true robust accuracy: {bound:.1f}% (per-sample worst "
                               f"case over {n_runs} attack runs).")
    return {"status": status, "trusted": not failed, "failed": failed, "masking_signs": signs, "warned": warned,
            "text": text, "reported_acc": reported, "upper_bound_acc": bound}


def audit(cfg: ExperimentConfig, eps: float, *, n_test: int = 500, quick: bool = False, data_dir: str | None = None,
          cache_dir: str | None = None, device: str = "auto", seed: int = 0, surrogate: str = "potential",
          batch_size: int = 250, progress: bool = True) -> dict[str, Any]:
    """Train or load ``cfg`` (as ``benchmark_config`` does) and audit it on the first ``n_test`` test images."""
    from ..data import load_cifar10
    from ..devices import resolve_device
    from ..paper.classifier import build_classifier
    from ..paper.train import train_model
    from .experiment import cell_dir

    if n_test < 1:
        raise UsageError("--n-test must be >= 1")
    dev = resolve_device(device)
    data = load_cifar10(data_dir)
    clf = build_classifier(train_model(cfg, data, device=dev, cache_dir=cache_dir, progress=progress), surrogate)
    return audit_classifier(clf, data, eps, name=cfg.name, config_hash=cfg.config_hash(), config=cfg.to_dict(),
                            target_cfg=cfg, n_test=n_test, quick=quick, cache_dir=cache_dir, seed=seed,
                            batch_size=batch_size, progress=progress,
                            cells=cell_dir(cfg, surrogate, data.sha256, cache_dir))


def audit_classifier(clf: torch.nn.Module, data: Any, eps: float, *, name: str, config_hash: str,
                     config: dict[str, Any] | None = None, target_cfg: ExperimentConfig | None = None,
                     n_test: int = 500, quick: bool = False, cache_dir: str | None = None, seed: int = 0,
                     batch_size: int = 250, progress: bool = True,
                     cells: str | os.PathLike | None = None) -> dict[str, Any]:
    """Audit any defense through its interface (adaptive k-NN attacks where it has a bank; ``transfer``
    crafts on Table 2's row A at ``target_cfg``'s size, FULL's by default)."""
    from .experiment import DATASET_NAME

    if n_test < 1:
        raise UsageError("--n-test must be >= 1")
    sub = data.test.head(min(n_test, len(data.test)))
    adaptive = ADAPTIVE_SUITE if hasattr(clf, "bank") else ("transfer",)
    sources = trained_sources(data, target_cfg=target_cfg, cache_dir=cache_dir,
                              device=clf.device, progress=progress)
    with transfer_sources(sources):
        result = run_audit(clf, sub.floats(), sub.y, eps,
                           standard=QUICK_STANDARD if quick else STANDARD_SUITE, adaptive=adaptive,
                           sweep_eps=QUICK_SWEEP_EPS if quick else SWEEP_EPS,
                           overrides=QUICK_OVERRIDES if quick else None,
                           steps_factors=(2.0,) if quick else (0.25, 0.5, 2.0), batch_size=batch_size, seed=seed,
                           cell_dir=cells, progress=progress)
    return {"model": name, "config": config, "config_hash": config_hash, "dataset": DATASET_NAME,
            "dataset_sha256": data.sha256, "surrogate": getattr(clf, "surrogate_name", "logits"), "quick": quick,
            "seed": seed, "device": str(clf.device), "versions": versions(), **result}
