"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (RMS norms of each q and k head, no
biases, NeoX rotation) and a mixture of experts in every layer (softmax router, top-k, the picked
weights renormalized to sum to one, as llama.cpp computes it).

    h   = x + Wo · Attention(rope(N_q(Wq·n)), rope(N_k(Wk·n)), Wv·n),   n = RMSNorm(x)
    out = h + MoE(RMSNorm(h))                                             (models/experts.py)
"""
from __future__ import annotations

from typing import Any

from ..convert_spec import ConvertSpec, hf_rope_parameters
from ..errors import PurelmError
from .common import Params, Weights
from .experts import Experts, is_expert_tensor, read_counts, stacked_experts
from .qwen3 import QK_NORMS, Qwen3
from .qwen3 import TENSORS as QWEN3_TENSORS


class Qwen3Moe(Qwen3):
    """Qwen3's layers (models/qwen3.py) with experts for the feed-forward."""

    def feed_forward(self, p: Params, w: Weights, i: int, n_ff: int) -> Experts:
        n_expert, n_used = read_counts(p)
        # llama.cpp: expert_feed_forward_length, else feed_forward_length shared among the used experts
        n_ff = p.int("expert_feed_forward_length", None) or n_ff // n_used
        return Experts.load(self, w, i, n_expert, n_used, n_ff, normalize=True)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

# Qwen3's attention tensors and norms (models/qwen3.py), then the router (the experts: extra_tensors)
TENSORS = QWEN3_TENSORS[:8] + QK_NORMS + [QWEN3_TENSORS[8],
                                         ("model.layers.{i}.mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight")]
REQUIRED = ["token_embd.weight", "output_norm.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                                  "attn_k_norm", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                                  "ffn_down_exps")]
EXPERTS = "model.layers.{i}.mlp.experts"
EXPERT_MATRICES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def n_experts(cfg: dict[str, Any]) -> int:
    """transformers >= 5 names it num_local_experts; the released configs, num_experts."""
    return cfg.get("num_experts") or cfg["num_local_experts"]


def moe_hparams(cfg: dict[str, Any], n_ff_expert_key: str | None) -> dict[str, Any]:
    """The keys llama.cpp's converter writes for a Qwen2-MoE-style model (also OLMoE): the base ones,
    the expert counts, and the experts' width where the config has it."""
    n_head = cfg["num_attention_heads"]
    rope = hf_rope_parameters(cfg)
    if rope.get("rope_type", "default") != "default":
        raise PurelmError(f"rope_type {rope['rope_type']!r} is not supported for this architecture")
    kv = {
        "context_length": cfg.get("max_position_embeddings", 2048),
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": n_head,
        "attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        "rope.freq_base": float(rope.get("rope_theta", 10000.0)),
        "attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "expert_count": n_experts(cfg),
        "expert_used_count": cfg["num_experts_per_tok"],
    }
    if cfg.get("head_dim") is not None:
        kv["attention.key_length"] = kv["attention.value_length"] = cfg["head_dim"]
    if n_ff_expert_key and cfg.get(n_ff_expert_key) is not None:
        kv["expert_feed_forward_length"] = cfg[n_ff_expert_key]
    return kv


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp runs every layer as MoE and always renormalizes the picked weights
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise PurelmError("Qwen3-MoE with dense layers (mlp_only_layers, decoder_sparse_step) is not supported "
                          "(llama.cpp runs every layer as MoE)")
    if not cfg.get("norm_topk_prob", False):
        raise PurelmError("Qwen3-MoE with norm_topk_prob false is not supported (llama.cpp always renormalizes)")
    return moe_hparams(cfg, "moe_intermediate_size")


def extra_tensors(ckpt: Any, cfg: dict[str, Any]):
    return stacked_experts(ckpt, cfg, n_experts(cfg), EXPERTS, EXPERT_MATRICES)


ARCHITECTURES = {"qwen3moe": Qwen3Moe}
CONVERTERS = {"Qwen3MoeForCausalLM": ConvertSpec("qwen3moe", TENSORS, hparams, REQUIRED,
                                                 extra_tensors=extra_tensors, ignored=is_expert_tensor(".mlp.experts."))}
