"""``robustbench-knn``: train, evaluate, list attacks, search the recipe, benchmark speed.

Bad input gives one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from .config import STANDARD_SUITE, ExperimentConfig, UsageError, apply_overrides, get_model_config, parse_value
from .defenses.loading import is_config_name


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(message)


def parse_eps(text: str, norm: str = "Linf") -> list[float]:
    """'8/255,16/255' or '0.031' → floats in [0, 1] (ℓ∞); for ℓ2 any finite value >= 0 ('0.5', '128/255')."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            val = float(Fraction(part)) if "/" in part else float(part)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"malformed eps {part!r}: use e.g. 8/255 or 0.031") from None
        if not 0 <= val <= (1 if norm == "Linf" else float("inf")) or val != val:
            raise UsageError(f"eps {part!r} must be in [0, 1] (pixel units)" if norm == "Linf" else
                             f"eps {part!r} must be a finite number >= 0 (ℓ2 radius in pixel units)")
        out.append(val)
    if not out:
        raise UsageError("--eps needs at least one value")
    return out


TEST_SET_SIZE = 10_000  # CIFAR-10's test set: --n-test / --n-clean beyond it are refused before any work


def check_writable_file(out: str, flag: str = "--out") -> None:
    """Refuse an output file that could not be written, before any work: its folder must exist (or be
    creatable under the nearest existing folder) and take new files. Probed with a temporary file that is
    removed at once (a permission check alone would pass for root, e.g. on /proc)."""
    import os
    import tempfile

    path = Path(out).absolute()
    folder = path.parent
    try:
        if path.is_dir():
            raise UsageError(f"{flag} {out!r} is a folder; give a file name")
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise UsageError(f"{flag} {out!r} cannot be written: {folder} is not a folder")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".robustbench-knn-write-test-")
    except OSError as e:
        raise UsageError(f"{flag} {out!r} cannot be written in {folder}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(tmp)


def _model_config(args: argparse.Namespace) -> ExperimentConfig:
    cfg = get_model_config(args.model)
    sets = list(args.set or [])
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    if args.seed is not None:
        sets.append(f"train.seed={args.seed}")
    if args.n_train is not None:
        sets.append(f"train.n_train={args.n_train}")
    return apply_overrides(cfg, sets)


def _attack_overrides(items: Sequence[str], specs: list[Any]) -> dict[str, dict[str, Any]]:
    """--attack-param kfgsm.steps=100 (name as in --attacks)."""
    from .attacks import get_attack

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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="full",
                   help="a model of this project (full, full-100ep, a, b, c, d, e, untrained, untrained-mlp), "
                        "PACKAGE.MODULE:FUNCTION returning a KNNDefense or nn.Module classifier, or an exported "
                        "FILE.safetensors")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py (else $ROBUSTBENCH_KNN_DATA, else cache)")
    p.add_argument("--cache-dir", help="model cache (else $ROBUSTBENCH_KNN_CACHE, else the user cache dir)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--n-train", type=int, help="train on the first N training images only")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.lr=1e-4, k=5")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _norm_options(p: argparse.ArgumentParser, eps_help: str = "comma list") -> None:
    p.add_argument("--norm", default="Linf", help="threat model: Linf (default) or L2 (RobustBench's spelling)")
    p.add_argument("--eps", help=f"{eps_help} in pixel units of --norm; default Linf: 8/255,16/255, L2: 0.5,1.0")


def _threat(args: argparse.Namespace, one: bool = False) -> tuple[str, list[float]]:
    """--norm and --eps, checked before any work (ε's default depends on the norm)."""
    from .norms import DEFAULT_EPS, parse_norm

    norm = parse_norm(args.norm)
    eps = parse_eps(args.eps or (DEFAULT_EPS[norm].split(",")[0] if one else DEFAULT_EPS[norm]), norm)
    if one and len(eps) != 1:
        raise UsageError(f"this command takes one --eps value (it sweeps ε itself), not {args.eps!r}")
    return norm, eps


