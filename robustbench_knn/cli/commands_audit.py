"""The commands that judge a defense's evaluation: gate, audit, certify, active-test."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import UsageError, get_model_config
from ..defenses.loading import is_config_name
from .parser import TEST_SET_SIZE, _model_config, _threat, check_writable_file, parse_eps


def cmd_gate(args: argparse.Namespace) -> int:
    import datetime

    from tabulate import tabulate

    from ..data import load_cifar10
    from ..evaluation.gate import GateConfig, check_baseline, compare, load_baseline, planted, run_gate
    from ..norms import parse_norm
    from ..store import write_json

    norm = parse_norm(args.norm)
    gcfg = GateConfig(seed=args.seed, model=args.model, norm=norm, eps=8 / 255 if norm == "Linf" else 0.5)
    model = None
    if not is_config_name(args.model):  # a ready defense in place of FULL's gate-sized training
        from ..defenses.loading import resolve_model
        from ..devices import resolve_device

        if args.plant == "one-epoch-model":
            raise UsageError("--plant one-epoch-model retrains the model; --model here is already built")
        model, _, _ = resolve_model(args.model, device=resolve_device(args.device))
    else:
        get_model_config(args.model)
    baseline_path = Path(args.baseline)
    if args.update_baseline and not args.message:
        raise UsageError("--update-baseline needs --message saying why the baseline changes")
    if args.plant and args.update_baseline:
        raise UsageError("--plant is a self-test; it never updates the baseline")
    noise = 0.0
    if args.plant:
        gcfg, noise = planted(gcfg, args.plant)
    if not args.update_baseline:
        baseline = load_baseline(baseline_path)  # missing, not JSON or not a gate result: refused before training
        check_baseline(baseline, gcfg)
    current = run_gate(gcfg, load_cifar10(args.data_dir), device=args.device, cache_dir=args.cache_dir,
                       perturb_model=noise, progress=not args.quiet, model=model)
    if args.out:
        write_json(args.out, current)
    if args.update_baseline:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(baseline_path, {**current, "message": args.message, "updated": stamp})
        print(f"gate baseline written to {baseline_path} ({current['wall_seconds']:.0f} s): {args.message}")
        return 0
    findings = compare(baseline, current, gcfg.tol_acc, gcfg.tol_points)
    rows = []
    for which in ("model", "reference"):
        b, c = baseline[which], current[which]
        rows.append([which, "clean", b["clean_acc"], c["clean_acc"]])
        rows += [[which, k, a["robust_acc"], c["attacks"][k]["robust_acc"]] for k, a in b["attacks"].items()
                 if k in c["attacks"]]
        rows.append([which, "worst case", b["worst_case_acc"], c["worst_case_acc"]])
    print(tabulate(rows, headers=["model", "metric", "baseline %", "current %"], tablefmt="github"))
    print(f"tolerance: {gcfg.tol_acc} points of accuracy, {gcfg.tol_points} lost breaks; "
          f"wall time {current['wall_seconds']:.0f} s")
    if findings:
        print("GATE FAILED")
        print(tabulate([f.row for f in findings], headers=["check", "what", "baseline", "current", "allowed"],
                       tablefmt="github"))
    else:
        print("GATE PASSED")
    if args.plant:  # self-test: success means the planted regression was caught
        print(f"self-test {args.plant}: " + ("caught (exit 0)" if findings else "NOT CAUGHT (exit 1)"))
        return 0 if findings else 1
    return 1 if findings else 0


def cmd_audit(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ..defenses.surrogate import SURROGATES
    from ..evaluation.audit import audit, audit_classifier, check_active
    from ..evaluation.cards import eps_label
    from ..reports.audit_report import attacks_frame, checks_frame, save_audit

    if args.figure3 and not is_config_name(args.model):
        raise UsageError("--figure3 trains a model of this project (full, ...), not a module or a file")
    if args.figure3:
        cfg = _model_config(args)
        from ..data import load_cifar10
        from ..reports.plots import figure3

        path = figure3(load_cifar10(args.data_dir), args.out, base=cfg, cache_dir=args.cache_dir, device=args.device,
                       progress=not args.quiet)
        print(f"Figure 3: {path}")
        return 0
    norm, eps = _threat(args, one=True)
    if eps[0] <= 0:
        raise UsageError(f"audit needs --eps > 0, got {args.eps!r} (at ε = 0 there is nothing to attack)")
    if args.surrogate not in SURROGATES:
        raise UsageError(f"unknown surrogate {args.surrogate!r}; choose from {', '.join(SURROGATES)}")
    if args.n_test < 1 or args.batch_size < 1:
        raise UsageError("--n-test and --batch-size must be >= 1")
    if args.n_test > TEST_SET_SIZE:
        raise UsageError(f"--n-test must be <= {TEST_SET_SIZE} (the size of the test set)")
    if args.active_test < 0:
        raise UsageError("--active-test must be >= 0 (the number of points)")
    check_active(args.active_test, norm)
    if args.transfer_source is not None:
        get_model_config(args.transfer_source)  # an unknown row: one line before any work
    if is_config_name(args.model):
        res = audit(_model_config(args), eps[0], n_test=args.n_test, quick=args.quick, data_dir=args.data_dir,
                    cache_dir=args.cache_dir, device=args.device, seed=args.seed or 0, surrogate=args.surrogate,
                    batch_size=args.batch_size, progress=not args.quiet, active_points=args.active_test,
                    norm=norm, certify=not args.no_certify, transfer_source=args.transfer_source)
    else:
        from ..data import load_cifar10
        from ..defenses.loading import resolve_model
        from ..devices import resolve_device
        from ..evaluation.experiment import defense_cells, weights_hash

        clf, cfg, name = resolve_model(args.model, surrogate=args.surrogate, device=resolve_device(args.device))
        data = load_cifar10(args.data_dir)
        res = audit_classifier(clf, data, eps[0], name=name, config_hash=weights_hash(clf),
                               config=cfg.to_dict() if cfg else None, target_cfg=cfg, n_test=args.n_test,
                               quick=args.quick, cache_dir=args.cache_dir, seed=args.seed or 0,
                               batch_size=args.batch_size, progress=not args.quiet,
                               cells=defense_cells(clf, data.sha256, args.cache_dir),
                               active_points=args.active_test, transfer_source=args.transfer_source, norm=norm,
                               certify=not args.no_certify)
    path = save_audit(res, args.out)
    print(f"{res['dataset']}, model {res['model']}, {norm} ε = {eps_label(eps[0], norm)}, {res['n']} test images: "
          f"clean {res['clean_acc']:.1f}%")
    print(tabulate(attacks_frame(res), headers="keys", tablefmt="github", showindex=False))
    print(tabulate(res["attribution"], headers="keys", tablefmt="github"))
    print(tabulate(checks_frame(res), headers="keys", tablefmt="github", showindex=False))
    if res.get("active_test"):
        from ..evaluation.active_test import summary

        print(summary(res["active_test"]))
    print(res["verdict"]["text"])
    print(f"results: {path}")
    return 0


def _built_model(args: argparse.Namespace, data: Any, dev: Any, surrogate: str = "potential") -> tuple[Any, str]:
    """--model as a ready classifier and its name: a config of this project trained or loaded from the cache."""
    from ..defenses.loading import resolve_model

    if is_config_name(args.model):
        from ..paper.classifier import build_classifier
        from ..paper.train import train_model

        cfg = _model_config(args)
        return build_classifier(train_model(cfg, data, device=dev, cache_dir=args.cache_dir,
                                            progress=not args.quiet), surrogate), cfg.name
    clf, _, name = resolve_model(args.model, surrogate=surrogate, device=dev)
    return clf, name


def cmd_certify(args: argparse.Namespace) -> int:
    from ..data import load_cifar10
    from ..devices import resolve_device
    from ..evaluation.certify import certify, save_certificate, summary
    from ..evaluation.evaluate import provenance, versions
    from ..reports import sandwich as sw
    from ..store import cache_root, state_digest

    norm, eps = _threat(args)
    if not 1 <= args.n_test <= TEST_SET_SIZE:
        raise UsageError(f"--n-test must be between 1 and {TEST_SET_SIZE}")
    if args.steps < 0 or args.batch_size < 1:
        raise UsageError("--steps must be >= 0 and --batch-size >= 1")
    against = [sw.load_attack_result(p) for p in args.against or []]  # unreadable, other norm or ε: before any work
    for src in against:
        sw.check_compatible(src, norm=norm, what="this certificate")
    if against:
        sw.check_common_eps(eps, against)
    check_writable_file(str(Path(args.out) / "certify.json"))  # before any training
    dev = resolve_device(args.device)
    data = load_cifar10(args.data_dir)
    clf, name = _built_model(args, data, dev)
    digest = state_digest(clf)  # hashes the whole bank: once
    for src in against:  # other weights or data: refused before certifying
        sw.check_compatible(src, norm=norm, model=name, weights_hash=digest, dataset_sha256=data.sha256,
                            what="this certificate")
    kept = cache_root(args.cache_dir) / "defenses" / digest / "certify"  # a killed run resumes
    cert = certify(clf, data.test.floats()[:args.n_test], data.test.y[:args.n_test], eps, norm, steps=args.steps,
                   batch_size=args.batch_size, progress=not args.quiet, batch_dir=kept)
    path = save_certificate(cert, args.out, model=name, defense=clf, info={
        "dataset_sha256": data.sha256, "device": str(dev), **provenance(dev), "versions": versions()})
    print(summary(cert))
    print(f"results: {path}")
    return report_sandwich(sw.build_sandwich(sw.load_certificate(path), against), args.out) if against else 0


def report_sandwich(s: dict[str, Any], out: str | Path) -> int:
    """Write the sandwich files, print its table; 1 when it holds a soundness violation."""
    from ..reports.sandwich import render_markdown, save_sandwich

    paths = save_sandwich(s, out)
    print(render_markdown(s))
    print(f"sandwich: {', '.join(map(str, paths))}")
    if s["violations"]:
        print(f"robustbench-knn: SOUNDNESS VIOLATION: {len(s['violations'])} (see {paths[0]})", file=sys.stderr)
        return 1
    return 0


def cmd_active_test(args: argparse.Namespace) -> None:
    from ..attacks import parse_attack_list
    from ..data import load_cifar10
    from ..devices import resolve_device
    from ..evaluation.active_test import active_test, summary
    from ..evaluation.evaluate import provenance, versions
    from ..evaluation.experiment import weights_hash
    from ..store import write_json

    eps = parse_eps(args.eps)
    if len(eps) != 1 or eps[0] <= 0:
        raise UsageError("active-test takes one --eps value > 0")
    if not 1 <= args.n_points <= TEST_SET_SIZE:
        raise UsageError(f"--n-points must be between 1 and {TEST_SET_SIZE}")
    specs = parse_attack_list(args.attacks)
    check_writable_file(str(Path(args.out) / "active.json"))  # before any training
    dev = resolve_device(args.device)
    data = load_cifar10(args.data_dir)
    clf, name = _built_model(args, data, dev, args.surrogate)
    res = active_test(clf, data.test.floats(), data.test.y, eps[0], specs, n_points=args.n_points,
                      seed=args.seed or 0, progress=not args.quiet)
    res = {"model": name, "weights_hash": weights_hash(clf), "dataset_sha256": data.sha256, "device": str(dev),
           **provenance(dev), "versions": versions(), **res}
    path = Path(args.out) / f"active-{name}-{res['weights_hash']}-eps{eps[0] * 255:g}.json"
    write_json(path, res)
    print(summary(res))
    print(f"results: {path}")
