"""GGUF reader and writer.

The reader memory-maps the file once, read-only. Tensors are numpy views into that map, so opening a
file copies no tensor data. Every count, size and offset is checked against the file's length before it
is used: a corrupt or hostile file raises `FormatError`, never an out-of-bounds read or a huge
allocation. Large string arrays (the vocabulary) are decoded on first access.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from ..errors import FormatError
from ..quant.types import BLOCK_INFO, GGMLType, type_name

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
LAZY_ARRAY_MIN = 64  # string arrays at least this long are decoded on first access


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_DTYPES = {
    ValueType.UINT8: np.dtype("<u1"),
    ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.BOOL: np.dtype("?"),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}
# Smallest encoding of one element, used to bound counts by the bytes left in the file.
_MIN_SIZE = {**{t: d.itemsize for t, d in _SCALAR_DTYPES.items()}, ValueType.STRING: 8, ValueType.ARRAY: 12}


@dataclass(frozen=True)
class Tensor:
    """One tensor of a GGUF file. `shape` is in numpy order (rows first); `data` is the packed bytes
    as a read-only uint8 view of shape (rows, bytes_per_row)."""

    name: str
    type: GGMLType
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> np.ndarray:
        """The tensor as float32 (a copy); for small tensors and tests, not for whole models."""
        from ..quant import dequantize

        return dequantize(self.data, self.type, self.shape)


class _Lazy:
    __slots__ = ("decode",)

    def __init__(self, decode: Callable[[], Any]) -> None:
        self.decode = decode


class Metadata(Mapping):
    """Key/value metadata; values decode on first access where they are large."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self.types: dict[str, ValueType] = {}  # the stored type of each key (arrays: ARRAY)
        self.array_types: dict[str, ValueType] = {}  # element type of each array key

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, _Lazy):
            value = self._values[key] = value.decode()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def array_length(self, key: str) -> int:
        value = self._values[key]
        return value.n if isinstance(value, _LazyStrings) else len(self[key])


class _LazyStrings(_Lazy):
    __slots__ = ("n",)

    def __init__(self, decode: Callable[[], Any], n: int) -> None:
        super().__init__(decode)
        self.n = n


class _Parser:
    """Bounds-checked cursor over the mapped file."""

    def __init__(self, path: str, buf: memoryview) -> None:
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, field: str, problem: str) -> FormatError:
        return FormatError(self.path, field, problem)

    def need(self, n: int, field: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(field, f"needs {n} bytes at offset {self.pos} but the file ends at {self.size} (truncated?)")

    def unpack(self, fmt: str, field: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, field)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self, field: str) -> str:
        n = self.unpack("<Q", field)
        self.need(n, field)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int, field: str) -> None:
        unpack, buf, pos, size = struct.unpack_from, self.buf, self.pos, self.size
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, field)
            pos += 8 + unpack("<Q", buf, pos)[0]
        self.pos = pos
        if pos > size:
            self.pos = size
            raise self.fail(field, "string data runs past the end of the file (truncated?)")

    def value_type(self, field: str) -> ValueType:
        raw = self.unpack("<I", field)
        try:
            return ValueType(raw)
        except ValueError:
            raise self.fail(field, f"unknown metadata value type {raw}") from None

    def count(self, elem: ValueType, field: str) -> int:
        n = self.unpack("<Q", field)
        if n * _MIN_SIZE[elem] > self.size - self.pos:
            raise self.fail(field, f"array of {n} elements cannot fit in the {self.size - self.pos} bytes left")
        return n

    def value(self, vtype: ValueType, field: str, depth: int = 0) -> Any:
        if vtype == ValueType.STRING:
            return self.string(field)
        if vtype in _SCALAR_DTYPES:
            dtype = _SCALAR_DTYPES[vtype]
            self.need(dtype.itemsize, field)
            value = np.frombuffer(self.buf, dtype, 1, self.pos)[0].item()
            self.pos += dtype.itemsize
            return value
        # ARRAY
        if depth > 8:
            raise self.fail(field, "arrays nested too deeply")
        elem = self.value_type(field)
        n = self.count(elem, field)
        if elem in _SCALAR_DTYPES:
            dtype = _SCALAR_DTYPES[elem]
            arr = np.frombuffer(self.buf, dtype, n, self.pos)
            self.pos += n * dtype.itemsize
            return arr
        if elem == ValueType.STRING and n >= LAZY_ARRAY_MIN and depth == 0:
            start = self.pos
            self.skip_strings(n, field)
            return _LazyStrings(lambda: _Parser(self.path, self.buf).at(start).strings(n, field), n)
        return [self.value(elem, field, depth + 1) for _ in range(n)]

    def at(self, pos: int) -> "_Parser":
        self.pos = pos
        return self

    def strings(self, n: int, field: str) -> list[str]:
        """n strings in a row (string(), with its checks, in one loop: a vocabulary has tens of
        thousands)."""
        unpack, buf, pos, size = struct.unpack_from, self.buf, self.pos, self.size
        out: list[str] = []
        append = out.append
        for _ in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, field)
            length = unpack("<Q", buf, pos)[0]
            pos += 8
            if pos + length > size:
                self.pos = pos
                self.need(length, field)
            raw = buf[pos:pos + length]
            pos += length
            try:
                append(str(raw, "utf-8"))
            except UnicodeDecodeError:
                append(str(raw, "utf-8", "replace"))
        self.pos = pos
        return out


