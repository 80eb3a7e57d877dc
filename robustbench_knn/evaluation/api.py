"""``benchmark()``: RobustBench's one-liner for k-NN defenses, embedding defenses and plain classifiers.

    from robustbench_knn import KNNDefense, benchmark
    defense = KNNDefense(my_embedding, train_labels, bank_images=train_images, k=50)
    clean_acc, robust_acc = benchmark(defense, n_examples=1000, eps=8/255)

Every figure is judged by the model's ``predict`` (the hard vote of a k-NN defense); surrogate logits only
guide the attacks. Accuracies are in % (as in RobustBench's model cards; its ``benchmark()`` returns fractions).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from ..attacks import AttackSpec, default_attacks, parse_attack_list
from ..attacks.transfer import trained_sources, transfer_sources
from ..config import UsageError, get_model_config
from ..defenses.defense import BaseClassifier, KNNDefense, as_classifier
from ..norms import parse_norm
from ..store import write_json
from .cards import annotate_reliability, card_of, model_card
from .evaluate import provenance, run_attacks, versions
from .experiment import DATASET_NAME, cell_dir, defense_cells

__all__ = ["BenchmarkResult", "benchmark", "model_card", "require_knn", "suite_note"]

# Attacks that read the k-NN bank (they need a KNNDefense); the others only need logits.
NEEDS_BANK = {"native:feature", "native:softknn-apgd", "native:softknn-apgd-dlr", "native:vote-square"}


@dataclass
class BenchmarkResult:
    """What ``benchmark()`` measured. ``clean_acc, robust_acc = result`` unpacks like RobustBench's."""

    name: str
    eps: float
    n_examples: int
    clean_acc: float  # % of the n_examples the decision gets right
    robust_acc: float  # % right under every attack: the per-sample worst case
    per_attack: dict[str, float]  # attack key → robust accuracy (%)
    raw: dict[str, Any] = field(repr=False)  # settings, versions and run_attacks' per-sample results

    def __iter__(self) -> Iterator[float]:
        return iter((self.clean_acc, self.robust_acc))

    def to_frame(self) -> pd.DataFrame:
        """One row per attack, then the worst case."""
        cells = self.raw["per_eps"][0]["attacks"]
        rows = [{"attack": k, "robust_acc": c.get("robust_acc"), "invalid": c.get("n_invalid", 0), "seconds": c["seconds"],
                 "zero_grad_frac": c["zero_or_nonfinite_grad_frac"],
                 "surrogate_only": c["surrogate_fooled_decision_right"]} for k, c in cells.items()]
        rows.append({"attack": "worst case", "robust_acc": self.robust_acc})
        return pd.DataFrame(rows)

    def per_sample(self) -> pd.DataFrame:
        """Per test image: label, clean decision right, robust under each attack and under all of them."""
        r = self.raw
        cells = r["per_eps"][0]["attacks"]
        df = pd.DataFrame({"index": range(r["n"]), "label": r["labels"], "clean_correct": r["clean_correct"]})
        for k, c in cells.items():
            df[f"robust {k}"] = c.get("robust")
        df["robust worst case"] = r["per_eps"][0]["worst_case_robust"]
        return df

    @property
    def unreliable(self) -> bool:
        """True when a cheap check of this run failed, or its worst case lies above the bound of an audit of the
        same model, ε and images (beyond the binomial tolerance)."""
        return bool(self.raw["per_eps"][0]["unreliable"])

    def model_card(self) -> dict[str, Any]:
        """RobustBench's ``model_info`` fields, with the per-sample worst case in place of ``autoattack_acc`` and
        ``unreliable`` from an audit of the same model and ε, else from this run's cheap checks."""
        return card_of(self.name, self.raw["dataset"], self.raw["per_eps"][0], self.n_examples, self.raw.get("backbone"),
                       self.raw.get("threat_model", "Linf"))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """``<name>.json`` (everything), ``<name>.csv`` (per sample) and ``<name>.model-card.json``; ``<name>-L2.*``
        for the ℓ2 threat model, so both results of one defense can share a folder (as the CLI's files do)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        norm = self.raw.get("threat_model", "Linf")
        stem = self.name if norm == "Linf" else f"{self.name}-{norm}"
        write_json(out / f"{stem}.json", {"clean_acc": self.clean_acc, "robust_acc": self.robust_acc,
                                          "per_attack": self.per_attack, **self.raw})
        self.per_sample().to_csv(out / f"{stem}.csv", index=False)
        write_json(out / f"{stem}.model-card.json", self.model_card())
        return out / f"{stem}.json"


def require_knn(specs: Sequence[AttackSpec], clf: BaseClassifier) -> None:
    """The adaptive k-NN attacks read a bank: refuse them on a plain classifier before any work."""
    needs = [s.key for s in specs if s.key in NEEDS_BANK]
    if needs and not isinstance(clf, KNNDefense):
        raise UsageError(f"{', '.join(needs)} attack(s) a k-NN vote; this model is a plain classifier "
                         f"(wrap an embedding in KNNDefense, or leave them out)")


def resolve_attacks(attacks: str | Sequence[str], clf: BaseClassifier) -> list[AttackSpec]:
    """Attack names or groups → specs; ``"default"`` is the default suite for this kind of model."""
    text = attacks if isinstance(attacks, str) else ",".join(attacks)
    text = ",".join(default_attacks(isinstance(clf, KNNDefense)) if n.strip() == "default" else n
                    for n in text.split(","))
    specs = parse_attack_list(text)
    require_knn(specs, clf)
    return specs


def suite_note(families: dict[str, str], is_knn: bool) -> str | None:
    """One line when a k-NN defense's worst case comes from surrogate-guided attacks only (what it is, and how to
    get the audited figure); None when the suite has an adaptive or gradient-free attack."""
    adaptive = any(k in NEEDS_BANK or f in ("gradient-free", "transfer") for k, f in families.items())
    if not is_knn or adaptive:
        return None
    return ("Note: this worst case is an upper bound from surrogate-guided attacks only; the default suite "
            "(leave out --attacks) adds attacks on the k-NN vote itself, and `robustbench-knn audit` gives the "
            "audited figure.")


def benchmark(model: Any, *, n_examples: int = 1000, eps: float = 8 / 255, attacks: str | Sequence[str] = "default",
              data_dir: str | None = None, device: str = "auto", out: str | os.PathLike | None = None,
              seed: int = 0, name: str | None = None, batch_size: int = 250, cache_dir: str | None = None,
              progress: bool = True, resume: bool = True, cascade: bool = False, threat_model: str = "Linf"
              ) -> BenchmarkResult:
    """Clean and robust accuracy of ``model`` on the first ``n_examples`` CIFAR-10 test images within ``eps`` in
    ``threat_model`` ("Linf", default, or "L2", RobustBench's spelling; ε in pixel units of that norm: 8/255, 0.5).

    ``model``: a ``KNNDefense``, any ``nn.Module`` returning class logits, or one of this project's model names
    (``"full"``: trained or loaded from the cache). ``attacks``: ``"default"`` (on a k-NN defense the adaptive
    attacks on the vote and a gradient-free one, on a logit classifier AutoAttack standard), or names and groups
    as on the command line (``"standard"``, ``"adaptive"``, ``"all"``, ``"kfgsm,aa:apgd"``); the adaptive k-NN
    attacks need a ``KNNDefense``; ``transfer`` crafts on Table 2's row A (trained once, cached). ``out``: also
    save JSON, per-sample CSV and a RobustBench-style model card there. ``resume``: finished attack cells are
    cached by the defense's weights, bank and settings and reused. ``cascade``: each attack runs only on
    the points the earlier ones left robust (the same worst case for less work; per-attack figures are then
    cumulative, "on survivors").
    """
    from ..data import load_cifar10
    from ..devices import resolve_device
    from ..paper.train import train_model
    from . import distributed

    norm = parse_norm(threat_model)
    if n_examples < 1 or not 0 < eps < (1 if norm == "Linf" else float("inf")):
        raise UsageError(f"n_examples must be >= 1 and eps {'in (0, 1)' if norm == 'Linf' else '> 0'}")
    part = distributed.current()
    if distributed.launched_by_torchrun() and not part.group:  # a script started by torchrun: the ranks split it
        part = distributed.init_group()  # first: it picks this rank's GPU, which "auto" then resolves to
    dev = resolve_device(device)
    data = load_cifar10(data_dir)
    target_cfg = get_model_config("full")
    if isinstance(model, str):
        from ..paper.classifier import build_classifier

        target_cfg = get_model_config(model)
        clf: BaseClassifier = build_classifier(train_model(target_cfg, data, device=dev, cache_dir=cache_dir,
                                                           progress=progress))
        name = name or target_cfg.name
    else:
        clf = as_classifier(model)
        name = name or type(model).__name__
    specs = resolve_attacks(attacks, clf)
    for spec in specs:
        spec.check_norm(norm)
    clf = clf.to(dev)
    sub = data.test.head(min(n_examples, len(data.test)))
    x, y = sub.floats(), sub.y
    t0 = time.perf_counter()
    cells = None
    if resume:
        cells = (cell_dir(target_cfg, _tag(clf), data.sha256, cache_dir) if isinstance(model, str)
                 else defense_cells(clf, data.sha256, cache_dir))
    sources = trained_sources(data, target_cfg=target_cfg if isinstance(model, str) else None, cache_dir=cache_dir,
                              device=dev, progress=progress)
    with transfer_sources(sources), distributed.use(part):
        res = run_attacks(clf, x, y, specs, [float(eps)], batch_size=batch_size, progress=progress and part.writer,
                          seed=seed, cell_dir=cells, cascade=cascade, norm=norm)
    annotate_reliability(res, clf, x[:batch_size].to(dev), cells)
    cell = res["per_eps"][0]
    raw = {"name": name, "dataset": DATASET_NAME, "dataset_sha256": data.sha256, "eps": float(eps), "seed": seed,
           "device": str(dev), "versions": versions(), **provenance(dev), "attacks": [s.key for s in specs],
           "labels": y.tolist(),
           "processes": part.world if part.group else 1, "surrogate": getattr(clf, "surrogate_name", "logits"),
           "backbone": getattr(clf, "backbone", None),
           "aligned": getattr(clf, "aligned", None),
           "note": suite_note(cell["families"], isinstance(clf, KNNDefense)),
           "wall_seconds": round(time.perf_counter() - t0, 1), **res}
    result = BenchmarkResult(
        name=name, eps=float(eps), n_examples=len(x), clean_acc=cell["clean_acc"],
        robust_acc=cell["worst_case_acc"],
        per_attack={k: c["robust_acc"] for k, c in cell["attacks"].items()}, raw=raw)
    if out is not None and part.writer:
        result.save(out)
    return result


def _tag(clf: BaseClassifier) -> str:
    """The cell folder's tag of a model of this project: its surrogate, and whether its logits are aligned."""
    return getattr(clf, "surrogate_name", "logits") + ("" if getattr(clf, "aligned", True) else "-unaligned")
