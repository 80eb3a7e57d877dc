"""CIFAR-10 in the official ``cifar-10-batches-py`` layout, the paper's noise, and pixel-wise statistics."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import UsageError

BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
DATASET_LABEL = "CIFAR-10"
ENV_VAR = "ROBUSTBENCH_KNN_DATA"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Split:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,). Converted to [0, 1] floats per batch."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> "Split":
        return Split(self.x[:n], self.y[:n])

    def floats(self) -> torch.Tensor:
        return to_float(self.x)


@dataclass
class CIFAR10:
    train: Split
    test: Split
    sha256: str  # of the raw arrays, recorded in every results file
    root: str


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255.0)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """The CIFAR files are pickles; allow only what they contain (dicts of bytes, lists and numpy arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        d = _ArrayOnlyUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise UsageError(f"{path} is not a CIFAR-10 python batch (no data/labels)")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise UsageError(f"{path}: expected (N, 3072) uint8 data, got {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def default_data_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("robustbench-knn")) / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """--data-dir, else $ROBUSTBENCH_KNN_DATA, else the user cache dir. Accepts DIR or DIR/cifar-10-batches-py."""
    root = Path(data_dir or os.environ.get(ENV_VAR) or default_data_dir()).expanduser()
    if root.name == BATCH_DIR:
        root = root.parent
    return root


def _online(host: str = "www.cs.toronto.edu", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _missing_message(root: Path) -> str:
    return (
        f"CIFAR-10 not found in {root / BATCH_DIR} and the download site is unreachable. "
        f"Provide it with --data-dir DIR or ${ENV_VAR}=DIR, where DIR/{BATCH_DIR} holds the official "
        f"python batches (torchvision's download, or `python ../shared/data/make_cifar10.py DIR`)."
    )


def ensure_data(data_dir: str | os.PathLike | None, download: bool = True) -> Path:
    root = resolve_data_dir(data_dir)
    batch_dir = root / BATCH_DIR
    if all((batch_dir / f).is_file() for f in TRAIN_FILES + [TEST_FILE]):
        return root
    if download and _online():
        import torchvision

        root.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        return root
    raise UsageError(_missing_message(root))


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = True) -> CIFAR10:
    root = ensure_data(data_dir, download=download)
    batch_dir = root / BATCH_DIR
    parts = [_load_batch(batch_dir / f) for f in TRAIN_FILES]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _load_batch(batch_dir / TEST_FILE)
    h = hashlib.sha256()
    for a in (xtr, ytr, xte, yte):
        h.update(np.ascontiguousarray(a).tobytes())
    return CIFAR10(
        train=Split(torch.from_numpy(xtr), torch.from_numpy(ytr)),
        test=Split(torch.from_numpy(xte), torch.from_numpy(yte)),
        sha256=h.hexdigest(),
        root=str(root),
    )


def write_batches(root: str | os.PathLike, train: Split, test: Split) -> Path:
    """Write images in the official layout (used by tests to make tiny synthetic data sets)."""
    batch_dir = Path(root) / BATCH_DIR
    batch_dir.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train)), len(TRAIN_FILES))
    for fname, idx in zip(TRAIN_FILES, chunks):
        _write_batch(batch_dir / fname, train.x[idx], train.y[idx])
    _write_batch(batch_dir / TEST_FILE, test.x, test.y)
    return batch_dir


def _write_batch(path: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    d = {b"data": x.reshape(len(x), -1).numpy().astype(np.uint8), b"labels": [int(v) for v in y]}
    with open(path, "wb") as fh:
        pickle.dump(d, fh)


def pixel_stats(x_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per pixel position and channel (§3.1), shape (3, 32, 32), from training images."""
    x = x_uint8.double() / 255.0
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-3)  # constant pixels (tiny synthetic data) must not divide by zero
    return mean.float(), std.float()


# popcount of 5 random bits is Binomial(5, 1/2); one randint + gather is much cheaper than torch.distributions
_POPCOUNT5 = torch.tensor([bin(i).count("1") for i in range(32)], dtype=torch.float32)


def binomial_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The paper's noise Δ = 2X − 5, X ~ Binomial(5, 0.5), i.i.d. per value (values −5, −3, …, 5)."""
    bits = torch.randint(0, 32, tuple(shape), generator=generator, device=generator.device if generator else device)
    return (_POPCOUNT5.to(bits.device)[bits] * 2.0 - 5.0).to(device)
