"""Reader of the containers before GGUF: `ggml` (unversioned), `ggmf` v1 and `ggjt` v1-v3.

What they hold (llama.cpp's loader of mid-2023, ggml's examples, rustformers/llm's ggml-format crate):

    magic u32 ('ggml' 0x67676d6c | 'ggmf' 0x67676d66 | 'ggjt' 0x67676a74), version u32 (not in 'ggml')
    hyperparameters: i32 words (f32 for MPT's alibi/clip), their order and number set by the architecture
    vocabulary: n_vocab x (u32 length, bytes, f32 score except in 'ggml')
    tensors until the end of the file: i32 n_dims, i32 name length, i32 type, i32 dims[n_dims] (row length
    first), the name, then the data: at the next multiple of 32 from the file start in 'ggjt' (so it is
    memory-mapped here), right after the name in 'ggml'/'ggmf' (so it is read into memory).

The files do not name their architecture: it is found by trying each architecture's hyperparameter
layout and keeping the one whose first tensor is one of that architecture's tensors (LLaMA, GPT-2, GPT-J,
GPT-NeoX, BLOOM, MPT, Falcon). The hyperparameters become `{arch}.*` GGUF keys, the tensor names
llama.cpp's GGUF names, and the vocabulary a tokenizer.ggml.* set, so that every model runs unchanged.

Block layouts changed twice before GGUF (ggml's GGML_QNT_VERSION 0 -> 1 -> 2; llama.cpp's ggjt v1 -> v2
-> v3). Layout 1 (ggml/ggmf/ggjt v1, QNT 0): q4_0 = f32 d + 16 nibble bytes where byte j holds weights 2j
(low) and 2j+1 (high); q4_1 = f32 d, f32 m + the same nibbles; q5_0/q5_1 = today's f16 scales and high
bits with those interleaved nibbles; q8_0 = f32 d + 32 int8. Layout 2 (ggjt v2, QNT 1): today's nibble
order (byte j: weights j and j+16), q4_0/q4_1/q8_0 scales still f32. Layout 3 (ggjt v3, QNT 2) is GGUF's.
The reader converts layouts 1 and 2 to GGUF's: nibbles reordered exactly; f32 scales rounded to f16
(exact when the scale is a float16 value, else a relative change below 2^-11, far inside the 4- or 8-bit
step; a finite scale beyond float16's range cannot be represented and is refused). q4_2 and q4_3
(16-weight blocks of layout 1) have no GGUF type and are refused; the K-quants exist only in layout 3.

Vocabularies. LLaMA's are SentencePiece pieces with scores: restored as convert_llama_ggml_to_gguf.py
does (a "llama" tokenizer; ids 0-2 <unk> <s> </s>, bytes <0xXX>). The others are byte-level BPE tokens
stored as raw bytes without merges: mapped back to GPT-2's byte alphabet (MPT's converter wrote each
byte as a Latin-1 char in UTF-8, undone here), "<|...|>" tokens marked as control, and merges rebuilt from
the ids taken as merge ranks (`merges_from_ranks`, as tiktoken vocabularies are): exact for a vocabulary
whose ids follow its merge order (GPT-2's, a BPE trainer's), an approximation otherwise. Not recoverable:
added tokens other than "<|...|>" (typed as normal text), ggml's GPT-NeoX tokens that were not UTF-8 alone
(its converter stored tokenizer.decode, so they read as U+FFFD: the first keeps it, repeats are unused).
"""
from __future__ import annotations

import os
import re
import stat
import struct
from typing import Any

import numpy as np

from ..errors import FormatError
from ..quant.types import BLOCK_INFO, GGMLType, type_name
from .gguf import GGUFFile, Tensor, ValueType, _Lazy, _Parser

MAGICS = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}  # the u32 magics as little-endian bytes
VERSIONS = {"ggmf": (1,), "ggjt": (1, 2, 3)}
ALIGN = 32  # ggjt's tensor data alignment
MAX_NAME = 4096  # llama.cpp's converters refuse longer names and vocabulary items
MAX_DIMS = 4
MAX_MERGED = 256  # longer tokens get no merge (they stay usable by id): bounds the work on a hostile file
I32_MAX = 2**31 - 1

