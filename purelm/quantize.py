"""`purelm quantize`: re-encode a GGUF model's weights as llama.cpp's `llama-quantize` does.

The per-tensor type choices follow llama.cpp's src/llama-quant.cpp (llama_tensor_get_type and what it
calls): which tensors stay as they are (1-D, norms, ...), the output / token-embedding rule, the
attn_v and ffn_down bumps of the K-quant mixes, and the fallbacks for rows that do not split into
256-weight blocks. Tensors are visited in llama.cpp's order (by layer, then name), because the mixes
count attn_v and ffn_down tensors as they go. The blocks themselves come from `purelm.quant.quantize`.

The output streams tensor by tensor (a float32 copy of one slab of rows at a time), is written under a
temporary name and renamed at the end, so an error or Ctrl-C leaves nothing behind.
"""
from __future__ import annotations

import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path

import numpy as np

from . import quant
from .backends.pages import release_file_pages
from .convert import _check_output
from .errors import FormatError, PurelmError, UsageError
from .formats.gguf import GGUFFile, GGUFWriter, Tensor, ValueType
from .imatrix import ImportanceMatrix, load_imatrix
from .quant.types import BLOCK_INFO, GGMLType as T, row_bytes

GGML_QNT_VERSION = 2
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})
SLAB_WEIGHTS = 1 << 20  # weights per unit of work: 4 MiB of float32


class FType(Enum):
    """llama.cpp's file types (llama_ftype) that purelm writes: value = (id, default tensor type)."""

    ALL_F32 = (0, T.F32)
    MOSTLY_F16 = (1, T.F16)
    MOSTLY_Q4_0 = (2, T.Q4_0)
    MOSTLY_Q4_1 = (3, T.Q4_1)
    MOSTLY_Q8_0 = (7, T.Q8_0)
    MOSTLY_Q5_0 = (8, T.Q5_0)
    MOSTLY_Q5_1 = (9, T.Q5_1)
    MOSTLY_Q2_K = (10, T.Q2_K)
    MOSTLY_Q3_K_S = (11, T.Q3_K)
    MOSTLY_Q3_K_M = (12, T.Q3_K)
    MOSTLY_Q3_K_L = (13, T.Q3_K)
    MOSTLY_Q4_K_S = (14, T.Q4_K)
    MOSTLY_Q4_K_M = (15, T.Q4_K)
    MOSTLY_Q5_K_S = (16, T.Q5_K)
    MOSTLY_Q5_K_M = (17, T.Q5_K)
    MOSTLY_Q6_K = (18, T.Q6_K)
    MOSTLY_IQ4_NL = (25, T.IQ4_NL)
    MOSTLY_BF16 = (32, T.BF16)

    @property
    def id(self) -> int:
        return self.value[0]

    @property
    def default_type(self) -> T:
        return self.value[1]

    @property
    def label(self) -> str:
        return self.name.split("_", 1)[1]


F = FType
# The names llama-quantize accepts (tools/quantize/quantize.cpp QUANT_OPTIONS), case-insensitive.
# As there, Q3_K, Q4_K and Q5_K are the _M mixes; --pure gives every tensor the base type.
TYPE_NAMES: dict[str, FType] = {
    **{f.label: f for f in FType if f not in (F.ALL_F32, F.MOSTLY_F16, F.MOSTLY_BF16)},
    "Q3_K": F.MOSTLY_Q3_K_M, "Q4_K": F.MOSTLY_Q4_K_M, "Q5_K": F.MOSTLY_Q5_K_M,
    "F16": F.MOSTLY_F16, "BF16": F.MOSTLY_BF16, "F32": F.ALL_F32,
}
# Names llama-quantize knows that purelm does not write (yet).
OTHER_LLAMA_NAMES = ("Q1_0", "Q2_0", "MXFP4_MOE", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0",
                     "TQ2_0", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "IQ3_XS", "IQ4_XS", "COPY")


