"""Splitting an evaluation over processes: ``torchrun`` ranks (one process group, NCCL on GPUs, gloo on CPU) or
``--shard I/N`` parts (no process group; ``merge`` joins their files).

The unit of work is a *global* batch: the i-th block of ``batch_size`` attacked images, seeded by ``i``, so it
draws the same random numbers on whichever process runs it and the per-sample outcomes equal a single-process
run's. A partition owns batches ``i`` with ``i % world == rank`` (round robin: early and late batches cost alike).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ..config import UsageError

# a rank that waits for another (a model being trained elsewhere is waited for on a file lock, not here)
GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Partition:
    """This process's share: ``rank`` of ``world``; ``group`` when a torch.distributed process group joins them."""

    rank: int = 0
    world: int = 1
    group: bool = False

    def owns(self, batch: int) -> bool:
        return batch % self.world == self.rank

    @property
    def writer(self) -> bool:
        """Writes results, tables and merged cells: rank 0 of a group, every shard (its own part file)."""
        return self.rank == 0 or not self.group

    @property
    def shard(self) -> bool:
        """A part of a job without a process group: results are partial until ``merge``."""
        return self.world > 1 and not self.group

    @property
    def tag(self) -> str:
        return f"part{self.rank}of{self.world}"


SINGLE = Partition()
_current = SINGLE


def current() -> Partition:
    return _current


@contextlib.contextmanager
def use(part: Partition) -> Iterator[Partition]:
    global _current
    old, _current = _current, part
    try:
        yield part
    finally:
        _current = old


def parse_shard(text: str) -> Partition:
    """'I/N' (0-based I) → the partition of the I-th of N parts."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: use I/N, e.g. 0/4 (parts are numbered from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return Partition(i, n, group=False)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_group() -> Partition:
    """Join the process group ``torchrun`` set up (NCCL where each rank has a GPU, else gloo); each rank takes
    the GPU of its local rank."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if torch.cuda.is_available() and torch.cuda.device_count() > local:
        torch.cuda.set_device(local)
        backend = "nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=GROUP_TIMEOUT)
    return Partition(dist.get_rank(), dist.get_world_size(), group=True)


def close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather(obj: Any, part: Partition | None = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (only this process's in a shard or a single run)."""
    part = part or current()
    if not part.group:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * part.world
    dist.all_gather_object(out, obj)
    return out


def seed_batch(seed: int) -> None:
    """Every generator an attack may draw from (torch CPU and CUDA, NumPy for ART, Python's)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
