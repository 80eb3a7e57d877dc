"""One-entry memos of data derived from tensors (a bank's layout, norms, screen): attacks and votes use the same
bank at every step, and re-deriving a wide bank's data costs as much as the step's own arithmetic.

An entry is found by the tensors themselves (weak references, so a memo keeps nothing alive), their version
counters and the other arguments' values, never by address: a freed bank's memory is reused by the next tensor of
the same size, and a view of the same memory with other strides has the same address and shape, so an address key
hands one bank's data to another. An in-place edit bumps the version, so edited data is derived again.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch


class TensorMemo:
    """``get(*args)`` returns ``make(*args)``, kept until it is asked for other arguments. Tensor arguments are
    matched by identity and version, the others by equality. Inference tensors keep no version counter, so what is
    made from them is never kept (made again at every call)."""

    def __init__(self, make: Callable[..., Any]) -> None:
        self._make = make
        self._refs: tuple[weakref.ref, ...] = ()
        self._key: tuple = ()
        self._value: Any = None

    @staticmethod
    def _split(args: tuple) -> tuple[tuple[torch.Tensor, ...], tuple] | None:
        """The tensor arguments and the key of all arguments; None where a tensor keeps no version counter."""
        tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
        if any(t.is_inference() for t in tensors):
            return None
        return tensors, tuple(("tensor", a._version) if isinstance(a, torch.Tensor) else a for a in args)

    def holds(self, *args: Any) -> bool:
        """Whether the kept entry was made from these arguments (these very tensors, unedited)."""
        split = self._split(args)
        if split is None or not self._refs:
            return False
        tensors, key = split
        return (len(tensors) == len(self._refs) and all(r() is t for r, t in zip(self._refs, tensors))
                and key == self._key)

    def get(self, *args: Any) -> Any:
        if self.holds(*args):
            return self._value
        value = self._make(*args)
        split = self._split(args)
        if split is not None:
            tensors, key = split
            self._refs, self._key, self._value = tuple(weakref.ref(t) for t in tensors), key, value
        return value

    def clear(self) -> None:
        self._refs, self._key, self._value = (), (), None
