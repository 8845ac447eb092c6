"""LoRA adapters: llama.cpp's adapter files (`convert_lora_to_gguf.py` writes them from a PEFT
checkpoint) applied at run time, as `llama-cli --lora` does, to a model whose weights stay packed:

    y = W·x + Σ s · B·(A·x),    s = scale · alpha / rank   (scale alone where the file's alpha is 0)

for every matrix W an adapter names (A: rank x in, B: out x rank). The model's code does not change:
`AdaptedOps` stands between the layers and the backend and adds the adapters' products to `linear`,
`linear_many` and `glu`, the ops every architecture's matrices go through.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Backend
from .errors import FormatError, UsageError
from .formats.gguf import GGUFFile, Tensor, open_gguf
from .quant.types import GGMLType

MAX_RANK = 1 << 16
# the types an adapter's halves may have: convert_lora_to_gguf.py's --outtype choices, and Q8_0
HALF_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0})


@dataclass
class LoraAdapter:
    """One adapter file: `pairs` maps a base tensor's name to its (A, B) tensors, (rank, in) and
    (out, rank) in numpy order. `scale`: the user's (llama.cpp's --lora-scaled), 1.0 by default."""

    path: str
    alpha: float
    scale: float
    pairs: dict[str, tuple[Tensor, Tensor]]
    file: GGUFFile

    def factor(self, rank: int) -> float:
        """What B·(A·x) is multiplied by: llama.cpp's llama_adapter_lora_weight::get_scale, in float32."""
        f32 = np.float32
        return float(f32(self.scale) * f32(self.alpha) / f32(rank) if self.alpha else f32(self.scale))


MAX_SCALE = 1e6


def check_scale(what: str, scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) <= MAX_SCALE:
        raise UsageError(f"{what}: the scale must be a number from {-MAX_SCALE:g} to {MAX_SCALE:g}, got {scale!r}")
    return float(scale)


def adapter_list(lora: object) -> list[tuple[str, float]]:
    """`lora` as (path, scale) pairs: each item a path (scale 1.0) or a (path, scale) pair."""
    if isinstance(lora, (str, os.PathLike)) or not isinstance(lora, (list, tuple)):
        raise UsageError(f"lora must be a list of adapter paths or (path, scale) pairs, got {lora!r}")
    out = []
    for item in lora:
        path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else \
            item if isinstance(item, (list, tuple)) and len(item) == 2 else (None, None)
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"lora: each item must be a path or a (path, scale) pair, got {item!r}")
        out.append((os.fspath(path), check_scale(f"lora {os.fspath(path)!r}", scale)))
    return out


def load_adapter(path: str | os.PathLike, base: GGUFFile, scale: float = 1.0) -> LoraAdapter:
    """Open a LoRA adapter for the model in `base`; every field and shape is checked against it."""
    path = str(path)
    scale = check_scale(f"LoRA adapter {path}", scale)
    f = open_gguf(path)
    try:
        return _read(f, base, scale)
    except BaseException:
        f.close()
        raise


def _read(f: GGUFFile, base: GGUFFile, scale: float) -> LoraAdapter:
    meta, path = f.metadata, f.path

    def text(key: str) -> str:
        value = meta.get(key)
        if value is None:
            raise FormatError(path, key, "is missing: not a LoRA adapter file (llama.cpp's convert_lora_to_gguf.py "
                              "makes them)")
        if not isinstance(value, str):
            raise FormatError(path, key, f"must be a string, got {value!r}: not a LoRA adapter file")
        return value

    if text("general.type") != "adapter":
        raise FormatError(path, "general.type", f"is {meta['general.type']!r}, expected 'adapter': "
                          "give a LoRA adapter file (llama.cpp's convert_lora_to_gguf.py makes them)")
    if text("adapter.type") != "lora":
        raise FormatError(path, "adapter.type", f"is {meta['adapter.type']!r}: only 'lora' adapters are supported")
    if text("general.architecture") != base.architecture:
        raise FormatError(path, "general.architecture", f"is {meta['general.architecture']!r}, and the model "
                          f"is {base.architecture!r}: the adapter was made for another model")
    if "adapter.alora.invocation_tokens" in meta:
        raise FormatError(path, "adapter.alora.invocation_tokens", "activated LoRA (aLoRA) is not supported")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= MAX_SCALE:
        raise FormatError(path, "adapter.lora.alpha", f"must be a number from 0 to {MAX_SCALE:g}, got {alpha!r}")

    halves: dict[str, dict[str, Tensor]] = {}
    for name, t in f.tensors.items():
        if name.endswith((".lora_a", ".lora_b")):
            halves.setdefault(name[:-7], {})[name[-1]] = t
        elif not name.endswith("_norm.weight"):  # llama.cpp skips adapted norms too
            raise FormatError(path, f"tensor {name!r}", "is neither a .lora_a nor a .lora_b tensor")
    if not halves:
        raise FormatError(path, "tensors", "none: the adapter changes nothing")
    pairs = {}
    for name, ab in sorted(halves.items()):
        pairs[name] = _pair(path, name, ab, base)
    return LoraAdapter(path, float(alpha), scale, pairs, f)


