"""BLOOM: GPT-2's block (see gpt2.py) with ALiBi instead of position embeddings and a LayerNorm on the
token embeddings:

    x   = LN₀(E[ids])
    h   = x + Wo · softmax(q·kᵀ/√d + m_h · j) v + bo,   q|k|v = Wqkv · LN₁(x) + bqkv,  j = key position
    out = h + Wdown · gelu(Wup · LN₂(h) + bup) + bdown

The head slopes m_h are ALiBi's with max_bias 8 (llama.cpp fixes it for BLOOM; no GGUF key).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..convert_spec import ConvertSpec, qkv_blocks
from .common import Params
from .gpt2 import GPT2


class Bloom(GPT2):
    def alibi_max_bias(self, p: Params) -> float:
        return 8.0


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)
# HF fuses q|k|v per head ([n_head, 3, head_dim] rows); llama.cpp's converter reorders the rows to q|k|v
# blocks. Checkpoints saved from BloomModel lack the "transformer." prefix: both are accepted.

TENSORS = [
    (pre + hf, gg) for pre in ("transformer.", "") for hf, gg in [
        ("word_embeddings.weight", "token_embd.weight"),
        ("word_embeddings_layernorm.weight", "token_embd_norm.weight"),
        ("word_embeddings_layernorm.bias", "token_embd_norm.bias"),
        ("ln_f.weight", "output_norm.weight"),
        ("ln_f.bias", "output_norm.bias"),
    ] + [(f"h.{{i}}.{hf}.{wb}", f"blk.{{i}}.{gg}.{wb}") for wb in ("weight", "bias") for hf, gg in [
        ("input_layernorm", "attn_norm"),
        ("self_attention.query_key_value", "attn_qkv"),
        ("self_attention.dense", "attn_output"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.dense_h_to_4h", "ffn_up"),
        ("mlp.dense_4h_to_h", "ffn_down"),
    ]]
] + [("lm_head.weight", "output.weight")]
REQUIRED = ["token_embd.weight", "token_embd_norm.weight", "output_norm.weight", "output.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")]


def _dims(cfg: dict[str, Any]) -> tuple[int, int]:
    return cfg.get("n_head", cfg.get("num_attention_heads")), cfg.get("hidden_size", cfg.get("n_embed"))


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    n_head, n_embd = _dims(cfg)
    return {
        "context_length": cfg.get("seq_length", n_embd),  # llama.cpp's choice: BLOOM has no fixed context
        "embedding_length": n_embd,
        "feed_forward_length": 4 * n_embd,
        "block_count": cfg["n_layer"],
        "attention.head_count": n_head,
        "attention.head_count_kv": n_head,
        "attention.layer_norm_epsilon": float(cfg["layer_norm_epsilon"]),
    }


def transform(name: str, x: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    return qkv_blocks(x, _dims(cfg)[0]) if ".attn_qkv." in name else x


def tied_output(ckpt, cfg: dict[str, Any]):
    """llama.cpp's converter writes the tied head as its own output.weight (a copy of the embeddings)."""
    if "lm_head.weight" in ckpt and not cfg.get("tie_word_embeddings", True):
        return
    emb = next(n for n in ("transformer.word_embeddings.weight", "word_embeddings.weight") if n in ckpt)
    yield "output.weight", tuple(ckpt.shape(emb)), lambda: ckpt.get(emb)


ARCHITECTURES = {"bloom": Bloom}
CONVERTERS = {
    name: ConvertSpec("bloom", TENSORS, hparams, REQUIRED, transform, extra_tensors=tied_output, n_layer_key="n_layer")
    for name in ("BloomForCausalLM", "BloomModel")
}
