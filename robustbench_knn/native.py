"""The CPU kernels in C: the §2.5 potentials in one pass (``native_potentials.c``) and the vote's candidate selection
(``native_select.c``), compiled together by the machine's C compiler on first use into the cache
(``ROBUSTBENCH_KNN_CACHE``), loaded with ctypes, and run on row ranges in threads (ctypes lets go of the GIL during
the call). Where there is no compiler, or ``ROBUSTBENCH_KNN_COMPILE=0`` (nothing compiled at
all) or ``ROBUSTBENCH_KNN_NATIVE=0`` (this kernel only), :func:`usable` is False and the callers run their torch code,
which computes the same values up to float32 rounding."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch

from .devices import COMPILE_ENV, machine_name
from .store import cache_root

MAX_SPACES, MAX_WIDTH = 16, 128  # the C file's fixed maxima
NATIVE_ENV = "ROBUSTBENCH_KNN_NATIVE"  # "0": never this kernel; the torch path (compiled blocks or eager) runs
# -O3 and reassociation (the lanes' sums in any order, as a BLAS adds); square roots and divisions stay IEEE. Tried in
# turn: tuned to the machine the cache lives on with x86's 512-bit vectors (gcc's default there is 256: 8% slower
# on an AVX-512 Xeon), tuned without that x86-only flag, and plain for compilers without -march=native.
_MATH = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]
FLAGS = ([*_MATH, "-march=native", "-mprefer-vector-width=512"], [*_MATH, "-march=native"], _MATH)
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_ARGTYPES = {"potential_sums": [_I, _I, _I, _P, _I, _P, _P, _P, _I, _I, _P, _F, _F, _P, _P, _P, _P, _P, _P],
             "smallest_candidates": [_P, _I, _I, _I, _I, _P, _P]}
SOURCES = ("native_potentials.c", "native_select.c")


def source() -> str:
    """The C files as one translation unit."""
    return "\n".join(resources.files("robustbench_knn").joinpath(name).read_text() for name in SOURCES)


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def build(src: str, out_dir: Path) -> Path:
    """Compile ``src`` into a shared library under ``out_dir``, named by a digest of the source, the flags, the
    compiler and the CPU, so that an edited source, another compiler or another machine sharing the cache (code for
    one CPU may not run on another) never loads a stale library; written under a temporary name and renamed, so
    that ranks compiling at once never load a half-written file."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    errors = []
    for flags in FLAGS:
        digest = hashlib.sha256("\0".join([src, cc, machine_name("cpu"), *flags]).encode()).hexdigest()[:16]
        lib = out_dir / f"kernels-{digest}.so"
        if lib.exists():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            c_file, so = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            c_file.write_text(src)
            run = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(so), str(c_file)],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                os.replace(so, lib)
                return lib
            errors.append(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
    raise RuntimeError(f"{cc} failed: {'; '.join(errors)}")


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _ARGTYPES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    return lib


class _Kernel:
    """The library, built and loaded once per process; a failure is said once and ends its use."""

    def __init__(self) -> None:
        self.lib: ctypes.CDLL | None = None
        self.failed: str | None = None
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.pool_size = 0

    def get(self) -> ctypes.CDLL | None:
        with self.lock:
            if self.lib is None and self.failed is None:
                try:
                    self.lib = load(build(source(), cache_root() / "native"))
                except (OSError, RuntimeError) as err:
                    self.failed = str(err)
                    warnings.warn(f"native kernels unavailable ({self.failed}); running torch code "
                                  f"instead (set {COMPILE_ENV}=0 to skip compiling)", RuntimeWarning, stacklevel=3)
            return self.lib

    def workers(self, n: int) -> ThreadPoolExecutor:
        """A pool of ``n`` threads, kept between calls (an attack calls the kernel at every step)."""
        if self.pool is None or self.pool_size != n:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
            self.pool, self.pool_size = ThreadPoolExecutor(n, thread_name_prefix="robustbench-knn-native"), n
        return self.pool


KERNEL = _Kernel()


def _allowed() -> bool:
    return (os.environ.get(COMPILE_ENV, "1") != "0" and os.environ.get(NATIVE_ENV, "1") != "0"
            and KERNEL.get() is not None)


def _row_ranges(n: int, min_rows: int) -> list[tuple[int, int]]:
    """Rows split between threads (as many as torch uses), none with fewer than ``min_rows`` rows."""
    threads = max(1, min(torch.get_num_threads(), n // min_rows))
    bounds = [n * i // threads for i in range(threads + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(threads)]


def _on_threads(run, ranges: list[tuple[int, int]]) -> list[int]:  # noqa: ANN001 - run(rows) -> status
    if len(ranges) > 1:
        return list(KERNEL.workers(len(ranges)).map(run, ranges))
    return [run(ranges[0])] if ranges[0][1] > ranges[0][0] else []


def _row_ptr(t: torch.Tensor | None, row: int) -> int | None:
    """The address of ``row`` of a 2-d tensor whose rows are contiguous (None for None: a NULL argument)."""
    return None if t is None else t.data_ptr() + row * t.stride(0) * t.element_size()


def usable(emb: torch.Tensor, n_spaces: int) -> bool:
    """Whether the kernel takes this batch: float32 on the CPU, at most 16 sub-spaces and 128 dimensions (wider
    embeddings are matmul-bound: the BLAS path is the faster one there), the kernel allowed, compiled and loaded."""
    return (emb.device.type == "cpu" and emb.dtype == torch.float32 and 1 <= n_spaces <= MAX_SPACES
            and 0 < emb.shape[1] <= MAX_WIDTH and emb.shape[1] % n_spaces == 0 and _allowed())


def potential_sums(emb: torch.Tensor, bank_t: torch.Tensor, bank_sq: torch.Tensor, seg: torch.Tensor, n_spaces: int,
                   lam: float, c0: float, coefficients: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, ...]:
    """Per row and class Σ E and Σ relu(c0 − E) (each (N, K)) over a class-ordered bank given as ``bank_t`` (W, M)
    (its transpose), ``bank_sq`` (S, M) (squared norms per sub-space) and ``seg`` (K + 1 column offsets); with
    ``coefficients`` (near, far), each (N, K), also ∂L/∂emb (N, W) for ∂L/∂D = E·(near if E < c0 else far)."""
    lib = KERNEL.get()
    assert lib is not None, "potential_sums() called where usable() is False"
    a = emb.detach().contiguous()
    n, width = a.shape
    n_classes = len(seg) - 1
    na = a.view(n, n_spaces, -1).pow(2).sum(-1).contiguous()
    seg = seg.to(torch.int64).contiguous()
    bank_t, bank_sq = bank_t.contiguous(), bank_sq.contiguous()
    e_sum, below = a.new_zeros(n, n_classes), a.new_zeros(n, n_classes)
    near, far = (None, None) if coefficients is None else (c.detach().float().contiguous() for c in coefficients)
    q_rows = a.new_zeros(n, n_spaces) if near is not None else None
    qb = a.new_zeros(n, width) if near is not None else None

    def run(rows: tuple[int, int]) -> int:
        u0, u1 = rows
        return lib.potential_sums(u1 - u0, n_spaces, width // n_spaces, _row_ptr(a, u0), width, _row_ptr(na, u0),
                                  bank_t.data_ptr(), bank_sq.data_ptr(), bank_t.shape[1], n_classes, seg.data_ptr(),
                                  lam, c0, _row_ptr(near, u0), _row_ptr(far, u0), _row_ptr(e_sum, u0),
                                  _row_ptr(below, u0), _row_ptr(q_rows, u0), _row_ptr(qb, u0))

    status = _on_threads(run, _row_ranges(n, 4))  # 4 rows share the bank's loads: no thread with fewer
    if any(status):
        raise RuntimeError(f"native_potentials.c: potential_sums returned {status}")
    if q_rows is None:
        return e_sum, below
    sa = a.view(n, n_spaces, -1)
    grad = q_rows.unsqueeze(-1) * sa - qb.view(n, n_spaces, -1)
    return e_sum, below, grad.reshape(n, width)


def smallest_candidates(dist: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For each row of ``dist`` (float32, (rows, M)): the indices of its ``c`` smallest values in no particular order
    (rows, c) and the largest of those values (rows,): every value left out is ≥ it. None where the kernel does not
    apply (not float32 on the CPU, not allowed or not built) or a row holds NaN: the caller selects by itself."""
    if not (dist.device.type == "cpu" and dist.dtype == torch.float32 and dist.dim() == 2 and 1 <= c <= dist.shape[1]
            and _allowed()):
        return None
    d = dist if dist.stride(1) == 1 else dist.contiguous()
    rows, m = d.shape
    idx = torch.empty(rows, c, dtype=torch.int64)
    kth = torch.empty(rows, dtype=torch.float32)

    def run(part: tuple[int, int]) -> int:
        u0, u1 = part
        return KERNEL.lib.smallest_candidates(_row_ptr(d, u0), u1 - u0, m, d.stride(0), c, _row_ptr(idx, u0),
                                              kth.data_ptr() + u0 * kth.element_size())

    status = _on_threads(run, _row_ranges(rows, 1))
    if -2 in status:
        raise MemoryError("native_select.c: smallest_candidates could not allocate its buffers")
    return None if any(status) else (idx, kth)
