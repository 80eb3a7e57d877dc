"""The paper's tables, regenerated: Table 1 (§3.2), Table 2 (§3.4 ablation) and the §3.5 untrained experiment.

Running a table benchmarks each of its measured rows (``benchmark_config()`` trains what is missing, cached by config
hash) and stores one JSON per row in ``<out>/results/<table>-<row>.json`` together with the settings that
produced it, so an interrupted run resumes with the next unfinished row. Rendering reads only those JSONs and
the paper's published numbers (``baselines/paper.json``, shipped in the package as
``robustbench_knn/baselines/paper.json``): every measured cell stands beside the paper's value
and the difference, and the literature rows of Table 1 are labelled as reported in the paper, never measured.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..attacks import AttackSpec, get_attack
from ..config import ExperimentConfig, UsageError, apply_overrides, get_model_config
from ..evaluation.experiment import _eps_label, benchmark_config
from ..store import read_json, write_json, write_text
from .formats import alignment, display_frame, to_latex

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# Package data (setuptools package-data), so a wheel install renders tables too; the repo's baselines/paper.json is
# the human-readable copy (tests/test_packaging.py checks that the two are equal).
BASELINES_RESOURCE = ("baselines", "paper.json")
PACKAGE = "robustbench_knn"  # baselines/ lies at the package's root, not beside this module (reports/)


def baselines_resource() -> Traversable:
    """The packaged copy of the paper's numbers (``robustbench_knn/baselines/paper.json``)."""
    res = resources.files(PACKAGE)
    for part in BASELINES_RESOURCE:
        res = res / part
    return res


EPS = (8 / 255, 16 / 255)
PAPER_ATTACK = "kfgsm"  # the paper's Algorithm 2 ("30-round PGD", step ε/10): native defaults
SURROGATE = "potential"
MEASURED, REPORTED = "measured", "reported in the paper"


@dataclass(frozen=True)
class Column:
    """One metric of a table: what to read from a result and which baseline key holds the paper's value."""

    label: str
    metric: str  # "clean" (clean_acc_full), "robust" (the paper's attack) or "worst" (worst case over attacks)
    eps: float | None = None
    paper_key: str | None = None


@dataclass(frozen=True)
class TableSpec:
    """A table: its measured rows (model names, in paper order), columns and ✓/× flag columns."""

    name: str
    title: str
    rows: tuple[str, ...]
    columns: tuple[Column, ...]
    flags: tuple[tuple[str, str], ...] = ()  # (baseline key, column label)
    command: str = "robustbench-knn table"
    # (variant row, paper row's model): a measured model that relaxes a stated setting, shown under the paper's
    # row it varies and compared with that row's published figures; its label names what differs.
    variants: tuple[tuple[str, str], ...] = ()


def _robust(eps: float, paper_key: str | None) -> Column:
    return Column(f"ε={_eps_label(eps)} PGD", "robust", eps, paper_key)


TABLES: dict[str, TableSpec] = {
    "table1": TableSpec(
        "table1", "Table 1 (§3.2): experimental results and comparison with existing methods", ("full", "full-100ep"),
        (Column("ε=8/255 clean", "clean", None, "clean_8"), _robust(EPS[0], "pgd_8"),
         Column("ε=16/255 clean", "clean", None, "clean_16"), _robust(EPS[1], "pgd_16")),
        variants=(("full-100ep", "full"),)),
    "table2": TableSpec(
        "table2", "Table 2 (§3.4): ablation studies on CIFAR-10", ("a", "b", "c", "d", "e", "full"),
        (Column("clean", "clean", None, "clean"), _robust(EPS[0], "pgd_8"), _robust(EPS[1], "pgd_16")),
        flags=(("identity_init", "identity init"), ("parameter_sharing", "parameter sharing"),
               ("knn_exp_loss", "k-NN and exp loss")),
        command="robustbench-knn table --ablation"),
    "untrained": TableSpec(
        "untrained", "§3.5: untrained identity-initialised IdResNet + k-NN vs a random 5-layer MLP",
        ("untrained", "untrained-mlp"),
        (Column("clean", "clean", None, "clean"), _robust(EPS[0], "pgd_8"), _robust(EPS[1], "pgd_16")),
        command="robustbench-knn table --untrained"),
}


