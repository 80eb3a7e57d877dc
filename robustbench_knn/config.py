"""The one place for defaults: the paper's hyper-parameters (§3.1) and the recipe choices it leaves open.

Every experiment is an :class:`ExperimentConfig`; its hash names the cached checkpoint, so any change of
a setting trains a new model instead of silently reusing an old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence


class UsageError(ValueError):
    """Bad user input: reported as one line on stderr with exit code 2 by the CLI."""


NORMALIZATIONS = ("image", "position")
REG_REDUCTIONS = ("sum", "mean", "mean2")  # regulariser ÷1 (as printed), ÷B, ÷B² (losses.exp_contrastive_loss)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture (§2.2). Defaults are the paper's FULL model."""

    w_r: int = 2048  # width of the "rest" part of the state
    n_spaces: int = 2  # N_S
    d: int = 15  # dimension of each embedding space
    n_dec: int = 3  # Dec_1..Dec_3
    identity_init: bool = True  # IdRes layers (zero-init residual branch) vs plain random-init dense layers
    share_dec: bool = True  # Dec_1..3 share one set of parameters
    head: str = "embedding"  # "embedding" (exp-contrastive + k-NN) or "logits" (10 classes, cross-entropy)
    branch_depth: int = 1  # dense layers per residual branch: f(x) = W·relu(x) + b for depth 1
    ots_activation: str = "none"  # activation after OtS: "none" or "relu" (the paper does not say)
    # §3.1 "normalize each image (to μ = 0, σ = 1) pixelwise" has two readings (see model.IdResNet.normalise):
    # "image" standardises each image over its own 3072 values; "position" uses the training set's mean and
    # std per pixel position and channel. "image" won the 20-epoch search (tables/recipe_search.md).
    normalization: str = "image"
    n_classes: int = 10

    @property
    def w_p(self) -> int:
        """W_P = N_S·d, the embedding width."""
        return self.n_spaces * self.d

    @property
    def out_dim(self) -> int:
        return self.w_p if self.head == "embedding" else self.n_classes

    def validate(self) -> None:
        if self.head not in ("embedding", "logits"):
            raise UsageError(f"head must be 'embedding' or 'logits', not {self.head!r}")
        if self.normalization not in NORMALIZATIONS:
            raise UsageError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {self.normalization!r}")
        if self.ots_activation not in ("none", "relu"):
            raise UsageError(f"ots_activation must be 'none' or 'relu', not {self.ots_activation!r}")
        if min(self.w_r, self.n_spaces, self.d, self.n_dec, self.branch_depth) < 1:
            raise UsageError("model widths, depths and counts must be >= 1")


@dataclass(frozen=True)
class LossConfig:
    """Exponential contrastive loss constants (§2.1, §3.1)."""

    lam: float = 0.5  # λ
    l0: float = 7.0  # l_0
    k_mu: float = 0.25  # Kμ
    # "sum" is the regulariser as printed, "mean" divides it by B, "mean2" by B²; see losses.exp_contrastive_loss.
    # "mean2": the best recipe of the 20-epoch search (tables/recipe_search.md).
    reg_reduction: str = "mean2"


@dataclass(frozen=True)
class TrainConfig:
    """Training. epochs, batch size and noise are the paper's; optimiser and schedule are the paper's open choices."""

    epochs: int = 20
    batch_size: int = 2048
    noise: bool = True  # Δ = 2X−5, X ~ Binomial(5, 0.5), on the normalised image, training only
    optimizer: str = "adam"  # adam | adamw | sgd
    # The 20-epoch search's best validation accuracy (tables/recipe_search.md, all ten rows on one H100):
    # image_1e-3_mean2 49.10%, image_3e-4_mean2 48.96% (a 2-row CPU search had chosen 3e-4 before).
    lr: float = 1e-3
    schedule: str = "constant"  # constant | cosine | onecycle
    warmup_frac: float = 0.0  # fraction of steps with linear warm-up (cosine/onecycle)
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    seed: int = 0
    val_size: int = 0  # hold out the last val_size training images (for the recipe search; never the test set)
    n_train: int | None = None  # use only the first n_train training images (tests, CI gate)
    trained: bool = True  # False: keep the initialisation (§3.5 "untrained")

    def validate(self) -> None:
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise UsageError(f"optimizer must be adam, adamw or sgd, not {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine", "onecycle"):
            raise UsageError(f"schedule must be constant, cosine or onecycle, not {self.schedule!r}")
        if self.epochs < 0 or self.batch_size < 2 or self.lr <= 0:
            raise UsageError("epochs must be >= 0, batch size >= 2 and lr > 0")


