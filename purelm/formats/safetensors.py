"""Read-only, memory-mapped safetensors reader (Hugging Face checkpoints), validated like the GGUF reader:
a checkpoint is untrusted input, so every header field is checked before it is used."""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
MAX_HEADER = 100 << 20  # the safetensors library's own limit
MAX_DIMS = 8  # checkpoint tensors have at most 4; numpy's limit is 64


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a repeated key (two entries for one tensor) is an error, not last-one-wins."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _kind(x: Any) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(x), "number")


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 40 else r[:37] + "..."


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise FormatError(self.path, "header", "file is too short to be safetensors")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise FormatError(self.path, "file", f"cannot be opened: {e.strerror or e}") from None
        (n,) = struct.unpack_from("<Q", self._map, 0)
        if n == 0:
            raise FormatError(self.path, "header", "length is 0: no header")
        if n > size - 8:
            raise FormatError(self.path, "header", f"length {n} is larger than the file ({size} bytes)")
        if n > MAX_HEADER:
            raise FormatError(self.path, "header", f"length {n} is over the {MAX_HEADER}-byte limit")
        try:
            header = json.loads(bytes(self._map[8 : 8 + n]), object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise FormatError(self.path, "header", f"is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise FormatError(self.path, "header", f"is a JSON {_kind(header)}, expected an object")
        meta = header.pop("__metadata__", None)
        self.metadata = {} if meta is None else meta
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise FormatError(self.path, "__metadata__", "must be an object of strings")
        self._data = np.frombuffer(self._map, np.uint8, offset=8 + n)
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info)
        # Each tensor owns its bytes: overlapping ranges would alias one tensor's data as another's.
        spans = sorted((start, end, name) for name, (_, _, start, end) in self.entries.items() if end > start)
        for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise FormatError(self.path, f"tensor {n1!r}", f"overlapping tensor data (with tensor {n0!r})")

    def _entry(self, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
        def bad(problem: str) -> FormatError:
            return FormatError(self.path, f"tensor {name!r}", problem)

        if not isinstance(info, dict):
            raise bad(f"header entry is a JSON {_kind(info)}, expected an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"unsupported dtype {_short(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise bad(f"shape {_short(shape)} is not a list of non-negative integers")
        if len(shape) > MAX_DIMS:
            raise bad(f"shape has {len(shape)} dimensions (at most {MAX_DIMS})")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise bad(f"data_offsets {_short(offsets)} is not a list of two integers")
        start, end = offsets
        if not 0 <= start <= end <= len(self._data):
            raise bad(f"data offsets [{_short(start)}, {_short(end)}) are outside the file's "
                      f"{len(self._data)} data bytes")
        want = math.prod(shape) * _DTYPES[dtype].itemsize  # Python ints: no overflow
        if end - start != want:
            raise bad(f"data offsets [{start}, {end}) hold {end - start} bytes, but shape {_short(tuple(shape))} "
                      f"{dtype} needs {_short(want)}")
        if math.prod(s for s in shape if s) * _DTYPES[dtype].itemsize >= 1 << 62:  # numpy refuses such shapes
            raise bad(f"shape {_short(tuple(shape))} is too large")
        return dtype, tuple(shape), start, end

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> Iterator[str]:
        return iter(self.entries)

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (a copy) for float dtypes, else its own dtype (a view)."""
        dtype, shape, start, end = self.entries[name]
        raw = self._data[start:end].view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32) if dtype in ("F16", "F64") else raw


class Checkpoint:
    """All the safetensors shards of a Hugging Face model directory, as one name -> tensor mapping."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise FormatError(self.dir, "checkpoint", "holds no *.safetensors files")
        for f in files:
            if not f.is_file():  # opening a fifo would block
                raise FormatError(f, "file", "is not a regular file")
        self.shards = [SafetensorsFile(f) for f in files]
        self.where: dict[str, SafetensorsFile] = {}
        for shard in self.shards:
            for name in shard.keys():
                if name in self.where:
                    raise FormatError(shard.path, f"tensor {name!r}", f"is also in {self.where[name].path}")
                self.where[name] = shard

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise FormatError(self.dir, f"tensor {name!r}", "is missing from the checkpoint")
        return self.where[name].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.where:
            raise FormatError(self.dir, f"tensor {name!r}", "is missing from the checkpoint")
        return self.where[name].entries[name][1]

    def largest_dim(self) -> int:
        """The largest dimension of any non-empty tensor: no size in the config can exceed it, and it is
        at most the checkpoint's byte size, so a size checked against it allocates nothing absurd."""
        return max((max(s) for s in (self.shape(n) for n in self.where) if s and math.prod(s)), default=1)
