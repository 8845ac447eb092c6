"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini: a LLaMA-like pre-norm decoder with RMSNorm, NeoX rotary embeddings
(possibly partial: Phi-4-mini), grouped-query attention (Phi-4: 40 query heads on 10 kv heads), and the
q|k|v and gate|up projections fused. Phi-4 is Phi3ForCausalLM without a sliding window (the converter writes
attention.sliding_window 0, as llama.cpp's does to tell Phi-4 apart).

    h   = x + Wo · Attention(rope(q), rope(k), v),   q|k|v = Wqkv · RMSNorm(x)
    out = h + Wdown · (silu(g) * u),                 g|u   = Wup · RMSNorm(h)   (gate first, as in HF)

Long-context variants (rope type "longrope"/"su") divide the rotary frequencies by per-pair factors: the
GGUF tensors rope_factors_short / rope_factors_long. Like llama.cpp, the long ones are used when the
context (the cache size) exceeds rope.scaling.original_context_length; cos and sin are multiplied by
rope.scaling.attn_factor in both cases (as transformers does). transformers instead switches factors by
the current sequence length, so the two agree whenever the whole sequence is on the same side of the
original context length.

A positive attention.sliding_window is applied as in transformers (each position sees the last `window`
positions, itself included). llama.cpp currently disables Phi-3's sliding window, so it differs from
this after `window` tokens (2047 for Phi-3-mini-4k; 0, meaning none, for Phi-4).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache
from ..convert_spec import ConvertSpec, hf_rope_parameters
from ..errors import PurelmError
from ..formats.gguf import GGUFFile
from .common import Model, Params, Weights
from .layers import Attention, Block, GatedFFN, Norm, output_head


class Phi3(Model):
    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=True, n_ctx_default=4096)
        self.n_ctx_orig = p.int("rope.scaling.original_context_length", self.n_ctx_train)
        n_ff = p.int("feed_forward_length")

        attn_factor = p.float("rope.scaling.attn_factor", 1.0, lo=0.0, above=True)
        self.rope_short = self.read_rope(p, neox=True, scaling=False, freq_factors="rope_factors_short.weight",
                                         attn_factor=attn_factor)
        self.rope_long = self.read_rope(p, neox=True, scaling=False, freq_factors="rope_factors_long.weight",
                                        attn_factor=attn_factor)
        window = p.int("attention.sliding_window", 0, lo=0)
        spec = AttentionSpec(scale=1.0 / np.sqrt(self.head_dim), window=window or None)

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        self.out_norm = Norm.rms_norm(self, w, "output_norm")
        self.output, self.output_b = output_head(self, w)  # tied in Phi-4-mini
        fused = "blk.0.attn_qkv.weight" in gguf.tensors  # some files split q|k|v
        self.layers = [Block(
            attn_norm=Norm.rms_norm(self, w, f"blk.{i}.attn_norm"),
            attn=Attention.load(self, w, i, spec=spec, fused=fused, bias="none"),
            ffn_norm=Norm.rms_norm(self, w, f"blk.{i}.ffn_norm"),
            ffn=GatedFFN.load(self, w, i, n_ff, "silu", fused=True),
        ) for i in range(self.n_layer)]

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        rope = self.rope_long if cache.n_ctx > self.n_ctx_orig else self.rope_short
        x = self.ops.embed(self.tok_embd, ids)
        for L in self.layers:
            x = x + L.attn(L.attn_norm(x), positions, cache, rope)
            x = x + L.ffn(L.ffn_norm(x))
        return self.out_norm(x)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

TENSORS = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
]
REQUIRED = ["token_embd.weight", "output_norm.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")]


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = hf_rope_parameters(cfg)
    rope.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096))
    kind = str(rope.get("rope_type", "default")).lower()
    if kind not in ("default", "longrope", "su"):
        raise PurelmError(f"Phi-3 rope type {kind!r} is not supported (only the default and longrope/su)")
    rope["long"] = kind in ("longrope", "su") and bool(rope.get("long_factor"))
    return rope


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    n_head, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    rope = _rope(cfg)
    kv = {
        "context_length": cfg.get("max_position_embeddings", 4096),
        "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
        "embedding_length": dim,
        "feed_forward_length": cfg["intermediate_size"],
        "block_count": cfg["num_hidden_layers"],
        "attention.head_count": n_head,
        "attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        "attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-5)),
        "rope.dimension_count": int(rope.get("partial_rotary_factor", 1.0) * dim) // n_head,
        "rope.freq_base": float(rope.get("rope_theta", 10000.0)),
        "attention.sliding_window": cfg.get("sliding_window") or 0,  # 0: none (llama.cpp marks Phi-4 so)
    }
    if rope["long"]:  # transformers' longrope attention factor (cos and sin are scaled by it)
        factor = rope.get("factor") or kv["context_length"] / kv["rope.scaling.original_context_length"]
        attn = rope.get("attention_factor")
        if attn is None:
            orig = kv["rope.scaling.original_context_length"]
            attn = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0
        kv["rope.scaling.attn_factor"] = float(attn)
    return kv


def extra_tensors(ckpt: Any, cfg: dict[str, Any]):
    rope = _rope(cfg)
    if not rope["long"]:
        return
    n_pairs = hparams(cfg)["rope.dimension_count"] // 2
    for kind in ("long", "short"):
        factors = np.asarray(rope[f"{kind}_factor"], np.float32)
        if factors.shape != (n_pairs,):
            raise PurelmError(f"rope {kind}_factor has {factors.size} values, expected {n_pairs}")
        yield f"rope_factors_{kind}.weight", (n_pairs,), lambda f=factors: f


ARCHITECTURES = {"phi3": Phi3}
CONVERTERS = {"Phi3ForCausalLM": ConvertSpec("phi3", TENSORS, hparams, REQUIRED, extra_tensors=extra_tensors)}
