"""OLMo 2: a decoder whose norms come after each sublayer instead of before, with RMSNorms of the query
and key projections taken over the whole projection (all heads together), NeoX-style rotation, no biases.

    h   = x + P_a(Wo · Attention(rope(N_q(Wq·x)), rope(N_k(Wk·x)), Wv·x))
    out = h + P_f(Wdown · (silu(Wgate·h) * Wup·h))

N_q, N_k: RMSNorm over n_head·head_dim (n_kv_head·head_dim for k); P_a, P_f: RMSNorms over the width.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache
from ..convert_spec import ConvertSpec, text_model_hparams
from ..errors import PurelmError
from ..formats.gguf import GGUFFile
from .common import Model, Params, Weights
from .layers import Attention, Block, GatedFFN, Norm, ProjectionNorm, output_head


class Olmo2(Model):
    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=True, n_ctx_default=4096)
        n_ff = p.int("feed_forward_length")
        if p.int("attention.sliding_window", 0, lo=0):
            raise p.fail("attention.sliding_window", p.raw("attention.sliding_window"),
                         "0 or absent: OLMo 3's sliding-window layers are not supported")
        rope = self.read_rope(p, neox=True)
        spec = AttentionSpec(scale=1.0 / np.sqrt(self.head_dim))

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        self.out_norm = Norm.rms_norm(self, w, "output_norm")
        self.output, self.output_b = output_head(self, w, tied=False)
        self.layers = [Block(
            attn_norm=None,  # OLMo 2 normalises the sublayers' outputs, not their inputs
            attn=Attention.load(self, w, i, rope, spec, bias="none",
                                q_norm=ProjectionNorm.load(self, w, f"blk.{i}.attn_q_norm.weight", self.n_head),
                                k_norm=ProjectionNorm.load(self, w, f"blk.{i}.attn_k_norm.weight", self.n_kv_head)),
            ffn=GatedFFN.load(self, w, i, n_ff, "silu"),
            post_attn_norm=Norm.rms_norm(self, w, f"blk.{i}.post_attention_norm"),
            post_ffn_norm=Norm.rms_norm(self, w, f"blk.{i}.post_ffw_norm"),
        ) for i in range(self.n_layer)]

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        x = self.ops.embed(self.tok_embd, ids)
        for L in self.layers:
            x = x + L.post_attn_norm(L.attn(x, positions, cache))
            x = x + L.post_ffn_norm(L.ffn(x))
        return self.out_norm(x)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

TENSORS = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight"),
]
REQUIRED = ["token_embd.weight", "output_norm.weight", "output.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                                  "post_attention_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("sliding_window") is not None or cfg.get("layer_types") is not None:
        raise PurelmError("OLMo 2 with a sliding window (OLMo 3) is not supported")
    if cfg.get("tie_word_embeddings"):  # llama.cpp's olmo2 requires output.weight
        raise PurelmError("OLMo 2 with tie_word_embeddings is not supported (llama.cpp needs output.weight)")
    return text_model_hparams(cfg, "OLMo 2")


ARCHITECTURES = {"olmo2": Olmo2}
CONVERTERS = {"Olmo2ForCausalLM": ConvertSpec("olmo2", TENSORS, hparams, REQUIRED)}
