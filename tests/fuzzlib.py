"""Fuzzing purelm's model-file inputs: mutators, a crash-proof runner and a registry of targets.

A model file is untrusted input: nothing in it may crash, hang, run code or give a traceback; every bad
file must end in a `PurelmError`. This module makes hostile files and runs them in child processes.

  GGUF format   Our own small GGUF parser/emitter (independent of purelm's reader): `parse_gguf(bytes)`
                -> `GGUFDoc` (key/values with their raw encoding, tensor infos, the data section, and the
                position of every count/length/type field); `doc.to_bytes()` re-emits it, byte for byte
                the same when nothing changed.
  mutators      byte level (`mutate_bytes`: bit flips, random bytes, truncation, insert/delete, extreme
                values written over u64 counts/lengths and u32 type fields) and structure aware
                (`STRUCT_MUTATORS`: key/values and tensor infos changed, data kept). `hparam_cases`
                lists every {arch}.* / tokenizer.ggml.* key set to each extreme value or wrong type;
                those files stay structurally valid, so they reach the model build and generation.
  runner        `Runner`: a pool of worker processes (`python fuzzlib.py --worker ...`) reading case
                paths on stdin and answering one JSON line per case. A worker loads purelm and its numba
                kernels once. Outcomes: ok, purelm_error, traceback (any other exception), crash (the
                worker died: signal), hang (over `timeout`), oom (resident memory over `rss_limit_mb`,
                read from /proc every 50 ms). A dead, hung or bloated worker is killed (hung: after
                faulthandler dumps its stacks) and restarted; a crash or hang is confirmed by running the
                case again alone (see `Runner`).
  targets       `TARGETS`: what a worker does with one file. Adding a reader or a kernel = one entry.
  campaign      `run_campaign`: cases -> runner -> counts, and every failing input saved for replay.

Used by tools/fuzz.py (the long run), tests/test_fuzz.py (a quick CI run) and tests/test_cve.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAILURES = ("crash", "hang", "traceback", "oom")
CONFIRM_TIMES = 10  # a hang's confirmation runs alone with this many times the timeout (see Runner)
OUTCOMES = ("ok", "purelm_error") + FAILURES

# ------------------------------------------------------------------------------------------ GGUF format

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
              U64: "<Q", I64: "<q", F64: "<d"}
INT_TYPES = {U8: (0, 2**8 - 1), I8: (-2**7, 2**7 - 1), U16: (0, 2**16 - 1), I16: (-2**15, 2**15 - 1),
             U32: (0, 2**32 - 1), I32: (-2**31, 2**31 - 1), U64: (0, 2**64 - 1), I64: (-2**63, 2**63 - 1)}

# ggml tensor type id -> (weights per block, bytes per block) (ggml-common.h)
GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
               9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
               15: (256, 292), 20: (32, 18), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),
               28: (1, 8), 30: (1, 2)}
F32_TYPE, F16_TYPE = 0, 1


def tensor_nbytes(dims: list[int], type_id: int) -> int:
    """Bytes of a tensor with ggml `dims` (row length first); -1 when the type or row length is bad."""
    if type_id not in GGML_BLOCKS or not dims:
        return -1
    block, size = GGML_BLOCKS[type_id]
    if dims[0] % block:
        return -1
    n = dims[0] // block * size
    for d in dims[1:]:
        n *= d
    return n


def encode_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class Array:
    """A metadata array: element type and items (strings as bytes, nested arrays as Array)."""

    elem: int
    items: list


def encode_value(vtype: int, value: Any) -> bytes:
    """The encoding of a metadata value of type `vtype` (what follows the type field)."""
    if vtype == STRING:
        return encode_string(value)
    if vtype in SCALAR_FMT:
        return struct.pack(SCALAR_FMT[vtype], value)
    if vtype == ARRAY:
        arr = value if isinstance(value, Array) else Array(U32 if all(isinstance(v, int) for v in value) else STRING,
                                                           list(value))
        return struct.pack("<IQ", arr.elem, len(arr.items)) + b"".join(encode_value(arr.elem, v) for v in arr.items)
    raise ValueError(f"unknown value type {vtype}")


class _Cursor:
    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise ValueError(f"truncated at {self.pos}")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"truncated at {self.pos}")
        self.pos += n
        return self.buf[self.pos - n:self.pos]


@dataclass
class KV:
    key: str
    vtype: int
    raw: bytes  # the encoded value

    @property
    def value(self) -> Any:
        return decode_value(self.vtype, self.raw)


def decode_value(vtype: int, raw: bytes) -> Any:
    return _read_value(_Cursor(raw), vtype, None, ())


def _read_value(c: _Cursor, vtype: int, fields: list | None, label: tuple, depth: int = 0) -> Any:
    if vtype == STRING:
        if fields is not None:
            fields.append((c.pos, 8, label + ("len",)))
        return c.bytes(c.take("<Q"))
    if vtype in SCALAR_FMT:
        return c.take(SCALAR_FMT[vtype])
    if vtype != ARRAY or depth > 4:
        raise ValueError(f"bad value type {vtype}")
    if fields is not None:
        fields.append((c.pos, 4, label + ("elem_type",)))
        fields.append((c.pos + 4, 8, label + ("count",)))
    elem, n = c.take("<I"), c.take("<Q")
    if elem in SCALAR_FMT:
        size = struct.calcsize(SCALAR_FMT[elem])
        data = c.bytes(n * size)
        return Array(elem, [v[0] for v in struct.iter_unpack(SCALAR_FMT[elem], data)])
    items = []
    for i in range(n):  # string lengths: only the first few positions are kept for the byte mutators
        items.append(_read_value(c, elem, fields if i < 16 else None, label + (i,), depth + 1))
    return Array(elem, items)


@dataclass
class TensorInfo:
    name: str
    dims: list[int]  # ggml order: row length first
    type: int
    offset: int  # relative to the data section
    blob: bytes | None = None  # new data, placed by `to_bytes(relayout=True)`

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dims, self.type)


@dataclass
class GGUFDoc:
    """A parsed GGUF file that can be changed and emitted again."""

    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    data: bytes  # the data section (from the aligned end of the header)
    data_start: int = 0
    fields: list = field(default_factory=list)  # (pos, size, label) of counts, lengths, type ids
    n_tensors: int | None = None  # written instead of len(tensors) when set
    n_kv: int | None = None  # written instead of len(kvs) when set

    # -- key/values
    def index(self, key: str) -> int:
        for i, kv in enumerate(self.kvs):
            if kv.key == key:
                return i
        return -1

    def get(self, key: str, default: Any = None) -> Any:
        """The decoded value; `default` when absent or undecodable (a mutated type id)."""
        i = self.index(key)
        try:
            return self.kvs[i].value if i >= 0 else default
        except (ValueError, struct.error):
            return default

    def set(self, key: str, vtype: int, value: Any) -> None:
        kv = KV(key, vtype, encode_value(vtype, value))
        i = self.index(key)
        if i >= 0:
            self.kvs[i] = kv
        else:
            self.kvs.append(kv)

    def remove(self, key: str) -> None:
        self.kvs = [kv for kv in self.kvs if kv.key != key]

    @property
    def arch(self) -> str:
        a = self.get("general.architecture", b"")
        return a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a)

    def hp(self, name: str, default: Any = None) -> Any:
        """An {arch}.* value."""
        return self.get(f"{self.arch}.{name}", default)

    # -- tensors
    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def has_tensor(self, name: str) -> bool:
        return any(t.name == name for t in self.tensors)

    def tensor_bytes(self, name: str) -> bytes:
        t = self.tensor(name)
        if t.blob is not None:
            return t.blob
        return self.data[t.offset:t.offset + t.nbytes]

    def set_tensor(self, name: str, dims: list[int], type_id: int, blob: bytes) -> None:
        """Replace (or add) a tensor with new data; emit with `to_bytes(relayout=True)`."""
        new = TensorInfo(name, list(dims), type_id, 0, bytes(blob))
        for i, t in enumerate(self.tensors):
            if t.name == name:
                self.tensors[i] = new
                return
        self.tensors.append(new)

    def remove_tensor(self, name: str) -> None:
        self.tensors = [t for t in self.tensors if t.name != name]

    def copy(self) -> "GGUFDoc":
        tensors = [dataclasses.replace(t, dims=list(t.dims)) for t in self.tensors]
        return dataclasses.replace(self, kvs=list(self.kvs), tensors=tensors)

    def alignment(self) -> int:
        a = self.get("general.alignment", DEFAULT_ALIGNMENT)
        return a if isinstance(a, int) and 0 < a <= 1 << 16 and not a & (a - 1) else DEFAULT_ALIGNMENT

    def to_bytes(self, relayout: bool = False) -> bytes:
        """The file. `relayout`: place every tensor's data afresh (needed after `set_tensor`); otherwise
        the data section is kept as is and offsets are written as they stand."""
        return b"".join(self.to_chunks(relayout))

    def to_chunks(self, relayout: bool = False) -> list[bytes]:
        """The file as pieces (header, padding, data): no copy of a large data section."""
        align = self.alignment()
        data = self.data
        if relayout:
            parts, pos = [], 0
            for t in self.tensors:
                blob = self.tensor_bytes(t.name)
                t.offset, t.blob = pos, blob
                pad = -len(blob) % align
                parts += [blob, b"\0" * pad]
                pos += len(blob) + pad
            data = b"".join(parts)
        n_tensors = len(self.tensors) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        out = [GGUF_MAGIC, struct.pack("<IQQ", self.version, n_tensors, n_kv)]
        for kv in self.kvs:
            out += [encode_string(kv.key), struct.pack("<I", kv.vtype), kv.raw]
        for t in self.tensors:
            out += [encode_string(t.name), struct.pack("<I", len(t.dims)),
                    struct.pack(f"<{len(t.dims)}Q", *[d % 2**64 for d in t.dims]),
                    struct.pack("<IQ", t.type % 2**32, t.offset % 2**64)]
        head = b"".join(out)
        return [head, b"\0" * (-len(head) % align), data]


def parse_gguf(buf: bytes) -> GGUFDoc:
    """Parse a (well-formed) GGUF file; ValueError when it is not one."""
    c = _Cursor(buf)
    if c.bytes(4) != GGUF_MAGIC:
        raise ValueError("not a GGUF file")
    fields = [(4, 4, ("version",)), (8, 8, ("tensor_count",)), (16, 8, ("kv_count",))]
    version, n_tensors, n_kv = c.take("<I"), c.take("<Q"), c.take("<Q")
    if version not in (2, 3) or n_kv > len(buf) or n_tensors > len(buf):
        raise ValueError("unsupported GGUF header")
    kvs = []
    for i in range(n_kv):
        fields.append((c.pos, 8, ("kv", i, "key_len")))
        key = c.bytes(c.take("<Q")).decode("utf-8")
        fields.append((c.pos, 4, ("kv", key, "type")))
        vtype = c.take("<I")
        start = c.pos
        _read_value(c, vtype, fields, ("kv", key))
        kvs.append(KV(key, vtype, buf[start:c.pos]))
    tensors = []
    for i in range(n_tensors):
        fields.append((c.pos, 8, ("tensor", i, "name_len")))
        name = c.bytes(c.take("<Q")).decode("utf-8")
        fields.append((c.pos, 4, ("tensor", name, "n_dims")))
        n_dims = c.take("<I")
        if n_dims > 8:
            raise ValueError("too many dims")
        dims = []
        for j in range(n_dims):
            fields.append((c.pos, 8, ("tensor", name, "dim", j)))
            dims.append(c.take("<Q"))
        fields.append((c.pos, 4, ("tensor", name, "type")))
        fields.append((c.pos + 4, 8, ("tensor", name, "offset")))
        tensors.append(TensorInfo(name, dims, c.take("<I"), c.take("<Q")))
    doc = GGUFDoc(version, kvs, tensors, b"", fields=fields)
    align = doc.alignment()
    doc.data_start = -(-c.pos // align) * align
    doc.data = buf[doc.data_start:]
    return doc


def float_blob(values: Any) -> bytes:
    import numpy as np

    return np.asarray(values, np.float32).tobytes()


def nan_blob(type_id: int, nbytes: int) -> bytes:
    """Data of `nbytes` for a tensor of `type_id` whose every weight is NaN (F32/F16: every value;
    32-weight quantized blocks: every block's f16 scale)."""
    nan16 = struct.pack("<H", 0x7E00)
    if type_id == F32_TYPE:
        return struct.pack("<f", math.nan) * (nbytes // 4)
    if type_id == F16_TYPE:
        return nan16 * (nbytes // 2)
    block, size = GGML_BLOCKS[type_id]
    if block == 32:
        return (nan16 * 2 + b"\x11" * (size - 4)) * (nbytes // size)
    raise ValueError(f"no NaN recipe for type {type_id}")


def rows_blob(doc: GGUFDoc, name: str, n_rows: int) -> bytes:
    """The tensor's data cut or repeated to `n_rows` rows (row length kept)."""
    t = doc.tensor(name)
    row = tensor_nbytes(t.dims[:1], t.type)
    data = doc.tensor_bytes(name)
    reps = -(-n_rows * row // max(len(data), 1))
    return (data * max(reps, 1))[:n_rows * row]


# ----------------------------------------------------------------------------------------------- seeds

@dataclass
class Seed:
    path: str
    raw: bytes
    doc: GGUFDoc | None  # None: not a GGUF file (byte-level mutation only)

    @property
    def name(self) -> str:
        return Path(self.path).stem


def load_seed(path: str | os.PathLike, fmt: str = "gguf") -> Seed:
    raw = Path(path).read_bytes()
    return Seed(str(path), raw, parse_gguf(raw) if fmt == "gguf" else None)


# -------------------------------------------------------------------------------------- value mutations

U64_EXTREMES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
U32_EXTREMES = [0, 1, 13, 31, 2**16, 2**31 - 1, 2**31, 2**32 - 1]


def _int_type_for(value: int, prefer: int) -> int:
    for t in (prefer, U32, I32, U64, I64):
        if t in INT_TYPES and INT_TYPES[t][0] <= value <= INT_TYPES[t][1]:
            return t
    raise ValueError(value)


def value_mutations(kv: KV, n_vocab: int = 0) -> list[tuple[str, Callable[[GGUFDoc], None]]]:
    """(label, change) for one key: extreme integers (in the key's own type where it fits), NaN and
    infinities, wrong types (string, float, bool, array), removal and duplication."""
    key, vt = kv.key, kv.vtype
    out: list[tuple[str, Callable[[GGUFDoc], None]]] = []

    def setter(vtype: int, value: Any) -> Callable[[GGUFDoc], None]:
        return lambda doc: doc.set(key, vtype, value)

    prefer = vt if vt in INT_TYPES else U32
    ints = [0, -1, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1, -2**63]
    if n_vocab and key.endswith("_token_id"):
        ints += [n_vocab, n_vocab - 1]
    for v in ints:
        t = _int_type_for(v, prefer)
        out.append((f"={v}", setter(t, v)))
    for v in (math.nan, math.inf, -math.inf, 0.0, -1.0, 1e30, 1e-30):
        out.append((f"=f32:{v}", setter(F32, v)))
    out += [("=f64:nan", setter(F64, math.nan)),
            ("=str:'x'", setter(STRING, "x")), ("=str:''", setter(STRING, "")),
            ("=str:bad-utf8", setter(STRING, b"\xff\xfe\xc3")),
            ("=bool:true", setter(BOOL, True)), ("=bool:false", setter(BOOL, False)),
            ("=array:i32[1,2]", setter(ARRAY, Array(I32, [1, 2]))), ("=array:empty", setter(ARRAY, Array(I32, []))),
            ("=array:str['a']", setter(ARRAY, Array(STRING, [b"a"]))),
            (" removed", lambda doc: doc.remove(key)),
            (" duplicated", lambda doc: doc.kvs.append(doc.kvs[doc.index(key)])),
            (" duplicated-other-value", lambda doc: doc.kvs.append(KV(key, U32, encode_value(U32, 1))))]
    if vt == ARRAY and len(kv.raw) >= 12:
        n = struct.unpack_from("<Q", kv.raw, 4)[0]

        def array_setter(label: str, make: Callable[[], Array]) -> tuple[str, Callable[[GGUFDoc], None]]:
            return label, lambda doc: doc.set(key, ARRAY, make())

        def items() -> Array:  # decoded only when used (a vocabulary is large)
            return kv.value

        out += [array_setter("=array:first-only", lambda: Array(items().elem, items().items[:1])),
                array_setter("=array:one-short", lambda: Array(items().elem, items().items[:-1])),
                array_setter("=array:one-extra", lambda: Array(items().elem, items().items + items().items[-1:])),
                array_setter("=array:same-len-i32-extremes",
                             lambda: Array(I32, [(-1, 2**31 - 1, 0, -2**31)[i % 4] for i in range(n)])),
                array_setter("=array:same-len-f32-nan", lambda: Array(F32, [math.nan] * n)),
                array_setter("=array:same-len-bad-utf8", lambda: Array(STRING, [b"\xff\xc3"] * n)),
                array_setter("=array:same-len-empty-strings", lambda: Array(STRING, [b""] * n)),
                array_setter("=array:same-len-nested", lambda: Array(ARRAY, [Array(U8, [1])] * n))]
    return out


def hparam_keys(doc: GGUFDoc) -> list[KV]:
    arch = doc.arch
    return [kv for kv in doc.kvs if kv.key.startswith(arch + ".") or kv.key.startswith("tokenizer.ggml.")]


def n_vocab_of(doc: GGUFDoc) -> int:
    i = doc.index("tokenizer.ggml.tokens")
    if i < 0 or doc.kvs[i].vtype != ARRAY or len(doc.kvs[i].raw) < 12:
        return 0
    return struct.unpack_from("<Q", doc.kvs[i].raw, 4)[0]


# ------------------------------------------------------------------------------- structure mutators
# Each takes (rng, doc), changes the doc in place (tensor data kept) and returns a short description.

def m_kv_value(rng: random.Random, doc: GGUFDoc) -> str:
    keys = hparam_keys(doc) if rng.random() < 0.8 else doc.kvs
    kv = rng.choice(keys or doc.kvs)
    label, change = rng.choice(value_mutations(kv, n_vocab_of(doc)))
    change(doc)
    return f"kv {kv.key}{label}"


def m_kv_remove(rng: random.Random, doc: GGUFDoc) -> str:
    kv = rng.choice(doc.kvs)
    doc.remove(kv.key)
    return f"kv {kv.key} removed"


def m_kv_duplicate(rng: random.Random, doc: GGUFDoc) -> str:
    kv = rng.choice(doc.kvs)
    doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), kv)
    return f"kv {kv.key} duplicated"


def m_kv_retype(rng: random.Random, doc: GGUFDoc) -> str:
    """Same bytes, another type id: the value is read as something else from here on."""
    i = rng.randrange(len(doc.kvs))
    kv = doc.kvs[i]
    t = rng.choice([*range(13), 13, 2**31, 2**32 - 1])
    doc.kvs[i] = KV(kv.key, t, kv.raw)
    return f"kv {kv.key} type {kv.vtype}->{t}"


def m_alignment(rng: random.Random, doc: GGUFDoc) -> str:
    v = rng.choice([0, 1, 3, 8, 64, 2**31, 2**32 - 1])
    doc.set("general.alignment", U32, v)
    return f"general.alignment={v}"


def m_version(rng: random.Random, doc: GGUFDoc) -> str:
    doc.version = rng.choice([0, 1, 2, 4, 0x03000000, 2**32 - 1])
    return f"version={doc.version}"


def m_counts(rng: random.Random, doc: GGUFDoc) -> str:
    which = rng.choice(["n_tensors", "n_kv"])
    real = len(doc.tensors) if which == "n_tensors" else len(doc.kvs)
    v = rng.choice([0, real - 1, real + 1, 2**31 - 1, 2**32, 2**63, 2**64 - 1])
    setattr(doc, which, max(v, 0))
    return f"{which}={v}"


class _NoTensor(Exception):
    pass


def _pick_tensor(rng: random.Random, doc: GGUFDoc, want: Callable[[TensorInfo], bool] = lambda t: True) -> TensorInfo:
    ts = [t for t in doc.tensors if want(t)] or doc.tensors
    if not ts:
        raise _NoTensor
    return rng.choice(ts)


def m_dims_swap(rng: random.Random, doc: GGUFDoc) -> str:
    t = _pick_tensor(rng, doc, lambda t: len(t.dims) >= 2)
    t.dims = t.dims[::-1]
    return f"tensor {t.name} dims reversed -> {t.dims}"


def m_dim_scale(rng: random.Random, doc: GGUFDoc) -> str:
    t = _pick_tensor(rng, doc)
    j = rng.randrange(len(t.dims))
    old = t.dims[j]
    t.dims[j] = rng.choice([0, 1, old // 2, old - 1, old + 1, old * 2, 2**31 - 1, 2**32, 2**40, 2**63, 2**64 - 1])
    return f"tensor {t.name} dim[{j}] {old}->{t.dims[j]}"


def m_dim_add(rng: random.Random, doc: GGUFDoc) -> str:
    t = _pick_tensor(rng, doc)
    if rng.random() < 0.5 or len(t.dims) == 1:
        t.dims = t.dims + [rng.choice([1, 1, 2, 2**32])] * rng.choice([1, 1, 4])
    else:
        t.dims = t.dims[:-1]
    return f"tensor {t.name} dims -> {t.dims}"


def m_norm_2d(rng: random.Random, doc: GGUFDoc) -> str:
    """A 1-D tensor (norm, bias) stored as (n, 1) or (1, n)."""
    t = _pick_tensor(rng, doc, lambda t: len(t.dims) == 1)
    t.dims = [1, t.dims[0]] if rng.random() < 0.7 else [t.dims[0], 1]
    return f"tensor {t.name} 1-D -> dims {t.dims}"


def m_type(rng: random.Random, doc: GGUFDoc) -> str:
    t = _pick_tensor(rng, doc)
    old = t.type
    t.type = rng.choice(sorted(GGML_BLOCKS) + [4, 5, 16, 31, 39, 2**31 - 1, 2**32 - 1])
    return f"tensor {t.name} type {old}->{t.type}"


def m_offset(rng: random.Random, doc: GGUFDoc) -> str:
    t = _pick_tensor(rng, doc)
    old, align, end = t.offset, doc.alignment(), len(doc.data)
    other = rng.choice(doc.tensors).offset
    t.offset = rng.choice([0, other, old + align, max(old - align, 0), old + 1, end, end - align,
                           end + align, 2**63, 2**64 - align, (2**64 - align) - old])
    return f"tensor {t.name} offset {old}->{t.offset}"


def m_tensor_remove(rng: random.Random, doc: GGUFDoc) -> str:
    t = _pick_tensor(rng, doc)
    doc.tensors.remove(t)
    return f"tensor {t.name} removed"


def m_tensor_duplicate(rng: random.Random, doc: GGUFDoc) -> str:
    t = _pick_tensor(rng, doc)
    doc.tensors.append(dataclasses.replace(t, dims=list(t.dims)))
    return f"tensor {t.name} duplicated"


def m_tensor_rename(rng: random.Random, doc: GGUFDoc) -> str:
    t = _pick_tensor(rng, doc)
    old = t.name
    t.name = rng.choice([rng.choice(doc.tensors).name, "", "blk.99.attn_q.weight", "blk.-1.attn_q.weight",
                         old.replace("blk.0.", "blk.1.") if "blk.0." in old else old + ".x", old + "\ufffd"])
    return f"tensor {old} renamed {t.name!r}"


STRUCT_MUTATORS: list[Callable[[random.Random, GGUFDoc], str]] = [
    m_kv_value, m_kv_value, m_kv_value, m_kv_value, m_kv_remove, m_kv_duplicate, m_kv_retype, m_alignment,
    m_version, m_counts, m_dims_swap, m_dim_scale, m_dim_add, m_norm_2d, m_norm_2d, m_type, m_offset,
    m_tensor_remove, m_tensor_duplicate, m_tensor_rename]


def mutate_doc(rng: random.Random, doc: GGUFDoc) -> str:
    """One random structure mutation of `doc`, in place."""
    mutator = rng.choice(STRUCT_MUTATORS)
    try:
        return mutator(rng, doc)
    except _NoTensor:  # a file without tensors (a tokenizer-only file)
        return m_kv_value(rng, doc)


# ------------------------------------------------------------------------------------ byte mutators

def _pos(rng: random.Random, n: int, header_end: int) -> int:
    """A position, mostly inside the header (where the structure is)."""
    if n <= 0:
        return 0
    if rng.random() < 0.8 and header_end > 0:
        return rng.randrange(min(header_end, n))
    return rng.randrange(n)


def mutate_bytes(rng: random.Random, buf: bytearray, fields: list, header_end: int) -> str:
    """One byte-level change of `buf` in place; returns its description. `fields`: (pos, size, label)
    of the seed's counts/lengths (u64) and type ids (u32)."""
    kind = rng.choice(["bitflip", "bitflip", "bytes", "truncate", "insert", "delete", "u64", "u64", "u64",
                       "u32", "u32", "interesting"])
    n = len(buf)
    if n == 0:
        buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        return f"{len(buf)} random bytes for an empty file"
    if kind == "bitflip":
        p = _pos(rng, n, header_end)
        bit = rng.randrange(8)
        buf[p] ^= 1 << bit
        return f"bitflip @{p}.{bit}"
    if kind == "bytes":
        p, k = _pos(rng, n, header_end), rng.randint(1, 8)
        buf[p:p + k] = bytes(rng.randrange(256) for _ in range(len(buf[p:p + k])))
        return f"random bytes @{p}+{k}"
    if kind == "truncate":
        p = _pos(rng, n, header_end)
        del buf[p:]
        return f"truncate @{p}"
    if kind == "insert":
        p, k = _pos(rng, n, header_end), rng.randint(1, 16)
        buf[p:p] = bytes(rng.randrange(256) for _ in range(k))
        return f"insert @{p}+{k}"
    if kind == "delete":
        p, k = _pos(rng, n, header_end), rng.randint(1, 16)
        del buf[p:p + k]
        return f"delete @{p}+{k}"
    if kind in ("u64", "u32") and n >= 8:
        size = 8 if kind == "u64" else 4
        cands = [f for f in fields if f[1] == size and f[0] + size <= n]
        if not cands:  # no known fields (a re-emitted file): an aligned spot in the header
            p = _pos(rng, n - size, header_end) // size * size
            cands = [(p, size, (f"@{p}",))]
        p, _, label = rng.choice(cands)
        v = rng.choice(U64_EXTREMES if size == 8 else U32_EXTREMES)
        if size == 8 and rng.random() < 0.2:  # near the real value
            v = max(0, struct.unpack_from("<Q", buf, p)[0] + rng.choice([-1, 1, 8, -8])) % 2**64
        struct.pack_into("<Q" if size == 8 else "<I", buf, p, v)
        return f"{'.'.join(map(str, label))}={v}"
    p = _pos(rng, n, header_end)
    buf[p] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF])
    return f"interesting byte @{p}={buf[p]}"


def mutate_gguf(rng: random.Random, seed: Seed, kind: str = "any") -> tuple[Any, list[str]]:
    """One random mutant of a seed: structure-aware changes, byte-level changes, or both (`kind`
    "struct": structure-aware only). The bytes are returned as bytes or a list of pieces (`write_file`)."""
    r = rng.random() * (0.55 if kind == "struct" else 1.0)
    r = r + 0.1 if kind == "struct" and r < 0.1 else r
    desc: list[str] = []
    if r < 0.55:
        doc = seed.doc.copy()
        for _ in range(1 if rng.random() < 0.7 else 2):
            desc.append(mutate_doc(rng, doc))
        if r >= 0.1:
            return doc.to_chunks(), desc
        buf = bytearray(doc.to_bytes())  # and a byte-level change on top
        desc.append(mutate_bytes(rng, buf, [], seed.doc.data_start))
        return buf, desc
    buf = bytearray(seed.raw)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 4])):
        desc.append(mutate_bytes(rng, buf, seed.doc.fields, seed.doc.data_start))
    return buf, desc


