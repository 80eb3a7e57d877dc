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

from ..attacks import AttackSpec, parse_attack_list
from ..attacks.transfer import transfer_sources, trained_sources
from ..config import UsageError, get_model_config
from ..defenses.defense import BaseClassifier, KNNDefense, as_classifier
from ..store import write_json
from .evaluate import run_attacks, versions
from .experiment import DATASET_NAME, _eps_label

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
        rows = [{"attack": k, "robust_acc": c.get("robust_acc"), "valid": c["valid"], "seconds": c["seconds"],
                 "zero_grad_frac": c["zero_or_nonfinite_grad_frac"],
                 "surrogate_only": c["surrogate_fooled_decision_right"]} for k, c in cells.items()]
        rows.append({"attack": "worst case", "robust_acc": self.robust_acc, "valid": True})
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

    def model_card(self) -> dict[str, Any]:
        """RobustBench's ``model_info`` fields, with the per-sample worst case in place of ``autoattack_acc``."""
        return model_card(self.name, self.raw["dataset"], self.eps, self.clean_acc, self.robust_acc,
                          self.per_attack, self.n_examples)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """``<name>.json`` (everything), ``<name>.csv`` (per sample) and ``<name>.model-card.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{self.name}.json", {"clean_acc": self.clean_acc, "robust_acc": self.robust_acc,
                                               "per_attack": self.per_attack, **self.raw})
        self.per_sample().to_csv(out / f"{self.name}.csv", index=False)
        write_json(out / f"{self.name}.model-card.json", self.model_card())
        return out / f"{self.name}.json"


def model_card(name: str, dataset: str, eps: float, clean_acc: float, robust_acc: float,
               per_attack: dict[str, float], n_examples: int, unreliable: bool | None = None,
               footnote: str | None = None) -> dict[str, Any]:
    """RobustBench's ``model_info`` fields (accuracies as strings in %, as there), with the per-sample worst case
    over every attack in place of ``autoattack_acc`` and the per-attack breakdown; ``unreliable`` comes from a
    masking audit's verdict (None: no audit was run)."""
    return {
        "name": name, "dataset": "cifar10", "dataset_detail": dataset, "threat_model": "Linf",
        "eps": _eps_label(eps),
        "clean_acc": f"{clean_acc:.2f}", "reported": None, "worst_case_robust_acc": f"{robust_acc:.2f}",
        "autoattack_acc": None, "unreliable": unreliable, "n_examples": n_examples,
        "footnote": footnote or ("Robust accuracy is the per-sample worst case over the attacks listed, judged by "
                                 "the model's own decision (the hard vote of a k-NN); no masking audit was run "
                                 "(`robustbench-knn audit`), so 'unreliable' is unknown."),
        "attacks": {k: f"{v:.2f}" for k, v in per_attack.items()},
    }


def require_knn(specs: Sequence[AttackSpec], clf: BaseClassifier) -> None:
    """The adaptive k-NN attacks read a bank: refuse them on a plain classifier before any work."""
    needs = [s.key for s in specs if s.key in NEEDS_BANK]
    if needs and not isinstance(clf, KNNDefense):
        raise UsageError(f"{', '.join(needs)} attack(s) a k-NN vote; this model is a plain classifier "
                         f"(wrap an embedding in KNNDefense, or leave them out)")


def _specs(attacks: str | Sequence[str], clf: BaseClassifier) -> list[AttackSpec]:
    specs = parse_attack_list(attacks if isinstance(attacks, str) else ",".join(attacks))
    require_knn(specs, clf)
    return specs


def benchmark(model: Any, *, n_examples: int = 1000, eps: float = 8 / 255, attacks: str | Sequence[str] = "standard",
              data_dir: str | None = None, device: str = "auto", out: str | os.PathLike | None = None,
              seed: int = 0, name: str | None = None, batch_size: int = 250, cache_dir: str | None = None,
              progress: bool = True) -> BenchmarkResult:
    """Clean and robust accuracy of ``model`` on the first ``n_examples`` CIFAR-10 test images at ℓ∞ ``eps``.

    ``model``: a ``KNNDefense``, any ``nn.Module`` returning class logits, or one of this project's model names
    (``"full"``: trained or loaded from the cache). ``attacks``: names or groups as on the command line
    (``"standard"``, ``"adaptive"``, ``"all"``, ``"kfgsm,aa:apgd"``); the adaptive k-NN attacks need a
    ``KNNDefense``, and ``transfer`` crafts on Table 2's row A at FULL's size (trained once, cached).
    ``out``: also save JSON, per-sample CSV and a RobustBench-style model card there.
    """
    from ..data import load_cifar10
    from ..devices import resolve_device
    from ..paper.train import train_model
    from . import distributed

    if n_examples < 1 or not 0 < eps < 1:
        raise UsageError("n_examples must be >= 1 and eps in (0, 1)")
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
    specs = _specs(attacks, clf)
    clf = clf.to(dev)
    sub = data.test.head(min(n_examples, len(data.test)))
    x, y = sub.floats(), sub.y
    t0 = time.perf_counter()
    sources = trained_sources(data, target_cfg=target_cfg, cache_dir=cache_dir, device=dev, progress=progress)
    with transfer_sources(sources), distributed.use(part):
        res = run_attacks(clf, x, y, specs, [float(eps)], batch_size=batch_size, progress=progress and part.writer,
                          seed=seed)
    cell = res["per_eps"][0]
    raw = {"name": name, "dataset": DATASET_NAME, "dataset_sha256": data.sha256, "eps": float(eps), "seed": seed,
           "device": str(dev), "versions": versions(), "attacks": [s.key for s in specs], "labels": y.tolist(),
           "processes": part.world if part.group else 1,
           "wall_seconds": round(time.perf_counter() - t0, 1), **res}
    result = BenchmarkResult(
        name=name, eps=float(eps), n_examples=len(x), clean_acc=cell["clean_acc"],
        robust_acc=cell["worst_case_acc"],
        per_attack={k: c["robust_acc"] for k, c in cell["attacks"].items() if c["valid"]}, raw=raw)
    if out is not None and part.writer:
        result.save(out)
    return result