def parse_ftype(name: object) -> FType:
    """A TYPE as llama-quantize takes it: a name (any case) or a file-type number."""
    if isinstance(name, FType):
        return name
    text = str(name).strip().upper()
    if text in TYPE_NAMES:
        return TYPE_NAMES[text]
    if text.isdigit():
        for f in FType:
            if f.id == int(text):
                return f
    known = ", ".join(TYPE_NAMES)
    if text in OTHER_LLAMA_NAMES:
        raise UsageError(f"type {name!s}: llama-quantize has it, purelm quantize does not (supported: {known})")
    raise UsageError(f"unknown quantization type {name!s} (supported: {known}, or their llama.cpp numbers)")


# ------------------------------------------------------------------------------------------ type choice


class Cat(Enum):
    """tensor_category in llama-quant.cpp: broad roles, from substrings of the name."""

    TOKEN_EMBD, ATTENTION_Q, ATTENTION_V, ATTENTION_K, ATTENTION_QKV, ATTENTION_KV_B, ATTENTION_OUTPUT, \
        FFN_UP, FFN_GATE, FFN_DOWN, OUTPUT, OTHER = range(12)


_CAT_SUBSTRINGS = (("attn_qkv.weight", Cat.ATTENTION_QKV), ("attn_kv_b.weight", Cat.ATTENTION_KV_B),
                   ("attn_v.weight", Cat.ATTENTION_V), ("attn_k.weight", Cat.ATTENTION_K),
                   ("attn_q.weight", Cat.ATTENTION_Q), ("attn_output.weight", Cat.ATTENTION_OUTPUT),
                   ("ffn_up", Cat.FFN_UP), ("ffn_gate", Cat.FFN_GATE), ("ffn_down", Cat.FFN_DOWN))
_ATTN_V = (Cat.ATTENTION_V, Cat.ATTENTION_QKV, Cat.ATTENTION_KV_B)


def category(name: str) -> Cat:
    if name == "output.weight":
        return Cat.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Cat.TOKEN_EMBD
    return next((cat for s, cat in _CAT_SUBSTRINGS if s in name), Cat.OTHER)


# tensor_allows_quantization: name parts that are never quantized (the architectures purelm knows, and
# the others llama.cpp lists, so that a file of theirs is treated alike).
_KEEP_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
                    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
                    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
                    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
                    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
                    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
                    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")


def ne(shape: tuple[int, ...]) -> list[int]:
    """ggml's dims (innermost first), padded to 4."""
    return list(reversed(shape)) + [1] * (4 - len(shape))


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dims of 1 do not count."""
    dims = ne(shape)
    return max((i + 1 for i, d in enumerate(dims) if d != 1), default=1)


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    return (n_dims(shape) >= 2 and name.endswith("weight") and name not in _KEEP_NAMES
            and not any(s in name for s in _KEEP_SUBSTRINGS))


_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def layer_of(name: str) -> int:
    """sscanf(name, "blk.%d.", &layer), -1 where it reads nothing."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names: list[str]) -> list[str]:
    """llama_model_loader's weights_map order: by layer number (others first), then by name."""
    return sorted(names, key=lambda n: (layer_of(n), n.encode("utf-8")))


@dataclass
class Hparams:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int
    source: str = ""  # the file, for error messages

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B (only it matters to the rules)
        return self.n_layer == 80 and (self.arch in ("qwen2", "olmo") or
                                       (self.arch == "llama" and self.n_head != self.n_head_kv))

    @classmethod
    def from_metadata(cls, path: str, meta) -> "Hparams":
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise FormatError(path, "general.architecture", "missing: llama-quantize needs it to pick types")

        def number(key: str, default: int | None, lo: int, hi: int) -> int:
            value = meta.get(f"{arch}.{key}", default)
            if isinstance(value, np.ndarray) and value.size and value.dtype.kind in "iu":
                value = value.reshape(-1)[0].item()  # per-layer counts: llama.cpp's n_gqa() reads layer 0
            if value is None:
                raise FormatError(path, f"{arch}.{key}", "missing")
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise FormatError(path, f"{arch}.{key}", f"must be a whole number in {lo}..{hi}, got {value!r}")
            return value

        n_head = number("attention.head_count", 0, 0, 1 << 16)
        return cls(arch, number("block_count", None, 1, 512), n_head,
                   number("attention.head_count_kv", n_head, 0, 1 << 16), number("expert_count", 0, 0, 512), path)


