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

import math
import mmap
import os
import stat
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import FormatError, UsageError
from .formats.gguf import GGUF_MAGIC, GGUFFile, ValueType
from .perplexity import write_atomically
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


# -- computing one, as llama-imatrix does (tools/imatrix/imatrix.cpp)

MIN_ROWS = 16  # llama-imatrix skips products of fewer rows (a dense weight's; an expert's count all)


@dataclass
class ImatrixRun:
    """What `compute_imatrix` collected: per weight, the column sums of its inputs' squares (float64,
    (n_mat, n_in): one row per expert, one for a dense weight) and the rows counted per expert, over
    `chunk_count` chunks of `chunk_size` tokens; the perplexity of the chunks' second halves."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    chunk_count: int
    chunk_size: int
    datasets: list[str]
    ppl: float
    seconds: float

    def save(self, path: str | os.PathLike, legacy: bool = False) -> None:
        """Write it as llama-imatrix does: GGUF (`<name>.in_sum2`, `<name>.counts`, names sorted), or
        with `legacy` its .dat form. Written whole or not at all."""
        names = sorted(self.sums)
        if legacy:
            write_atomically(path, lambda f: f.write(self._dat(names)))
            return
        from .formats.gguf import GGUFWriter

        w = GGUFWriter(path)
        w.add("general.type", "imatrix")
        w.add("imatrix.datasets", list(self.datasets), ValueType.ARRAY, ValueType.STRING)
        w.add("imatrix.chunk_count", self.chunk_count, ValueType.UINT32)
        w.add("imatrix.chunk_size", self.chunk_size, ValueType.UINT32)
        for name in names:
            s, c = self.sums[name].astype(np.float32), self.counts[name].astype(np.float32)
            # ggml drops a trailing dimension of 1: a dense weight's sums are one row, its count one value
            w.add_tensor(f"{name}.in_sum2", s.reshape(-1) if len(s) == 1 else s)
            w.add_tensor(f"{name}.counts", c if len(c) == 1 else c.reshape(-1, 1))
        w.write()

    def _dat(self, names: list[str]) -> bytes:
        """llama-imatrix's --output-format dat: per entry the mean squares times ncall (the chunks, rounded
        up, of its largest count); an expert that saw no token stores 1 (an entry none did is left out)."""
        out = []
        for name in names:
            s, c = self.sums[name], self.counts[name]
            if not c.any():
                continue
            ncall = int(-(-int(c.max()) // self.chunk_size))
            mean = np.where(c[:, None] > 0, s / np.maximum(c, 1)[:, None], 1.0)
            raw = name.encode("utf-8")
            out.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, s.size)
                       + (mean * ncall).astype("<f4").tobytes())
        dataset = (self.datasets[-1] if self.datasets else "").encode("utf-8")
        return (struct.pack("<i", len(out)) + b"".join(out) + struct.pack("<ii", self.chunk_count, len(dataset))
                + dataset)


def compute_imatrix(llm: Any, text: str | Sequence[int], n_ctx: int = 512, chunks: int | None = None, batch: int = 512,
                    process_output: bool = False, dataset: str = "",
                    on_chunk: Callable[[int, int, dict], None] | None = None, ppl: bool = True) -> ImatrixRun:
    """llama-imatrix's importance matrix of `llm` (a loaded `purelm.LLM`, numba or numpy backend) over
    `text` (a str, or its token ids with BOS first where the model adds one): cut into chunks of
    `n_ctx` tokens as `perplexity` cuts it (at most `chunks`), each chunk evaluated from an empty
    context, `batch` tokens a pass (at least 16 each: llama-imatrix counts no smaller product); every
    product of a layer's weight (and of output.weight with `process_output`) adds its input rows'
    squares to that weight's column sums.
    `dataset`: the text's file name, kept in the matrix (llama-quantize copies it into the model).
    `on_chunk(c, n_chunk, row)` after each chunk (row: ppl so far, seconds). `ppl=False` skips the
    perplexity (NaN) and with it the second halves' output products, unless `process_output`."""
    from .perplexity import count_chunks, text_tokens, token_nll

    # (llama-imatrix skips products of fewer rows: with passes of fewer, nothing would be counted)
    n_ctx, batch = _positive("n_ctx", n_ctx, MIN_ROWS), _positive("batch", batch, MIN_ROWS)
    chunks = None if chunks is None else _positive("chunks", chunks, 1)
    tokens = np.asarray(text_tokens(llm.tokenizer, text) if isinstance(text, str) else
                        [_positive("token id", t, 0, llm.n_vocab - 1) for t in text], np.int64)
    n_chunk = count_chunks(len(tokens), n_ctx, chunks, "an importance matrix")
    bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
    model, backend = llm.model, llm.backend
    sums = _Sums(_weight_names(model))
    if not any(name.startswith("blk.") for _, names in sums.names.values() for name, _, _ in names):
        raise UsageError(f"compute_imatrix: the {backend.name} backend's weights do not name their tensors "
                         "(use the numba or numpy backend)")
    if getattr(backend, "finish_compiling", None):  # a first start's stand-in ops would not be seen
        backend.finish_compiling()
    if any(name in vars(backend) for name in _Collector.OPS):
        raise UsageError("compute_imatrix: the backend's ops are replaced on this instance; load the model again")
    t0 = time.perf_counter()
    first, step = n_ctx // 2, min(batch, n_ctx)
    nll, count = 0.0, 0
    with _Collector(backend, sums):
        cache = model.new_cache(n_ctx)
        for c in range(n_chunk):
            ids = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
            if bos is not None:
                ids[0] = bos
            seq = cache.add()
            try:
                scored = []
                for p0 in range(0, n_ctx, step):
                    p1 = min(p0 + step, n_ctx)
                    # every row's logits where output.weight is counted (llama-imatrix asks for all)
                    want = process_output or (ppl and p1 > first)
                    (out,) = model.forward_batch(cache, [(seq, ids[p0:p1])], want)
                    if want:
                        scored.append(out[max(0, first - p0):])
            finally:
                cache.remove(seq)
            if ppl:
                v = token_nll(np.concatenate(scored)[:n_ctx - 1 - first],
                              tokens[c * n_ctx + first + 1:(c + 1) * n_ctx])
                nll, count = nll + float(v.sum()), count + len(v)
            if on_chunk:
                on_chunk(c, n_chunk, {"chunk": c + 1, "ppl": math.exp(nll / count) if count else math.nan,
                                      "seconds": time.perf_counter() - t0})
    keep = {n for n in sums.sums if n.startswith("blk.") or (process_output and n == "output.weight")}
    # as llama-imatrix: the chunks its counts hold (a chunk's last pass of under 16 rows counts nothing)
    chunk_count = max((int(sums.counts[n].max()) // n_ctx for n in keep), default=0)
    return ImatrixRun({n: sums.sums[n] for n in keep}, {n: sums.counts[n] for n in keep}, chunk_count, n_ctx,
                      [dataset] if dataset else [], math.exp(nll / count) if count else math.nan,
                      time.perf_counter() - t0)


def _positive(name: str, value: Any, lo: int, hi: int = 2**31 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise UsageError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r:.80}")
    return int(value)


def _weight_names(model: Any) -> dict[int, tuple[Any, list[tuple[str, int, int]]]]:
    """id(weight) -> (the weight, its tensors' (name, expert, experts)) for every matrix the model's
    layers hold: a backend's weight made of file tensors (a Tensor, or an object with `tensors`), a
    list of them (q, k, v unmerged), an `Experts` layer's expert e (index e of its stacks)."""
    from .backends.base import Backend
    from .formats.gguf import Tensor
    from .lora import AdaptedOps
    from .models.experts import Experts

    found: dict[int, tuple[Any, list[tuple[str, int, int]]]] = {}
    seen: set[int] = set()

    def tensors_of(w: Any) -> list | None:
        if isinstance(w, Tensor):
            return [w] if len(w.shape) == 2 else None
        ts = getattr(w, "tensors", None)
        return ts if isinstance(ts, list) and ts and all(isinstance(t, Tensor) for t in ts) else None

    def add(w: Any, expert: int = 0, n: int = 1) -> bool:
        if isinstance(w, (list, tuple)) and w and all(tensors_of(v) for v in w):
            names = [x for v in w if add(v, expert, n) for x in found[id(v)][1]]
            found[id(w)] = (w, list(dict.fromkeys(names)))
            return True
        ts = tensors_of(w)
        if ts is not None:  # (a matrix split in two, Phi-3's gate|up, names its tensor once)
            found[id(w)] = (w, list(dict.fromkeys((t.name, expert, n) for t in ts)))
        return ts is not None

    def walk(obj: Any, depth: int) -> None:
        # (an adapter's halves are not the model's: their products are left out)
        skip = (Backend, AdaptedOps, np.ndarray, str, bytes, int, float, type)
        if id(obj) in seen or depth > 8 or isinstance(obj, skip):
            return
        seen.add(id(obj))
        if isinstance(obj, Experts):
            for ws in (obj.gate_up, obj.down):
                for e, w in enumerate(ws):
                    add(w, e, len(ws))
            add(obj.router)
            return
        if add(obj):
            return
        children = obj if isinstance(obj, (list, tuple)) else obj.values() if isinstance(obj, dict) else \
            [v for k, v in vars(obj).items() if k != "gguf"] if hasattr(obj, "__dict__") else []
        for child in children:
            walk(child, depth + 1)

    walk(model, 0)
    return found


class _Sums:
    def __init__(self, names: dict[int, tuple[Any, list[tuple[str, int, int]]]]) -> None:
        self.names = names
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def add(self, w: Any, x: Any, ops: Any) -> None:
        entry = self.names.get(id(w))
        if entry is None or entry[0] is not w:
            return
        x = np.asarray(ops.to_numpy(x), np.float32)
        x = x.reshape(-1, x.shape[-1])
        rows = x.shape[0]
        squares = None
        for name, expert, n in entry[1]:
            if n == 1 and rows < MIN_ROWS:
                continue
            if squares is None:
                squares = np.square(x, dtype=np.float64).sum(axis=0)
            if name not in self.sums:
                self.sums[name], self.counts[name] = np.zeros((n, x.shape[1])), np.zeros(n, np.int64)
            if self.sums[name].shape != (n, x.shape[1]):
                raise UsageError(f"compute_imatrix: {name} takes inputs of {x.shape[1]} values, and of "
                                 f"{self.sums[name].shape[1]} before")
            self.sums[name][expert] += squares
            self.counts[name][expert] += rows


class _Collector:
    """For one compute_imatrix run, the ops a model calls with a weight, put on the backend instance
    over its class's (as interim.py's are): each first adds its input to that weight's sums. Only the
    model's own calls count: a backend's ops calling one another (glu its products) are not seen twice."""

    OPS = ("linear", "linear_many", "glu", "expert_ffn")

    def __init__(self, backend: Any, sums: _Sums) -> None:
        self.backend, self.sums, self.depth = backend, sums, 0
        self.cls = type(backend)

    def __enter__(self) -> "_Collector":
        for name in self.OPS:
            setattr(self.backend, name, getattr(self, name))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.OPS:
            self.backend.__dict__.pop(name, None)

    def _call(self, name: str, *args: Any) -> Any:
        self.depth += 1
        try:
            return getattr(self.cls, name)(self.backend, *args)
        finally:
            self.depth -= 1

    def _add(self, w: Any, x: Any) -> None:
        if self.depth == 0:
            self.sums.add(w, x, self.backend)

    def linear(self, x: Any, w: Any, bias: Any = None) -> Any:
        self._add(w, x)
        return self._call("linear", x, w, bias)

    def linear_many(self, x: Any, ws: Any) -> list[Any]:
        self._add(ws, x)
        return self._call("linear_many", x, ws)

    def glu(self, x: Any, w_gate_up: Any, act: str) -> Any:
        self._add(w_gate_up, x)
        return self._call("glu", x, w_gate_up, act)

    def expert_ffn(self, x: Any, gate_up: list[Any], down: list[Any], picks: np.ndarray, weights: np.ndarray,
                   act: str) -> Any:
        if self.depth == 0:  # one token's experts: their down products' inputs computed apart
            for e in picks:
                self._add(gate_up[e], x)
                self._add(down[e], self._call("glu", x, gate_up[e], act))
        return self._call("expert_ffn", x, gate_up, down, picks, weights, act)