# Legacy tensor type ids that GGUF has no type for.
RETIRED = {4: "q4_2", 5: "q4_3"}
# The types each layout may hold; the K-quants came with ggjt v3.
_BASIC = {GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0}
_KQUANTS = {GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K}
# (weights per block, bytes per block) where layouts 1 and 2 differ from GGUF's
_OLD_BLOCKS = {
    1: {GGMLType.Q4_0: 20, GGMLType.Q4_1: 24, GGMLType.Q8_0: 36},
    2: {GGMLType.Q4_0: 20, GGMLType.Q4_1: 24, GGMLType.Q8_0: 36},
}


# ----------------------------------------------------------------------------- architectures


class Arch:
    """One architecture's legacy layout: hyperparameter words, where n_vocab and the file type sit, and
    tensor names (legacy pattern with {i} -> GGUF name)."""

    def __init__(self, name: str, words: str, n_vocab_at: int, ftype_at: int, signature: str,
                 tensors: dict[str, str], repeat_vocab_at: int | None = None) -> None:
        self.name, self.words, self.n_vocab_at, self.ftype_at = name, words, n_vocab_at, ftype_at
        # a layer-0 tensor name that no other architecture's names contain: found in the file, it tells the
        # architecture before anything is parsed, so that a damaged file's error comes from its layout
        self.signature = signature.encode()
        self.repeat_vocab_at = repeat_vocab_at  # GPT-2 and GPT-J write n_vocab again before the vocabulary
        self.patterns = [(re.compile(re.escape(k).replace(r"\{i\}", r"(\d{1,9})") + r"\Z"), v)
                         for k, v in tensors.items()]

    def gguf_name(self, name: str) -> str | None:
        for pattern, gguf in self.patterns:
            m = pattern.match(name)
            if m:
                return gguf.replace("{i}", str(int(m.group(1)))) if m.groups() else gguf
        return None


def _wb(pairs: dict[str, str], legacy_suffixes: tuple[str, str] = (".weight", ".bias")) -> dict[str, str]:
    """Both the weight and the bias of each (legacy prefix -> GGUF prefix)."""
    return {k + s: v + g for k, v in pairs.items() for s, g in zip(legacy_suffixes, (".weight", ".bias"))}


