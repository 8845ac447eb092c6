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

from ..backends.base import AttentionSpec, Backend, KVCache
from ..convert import ConvertSpec
from ..formats.gguf import GGUFFile
from .blocks import add_bias, hf_rope_parameters
from .common import Model, Params, Weights


class StableLM(Model):
    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=False, n_ctx_default=4096)
        dim, hd, n_vocab = self.dim, self.head_dim, self.n_vocab
        ffn = p.int("feed_forward_length")
        self.rope = self.read_rope(p, neox=True, scaling=False)
        self.attn = AttentionSpec(scale=1.0 / np.sqrt(hd))

        self.tok_embd = w.matrix("token_embd.weight", (n_vocab, dim))
        self.out_norm = (w.vector("output_norm.weight", dim), w.vector("output_norm.bias", dim))
        self.output = w.matrix("output.weight", (n_vocab, dim))
        q_dim, kv_dim = self.n_head * hd, self.n_kv_head * hd
        self.layers = []
        for i in range(self.n_layer):
            b = f"blk.{i}."
            ffn_norm = w.vector(b + "ffn_norm.weight", dim, optional=True)
            self.layers.append(dict(
                attn_norm=(w.vector(b + "attn_norm.weight", dim), w.vector(b + "attn_norm.bias", dim)),
                wqkv=w.matrices([(b + "attn_q.weight", (q_dim, dim)), (b + "attn_k.weight", (kv_dim, dim)),
                                 (b + "attn_v.weight", (kv_dim, dim))]),
                bq=w.vector(b + "attn_q.bias", q_dim, optional=True),
                bk=w.vector(b + "attn_k.bias", kv_dim, optional=True),
                bv=w.vector(b + "attn_v.bias", kv_dim, optional=True),
                q_norm=self.head_norm(w, b + "attn_q_norm.weight", self.n_head),
                k_norm=self.head_norm(w, b + "attn_k_norm.weight", self.n_kv_head),
                wo=w.matrix(b + "attn_output.weight", (dim, q_dim)),
                ffn_norm=None if ffn_norm is None else (ffn_norm, w.vector(b + "ffn_norm.bias", dim)),
                w_gate_up=w.matrices([(b + "ffn_gate.weight", (ffn, dim)), (b + "ffn_up.weight", (ffn, dim))]),
                w_down=w.matrix(b + "ffn_down.weight", (dim, ffn)),
            ))

    def head_norm(self, w: Weights, name: str, n_head: int) -> Any:
        t = w.tensor(name, (n_head, self.head_dim), optional=True)
        return None if t is None else self.ops.vector(t).reshape(n_head, self.head_dim)

    def norm_heads(self, x: Any, weight: Any) -> Any:
        """LayerNorm of each head (T, heads, head_dim) over head_dim, scaled by per-head weights."""
        T, n, hd = x.shape
        return self.ops.layer_norm(x.reshape(T * n, hd), None, None, self.eps).reshape(T, n, hd) * weight

    def new_cache(self, n_ctx: int) -> KVCache:
        return self.ops.kv_cache(self.n_layer, n_ctx, self.n_kv_head, self.head_dim, self.head_dim)

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        ops, T, hd = self.ops, len(ids), self.head_dim
        x = ops.embed(self.tok_embd, ids)
        for i, L in enumerate(self.layers):
            n = ops.layer_norm(x, *L["attn_norm"], self.eps)
            q, k, v = ops.linear_many(n, L["wqkv"])
            q, k, v = add_bias(q, L["bq"]), add_bias(k, L["bk"]), add_bias(v, L["bv"])  # each bias is optional alone
            q, k, v = (q.reshape(T, self.n_head, hd), k.reshape(T, self.n_kv_head, hd),
                       v.reshape(T, self.n_kv_head, hd))
            if L["q_norm"] is not None:  # each is optional alone, as in llama.cpp
                q = self.norm_heads(q, L["q_norm"])
            if L["k_norm"] is not None:
                k = self.norm_heads(k, L["k_norm"])
            q, k = ops.rope(q, positions, self.rope), ops.rope(k, positions, self.rope)
            h = x + ops.linear(ops.attention(q, k, v, cache, i, self.attn), L["wo"])

            m = n if L["ffn_norm"] is None else ops.layer_norm(h, *L["ffn_norm"], self.eps)
            gate, up = ops.linear_many(m, L["w_gate_up"])
            x = h + ops.linear(ops.swiglu(gate, up), L["w_down"])
        return ops.layer_norm(x, *self.out_norm, self.eps)


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
