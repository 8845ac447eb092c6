"""Falcon (7B/40B/180B, Falcon 2): parallel attention and MLP from the same residual, LayerNorm with bias,
NeoX rotary embeddings, multi-query or grouped-query attention, a GELU MLP and no linear biases.

    a   = LayerNorm_2(x) if the layer has attn_norm_2 (Falcon-40B's ln_attn) else n,   n = LayerNorm(x)
    out = x + Wo · Attention(rope(q), rope(k), v) + Wdown · gelu(Wup · n),         q|k|v = Wqkv · a

GGUF's attn_qkv holds all q heads, then the k heads, then the v heads (llama.cpp's "jploski" layout);
Hugging Face interleaves them per kv group (new_decoder_architecture), which the converter reorders.
GELU is the exact (erf) form the checkpoints were trained with (`activation: "gelu"`; a GGUF file cannot
say which, so it is chosen per architecture). llama.cpp uses the tanh approximation, ~1e-3 away in the
logits of the tiny fixtures (size ~5).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import Backend, KVCache
from ..convert_spec import ConvertSpec, hf_rope_parameters
from ..errors import PurelmError
from ..formats.gguf import GGUFFile
from .common import Model, Params, Weights
from .layers import Attention, Block, MLP, Norm, output_head


class Falcon(Model):
    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=False, n_kv_head_default=1)
        n_ff = p.int("feed_forward_length")
        rope = self.read_rope(p, neox=True, scaling=False)

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        self.out_norm = Norm.layer_norm(self, w, "output_norm")
        self.output, self.output_b = output_head(self, w)
        self.layers = []
        for i in range(self.n_layer):
            norm = Norm.layer_norm(self, w, f"blk.{i}.attn_norm")
            norm_2 = Norm.layer_norm(self, w, f"blk.{i}.attn_norm_2", optional=True)
            self.layers.append(Block(
                attn_norm=norm if norm_2 is None else norm_2,
                attn=Attention.load(self, w, i, rope, fused=True, bias="none"),
                ffn_norm=None if norm_2 is None else norm,  # None: the MLP reads attn_norm's output too
                ffn=MLP.load(self, w, i, n_ff, "gelu_erf", bias="none"),
            ))

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        x = self.ops.embed(self.tok_embd, ids)
        for L in self.layers:
            a = L.attn_norm(x)
            n = a if L.ffn_norm is None else L.ffn_norm(x)
            x = x + L.attn(a, positions, cache) + L.ffn(n)
        return self.out_norm(x)


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