ARCHS = [
    # llama.cpp's convert.py / convert-pth-to-ggml.py
    Arch("llama", "vocab embd mult head layer rot ftype", 0, 6, "layers.0.attention.wq.weight", {
        "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight",
        "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
        "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
        "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
        "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
        "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
        "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
        "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
        "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
        "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight"}),
    # ggml examples/gpt-2 (convert-ckpt-to-ggml.py, convert-h5-to-ggml.py)
    Arch("gpt2", "vocab ctx embd head layer ftype vocab2", 0, 5, "model/h0/attn/c_attn/w", {
        "model/wte": "token_embd.weight", "model/wpe": "position_embd.weight",
        "model/lm_head": "output.weight",
        **_wb({"model/ln_f": "output_norm", "model/h{i}/ln_1": "blk.{i}.attn_norm",
               "model/h{i}/ln_2": "blk.{i}.ffn_norm"}, ("/g", "/b")),
        **_wb({"model/h{i}/attn/c_attn": "blk.{i}.attn_qkv", "model/h{i}/attn/c_proj": "blk.{i}.attn_output",
               "model/h{i}/mlp/c_fc": "blk.{i}.ffn_up", "model/h{i}/mlp/c_proj": "blk.{i}.ffn_down"},
              ("/w", "/b"))}, repeat_vocab_at=6),
    # ggml examples/gpt-j
    Arch("gptj", "vocab ctx embd head layer rot ftype vocab2", 0, 6, "transformer.h.0.attn.q_proj.weight", {
        "transformer.wte.weight": "token_embd.weight",
        **_wb({"transformer.ln_f": "output_norm", "lm_head": "output", "transformer.h.{i}.ln_1": "blk.{i}.attn_norm",
               "transformer.h.{i}.mlp.fc_in": "blk.{i}.ffn_up", "transformer.h.{i}.mlp.fc_out": "blk.{i}.ffn_down"}),
        "transformer.h.{i}.attn.q_proj.weight": "blk.{i}.attn_q.weight",
        "transformer.h.{i}.attn.k_proj.weight": "blk.{i}.attn_k.weight",
        "transformer.h.{i}.attn.v_proj.weight": "blk.{i}.attn_v.weight",
        "transformer.h.{i}.attn.out_proj.weight": "blk.{i}.attn_output.weight"}, repeat_vocab_at=7),
    # ggml examples/gpt-neox (its q|k|v stays per head, as in Hugging Face: reordered below)
    Arch("gptneox", "vocab ctx embd head layer rot par_res ftype", 0, 7,
         "gpt_neox.layers.0.attention.query_key_value.weight", {
        "gpt_neox.embed_in.weight": "token_embd.weight", "embed_out.weight": "output.weight",
        **_wb({"gpt_neox.final_layer_norm": "output_norm",
               "gpt_neox.layers.{i}.input_layernorm": "blk.{i}.attn_norm",
               "gpt_neox.layers.{i}.post_attention_layernorm": "blk.{i}.ffn_norm",
               "gpt_neox.layers.{i}.attention.query_key_value": "blk.{i}.attn_qkv",
               "gpt_neox.layers.{i}.attention.dense": "blk.{i}.attn_output",
               "gpt_neox.layers.{i}.mlp.dense_h_to_4h": "blk.{i}.ffn_up",
               "gpt_neox.layers.{i}.mlp.dense_4h_to_h": "blk.{i}.ffn_down"})}),
    # bloomz.cpp (its converter already stores q|k|v as blocks), as rustformers/llm reads it
    Arch("bloom", "vocab embd mult head layer ftype", 0, 5, "layers.0.feed_forward.w1.bias", {
        "tok_embeddings.weight": "token_embd.weight", "output.weight": "output.weight",
        **_wb({"norm": "token_embd_norm", "output_norm": "output_norm",
               "layers.{i}.attention_norm": "blk.{i}.attn_norm",
               "layers.{i}.attention.query_key_value": "blk.{i}.attn_qkv",
               "layers.{i}.attention.wo": "blk.{i}.attn_output", "layers.{i}.ffn_norm": "blk.{i}.ffn_norm",
               "layers.{i}.feed_forward.w1": "blk.{i}.ffn_up", "layers.{i}.feed_forward.w2": "blk.{i}.ffn_down"})}),
    # ggml examples/mpt (no biases; alibi_bias_max and clip_qkv are f32)
    Arch("mpt", "embd ctx head layer vocab alibi_bias_max:f clip_qkv:f ftype", 4, 7,
         "transformer.blocks.0.attn.Wqkv.weight", {
        "transformer.wte.weight": "token_embd.weight", "transformer.norm_f.weight": "output_norm.weight",
        "transformer.blocks.{i}.norm_1.weight": "blk.{i}.attn_norm.weight",
        "transformer.blocks.{i}.attn.Wqkv.weight": "blk.{i}.attn_qkv.weight",
        "transformer.blocks.{i}.attn.out_proj.weight": "blk.{i}.attn_output.weight",
        "transformer.blocks.{i}.norm_2.weight": "blk.{i}.ffn_norm.weight",
        "transformer.blocks.{i}.ffn.up_proj.weight": "blk.{i}.ffn_up.weight",
        "transformer.blocks.{i}.ffn.down_proj.weight": "blk.{i}.ffn_down.weight"}),
    # ggllm.cpp / rustformers/llm falcon (q|k|v already all q heads, then k, then v)
    Arch("falcon", "vocab embd head head_kv layer ftype", 0, 5,
         "transformer.h.0.self_attention.query_key_value.weight", {
        "transformer.word_embeddings.weight": "token_embd.weight", "lm_head.weight": "output.weight",
        **_wb({"transformer.ln_f": "output_norm", "transformer.h.{i}.input_layernorm": "blk.{i}.attn_norm",
               "transformer.h.{i}.ln_mlp": "blk.{i}.attn_norm", "transformer.h.{i}.ln_attn": "blk.{i}.attn_norm_2"}),
        "transformer.h.{i}.self_attention.query_key_value.weight": "blk.{i}.attn_qkv.weight",
        "transformer.h.{i}.self_attention.dense.weight": "blk.{i}.attn_output.weight",
        "transformer.h.{i}.mlp.dense_h_to_4h.weight": "blk.{i}.ffn_up.weight",
        "transformer.h.{i}.mlp.dense_4h_to_h.weight": "blk.{i}.ffn_down.weight"}),
]
ARCH_BY_NAME = {a.name: a for a in ARCHS}

# What the files do not say, as the tools of the time assumed: llama.cpp's convert_llama_ggml_to_gguf.py
# defaults for LLaMA (context 2048, RMS epsilon 5e-6), ggml's LayerNorm epsilon 1e-5 for the others.
DEFAULT_CTX = 2048
LLAMA_RMS_EPS = float(np.float32(5e-6))  # as a GGUF float32 reads back
LAYER_NORM_EPS = float(np.float32(1e-5))
# The pre-tokenizer llama.cpp uses for each architecture's byte-level BPE vocabulary.
PRE = {"gpt2": "gpt-2", "gptj": "gpt-2", "gptneox": "gpt-2", "mpt": "mpt", "falcon": "falcon", "bloom": "bloom"}


