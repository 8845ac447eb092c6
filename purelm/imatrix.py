"""Importance matrices as llama.cpp's `llama-imatrix` writes them, read as `llama-quantize` reads them.

Two forms (common/imatrix-loader.cpp, tools/quantize/quantize.cpp):
- GGUF: per weight `<name>.in_sum2` (F32, one row of column sums of squared activations per expert) and
  `<name>.counts` (F32, the tokens seen per expert); keys imatrix.datasets / chunk_count / chunk_size.
  The weight of a column is in_sum2 / round(count), or 1 where an expert saw no token.
- legacy .dat: int32 entry count, then per entry: int32 name length, name, int32 ncall, int32 nval,
  nval float32 values (already mean * ncall); then optionally int32 chunk count, int32 length, dataset.
  The weight is value / ncall (the value itself when ncall <= 0).

Every count and size is checked against the file; non-finite or negative numbers are refused.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import FormatError
from .formats.gguf import GGUF_MAGIC, GGUFFile, ValueType
from .quant.types import GGMLType



@dataclass
class ImportanceMatrix:
    """Per-column weights by tensor name (float32, experts concatenated), and where they came from."""

    path: str
    weights: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    legacy: bool = False


def load_imatrix(path: str | os.PathLike) -> ImportanceMatrix:
    path = str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise FormatError(path, "file", "is not a regular file")
        with open(path, "rb") as f:
            magic = f.read(4)
        result = _load_gguf(path) if magic == GGUF_MAGIC else _load_legacy(path)
    except OSError as e:
        raise FormatError(path, "file", f"cannot be read: {e.strerror or e}") from None
    for name, w in result.weights.items():
        if not np.all(np.isfinite(w)):  # llama-quantize refuses these too
            raise FormatError(path, name, "importance matrix contains non-finite values")
        if np.any(w < 0):
            raise FormatError(path, name, "importance matrix contains negative values (sums of squares)")
    return result


def _load_gguf(path: str) -> ImportanceMatrix:
    f = GGUFFile(path)
    meta = f.metadata
    if not f.tensors:
        raise FormatError(path, "tensors", "no data (an importance matrix has at least one tensor)")
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in meta]
    if missing:
        raise FormatError(path, missing[0], "missing imatrix metadata (is this an imatrix file?)")
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        if meta.types[key] != ValueType.UINT32:
            raise FormatError(path, key, f"must be a uint32, found {meta.types[key].name}")
    datasets = []
    if meta.types["imatrix.datasets"] == ValueType.ARRAY and meta.array_types.get("imatrix.datasets") == ValueType.STRING:
        datasets = [str(s) for s in meta["imatrix.datasets"]]

    pairs: dict[str, list] = {}
    for name, t in f.tensors.items():
        for slot, suffix in enumerate((".in_sum2", ".counts")):
            if name.endswith(suffix) and len(name) > len(suffix):
                pairs.setdefault(name[: -len(suffix)], [None, None])[slot] = t
    weights = {}
    for name, (sums, counts) in pairs.items():
        if sums is None or counts is None:
            raise FormatError(path, name, "mismatched sums and counts (one of .in_sum2 / .counts is missing)")
        if sums.type != GGMLType.F32 or counts.type != GGMLType.F32:
            raise FormatError(path, name, "sums and counts must be F32")
        n_val, n_counts = sums.n_elements, counts.n_elements
        if n_val % n_counts:
            raise FormatError(path, name, f"{n_val} sums do not split evenly among {n_counts} counts")
        s = sums.data.view("<f4").reshape(n_counts, n_val // n_counts).astype(np.float32)
        c = counts.data.view("<f4").reshape(-1).astype(np.float64)
        if not np.all(np.isfinite(s)) or not np.all(np.isfinite(c)) or np.any(c < 0) or np.any(c >= 2.0 ** 62):
            raise FormatError(path, name, "sums or counts are not finite, or a count is negative or huge")
        # llama.cpp: count = (float) lround(count); weight = sum / count, or 1 where count is 0
        c = np.floor(c + 0.5).astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(c > 0, s / np.where(c > 0, c, np.float32(1)), np.float32(1)).astype(np.float32)
        weights[name] = w.reshape(-1)
    if not weights:
        raise FormatError(path, "tensors", "no <name>.in_sum2 / <name>.counts tensors")
    return ImportanceMatrix(path, weights, datasets, int(meta["imatrix.chunk_count"]))


class _Reader:
    def __init__(self, path: str, data: mmap.mmap) -> None:
        self.path, self.data, self.pos = path, data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or n > self.left():
            raise FormatError(self.path, field, f"needs {n} bytes at offset {self.pos}, the file ends at "
                              f"{len(self.data)} (truncated?)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self, field: str) -> int:
        return struct.unpack("<i", self.take(4, field))[0]


def _load_legacy(path: str) -> ImportanceMatrix:
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise FormatError(path, "file", "is empty")
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # read only what the entries claim
    r = _Reader(path, data)
    n_entries = r.i32("entry count")
    if n_entries < 1 or n_entries * 12 > r.left():  # an entry takes at least 12 bytes
        raise FormatError(path, "entry count", f"{n_entries} entries: not an imatrix file (neither GGUF nor "
                          "llama.cpp's legacy .dat form), or truncated")
    weights = {}
    for i in range(n_entries):
        n = r.i32(f"entry #{i} name length")
        if not 0 < n <= 4096:
            raise FormatError(path, f"entry #{i} name length", f"{n} is not in 1..4096")
        name = r.take(n, f"entry #{i} name").decode("utf-8", "replace")
        ncall, nval = r.i32(f"{name} ncall"), r.i32(f"{name} value count")
        if nval < 1:
            raise FormatError(path, name, f"value count {nval} must be at least 1")
        values = np.frombuffer(r.take(4 * nval, f"{name} values"), "<f4").astype(np.float32)
        if name in weights:
            raise FormatError(path, name, "duplicate entry")
        if not np.all(np.isfinite(values)):
            raise FormatError(path, name, "values are not finite")
        weights[name] = values / np.float32(ncall) if ncall > 0 else values
    chunk_count, datasets = 0, []
    if r.left() >= 4:  # the trailer is optional
        chunk_count = max(0, r.i32("chunk count"))
        if r.left() >= 4:
            n = r.i32("dataset name length")
            if 0 < n <= r.left():
                datasets.append(r.take(n, "dataset name").split(b"\0")[0].decode("utf-8", "replace"))
    return ImportanceMatrix(path, weights, datasets, chunk_count, legacy=True)
