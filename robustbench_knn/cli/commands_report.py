"""The commands that tabulate, list and time: toolkits, attacks, search, table, bench, leaderboard, sandwich."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import UsageError, get_model_config
from ..defenses.loading import is_config_name
from .parser import _model_config, _threat, check_writable_file


def _comma_list(text: str) -> list[str]:
    """``"a, b,"`` → ``["a", "b"]``: the option's comma-separated names, blanks dropped."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _merge_toolkits(args: argparse.Namespace, names: list[str], norm: str) -> None:
    from ..evaluation.evaluate import command_line
    from ..evaluation.toolkit_compare import render_compare, save_compare
    from ..evaluation.toolkit_merge import merge_compares, read_parts

    parts = read_parts(_comma_list(args.merge), norm)
    if Path(args.out).resolve() in {path.parent.resolve() for path, _ in parts}:
        raise UsageError("--out is one of the --merge folders: the merged table would overwrite a part")
    result = merge_compares(parts, names)
    result["command"] = command_line()  # the parts' machines stay theirs (merged_from, machine)
    save_compare(result, args.out)
    print(render_compare(result))


def cmd_toolkits(args: argparse.Namespace) -> None:
    from ..defenses.surrogate import SURROGATES
    from ..evaluation.toolkit_compare import chosen_toolkits, render_compare, rerender, run_compare, suite_specs

    names = _comma_list(args.attacks)
    norm, eps = _threat(args)
    suite_specs(names, norm)  # validates the names before any work
    toolkits = None if args.toolkits is None else _comma_list(args.toolkits)
    chosen_toolkits(toolkits)
    if args.render_only and args.merge:
        raise UsageError("--render-only and --merge: choose one")
    if args.render_only:
        print(render_compare(rerender(args.out, names, norm)))
        return
    if args.merge:
        _merge_toolkits(args, names, norm)
        return
    surrogates = _comma_list(args.surrogates)
    bad = [s for s in surrogates if s not in SURROGATES]
    if bad or not surrogates:
        raise UsageError(f"unknown surrogate(s) {bad}; choose from {', '.join(SURROGATES)}")
    if args.n_test < 1 or args.batch_size < 1:
        raise UsageError("--n-test and --batch-size must be >= 1")
    if is_config_name(args.model):
        result = run_compare(_model_config(args), eps, names=names, surrogates=surrogates,
                             n_test=args.n_test, out_dir=args.out, data_dir=args.data_dir, cache_dir=args.cache_dir,
                             device=args.device, seed=args.seed or 0, batch_size=args.batch_size,
                             progress=not args.quiet, aligned=args.aligned, norm=norm, toolkits=toolkits)
    else:
        from ..data import load_cifar10
        from ..defenses.defense import KNNDefense
        from ..defenses.loading import resolve_model
        from ..devices import resolve_device
        from ..evaluation.experiment import defense_cells, weights_hash
        from ..evaluation.toolkit_compare import compare_classifiers

        clf, _, name = resolve_model(args.model, aligned=args.aligned, device=resolve_device(args.device))
        if isinstance(clf, KNNDefense):  # the user's own surrogate where named, else the same defense re-fronted
            # the potential needs the paper's loss constants, which a user's defense may not have
            surrogates = [s for s in surrogates if s != "potential" or clf.lam is not None]
            if not surrogates:
                raise UsageError(f"--model {args.model!r} has no loss constants for the potential surrogate; "
                                 f"use --surrogates softknn")
            clfs = {s: clf if s == clf.surrogate_name else clf.with_surrogate(s) for s in surrogates}
        else:
            clfs = {"logits": clf}  # a plain classifier's own logits
        data = load_cifar10(args.data_dir)
        result = compare_classifiers(clfs, data, eps, name=name, config_hash=weights_hash(clf),
                                     names=names, n_test=args.n_test, out_dir=args.out, seed=args.seed or 0,
                                     batch_size=args.batch_size, progress=not args.quiet,
                                     cells=lambda sur: defense_cells(clfs[sur], data.sha256, args.cache_dir),
                                     norm=norm, toolkits=toolkits)
    print(render_compare(result))


