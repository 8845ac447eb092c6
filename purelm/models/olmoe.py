"""OLMoE (allenai/OLMoE-1B-7B): RMS norms of the whole q and k projections (before they split into
heads), NeoX rotation, no biases, and a mixture of experts in every layer whose softmax weights are
used as they are (no renormalization over the picked experts).

    h   = x + Wo · Attention(rope(N_q(Wq·n)), rope(N_k(Wk·n)), Wv·n),   n = RMSNorm(x)
    out = h + MoE(RMSNorm(h))                                             (models/experts.py)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache
from ..convert_spec import ConvertSpec
from ..errors import PurelmError
from ..formats.gguf import GGUFFile
from .common import Model, Params, Weights
from .experts import Experts, is_expert_tensor, read_counts, stacked_experts
from .layers import Attention, Block, Norm, output_head
from .qwen3moe import EXPERT_MATRICES, EXPERTS, TENSORS, moe_hparams, n_experts


@dataclass
class ProjectionNorm:
    """RMSNorm over all heads of q or k at once (tokens, heads, head_dim): OLMo's q/k norm, applied to
    the whole projection before it splits into heads."""

    norm: Norm

    def __call__(self, x: Any) -> Any:
        T, H, D = x.shape
        return self.norm(x.reshape(T, H * D)).reshape(T, H, D)

    @classmethod
    def load(cls, m: Model, w: Weights, name: str, n: int) -> ProjectionNorm:
        return cls(Norm(m.ops, True, m.eps, w.vector(name, n)))


class Olmoe(Model):
    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=True)
        n_expert, n_used = read_counts(p)
        n_ff = p.int("feed_forward_length")  # each expert's width
        rope = self.read_rope(p, neox=True)
        spec = AttentionSpec(scale=1.0 / np.sqrt(self.head_dim))
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        self.out_norm = Norm.rms_norm(self, w, "output_norm")
        self.output, self.output_b = output_head(self, w)
        self.layers = [Block(
            attn_norm=Norm.rms_norm(self, w, f"blk.{i}.attn_norm"),
            attn=Attention.load(self, w, i, rope, spec, bias="none",
                                q_norm=ProjectionNorm.load(self, w, f"blk.{i}.attn_q_norm.weight", q_dim),
                                k_norm=ProjectionNorm.load(self, w, f"blk.{i}.attn_k_norm.weight", kv_dim)),
            ffn_norm=Norm.rms_norm(self, w, f"blk.{i}.ffn_norm"),
            ffn=Experts.load(self, w, i, n_expert, n_used, n_ff, normalize=False),
        ) for i in range(self.n_layer)]

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        x = self.ops.embed(self.tok_embd, ids)
        for L in self.layers:
            x = x + L.attn(L.attn_norm(x), positions, cache)
            x = x + L.ffn(L.ffn_norm(x))
        return self.out_norm(x)


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
