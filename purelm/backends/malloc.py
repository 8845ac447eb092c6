"""glibc's malloc during a prompt's forward pass.

A pass over a prompt allocates each layer's activations afresh (hundreds of KiB to tens of MiB). glibc
serves a request over M_MMAP_THRESHOLD (128 KiB at start) with a new mapping and unmaps it on free, so
every layer faults its temporaries' pages in again, zeroed by the kernel, and two threads doing so
queue on the process's memory-map lock (what that cost: benchmarks/README.md, "Prefill and malloc"). While a pass of more than a few tokens runs, `KeepFreed`
raises M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to KEEP_BYTES, so freed temporaries stay in the heap for
the next layer; when the last such pass ends it lowers them to where glibc's own adjustment would
have taken them (AFTER_MMAP, AFTER_TRIM) and returns the free memory to the system (malloc_trim):
resident memory after the pass is what it was before.

Only on Linux with glibc, and not when the environment sets malloc's thresholds itself
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_) or
PURELM_MALLOC_KEEP=0.
"""
from __future__ import annotations

import ctypes
import os
import platform
import threading
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
KEEP_BYTES = 256 << 20  # an allocation up to this size comes from the heap during a pass
MIN_TOKENS = 16  # passes of fewer tokens (decode steps) allocate under the starting threshold anyway
# After a pass: where glibc's own adjustment takes them once a block that large was freed (its
# DEFAULT_MMAP_THRESHOLD_MAX, and twice that to trim): a decode step's logits and the sampler's
# vocabulary-sized arrays then stay in the heap, as they would without purelm's setting. (glibc's
# starting 128 KiB, fixed, would map and fault them in at every token: mallopt ends the adjustment.)
AFTER_MMAP, AFTER_TRIM = 32 << 20, 64 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _libc() -> Any:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if os.environ.get("PURELM_MALLOC_KEEP", "").strip() == "0" or any(k in os.environ for k in USER_SETTINGS):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


class KeepFreed:
    """`with keep_freed:` around a pass; nests and may be entered from several threads (the
    thresholds are the process's: the first to enter raises them, the last to leave puts them back)."""

    def __init__(self) -> None:
        self.libc: Any = False  # looked up on first use
        self.depth = 0
        self.lock = threading.Lock()

    def __enter__(self) -> None:
        with self.lock:
            if self.libc is False:
                self.libc = _libc()
            if self.libc is not None and self.depth == 0:
                self.libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)
                self.libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
            self.depth += 1

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.depth -= 1
            if self.libc is not None and self.depth == 0:
                self.libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM)
                self.libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP)
                self.libc.malloc_trim(0)


keep_freed = KeepFreed()