# ------------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    id: str
    seed: str  # path of the seed file ("" for a file given as is)
    mutations: list[str]
    make: Callable[[], Any] | None = None  # the file's bytes or pieces (made when the case is dispatched)
    path: str | None = None  # or: an existing file, run as is


def write_file(path: str | os.PathLike, data: Any) -> None:
    """Write bytes, or a list of byte pieces, to `path`."""
    with open(path, "wb") as f:
        for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
            f.write(piece)


def as_bytes(data: Any) -> bytes:
    """Bytes from what a case's `make` returns (bytes or pieces)."""
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else b"".join(data)


def random_cases(seeds: list[Seed], n: int, seed: int = 0, start: int = 0, kind: str = "any",
                 fmt: str = "gguf") -> Iterator[Case]:
    """`n` random mutants by the mutator of format `fmt` (see `mutate_gguf` for `kind`). Case i depends
    only on (seed, i, kind, the seed files), not on the order of runs."""
    prefix = "r" if kind == "any" else kind[0]
    for i in range(start, start + n):
        rng = random.Random(f"{seed}:{i}" if kind == "any" else f"{seed}:{kind}:{i}")
        s = rng.choice(seeds)
        data, desc = FORMATS[fmt](rng, s, kind)
        yield Case(f"{prefix}{i:07d}", s.path, desc, make=lambda data=data: data)


