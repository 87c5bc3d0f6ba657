"""Keep freed host memory for reuse: an opt-in process setting for CPU runs.

XLA's CPU runtime allocates every execution's scratch buffer afresh with malloc and frees it
when the execution ends. glibc serves a block above its mmap threshold (at most 32 MB by
default) with a fresh mapping and unmaps it on free, so every execution touches new pages and
takes one page fault per 4 KB page. A 10 s clip's forward needs 36 MB of scratch through
BEATs and 43 MB through the 3-layer student: 9,000-11,000 faults, about 10 ms per forward on
the project's 2-core CPU, a fixed cost that weighs most on the smallest model
(benchmarks/README.md).

`keep_freed_memory()` raises glibc's mmap and trim thresholds, so freed blocks stay in the
heap and the next execution reuses pages that are already mapped. It also puts every thread on
the main heap (one arena): a thread's own heap is capped at 64 MB and gives pages back as it
shrinks, so XLA's worker threads would still fault. Resident memory then stays at its peak
instead of shrinking between calls, and the heap may take several calls to settle at its
working size (more on a busy machine, and above the peak of glibc's default behaviour, since
blocks freed by one thread and asked for by another do not always fit). Measured on the
project's CPU: a 10 s clip's teacher and student forwards go from 9,000-11,000 faults per call
to none once warm. Allocations that bypass malloc are not affected.

The setting belongs to the process, not to the library: importing haaqi_jax never calls it.
The command-line entry points (`haaqi-jax ...`, `train.py`, and benchmarks/bench_student.py,
bench_haaqi.py, bench_label.py and bench_long_clip.py) call it once, at start; a script of your
own calls `keep_freed_memory()` the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Blocks up to this size come from (and return to) the heap: 1 GiB, far above the 36-43 MB
#: scratch of a 10 s clip's forward; larger blocks are still mapped afresh.
DEFAULT_THRESHOLD_BYTES = 1 << 30


def keep_freed_memory(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Asks glibc's malloc to keep freed blocks of up to `threshold_bytes` for reuse.

    Call it at the start of the process, before JAX runs anything: threads that have already
    picked an arena keep it.

    Args:
      threshold_bytes: blocks up to this size come from the heap instead of fresh mappings, and
        freed memory is returned to the system only when more than this much is free at the top
        of the heap.
    Returns:
      True when all three settings took effect; False where there is no glibc (macOS,
      Windows, musl), which changes nothing else.
    """
    if threshold_bytes < 1 or threshold_bytes >= 2 ** 31:
        raise ValueError(f"keep_freed_memory: threshold_bytes must be in [1, 2**31), got "
                         f"{threshold_bytes}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(_M_MMAP_THRESHOLD, threshold_bytes),
                mallopt(_M_TRIM_THRESHOLD, threshold_bytes), mallopt(_M_ARENA_MAX, 1)])


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` says an allocation failed: Python's MemoryError, or XLA's
    RESOURCE_EXHAUSTED (host or accelerator memory), which JAX raises as a JaxRuntimeError."""
    return isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and "RESOURCE_EXHAUSTED" in str(err))


def out_of_memory_summary(err: BaseException) -> str:
    """The first line of an out-of-memory error (XLA's runs on for lines; its first says how
    much it asked for), or "MemoryError" for one without a message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else "MemoryError"