def _pair(path: str, name: str, ab: dict[str, Tensor], base: GGUFFile) -> tuple[Tensor, Tensor]:
    if len(ab) != 2:
        raise FormatError(path, f"tensor {name!r}", f"has a .lora_{next(iter(ab))} but no .lora_"
                          f"{'b' if 'a' in ab else 'a'}")
    w = base.tensors.get(name)
    if w is None:
        raise FormatError(path, f"tensor {name!r}", "is not in the model: the adapter was made for another model")
    if name.startswith("token_embd.") or name.startswith("position_embd.") or len(w.shape) != 2:
        raise FormatError(path, f"tensor {name!r}", "adapts an embedding or an expert stack: purelm applies "
                          "adapters to the layers' matrices and the output head only")
    for t in ab.values():
        if t.type not in HALF_TYPES:
            raise FormatError(path, f"tensor {t.name!r}", f"is {t.type.name}: a LoRA half is one of "
                              f"{', '.join(sorted(x.name for x in HALF_TYPES))}")
    a, b = _matrix(path, ab["a"]), _matrix(path, ab["b"])
    n_out, n_in = w.shape
    rank = a.shape[0]
    if a.shape[1] != n_in or b.shape[0] != n_out or b.shape[1] != rank or not 1 <= rank <= MAX_RANK:
        raise FormatError(path, f"tensor {name!r}", f"lora_a {a.shape} and lora_b {b.shape} do not fit the "
                          f"model's {w.shape} (expected (rank, {n_in}) and ({n_out}, rank))")
    for t in (a, b):  # (a NaN would reach every logit, and the error would name the model)
        if not np.isfinite(t.dequantize()).all():
            raise FormatError(path, f"tensor {t.name!r}", "holds NaN or infinite values")
    return a, b


def _matrix(path: str, t: Tensor) -> Tensor:
    shape = tuple(t.shape)
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise FormatError(path, f"tensor {t.name!r}", f"has shape {t.shape}: a LoRA half is a matrix")
    return t if shape == t.shape else dataclasses.replace(t, shape=shape, data=t.data.reshape(shape[0], -1))


@dataclass
class _Delta:
    """One adapter's product for one part of a weight: factor · B·(A·x), B's rows those of the part
    (`ab`: Backend.lora_weights); the factor read at each call, so that a new `scale` applies from the
    next pass on."""

    ab: Any
    adapter: LoraAdapter
    rank: int
    seen: tuple[float, float] = (0.0, 0.0)  # (the adapter's scale, the factor it gives)

    def factor(self) -> float:
        if self.seen[0] != self.adapter.scale:  # (numpy's float32 arithmetic costs microseconds a call)
            self.seen = (self.adapter.scale, self.adapter.factor(self.rank))
        return self.seen[1]