def hparam_cases(seeds: list[Seed], n: int | None = None, seed: int = 0) -> Iterator[Case]:
    """Every {arch}.* and tokenizer.ggml.* key of every seed set to every value of `value_mutations`
    (in a fixed shuffled order; the first `n`). Tensor data untouched: the files are well formed."""
    plan = []
    for si, s in enumerate(seeds):
        if s.doc is None:
            continue
        n_vocab = n_vocab_of(s.doc)
        for kv in hparam_keys(s.doc):
            for j, (label, _) in enumerate(value_mutations(kv, n_vocab)):
                plan.append((si, kv.key, j, label))
    random.Random(seed).shuffle(plan)
    for i, (si, key, j, label) in enumerate(plan[:n]):
        s = seeds[si]

        def make(s: Seed = s, key: str = key, j: int = j) -> bytes:
            doc = s.doc.copy()
            kv = doc.kvs[doc.index(key)]
            value_mutations(kv, n_vocab_of(doc))[j][1](doc)
            return doc.to_chunks()

        yield Case(f"h{i:06d}", s.path, [f"kv {key}{label}"], make=make)


def file_cases(paths: Iterable[str | os.PathLike]) -> Iterator[Case]:
    for p in paths:
        yield Case(Path(p).stem, "", [], path=str(p))


