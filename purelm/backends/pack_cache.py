"""An on-disk cache of repacked matrices (numba_kernels/packing.py), memory-mapped on later loads.

Repacking touches every weight byte and writes a new copy (seconds for a 1B model); a cached copy is
mapped from the page cache instead: no copy, no new memory. (It is mapped with the file system's pages:
4 KiB on ext4, where a copy repacked in memory gets 2 MiB pages; SmolLM2's decode showed no clear
difference, benchmarks/README.md.)
One file per matrix (a merged q|k|v is one), under cache_dir()/packed/<model>/ where <model> names the
GGUF file by path, device and inode. A file holds the arrays (the largest first, at offset 0), then a
JSON trailer with its key, then the trailer's length and a magic number. The key names the GGUF file's
size and mtime, the tensors (name, offset, type, shape), the packing parameters, FORMAT_VERSION and a
digest of packing.py: a changed file, layout or purelm gives a different key, and the entry is
repacked and written over. Entries are replaced by rename, never rewritten in place: a process that
maps one keeps its pages (truncating a mapped file by hand would fault its readers, as for the GGUF).

Nothing in an entry is trusted: it is opened only as a regular file, its key must equal the expected
one, its size must be exactly what the expected layout gives (shapes and dtypes come from packing a tiny
matrix of the same type, never from the file), and a checksum of the arrays must match. Anything else is
a miss: repacked and rewritten. Writes go to a temporary file renamed into place, so readers never see
half an entry; a full disk, a read-only folder or the size bound turn writing off with one warning.
Folders of model files that are gone, and least recently used ones past MAX_BYTES, are removed.
`PURELM_PACK_CACHE=0` turns the cache off.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import stat
import struct
import sys
import threading
import time
import warnings
import weakref
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..formats.gguf import Tensor
from ..paths import cache_dir
from ..quant.types import BLOCK_INFO, GGMLType
from .numba_kernels.packing import Packed, pack

FORMAT_VERSION = 1  # of the entry format; the layouts' own version is a digest of their source
MAGIC = b"PLMPACK1"
TAIL = struct.Struct("<Q8s")  # trailer length, magic
MAX_TRAILER = 1 << 16
ALIGN = 64
MAX_BYTES = 16 << 30  # the whole cache folder; least recently used models go first
MIN_FREE_BYTES = 2 << 30  # never fill the disk past this
MIN_FILE_BYTES = 32 << 20  # smaller model files repack in under ~0.1 s: not worth a cache folder each
_warned = False


def enabled() -> bool:
    """On unless PURELM_PACK_CACHE says no; Linux only (source_of reads /proc/self/maps)."""
    value = os.environ.get("PURELM_PACK_CACHE", "1").strip().lower()
    return sys.platform.startswith("linux") and value not in ("0", "no", "off", "false")


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"purelm: repacked-weights cache: {message}; repacking at each load instead",
                      RuntimeWarning, stacklevel=4)


def source_of(data: np.ndarray) -> dict | None:
    """The file an array is a view of (a read-only mmap of a regular file), as {path, dev, ino, size,
    mtime_ns}; None for anything else, or where the OS cannot tell (no /proc/self/maps)."""
    owner = data
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if isinstance(owner, memoryview):
        owner = owner.obj
    if not isinstance(owner, mmap.mmap) or data.size == 0:
        return None
    try:
        if owner not in _mappings:
            _mappings[owner] = _mapped_file(data.ctypes.data)
        path, dev, ino = _mappings[owner]
        st = os.stat(path)  # now, not when mapped: a file changed since is a different key
    except (OSError, ValueError, IndexError, TypeError):
        return None
    if (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)) != (ino, *dev):
        return None  # replaced or deleted since it was mapped
    return {"path": os.path.realpath(path), "dev": int(st.st_dev), "ino": ino, "size": int(st.st_size),
            "mtime_ns": int(st.st_mtime_ns)}


_mappings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # mmap -> its file's path, (major, minor), inode


def _mapped_file(addr: int) -> tuple[str, tuple[int, int], int]:
    """The path, device and inode of the file mapped at `addr` (/proc/self/maps)."""
    with open("/proc/self/maps", errors="surrogateescape") as f:  # paths are bytes, as os.stat takes them
        for line in f:
            head = line.split(maxsplit=5)
            lo, _, hi = head[0].partition("-")
            if int(lo, 16) <= addr < int(hi, 16):
                major, minor = (int(v, 16) for v in head[3].split(":"))
                return head[5].rstrip("\n"), (major, minor), int(head[4])
    raise ValueError("not mapped")


@lru_cache(maxsize=1)
def _layouts_digest() -> str:
    """A digest of the code that decides the packed layouts: a changed layout never loads stale."""
    from ..quant import kquants
    from .numba_kernels import packing

    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (packing, kquants))).hexdigest()[:16]


@lru_cache(maxsize=256)
def _layout(qtype: GGMLType, n_in: int, lanes: int, dot: bool) -> tuple[Packed, tuple]:
    """A one-group matrix packed as the real one would be: its family, mode, offset, and per array
    (name, dtype, shape after the group axis), the largest first."""
    block, size = BLOCK_INFO[qtype]
    tiny = pack(qtype, np.zeros((lanes, n_in // block * size), np.uint8), n_in, lanes, dot=dot)
    arrays = sorted(tiny.arrays.items(), key=lambda kv: -kv[1].nbytes)
    return tiny, tuple((name, a.dtype.str, a.shape[1:]) for name, a in arrays)


def _places(layout: tuple, n_groups: int) -> tuple[list[tuple[str, np.dtype, tuple, int]], int]:
    """Where each array sits in an entry: (name, dtype, shape, offset), and the arrays' end."""
    out, at = [], 0
    for name, dtype, shape in layout:
        full = (n_groups,) + tuple(shape)
        out.append((name, np.dtype(dtype), full, at))
        at += -(-int(np.prod(full, dtype=np.int64)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return out, at


def model_folder(root: Path, src: dict) -> Path:
    """The folder of one model file's entries (source_of's description of it)."""
    name = os.fsencode(src["path"]) + f"\0{src['dev']}\0{src['ino']}".encode()  # any bytes a path may hold
    return root / hashlib.sha256(name).hexdigest()[:16]


class PackCache:
    """Loads and stores the repacked matrices of files read through mmap (see the module doc)."""

    def __init__(self, root: Path, lanes: int, dot: bool) -> None:
        self.root, self.lanes, self.dot = root, lanes, dot
        self.writable = True
        self._lock = threading.Lock()
        self._total: int | None = None  # bytes under root, as last counted plus what was written since
        self._seen: set[Path] = set()  # model folders used by this process (not evicted, touched once)

    @classmethod
    def open(cls, lanes: int, dot: bool) -> PackCache | None:
        return cls(cache_dir() / "packed", lanes, dot) if enabled() else None

    def _entry(self, qtype: GGMLType, tensors: list[Tensor], n_in: int) -> tuple[Path, dict] | None:
        src = source_of(tensors[0].data)
        if src is None or src["size"] < MIN_FILE_BYTES or any(source_of(t.data) != src for t in tensors[1:]):
            return None
        key = {"version": FORMAT_VERSION, "layouts": _layouts_digest(), "source": src, "qtype": int(qtype),
               "n_in": int(n_in), "lanes": self.lanes, "dot": self.dot,
               "tensors": [[t.name, int(t.offset), int(t.type), [int(d) for d in t.shape]] for t in tensors]}
        what = json.dumps([key["tensors"], key["lanes"], key["dot"]], sort_keys=True)
        name = hashlib.sha256(what.encode()).hexdigest()[:24] + ".pack"
        return model_folder(self.root, src) / name, key

    def load(self, qtype: GGMLType, tensors: list[Tensor], n_in: int) -> Packed | None:
        """The cached repacked matrix of `tensors` (merged in order), or None on a miss."""
        entry = self._entry(qtype, tensors, n_in)
        if entry is None:
            return None
        path, key = entry
        self._touch(path.parent)
        n_out = sum(int(np.prod(t.shape[:-1], dtype=np.int64)) for t in tensors)
        tiny, layout = _layout(GGMLType(qtype), n_in, self.lanes, self.dot)
        places, end = _places(layout, -(-n_out // self.lanes))
        try:
            buf = _map(path)
        except OSError:
            return None
        if buf is None:
            return None
        trailer = _trailer(buf)
        if trailer is None or trailer.get("key") != key or len(buf) != end + trailer["length"] + TAIL.size:
            return None
        if trailer.get("sum") != _checksum(buf, end):
            return None
        arrays = {}
        for name, dtype, shape, at in places:
            count = int(np.prod(shape, dtype=np.int64))
            a = np.frombuffer(buf, dtype, count, at) if count else np.zeros(0, dtype)
            arrays[name] = a.reshape(shape)
        return Packed(tiny.qtype, tiny.family, n_out, n_in, self.lanes, arrays, tiny.mode, tiny.offset)

    def store(self, qtype: GGMLType, tensors: list[Tensor], n_in: int, packed: Packed) -> None:
        """Write `packed` as the entry of `tensors`; on any failure, warn once and write no more."""
        if not self.writable:
            return
        entry = self._entry(qtype, tensors, n_in)
        if entry is None:
            return
        path, key = entry
        _, layout = _layout(GGMLType(qtype), n_in, self.lanes, self.dot)
        places, end = _places(layout, packed.n_groups)
        for name, dtype, shape, _ in places:  # what load() will expect
            a = packed.arrays.get(name)
            if a is None or a.dtype != dtype or a.shape != shape:
                return
        total = 0
        for name, dtype, shape, at in places:
            raw = np.ascontiguousarray(packed.arrays[name]).reshape(-1).view(np.uint8)
            whole = raw.size // 8 * 8  # the last word's missing bytes are the padding's zeros
            total += _checksum(raw, whole) + _checksum(np.concatenate([raw[whole:], np.zeros(8, np.uint8)]), 8)
        text = _encode({"key": key, "sum": total % 2**64})
        tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:  # loads may run on several threads (a server)
                if not self.writable or not self._room(path.parent, end + len(text)):
                    return
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    for name, dtype, shape, at in places:
                        for piece in _pieces(packed.arrays[name], at, places, end):
                            f.write(piece)
                    f.write(text + TAIL.pack(len(text), MAGIC))
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as e:
            with self._lock:
                self.writable = False
                _warn_once(f"cannot write {path.parent}: {e.strerror or e}")

    def _touch(self, folder: Path) -> None:
        """Marks a model's folder as used now (eviction goes by it), once per process."""
        if folder not in self._seen:
            self._seen.add(folder)
            try:
                os.utime(folder)
            except OSError:
                pass

    def _room(self, folder: Path, nbytes: int) -> bool:
        """Whether `nbytes` more fit: under MAX_BYTES after evicting least recently used model folders
        (not those this process uses), leaving MIN_FREE_BYTES of the disk free. Warns (once) when not."""
        if self._total is None or self._total + nbytes > MAX_BYTES:
            models = [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()]
            for p in [p for p in models if p not in self._seen and p != folder and _orphan(p)]:
                shutil.rmtree(p, ignore_errors=True)  # its model file is gone or replaced
                models.remove(p)
            sizes = {p: _sweep(p) for p in models}
            self._total = sum(sizes.values())
            for old in sorted((p for p in models if p not in self._seen and p != folder), key=_mtime):
                if self._total + nbytes <= MAX_BYTES:
                    break
                shutil.rmtree(old, ignore_errors=True)
                self._total -= sizes[old]
        free = shutil.disk_usage(folder).free
        if self._total + nbytes > MAX_BYTES or free - nbytes < MIN_FREE_BYTES:
            self.writable = False
            _warn_once(f"no room under {self.root} (bound {MAX_BYTES >> 30} GiB, {free >> 20} MiB free on its disk)")
            return False
        self._total += nbytes
        return True


def _pieces(a: np.ndarray, at: int, places: list, end: int) -> list[memoryview]:
    """Array `a` (placed at `at`) as bytes, then the zeros up to where the next array starts."""
    pad = min([p[3] for p in places if p[3] > at] + [end]) - at - a.nbytes
    raw = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return [raw, memoryview(bytes(pad))] if pad else [raw]


def _checksum(buf, nbytes: int) -> int:
    """The sum of the first `nbytes` (a multiple of 8) as little-endian uint64 words, modulo 2**64:
    against accidental corruption (crc32 took 3x as long, a third of a cached load)."""
    words = np.frombuffer(buf, "<u8", nbytes // 8) if nbytes else np.zeros(0, "<u8")
    return int(np.add.reduce(words, dtype=np.uint64))


def _encode(trailer: dict) -> bytes:
    return json.dumps(trailer, sort_keys=True, separators=(",", ":")).encode()


def _map(path: Path) -> mmap.mmap | None:
    """A private (copy-on-write) mapping of a regular file, or None: the kernels take writable arrays
    (numba compiles read-only ones apart), and nothing writes to them, so no page is ever copied."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < TAIL.size:
            return None
        return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)


def _trailer(buf: mmap.mmap) -> dict | None:
    n, magic = TAIL.unpack_from(buf, len(buf) - TAIL.size)
    if magic != MAGIC or n > min(MAX_TRAILER, len(buf) - TAIL.size):
        return None
    try:
        trailer = json.loads(bytes(buf[len(buf) - TAIL.size - n:len(buf) - TAIL.size]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return {**trailer, "length": n} if isinstance(trailer, dict) else None


def _orphan(folder: Path) -> bool:
    """Whether a model's folder is left from a file that no longer exists (or is another file now):
    judged by one entry's key. A folder without a readable entry counts after an hour (a process
    may be about to write its first)."""
    try:
        for e in os.scandir(folder):
            if e.name.endswith(".pack") and e.is_file(follow_symlinks=False):
                buf = _map(Path(e.path))
                trailer = _trailer(buf) if buf is not None else None
                src = trailer.get("key", {}).get("source") if trailer else None
                if isinstance(src, dict) and isinstance(src.get("path"), str):
                    st = os.stat(src["path"])
                    return (st.st_ino, st.st_dev) != (src.get("ino"), src.get("dev"))
        return time.time() - folder.stat().st_mtime > 3600
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):
        return False


def _sweep(folder: Path) -> int:
    """The bytes of a model folder's files, after removing temporary ones left for over an hour (by a
    process that died while writing)."""
    total = 0
    try:
        for e in os.scandir(folder):
            if e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                if e.name.endswith(".tmp") and time.time() - st.st_mtime > 3600:
                    os.unlink(e.path)
                else:
                    total += st.st_size
    except OSError:
        pass
    return total


def _mtime(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return 0.0