# ------------------------------------------------------------------------------------ parsing


class _Cursor(_Parser):
    """The GGUF reader's bounds-checked cursor, with the reads a legacy file needs."""

    def words(self, fmt: str, field: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n, field)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def take(self, n: int, field: str) -> bytes:
        self.need(n, field)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out


class _Layout:
    """The file's structure read under one architecture's hyperparameter layout."""

    def __init__(self, c: _Cursor, container: str, version: int, arch: Arch) -> None:
        self.arch, self.container, self.version = arch, container, version
        names = arch.words.split()
        fmt = "<" + "".join("f" if n.endswith(":f") else "i" for n in names)
        values = c.words(fmt, f"{arch.name} hyperparameters")
        self.hp = {n.split(":")[0]: v for n, v in zip(names, values)}
        self.values = values
        n_vocab = values[arch.n_vocab_at]
        scores = container != "ggml"
        entry = 4 + (4 if scores else 0)
        if not 1 <= n_vocab <= I32_MAX:
            raise c.fail("n_vocab", f"is {n_vocab}; it must be at least 1")
        if n_vocab * entry > c.size - c.pos:
            left, c.pos = c.size - c.pos, c.size  # a failure at the file's end: what truncation looks like
            raise c.fail("n_vocab", f"{n_vocab} vocabulary entries need at least {n_vocab * entry} bytes but "
                         f"{left} are left (truncated?)")
        self.vocab = self._vocab(c, n_vocab, scores)
        self.tensors_at = c.pos

    def check(self, c: _Cursor) -> None:
        """What the hyperparameters say beyond the file's structure, once the architecture is known."""
        values, arch = self.values, self.arch
        n_vocab = values[arch.n_vocab_at]
        if arch.repeat_vocab_at is not None and values[arch.repeat_vocab_at] != n_vocab:
            raise c.fail("n_vocab", f"is {n_vocab} in the hyperparameters but {values[arch.repeat_vocab_at]} "
                         "before the vocabulary")
        ftype = values[arch.ftype_at]
        if not 0 <= ftype <= I32_MAX:
            raise c.fail("ftype", f"is {ftype}; it must be a file type (0 or more)")
        self.ftype, qnt = ftype % 1000, ftype // 1000  # ggml's examples: GGML_QNT_VERSION * 1000 + ftype
        if self.container == "ggjt":
            self.layout = self.version
        elif qnt > 2:
            raise c.fail("ftype", f"quantization version {qnt} (ftype {ftype}) is unknown (known: 0 to 2)")
        else:
            self.layout = qnt + 1

    @staticmethod
    def _vocab(c: _Cursor, n: int, scores: bool) -> list[tuple[bytes, float]]:
        out, unpack, buf = [], struct.unpack_from, c.buf
        for i in range(n):
            if c.pos + 4 > c.size:
                c.need(4, f"vocabulary item {i} length")
            length = unpack("<I", buf, c.pos)[0]
            c.pos += 4
            if length > MAX_NAME:
                raise c.fail(f"vocabulary item {i}", f"length {length} is over {MAX_NAME} bytes")
            text = c.take(length, f"vocabulary item {i}")
            score = c.words("<f", f"vocabulary item {i} score")[0] if scores else 0.0
            out.append((text, score))
        return out


def _tensor_header(c: _Cursor, index: int) -> tuple[str, int, list[int], int]:
    field = f"tensor #{index} header"
    n_dims, name_len, type_id = c.words("<iii", field)
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.fail(field, f"n_dims is {n_dims}; must be 1 to {MAX_DIMS}")
    if not 1 <= name_len <= MAX_NAME:
        raise c.fail(field, f"name length is {name_len}; must be 1 to {MAX_NAME}")
    dims = list(c.words(f"<{n_dims}i", field))
    raw = c.take(name_len, f"tensor #{index} name")
    name = raw.decode("utf-8", errors="replace")
    if any(d < 1 for d in dims):
        raise c.fail(f"tensor {name!r}", f"invalid dimensions {dims}")
    return name, type_id, dims, c.pos


def _first_tensor(c: _Cursor) -> tuple[str, int, list[int], int]:
    if c.pos >= c.size:
        raise c.fail("tensors", "the file ends after the vocabulary: it has no tensors (truncated?)")
    return _tensor_header(c, 0)