# ------------------------------------------------------------------------------------------ targets
# A target runs in a worker: `run(path, ctx)` does the work for one file and returns a short summary, or
# raises. `warm(seed_paths, ctx)` runs once when a worker starts (load kernels, open the seeds).

@dataclass
class Target:
    name: str
    run: Callable[[str, "WorkerContext"], Any]
    warm: Callable[[list[str], "WorkerContext"], None] | None = None
    format: str = "gguf"  # which mutators make its inputs
    doc: str = ""


@dataclass
class WorkerContext:
    backend_name: str = "numba"
    threads: int = 1
    prompt: str = "Hello"
    max_tokens: int = 2
    n_ctx: int | None = None
    fresh_backend: bool = False
    backend: Any = None  # one backend per worker (kernels loaded once), unless fresh_backend

    def get_backend(self) -> Any:
        from purelm.backends import get_backend

        if self.fresh_backend:
            return get_backend(self.backend_name, self.threads)
        if self.backend is None:
            self.backend = get_backend(self.backend_name, self.threads)
        return self.backend


def touch_gguf(path: str) -> Any:
    from purelm.formats.gguf import GGUFFile

    f = GGUFFile(path)
    for key in f.metadata:  # decode every value (the large arrays are lazy)
        f.metadata[key]
    total = 0
    for t in f.tensors.values():  # read the first and last byte of every tensor
        if t.data.size:
            total += int(t.data.reshape(-1)[0]) + int(t.data.reshape(-1)[-1])
    return f