def cmd_attacks(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from ..attacks import DEFAULT_TOOLKIT, REGISTRY

    rows = [[s.key, "yes" if DEFAULT_TOOLKIT.get(s.name) == s.toolkit else "", ",".join(s.norms), json.dumps(s.defaults),
             s.description] for s in REGISTRY.values()]
    print(tabulate(rows, headers=["attack", "default for name", "norms", "parameters", "description"],
                   tablefmt="github"))


def cmd_search(args: argparse.Namespace) -> None:
    from ..data import load_cifar10
    from ..paper.search import DEFAULT_ORDER, parse_variant, run_search

    names = list(DEFAULT_ORDER) if args.variants == "default" else [v.strip() for v in args.variants.split(",")]
    for n in names:
        parse_variant(n)
    df = run_search(load_cifar10(args.data_dir), names, epochs=args.epochs, val_size=args.val_size, out=args.out,
                    device=args.device, cache_dir=args.cache_dir, seed=args.seed, n_train=args.n_train,
                    sets=args.set or [], report_test=args.report_test)
    print(df.to_markdown(index=False))


def cmd_table(args: argparse.Namespace) -> None:
    from ..attacks import parse_attack_list
    from ..reports.tables import render_table, run_table

    name = "table2" if args.ablation else "untrained" if args.untrained else "table1"
    if args.render_only:
        given = [f for f, v in (("--attacks", args.attacks), ("--n-test", args.n_test), ("--epochs", args.epochs),
                                ("--seed", args.seed), ("--set", args.set)) if v is not None]
        if given:
            raise UsageError(f"--render-only rebuilds from stored results and takes no {', '.join(given)}")
        path = render_table(name, args.out)
    else:
        extra = parse_attack_list(args.attacks) if args.attacks is not None else []
        path = run_table(name, extra_attacks=extra, n_test=1000 if args.n_test is None else args.n_test,
                         epochs=args.epochs, seed=args.seed, sets=args.set or [], data_dir=args.data_dir,
                         cache_dir=args.cache_dir, device=args.device, out_dir=args.out, progress=not args.quiet)
    print(path.read_text())
    print(f"written: {', '.join(str(path.with_suffix(s)) for s in ('.md', '.csv', '.tex'))}")


def cmd_bench(args: argparse.Namespace) -> None:
    from ..evaluation.bench import run_bench

    if args.steps:
        import torch
        from tabulate import tabulate

        from ..devices import resolve_device
        from ..evaluation.step_bench import breakdown_rows, step_breakdown

        batches = [int(b) for b in args.batches.split(",")]  # parsed before any work
        res = [step_breakdown(get_model_config(args.model), batch=b, device=args.device, repeats=args.repeats)
               for b in batches]
        print(f"device {resolve_device(args.device)}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
        print(tabulate(breakdown_rows(res), headers="keys", tablefmt="github"))
        return
    res = run_bench(get_model_config(args.model), device=args.device, repeats=args.repeats,
                    attack_steps=args.attack_steps)
    for k, v in res.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")


def cmd_leaderboard(args: argparse.Namespace) -> None:
    from ..reports.leaderboard_files import write_leaderboard

    check_writable_file(str(Path(args.out) / "leaderboard.html"))  # before reading every card
    board, paths = write_leaderboard(args.dirs, args.out)
    for path, why in board.skipped:
        print(f"robustbench-knn: warning: skipped {path}: {why}", file=sys.stderr)
    print(paths[0].read_text())
    print(f"{len(board.rows)} rows; written: {', '.join(map(str, paths))}")


def cmd_sandwich(args: argparse.Namespace) -> int:
    from ..reports.sandwich import sandwich
    from .commands_audit import report_sandwich

    s = sandwich(args.certificate, args.results)  # unreadable, other threat model, weights or ε: refused here
    out = Path(args.out) if args.out is not None else Path(args.certificate).parent
    check_writable_file(str(out / "sandwich.json"))
    return report_sandwich(s, out)
