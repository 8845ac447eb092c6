"""SmolLM3: LLaMA's pre-norm decoder (grouped-query attention, SwiGLU, tied embeddings) in which every
fourth layer has no rotary embedding (NoPE): layer i rotates q and k unless (i + 1) % 4 == 0.

    h   = x + Wo · Attention(r_i(Wq·n), r_i(Wk·n), Wv·n),   n = RMSNorm(x),  r_i = rope, or nothing (NoPE)
    out = h + Wdown · (silu(Wgate·m) * Wup·m),              m = RMSNorm(h)

The GGUF file has no key for the pattern: llama.cpp fixes the step at 4 (n_no_rope_layer_step), so the
converter refuses a checkpoint whose `no_rope_layers` say otherwise. q and k are stored permuted for
adjacent-pair rotation, as for LLaMA.
"""
from __future__ import annotations

from typing import Any

from ..backends.base import AttentionSpec, Rope
from ..convert_spec import ConvertSpec, text_model_hparams
from ..errors import PurelmError
from .common import Weights
from .layers import Attention
from .llama import llama_transform
from .qwen3 import REQUIRED, TENSORS, Qwen3

NO_ROPE_STEP = 4  # llama.cpp's n_no_rope_layer_step for smollm3


def uses_rope(i: int) -> bool:
    return (i + 1) % NO_ROPE_STEP != 0


class SmolLM3(Qwen3):
    rope_neox = False

    def attention(self, w: Weights, i: int, rope: Rope, spec: AttentionSpec) -> Attention:
        return Attention.load(self, w, i, rope if uses_rope(i) else None, spec, bias="none")


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    n = cfg["num_hidden_layers"]
    layers = cfg.get("no_rope_layers")
    if layers is not None and [bool(x) for x in layers] != [uses_rope(i) for i in range(n)]:
        raise PurelmError(f"SmolLM3: no_rope_layers {str(layers)[:60]} is not supported: llama.cpp's smollm3 "
                          f"(and so its GGUF files) skips the rope in every {NO_ROPE_STEP}th layer exactly")
    if cfg.get("use_sliding_window"):
        raise PurelmError("SmolLM3 with use_sliding_window is not supported (llama.cpp's smollm3 has no window)")
    kv = text_model_hparams(cfg, "SmolLM3")
    # what llama.cpp's LlamaModel adds
    kv["vocab_size"] = cfg["vocab_size"]
    kv["rope.dimension_count"] = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return kv


ARCHITECTURES = {"smollm3": SmolLM3}
CONVERTERS = {"SmolLM3ForCausalLM": ConvertSpec("smollm3", TENSORS, hparams, REQUIRED, llama_transform)}
