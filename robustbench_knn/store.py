"""Cache of trained models: safetensors + JSON, written atomically, loaded without executing pickled code."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ExperimentConfig

CACHE_ENV = "ROBUSTBENCH_KNN_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir or os.environ.get(CACHE_ENV):
        return Path(cache_dir or os.environ[CACHE_ENV]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("robustbench-knn"))


def model_dir(cfg: ExperimentConfig, cache_dir: str | os.PathLike | None = None,
              dataset_sha: str | None = None) -> Path:
    """``models/<name>-<config hash>-<data>``, ``<data>`` the first 8 hex digits of the training data set's
    sha256: the config hash leaves the data out, so the data is in the key and a model is only found for the
    data it was trained on (``train_model`` also checks the full hash its train log records). A finished model
    of the same config hash and data under another name is that model, so it is found and reused, not retrained.

    Without ``dataset_sha``: ``models/<name>-<config hash>``, the folder of caches from before the data was in
    the key (for callers that do not pass it yet; a model in it may have been trained on any data)."""
    models = cache_root(cache_dir) / "models"
    key = cfg.config_hash()
    if dataset_sha is not None:
        if len(dataset_sha) < 8 or any(c not in "0123456789abcdef" for c in dataset_sha.lower()):
            raise ValueError(f"dataset_sha must be a hex sha256, got {dataset_sha!r}")
        key = f"{key}-{dataset_sha[:8].lower()}"
    own = models / f"{cfg.name}-{key}"
    if not (own / "train_log.json").is_file() and models.is_dir():
        for other in sorted(models.glob(f"*-{key}")):
            if (other / "train_log.json").is_file() and (other / "weights.safetensors").is_file():
                return other
    return own


def fingerprint(*parts: Any) -> str:
    """12 hex digits of tensors (by value) and JSON-able values: names a cached result (an attack cell, a
    certified batch), so a changed input or setting never finds an old one."""
    h = hashlib.sha256()
    for part in parts:
        if torch.is_tensor(part):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def state_digest(module: torch.nn.Module) -> str:
    """12 hex digits of a module's weights and buffers, by name and value: names a model that has no config (a
    user's defense, an exported file, a subject's backbone)."""
    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _atomic(path: Path, write) -> None:  # noqa: ANN001 - write(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.write("\n")

    _atomic(Path(path), w)


def write_text(path: str | os.PathLike, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    _atomic(Path(path), w)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    """Tensors (and optional JSON metadata in the same file, so the two can never disagree)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"json": json.dumps(meta)} if meta is not None else None
    _atomic(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {})["json"])


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors + JSON-able param groups (safetensors cannot hold nested dicts)."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, val in state.items():
            tensors[f"opt.{idx}.{name}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