def _version() -> str:
    """The installed distribution's version; the package's own when run from a checkout without installing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("robustbench-knn")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustbench-knn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model (cached by config and data set hash)")
    _common(p)

    p = sub.add_parser("evaluate", help="clean and robust accuracy, judged by the real k-NN decision")
    _common(p)
    p.add_argument("--attacks", default="default",
                   help="comma list; `robustbench-knn attacks` lists names. default: on a k-NN defense the adaptive "
                        "attacks on the vote (feature, softknn-apgd, softknn-apgd-dlr) and the gradient-free "
                        "vote-square; on a logit classifier AutoAttack standard")
    p.add_argument("--attack-param", action="append", default=[], metavar="ATTACK.PARAM=VALUE")
    _norm_options(p)
    p.add_argument("--n-test", type=int, default=1000, help="first N test images are attacked")
    p.add_argument("--n-clean", type=int, help="first N test images for clean accuracy (default: all)")
    p.add_argument("--surrogate", default="potential", help="potential or softknn")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--cascade", action="store_true",
                   help="each attack only on the points the earlier ones left robust (in the order given; the "
                        "default suite runs softknn-apgd, softknn-apgd-dlr, feature, vote-square): the same "
                        "per-sample worst case for less work; per-attack figures become cumulative, 'on survivors'")
    p.add_argument("--unaligned", dest="aligned", action="store_false",
                   help="toolkit attacks on the raw surrogate logits of a k-NN defense (default: decision-aligned "
                        "logits, whose argmax is the hard vote and whose gradient is the surrogate's, so a toolkit "
                        "never stops on a point only the surrogate calls broken)")
    p.add_argument("--out", default="results", help="folder for the results JSON, CSV and model card")
    p.add_argument("--shard", metavar="I/N",
                   help="compute part I (from 0) of N and write it into --out; `merge` joins the parts "
                        "(clusters without a process group: SLURM arrays, machines sharing a disk)")

    p = sub.add_parser("merge", help="join the parts of `evaluate --shard I/N` into the result of a single run")
    p.add_argument("dir", help="folder holding the parts (evaluate's --out)")

    sub.add_parser("attacks", help="list attack names, toolkits and parameters")

    p = sub.add_parser("export", help="write a model (weights, config, k-NN bank) to one .safetensors file")
    _common(p)
    p.add_argument("--out", required=True, help="FILE.safetensors")

    p = sub.add_parser("toolkits", help="every standard attack through every toolkit and surrogate, with the worst case")
    _common(p)
    p.add_argument("--attacks", default=",".join(STANDARD_SUITE), help="attack names (all toolkits of each are run)")
    p.add_argument("--surrogates", default="potential,softknn")
    _norm_options(p)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default="tables/toolkits", help="folder for toolkits.{md,csv,json} (toolkits-L2.* for L2)")
    p.add_argument("--render-only", action="store_true", help="rebuild toolkits.{md,csv} from toolkits.json, no computing")
    p.add_argument("--unaligned", dest="aligned", action="store_false",
                   help="the toolkits attack the raw surrogate logits (default: decision-aligned logits)")

    p = sub.add_parser("search", help="search the recipe choices the paper leaves open, on a validation split")
    p.add_argument("--variants", default="default",
                   help="comma-separated NORM_LR_REG[_cos] names (e.g. image_3e-4_mean2), or 'default'")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-train", type=int, help="fit on only the first N training images (quick tries)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a FULL setting before the variant's (quick tries: model.w_r=64, k=50)")
    p.add_argument("--report-test", action="store_true",
                   help="also store each model's clean test accuracy, as information (the choice uses validation)")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tables/recipe_search")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("gate", help="CI gate: fail when robust accuracy regresses or the attacks get weaker")
    p.add_argument("--model", default="full", help="the gated model: a model of this project (trained at the "
                   "gate's size), PACKAGE.MODULE:FUNCTION or FILE.safetensors (as built)")
    p.add_argument("--baseline", default="tables/gate_baseline.json")
    p.add_argument("--update-baseline", action="store_true", help="rewrite the baseline (needs --message)")
    p.add_argument("--message", help="why the baseline is rewritten (stored in the file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm", default="Linf", help="threat model: Linf (ε 8/255, default) or L2 (ε 0.5)")
    p.add_argument("--out", help="also write the current results JSON here")
    p.add_argument("--plant", help="self-test: run with a planted regression (perturbed-model, one-epoch-model, "
                                   "attack-1-step, attack-step-div100); the gate must fail")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("table", help="regenerate the paper's Table 1, Table 2 (--ablation) or §3.5 (--untrained)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ablation", action="store_true", help="Table 2: rows A-E and FULL")
    which.add_argument("--untrained", action="store_true", help="§3.5: untrained IdResNet + k-NN vs random MLP")
    p.add_argument("--attacks", help="extra attacks besides the paper's kfgsm (adds a worst-case column)")
    p.add_argument("--n-test", type=int, help="first N test images are attacked (default 1000)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every row, e.g. k=5")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="tables", help="folder for <table>.{md,csv,tex} and results/<table>-<row>.json")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--quiet", action="store_true", help="only the bar over rows, no per-row progress bars")
    p.add_argument("--render-only", action="store_true", help="rebuild the tables from stored results, no computing")

    p = sub.add_parser("audit", help="gradient-masking audit: standard + adaptive attacks, checks, trust verdict")
    _common(p)
    _norm_options(p, "the one ε audited (default Linf 8/255, L2 0.5)")
    p.add_argument("--n-test", type=int, default=500, help="first N test images are attacked")
    p.add_argument("--quick", action="store_true", help="screening run: 2 standard attacks, fewer steps, 4 ε")
    p.add_argument("--surrogate", default="potential", help="potential or softknn (what the toolkit attacks follow)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default="results", help="folder for audit-*.json/.csv and the PNG plots")
    p.add_argument("--active-test", type=int, default=0, metavar="N",
                   help="also run the active test of attack strength on N points: planted adversarial examples "
                        "over the defense's own embedding that every attack must find (k-NN defenses)")
    p.add_argument("--transfer-source", metavar="ROW",
                   help="source of the transfer attack for a defense without a config of this project (e.g. a: "
                        "Table 2's row A); without it such an audit skips transfer and says so")
    p.add_argument("--figure3", action="store_true",
                   help="instead: draw the paper's Figure 3 (trains N_S=4, d=3 without noise if not cached)")

    p = sub.add_parser("bench", help="speed figures: training vs matmul GFLOP/s, k-NN 10k×50k, attack steps/s")
    p.add_argument("--model", default="full")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attack-steps", type=int, default=10, help="steps of each attack in the throughput pairs")
    p.add_argument("--steps", action="store_true",
                   help="instead: one attack step part by part (network, k-NN loss, vote) and each part against the "
                        "network alone, at the batch sizes of --batches")
    p.add_argument("--batches", default="250,1000", help="batch sizes for --steps")

    p = sub.add_parser("leaderboard", help="RobustBench-style tables (md, csv, html) from the model cards under DIRs")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched recursively for *.model-card.json")
    p.add_argument("--out", default="tables/leaderboard", help="folder for leaderboard.{md,csv,html}")

    p = sub.add_parser("active-test", help="the active test of attack strength alone: planted adversarial examples "
                                           "over a k-NN defense's own embedding that every attack must find")
    _common(p)
    p.add_argument("--eps", default="8/255", help="one ε")
    p.add_argument("--attacks", default="standard,adaptive", help="attacks to test (transfer is not applicable)")
    p.add_argument("--n-points", type=int, default=100, help="the first N clean-correct test images")
    p.add_argument("--surrogate", default="potential", help="potential or softknn (what the toolkit attacks follow)")
    p.add_argument("--out", default="results", help="folder for active-<model>-<hash>-eps<N>.json")

    p = sub.add_parser("certify", help="certified lower bounds: test points whose k-NN vote no input in the ball "
                                       "can change (IBP over the embedding, a pessimistic vote)")
    _common(p)
    _norm_options(p)
    p.add_argument("--n-test", type=int, default=1000, help="first N test images are certified")
    p.add_argument("--steps", type=int, default=10, help="bisection steps for each image's certified radius")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", default="results", help="folder for certify-<model>-<hash>-<norm>.{json,csv}")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from .data import load_cifar10
    from .paper.train import train_model

    cfg = _model_config(args)
    trained = train_model(cfg, load_cifar10(args.data_dir), device=args.device, cache_dir=args.cache_dir,
                          progress=not args.quiet)
    print(f"{cfg.name}: {trained.path} ({trained.log['train_seconds']:.0f} s of training)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .attacks import default_attacks, parse_attack_list
    from .defenses.surrogate import SURROGATES

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
        from .evaluation import distributed

        if distributed.current().group:
            raise UsageError("--shard splits a job without a process group; under torchrun the ranks split it")
        with distributed.use(distributed.parse_shard(args.shard)):
            return _run_evaluate(args, specs, eps, overrides)
    return _run_evaluate(args, specs, eps, overrides)


def _run_evaluate(args: argparse.Namespace, specs: list[Any], eps: list[float],
                  overrides: dict[str, dict[str, Any]]) -> None:
    from tabulate import tabulate

    from .evaluation.experiment import benchmark_config, save_results, summary_frame

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
    from .evaluation.api import suite_note
    from .evaluation.cards import eps_label

    for r in result["per_eps"]:
        print(f"{args.norm} ε = {eps_label(r['eps'])}: " + ("UNRELIABLE — " if r.get("unreliable") else "")
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
    from .attacks.transfer import trained_sources, transfer_sources
    from .data import load_cifar10
    from .defenses.loading import resolve_model
    from .devices import resolve_device
    from .evaluation.api import require_knn
    from .evaluation.experiment import defense_cells, evaluate_classifier

    for flag in ("epochs", "n_train", "set"):
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')} configures a model of this project; --model "
                             f"{args.model!r} is already built")
    dev = resolve_device(args.device)
    clf, cfg, name = resolve_model(args.model, surrogate=args.surrogate, aligned=args.aligned, device=dev)
    if getattr(args, "default_suite", False) and not hasattr(clf, "bank"):  # a logit classifier: AutoAttack
        from .attacks import default_attacks, parse_attack_list

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
    from .data import load_cifar10
    from .defenses.loading import export_model
    from .paper.classifier import build_classifier
    from .paper.train import train_model

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


def cmd_toolkits(args: argparse.Namespace) -> None:
    from .defenses.surrogate import SURROGATES
    from .evaluation.toolkit_compare import render_compare, rerender, run_compare, suite_specs

    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    norm, eps = _threat(args)
    suite_specs(names, norm)  # validates the names before any work
    if args.render_only:
        print(render_compare(rerender(args.out, names, norm)))
        return
    surrogates = [s.strip() for s in args.surrogates.split(",") if s.strip()]
    bad = [s for s in surrogates if s not in SURROGATES]
    if bad or not surrogates:
        raise UsageError(f"unknown surrogate(s) {bad}; choose from {', '.join(SURROGATES)}")
    if args.n_test < 1 or args.batch_size < 1:
        raise UsageError("--n-test and --batch-size must be >= 1")
    if is_config_name(args.model):
        result = run_compare(_model_config(args), eps, names=names, surrogates=surrogates,
                             n_test=args.n_test, out_dir=args.out, data_dir=args.data_dir, cache_dir=args.cache_dir,
                             device=args.device, seed=args.seed or 0, batch_size=args.batch_size,
                             progress=not args.quiet, aligned=args.aligned, norm=norm)
    else:
        from .data import load_cifar10
        from .defenses.defense import KNNDefense
        from .defenses.loading import resolve_model
        from .devices import resolve_device
        from .evaluation.experiment import defense_cells, weights_hash
        from .evaluation.toolkit_compare import compare_classifiers

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
                                     norm=norm)
    print(render_compare(result))


def cmd_attacks(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from .attacks import DEFAULT_TOOLKIT, REGISTRY

    rows = [[s.key, "yes" if DEFAULT_TOOLKIT.get(s.name) == s.toolkit else "", ",".join(s.norms), json.dumps(s.defaults),
             s.description] for s in REGISTRY.values()]
    print(tabulate(rows, headers=["attack", "default for name", "norms", "parameters", "description"],
                   tablefmt="github"))


def cmd_search(args: argparse.Namespace) -> None:
    from .data import load_cifar10
    from .paper.search import DEFAULT_ORDER, parse_variant, run_search

    names = list(DEFAULT_ORDER) if args.variants == "default" else [v.strip() for v in args.variants.split(",")]
    for n in names:
        parse_variant(n)
    df = run_search(load_cifar10(args.data_dir), names, epochs=args.epochs, val_size=args.val_size, out=args.out,
                    device=args.device, cache_dir=args.cache_dir, seed=args.seed, n_train=args.n_train,
                    sets=args.set or [], report_test=args.report_test)
    print(df.to_markdown(index=False))


def cmd_gate(args: argparse.Namespace) -> int:
    import datetime

    from tabulate import tabulate

    from .data import load_cifar10
    from .evaluation.gate import GateConfig, check_baseline, compare, load_baseline, planted, run_gate
    from .norms import parse_norm
    from .store import write_json

    norm = parse_norm(args.norm)
    gcfg = GateConfig(seed=args.seed, model=args.model, norm=norm, eps=8 / 255 if norm == "Linf" else 0.5)
    model = None
    if not is_config_name(args.model):  # a ready defense in place of FULL's gate-sized training
        from .defenses.loading import resolve_model
        from .devices import resolve_device

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


def cmd_table(args: argparse.Namespace) -> None:
    from .attacks import parse_attack_list
    from .reports.tables import render_table, run_table

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


def cmd_audit(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .defenses.surrogate import SURROGATES
    from .evaluation.audit import audit, audit_classifier
    from .evaluation.cards import eps_label
    from .reports.audit_report import attacks_frame, checks_frame, save_audit

    if args.figure3 and not is_config_name(args.model):
        raise UsageError("--figure3 trains a model of this project (full, ...), not a module or a file")
    if args.figure3:
        cfg = _model_config(args)
        from .data import load_cifar10
        from .reports.plots import figure3

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
    if args.active_test and norm != "Linf":
        raise UsageError("the active test plants its examples in the ℓ∞ ball; run it with --norm Linf")
    if args.transfer_source is not None:
        get_model_config(args.transfer_source)  # an unknown row: one line before any work
    if is_config_name(args.model):
        res = audit(_model_config(args), eps[0], n_test=args.n_test, quick=args.quick, data_dir=args.data_dir,
                    cache_dir=args.cache_dir, device=args.device, seed=args.seed or 0, surrogate=args.surrogate,
                    batch_size=args.batch_size, progress=not args.quiet, active_points=args.active_test,
                    norm=norm)
    else:
        from .data import load_cifar10
        from .defenses.loading import resolve_model
        from .devices import resolve_device
        from .evaluation.experiment import defense_cells, weights_hash

        clf, cfg, name = resolve_model(args.model, surrogate=args.surrogate, device=resolve_device(args.device))
        data = load_cifar10(args.data_dir)
        res = audit_classifier(clf, data, eps[0], name=name, config_hash=weights_hash(clf),
                               config=cfg.to_dict() if cfg else None, target_cfg=cfg, n_test=args.n_test,
                               quick=args.quick, cache_dir=args.cache_dir, seed=args.seed or 0,
                               batch_size=args.batch_size, progress=not args.quiet,
                               cells=defense_cells(clf, data.sha256, args.cache_dir),
                               active_points=args.active_test, transfer_source=args.transfer_source, norm=norm)
    path = save_audit(res, args.out)
    print(f"{res['dataset']}, model {res['model']}, {norm} ε = {eps_label(eps[0])}, {res['n']} test images: "
          f"clean {res['clean_acc']:.1f}%")
    print(tabulate(attacks_frame(res), headers="keys", tablefmt="github", showindex=False))
    print(tabulate(res["attribution"], headers="keys", tablefmt="github"))
    print(tabulate(checks_frame(res), headers="keys", tablefmt="github", showindex=False))
    if res.get("active_test"):
        from .evaluation.active_test import summary

        print(summary(res["active_test"]))
    print(res["verdict"]["text"])
    print(f"results: {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from .evaluation.experiment import summary_frame
    from .evaluation.merge import merge_dir

    for path, result in merge_dir(args.dir):
        print(f"{result['model']}: {result['processes']} parts merged; clean accuracy {result['clean_acc_full']:.2f}% "
              f"on {result['n_clean']} test images; attacks on the first {result['n_test']}")
        print(tabulate(summary_frame(result), headers="keys", tablefmt="github", showindex=False))
        print(f"results: {path}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .evaluation.bench import run_bench

    if args.steps:
        import torch
        from tabulate import tabulate

        from .devices import resolve_device
        from .evaluation.step_bench import breakdown_rows, step_breakdown

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
    from .reports.leaderboard import write_leaderboard

    check_writable_file(str(Path(args.out) / "leaderboard.html"))  # before reading every card
    board, paths = write_leaderboard(args.dirs, args.out)
    for path, why in board.skipped:
        print(f"robustbench-knn: warning: skipped {path}: {why}", file=sys.stderr)
    print(paths[0].read_text())
    print(f"{len(board.rows)} rows; written: {', '.join(map(str, paths))}")


def _built_model(args: argparse.Namespace, data: Any, dev: Any, surrogate: str = "potential") -> tuple[Any, str]:
    """--model as a ready classifier and its name: a config of this project trained or loaded from the cache."""
    from .defenses.loading import resolve_model

    if is_config_name(args.model):
        from .paper.classifier import build_classifier
        from .paper.train import train_model

        cfg = _model_config(args)
        return build_classifier(train_model(cfg, data, device=dev, cache_dir=args.cache_dir,
                                            progress=not args.quiet), surrogate), cfg.name
    clf, _, name = resolve_model(args.model, surrogate=surrogate, device=dev)
    return clf, name


def cmd_certify(args: argparse.Namespace) -> None:
    from .data import load_cifar10
    from .devices import machine_name, resolve_device
    from .evaluation.certify import certify, save_certificate, summary
    from .evaluation.evaluate import versions

    norm, eps = _threat(args)
    if not 1 <= args.n_test <= TEST_SET_SIZE:
        raise UsageError(f"--n-test must be between 1 and {TEST_SET_SIZE}")
    if args.steps < 0 or args.batch_size < 1:
        raise UsageError("--steps must be >= 0 and --batch-size >= 1")
    check_writable_file(str(Path(args.out) / "certify.json"))  # before any training
    dev = resolve_device(args.device)
    data = load_cifar10(args.data_dir)
    clf, name = _built_model(args, data, dev)
    cert = certify(clf, data.test.floats()[:args.n_test], data.test.y[:args.n_test], eps, norm, steps=args.steps,
                   batch_size=args.batch_size)
    path = save_certificate(cert, args.out, model=name, defense=clf, info={
        "dataset_sha256": data.sha256, "device": str(dev), "machine": machine_name(dev), "versions": versions()})
    print(summary(cert))
    print(f"results: {path}")


def cmd_active_test(args: argparse.Namespace) -> None:
    from .attacks import parse_attack_list
    from .data import load_cifar10
    from .devices import machine_name, resolve_device
    from .evaluation.active_test import active_test, summary
    from .evaluation.evaluate import versions
    from .evaluation.experiment import weights_hash
    from .store import write_json

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
           "machine": machine_name(dev), "versions": versions(), **res}
    path = Path(args.out) / f"active-{name}-{res['weights_hash']}-eps{eps[0] * 255:g}.json"
    write_json(path, res)
    print(summary(res))
    print(f"results: {path}")


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "attacks": cmd_attacks, "toolkits": cmd_toolkits,
            "search": cmd_search, "export": cmd_export, "merge": cmd_merge,
            "bench": cmd_bench, "table": cmd_table, "gate": cmd_gate, "audit": cmd_audit,
            "leaderboard": cmd_leaderboard, "active-test": cmd_active_test, "certify": cmd_certify}


DISTRIBUTED = ("evaluate", "audit", "toolkits")  # the commands torchrun can split


def main(argv: Sequence[str] | None = None) -> int:
    from .evaluation import distributed

    where = ""
    try:
        args = build_parser().parse_args(argv)
        if not distributed.launched_by_torchrun():
            rc = COMMANDS[args.command](args)
        else:
            if args.command not in DISTRIBUTED:
                raise UsageError(f"torchrun splits {', '.join(DISTRIBUTED)}; run {args.command!r} as one process")
            part = distributed.init_group()
            where = f" (rank {part.rank} of {part.world})"
            try:
                with distributed.use(part), contextlib.ExitStack() as stack:
                    if not part.writer:  # rank 0 prints, draws progress and writes what every rank holds
                        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                        args.quiet = True
                    rc = COMMANDS[args.command](args)
            finally:
                distributed.close_group()
    except UsageError as e:
        print(f"robustbench-knn: error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustbench-knn: interrupted (finished work is cached; run again to resume)", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
