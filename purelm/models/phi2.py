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

from ..backends.base import AttentionSpec, Backend, KVCache
from ..convert import ConvertSpec
from ..errors import PurelmError
from ..formats.gguf import GGUFFile
from .blocks import hf_rope_parameters
from .common import Model, Params, Weights


class Phi2(Model):
    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=False)
        dim, hd, n_vocab = self.dim, self.head_dim, self.n_vocab
        ffn = p.int("feed_forward_length")
        self.rope = self.read_rope(p, neox=True, scaling=False)
        self.attn = AttentionSpec(scale=1.0 / np.sqrt(hd))

        self.tok_embd = w.matrix("token_embd.weight", (n_vocab, dim))
        self.out_norm = (w.vector("output_norm.weight", dim), w.vector("output_norm.bias", dim))
        self.output = w.matrix("output.weight", (n_vocab, dim))
        self.output_b = w.vector("output.bias", n_vocab)
        self.q_dim, self.kv_dim = q_dim, kv_dim = self.n_head * hd, self.n_kv_head * hd
        self.fused = "blk.0.attn_qkv.weight" in gguf.tensors
        self.layers = []
        for i in range(self.n_layer):
            b = f"blk.{i}."
            if self.fused:
                qkv = dict(wqkv=w.matrix(b + "attn_qkv.weight", (q_dim + 2 * kv_dim, dim)),
                           bqkv=w.vector(b + "attn_qkv.bias", q_dim + 2 * kv_dim))
            else:
                qkv = dict(wqkv=w.matrices([(b + "attn_q.weight", (q_dim, dim)), (b + "attn_k.weight", (kv_dim, dim)),
                                            (b + "attn_v.weight", (kv_dim, dim))]),
                           bq=w.vector(b + "attn_q.bias", q_dim), bk=w.vector(b + "attn_k.bias", kv_dim),
                           bv=w.vector(b + "attn_v.bias", kv_dim))
            self.layers.append(dict(
                qkv,
                attn_norm=(w.vector(b + "attn_norm.weight", dim), w.vector(b + "attn_norm.bias", dim)),
                wo=w.matrix(b + "attn_output.weight", (dim, q_dim)),
                bo=w.vector(b + "attn_output.bias", dim),
                w_up=w.matrix(b + "ffn_up.weight", (ffn, dim)),
                b_up=w.vector(b + "ffn_up.bias", ffn),
                w_down=w.matrix(b + "ffn_down.weight", (dim, ffn)),
                b_down=w.vector(b + "ffn_down.bias", dim),
            ))

    def new_cache(self, n_ctx: int) -> KVCache:
        return self.ops.kv_cache(self.n_layer, n_ctx, self.n_kv_head, self.head_dim, self.head_dim)

    def qkv(self, n: Any, L: dict) -> tuple[Any, Any, Any]:
        if self.fused:
            qkv, qd, kvd = self.ops.linear(n, L["wqkv"], L["bqkv"]), self.q_dim, self.kv_dim
            return qkv[:, :qd], qkv[:, qd : qd + kvd], qkv[:, qd + kvd :]
        q, k, v = self.ops.linear_many(n, L["wqkv"])
        return q + L["bq"], k + L["bk"], v + L["bv"]

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        ops, T, hd = self.ops, len(ids), self.head_dim
        x = ops.embed(self.tok_embd, ids)
        for i, L in enumerate(self.layers):
            n = ops.layer_norm(x, *L["attn_norm"], self.eps)
            q, k, v = self.qkv(n, L)
            q, k = q.reshape(T, self.n_head, hd), k.reshape(T, self.n_kv_head, hd)
            q, k = ops.rope(q, positions, self.rope), ops.rope(k, positions, self.rope)
            attn = ops.linear(ops.attention(q, k, v.reshape(T, self.n_kv_head, hd), cache, i, self.attn),
                              L["wo"], L["bo"])
            ffn = ops.linear(ops.gelu(ops.linear(n, L["w_up"], L["b_up"])), L["w_down"], L["b_down"])
            x = x + attn + ffn
        return ops.layer_norm(x, *self.out_norm, self.eps)


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