@dataclass
class _State:
    """quantize_state_impl: the counters the mixes look at."""

    hp: Hparams
    ftype: FType
    has_imatrix: bool
    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0
    tied_embeddings: bool = True


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_type(qs: _State, new: T, name: str, shape: tuple[int, ...], cat: Cat) -> T:
    """llama_tensor_get_type_impl, for the file types of FType."""
    hp, ftype = qs.hp, qs.ftype

    def layer_info(i: int) -> tuple[int, int]:
        if hp.n_expert > 1:  # experts are not in order: read the layer from the name
            m = re.match(r"blk\.\s*([+-]?\d+)\.", name)
            if not m:
                raise FormatError(hp.source, name, "cannot determine the layer of this tensor")
            i = int(m.group(1))
            if not 0 <= i < hp.n_layer:
                raise FormatError(hp.source, name, f"layer {i} is not in 0..{hp.n_layer - 1}")
        return i, hp.n_layer

    if cat == Cat.OUTPUT or (qs.tied_embeddings and cat == Cat.TOKEN_EMBD):
        if hp.arch == "falcon" or ne(shape)[0] % BLOCK_INFO[new][0]:
            new = T.Q8_0
        elif new != T.Q8_0:
            new = T.Q6_K
    elif cat == Cat.TOKEN_EMBD:
        pass  # only the IQ1/IQ2/IQ3/TQ file types change it
    elif cat in _ATTN_V:
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q4_K if hp.n_gqa >= 4 else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if qs.i_attention_wv < 2 else T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ftype == F.MOSTLY_IQ4_NL and hp.n_gqa >= 4:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and qs.i_attention_wv < 4:
            new = T.Q5_K
        if hp.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if hp.n_expert == 8:
            new = T.Q8_0
        qs.i_attention_wv += 1
    elif cat == Cat.ATTENTION_K:
        if hp.n_expert == 8:
            new = T.Q8_0
    elif cat == Cat.FFN_DOWN:
        i, n = layer_info(qs.i_ffn_down)
        falcon = hp.arch == "falcon"
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < n // 16 else T.Q4_K if not falcon or _use_more_bits(i, n) else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q4_K if falcon else T.Q5_K
        elif ftype == F.MOSTLY_Q4_K_M:
            if falcon:
                new = T.Q6_K if i < n // 16 else T.Q5_K if _use_more_bits(i, n) else T.Q4_K
            elif _use_more_bits(i, n):
                new = T.Q6_K
        elif i < n // 8 and ftype == F.MOSTLY_IQ4_NL and not qs.has_imatrix:
            new = T.Q5_K
        elif ftype == F.MOSTLY_Q5_K_M and _use_more_bits(i, n):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and qs.has_imatrix and i < n // 8:
            new = T.Q4_1 if ftype == F.MOSTLY_Q4_0 else T.Q5_1
        qs.i_ffn_down += 1
    elif cat == Cat.ATTENTION_OUTPUT:
        if hp.arch != "falcon":
            if hp.n_expert == 8:
                if ftype in (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S,
                             F.MOSTLY_Q4_K_M):
                    new = T.Q5_K
            elif ftype == F.MOSTLY_Q2_K:
                new = T.Q3_K
            elif ftype == F.MOSTLY_Q3_K_M:
                new = T.Q4_K
            elif ftype == F.MOSTLY_Q3_K_L:
                new = T.Q5_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q4_K
    elif cat == Cat.FFN_GATE:
        layer_info(qs.i_ffn_gate)
        qs.i_ffn_gate += 1
    elif cat == Cat.FFN_UP:
        layer_info(qs.i_ffn_up)
        qs.i_ffn_up += 1
    # (ATTENTION_QKV is attn_v-like above, so llama.cpp's own QKV branch is never reached.)
    return new


