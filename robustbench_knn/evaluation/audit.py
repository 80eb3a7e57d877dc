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

from ..attacks import STANDARD_SUITE, get_attack, parse_attack_list
from ..attacks.adaptive import ADAPTIVE_SUITE
from ..attacks.transfer import trained_sources, transfer_sources
from ..config import ExperimentConfig, UsageError
from ..defenses.defense import KNNDefense
from .audit_checks import (
    active_checks,
    attack_checks,
    bound_check,
    certificate_check,
    iteration_checks,
    model_checks,
    sweep_checks,
    verdict,
)
from .cards import save_audit_record
from .certify import CERTIFIED, certified_sweep
from .checks import binomial_tol, exact_zero, family_of
from .evaluate import provenance, robust_mask, run_attacks, versions

QUICK_STANDARD = ("kfgsm", "aa:apgd")
SWEEP_EPS = tuple(e / 255 for e in (0, 4, 8, 16, 32, 64))
QUICK_SWEEP_EPS = tuple(e / 255 for e in (0, 8, 32, 64))
SWEEPS = {"Linf": (SWEEP_EPS, QUICK_SWEEP_EPS),  # (full, --quick) per threat model
          "L2": ((0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0), (0.0, 0.5, 2.0, 4.0))}
# --quick: fewer steps/queries for the adaptive suite (a screening run, not a final number)
QUICK_OVERRIDES = {"native:feature": {"steps": 30, "n_targets": 2}, "native:softknn-apgd": {"steps": 30},
                   "native:softknn-apgd-dlr": {"steps": 30}, "native:vote-square": {"n_queries": 300},
                   "native:transfer": {"steps": 30}}
ITER_PARAMS = ("steps", "n_queries", "restarts")  # doubled by the convergence check


# ------------------------------------------------------------------------------------------- attack helpers
attack_family = family_of


def _acc(mask: torch.Tensor) -> float:
    return round(100 * mask.float().mean().item(), 2)


def _scaled(params: dict[str, Any], factor: float) -> dict[str, Any]:
    return {k: max(1, round(v * factor)) for k, v in params.items() if k in ITER_PARAMS}


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


def check_active(active_points: int, norm: str, *, knn: bool = True) -> None:
    """The active test exists in ℓ∞ only and for k-NN defenses (it plants its examples in a bank over the
    defense's embedding): refused otherwise, before any work."""
    if active_points and norm != "Linf":
        raise UsageError("the active test plants its examples in the ℓ∞ ball; run it with --norm Linf")
    if active_points and not knn:
        raise UsageError("the active test plants its examples in a k-NN defense's bank, and a logit classifier has "
                         "none: leave out --active-test")