class GGUFFile:
    """A GGUF file opened read-only: `metadata` (Mapping), `tensors` (dict name -> Tensor). The first
    shard of a split model (split.py) opens the whole model: `shards` lists its files, each tensor a view
    of its own shard; `join=False` opens one shard alone."""

    def __init__(self, path: str | os.PathLike, join: bool = True) -> None:
        self.path = str(path)
        self.shards = [self.path]
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):  # a FIFO or a device would block or never end
                raise FormatError(self.path, "file", "is not a regular file")
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise FormatError(self.path, "file", "is empty")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise FormatError(self.path, "file", f"cannot be opened: {e.strerror or e}") from None
        self.file_size = size
        self.metadata = Metadata()
        self.tensors: dict[str, Tensor] = {}
        self._parse(memoryview(self._mmap))
        if join and "split.count" in self.metadata:
            from .split import join_shards

            join_shards(self)

    def _parse(self, buf: memoryview) -> None:
        p = _Parser(self.path, buf)
        magic = bytes(buf[:4])
        if magic != GGUF_MAGIC:
            if magic in (b"lmgg", b"fmgg", b"tjgg"):
                raise p.fail("magic", "this is an older GGML/GGMF/GGJT file, not GGUF")
            raise p.fail("magic", f"expected b'GGUF', found {magic!r}: not a GGUF file")
        p.pos = 4
        version = p.unpack("<I", "version")
        if version not in (2, 3):
            if version & 0xFFFF == 0 and (version >> 24) in (1, 2, 3):
                raise p.fail("version", "file is big-endian; only little-endian GGUF files are supported")
            if version == 1:
                raise p.fail("version", "GGUF version 1 is not supported (re-convert the model)")
            raise p.fail("version", f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors = p.unpack("<Q", "tensor_count")
        n_kv = p.unpack("<Q", "metadata_kv_count")
        # A key/value takes at least 8 + 4 bytes and a tensor info 8 + 4 + 4 + 8.
        if n_kv * 12 > p.size - p.pos:
            raise p.fail("metadata_kv_count", f"{n_kv} entries cannot fit in a {p.size}-byte file")
        if n_tensors * 24 > p.size - p.pos:
            raise p.fail("tensor_count", f"{n_tensors} tensors cannot fit in a {p.size}-byte file")

        meta = self.metadata
        for i in range(n_kv):
            key = p.string(f"metadata key #{i}")
            if key in meta._values:
                raise p.fail(key, "duplicate metadata key")
            vtype = p.value_type(key)
            if vtype == ValueType.ARRAY:
                save = p.pos
                meta.array_types[key] = p.value_type(key)
                p.pos = save
            meta._values[key] = p.value(vtype, key)
            meta.types[key] = vtype

        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
            raise p.fail("general.alignment", f"must be a power of two, got {alignment!r}")
        self.alignment = alignment

        infos = []
        for i in range(n_tensors):
            name = p.string(f"tensor #{i} name")
            n_dims = p.unpack("<I", f"tensor {name!r} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise p.fail(f"tensor {name!r}", f"n_dims is {n_dims}; must be 1 to {MAX_DIMS}")
            dims = [p.unpack("<Q", f"tensor {name!r} dims") for _ in range(n_dims)]
            type_id = p.unpack("<I", f"tensor {name!r} type")
            offset = p.unpack("<Q", f"tensor {name!r} offset")
            infos.append((name, dims, type_id, offset))

        data_start = -(-p.pos // alignment) * alignment
        if not infos and data_start > p.size:
            # A vocabulary-only file (llama.cpp's models/ggml-vocab-*.gguf) ends right after its
            # metadata, without the padding; llama.cpp and gguf-py read it, and it has no data to bound.
            data_start = p.size
        if data_start > p.size:
            raise p.fail("tensor data", "file ends before the tensor data section (truncated?)")
        self.data_offset = data_start
        data_len = p.size - data_start
        whole = np.frombuffer(buf, np.uint8)

        spans = []
        for name, dims, type_id, offset in infos:
            field = f"tensor {name!r}"
            if name in self.tensors:
                raise p.fail(field, "duplicate tensor name")
            try:
                qtype = GGMLType(type_id)
                block, block_bytes = BLOCK_INFO[qtype]
            except (ValueError, KeyError):
                raise p.fail(field, f"unknown or unsupported tensor type id {type_id} ({type_name(type_id)})") from None
            if any(d == 0 or d > 1 << 40 for d in dims):
                raise p.fail(field, f"invalid dimensions {dims}")
            if dims[0] % block:
                raise p.fail(field, f"row length {dims[0]} is not a multiple of the {qtype.name} block size {block}")
            n_rows = 1
            for d in dims[1:]:
                n_rows *= d
            row_bytes = dims[0] // block * block_bytes
            nbytes = n_rows * row_bytes
            if offset % alignment:
                raise p.fail(field, f"data offset {offset} is not aligned to {alignment}")
            if offset > data_len or nbytes > data_len - offset:
                raise p.fail(field, f"data [{offset}, {offset + nbytes}) lies beyond the end of the file's "
                             f"{data_len}-byte data section (truncated?)")
            start = data_start + offset
            data = whole[start : start + nbytes].reshape(n_rows, row_bytes)
            shape = tuple(int(d) for d in reversed(dims))
            self.tensors[name] = Tensor(name, qtype, shape, start, data)
            spans.append((offset, offset + nbytes, name))

        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise p.fail(f"tensor {n1!r}", f"data overlaps tensor {n0!r}")

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def close(self) -> None:
        # Views into the map may still be alive; let the garbage collector unmap it then.
        self.tensors.clear()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)


# ----------------------------------------------------------------------------------------------- writer


def _infer_type(value: Any) -> ValueType:
    if isinstance(value, (bool, np.bool_)):
        return ValueType.BOOL
    if isinstance(value, (int, np.integer)):
        if 0 <= value < 1 << 32:
            return ValueType.UINT32
        return ValueType.INT32 if -(1 << 31) <= value < 1 << 31 else ValueType.INT64
    if isinstance(value, (float, np.floating)):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return ValueType.ARRAY
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _array_elem_type(value: Any) -> ValueType:
    if isinstance(value, np.ndarray):
        for vt, dt in _SCALAR_DTYPES.items():
            if dt == value.dtype.newbyteorder("<") or (vt == ValueType.BOOL and value.dtype == bool):
                return vt
        raise TypeError(f"unsupported array dtype {value.dtype}")
    if len(value) == 0 or isinstance(value[0], str):
        return ValueType.STRING
    if all(isinstance(v, (bool, np.bool_)) for v in value):
        return ValueType.BOOL
    if all(isinstance(v, (int, np.integer)) for v in value):
        return ValueType.INT32
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
        return ValueType.FLOAT32
    return ValueType.ARRAY


def _encode_value(value: Any, vtype: ValueType, elem: ValueType | None = None) -> bytes:
    if vtype == ValueType.STRING:
        raw = value.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    if vtype in _SCALAR_DTYPES:
        return np.array(value, _SCALAR_DTYPES[vtype]).tobytes()
    elem = elem if elem is not None else _array_elem_type(value)
    head = struct.pack("<IQ", elem, len(value))
    if elem in _SCALAR_DTYPES:
        return head + np.asarray(value, _SCALAR_DTYPES[elem]).tobytes()
    if elem == ValueType.STRING:
        return head + b"".join(_encode_value(v, ValueType.STRING) for v in value)
    return head + b"".join(_encode_value(v, ValueType.ARRAY) for v in value)


@dataclass
class _PendingTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    type: GGMLType
    nbytes: int
    source: Any  # an array of packed bytes / values, or a callable returning one


class GGUFWriter:
    """Writes a GGUF v3 file. Tensors may be given lazily (a callable returning the packed array), so a
    converter holds one tensor in memory at a time.

        w = GGUFWriter(path)
        w.add("general.architecture", "llama")
        w.add_tensor("token_embd.weight", packed_uint8_rows, GGMLType.Q8_0, shape=(vocab, dim))
        w.write()
    """

    def __init__(self, path: str | os.PathLike, alignment: int = DEFAULT_ALIGNMENT) -> None:
        self.path = str(path)
        self.alignment = alignment
        self.kv: dict[str, tuple[Any, ValueType, ValueType | None]] = {}
        self.tensors: list[_PendingTensor] = []
        if alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", alignment, ValueType.UINT32)

    def add(self, key: str, value: Any, vtype: ValueType | None = None, elem: ValueType | None = None) -> None:
        vtype = ValueType(vtype) if vtype is not None else _infer_type(value)
        if (vtype == ValueType.ARRAY) != isinstance(value, (list, tuple, np.ndarray)):
            raise TypeError(f"{key}: {type(value).__name__} value does not match GGUF type {vtype.name}")
        self.kv[key] = (value, vtype, elem)

    def add_tensor(self, name: str, data: Any, qtype: GGMLType | int | None = None,
                   shape: tuple[int, ...] | None = None) -> None:
        """`data`: a float32/float16 array (stored as F32/F16), or packed uint8 bytes with `qtype` and the
        logical `shape`; or a zero-argument callable returning such an array (then `shape` and `qtype`
        are required)."""
        if qtype is None:
            qtype = {np.dtype(np.float32): GGMLType.F32, np.dtype(np.float16): GGMLType.F16}[np.asarray(data).dtype]
        qtype = GGMLType(qtype)
        if shape is None:
            shape = np.asarray(data).shape
        shape = tuple(int(s) for s in shape)
        block, block_bytes = BLOCK_INFO[qtype]
        if shape[-1] % block:
            raise ValueError(f"{name}: row length {shape[-1]} is not a multiple of {qtype.name}'s block {block}")
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block * block_bytes)
        if any(t.name == name for t in self.tensors):
            raise ValueError(f"duplicate tensor {name!r}")
        self.tensors.append(_PendingTensor(name, shape, qtype, nbytes, data))

    def write(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Write the file; `progress(done_bytes, total_bytes)` is called after each tensor."""
        align = self.alignment
        pad = lambda n: -n % align  # noqa: E731
        head = bytearray(GGUF_MAGIC + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)))
        for key, (value, vtype, elem) in self.kv.items():
            head += _encode_value(key, ValueType.STRING) + struct.pack("<I", vtype)
            head += _encode_value(value, vtype, elem)
        offset = 0
        for t in self.tensors:
            head += _encode_value(t.name, ValueType.STRING) + struct.pack("<I", len(t.shape))
            head += struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))
            head += struct.pack("<IQ", t.type, offset)
            offset += t.nbytes + pad(t.nbytes)
        total = offset
        tmp = self.path + ".part"
        try:
            self._write_to(tmp, head, total, progress)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        os.replace(tmp, self.path)

    def _write_to(self, tmp: str, head: bytearray, total: int, progress: Callable[[int, int], None] | None) -> None:
        pad = lambda n: -n % self.alignment  # noqa: E731
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(b"\0" * pad(len(head)))
            done = 0
            for t in self.tensors:
                data = t.source() if callable(t.source) else t.source
                raw = np.ascontiguousarray(data)
                if raw.nbytes != t.nbytes:
                    raise ValueError(f"{t.name}: got {raw.nbytes} bytes, expected {t.nbytes} for "
                                     f"{t.type.name} {t.shape}")
                f.write(raw.tobytes() if raw.dtype.byteorder == ">" else memoryview(raw.reshape(-1).view(np.uint8)))
                f.write(b"\0" * pad(t.nbytes))
                done += t.nbytes + pad(t.nbytes)
                if progress:
                    progress(done, total)