_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL}


def _fallback(qs: _State, new: T, shape: tuple[int, ...]) -> T:
    """tensor_type_fallback: a row that does not split into the type's blocks takes a 32-block type,
    or F16 when even that does not fit."""
    n_cols = ne(shape)[0]
    if n_cols % BLOCK_INFO[new][0] == 0:
        return new
    qs.n_fallback += 1
    out = _FALLBACK.get(new, new)
    return out if n_cols % BLOCK_INFO[out][0] == 0 else T.F16


def choose_types(tensors: list[tuple[str, tuple[int, ...], T]], hp: Hparams | None, ftype: FType,
                 has_imatrix: bool = False, pure: bool = False) -> tuple[dict[str, T], int]:
    """The type llama-quantize gives each tensor ((name, numpy shape, type) in llama_order), and how
    many fell back because of their row length."""
    qs = _State(hp, ftype, has_imatrix)  # type: ignore[arg-type]
    cats = {name: category(name) for name, _, _ in tensors}
    qs.n_attention_wv = sum(c in _ATTN_V for c in cats.values())
    qs.tied_embeddings = Cat.OUTPUT not in cats.values()
    default = ftype.default_type
    out = {}
    for name, shape, cur in tensors:
        if not allows_quantization(name, shape):
            out[name] = cur
            continue
        new = default
        if new not in FLOAT_TYPES:
            if not pure:
                if hp is None:
                    raise UsageError("choose_types: the mixes need the model's hyperparameters (hp)")
                new = _mix_type(qs, new, name, shape, cats[name])
            new = _fallback(qs, new, shape)
        out[name] = new
    return out, qs.n_fallback


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class TensorResult:
    name: str
    shape: tuple[int, ...]
    src_type: T
    dst_type: T
    src_bytes: int
    dst_bytes: int
    imatrix: bool = False


@dataclass
class QuantizeSummary:
    src: str
    dst: str
    ftype: FType
    tensors: list[TensorResult]
    src_file_bytes: int
    dst_file_bytes: int
    seconds: float
    n_fallback: int = 0
    imatrix_missing: list[str] = field(default_factory=list)

    @property
    def n_weights(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors)

    @property
    def by_type(self) -> dict[str, tuple[int, int, int]]:
        """Output type name -> (tensors, weights, bytes), largest first."""
        rows: dict[str, list[int]] = {}
        for t in self.tensors:
            r = rows.setdefault(t.dst_type.name, [0, 0, 0])
            r[0] += 1
            r[1] += int(np.prod(t.shape, dtype=np.int64))
            r[2] += t.dst_bytes
        return {k: tuple(v) for k, v in sorted(rows.items(), key=lambda kv: -kv[1][2])}  # type: ignore[misc]

    def bpw(self, which: str = "dst") -> float:
        total = sum(t.dst_bytes if which == "dst" else t.src_bytes for t in self.tensors)
        return total * 8 / max(1, self.n_weights)

    def table(self) -> str:
        mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
        lines = [f"{'type':<8} {'tensors':>7} {'weights':>13} {'size':>12} {'bits/weight':>11}"]
        for name, (count, weights, nbytes) in self.by_type.items():
            lines.append(f"{name:<8} {count:>7} {weights:>13,} {mib(nbytes):>12} {nbytes * 8 / weights:>11.2f}")
        src_bytes = sum(t.src_bytes for t in self.tensors)
        dst_bytes = sum(t.dst_bytes for t in self.tensors)
        lines.append(f"{'total':<8} {len(self.tensors):>7} {self.n_weights:>13,} {mib(dst_bytes):>12} "
                     f"{self.bpw():>11.2f}")
        lines.append(f"{self.ftype.label}: {mib(src_bytes)} ({self.bpw('src'):.2f} bpw) -> {mib(dst_bytes)} "
                     f"({self.bpw():.2f} bpw); files {mib(self.src_file_bytes)} -> {mib(self.dst_file_bytes)}; "
                     f"{self.seconds:.1f} s")
        with_imatrix = sum(t.imatrix for t in self.tensors)
        if with_imatrix:
            lines.append(f"importance matrix: used for {with_imatrix} tensor(s)")
        if self.n_fallback:
            lines.append(f"{self.n_fallback} tensor(s) took a fallback type: their rows do not split into "
                         "the blocks of their mix's type")
        return "\n".join(lines)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=None, leave=False)


