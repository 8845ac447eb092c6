"""GPT-NeoX (Pythia, GPT-NeoX-20B, ...): GPT-2's block (see gpt2.py) with rotary q/k instead of position
embeddings, rotating only the first `rope.dimension_count` features of each head in NeoX mode (x[i] with
x[i + n/2]), and usually a parallel residual (`gptneox.use_parallel_residual`):

    q|k|v = Wqkv · LN₁(x) + bqkv,   a = Wo · Attention(rope(q), rope(k), v) + bo
    out   = x + a + FFN(LN₂(x))                 (parallel)
    out   = h + FFN(LN₂(h)),  h = x + a         (sequential)

FFN(m) = Wdown · gelu(Wup · m + bup) + bdown with the exact (erf) GELU of Pythia's checkpoints
(`hidden_act: gelu`); llama.cpp uses the tanh approximation (< 1e-3 away per activation).
"""
from __future__ import annotations

from typing import Any

from ..backends.base import Rope
from ..convert_spec import ConvertSpec, qkv_blocks
from .common import Params
from .gpt2 import GPT2


class GPTNeoX(GPT2):
    act = "gelu_erf"

    def __init__(self, gguf, backend) -> None:
        self.parallel_residual = Params(gguf).bool("use_parallel_residual", True)
        super().__init__(gguf, backend)

    def rope_spec(self, p: Params) -> Rope:
        return self.read_rope(p, neox=True, scaling=False)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)
# The fused q|k|v is stored per head in HF; llama.cpp's converter reorders it to q|k|v blocks.

TENSORS = [
    ("gpt_neox.embed_in.weight", "token_embd.weight"),
    ("gpt_neox.final_layer_norm.weight", "output_norm.weight"),
    ("gpt_neox.final_layer_norm.bias", "output_norm.bias"),
    ("embed_out.weight", "output.weight"),
    ("lm_head.weight", "output.weight"),  # transformers 5's in-memory name for embed_out
] + [(f"gpt_neox.layers.{{i}}.{hf}.{wb}", f"blk.{{i}}.{gg}.{wb}") for wb in ("weight", "bias") for hf, gg in [
    ("input_layernorm", "attn_norm"),
    ("attention.query_key_value", "attn_qkv"),
    ("attention.dense", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.dense_h_to_4h", "ffn_up"),
    ("mlp.dense_4h_to_h", "ffn_down"),
]]
REQUIRED = ["token_embd.weight", "output_norm.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = cfg.get("rope_parameters") or {}  # transformers 5 moves rotary_pct/rotary_emb_base here
    rotary_pct = cfg.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))
    base = float(cfg.get("rotary_emb_base", rope.get("rope_theta", 10000.0)))
    kv = {
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "feed_forward_length": cfg["intermediate_size"],
        "rope.dimension_count": int(rotary_pct * (cfg["hidden_size"] // cfg["num_attention_heads"])),
        "attention.head_count": cfg["num_attention_heads"],
        "use_parallel_residual": bool(cfg.get("use_parallel_residual", True)),
        "attention.layer_norm_epsilon": float(cfg["layer_norm_eps"]),
    }
    if base != 10000.0:  # llama.cpp's converter omits it (its default); written only when it matters
        kv["rope.freq_base"] = base
    return kv


def transform(name: str, x, cfg: dict[str, Any]):
    return qkv_blocks(x, cfg["num_attention_heads"]) if ".attn_qkv." in name else x


def buffers(name: str) -> bool:
    return name.endswith((".attention.bias", ".attention.masked_bias"))


ARCHITECTURES = {"gptneox": GPTNeoX}
CONVERTERS = {"GPTNeoXForCausalLM": ConvertSpec("gptneox", TENSORS, hparams, REQUIRED, transform, ignored=buffers)}