def run_parse(path: str, ctx: WorkerContext) -> str:
    f = touch_gguf(path)
    return f"{len(f.metadata)} keys, {len(f.tensors)} tensors"


def warm_backend(seeds: list[str], ctx: WorkerContext) -> None:
    backend = ctx.get_backend()
    try:
        from purelm.backends.numba_kernels.rows import ROW_TYPES

        if ctx.backend_name == "numba":  # every kernel of every type, so no case waits for a compile
            backend.prepare(set(ROW_TYPES))
    except Exception:
        pass
    for s in seeds:
        try:
            run_generate(s, ctx)
        except Exception:
            pass


def run_generate(path: str, ctx: WorkerContext) -> str:
    import purelm

    llm = purelm.load(path, backend=ctx.get_backend(), n_ctx=ctx.n_ctx)
    if not llm.model.causal:  # an embedding model (BERT): its one computation, a reranker's too
        if getattr(llm.model, "n_cls_out", 0):
            return str(llm.rerank(ctx.prompt, [ctx.prompt, "x"]))
        return str(llm.embed(ctx.prompt).shape)
    return llm.generate(ctx.prompt, max_tokens=ctx.max_tokens, temperature=0)


def run_matvec(path: str, ctx: WorkerContext) -> str:
    """The backend's kernels on every tensor of the file, whatever the model: a matrix through
    `weight` + `linear` (decode and prefill sizes) and `embed`; a vector through `vector`."""
    import numpy as np

    f = touch_gguf(path)
    backend = ctx.get_backend()
    backend.prepare({t.type for t in f.tensors.values() if len(t.shape) >= 2})
    for t in f.tensors.values():
        if len(t.shape) >= 2:
            w = backend.weight(t)
            for n_tok in (1, 16):
                x = np.linspace(-1, 1, n_tok * t.shape[-1], dtype=np.float32).reshape(n_tok, t.shape[-1])
                backend.to_numpy(backend.linear(x, w))
            backend.to_numpy(backend.embed(w, np.array([0, t.n_elements // t.shape[-1] - 1])))
        else:
            backend.vector(t)
    return f"{len(f.tensors)} tensors"


_POISONED = []


def run_selftest(path: str, ctx: WorkerContext) -> str:
    """For testing the runner itself: the file's first word says what to do ("poison": the next case in
    this worker crashes, as after a kernel's out-of-bounds write)."""
    word = Path(path).read_bytes().split(b" ")[0]
    if word == b"poison":
        _POISONED.append(True)
        return "poisoned"
    if word == b"segv" or _POISONED:
        os.kill(os.getpid(), signal.SIGSEGV)
    if word == b"hang":
        while True:
            time.sleep(0.01)
    if word == b"oom":
        hog = []
        while True:
            hog.append(b"\1" * (64 << 20))  # touched, so resident
    if word == b"raise":
        raise KeyError("boom")
    if word == b"purelm":
        from purelm.errors import FormatError

        raise FormatError(path, "field", "bad")
    if word == b"exit":
        os._exit(3)
    return "fine"


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("gguf-parse", run_parse, doc="purelm's GGUF reader: every key decoded, every tensor's bytes touched"),
    Target("model-build+generate", run_generate, warm_backend,
           doc="purelm.load (model build, tokenizer) then a short greedy generation (an embedding model: "
               "an embedding)"),
    Target("backend-matvec", run_matvec, warm_backend,
           doc="the backend's kernels (weight, linear, embed, vector) on every tensor of the file"),
    Target("selftest", run_selftest, format="raw", doc="checks the runner: crash, hang, oom, traceback on demand"),
    Target("legacy-load+generate", run_generate, warm_backend, format="ggml",
           doc="legacy ggml/ggmf/ggjt files (tests/fixtures/legacy): purelm.load then a short generation"),
]}

def mutate_raw(rng: random.Random, seed: Seed, kind: str = "any") -> tuple[bytearray, list[str]]:
    """Byte-level mutants of any file (a format without a structure-aware mutator yet)."""
    buf = bytearray(seed.raw)
    desc = [mutate_bytes(rng, buf, [], min(len(buf), 4096)) for _ in range(rng.choice([1, 1, 2, 3]))]
    return buf, desc


# ------------------------------------------------------------------ legacy ggml / ggmf / ggjt files
# A small reader of their structure, independent of purelm's: where every i32 field sits, so that the
# mutator can write extreme values over counts, lengths, type ids and dimensions.

LEGACY_MAGICS = {b"lmgg": False, b"fmgg": True, b"tjgg": True}  # magic -> has a version and vocabulary scores
# (hyperparameter words, index of n_vocab among them) of the seven architectures' layouts
LEGACY_LAYOUTS = [(7, 0), (6, 0), (8, 0), (8, 4)]


def legacy_fields(raw: bytes) -> tuple[list[tuple[int, int, tuple]], int]:
    """(fields, end of the first tensor header) of a legacy file: (pos, 4, label) for the version, every
    hyperparameter, the first vocabulary lengths and every tensor header's i32s. ([], 0) when the file
    does not parse."""
    if raw[:4] not in LEGACY_MAGICS:
        return [], 0
    versioned = LEGACY_MAGICS[raw[:4]]
    start = 8 if versioned else 4
    for n_words, at in LEGACY_LAYOUTS:
        fields = [(4, 4, ("version",))] if versioned else []
        try:
            c = _Cursor(raw, start)
            words = [c.take("<i") for _ in range(n_words)]
            fields += [(start + 4 * i, 4, ("hparam", i)) for i in range(n_words)]
            n_vocab = words[at]
            if not 0 < n_vocab <= len(raw) // 4:
                continue
            for i in range(n_vocab):
                if i < 8:
                    fields.append((c.pos, 4, ("token", i, "length")))
                c.pos += 4 + c.take("<I") + (4 if versioned else 0)
            header_end, index = 0, 0
            while c.pos < len(raw):
                at_header = c.pos
                n_dims, name_len, type_id = c.take("<i"), c.take("<i"), c.take("<i")
                if not (1 <= n_dims <= 4 and 1 <= name_len <= 4096 and type_id in GGML_BLOCKS):
                    raise ValueError("not a tensor header")
                dims = [c.take("<i") for _ in range(n_dims)]
                labels = ["n_dims", "name_len", "type"] + [f"dim{k}" for k in range(n_dims)]
                fields += [(at_header + 4 * k, 4, ("tensor", index, lab)) for k, lab in enumerate(labels)]
                c.pos += name_len
                header_end = header_end or c.pos
                if raw[:4] == b"tjgg":
                    c.pos = -(-c.pos // 32) * 32
                c.pos += _legacy_data_size(raw, c.pos, dims, type_id)
                index += 1
            if index:
                return fields, header_end
        except (ValueError, struct.error):
            continue
    return [], 0


def _legacy_data_size(raw: bytes, pos: int, dims: list[int], type_id: int) -> int:
    """Bytes of a tensor's data: GGUF's block size, or the f32-scale blocks of q4_0, q4_1 and q8_0 before
    ggjt v3 (20, 24 and 36 bytes) when only that size ends at the file's end or at a tensor header."""
    n = tensor_nbytes(dims, type_id)
    sizes = [n]
    if type_id in (2, 3, 8) and n > 0:
        sizes.append(n // GGML_BLOCKS[type_id][1] * {2: 20, 3: 24, 8: 36}[type_id])
    for size in sizes:
        end = pos + size
        if size >= 0 and (end == len(raw) or end + 12 <= len(raw) and 1 <= struct.unpack_from("<i", raw, end)[0] <= 4):
            return size
    raise ValueError("tensor data past the end")


_LEGACY_FIELDS: dict[str, tuple[list, int]] = {}


def mutate_ggml(rng: random.Random, seed: Seed, kind: str = "any") -> tuple[bytearray, list[str]]:
    """Byte-level mutants of a legacy seed, the i32 fields of its structure favoured."""
    if seed.path not in _LEGACY_FIELDS:
        _LEGACY_FIELDS[seed.path] = legacy_fields(seed.raw)
    fields, header_end = _LEGACY_FIELDS[seed.path]
    buf = bytearray(seed.raw)
    desc = [mutate_bytes(rng, buf, fields, header_end or 4096) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    return buf, desc


# ------------------------------------------------------------------------------- purelm session files
# magic (8), version u32, u32, header length u64, JSON header, padding, keys/values/logits (purelm/session.py)

SESSION_MODEL = Path(__file__).parent / "fixtures" / "llama-q8_0.gguf"  # the model session seeds are made with
SESSION_FIELDS = [(16, 8, ("header length",)), (8, 4, ("version",))]
SESSION_VALUES = [0, 1, -1, 2**31, 2**63, -2**63, 10**30, 0.5, float("inf"), "7", True, None, [], {}, [[[[1]]]]]


def _session_header(raw: bytes) -> tuple[dict, int] | None:
    try:
        n = struct.unpack_from("<Q", raw, 16)[0]
        return json.loads(raw[24:24 + n]), 24 + n
    except (struct.error, ValueError):
        return None


def mutate_session(rng: random.Random, seed: Seed, kind: str = "any") -> tuple[bytearray, list[str]]:
    """A session file with one header value replaced (a number, list, type or nesting it must refuse),
    or byte-level changes anywhere, the header length and version favoured."""
    parsed = _session_header(seed.raw)
    roll = rng.random()
    if parsed is not None and roll < 0.2 and len(seed.raw) > parsed[1] + 8:  # the keys, values, logits: any bytes
        buf = bytearray(seed.raw)
        for _ in range(rng.choice([1, 4, 16])):
            p = rng.randrange(parsed[1] + 8, len(buf))
            buf[p] = rng.randrange(256)
        return buf, ["data bytes"]
    if parsed is None or roll < 0.5:
        buf = bytearray(seed.raw)
        desc = [mutate_bytes(rng, buf, SESSION_FIELDS, parsed[1] if parsed else 64)
                for _ in range(rng.choice([1, 1, 2]))]
        return buf, desc
    header, end = parsed
    paths = [(k,) for k in header] + [("model", k) for k in header["model"]] + [("cache", k) for k in header["cache"]]
    paths += [("tokens", i) for i in (0, -1)] if header["tokens"] else []
    where = rng.choice(paths)
    value = rng.choice(SESSION_VALUES + ["x" * rng.choice([1, 1000])])
    node = header
    for key in where[:-1]:
        node = node[key]
    if rng.random() < 0.15 and where[0] == "tokens":
        header["tokens"] = header["tokens"][:rng.randrange(len(header["tokens"]) + 1)] + [1] * rng.randrange(3)
        desc = [f"tokens: {len(header['tokens'])} of them"]
    else:
        node[where[-1]] = value
        desc = [f"{'.'.join(map(str, where))} = {value!r:.40}"]
    head = json.dumps(header).encode()
    data = seed.raw[end + (-end % 8):]
    out = bytearray(seed.raw[:16] + struct.pack("<Q", len(head)) + head + b"\0" * (-(24 + len(head)) % 8) + data)
    return out, desc


def session_seeds(folder: str | os.PathLike) -> list[str]:
    """Two session files of SESSION_MODEL written into `folder`: one after a prompt and a reply (the
    last prompt's logits, a conversation), one empty. Returns their paths."""
    import purelm
    from purelm.backends.numpy_backend import NumpyBackend

    llm = purelm.load(SESSION_MODEL, backend=NumpyBackend(), n_ctx=64)
    llm.complete(list(range(5, 15)), max_tokens=4, temperature=0, ignore_eos=True)
    paths = [str(Path(folder) / "session-a.kv"), str(Path(folder) / "session-b.kv")]
    llm.save_session(paths[0], messages=[{"role": "user", "content": "hello"}])
    llm.reset()
    llm.save_session(paths[1])
    return paths


_SESSION_LLM: list = []


def run_session(path: str, ctx: WorkerContext) -> str:
    """purelm's session reader: load_session into a model (the one the seeds were saved with), then a
    short greedy generation from the restored state."""
    import purelm

    if not _SESSION_LLM:
        _SESSION_LLM.append(purelm.load(SESSION_MODEL, backend=ctx.get_backend(), n_ctx=64))
    llm = _SESSION_LLM[0]
    llm.reset()
    llm.load_session(path)
    return llm.generate(llm.cache.tokens + [1], max_tokens=ctx.max_tokens, temperature=0)


TARGETS["session-load+generate"] = Target(
    "session-load+generate", run_session, format="session",
    doc="purelm session files (saved with tests/fixtures/llama-q8_0.gguf): load_session, then a short generation")


# Mutators by input format: (rng, seed, kind) -> (bytes or pieces, descriptions). A reader of a new
# format (safetensors) can start with "raw" and add a structure-aware mutator here later.
FORMATS: dict[str, Callable[[random.Random, Seed, str], tuple[Any, list[str]]]] = {
    "gguf": mutate_gguf, "raw": mutate_raw, "ggml": mutate_ggml, "session": mutate_session}


# ------------------------------------------------------------------------------------------- worker

def _frame(tb: Any) -> str:
    frames = traceback.extract_tb(tb)
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}"


def _purelm_frame(tb: Any) -> str:
    for f in reversed(traceback.extract_tb(tb)):
        if "/purelm/" in f.filename:
            return f"{f.filename.split('/purelm/')[-1]}:{f.lineno} in {f.name}"
    return ""


def _clip(s: str, n: int = 400) -> str:
    return s if len(s) <= n else s[:n] + "..."


def worker_main(config: dict) -> None:
    """Read case paths from stdin, one per line; answer one JSON line per case on the original stdout.
    Anything else the code prints goes to stderr (the worker's log)."""
    import faulthandler
    import warnings

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    faulthandler.enable(sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, sys.stderr, all_threads=True)  # the parent's "where are you?"
    warnings.simplefilter("ignore")
    target = TARGETS[config["target"]]
    ctx = WorkerContext(**config.get("context", {}))
    from purelm.errors import PurelmError

    if target.warm:
        target.warm(config.get("warm", []), ctx)
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        path = line.rstrip("\n")
        t0 = time.perf_counter()
        rec: dict[str, Any]
        try:
            result = target.run(path, ctx)
            rec = {"outcome": "ok", "result": _clip(repr(result), 100)}
        except BaseException as e:  # noqa: BLE001 (the point: classify everything)
            tb = e.__traceback__
            rec = {"outcome": "purelm_error" if isinstance(e, PurelmError) else "traceback",
                   "exc": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                   "message": _clip(str(e)), "frame": _frame(tb), "purelm_frame": _purelm_frame(tb)}
            if not isinstance(e, PurelmError):
                rec["traceback"] = "".join(traceback.format_exception(type(e), e, tb, limit=-8))[-3000:]
            del tb, e
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        proto.write(json.dumps(rec) + "\n")


# ------------------------------------------------------------------------------------------- runner

def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _fault_frame(log: str) -> str:
    """The innermost Python frame of the crashing thread in a faulthandler dump."""
    lines = log.splitlines()
    for start in ("Current thread", "Thread"):
        for i, line in enumerate(lines):
            if line.startswith(start) and "most recent call first" in line:
                for frame in lines[i + 1:]:
                    frame = frame.strip()
                    if frame.startswith("File "):
                        return frame
                    if not frame or frame.startswith(("Thread", "Current thread")):
                        break
                if start == "Current thread":
                    return "(no Python frame: a native thread, e.g. a numba worker)"
    return ""


class _Worker:
    KEEP = 3  # finished cases whose files are kept: the suspects when a later case crashes

    def __init__(self, runner: "Runner", index: int) -> None:
        self.runner, self.index = runner, index
        self.log_path = os.path.join(runner.log_dir, f"worker-{index}.log")
        self.retry: Case | None = None  # a crashed or hung case to run again alone, in a fresh worker
        self.first: dict | None = None  # its first record
        self.suspects: list[Case] = []  # the cases this worker ran before the crash
        self.history: list[Case] = []
        self.start()

    def start(self) -> None:
        r = self.runner
        config = {"target": r.target, "warm": r.warm, "context": r.context}
        threads = str(max(1, r.context.get("threads", 1)))
        # PURELM_PACK_CACHE=0: every mutated file would leave its repacked weights in the user's cache
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   NUMBA_NUM_THREADS=threads, PURELM_NUM_THREADS=threads, PURELM_PACK_CACHE="0")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     start_new_session=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.case: Case | None = None
        self.sent = 0.0
        self.log_pos = 0
        self.peak_rss = 0.0

    def send(self, case: Case) -> None:
        self.case, self.sent, self.peak_rss = case, time.monotonic(), 0.0
        self.log.flush()
        self.log_pos = os.path.getsize(self.log_path)
        self.proc.stdin.write((case.path + "\n").encode())
        self.proc.stdin.flush()

    def lines(self) -> list[dict]:
        try:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return []
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in done if x.strip()]

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_pos)
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self, dump: bool = False) -> None:
        if self.proc.poll() is None:
            if dump:  # faulthandler prints every thread's stack to the log
                try:
                    os.kill(self.proc.pid, signal.SIGUSR1)
                    time.sleep(0.3)
                except OSError:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
        self.proc.wait()
        self.close_pipes()

    def close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            try:
                f.close()
            except OSError:
                pass

    def restart(self) -> None:
        self.kill()
        self.runner.restarts += 1
        self.start()