def _metadata(w: GGUFWriter, f: GGUFFile, ftype: FType, imat: ImportanceMatrix | None) -> None:
    """The input's key/values (split keys dropped) with llama-quantize's additions."""
    meta = f.metadata
    for key in meta:
        if key in ("general.alignment", "split.no", "split.count", "split.tensors.count"):
            continue
        vtype = meta.types[key]
        w.add(key, meta[key], vtype, meta.array_types.get(key) if vtype == ValueType.ARRAY else None)
    w.add("general.quantization_version", GGML_QNT_VERSION, ValueType.UINT32)
    w.add("general.file_type", ftype.id, ValueType.UINT32)
    if imat is not None:
        w.add("quantize.imatrix.file", imat.path[:127], ValueType.STRING)
        if imat.datasets:
            w.add("quantize.imatrix.dataset", imat.datasets[0][:127], ValueType.STRING)
        w.add("quantize.imatrix.entries_count", len(imat.weights), ValueType.UINT32)
        if imat.chunk_count > 0:
            w.add("quantize.imatrix.chunks_count", imat.chunk_count, ValueType.UINT32)


def _encode_rows(src: np.ndarray, src_type: T, n_cols: int, dst_type: T, weights: np.ndarray | None,
                 path: str, name: str) -> np.ndarray:
    """Rows of packed `src` re-encoded as `dst_type` (the unit of work the threads share)."""
    x = quant.dequantize(src, src_type, (len(src), n_cols))
    if not np.isfinite(x).all():
        raise FormatError(path, f"tensor {name!r}", "holds non-finite values (inf or NaN): cannot quantize")
    if weights is None:
        return quant.quantize(x, dst_type)
    return quant.quantize(x, dst_type, imatrix=weights)


