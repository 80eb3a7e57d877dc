"""Where the work runs: the device a run resolves to, the name of the machine recorded beside its figures, and
kernels compiled for it where a compiler is at hand."""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import UsageError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; an explicit ``cuda`` without one is a usage error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    return dev


def machine_name(device: torch.device | str) -> str:
    """What trained it: the GPU's name, or the CPU model and core count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


BLOCK_ENV = "ROBUSTBENCH_KNN_BLOCK_ELEMENTS"  # N × columns per block buffer, for measuring other block sizes
CPU_BLOCK_ELEMENTS = 1 << 18  # a few such float buffers stay in a CPU's last-level cache
# A GPU pays per kernel launch rather than per cache miss: at the CPU's budget a step over a 50,000-point bank was
# hundreds of small launches (10,000 queries: 64-column blocks). 16M floats: 64 MB buffers, one block per class.
GPU_BLOCK_ELEMENTS = 1 << 24


def block_elements(device: torch.device) -> int:
    """How many floats one block buffer of the blocked k-NN losses holds on ``device`` (``BLOCK_ENV`` overrides)."""
    override = os.environ.get(BLOCK_ENV, "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise UsageError(f"{BLOCK_ENV}={override!r}: expected a positive integer")
        return int(override)
    return GPU_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_ELEMENTS


COMPILE_ENV = "ROBUSTBENCH_KNN_COMPILE"  # "0": never compile; every fused kernel runs its eager fallback


def _quiet_cpp_extension() -> None:
    """Import the compiler's C++ helper without its "No CUDA runtime is found" warning, which a CUDA build of torch
    logs on every machine without a GPU: compiling for the CPU needs no CUDA."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        log.setLevel(level)


class FusedKernel:
    """``fn`` (element-wise work and reductions over a block) compiled by ``torch.compile`` on first use, with
    dynamic shapes so that one compilation serves every batch size and block width: one pass over a block instead
    of one per operation. Compiling needs a C++ compiler (CPU) or Triton (GPU); where it fails, or where
    ``ROBUSTBENCH_KNN_COMPILE=0``, :meth:`usable` turns False and the caller runs its eager code instead."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self.failed: str | None = None

    def usable(self) -> bool:
        return self.failed is None and os.environ.get(COMPILE_ENV, "1") != "0"

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            _quiet_cpp_extension()
            self._compiled = torch.compile(self.fn, dynamic=True)
        return self._compiled(*args)

    def give_up(self, err: BaseException) -> None:
        """Stop compiling after a failure (said once): the caller's eager code gives the same values."""
        self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"{self.fn.__name__}: torch.compile failed ({self.failed}); running eager code instead "
                      f"(set {COMPILE_ENV}=0 to skip compiling)", RuntimeWarning, stacklevel=2)
