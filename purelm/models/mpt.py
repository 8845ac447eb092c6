"""MPT (MosaicML): GPT-2's block (see gpt2.py) without biases (LayerNorms without a shift), ALiBi
instead of position embeddings, and q|k|v optionally clamped:

    q|k|v = clamp(Wqkv · LN₁(x), ±clamp_kqv)
    h     = x + Wo · softmax(q·kᵀ/√d + m_h · j) v,   j = key position
    out   = h + Wdown · gelu(Wup · LN₂(h))

The ALiBi slopes m_h use `mpt.attention.max_alibi_bias` (MPT's alibi_bias_max, usually 8). GELU is the
exact (erf) form, as MPT was trained and transformers' MptMLP computes it; llama.cpp uses the tanh
approximation.
"""
from __future__ import annotations

from typing import Any

from ..convert_spec import ConvertSpec
from .common import Params
from .gpt2 import GPT2


class MPT(GPT2):
    act = "gelu_erf"

    def alibi_max_bias(self, p: Params) -> float:
        return p.float("attention.max_alibi_bias", lo=0.0)

    def clamp(self, p: Params) -> float | None:
        return p.float("attention.clamp_kqv", None, lo=0.0) or None


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)
# Wqkv is already q|k|v blocks. Position embeddings exist only in MPT variants without ALiBi.

TENSORS = [
    ("transformer.wte.weight", "token_embd.weight"),
    ("transformer.wpe.weight", "position_embd.weight"),
    ("transformer.norm_f.weight", "output_norm.weight"),
    ("transformer.norm_f.bias", "output_norm.bias"),
    ("lm_head.weight", "output.weight"),
] + [(f"transformer.blocks.{{i}}.{hf}.{wb}", f"blk.{{i}}.{gg}.{wb}") for wb in ("weight", "bias") for hf, gg in [
    ("norm_1", "attn_norm"),
    ("attn.Wqkv", "attn_qkv"),
    ("attn.out_proj", "attn_output"),
    ("norm_2", "ffn_norm"),
    ("ffn.up_proj", "ffn_up"),
    ("ffn.down_proj", "ffn_down"),
]]
REQUIRED = ["token_embd.weight", "output_norm.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    attn = cfg.get("attn_config") or {}
    kv = {
        "context_length": cfg["max_seq_len"],
        "embedding_length": cfg["d_model"],
        "block_count": cfg["n_layers"],
        "feed_forward_length": int(cfg.get("expansion_ratio", 4) * cfg["d_model"]),
        "attention.head_count": cfg["n_heads"],
        "attention.layer_norm_epsilon": float(cfg.get("layer_norm_epsilon", 1e-5)),
    }
    if attn.get("kv_n_heads"):
        kv["attention.head_count_kv"] = attn["kv_n_heads"]
    if attn.get("clip_qkv") is not None:
        kv["attention.clamp_kqv"] = float(attn["clip_qkv"])
    kv["attention.max_alibi_bias"] = float(attn.get("alibi_bias_max", 8)) if attn.get("alibi") else 0.0
    return kv


ARCHITECTURES = {"mpt": MPT}
# MPTForCausalLM: MosaicML's remote code (what llama.cpp registers); MptForCausalLM: transformers' port.
CONVERTERS = {name: ConvertSpec("mpt", TENSORS, hparams, REQUIRED, n_layer_key="n_layers")
              for name in ("MPTForCausalLM", "MptForCausalLM")}
