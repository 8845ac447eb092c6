"""Handing memory pages back to the OS where their contents can be re-read on demand: the GGUF
mapping's pages once a repacked copy replaces them, and LLVM's once the kernels are loaded. Both are
clean file-backed pages, so a later touch just reads them again (from the page cache, or the disk)."""
from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

MADV_DONTNEED = 4  # Linux's value (mmap.MADV_DONTNEED is the same)


def release_file_pages(data: np.ndarray) -> None:
    """Drop `data`'s pages from this process's resident set, if it is a view of a read-only file
    mapping (the GGUF mmap): a repacked copy replaces them. Touching them again re-reads the page
    cache, so this is always safe; anonymous memory is left alone."""
    owner = data
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if isinstance(owner, memoryview):
        owner = owner.obj
    if not isinstance(owner, mmap.mmap) or data.flags.writeable or not data.flags.c_contiguous:
        return
    try:
        base = np.frombuffer(owner, np.uint8, count=1).ctypes.data
    except (ValueError, TypeError, BufferError):
        return
    page = mmap.PAGESIZE
    start = data.ctypes.data - base
    first = -(-start // page) * page
    last = (start + data.nbytes) // page * page
    if last > first and hasattr(owner, "madvise"):
        try:
            owner.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (OSError, ValueError):
            pass


def page_out_library(name: str) -> int:
    """Drop from this process's resident set the pages of every read-only mapping of a shared
    library whose path contains `name` (LLVM: ~65 MB, used only while numba compiles or loads
    kernels). Returns the bytes of mappings dropped; 0 where the OS cannot (not Linux).

    Only mappings that are not writable and hold no private copies (smaps "Anonymous: 0") are
    touched: their pages are exactly the file's, so MADV_DONTNEED loses nothing and a later use
    faults them back in. (MADV_PAGEOUT would skip pages that another process maps too.)"""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/smaps", errors="surrogateescape") as f:  # paths are bytes
            smaps = f.read().splitlines()
    except (OSError, AttributeError):
        return 0
    dropped, current = 0, None  # current: (lo, hi) of a matching read-only mapping
    for line in smaps:
        head = line.split(maxsplit=5)
        if head and not head[0].endswith(":"):  # a mapping's first line: range perms offset dev inode path
            current = None
            if len(head) == 6 and name in head[5] and "w" not in head[1]:
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                current = (lo, hi)
        elif current is not None and head[0] == "Anonymous:":
            if head[1] == "0" and madvise(current[0], current[1] - current[0], MADV_DONTNEED) == 0:
                dropped += current[1] - current[0]
            current = None
    return dropped