def run_audit(clf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
              standard: list[str] | tuple[str, ...] = STANDARD_SUITE,
              adaptive: list[str] | tuple[str, ...] = ADAPTIVE_SUITE,
              sweep_eps: list[float] | tuple[float, ...] = SWEEP_EPS,
              overrides: dict[str, dict[str, Any]] | None = None, steps_factors: tuple[float, ...] = (0.5, 2.0),
              batch_size: int = 250, seed: int = 0, cell_dir: str | os.PathLike | None = None,
              progress: bool = False, active_points: int = 0, notes: list[str] | None = None, norm: str = "Linf",
              certify: bool = True) -> dict[str, Any]:
    """Audit ``clf`` on images ``x`` at ``eps`` in ``norm``; returns checks, verdict, per-attack and per-sample
    results.

    Two figures count as different when they differ by more than the binomial confidence interval of the
    standard suite's figure at the number of audited points (at least one point's worth). ``steps_factors`` are the step/restart multiples run for the accuracy-vs-steps curve of kFGSM and
    of the strongest adaptive white-box attack; the factor 2 is the convergence check. ``active_points`` > 0
    runs the active test of attack strength on that many points (k-NN defenses). ``notes``: sentences about
    attacks left out (e.g. a transfer without a source), carried into the verdict. ``certify``: certified lower
    bounds at the sweep's radii (k-NN defenses the bounds module can bound), drawn under the attacks' curves and
    checked against them point by point.
    """
    t0 = time.perf_counter()
    overrides = dict(overrides or {})
    check_active(active_points, norm, knn=isinstance(clf, KNNDefense))
    opts: dict[str, Any] = {"batch_size": batch_size, "progress": progress, "seed": seed, "norm": norm}
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
    reported, bound = _acc(robust_std), _acc(robust_all)
    tol = binomial_tol(reported, len(x))
    checks = [bound_check(reported, bound, tol)]
    checks += attack_checks(r, families, std_keys, tol)
    checks += sweep_checks(curves, strongest_std, getattr(clf, "n_classes", 10), tol, norm)
    checks += iteration_checks(iter_pairs, fgsm, tol)
    checks += model_checks(clf, x[:batch_size].to(dev))
    active = None
    if active_points:
        from .active_test import active_test

        active = active_test(clf, x, y, eps, specs, n_points=active_points, seed=seed, batch_size=batch_size,
                             overrides=overrides, progress=progress)
        checks += active_checks(active, std_keys)
    certificate = certified_sweep(clf, x, y, sorted({*sweep_eps, eps}), norm) if certify else None
    if certificate is not None and "skipped" not in certificate:
        at_eps = certificate["certified"][certificate["eps"].index(eps)]
        checks.append(certificate_check(torch.tensor(at_eps, dtype=torch.bool), robust_all))
        curves[CERTIFIED] = list(zip(certificate["eps"], certificate["certified_acc"]))
    first, table = attribution(order, clean)
    return {
        "eps": eps, "threat_model": norm, "n": len(x), "tol": tol, "clean_acc": r["clean_acc"], "standard": std_keys,
        "families": families, "robust_acc": acc, "reported_acc": reported, "upper_bound_acc": bound,
        "n_attack_runs": len(order), "checks": [asdict(c) for c in checks],
        "verdict": verdict(checks, reported, bound, len(order), sorted({families[k] for k in adp_valid}),
                           notes or [], exact=exact_zero(robust_std, checks)),
        "active_test": active, "certificate": certificate, "notes": notes or [], "eps_curves": curves,
        "steps_curves": steps_curves,
        "attribution": table.to_dict("records"), "first_breaker": first,
        "worst_case_robust": robust_all.int().tolist(), "main": main,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def transfer_unavailable(clf: torch.nn.Module, target_cfg: ExperimentConfig | None, source: str | None,
                         params: dict[str, Any]) -> str | None:
    """Why ``transfer`` cannot give evidence on this defense (None: it can): no source named for a defense
    without a config of this project, or a source whose weights the defense shares (a white-box attack then)."""
    if target_cfg is None and getattr(clf, "cfg", None) is None and source is None:
        return ("the defense has no config of this project, so no source at its size is known; name one with "
                "--transfer-source, e.g. a")
    try:
        get_attack("native:transfer").build(clf, 1 / 255, **params)
    except UsageError as e:
        return str(e)
    return None


def audit(cfg: ExperimentConfig, eps: float, *, n_test: int = 500, quick: bool = False, data_dir: str | None = None,
          cache_dir: str | None = None, device: str = "auto", seed: int = 0, surrogate: str = "potential",
          batch_size: int = 250, progress: bool = True, active_points: int = 0, norm: str = "Linf",
          certify: bool = True, transfer_source: str | None = None) -> dict[str, Any]:
    """Train or load ``cfg`` (as ``benchmark_config`` does) and audit it on the first ``n_test`` test images;
    ``transfer_source`` as in :func:`audit_classifier` (default: row A at ``cfg``'s size)."""
    from ..data import load_cifar10
    from ..devices import resolve_device
    from ..paper.classifier import build_classifier
    from ..paper.train import train_model
    from .experiment import cell_dir

    if n_test < 1:
        raise UsageError("--n-test must be >= 1")
    check_active(active_points, norm, knn=cfg.model.head != "logits")
    dev = resolve_device(device)
    data = load_cifar10(data_dir)
    clf = build_classifier(train_model(cfg, data, device=dev, cache_dir=cache_dir, progress=progress), surrogate)
    return audit_classifier(clf, data, eps, name=cfg.name, config_hash=cfg.config_hash(), config=cfg.to_dict(),
                            target_cfg=cfg, n_test=n_test, quick=quick, cache_dir=cache_dir, seed=seed,
                            batch_size=batch_size, progress=progress, active_points=active_points,
                            cells=cell_dir(cfg, surrogate, data.sha256, cache_dir), norm=norm, certify=certify,
                            transfer_source=transfer_source)


def audit_classifier(clf: torch.nn.Module, data: Any, eps: float, *, name: str, config_hash: str,
                     config: dict[str, Any] | None = None, target_cfg: ExperimentConfig | None = None,
                     n_test: int = 500, quick: bool = False, cache_dir: str | None = None, seed: int = 0,
                     batch_size: int = 250, progress: bool = True,
                     cells: str | os.PathLike | None = None, active_points: int = 0,
                     transfer_source: str | None = None, norm: str = "Linf", certify: bool = True) -> dict[str, Any]:
    """Audit any defense through its interface (adaptive k-NN attacks where it has a bank). ``transfer`` crafts
    on Table 2's row A at ``target_cfg``'s size; a defense without a config of this project needs
    ``transfer_source`` named (a row of ``config.MODELS``, at FULL's size), else transfer is skipped and the
    verdict says so, and a source that shares the defense's weights is skipped likewise."""
    from .experiment import DATASET_NAME, weights_hash

    if n_test < 1:
        raise UsageError("--n-test must be >= 1")
    sub = data.test.head(min(n_test, len(data.test)))
    adaptive = list(ADAPTIVE_SUITE if hasattr(clf, "bank") else ("transfer",))
    sources = trained_sources(data, target_cfg=target_cfg, cache_dir=cache_dir,
                              device=clf.device, progress=progress)
    overrides = dict(QUICK_OVERRIDES if quick else {})
    if transfer_source is not None:
        overrides["native:transfer"] = {**overrides.get("native:transfer", {}), "source": transfer_source}
    notes = []
    with transfer_sources(sources):
        why = transfer_unavailable(clf, target_cfg, transfer_source, overrides.get("native:transfer", {}))
        if why and "transfer" in adaptive:
            adaptive.remove("transfer")
            notes.append(f"transfer was not run ({why})")
        result = run_audit(clf, sub.floats(), sub.y, eps,
                           standard=QUICK_STANDARD if quick else STANDARD_SUITE, adaptive=adaptive,
                           sweep_eps=SWEEPS[norm][1 if quick else 0],
                           overrides=overrides, steps_factors=(2.0,) if quick else (0.25, 0.5, 2.0),
                           batch_size=batch_size, seed=seed, cell_dir=cells, progress=progress,
                           active_points=active_points, notes=notes, norm=norm, certify=certify)
    save_audit_record(cells, result)
    return {"model": name, "config": config, "config_hash": config_hash, "weights_hash": weights_hash(clf),
            "dataset": DATASET_NAME,
            "dataset_sha256": data.sha256, "surrogate": getattr(clf, "surrogate_name", "logits"), "quick": quick,
            "seed": seed, "device": str(clf.device), "versions": versions(), **provenance(clf.device),
            "backbone": getattr(clf, "backbone", None), **result}
