"""What ``--model`` names: one of this project's configs, a user's ``MODULE:FUNCTION``, or an exported file.

- ``full``, ``a``, ... : a config of ``config.MODELS`` (trained or loaded from the cache by the command);
- ``PACKAGE.MODULE:FUNCTION``: the function (imported from the current directory or the installed packages)
  is called without arguments and returns a ``KNNDefense`` or any ``nn.Module`` classifier;
- ``FILE.safetensors``: a model written by ``robustbench-knn export`` (weights, config JSON and bank in one
  self-describing file), loaded without executing any code.

Every failure is a ``UsageError``: one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

from ..config import ExperimentConfig, UsageError, get_model_config
from .defense import BaseClassifier, as_classifier

EXPORT_FORMAT = "robustbench-knn/export-1"


def is_config_name(text: str) -> bool:
    return ":" not in text and not text.endswith(".safetensors")


def load_from_function(text: str) -> BaseClassifier:
    """``pkg.module:function`` → the classifier it returns."""
    module_name, _, func_name = text.partition(":")
    if not module_name or not func_name:
        raise UsageError(f"--model {text!r}: use PACKAGE.MODULE:FUNCTION")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UsageError(f"--model {text!r}: no module {e.name!r} (looked in the current directory and the "
                         f"installed packages)") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise UsageError(f"--model {text!r}: importing {module_name} raised {type(e).__name__}: {e}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"--model {text!r}: module {module_name} has no function {func_name!r}")
    try:
        model = func()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--model {text!r}: {func_name}() raised {type(e).__name__}: {e}") from None
    try:
        return as_classifier(model)
    except UsageError:
        raise UsageError(f"--model {text!r}: {func_name}() returned a {type(model).__name__}, not a KNNDefense "
                         f"or an nn.Module classifier") from None


def export_model(clf: BaseClassifier, cfg: ExperimentConfig, path: str | os.PathLike) -> Path:
    """One safetensors file: the network's weights, the bank and its labels (k-NN), and the config as JSON."""
    from ..store import save_tensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"--out {str(path)!r} must end in .safetensors")
    tensors = {f"net.{k}": v for k, v in clf.net.state_dict().items()}
    if hasattr(clf, "bank"):
        tensors.update(bank=clf.bank, bank_labels=clf.bank_labels)
    meta = {"format": EXPORT_FORMAT, "config": cfg.to_dict(), "config_hash": cfg.config_hash(),
            "kind": "knn" if hasattr(clf, "bank") else "logits"}
    save_tensors(path, tensors, meta)
    return path


def load_exported(path: str | os.PathLike, *, surrogate: str = "potential", aligned: bool = True,
                  device: str | torch.device = "cpu") -> tuple[BaseClassifier, ExperimentConfig]:
    """An exported file back as a classifier (and its config); no pickled code is ever executed."""
    from ..paper.classifier import KNNClassifier, LogitClassifier
    from ..paper.model import IdResNet
    from ..store import load_meta, load_tensors

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--model {str(path)!r}: no such file")
    try:
        meta = load_meta(path)
        tensors = load_tensors(path, device)
    except Exception as e:  # noqa: BLE001 - not a safetensors file, or one without our metadata
        raise UsageError(f"--model {str(path)!r}: not a robustbench-knn export ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise UsageError(f"--model {str(path)!r}: not a robustbench-knn export (format {meta.get('format')!r})")
    cfg = ExperimentConfig.from_dict(meta["config"])
    net = IdResNet(cfg.model).to(device)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    if meta["kind"] == "logits":
        return LogitClassifier(net), cfg
    return KNNClassifier(net, tensors["bank"], tensors["bank_labels"], cfg, surrogate, aligned=aligned), cfg


def resolve_model(text: str, *, surrogate: str = "potential", aligned: bool = True,
                  device: str | torch.device = "cpu") -> tuple[BaseClassifier | None, ExperimentConfig | None, str]:
    """``--model`` → (classifier or None, config or None, name). A config name gives (None, cfg, name): the
    command trains or loads it; the other forms give a ready classifier."""
    if is_config_name(text):
        cfg = get_model_config(text)
        return None, cfg, cfg.name
    if text.endswith(".safetensors"):
        clf, cfg = load_exported(text, surrogate=surrogate, aligned=aligned, device=device)
        return clf, cfg, Path(text).stem
    clf = load_from_function(text)
    if hasattr(clf, "aligned"):  # the command line's choice (aligned unless --unaligned) wins
        clf.aligned = aligned
    return clf.to(device), None, text.partition(":")[2]
