"""What a model file declares for `purelm convert`, and the small helpers its declarations use. A leaf
module: models import it without importing the converter (purelm.convert), which imports the models."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .formats.safetensors import Checkpoint

Loader = Callable[[], np.ndarray]


@dataclass
class ConvertSpec:
    """How one Hugging Face architecture becomes GGUF.

    `tensors`: (HF name pattern, GGUF name pattern) pairs; `{i}` is the layer number. Patterns absent
    from the checkpoint are skipped (optional biases); `required` lists the GGUF names (for layer 0)
    that must be present. `hparams(cfg)` gives the `{arch}.`-relative metadata. `transform(gguf_name,
    array, cfg)` edits a tensor (permutations, norm offsets). `extra_tensors(ckpt, cfg)` yields
    (gguf_name, shape, loader) for tensors that are not one-to-one (fused or split)."""

    gguf_arch: str
    tensors: list[tuple[str, str]]
    hparams: Callable[[dict[str, Any]], dict[str, Any]]
    required: list[str] = field(default_factory=list)
    transform: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray] | None = None
    extra_tensors: Callable[[Checkpoint, dict[str, Any]], Iterator[tuple[str, tuple[int, ...], Loader]]] | None = None
    n_layer_key: str = "num_hidden_layers"
    # HF names that are consumed by extra_tensors or deliberately dropped
    ignored: Callable[[str], bool] = lambda name: False


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows to GGUF's adjacent-pair layout (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qkv_blocks(x: np.ndarray, n_head: int) -> np.ndarray:
    """A fused q|k|v weight (or bias) stored per head, rows [head][q,k,v][head_dim] (BLOOM, GPT-NeoX in
    Hugging Face), reordered to [q,k,v][head][head_dim] as llama.cpp's converter writes attn_qkv."""
    return x.reshape(n_head, 3, -1, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def hf_rope_parameters(cfg: dict) -> dict:
    """A Hugging Face config's rotary settings as one dict, however the config spells them: older
    configs put `rope_theta`, `rope_scaling` (with `type`), `partial_rotary_factor` / `rope_pct` and
    `original_max_position_embeddings` at the top level; transformers >= 5 nests them in
    `rope_parameters` (with `rope_type`). Keys: rope_theta, rope_type, partial_rotary_factor, ..."""
    out = {k: cfg[k] for k in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings")
           if cfg.get(k) is not None}
    if cfg.get("rope_pct") is not None:
        out.setdefault("partial_rotary_factor", cfg["rope_pct"])
    out.update(cfg.get("rope_scaling") or {})
    out.update(cfg.get("rope_parameters") or {})
    if "type" in out:
        out.setdefault("rope_type", out["type"])
    return out