class AdaptedOps:
    """The backend with LoRA adapters: a model built on it records which file tensors each of its
    weights holds (`weight`, `weights`); `attach` then gives those weights their adapters' products,
    added in `linear`, `linear_many` and `glu`. Every other op is the backend's own."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._parts: dict[int, tuple[Any, list[tuple[str, int, int]]]] = {}  # id(w) -> (w, [(name, row, rows)])
        self._deltas: dict[int, tuple[Any, list[list[_Delta]]]] = {}  # id(w) -> (w, deltas of each part)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def _record(self, w: Any, ts: list[Tensor]) -> Any:
        rows: dict[str, int] = {}
        parts = []
        for t in ts:  # parts of one fused tensor (split_matrix) come in row order
            start = rows.get(t.name, 0)
            parts.append((t.name, start, t.shape[0]))
            rows[t.name] = start + t.shape[0]
        self._parts[id(w)] = (w, parts)
        return w

    def weight(self, t: Tensor) -> Any:
        return self._record(self.backend.weight(t), [t])

    def weights(self, ts: list[Tensor]) -> Any:
        return self._record(self.backend.weights(ts), ts)

    def attach(self, adapters: list[LoraAdapter]) -> None:
        """Give the recorded weights the products of `adapters`. Raises FormatError for an adapted
        tensor the model does not multiply with (its token embedding used as the output head)."""
        used: set[str] = set()
        self._deltas.clear()
        prepared: dict[tuple[int, str, int, int], _Delta] = {}
        first_a: dict[tuple[int, str], Any] = {}  # A's prepared form, shared by the parts of a fused matrix
        for key, (w, parts) in self._parts.items():
            each = []
            for name, row, rows in parts:
                found = []
                for i, ad in enumerate(adapters):
                    pair = ad.pairs.get(name)
                    if pair is None:
                        continue
                    used.add(name)
                    a, b = pair
                    cached = prepared.get((i, name, row, rows))
                    if cached is None:
                        part = b if rows == b.shape[0] else dataclasses.replace(
                            b, shape=(rows, b.shape[1]), data=b.data[row:row + rows],
                            offset=b.offset + row * b.data.shape[1])
                        a_form, b_form = self.backend.lora_weights(a, part)
                        cached = _Delta((first_a.setdefault((i, name), a_form), b_form), ad, a.shape[0])
                        prepared[(i, name, row, rows)] = cached
                    found.append(cached)
                each.append(found)
            if any(each):
                self._deltas[key] = (w, each)
        for ad in adapters:
            missed = sorted(set(ad.pairs) - used)
            if missed:
                raise FormatError(ad.path, f"tensor {missed[0]!r}", "is a matrix this model does not multiply "
                                  "with (as a layer's weight or the output head)")

    def _deltas_of(self, w: Any) -> list[list[_Delta]] | None:
        """w's adapters' products, None where it has none or all of them are at scale 0."""
        entry = self._deltas.get(id(w))
        if entry is None or entry[0] is not w:
            return None
        return entry[1] if any(d.adapter.scale for ds in entry[1] for d in ds) else None

    def _add(self, x: Any, y: Any, deltas: list[_Delta]) -> Any:
        shape = y.shape
        if len(shape) != 2:
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, shape[-1])
        for d in deltas:
            factor = d.factor()
            if factor:  # (an adapter at scale 0 costs nothing)
                y = self.backend.lora(x, y, d.ab, factor)
        return y.reshape(shape)

    def linear(self, x: Any, w: Any, bias: Any = None) -> Any:
        each = self._deltas_of(w)
        y = self.backend.linear(x, w, bias)
        if each is None:
            return y
        if len(each) != 1:
            raise RuntimeError("an adapted weight of several parts goes through linear_many")
        return self._add(x, y, each[0])

    def linear_many(self, x: Any, ws: Any) -> list[Any]:
        each = self._deltas_of(ws)
        ys = self.backend.linear_many(x, ws)
        if each is None:
            return ys
        return [self._add(x, y, d) if d else y for y, d in zip(ys, each)]

    def glu(self, x: Any, w_gate_up: Any, act: str) -> Any:
        if self._deltas_of(w_gate_up) is None:
            return self.backend.glu(x, w_gate_up, act)
        gate, up = self.linear_many(x, w_gate_up)
        return self.backend.swiglu(gate, up) if act == "silu" else self.backend.geglu(gate, up)


def export_lora(base: str | os.PathLike, lora: list[tuple[str, float]], out: str | os.PathLike,
                progress: Any = None) -> list[str]:
    """llama-export-lora: `base` with the adapters (path, scale) merged into its weights, written to
    `out`: W + Σ factor · B·A for every adapted matrix, stored as F32 where the base matrix is F32 and
    as F16 otherwise (dequantized: `purelm quantize` takes the file on); every other tensor is copied
    as it is. Returns the names of the merged matrices."""
    from .formats.split import copy_model
    from .formats.gguf import ValueType

    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; give the path of the .gguf file to write")
    if not lora:
        raise UsageError("give at least one adapter (--lora, --lora-scaled)")
    with open_gguf(base) as f:
        if os.path.abspath(out) in map(os.path.abspath, f.shards + [p for p, _ in lora]):
            raise UsageError(f"{out}: is a file being read; write to another path")
        adapters = [load_adapter(path, f, scale) for path, scale in lora]
        try:
            merged: dict[str, list[tuple[LoraAdapter, Tensor, Tensor]]] = {}
            for ad in adapters:
                for name, (a, b) in ad.pairs.items():
                    merged.setdefault(name, []).append((ad, a, b))
            w = copy_model(f, out)  # (the writer writes OUT.part, renamed once complete)
            w.add("general.file_type", 1, ValueType.UINT32)  # (llama-export-lora's: mostly F16)
            kept = {t.name: t for t in w.tensors}
            w.tensors = []
            for name, pending in kept.items():
                if name not in merged:
                    w.tensors.append(pending)
                    continue
                t = f.tensors[name]

                def load(t: Tensor = t, parts: list = merged[name]) -> np.ndarray:
                    x = t.dequantize().reshape(t.shape)
                    for ad, a, b in parts:
                        x += np.float32(ad.factor(a.shape[0])) * (b.dequantize() @ a.dequantize())
                    return x.astype(np.float32 if t.type == GGMLType.F32 else np.float16)

                w.add_tensor(name, load, GGMLType.F32 if t.type == GGMLType.F32 else GGMLType.F16, t.shape)
            w.write(progress)
        finally:
            for ad in adapters:
                ad.file.close()
    return sorted(merged)