def _block_size(path: str, name: str, type_id: int, layout: int) -> tuple[GGMLType, int, int]:
    """(type, weights per block, bytes per block in the file) of a legacy type id under `layout`."""
    field = f"tensor {name!r}"
    if type_id in RETIRED:
        raise FormatError(path, field, f"type {RETIRED[type_id]} (id {type_id}) has no GGUF equivalent; "
                          "re-quantize the model from its float weights")
    try:
        qtype = GGMLType(type_id)
    except ValueError:
        raise FormatError(path, field, f"unknown tensor type id {type_id}") from None
    allowed = _BASIC | (_KQUANTS if layout == 3 else set())
    if qtype not in allowed:
        raise FormatError(path, field, f"type {type_name(type_id)} cannot appear in a layout-{layout} legacy file")
    block, size = BLOCK_INFO[qtype]
    return qtype, block, _OLD_BLOCKS.get(layout, {}).get(qtype, size)


# --------------------------------------------------------------------------- block conversion


def _nibbles_to_split(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block, byte j = weights 2j | 2j+1 << 4 (layout 1) -> byte j = weights j | j+16 << 4."""
    q = np.empty(qs.shape[:-1] + (32,), np.uint8)
    q[..., 0::2], q[..., 1::2] = qs & 0x0F, qs >> 4
    return q[..., :16] | (q[..., 16:] << 4)


def _f16_scales(path: str, name: str, scales: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = scales.astype("<f2")
    if (np.isfinite(scales) & ~np.isfinite(out)).any():
        raise FormatError(path, f"tensor {name!r}", "a block scale is beyond float16's range: it cannot be "
                          "represented in GGUF's block layout")
    return out


def convert_blocks(path: str, name: str, raw: np.ndarray, qtype: GGMLType, layout: int) -> np.ndarray:
    """Blocks of a layout-1/2 tensor (uint8 rows) in GGUF's layout (a new array); others as given."""
    nibbles = layout == 1 and qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1)
    if layout == 3 or (qtype not in _OLD_BLOCKS.get(layout, {}) and not nibbles):
        return raw
    rows, old = raw.shape[0], _OLD_BLOCKS.get(layout, {}).get(qtype, BLOCK_INFO[qtype][1])
    blocks = raw.reshape(rows, -1, old)
    n_scales = {GGMLType.Q4_0: 1, GGMLType.Q4_1: 2, GGMLType.Q8_0: 1}.get(qtype, 0)
    if qtype in _OLD_BLOCKS.get(layout, {}):  # f32 scales first
        scales = np.ascontiguousarray(blocks[..., :4 * n_scales]).view("<f4")
        head, body = _f16_scales(path, name, scales).view(np.uint8), blocks[..., 4 * n_scales:]
    else:  # q5_0/q5_1: f16 scales and the 4 high-bit bytes stay
        keep = 2 * (1 + (qtype == GGMLType.Q5_1)) + 4
        head, body = blocks[..., :keep], blocks[..., keep:]
    if nibbles:
        body = _nibbles_to_split(body)
    out = np.concatenate([head, body], axis=-1)
    return out.reshape(rows, -1)


# ------------------------------------------------------------------------------------- reader


