"""The command line's parser and the option helpers its commands share."""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

from ..config import STANDARD_SUITE, ExperimentConfig, UsageError, apply_overrides, get_model_config

DESCRIPTION = """``robustbench-knn``: train, evaluate, list attacks, search the recipe, benchmark speed.

Bad input gives one line on stderr and exit code 2, with nothing written.
"""


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
    from ..norms import DEFAULT_EPS, parse_norm

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
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustbench-knn", description=DESCRIPTION)
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
    p.add_argument("--toolkits", help="run only these toolkits' cells, e.g. ta,aa (default: every toolkit; the "
                                      "others stay in the table as 'not run')")
    _norm_options(p)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default="tables/toolkits", help="folder for toolkits.{md,csv,json} (toolkits-L2.* for L2)")
    p.add_argument("--render-only", action="store_true", help="rebuild toolkits.{md,csv} from toolkits.json, no computing")
    p.add_argument("--merge", metavar="DIR,DIR,...",
                   help="one table in --out from the tables of these folders (parts of one table run with other "
                        "--attacks, --toolkits, --surrogates or --eps on the same model and images), no computing")
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
    p.add_argument("--no-certify", action="store_true",
                   help="skip the certified lower bounds drawn under the ε sweep (k-NN defenses)")
    p.add_argument("--transfer-source", metavar="ROW",
                   help="source of the transfer attack (a row of Table 2, e.g. a: row A, at FULL's size); needed for a "
                        "defense without a config of this project (without it such an audit skips transfer and "
                        "says so); a model of this project defaults to row A at its own size")
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
    p.add_argument("--against", action="append", metavar="FILE",
                   help="an audit or evaluate JSON of the same weights and threat model (repeatable): also write "
                        "the sandwich (certified ≤ robust ≤ worst case) beside the certificate; exit 1 on a "
                        "soundness violation")

    p = sub.add_parser("sandwich", help="certified lower bound and attacks' upper bound per ε, from a certify JSON "
                                        "and audit / evaluate JSONs of the same weights; flags soundness violations")
    p.add_argument("certificate", metavar="CERT.json", help="a certify-<model>-<hash>-<norm>.json")
    p.add_argument("results", nargs="+", metavar="RESULT.json", help="audit-*.json and/or evaluate-*.json")
    p.add_argument("--out", help="folder for sandwich-<model>-<hash>-<norm>.{md,csv,json,png} (default: the "
                                 "certificate's folder)")
    return parser
