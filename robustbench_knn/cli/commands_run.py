"""The commands that build and evaluate a model: train, evaluate, merge, export."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ..config import UsageError, get_model_config, parse_value
from ..defenses.loading import is_config_name
from .parser import TEST_SET_SIZE, _model_config, _threat, check_writable_file


def _attack_overrides(items: Sequence[str], specs: list[Any]) -> dict[str, dict[str, Any]]:
    """--attack-param kfgsm.steps=100 (name as in --attacks)."""
    from ..attacks import get_attack

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, val = item.partition("=")
        name, _, param = key.rpartition(".")
        if not sep or not name:
            raise UsageError(f"--attack-param needs attack.param=value, got {item!r}")
        spec = get_attack(name)
        if spec.key not in {s.key for s in specs}:
            raise UsageError(f"--attack-param names {name!r}, which is not in --attacks")
        if param not in spec.defaults:
            raise UsageError(f"attack {spec.key} has no parameter {param!r}; it takes {', '.join(spec.defaults)}")
        out.setdefault(spec.key, {})[param] = parse_value(val)
    for key, params in out.items():
        get_attack(key).check(params)  # values too (kfgsm.steps=-3), before any training
    return out


def cmd_train(args: argparse.Namespace) -> None:
    from ..data import load_cifar10
    from ..paper.train import train_model

    cfg = _model_config(args)
    trained = train_model(cfg, load_cifar10(args.data_dir), device=args.device, cache_dir=args.cache_dir,
                          progress=not args.quiet)
    print(f"{cfg.name}: {trained.path} ({trained.log['train_seconds']:.0f} s of training)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ..attacks import default_attacks, parse_attack_list
    from ..defenses.surrogate import SURROGATES

    if args.attacks == "default":  # a model of this project is known by its config; others are k-NN until loaded
        args.attacks = default_attacks(not (is_config_name(args.model) and
                                            get_model_config(args.model).model.head == "logits"))
        args.default_suite = True
    specs = parse_attack_list(args.attacks)
    args.norm, eps = _threat(args)
    for spec in specs:  # an attack without a form for the norm: one line, before any work
        spec.check_norm(args.norm)
    overrides = _attack_overrides(args.attack_param, specs)
    if args.surrogate not in SURROGATES:
        raise UsageError(f"unknown surrogate {args.surrogate!r}; choose from {', '.join(SURROGATES)}")
    if args.n_test < 1 or (args.n_clean is not None and args.n_clean < 1) or args.batch_size < 1:
        raise UsageError("--n-test, --n-clean and --batch-size must be >= 1")
    if max(args.n_test, args.n_clean or 0) > TEST_SET_SIZE:
        raise UsageError(f"--n-test and --n-clean must be <= {TEST_SET_SIZE} (the size of the test set)")
    if args.shard is not None:
        from ..evaluation import distributed

        if distributed.current().group:
            raise UsageError("--shard splits a job without a process group; under torchrun the ranks split it")
        with distributed.use(distributed.parse_shard(args.shard)):
            return _run_evaluate(args, specs, eps, overrides)
    return _run_evaluate(args, specs, eps, overrides)


def _run_evaluate(args: argparse.Namespace, specs: list[Any], eps: list[float],
                  overrides: dict[str, dict[str, Any]]) -> None:
    from tabulate import tabulate

    from ..evaluation.experiment import benchmark_config, save_results, summary_frame

    if is_config_name(args.model):
        cfg = _model_config(args)
        result = benchmark_config(cfg, specs, eps, n_test=args.n_test, n_clean=args.n_clean, data_dir=args.data_dir,
                                  cache_dir=args.cache_dir, device=args.device, seed=args.seed or 0,
                                  surrogate=args.surrogate, overrides=overrides, batch_size=args.batch_size,
                                  progress=not args.quiet, aligned=args.aligned, cascade=args.cascade,
                                  norm=args.norm)
    else:
        result = _evaluate_loaded(args, specs, eps, overrides)
    path = save_results(result, args.out)
    if "shard" in result:
        print(f"part {args.shard} of {result['model']} written: {path} ({result['wall_seconds']:.0f} s); "
              f"when every part is there: robustbench-knn merge {args.out}")
        return
    print(f"{result['dataset']}, model {result['model']}: clean accuracy {result['clean_acc_full']:.2f}% "
          f"on {result['n_clean']} test images; attacks on the first {result['n_test']}")
    print(tabulate(summary_frame(result), headers="keys", tablefmt="github", showindex=False))
    from ..evaluation.api import suite_note
    from ..evaluation.cards import eps_label

    norm = result.get("threat_model", "Linf")
    for r in result["per_eps"]:
        print(f"{norm} ε = {eps_label(r['eps'], norm)}: " + ("UNRELIABLE — " if r.get("unreliable") else "")
              + r["footnote"])
    note = suite_note(result["per_eps"][0].get("families", {}), result.get("surrogate", "logits") != "logits")
    if note:
        print(note)
    if result.get("invalid_examples"):
        print("Examples outside the threat model (each counted as that attack's failure on its sample): "
              + "; ".join(result["invalid_examples"]))
    print(f"results: {path}")


def _evaluate_loaded(args: argparse.Namespace, specs: list[Any], eps: list[float],
                     overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``evaluate`` on a ``MODULE:FUNCTION`` or exported model: the same evaluator, known only by its interface."""
    from ..attacks.transfer import trained_sources, transfer_sources
    from ..data import load_cifar10
    from ..defenses.loading import resolve_model
    from ..devices import resolve_device
    from ..evaluation.api import require_knn
    from ..evaluation.experiment import defense_cells, evaluate_classifier

    for flag in ("epochs", "n_train", "set"):
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')} configures a model of this project; --model "
                             f"{args.model!r} is already built")
    dev = resolve_device(args.device)
    clf, cfg, name = resolve_model(args.model, surrogate=args.surrogate, aligned=args.aligned, device=dev)
    if getattr(args, "default_suite", False) and not hasattr(clf, "bank"):  # a logit classifier: AutoAttack
        from ..attacks import default_attacks, parse_attack_list

        specs = parse_attack_list(default_attacks(False))
    require_knn(specs, clf)  # the adaptive k-NN attacks need a k-NN defense: refused before any work
    data = load_cifar10(args.data_dir)
    sources = trained_sources(data, target_cfg=cfg, cache_dir=args.cache_dir,
                              device=dev, progress=not args.quiet)
    with transfer_sources(sources):
        return evaluate_classifier(clf, data, specs, eps, name=name, n_test=args.n_test, n_clean=args.n_clean,
                                   seed=args.seed or 0, overrides=overrides, batch_size=args.batch_size,
                                   cell_dir=defense_cells(clf, data.sha256, args.cache_dir), progress=not args.quiet,
                                   cascade=args.cascade, norm=args.norm)


