"""Training loop (compact, airbench-style): whole data set on the device, one shuffled pass per epoch.

Checkpoints are cached by config hash and data set (safetensors + JSON) and training resumes from the last
finished epoch after an interruption.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..data import CIFAR10, Split, pixel_stats, to_float
from ..devices import machine_name, resolve_device
from ..store import (
    load_meta,
    load_tensors,
    model_dir,
    optimizer_tensors,
    read_json,
    restore_optimizer,
    save_tensors,
    write_json,
)
from .losses import exp_contrastive_loss
from .model import IdResNet


def fit_split(data: CIFAR10, cfg: ExperimentConfig) -> tuple[Split, Split | None]:
    """The images the model is trained on (and whose embeddings form the k-NN bank), and the held-out val split."""
    t = cfg.train
    x, y = data.train.x, data.train.y
    val = None
    if t.val_size:
        if t.val_size >= len(y):
            from ..config import UsageError

            raise UsageError(f"val_size={t.val_size} leaves no training data")
        val = Split(x[-t.val_size:], y[-t.val_size:])
        x, y = x[:-t.val_size], y[:-t.val_size]
    if t.n_train:
        x, y = x[: t.n_train], y[: t.n_train]
    return Split(x, y), val


def objective(net: IdResNet, cfg: ExperimentConfig, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if cfg.model.head == "logits":
        return F.cross_entropy(out, y)
    lc = cfg.loss
    return exp_contrastive_loss(out, y, n_spaces=cfg.model.n_spaces, lam=lc.lam, l0=lc.l0, k_mu=lc.k_mu,
                                n_classes=cfg.model.n_classes, reg_reduction=lc.reg_reduction)


def _optimizer(net: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in net.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, total: int, schedule: str, warmup_frac: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total`` steps."""
    if schedule == "constant" or total <= 1:
        return 1.0
    frac = step / total
    if schedule == "onecycle":
        peak = max(warmup_frac, 1e-9)
        return frac / peak if frac < peak else max(0.0, (1 - frac) / (1 - peak))
    warm = warmup_frac  # cosine with optional linear warm-up
    if frac < warm:
        return (frac + 1 / total) / warm
    return 0.5 * (1 + math.cos(math.pi * (frac - warm) / max(1e-9, 1 - warm)))


@dataclass
class TrainedModel:
    cfg: ExperimentConfig
    net: IdResNet
    train_split: Split
    val_split: Split | None
    log: dict[str, Any]
    path: Path
    from_cache: bool = False  # loaded as finished, not trained (or resumed) by this call


def _init_net(cfg: ExperimentConfig, fit: Split, device: torch.device) -> IdResNet:
    torch.manual_seed(cfg.train.seed)
    if cfg.model.normalization == "image":  # per-image standardisation needs no data statistics
        return IdResNet(cfg.model).to(device)
    mean, std = pixel_stats(fit.x)
    return IdResNet(cfg.model, mean, std).to(device)


def train_model(
    cfg: ExperimentConfig,
    data: CIFAR10,
    *,
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> TrainedModel:
    """Load the cached model for ``cfg``, or train it (resuming from the last finished epoch). Processes that
    want the same model (torchrun ranks, shards on a shared disk) take turns on a file lock: the first trains,
    the others load what it wrote."""
    from filelock import FileLock

    cfg.validate()
    path = model_dir(cfg, cache_dir, data.sha256)  # keyed by config and data: never another data set's model
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{cfg.name}-{cfg.config_hash()}-{data.sha256[:8]}.lock")):
        return _load_or_train(cfg, data, resolve_device(device), model_dir(cfg, cache_dir, data.sha256), progress)


def _check_trained_on(log: dict[str, Any], data: CIFAR10, path: Path) -> None:
    """A cached model (or checkpoint) is only ever used for the data set its train log records."""
    recorded = log.get("dataset_sha256")
    if recorded != data.sha256:
        from ..config import UsageError

        raise UsageError(f"the cached model {path} was trained on the data set with sha256 {recorded}, not on this "
                         f"one ({data.sha256}); it is not used for other data: delete that folder to retrain it")


def _load_or_train(cfg: ExperimentConfig, data: CIFAR10, dev: torch.device, path: Path,
                   progress: bool) -> TrainedModel:
    fit, val = fit_split(data, cfg)
    final = path / "weights.safetensors"
    net = _init_net(cfg, fit, dev)
    if final.is_file() and (path / "train_log.json").is_file():  # both, or it is retrained
        log = read_json(path / "train_log.json")
        _check_trained_on(log, data, path)
        net.load_state_dict(load_tensors(final, dev))
        return TrainedModel(cfg, net, fit, val, log, path, from_cache=True)

    t = cfg.train
    log: dict[str, Any] = {"config": cfg.to_dict(), "config_hash": cfg.config_hash(), "dataset_sha256": data.sha256,
                           "n_fit": len(fit), "epochs": [], "device": str(dev), "machine": machine_name(dev),
                           "train_seconds": 0.0}
    opt = _optimizer(net, cfg)
    gen = torch.Generator(device=dev).manual_seed(t.seed + 1)
    partial = path / "partial.safetensors"
    start_epoch = 0
    if partial.is_file() and t.trained:  # resume: weights, optimizer state, RNG state, log
        meta = load_meta(partial)
        _check_trained_on(meta["log"], data, path)
        tensors = load_tensors(partial, dev)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        restore_optimizer(opt, {k: v for k, v in tensors.items() if k.startswith("opt.")}, meta)
        gen.set_state(tensors["rng"].cpu())
        log, start_epoch = meta["log"], meta["epoch"]

    steps_per_epoch = math.ceil(len(fit) / t.batch_size)
    total = steps_per_epoch * t.epochs
    x_all = fit.x.to(dev)
    y_all = fit.y.to(dev)
    net.train()
    epochs = range(start_epoch, t.epochs if t.trained else 0)
    bar = tqdm(epochs, desc=f"train {cfg.name}", disable=not progress, unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        perm = torch.randperm(len(fit), generator=gen, device=dev)
        total_loss = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * t.batch_size:(s + 1) * t.batch_size]
            out = net(to_float(x_all[idx]), noise=t.noise, generator=gen)
            loss = objective(net, cfg, out, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:  # set from the global step, so a resumed run continues the schedule
                group["lr"] = t.lr * lr_factor(epoch * steps_per_epoch + s, total, t.schedule, t.warmup_frac)
            opt.step()
            total_loss += loss.item()
        secs = time.perf_counter() - t0
        log["epochs"].append({"epoch": epoch + 1, "loss": total_loss / steps_per_epoch, "seconds": secs})
        log["train_seconds"] += secs
        bar.set_postfix(loss=f"{total_loss / steps_per_epoch:.4f}")
        if epoch + 1 < t.epochs:
            opt_t, opt_meta = optimizer_tensors(opt)
            tensors = {**{f"net.{k}": v for k, v in net.state_dict().items()}, **opt_t, "rng": gen.get_state()}
            save_tensors(partial, tensors, meta={**opt_meta, "epoch": epoch + 1, "log": log})
    net.eval()
    write_json(path / "config.json", cfg.to_dict())
    write_json(path / "train_log.json", log)
    save_tensors(final, net.state_dict())  # last: its presence marks a finished model
    partial.unlink(missing_ok=True)
    return TrainedModel(cfg, net, fit, val, log, path)
