"""Where the work runs: the device a run resolves to, and the name of the machine recorded beside its figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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
