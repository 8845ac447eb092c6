"""Qwen3 (dense): LLaMA's pre-norm decoder with an RMSNorm of each query and key head before the rotary
embedding, NeoX-style rotation, no biases, and a head size that need not be width / heads.

    n   = RMSNorm(x)
    h   = x + Wo · Attention(rope(N_q(Wq·n)), rope(N_k(Wk·n)), Wv·n)   N_q, N_k: RMSNorm over each head
    out = h + Wdown · (silu(Wgate·m) * Wup·m),                         m = RMSNorm(h)
"""
from __future__ import annotations

from typing import Any

from ..backends.base import AttentionSpec, Rope
from ..convert_spec import ConvertSpec, text_model_hparams
from ..errors import PurelmError
from .common import Weights
from .layers import Attention, HeadNorm
from .llama import REQUIRED, Llama
from .llama import TENSORS as LLAMA_TENSORS


class Qwen3(Llama):
    """LLaMA's layers (models/llama.py) with the per-head q/k norms and without biases."""

    rope_neox = True  # GGUF keeps HF's rotate-half q/k order

    def attention(self, w: Weights, i: int, rope: Rope, spec: AttentionSpec) -> Attention:
        return Attention.load(self, w, i, rope, spec, bias="none",
                              q_norm=HeadNorm.rms_norm(self, w, f"blk.{i}.attn_q_norm.weight", optional=False),
                              k_norm=HeadNorm.rms_norm(self, w, f"blk.{i}.attn_k_norm.weight", optional=False))


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

# LLaMA's tensors without the biases: Qwen3's and SmolLM3's
TENSORS = [t for t in LLAMA_TENSORS if not t[0].endswith(".bias")]
QK_NORMS = [("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
            ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight")]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp's Qwen3 ignores a sliding window (Qwen3's configs ship it switched off)
    if cfg.get("use_sliding_window"):
        raise PurelmError("Qwen3 with use_sliding_window is not supported (llama.cpp's qwen3 has no window)")
    return text_model_hparams(cfg, "Qwen3")


ARCHITECTURES = {"qwen3": Qwen3}
CONVERTERS = {"Qwen3ForCausalLM": ConvertSpec("qwen3", TENSORS + QK_NORMS, hparams,
                                              REQUIRED + ["blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"])}