@dataclass(frozen=True)
class ExperimentConfig:
    """A trainable model: architecture + loss + training + k-NN."""

    name: str = "full"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    k: int = 800  # k of the k-NN vote

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        return cls(
            name=d["name"],
            model=ModelConfig(**d["model"]),
            loss=LossConfig(**d["loss"]),
            train=TrainConfig(**d["train"]),
            k=d["k"],
        )

    def config_hash(self) -> str:
        """Hash of everything that changes the trained weights (not the name, not k: k only affects voting)."""
        d = self.to_dict()
        d.pop("name")
        d.pop("k")
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def replace(self, **sections: Any) -> "ExperimentConfig":
        """Copy with some fields of the sections changed: replace(train={"epochs": 2}, k=5)."""
        kw: dict[str, Any] = {}
        for key, val in sections.items():
            if isinstance(val, dict):
                kw[key] = dataclasses.replace(getattr(self, key), **val)
            else:
                kw[key] = val
        return dataclasses.replace(self, **kw)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        if self.loss.reg_reduction not in REG_REDUCTIONS:
            raise UsageError(f"reg_reduction must be one of {', '.join(REG_REDUCTIONS)}, "
                             f"not {self.loss.reg_reduction!r}")
        if self.k < 1:
            raise UsageError("k must be >= 1")


def parse_value(text: str) -> Any:
    """A command-line value as JSON when it parses (numbers, true, null), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _typed_value(key: str, annotation: Any, text: str) -> Any:
    """``text`` parsed (``parse_value``) and checked against the setting's type (``int``, ``float``, ``bool``,
    ``str``, ``int | None``), so ``k=abc`` or ``train.epochs=2.5`` is a usage error, not a crash later. Values are
    kept as parsed (an int for a float setting stays an int), so config hashes do not change."""
    val = parse_value(text)
    allowed = {t.strip() for t in str(annotation).split("|")}
    if "str" in allowed:
        return val if isinstance(val, str) else text
    if val is None and "None" in allowed:
        return None
    if isinstance(val, bool):
        if "bool" in allowed:
            return val
    elif isinstance(val, int) and allowed & {"int", "float"}:
        return val
    elif isinstance(val, float) and "float" in allowed:
        if val != val or val in (float("inf"), float("-inf")):
            raise UsageError(f"--set {key}={text}: the value must be a finite number")
        return val
    if not allowed <= {"int", "float", "bool", "None"}:  # a type this check does not know: as parsed
        return val
    want = " or ".join({"int": "an integer", "float": "a number", "bool": "true or false", "None": "null"}[t]
                       for t in ("int", "float", "bool", "None") if t in allowed)
    raise UsageError(f"--set {key}={text}: {key} must be {want}")


def apply_overrides(cfg: ExperimentConfig, sets: Sequence[str]) -> ExperimentConfig:
    """``--set section.field=value`` (e.g. train.lr=1e-4, model.w_r=64, k=5); every value is checked against
    the setting's type before the config is built (bad input: ``UsageError``)."""
    sections: dict[str, Any] = {}
    top = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    for item in sets:
        key, sep, val = item.partition("=")
        if not sep:
            raise UsageError(f"--set needs key=value, got {item!r}")
        section, _, name = key.partition(".")
        if name:
            if section not in ("model", "loss", "train") or name not in getattr(cfg, section).__dataclass_fields__:
                raise UsageError(f"unknown setting {key!r}")
            field_ = getattr(cfg, section).__dataclass_fields__[name]
            sections.setdefault(section, {})[name] = _typed_value(key, field_.type, val)
        elif section == "k":
            sections["k"] = _typed_value(key, top["k"].type, val)
        else:
            raise UsageError(f"unknown setting {key!r}")
    out = cfg.replace(**sections)
    out.validate()
    return out


# The standard attack suite of the cross-toolkit table, roughly cheapest first (a partial run covers the most).
STANDARD_SUITE = ("kfgsm", "pgd", "apgd", "apgd-dlr", "apgd-t", "fab-t", "square", "autoattack")


def _rows() -> dict[str, ExperimentConfig]:
    """Table 2 rows (§3.4) and §3.5. A and B are the 5-layer CE baselines."""
    base = ExperimentConfig()
    plain = {"identity_init": False}
    return {
        "full": base,
        # A labelled variant that relaxes one stated setting (issue 11): FULL at 100 epochs instead of the paper's 20.
        # Shown beside FULL in Table 1, never in place of it.
        "full-100ep": base.replace(name="full-100ep", train={"epochs": 100}),
        "e": base.replace(name="e", model={"share_dec": False}),
        "d": base.replace(name="d", model={**plain, "share_dec": True}),
        "c": base.replace(name="c", model={**plain, "share_dec": False}),
        "b": base.replace(name="b", model={"share_dec": False, "head": "logits"}),
        "a": base.replace(name="a", model={**plain, "share_dec": False, "head": "logits"}),
        # §3.5: random OtS, identity-initialised Dec/CL, no training, k-NN.
        "untrained": base.replace(name="untrained", train={"trained": False}),
        # §3.5 comparison: a random 5-layer MLP of width 2078 with a 10-class head, untrained.
        "untrained-mlp": base.replace(
            name="untrained-mlp", model={**plain, "share_dec": False, "head": "logits"}, train={"trained": False}
        ),
    }


MODELS: dict[str, ExperimentConfig] = _rows()


def get_model_config(name: str) -> ExperimentConfig:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
