"""LLaMA and its family (Mistral, SmolLM, TinyLlama, Qwen2's biases, Mixtral's experts): pre-norm decoder
with RMSNorm, rotary embeddings, grouped-query attention and a SwiGLU feed-forward.

    h   = x + Wo · Attention(rope(Wq·n), rope(Wk·n), Wv·n),   n = RMSNorm(x)
    out = h + Wdown · (silu(Wgate·m) * Wup·m),                m = RMSNorm(h)

Mixtral is this architecture in GGUF with a mixture of experts in place of the feed-forward (a layer with
ffn_gate_inp: softmax router, top-k, weights renormalized; models/experts.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache, Rope
from ..convert_spec import ConvertSpec, hf_rope_parameters, permute_qk, rope_freqs_tensor
from ..formats.gguf import GGUFFile
from .common import Model, Params, Weights
from .experts import Experts, is_expert_tensor, read_counts, stacked_experts
from .layers import Attention, Block, GatedFFN, Norm, output_head


class Llama(Model):
    rope_neox = False  # GGUF stores LLaMA q/k permuted for adjacent-pair rotation

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=True)
        n_ff = p.int("feed_forward_length")
        rope = self.read_rope(p, neox=self.rope_neox, freq_factors="rope_freqs.weight")
        window = p.int("attention.sliding_window", None, lo=0) or None
        spec = AttentionSpec(scale=1.0 / np.sqrt(self.head_dim), window=window)

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        self.out_norm = Norm.rms_norm(self, w, "output_norm")
        self.output, self.output_b = output_head(self, w)
        self.layers = [Block(
            attn_norm=Norm.rms_norm(self, w, f"blk.{i}.attn_norm"),
            attn=self.attention(w, i, rope, spec),
            ffn_norm=Norm.rms_norm(self, w, f"blk.{i}.ffn_norm"),
            ffn=self.feed_forward(p, w, i, n_ff),
        ) for i in range(self.n_layer)]

    def attention(self, w: Weights, i: int, rope: Rope, spec: AttentionSpec) -> Attention:
        """Layer i's attention (q/k/v biases where the file has them: Qwen2's). Subclasses add norms."""
        return Attention.load(self, w, i, rope, spec)

    def feed_forward(self, p: Params, w: Weights, i: int, n_ff: int) -> GatedFFN | Experts:
        """Layer i's SwiGLU, or its experts where it has a router (Mixtral: each expert n_ff wide)."""
        if f"blk.{i}.ffn_gate_inp.weight" not in self.gguf.tensors:
            return GatedFFN.load(self, w, i, n_ff, "silu")
        n_expert, n_used = read_counts(p)
        return Experts.load(self, w, i, n_expert, n_used, n_ff, normalize=True)

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        x = self.ops.embed(self.tok_embd, ids)
        for L in self.layers:
            x = x + L.attn(L.attn_norm(x), positions, cache)
            x = x + L.ffn(L.ffn_norm(x))
        return self.out_norm(x)


class Qwen2(Llama):
    """Qwen2/2.5: LLaMA with q/k/v biases and NeoX-style rotation (GGUF keeps HF's q/k order)."""

    rope_neox = True


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

TENSORS = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
]
REQUIRED = ["token_embd.weight", "output_norm.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                  "ffn_gate", "ffn_up", "ffn_down")]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = hf_rope_parameters(cfg)
    kv = {
        "context_length": cfg.get("max_position_embeddings", 2048),
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": n_head,
        "attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        "rope.freq_base": float(rope.get("rope_theta", 10000.0)),
        "attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope.dimension_count": head_dim,
    }
    if head_dim != cfg["hidden_size"] // n_head:
        kv["attention.key_length"] = kv["attention.value_length"] = head_dim
    if rope.get("rope_type") == "linear":
        kv["rope.scaling.type"] = "linear"
        kv["rope.scaling.factor"] = float(rope["factor"])
    if cfg.get("num_local_experts"):  # Mixtral
        kv["expert_count"] = cfg["num_local_experts"]
        kv["expert_used_count"] = cfg["num_experts_per_tok"]
    return kv


def llama_transform(name: str, x: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    if name.endswith(("attn_q.weight", "attn_q.bias")):
        return permute_qk(x, cfg["num_attention_heads"])
    if name.endswith(("attn_k.weight", "attn_k.bias")):
        return permute_qk(x, cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    return x


# Mixtral: the router, and the experts stacked into 3-D tensors as llama.cpp's converter writes them
MIXTRAL_TENSORS = [t for t in TENSORS if ".mlp." not in t[0]] + [
    ("model.layers.{i}.block_sparse_moe.gate.weight", "blk.{i}.ffn_gate_inp.weight")]
MIXTRAL_REQUIRED = [n for n in REQUIRED if not n.startswith("blk.0.ffn_") or n == "blk.0.ffn_norm.weight"] + [
    f"blk.0.ffn_{n}.weight" for n in ("gate_inp", "gate_exps", "up_exps", "down_exps")]


def mixtral_experts(ckpt: Any, cfg: dict[str, Any]):
    return stacked_experts(ckpt, cfg, cfg["num_local_experts"], "model.layers.{i}.block_sparse_moe.experts",
                           {"w1": "gate", "w3": "up", "w2": "down"})


ARCHITECTURES = {"llama": Llama, "mistral": Llama, "qwen2": Qwen2}
# llama.cpp converts Mistral checkpoints to the llama architecture (ignoring the sliding window).
CONVERTERS = {
    "LlamaForCausalLM": ConvertSpec("llama", TENSORS, hparams, REQUIRED, llama_transform,
                                    extra_tensors=rope_freqs_tensor),
    "MistralForCausalLM": ConvertSpec("llama", TENSORS, hparams, REQUIRED, llama_transform,
                                      extra_tensors=rope_freqs_tensor),
    "Qwen2ForCausalLM": ConvertSpec("qwen2", TENSORS, hparams, REQUIRED),
    "MixtralForCausalLM": ConvertSpec("llama", MIXTRAL_TENSORS, hparams, MIXTRAL_REQUIRED, llama_transform,
                                      extra_tensors=mixtral_experts,
                                      ignored=is_expert_tensor(".block_sparse_moe.experts.")),
}