def cmd_export(args: argparse.Namespace) -> None:
    from ..data import load_cifar10
    from ..defenses.loading import export_model
    from ..paper.classifier import build_classifier
    from ..paper.train import train_model

    if not is_config_name(args.model):
        raise UsageError("export takes a model of this project (full, a, ...), not a module or a file")
    if not args.out.endswith(".safetensors"):
        raise UsageError(f"--out {args.out!r} must end in .safetensors")
    check_writable_file(args.out)  # before the training, which can take many minutes
    cfg = _model_config(args)
    trained = train_model(cfg, load_cifar10(args.data_dir), device=args.device, cache_dir=args.cache_dir,
                          progress=not args.quiet)
    path = export_model(build_classifier(trained), cfg, args.out)
    print(f"exported {cfg.name} ({cfg.config_hash()}) to {path}: weights, config and k-NN bank in one file; "
          f"use it with --model {path}")


def cmd_merge(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from ..evaluation.experiment import summary_frame
    from ..evaluation.merge import merge_dir

    for path, result in merge_dir(args.dir):
        print(f"{result['model']}: {result['processes']} parts merged; clean accuracy {result['clean_acc_full']:.2f}% "
              f"on {result['n_clean']} test images; attacks on the first {result['n_test']}")
        print(tabulate(summary_frame(result), headers="keys", tablefmt="github", showindex=False))
        print(f"results: {path}")
