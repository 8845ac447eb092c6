"""StableLM (3B-4E1T, StableLM 2 1.6B/12B, StableCode): LayerNorm with bias, partial NeoX rotary
embeddings, grouped-query attention with optional q/k/v biases, a SwiGLU feed-forward, and in StableLM 2
12B per-head LayerNorms of q and k and a parallel residual.

    n   = LayerNorm(x)
    h   = x + Wo · Attention(rope(qn(Wq·n + bq)), rope(kn(Wk·n + bk)), Wv·n + bv)
    out = h + Wdown · (silu(Wgate·m) * Wup·m),   m = LayerNorm_ffn(h), or m = n without ffn_norm (parallel)

qn/kn normalise each head over head_dim (no bias) and scale by that head's own weights: attn_q_norm is
(n_head, head_dim). As in llama.cpp, the residual is parallel exactly when the layers have no ffn_norm.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import Backend, KVCache
from ..convert_spec import ConvertSpec, hf_rope_parameters
from ..formats.gguf import GGUFFile
from .common import Model, Params, Weights
from .layers import Attention, Block, GatedFFN, HeadNorm, Norm, output_head


class StableLM(Model):
    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=False, n_ctx_default=4096)
        n_ff = p.int("feed_forward_length")
        rope = self.read_rope(p, neox=True, scaling=False)

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        self.out_norm = Norm.layer_norm(self, w, "output_norm")
        self.output, self.output_b = output_head(self, w, tied=False)
        self.layers = [Block(
            attn_norm=Norm.layer_norm(self, w, f"blk.{i}.attn_norm"),
            attn=Attention.load(
                self, w, i, rope,  # each q/k norm is optional alone, as in llama.cpp
                q_norm=HeadNorm.layer_norm_per_head(self, w, f"blk.{i}.attn_q_norm.weight", self.n_head),
                k_norm=HeadNorm.layer_norm_per_head(self, w, f"blk.{i}.attn_k_norm.weight", self.n_kv_head)),
            ffn_norm=Norm.layer_norm(self, w, f"blk.{i}.ffn_norm", optional=True),
            ffn=GatedFFN.load(self, w, i, n_ff, "silu"),
        ) for i in range(self.n_layer)]

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        x = self.ops.embed(self.tok_embd, ids)
        for L in self.layers:
            n = L.attn_norm(x)
            if L.ffn_norm is None:  # parallel residual
                x = x + L.attn(n, positions, cache) + L.ffn(n)
            else:
                h = x + L.attn(n, positions, cache)
                x = h + L.ffn(L.ffn_norm(h))
        return self.out_norm(x)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

TENSORS = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("model.norm.bias", "output_norm.bias"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.input_layernorm.bias", "blk.{i}.attn_norm.bias"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.bias", "blk.{i}.ffn_norm.bias"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
]
REQUIRED = ["token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight"] + [
    f"blk.0.{n}" for n in ("attn_norm.weight", "attn_norm.bias", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                           "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    n_head = cfg["num_attention_heads"]
    rope = hf_rope_parameters(cfg)
    kv = {
        "context_length": cfg.get("max_position_embeddings", 4096),
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "feed_forward_length": cfg["intermediate_size"],
        "rope.dimension_count": int(rope.get("partial_rotary_factor", 0.25) * (cfg["hidden_size"] // n_head)),
        "attention.head_count": n_head,
        "attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        "use_parallel_residual": bool(cfg.get("use_parallel_residual", True)),
        "attention.layer_norm_epsilon": float(cfg.get("layer_norm_eps", cfg.get("norm_eps", 1e-5))),
    }
    if rope.get("rope_theta", 10000.0) != 10000.0:  # llama.cpp's converter leaves the default unwritten
        kv["rope.freq_base"] = float(rope["rope_theta"])
    return kv


def _per_head_norm(name: str) -> bool:
    return ".q_layernorm.norms." in name or ".k_layernorm.norms." in name


def extra_tensors(ckpt: Any, cfg: dict[str, Any]):
    """StableLM 2 12B's per-head q/k LayerNorm weights, stacked into one (heads, head_dim) tensor per
    layer as llama.cpp's converter does."""
    n_kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    for i in range(cfg["num_hidden_layers"]):
        for hf, gguf_name, n in (("q_layernorm", "attn_q_norm", cfg["num_attention_heads"]),
                                 ("k_layernorm", "attn_k_norm", n_kv)):
            names = [f"model.layers.{i}.self_attn.{hf}.norms.{h}.weight" for h in range(n)]
            if names[0] in ckpt:
                yield (f"blk.{i}.{gguf_name}.weight", (n, ckpt.shape(names[0])[0]),
                       lambda names=names: np.stack([ckpt.get(x) for x in names]))


ARCHITECTURES = {"stablelm": StableLM}
CONVERTERS = {
    "StableLmForCausalLM": ConvertSpec("stablelm", TENSORS, hparams, REQUIRED, extra_tensors=extra_tensors,
                                       ignored=_per_head_norm),
    "StableLMEpochForCausalLM": ConvertSpec("stablelm", TENSORS, hparams, REQUIRED, extra_tensors=extra_tensors,
                                            ignored=_per_head_norm),
}
