"""OLMoE (allenai/OLMoE-1B-7B): RMS norms of the whole q and k projections (before they split into
heads), NeoX rotation, no biases, and a mixture of experts in every layer whose softmax weights are
used as they are (no renormalization over the picked experts).

    h   = x + Wo · Attention(rope(N_q(Wq·n)), rope(N_k(Wk·n)), Wv·n),   n = RMSNorm(x)
    out = h + MoE(RMSNorm(h))                                             (models/experts.py)
"""
from __future__ import annotations

from typing import Any

from ..backends.base import AttentionSpec, Rope
from ..convert_spec import ConvertSpec
from ..errors import PurelmError
from .common import Params, Weights
from .experts import Experts, is_expert_tensor, read_counts, stacked_experts
from .layers import Attention, ProjectionNorm
from .llama import Llama
from .qwen3moe import EXPERT_MATRICES, EXPERTS, TENSORS, moe_hparams, n_experts


class Olmoe(Llama):
    """LLaMA's layers (models/llama.py) with q/k norms over the whole projections and experts for the
    feed-forward."""

    rope_neox = True

    def attention(self, w: Weights, i: int, rope: Rope, spec: AttentionSpec) -> Attention:
        return Attention.load(self, w, i, rope, spec, bias="none",
                              q_norm=ProjectionNorm.load(self, w, f"blk.{i}.attn_q_norm.weight", self.n_head),
                              k_norm=ProjectionNorm.load(self, w, f"blk.{i}.attn_k_norm.weight", self.n_kv_head))

    def feed_forward(self, p: Params, w: Weights, i: int, n_ff: int) -> Experts:
        n_expert, n_used = read_counts(p)  # n_ff: each expert's width
        return Experts.load(self, w, i, n_expert, n_used, n_ff, normalize=False)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

REQUIRED = ["token_embd.weight", "output_norm.weight", "output.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                                  "attn_k_norm", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                                  "ffn_down_exps")]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("clip_qkv") is not None:
        raise PurelmError("OLMoE with clip_qkv is not supported (llama.cpp's olmoe does not clip)")
    if cfg.get("norm_topk_prob", False):
        raise PurelmError("OLMoE with norm_topk_prob true is not supported (llama.cpp's olmoe never renormalizes)")
    kv = moe_hparams(cfg, None)
    kv["attention.layer_norm_rms_epsilon"] = 1e-5  # llama.cpp's converter writes 1e-5 whatever the config says
    return kv


def extra_tensors(ckpt: Any, cfg: dict[str, Any]):
    return stacked_experts(ckpt, cfg, n_experts(cfg), EXPERTS, EXPERT_MATRICES)


ARCHITECTURES = {"olmoe": Olmoe}
CONVERTERS = {"OlmoeForCausalLM": ConvertSpec("olmoe", TENSORS, hparams, REQUIRED, extra_tensors=extra_tensors,
                                              ignored=is_expert_tensor(".mlp.experts."))}