class LegacyFile(GGUFFile):
    """A ggml/ggmf/ggjt file as GGUFFile shows a GGUF one (it opens and maps the file the same way):
    `metadata` (GGUF keys), `tensors` (GGUF names and block layouts), `architecture`, `close()`, a
    context manager; `format_name` says what the file was."""

    def _parse(self, buf: memoryview) -> None:
        c = _Cursor(self.path, buf)
        magic = c.take(4, "magic")
        container = MAGICS.get(magic)
        if container is None:
            raise c.fail("magic", f"found {magic!r}: not a ggml, ggmf or ggjt file")
        version = 0
        if container != "ggml":
            version = c.words("<I", "version")[0]
            if version not in VERSIONS[container]:
                raise c.fail("version", f"{container} version {version} is unknown (known: "
                             f"{', '.join(map(str, VERSIONS[container]))})")
        self.container, self.version = container, version
        self.format_name = f"{container.upper()}" + (f" v{version}" if version else "") + " (legacy)"
        lay, first = self._layout(c, container, version)
        lay.check(c)
        self.layout = lay.layout
        self._read_tensors(c, lay, first)
        self._metadata(lay)

    def _layout(self, c: _Cursor, container: str, version: int) -> tuple[_Layout, tuple]:
        """The file's architecture layout and first tensor header: the architecture whose signature alone
        the file holds, else the first whose layout leads to one of its tensors."""
        signed = [a for a in ARCHS if self._mmap.find(a.signature) >= 0]
        if len(signed) == 1:  # the architecture is known: its layout's error is the file's
            return _Layout(c, container, version, signed[0]), _first_tensor(c)
        start, failures = c.pos, []
        for arch in ARCHS:
            c.pos = start
            try:
                lay, head = _Layout(c, container, version, arch), _first_tensor(c)
            except FormatError as e:
                failures.append((c.pos, e))
                continue
            if arch.gguf_name(head[0]) is not None:
                return lay, head
            failures.append((c.pos, c.fail("tensor #0", f"{head[0]!r} is not a {arch.name} tensor")))
        err = max(failures, key=lambda f: f[0])[1]
        raise FormatError(self.path, err.field, f"{err.problem} (read as the architecture whose layout went "
                          "furthest; no architecture's layout fits the file)")

    def _read_tensors(self, c: _Cursor, lay: _Layout, head: tuple) -> None:
        whole = np.frombuffer(c.buf, np.uint8)
        aligned = lay.container == "ggjt"
        index = 0
        while True:
            name, type_id, dims, pos = head
            field = f"tensor {name!r}"
            gguf = lay.arch.gguf_name(name)
            if gguf is None:
                raise c.fail(field, f"is not a {lay.arch.name} tensor name")
            if gguf in self.tensors:
                raise c.fail(field, f"is a second {gguf!r}")
            qtype, block, block_bytes = _block_size(self.path, name, type_id, lay.layout)
            if dims[0] % block:
                raise c.fail(field, f"row length {dims[0]} is not a multiple of the {qtype.name} block size {block}")
            n_rows = 1
            for d in dims[1:]:
                n_rows *= d
            row_bytes = dims[0] // block * block_bytes
            nbytes = n_rows * row_bytes
            start = -(-pos // ALIGN) * ALIGN if aligned else pos
            if start > c.size or nbytes > c.size - start:
                raise c.fail(field, f"data [{start}, {start + nbytes}) lies beyond the end of the {c.size}-byte "
                             "file (truncated?)")
            data = whole[start:start + nbytes].reshape(n_rows, row_bytes)
            if not aligned:
                data = data.copy()  # read: ggml/ggmf data is not aligned
            data = convert_blocks(self.path, name, data, qtype, lay.layout)
            shape = tuple(int(d) for d in reversed(dims))
            self.tensors[gguf] = Tensor(gguf, qtype, shape, start, data)
            c.pos = start + nbytes
            if c.pos >= c.size:
                break
            index += 1
            head = _tensor_header(c, index)
        if lay.arch.name == "gptneox":
            self._neox_qkv(lay)

    def _neox_qkv(self, lay: _Layout) -> None:
        """ggml's GPT-NeoX keeps Hugging Face's q|k|v rows per head; GGUF has q, k, v blocks."""
        n_head = lay.hp["head"]
        for name, t in list(self.tensors.items()):
            if ".attn_qkv." not in name:
                continue
            rows, vector = t.shape[0], len(t.shape) == 1
            if n_head < 1 or rows % (3 * n_head) or (vector and t.type not in (GGMLType.F32, GGMLType.F16)):
                raise FormatError(self.path, f"tensor {name!r}", f"has {rows} rows of {t.type.name}: not 3 x head "
                                  f"count ({n_head}) x head size")
            per_head = t.data.reshape(n_head, 3, -1) if vector else t.data.reshape(n_head, 3, -1, t.data.shape[-1])
            data = per_head.swapaxes(0, 1).reshape(t.data.shape)
            self.tensors[name] = Tensor(name, t.type, t.shape, t.offset, np.ascontiguousarray(data))

    # -- metadata
    def _set(self, key: str, value: Any, vtype: ValueType, elem: ValueType | None = None) -> None:
        self.metadata._values[key] = value
        self.metadata.types[key] = vtype
        if elem is not None:
            self.metadata.array_types[key] = elem

    def _rows(self, name: str) -> int | None:
        t = self.tensors.get(name)
        return t.shape[0] if t is not None and len(t.shape) == 2 else None

    def _metadata(self, lay: _Layout) -> None:
        a, hp, U, F = lay.arch.name, lay.hp, ValueType.UINT32, ValueType.FLOAT32

        def i32(key: str, value: int) -> None:  # a signed word of the file; u32 as llama.cpp writes GGUF
            self._set(f"{a}.{key}", int(value), ValueType.UINT32 if value >= 0 else ValueType.INT32)

        self._set("general.architecture", a, ValueType.STRING)
        self._set("general.name", os.path.splitext(os.path.basename(self.path))[0], ValueType.STRING)
        self._set("general.description", f"converted from legacy {self.format_name.split(' (')[0]} "
                  f"(block layout {lay.layout})", ValueType.STRING)
        self._set("general.file_type", lay.ftype, U)
        if any(t.type not in (GGMLType.F32, GGMLType.F16) for t in self.tensors.values()):
            self._set("general.quantization_version", 2, U)
        i32("embedding_length", hp["embd"])
        i32("block_count", hp["layer"])
        i32("attention.head_count", hp["head"])
        i32("context_length", hp.get("ctx", DEFAULT_CTX))
        ff = "blk.0.ffn_gate.weight" if a == "llama" else "blk.0.ffn_up.weight"
        if self._rows(ff) is not None:
            i32("feed_forward_length", self._rows(ff))
        if a == "llama":
            i32("rope.dimension_count", hp["rot"])
            k_rows = self._rows("blk.0.attn_k.weight")
            if k_rows is not None and 0 < hp["head"] <= hp["embd"] and hp["embd"] % hp["head"] == 0:
                head_dim = hp["embd"] // hp["head"]
                if k_rows % head_dim == 0:  # LLaMA-2 70B's grouped-query attention: fewer k heads
                    i32("attention.head_count_kv", k_rows // head_dim)
            self._set("llama.attention.layer_norm_rms_epsilon", LLAMA_RMS_EPS, F)
        else:
            self._set(f"{a}.attention.layer_norm_epsilon", LAYER_NORM_EPS, F)
        if a in ("gptj", "gptneox"):
            i32("rope.dimension_count", hp["rot"])
        if a == "gptneox":
            if hp["par_res"] not in (0, 1):
                raise FormatError(self.path, "use_parallel_residual", f"is {hp['par_res']}; it must be 0 or 1")
            self._set("gptneox.use_parallel_residual", bool(hp["par_res"]), ValueType.BOOL)
        if a == "bloom":
            i32("attention.head_count_kv", hp["head"])
        if a == "falcon":
            i32("attention.head_count_kv", hp["head_kv"])
            self._set("falcon.tensor_data_layout", "jploski", ValueType.STRING)
        if a == "mpt":
            self._set("mpt.attention.max_alibi_bias", float(hp["alibi_bias_max"]), F)
            if hp["clip_qkv"] != 0.0:
                self._set("mpt.attention.clamp_kqv", float(hp["clip_qkv"]), F)
        if a == "llama":
            self._llama_vocab(lay.vocab)
        else:
            self._bpe_vocab(lay.vocab, a)

    def _llama_vocab(self, vocab: list[tuple[bytes, float]]) -> None:
        """SentencePiece pieces as llama.cpp's convert_llama_ggml_to_gguf.py restores them: ids 0-2 are
        <unk> <s> </s>, an empty piece is a control token, one byte at ids 3-258 is a byte token <0xXX>,
        and a space is "▁" again."""
        tokens, types = [], []
        for i, (raw, _) in enumerate(vocab):
            kind = 1
            if i <= 2:
                raw, kind = (b"<unk>", 2) if i == 0 else (b"<s>" if i == 1 else b"</s>", 3)
            elif not raw:
                kind = 3
            elif i <= 258 and len(raw) == 1:
                raw, kind = f"<0x{raw[0]:02X}>".encode(), 6
            else:
                raw = raw.replace(b" ", "\u2581".encode())
            tokens.append(raw.decode("utf-8", errors="replace"))
            types.append(kind)
        self._vocab_keys("llama", "default", tokens, types, [s for _, s in vocab])
        for key, i in (("unknown", 0), ("bos", 1), ("eos", 2)):
            if i < len(tokens):
                self._set(f"tokenizer.ggml.{key}_token_id", i, ValueType.UINT32)

    def _bpe_vocab(self, vocab: list[tuple[bytes, float]], arch: str) -> None:
        """Byte-level BPE tokens, stored as their bytes (ggml's converters undo GPT-2's byte-to-unicode
        map): mapped back, with merges rebuilt from the ids (see `merges_from_ranks`)."""
        raw = [_mpt_bytes(t) if arch == "mpt" else t for t, _ in vocab]
        enc = _byte_encoder()
        tokens = ["".join(enc[b] for b in t) for t in raw]
        special = re.compile(r"<\|[^|<>\s]{1,64}\|>\Z")
        types = [3 if special.match(t.decode("latin-1")) else 1 for t in raw]
        # ggml's GPT-NeoX converter stored tokenizer.decode([id]): a token that is not UTF-8 by itself
        # became U+FFFD, so several tokens can share one text. The first keeps it; the others are unused.
        seen: set[str] = set()
        for i, t in enumerate(tokens):
            if t in seen and t:
                tokens[i], types[i] = f"<|legacy-duplicate-{i}|>", 5
            seen.add(t)
        self._vocab_keys("gpt2", PRE[arch], tokens, types, None)
        self._set("tokenizer.ggml.merges", _Lazy(lambda: merges_from_ranks(tokens, types)), ValueType.ARRAY,
                  ValueType.STRING)
        if "<|endoftext|>" in tokens:
            eot = tokens.index("<|endoftext|>")
            self._set("tokenizer.ggml.bos_token_id", eot, ValueType.UINT32)
            self._set("tokenizer.ggml.eos_token_id", eot, ValueType.UINT32)

    def _vocab_keys(self, model: str, pre: str, tokens: list[str], types: list[int],
                    scores: list[float] | None) -> None:
        self._set("tokenizer.ggml.model", model, ValueType.STRING)
        self._set("tokenizer.ggml.pre", pre, ValueType.STRING)
        self._set("tokenizer.ggml.tokens", tokens, ValueType.ARRAY, ValueType.STRING)
        if scores is not None:
            self._set("tokenizer.ggml.scores", np.array(scores, "<f4"), ValueType.ARRAY, ValueType.FLOAT32)
        self._set("tokenizer.ggml.token_type", np.array(types, "<i4"), ValueType.ARRAY, ValueType.INT32)


def _byte_encoder() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for chars from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], extra = chr(256 + extra), extra + 1
    return out


def _mpt_bytes(raw: bytes) -> bytes:
    """ggml's MPT converter wrote each byte of a token as the UTF-8 of the Latin-1 char of that byte;
    a token that is not so written is taken as it is."""
    try:
        text = raw.decode("utf-8")
        return text.encode("latin-1")
    except UnicodeError:
        return raw


def merges_from_ranks(tokens: list[str], types: list[int] | None = None) -> list[str]:
    """BPE merges from a vocabulary whose ids are merge ranks (GPT-2's vocab.json, tiktoken): every split
    of a token into two tokens of the vocabulary, ordered by the token's id, then the parts' ids (as
    transformers turns a tiktoken vocabulary into merges). Control tokens take no part."""
    ids = {t: i for i, t in enumerate(tokens) if types is None or types[i] != 3}
    merges = []
    for i, t in enumerate(tokens):
        if not 2 <= len(t) <= MAX_MERGED or ids.get(t) != i:
            continue
        local = [(ids[t[:k]], ids[t[k:]], t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
        merges.extend(f"{left} {right}" for _, _, left, right in sorted(local))
    return merges


# ------------------------------------------------------------------------------------ upgrade


def convert_legacy(src: str | os.PathLike, out: str | os.PathLike) -> LegacyFile:
    """Write a legacy file as GGUF (`purelm convert old.bin new.gguf`): its translated metadata, its
    tensors as they are (converted only where the old block layout differs). GGUFWriter writes a
    temporary file and renames it at the end. Returns the source, closed."""
    from .gguf import GGUFWriter

    with LegacyFile(src) as f:
        w = GGUFWriter(out)
        for key in f.metadata:
            w.add(key, f.metadata[key], f.metadata.types[key], f.metadata.array_types.get(key))
        for t in f.tensors.values():
            w.add_tensor(t.name, t.data, t.type, t.shape)
        w.write()
        return f


# ------------------------------------------------------------------------------------ dispatch


def is_legacy(path: str | os.PathLike) -> bool:
    """Whether the file starts with a ggml/ggmf/ggjt magic (False when it cannot be read)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block: GGUFFile names the problem
            return False
        with open(path, "rb") as f:
            return f.read(4) in MAGICS
    except OSError:
        return False


def open_model_file(path: str | os.PathLike) -> GGUFFile | LegacyFile:
    """A model file by its magic: a legacy ggml/ggmf/ggjt file, else GGUF (whose reader names the
    problem when it is neither)."""
    return LegacyFile(path) if is_legacy(path) else GGUFFile(path)

