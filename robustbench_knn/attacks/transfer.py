"""``transfer``: adversarial examples crafted on another model (the *source*) and evaluated on the target.

If these beat the white-box attacks, the target's own gradients are masked (Carlini et al. 2019, §5).
The attack itself never sees the target's gradients or votes. The source is a model name from
``config.MODELS`` (Table 2's row ``a``, the CE baseline, by default) built by a *source provider*:
``benchmark``/``audit`` install one that trains or loads it on the same data (:func:`trained_sources`);
tests install one that returns a tiny model. Without a provider the attack refuses to run rather than
silently doing something else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ..config import MODELS, ExperimentConfig, UsageError, get_model_config
from .apgd_core import apgd
from .base import Attack, get_attack, input_gradient, register

# (source model name, training seed or None, target classifier) -> a classifier from paper/classifier.py
SourceProvider = Callable[[str, "int | None", torch.nn.Module], torch.nn.Module]

_PROVIDER: list[SourceProvider | None] = [None]
# target -> {(source name, seed): source}; keyed by the target itself, weakly: an id() key handed a freed target's
# source to the next target allocated at its address
_BUILT: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, int | None], torch.nn.Module]] = (
    weakref.WeakKeyDictionary())


def set_source_provider(provider: SourceProvider | None) -> None:
    """Install (or remove, with None) the function that builds transfer sources; forgets built sources."""
    _PROVIDER[0] = provider
    _BUILT.clear()


@contextmanager
def transfer_sources(provider: SourceProvider) -> Iterator[None]:
    """``with transfer_sources(p): run_attacks(...)`` — the provider is active inside the block only."""
    previous = _PROVIDER[0]
    set_source_provider(provider)
    try:
        yield
    finally:
        set_source_provider(previous)


def get_source(name: str, seed: int | None, target: torch.nn.Module) -> torch.nn.Module:
    """The source classifier for (name, seed), built once per target by the installed provider."""
    if _PROVIDER[0] is None:
        raise UsageError("attack transfer needs a source model: run it through `robustbench-knn audit`, or install "
                         "a provider with robustbench_knn.attacks.transfer.transfer_sources(...)")
    built = _BUILT.setdefault(target, {})
    if (name, seed) not in built:
        built[name, seed] = _PROVIDER[0](name, seed, target)
    return built[name, seed]


def _delta(cfg: ExperimentConfig, base: ExperimentConfig, section: str) -> dict[str, Any]:
    """The fields of ``section`` in which ``cfg`` differs from ``base``, with ``cfg``'s values."""
    a, b = getattr(cfg, section), getattr(base, section)
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def source_config(target: ExperimentConfig, name: str, seed: int | None) -> ExperimentConfig:
    """Table 2 row ``name`` at the target's size and training budget: the target's config with the architecture
    of the row it was made from (by its name; FULL for another name) taken back to FULL's where the target kept
    it, then the fields in which row ``name`` differs from FULL. The rows differ from FULL in architecture
    (identity init, shared decoders, head) and budget (epochs), never in size; so row A audited with row B's
    transfer gets row B itself, FULL at 100 epochs a 100-epoch row A, a gate-sized FULL a gate-sized row.
    ``seed`` None keeps the target's seed unless that would rebuild the target itself, in which case seed + 1 is
    used (a transfer never comes from the attacked weights)."""
    row, full = get_model_config(name), get_model_config("full")
    own = MODELS.get(target.name.lower(), full)
    size = target.replace(model={f: getattr(full.model, f) for f, v in _delta(own, full, "model").items()
                                 if getattr(target.model, f) == v})
    cfg = size.replace(name=name, model=_delta(row, full, "model"), train=_delta(row, full, "train"))
    if seed is not None:
        return cfg.replace(train={"seed": int(seed)})
    if cfg.config_hash() == target.config_hash():
        return cfg.replace(train={"seed": target.train.seed + 1})
    return cfg


def trained_sources(data: Any, *, target_cfg: ExperimentConfig | None = None, cache_dir: str | None = None,
                    device: str | torch.device = "auto", progress: bool = False) -> SourceProvider:
    """A provider that trains (or loads from the cache) the source on ``data`` with :func:`source_config`,
    relative to ``target_cfg`` (default: the target classifier's own ``cfg``; for a defense without one, a
    user's or a logit model, FULL's: the source is then Table 2's row A at the paper's size)."""
    from ..paper.classifier import build_classifier
    from ..paper.train import train_model

    def provide(name: str, seed: int | None, target: torch.nn.Module) -> torch.nn.Module:
        base = target_cfg or getattr(target, "cfg", None) or get_model_config("full")
        cfg = source_config(base, name, seed)
        return build_classifier(train_model(cfg, data, device=device, cache_dir=cache_dir, progress=progress))

    return provide


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def shared_weights(source: torch.nn.Module, target: torch.nn.Module, min_numel: int = 1024) -> str | None:
    """The name of a learned weight tensor (a parameter of at least ``min_numel`` values, not constant) that
    ``source`` and ``target`` hold with the same values, or None. Compares values, not configs: a transfer must
    never come from the attacked weights. Buffers (normalisation statistics, banks) and constant tensors (a
    zero-initialised branch) are the same in unrelated models, so they are left out."""
    def learned(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: t for k, t in m.named_parameters() if t.numel() >= min_numel and bool((t != t.flatten()[0]).any())}

    src = {_tensor_digest(t): k for k, t in learned(source).items()}
    shapes = {tuple(t.shape) for t in learned(source).values()}
    for t in learned(target).values():
        if tuple(t.shape) in shapes and (name := src.get(_tensor_digest(t))):
            return name
    return None


@register("transfer", "native", {"source": "a", "source_seed": None, "craft": "apgd", "steps": 100},
          "adaptive: transfer from another model (source = a config.MODELS row at the target's size; "
          "crafted with APGD-CE on its logits or kfgsm on its objective)")
class Transfer(Attack):
    name = "transfer"
    family = "transfer"
    gradient_source = None  # the target's gradients are never used

    def __init__(self, model: torch.nn.Module, eps: float, **params: Any) -> None:
        super().__init__(model, eps, **params)
        if params["craft"] not in ("apgd", "kfgsm"):
            raise UsageError("transfer.craft must be 'apgd' or 'kfgsm'")
        get_model_config(str(params["source"]))  # a clear error for an unknown name before any work
        seed = params["source_seed"]
        self.source = get_source(str(params["source"]), None if seed is None else int(seed), model)
        shared = shared_weights(self.source, model)
        if shared:
            raise UsageError(f"transfer: the source {params['source']!r} shares weights with the attacked defense "
                             f"({shared}): that is a white-box attack, not a transfer; choose another source or "
                             f"source_seed")

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        steps = int(self.params["steps"])
        if self.params["craft"] == "kfgsm":
            return get_attack("native:kfgsm").build(self.source, self.eps, self.norm, steps=steps)(x, y)

        def loss_grad(z: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
            seen: dict[str, torch.Tensor] = {}

            def ce(u: torch.Tensor) -> torch.Tensor:
                seen["loss"] = out = F.cross_entropy(self.source(u), y[idx], reduction="none")
                return out

            grad = input_gradient(ce, z)
            return seen["loss"].detach(), grad, None

        return apgd(loss_grad, x.detach(), self.eps, steps, norm=self.norm)