def _encode_tensor(t: Tensor, dst_type: T, weights: np.ndarray | None, path: str, bar) -> np.ndarray:
    """`t` re-encoded, a slab of rows at a time (none across an expert's boundary)."""
    rows, n_cols = t.data.shape[0], t.shape[-1]
    per_expert = ne(t.shape)[1]  # rows that share one imatrix slice
    out = np.empty((rows, row_bytes(dst_type, n_cols)), np.uint8)
    step = max(1, SLAB_WEIGHTS // n_cols)
    for e0 in range(0, rows, per_expert):
        w = None if weights is None else weights[e0 // per_expert * n_cols:(e0 // per_expert + 1) * n_cols]
        for r0 in range(e0, min(e0 + per_expert, rows), step):
            r1 = min(r0 + step, e0 + per_expert)
            out[r0:r1] = _encode_rows(t.data[r0:r1], t.type, n_cols, dst_type, w, path, t.name)
            if bar is not None:
                bar.update((r1 - r0) * t.data.shape[1])
    release_file_pages(t.data)  # read once: keep the input's pages out of our resident set
    return out


def _use_threads(threads: int) -> Callable[[], None]:
    """Run the block encoders (numba-parallel over rows) on `threads` threads; returns the undo."""
    try:
        import numba
    except ImportError:
        return lambda: None
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return lambda: numba.set_num_threads(old)


def _column_weights(imat: ImportanceMatrix | None, t: Tensor, dst: T, missing: list[str]) -> np.ndarray | None:
    """The imatrix entry for `t`, checked as llama-quantize checks it (None: quantize without one)."""
    if imat is None:
        return None
    w = imat.weights.get(t.name)
    if w is None:
        if category(t.name) not in (Cat.TOKEN_EMBD, Cat.OUTPUT):  # llama-imatrix leaves these two out
            missing.append(t.name)
        return None
    dims = ne(t.shape)
    if w.size != dims[0] * dims[2]:
        if category(t.name) == Cat.TOKEN_EMBD:  # llama.cpp ignores a mismatch here, and only here
            return None
        raise FormatError(imat.path, t.name, f"has {w.size} weights, but tensor {t.name} needs "
                          f"{dims[0] * dims[2]} ({dims[0]} columns x {dims[2]} experts)")
    return None if dst in FLOAT_TYPES else w  # checked all the same, as llama-quantize does


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, ftype: str | int | FType,
                  imatrix: str | os.PathLike | None = None, allow_requantize: bool = False, progress: bool = True,
                  pure: bool = False, threads: int | None = None,
                  warn: Callable[[str], None] | None = None) -> QuantizeSummary:
    """Write `dst`: the GGUF model `src` quantized as `llama-quantize src dst TYPE` would (same tensor
    types; the blocks as purelm.quant encodes them). Returns what was written (`.table()` prints it)."""
    start = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    ftype = parse_ftype(ftype)
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    if threads is None:
        threads = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a whole number >= 1, got {threads!r}")
    _check_output(Path(dst))
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise UsageError(f"input and output are the same file: {dst}")

    f = GGUFFile(src)
    imat = load_imatrix(imatrix) if imatrix is not None else None
    order = [f.tensors[n] for n in llama_order(list(f.tensors))]
    hp = None if pure or ftype.default_type in FLOAT_TYPES else Hparams.from_metadata(src, f.metadata)
    types, n_fallback = choose_types([(t.name, t.shape, t.type) for t in order], hp, ftype, imat is not None, pure)

    changed = [t for t in order if types[t.name] != t.type]
    requant = sorted({t.type.name for t in changed if t.type not in FLOAT_TYPES})
    if requant and not allow_requantize:
        raise UsageError(f"{src} holds quantized tensors ({', '.join(requant)}): re-quantizing them loses more "
                         "quality than quantizing from f16/f32; pass --allow-requantize to do it anyway")
    if requant:
        warn(f"re-quantizing tensors already quantized as {', '.join(requant)}: the result is worse than "
             "quantizing from f16/f32")
    for t in changed:
        for qtype, table, what in ((t.type, quant.SUPPORTED_DEQUANT, "decode"),
                                   (types[t.name], quant.SUPPORTED_QUANT, "encode")):
            if qtype not in table:
                raise UsageError(f"tensor {t.name}: this purelm cannot {what} {qtype.name} yet "
                                 f"(it encodes {', '.join(sorted(x.name for x in table))})")

    missing: list[str] = []
    weights = {t.name: _column_weights(imat, t, types[t.name], missing) for t in changed}
    results = [TensorResult(t.name, t.shape, t.type, types[t.name], t.nbytes,
                            int(np.prod(t.shape[:-1], dtype=np.int64)) * row_bytes(types[t.name], t.shape[-1]),
                            weights.get(t.name) is not None) for t in order]

    bar = _progress(sum(t.nbytes for t in changed), progress, os.path.basename(dst))
    restore_threads = _use_threads(threads)
    try:
        w = GGUFWriter(dst, alignment=f.alignment)
        _metadata(w, f, ftype, imat)
        for t in order:
            dst_type = types[t.name]
            data = t.data if dst_type == t.type else partial(_encode_tensor, t, dst_type, weights.get(t.name), src, bar)
            w.add_tensor(t.name, data, dst_type, t.shape)
        w.write()
    except OSError as e:
        raise PurelmError(f"{dst}: cannot be written: {e.strerror or e}") from None
    finally:
        restore_threads()
        if bar is not None:
            bar.close()
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        warn(f"the importance matrix has no data for {len(missing)} tensor(s), quantized without it: {shown}")
    return QuantizeSummary(src, dst, ftype, results, f.file_size, os.path.getsize(dst),
                           time.perf_counter() - start, n_fallback, missing)
