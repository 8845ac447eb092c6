"""Read-only, memory-mapped safetensors reader (Hugging Face checkpoints), validated like the GGUF reader."""
from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import FormatError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
MAX_HEADER = 100 << 20


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


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
        if n > min(MAX_HEADER, size - 8):
            raise FormatError(self.path, "header", f"length {n} is larger than the file")
        try:
            header = json.loads(bytes(self._map[8 : 8 + n]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(self.path, "header", f"is not valid JSON: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data = np.frombuffer(self._map, np.uint8, offset=8 + n)
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise FormatError(self.path, f"tensor {name!r}", "malformed header entry") from None
            if dtype not in _DTYPES:
                raise FormatError(self.path, f"tensor {name!r}", f"unsupported dtype {dtype}")
            want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
            if not (0 <= start <= end <= len(self._data)) or end - start != want:
                raise FormatError(self.path, f"tensor {name!r}", f"data offsets [{start}, {end}) do not fit "
                                  f"shape {shape} {dtype} inside the file")
            self.entries[name] = (dtype, shape, start, end)

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
        self.shards = [SafetensorsFile(f) for f in files]
        self.where = {name: shard for shard in self.shards for name in shard.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise FormatError(self.dir, f"tensor {name!r}", "is missing from the checkpoint")
        return self.where[name].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].entries[name][1]