def get_table(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise UsageError(f"unknown table {name!r}; choose from {', '.join(TABLES)}") from None


def load_baselines(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The paper's published numbers; the only source of the 'paper' columns and of the literature rows."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"paper baselines not found at {p}")
        return read_json(p)
    res = baselines_resource()
    if not res.is_file():
        raise UsageError(f"paper baselines missing from the installed package ({'/'.join(BASELINES_RESOURCE)} in "
                         f"{PACKAGE}); reinstall robustbench-knn")
    return json.loads(res.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- running


def attack_specs(extra: Sequence[AttackSpec] = ()) -> list[AttackSpec]:
    """The paper's kFGSM first, then any extra attacks (duplicates dropped)."""
    out = [get_attack(PAPER_ATTACK)]
    for spec in extra:
        if spec.key not in {s.key for s in out}:
            out.append(spec)
    return out


def row_config(row: str, *, epochs: int | None = None, seed: int | None = None,
               sets: Sequence[str] = ()) -> ExperimentConfig:
    """The row's model config with ``--set`` overrides, then --epochs/--seed (validated before any work)."""
    cfg = apply_overrides(get_model_config(row), sets)
    train = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}
    cfg = cfg.replace(train=train) if train else cfg
    cfg.validate()
    return cfg


def row_settings(cfg: ExperimentConfig, specs: Sequence[AttackSpec], n_test: int, dataset_sha256: str) -> dict:
    """Everything a row's figures depend on; a stored row with equal settings is not recomputed."""
    settings = {
        "model": cfg.name, "config": cfg.to_dict(), "config_hash": cfg.config_hash(),
        "epochs": cfg.train.epochs if cfg.train.trained else 0, "seed": cfg.train.seed,
        "attacks": [s.key for s in specs], "attack_params": {s.key: s.defaults for s in specs},
        "eps": list(EPS), "n_test": n_test, "surrogate": SURROGATE, "dataset_sha256": dataset_sha256,
    }
    return json.loads(json.dumps(settings))  # as it reads back from disk


def result_path(out_dir: str | os.PathLike, table: str, row: str) -> Path:
    return Path(out_dir) / "results" / f"{table}-{row}.json"


def _read_row(path: Path) -> dict[str, Any] | None:
    try:
        stored = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    return stored if isinstance(stored, dict) and {"settings", "result"} <= stored.keys() else None


def _reusable(out_dir: str | os.PathLike, row: str, settings: dict) -> tuple[Path, dict] | None:
    """The same model under the same settings stored for another table (FULL is in Tables 1 and 2)."""
    for path in sorted((Path(out_dir) / "results").glob(f"*-{row}.json")):
        stored = _read_row(path)
        if stored is not None and stored.get("row") == row and stored["settings"] == settings:
            return path, stored
    return None


def _dataset_sha(data_dir: str | None) -> str:
    from ..data import load_cifar10

    return load_cifar10(data_dir).sha256


def run_table(
    name: str,
    *,
    extra_attacks: Sequence[AttackSpec] = (),
    n_test: int = 1000,
    epochs: int | None = None,
    seed: int | None = None,
    sets: Sequence[str] = (),
    data_dir: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    out_dir: str | os.PathLike = "tables",
    progress: bool = True,
    row_bar: bool = True,
) -> Path:
    """Benchmark the table's missing rows (resumable: one stored JSON per finished row), then render it.

    All input is checked before any work, so bad input writes nothing. Returns the rendered markdown path.
    """
    spec = get_table(name)
    if n_test < 1:
        raise UsageError("--n-test must be >= 1")
    load_baselines()
    specs = attack_specs(extra_attacks)
    cfgs = {row: row_config(row, epochs=epochs, seed=seed, sets=sets) for row in spec.rows}
    sha = _dataset_sha(data_dir)
    bar = tqdm(spec.rows, desc=name, unit="row", disable=not row_bar, position=0)
    try:
        for row in bar:
            bar.set_postfix_str(row)
            _run_row(name, row, cfgs[row], specs, n_test, sha, out_dir=out_dir, data_dir=data_dir,
                     cache_dir=cache_dir, device=device, progress=progress)
    finally:
        bar.close()
        path = render_table(name, out_dir)  # also after Ctrl-C: the finished rows, honestly partial
    return path


def _run_row(table: str, row: str, cfg: ExperimentConfig, specs: list[AttackSpec], n_test: int, sha: str, *,
             out_dir: str | os.PathLike, data_dir: str | None, cache_dir: str | None, device: str,
             progress: bool) -> None:
    path = result_path(out_dir, table, row)
    settings = row_settings(cfg, specs, n_test, sha)
    stored = _read_row(path)
    if stored is not None and stored["settings"] == settings:
        return
    found = _reusable(out_dir, row, settings)
    if found is not None:
        write_json(path, {**found[1], "table": table, "reused_from": found[0].name})
        return
    result = benchmark_config(cfg, specs, list(EPS), n_test=n_test, data_dir=data_dir, cache_dir=cache_dir,
                              device=device, seed=cfg.train.seed, surrogate=SURROGATE, progress=progress)
    write_json(path, {"table": table, "row": row, "settings": settings, "result": result})


# ---------------------------------------------------------------- rendering


def stored_rows(name: str, out_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The finished rows of a table (row → stored JSON), in table order."""
    spec = get_table(name)
    rows = {row: _read_row(result_path(out_dir, name, row)) for row in spec.rows}
    return {row: stored for row, stored in rows.items() if stored is not None}


def _per_eps(result: dict[str, Any], eps: float) -> dict[str, Any] | None:
    return next((r for r in result["per_eps"] if math.isclose(r["eps"], eps, rel_tol=1e-9)), None)


def measured_value(result: dict[str, Any], col: Column) -> float | None:
    """A column's measured figure; None when not measured (or the attack's examples were rejected)."""
    if col.metric == "clean":
        return result["clean_acc_full"]
    entry = _per_eps(result, col.eps)
    if entry is None:
        return None
    if col.metric == "worst":
        return entry["worst_case_acc"] if len(entry["attacks"]) > 1 else None
    return entry["attacks"].get(get_attack(PAPER_ATTACK).key, {}).get("robust_acc")


def table_columns(spec: TableSpec, rows: dict[str, dict[str, Any]]) -> list[Column]:
    """The table's columns, plus a worst-case column per ε when rows were attacked with more than one attack."""
    cols = list(spec.columns)
    if any(len(s["result"]["attacks"]) > 1 for s in rows.values()):
        cols += [Column(f"ε={_eps_label(e)} worst case", "worst", e, None) for e in EPS]
    return cols


def _diff(measured: float | None, paper: float | None) -> float | None:
    return None if measured is None or paper is None else round(measured - paper, 2)


def _row_label(name: str, base: dict[str, Any]) -> str:
    if name == "table1":
        return f"{base['method']} ({base['citation']})" if base.get("citation") else base["method"]
    return base["row"]


def table_frame(name: str, out_dir: str | os.PathLike, baselines: dict[str, Any] | None = None) -> pd.DataFrame:
    """Numeric table: per column the measured value, the paper's value and Δ = measured − paper."""
    spec = get_table(name)
    baselines = baselines or load_baselines()
    rows = stored_rows(name, out_dir)
    cols = table_columns(spec, rows)
    records = []
    for base in baselines[name]["rows"]:
        model = base.get("model")
        shown = [(model, _row_label(name, base))] + [
            (variant, f"{_row_label(name, base)}, variant: {rows[variant]['settings']['epochs']} epochs")
            for variant, of in spec.variants if of == model and variant in rows]
        for row_model, row_label in shown:
            if row_model is not None and row_model not in rows:
                continue  # not computed yet: absent, and named in the header
            result = rows[row_model]["result"] if row_model is not None else None
            rec: dict[str, Any] = {"row": row_label, "model": row_model or "",
                                   "source": MEASURED if result is not None else REPORTED}
            rec.update({label: base[key] for key, label in spec.flags})
            for col in cols:
                m = measured_value(result, col) if result is not None else None
                p = base.get(col.paper_key) if col.paper_key else None
                rec.update({col.label: m, f"{col.label} paper": p, f"{col.label} Δ": _diff(m, p)})
            records.append(rec)
    return pd.DataFrame(records, columns=["row", "model", *(label for _, label in spec.flags), "source",
                                          *(name for c in cols for name in _column_names(c))])


def _column_names(col: Column) -> list[str]:
    """measured, paper, Δ — or the measured value alone where the paper has no figure (worst case)."""
    return [col.label, f"{col.label} paper", f"{col.label} Δ"] if col.paper_key else [col.label]


def _setting(rows: dict[str, dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> str:
    """One value when all rows agree, else the value per row (so a mixed table says so)."""
    values = {row: get(s) for row, s in rows.items()}
    distinct = {json.dumps(v, sort_keys=True, default=str) for v in values.values()}
    if len(distinct) == 1:
        return str(next(iter(values.values())))
    return "differs between rows: " + "; ".join(f"{r}: {v}" for r, v in values.items())


def _attack_text(stored: dict[str, Any]) -> str:
    s = stored["settings"]
    return ", ".join(f"{k} {json.dumps(s['attack_params'].get(k, {}))}" for k in s["attacks"])


def _versions_text(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def header_lines(name: str, rows: dict[str, dict[str, Any]], baselines: dict[str, Any]) -> list[str]:
    """What the table was measured on and how, taken from the stored results only."""
    spec = get_table(name)
    missing = [r for r in spec.rows if r not in rows]
    lines = [f"# {spec.title} — reproduction", "",
             f"Paper: {baselines['paper']}, {baselines[name]['caption']} Paper columns are the published "
             f"numbers (`baselines/paper.json`); Δ = measured − paper, in points. All figures are accuracies in %. "
             f"Paper attack: {baselines['attack']}.", ""]
    if rows:
        res = {r: s["result"] for r, s in rows.items()}
        wall = sum(r["wall_seconds"] for r in res.values())
        train = sum(r.get("train_log", {}).get("train_seconds", 0.0) for r in res.values())
        lines += [
            f"- dataset: {_setting(res, lambda r: r['dataset'])} (sha256 "
            f"{_setting(res, lambda r: r['dataset_sha256'][:12])})",
            f"- clean accuracy (ε = 0): the full test set, {_setting(res, lambda r: r['n_clean'])} images",
            f"- n-test: {_setting(res, lambda r: r['n_test'])} (the first test images, attacked)",
            f"- epochs: {_setting(rows, lambda s: s['settings']['epochs'])}; "
            f"seed: {_setting(rows, lambda s: s['settings']['seed'])}; "
            f"k: {_setting(rows, lambda s: s['settings']['config']['k'])}",
            f"- attacks: {_setting(rows, _attack_text)}; ε = 8/255, 16/255; attack loss of k-NN models: "
            f"{_setting(rows, lambda s: s['settings']['surrogate'])} surrogate (CE for logit-head models)",
            f"- device: {_setting(res, lambda r: r['device'])}",
            f"- versions: {_setting(res, lambda r: _versions_text(r['versions']))}",
            f"- wall time: {wall:.0f} s summed over the rows' benchmark runs (including training where the model "
            f"was not cached; recorded training time of the models: {train:.0f} s)",
        ]
        rejected = sorted({a for r in res.values() for a in r.get("rejected_attacks", [])})
        if rejected:
            lines.append(f"- REJECTED (examples outside the threat model, cells '–'): {', '.join(rejected)}")
        reused = [f"{r} (from {s['reused_from']})" for r, s in rows.items() if s.get("reused_from")]
        if reused:
            lines.append(f"- reused results of the same model and settings: {', '.join(reused)}")
    lines.append(f"- missing rows (not computed yet; `{spec.command}` computes them): {', '.join(missing)}"
                 if missing else "- all measured rows computed")
    if name == "table1":
        lines.append(f"- source: '{REPORTED}' rows are the paper's figures for other methods, never measured here")
    return lines + [""]


def render_table(name: str, out_dir: str | os.PathLike = "tables") -> Path:
    """Write ``<name>.md``, ``.csv`` and ``.tex`` from the stored row JSONs and the paper's numbers only."""
    baselines = load_baselines()
    df = table_frame(name, out_dir, baselines)
    header = header_lines(name, stored_rows(name, out_dir), baselines)
    shown = display_frame(df)
    out = Path(out_dir)
    table = shown.to_markdown(index=False, disable_numparse=True, colalign=alignment(shown))
    write_text(out / f"{name}.md", "\n".join(header) + "\n" + table + "\n")
    write_text(out / f"{name}.csv", df.to_csv(index=False))
    write_text(out / f"{name}.tex", to_latex(shown, header))
    return out / f"{name}.md"
