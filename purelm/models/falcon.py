"""Falcon (7B/40B/180B, Falcon 2): parallel attention and MLP from the same residual, LayerNorm with bias,
NeoX rotary embeddings, multi-query or grouped-query attention, a GELU MLP and no linear biases.

    a   = LayerNorm_2(x) if the layer has attn_norm_2 (Falcon-40B's ln_attn) else n,   n = LayerNorm(x)
    out = x + Wo · Attention(rope(q), rope(k), v) + Wdown · gelu(Wup · n),         q|k|v = Wqkv · a

GGUF's attn_qkv holds all q heads, then the k heads, then the v heads (llama.cpp's "jploski" layout);
Hugging Face interleaves them per kv group (new_decoder_architecture), which the converter reorders.
GELU is ggml's tanh approximation, as llama.cpp computes it; Hugging Face Falcon checkpoints use exact
(erf) GELU (`activation: "gelu"`) and the GGUF file cannot say which, so logits differ slightly
from transformers' for those (by ~1e-3 on the tiny fixtures' logits of size ~5, see
tests/test_arch_newer.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache
from ..convert import ConvertSpec
from ..errors import PurelmError
from ..formats.gguf import GGUFFile
from .blocks import hf_rope_parameters
from .common import Model, Params, Weights


class Falcon(Model):
    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=False, n_kv_head_default=1)
        dim, hd, n_vocab = self.dim, self.head_dim, self.n_vocab
        ffn = p.int("feed_forward_length")
        self.rope = self.read_rope(p, neox=True, scaling=False)
        self.attn = AttentionSpec(scale=1.0 / np.sqrt(hd))

        self.tok_embd = w.matrix("token_embd.weight", (n_vocab, dim))
        self.out_norm = (w.vector("output_norm.weight", dim), w.vector("output_norm.bias", dim))
        self.output = w.matrix("output.weight", (n_vocab, dim), optional=True)
        if self.output is None:  # tied embeddings
            self.output = self.tok_embd
        self.q_dim, self.kv_dim = self.n_head * hd, self.n_kv_head * hd
        self.layers = []
        for i in range(self.n_layer):
            b = f"blk.{i}."
            norm2 = w.vector(b + "attn_norm_2.weight", dim, optional=True)
            self.layers.append(dict(
                attn_norm=(w.vector(b + "attn_norm.weight", dim), w.vector(b + "attn_norm.bias", dim)),
                attn_norm_2=None if norm2 is None else (norm2, w.vector(b + "attn_norm_2.bias", dim)),
                wqkv=w.matrix(b + "attn_qkv.weight", (self.q_dim + 2 * self.kv_dim, dim)),
                wo=w.matrix(b + "attn_output.weight", (dim, self.q_dim)),
                w_up=w.matrix(b + "ffn_up.weight", (ffn, dim)),
                w_down=w.matrix(b + "ffn_down.weight", (dim, ffn)),
            ))

    def new_cache(self, n_ctx: int) -> KVCache:
        return self.ops.kv_cache(self.n_layer, n_ctx, self.n_kv_head, self.head_dim, self.head_dim)

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        ops, T, hd, qd, kvd = self.ops, len(ids), self.head_dim, self.q_dim, self.kv_dim
        x = ops.embed(self.tok_embd, ids)
        for i, L in enumerate(self.layers):
            n = ops.layer_norm(x, *L["attn_norm"], self.eps)
            a = n if L["attn_norm_2"] is None else ops.layer_norm(x, *L["attn_norm_2"], self.eps)
            qkv = ops.linear(a, L["wqkv"])
            q = qkv[:, :qd].reshape(T, self.n_head, hd)
            k = qkv[:, qd : qd + kvd].reshape(T, self.n_kv_head, hd)
            v = qkv[:, qd + kvd :].reshape(T, self.n_kv_head, hd)
            q, k = ops.rope(q, positions, self.rope), ops.rope(k, positions, self.rope)
            attn = ops.linear(ops.attention(q, k, v, cache, i, self.attn), L["wo"])
            x = x + attn + ops.linear(ops.gelu(ops.linear(n, L["w_up"])), L["w_down"])
        return ops.layer_norm(x, *self.out_norm, self.eps)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

TENSORS = [
    ("transformer.word_embeddings.weight", "token_embd.weight"),
    ("transformer.ln_f.weight", "output_norm.weight"),
    ("transformer.ln_f.bias", "output_norm.bias"),
    ("lm_head.weight", "output.weight"),
    # Falcon-7B (and Falcon 2): one input norm; Falcon-40B: ln_mlp feeds the MLP, ln_attn the attention.
    ("transformer.h.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("transformer.h.{i}.input_layernorm.bias", "blk.{i}.attn_norm.bias"),
    ("transformer.h.{i}.ln_mlp.weight", "blk.{i}.attn_norm.weight"),
    ("transformer.h.{i}.ln_mlp.bias", "blk.{i}.attn_norm.bias"),
    ("transformer.h.{i}.ln_attn.weight", "blk.{i}.attn_norm_2.weight"),
    ("transformer.h.{i}.ln_attn.bias", "blk.{i}.attn_norm_2.bias"),
    ("transformer.h.{i}.self_attention.query_key_value.weight", "blk.{i}.attn_qkv.weight"),
    ("transformer.h.{i}.self_attention.dense.weight", "blk.{i}.attn_output.weight"),
    ("transformer.h.{i}.mlp.dense_h_to_4h.weight", "blk.{i}.ffn_up.weight"),
    ("transformer.h.{i}.mlp.dense_4h_to_h.weight", "blk.{i}.ffn_down.weight"),
]
REQUIRED = ["token_embd.weight", "output_norm.weight", "output_norm.bias"] + [
    f"blk.0.{n}" for n in ("attn_norm.weight", "attn_norm.bias", "attn_qkv.weight", "attn_output.weight",
                           "ffn_up.weight", "ffn_down.weight")]


def _heads(cfg: dict[str, Any]) -> tuple[int, int]:
    """(query heads, kv heads). A transformers-saved config always has num_kv_heads (it defaults to the
    head count), but only the new decoder architecture uses it; the old one is multi-query (one kv
    head) or, without multi_query, has per-head q|k|v (which the qkv reordering handles as n_kv = n_head)."""
    n_head = cfg.get("num_attention_heads") or cfg["n_head"]
    if cfg.get("new_decoder_architecture"):
        return n_head, cfg.get("num_kv_heads") or cfg.get("n_head_kv") or 1
    return n_head, 1 if cfg.get("multi_query", True) else n_head


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    unsupported = [k for k in ("alibi", "bias") if cfg.get(k)]
    if not cfg.get("new_decoder_architecture") and not cfg.get("parallel_attn", True):
        unsupported.append("parallel_attn=false")
    if unsupported:  # llama.cpp's falcon graph has none of these
        raise PurelmError(f"Falcon with {', '.join(unsupported)} is not supported (llama.cpp's falcon has none)")
    if cfg.get("activation", "gelu") not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise PurelmError(f"Falcon with activation {cfg['activation']!r} is not supported (GGUF falcon is GELU)")
    n_head, n_kv = _heads(cfg)
    rope = hf_rope_parameters(cfg)
    kv = {
        "context_length": cfg.get("max_position_embeddings", 2048),
        "tensor_data_layout": "jploski",  # the q|k|v reordering below
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg.get("ffn_hidden_size") or 4 * cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "attention.head_count": n_head,
        "attention.head_count_kv": n_kv,
        "attention.layer_norm_epsilon": float(cfg.get("layer_norm_epsilon", 1e-5)),
    }
    if rope.get("rope_theta", 10000.0) != 10000.0:  # llama.cpp's converter leaves the default unwritten
        kv["rope.freq_base"] = float(rope["rope_theta"])
    return kv


def qkv_order(cfg: dict[str, Any]) -> np.ndarray:
    """Row order taking Hugging Face's query_key_value (per kv group: its q heads, then k, then v) to
    llama.cpp's (all q, all k, all v)."""
    n_head, n_kv = _heads(cfg)
    hd = cfg["hidden_size"] // n_head
    rows = np.arange((n_head + 2 * n_kv) * hd).reshape(n_kv, n_head // n_kv + 2, hd)
    return np.concatenate([rows[:, :-2].reshape(-1), rows[:, -2].reshape(-1), rows[:, -1].reshape(-1)])


def transform(name: str, x: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    return x[qkv_order(cfg)] if name.endswith("attn_qkv.weight") else x


ARCHITECTURES = {"falcon": Falcon}
CONVERTERS = {"FalconForCausalLM": ConvertSpec("falcon", TENSORS, hparams, REQUIRED, transform)}