def _forget(cases: list[Case]) -> None:
    for c in cases:
        if c.make is not None and c.path and os.path.exists(c.path):
            os.unlink(c.path)


class Runner:
    """Runs files through a target in `workers` child processes; see the module doc for outcomes.

        with Runner("model-build+generate", workers=2, warm=seed_paths) as r:
            for case, record in r.run(cases): ...

    A crash or hang is confirmed by running the case again alone in a fresh worker (a hang with
    `confirm_times` the time, CONFIRM_TIMES unless told: a case that reaches a kernel no earlier case compiled spends its first run
    compiling it, and a killed worker leaves nothing in numba's cache, so the confirmation compiles it
    again from the start). A crash that does not happen again keeps outcome "crash" with `reproducible: False`, what the
    case gives alone, and `previous_files`: the worker's previous cases, the likely culprits (an
    out-of-bounds write in a kernel can corrupt memory and crash a later case)."""

    def __init__(self, target: str = "model-build+generate", workers: int = 2, backend: str = "numba",
                 threads: int = 1, timeout: float = 20.0, rss_limit_mb: float = 2048, warm: Iterable[str] = (),
                 work_dir: str | None = None, log_dir: str | None = None, warm_timeout: float = 900.0,
                 confirm: bool = True, confirm_times: float = CONFIRM_TIMES, **context: Any) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
        self.target, self.timeout, self.rss_limit_mb, self.warm_timeout = target, timeout, rss_limit_mb, warm_timeout
        self.confirm_times = confirm_times
        self.confirm = confirm
        self.warm = [str(p) for p in warm]
        self.context = dict(backend_name=backend, threads=threads, **context)
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self._own_work = work_dir is None
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="purelm-fuzz-", dir=shm)
        self.log_dir = log_dir or self.work_dir
        os.makedirs(self.work_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.restarts = 0
        self.idle_deaths = 0  # workers that died between cases
        self.workers = [_Worker(self, i) for i in range(workers)]

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        if self._own_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def wait_ready(self) -> None:
        """Block until every worker has started (kernels loaded, seeds run once)."""
        while not all(w.ready for w in self.workers):
            select.select([w.proc.stdout for w in self.workers if w.proc.poll() is None], [], [], 0.05)
            for w in self.workers:
                for _ in self._check(w):
                    pass

    def run_one(self, path: str | os.PathLike) -> dict:
        return next(self.run([Case(Path(path).stem, "", [], path=str(path))]))[1]

    def run(self, cases: Iterable[Case]) -> Iterator[tuple[Case, dict]]:
        """Yields (case, record) as cases finish (not in order). A made case's file exists until the
        consumer returns from handling its record."""
        pending = iter(cases)
        exhausted = False
        while True:
            for w in self.workers:  # hand out work
                if not w.ready or w.case is not None:
                    continue
                if w.retry is not None:
                    case, w.retry = w.retry, None
                    w.send(case)
                elif not exhausted:
                    case = next(pending, None)
                    if case is None:
                        exhausted = True
                        continue
                    if case.make is not None:
                        case.path = os.path.join(self.work_dir, f"{case.id}.gguf")
                        write_file(case.path, case.make())
                    w.send(case)
            if exhausted and not any(w.case is not None or w.retry is not None for w in self.workers):
                for w in self.workers:
                    _forget(w.history)
                    w.history = []
                return
            alive = [w for w in self.workers if w.proc.poll() is None]
            if alive:
                select.select([w.proc.stdout for w in alive], [], [], 0.05)
            for w in self.workers:
                yield from self._check(w)

    def _finish(self, w: _Worker, case: Case, rec: dict) -> Iterator[tuple[Case, dict]]:
        w.case = None
        rec.setdefault("seconds", round(time.monotonic() - w.sent, 4))
        first, w.first = w.first, None
        suspects, w.suspects = w.suspects, []
        if first is not None:  # this was the confirming run
            if first["outcome"] == "crash" and rec["outcome"] != "crash":
                alone = {k: rec[k] for k in ("outcome", "exc", "message") if k in rec}
                rec = dict(first, reproducible=False, alone=alone,
                           message=f"{first['message']}, but alone the case gives {rec['outcome']}: an earlier "
                                   f"case in the same worker probably corrupted memory (previous_files)",
                           previous_cases=[c.id for c in suspects], previous_files=[c.path for c in suspects])
            else:
                rec = dict(rec, reproducible=rec["outcome"] == first["outcome"],
                           first_try={k: v for k, v in first.items() if k != "log"})
        try:
            yield case, rec
        finally:
            _forget(suspects)
            w.history.append(case)
            _forget(w.history[:-_Worker.KEEP])
            del w.history[:-_Worker.KEEP]

    def _fail(self, w: _Worker, case: Case, rec: dict) -> Iterator[tuple[Case, dict]]:
        """A crash, hang or oom: restart the worker, and run a first crash or hang again alone."""
        if w.first is None:
            w.suspects, w.history = w.history, []
        w.restart()
        if self.confirm and w.first is None and rec["outcome"] in ("crash", "hang"):
            w.first, w.retry, w.case = rec, case, None
            return
        yield from self._finish(w, case, rec)

    def _check(self, w: _Worker) -> Iterator[tuple[Case, dict]]:
        for msg in w.lines():
            if msg.get("ready"):
                w.ready = True
            elif w.case is not None:
                yield from self._finish(w, w.case, msg)
        case = w.case
        if w.proc.poll() is not None:  # the worker died
            rc = w.proc.returncode
            if case is None:
                if not w.ready:
                    tail = w.log_tail()
                    w.close_pipes()
                    raise RuntimeError(f"fuzz worker died while starting (exit {rc}):\n{tail}")
                self.idle_deaths += 1
                w.restart()
                return
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            tail = w.log_tail()
            rec = {"outcome": "crash", "exc": how, "message": f"worker died: {how}", "frame": _fault_frame(tail),
                   "log": tail, "seconds": round(time.monotonic() - w.sent, 3)}
            yield from self._fail(w, case, rec)
            return
        if case is None:
            if not w.ready and time.monotonic() - w.started > self.warm_timeout:
                w.kill()
                raise RuntimeError(f"fuzz worker did not start within {self.warm_timeout} s:\n{w.log_tail()}")
            return
        elapsed = time.monotonic() - w.sent
        timeout = self.timeout * (self.confirm_times if w.first is not None else 1)
        rss = rss_mb(w.proc.pid)
        w.peak_rss = max(w.peak_rss, rss)
        if elapsed > timeout or rss > self.rss_limit_mb:
            outcome = "hang" if elapsed > timeout else "oom"
            w.kill(dump=True)
            tail = w.log_tail()
            detail = (f"over {timeout:g} s" if outcome == "hang"
                      else f"resident memory {rss:.0f} MB > {self.rss_limit_mb:g} MB")
            rec = {"outcome": outcome, "exc": outcome, "message": detail, "frame": _fault_frame(tail),
                   "log": tail, "peak_rss_mb": round(w.peak_rss), "seconds": round(elapsed, 3)}
            yield from self._fail(w, case, rec)


# ----------------------------------------------------------------------------------------- campaign

def signature(rec: dict) -> str:
    """What makes two failures the same bug: outcome, exception (or signal) and innermost frame."""
    frame = rec.get("purelm_frame") or rec.get("frame") or ""
    return f"{rec['outcome']}|{rec.get('exc', '')}|{frame}"


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    by_exception: dict = field(default_factory=dict)  # outcome -> Counter of exception class names
    signatures: dict = field(default_factory=dict)  # signature -> {count, example, saved}
    saved: list = field(default_factory=list)
    cases: int = 0
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return sum(self.counts[o] for o in FAILURES)

    def as_dict(self) -> dict:
        return {"cases": self.cases, "seconds": round(self.seconds, 2),
                "cases_per_second": round(self.cases / self.seconds, 2) if self.seconds else None,
                "counts": {o: self.counts[o] for o in OUTCOMES},
                "by_exception": {o: dict(c.most_common()) for o, c in self.by_exception.items()},
                "failure_signatures": [{"signature": s, **v} for s, v in
                                       sorted(self.signatures.items(), key=lambda kv: -kv[1]["count"])],
                "saved_inputs": self.saved}

    def summary(self) -> str:
        lines = [f"{self.cases} cases in {self.seconds:.1f} s: " +
                 ", ".join(f"{o} {self.counts[o]}" for o in OUTCOMES if self.counts[o])]
        for s, v in sorted(self.signatures.items(), key=lambda kv: -kv[1]["count"]):
            ex = v["example"]
            message = " ".join(ex.get("message", "").split())[:300]
            lines.append(f"  {v['count']:6d} x {s}\n         {message}\n"
                         f"         e.g. {ex.get('case')} {ex.get('mutations')}  saved: {v['saved'][:1]}")
        return "\n".join(lines)


def run_campaign(runner: Runner, cases: Iterable[Case], out_dir: str | None = None, keep_per_signature: int = 50,
                 progress: Any = None) -> Report:
    """Run `cases`, count outcomes, and save each failing input (at most `keep_per_signature` per
    signature; 0: all) with a .json beside it to `out_dir`/<outcome>/."""
    report = Report()
    t0 = time.monotonic()
    for case, rec in runner.run(cases):
        report.cases += 1
        outcome = rec["outcome"]
        report.counts[outcome] += 1
        if outcome != "ok":
            report.by_exception.setdefault(outcome, Counter())[rec.get("exc", "?")] += 1
        if outcome in FAILURES:
            sig = signature(rec)
            entry = report.signatures.setdefault(sig, {"count": 0, "example": {}, "saved": []})
            entry["count"] += 1
            info = {"case": case.id, "seed": case.seed, "mutations": case.mutations, "target": runner.target,
                    **{k: v for k, v in rec.items()}}
            if not entry["example"]:
                entry["example"] = {k: v for k, v in info.items() if k not in ("log", "traceback")}
            if out_dir and case.path and (keep_per_signature <= 0 or len(entry["saved"]) < keep_per_signature):
                dest = Path(out_dir) / outcome / f"{case.id}.gguf"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(case.path, dest)
                for k, prev in enumerate(rec.get("previous_files", []), 1):  # replay them first, in one worker
                    if os.path.exists(prev):
                        shutil.copyfile(prev, dest.with_name(f"{case.id}-prev{k}-{Path(prev).name}"))
                dest.with_suffix(".json").write_text(json.dumps(info, indent=1))
                entry["saved"].append(str(dest))
                report.saved.append(str(dest))
        if progress is not None:
            progress.update(1)
            progress.set_postfix({o: report.counts[o] for o in OUTCOMES if report.counts[o]}, refresh=False)
    report.seconds = time.monotonic() - t0
    return report


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    worker_main(json.loads(sys.argv[2]))
