"""Phi-1, Phi-1.5 and Phi-2: attention and MLP in parallel from one LayerNorm, partial NeoX rotary
embeddings, a GELU MLP, biases on every linear layer, and an output head with a bias.

    n   = LayerNorm(x)
    out = x + (Wo · Attention(rope(Wq·n + bq), rope(Wk·n + bk), Wv·n + bv) + bo)
            + (Wdown · gelu(Wup·n + bup) + bdown)
    logits = Wout · LayerNorm(h) + bout

Only the first `rope.dimension_count` features of each head rotate (partial_rotary_factor). GELU is the
tanh approximation (Hugging Face's gelu_new, ggml's gelu), so it matches transformers exactly. Older GGUF
files fuse q|k|v into attn_qkv (with its bias); both layouts load.
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


class Phi2(Model):
    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=False)
        n_ff = p.int("feed_forward_length")
        rope = self.read_rope(p, neox=True, scaling=False)

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        self.out_norm = Norm.layer_norm(self, w, "output_norm")
        self.output, self.output_b = output_head(self, w, tied=False, bias="required")
        fused = "blk.0.attn_qkv.weight" in gguf.tensors  # older files
        self.layers = [Block(
            attn_norm=Norm.layer_norm(self, w, f"blk.{i}.attn_norm"),
            attn=Attention.load(self, w, i, rope, fused=fused, bias="required", out_bias="required"),
            ffn=MLP.load(self, w, i, n_ff, "gelu", bias="required"),
        ) for i in range(self.n_layer)]

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        x = self.ops.embed(self.tok_embd, ids)
        for L in self.layers:
            n = L.attn_norm(x)
            x = x + L.attn(n, positions, cache) + L.ffn(n)
        return self.out_norm(x)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

TENSORS = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.final_layernorm.weight", "output_norm.weight"),
    ("model.final_layernorm.bias", "output_norm.bias"),
    ("lm_head.weight", "output.weight"),
    ("lm_head.bias", "output.bias"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.input_layernorm.bias", "blk.{i}.attn_norm.bias"),
] + [(f"model.layers.{{i}}.{hf}.{wb}", f"blk.{{i}}.{g}.{wb}") for hf, g in (
    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.dense", "attn_output"), ("mlp.fc1", "ffn_up"), ("mlp.fc2", "ffn_down")) for wb in ("weight", "bias")]
REQUIRED = [g for _, g in TENSORS if "{i}" not in g] + [g.format(i=0) for _, g in TENSORS if "{i}" in g]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("qk_layernorm"):
        raise PurelmError("Phi with qk_layernorm is not supported (llama.cpp's phi2 has no q/k norms)")
    if cfg.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise PurelmError(f"Phi with hidden_act {cfg['hidden_act']!r} is not supported (GGUF phi2 is tanh GELU)")
    n_head = cfg["num_attention_heads"]
    rope = hf_rope_parameters(cfg)
    kv = {
        "context_length": cfg.get("max_position_embeddings", 2048),
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg["intermediate_size"],
        "block_count": cfg["num_hidden_layers"],
        "attention.head_count": n_head,
        "attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        "attention.layer_norm_epsilon": float(cfg.get("layer_norm_eps", 1e-5)),
        "rope.dimension_count": int(cfg["hidden_size"] // n_head * rope.get("partial_rotary_factor", 0.5)),
    }
    if rope.get("rope_theta", 10000.0) != 10000.0:  # llama.cpp's converter leaves the default unwritten
        kv["rope.freq_base"] = float(rope["rope_theta"])
    return kv


ARCHITECTURES = {"phi2": Phi2}
CONVERTERS = {"PhiForCausalLM": ConvertSpec("phi2", TENSORS, hparams, REQUIRED)}
