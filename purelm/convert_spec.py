"""What a model file declares for `purelm convert`, and the small helpers its declarations use. A leaf
module: models import it without importing the converter (purelm.convert), which imports the models."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
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
    (gguf_name, shape, loader) for tensors that are not one-to-one (fused or split). `extra_kv(hf_dir,
    cfg)` gives metadata by full key, read from other files of the folder (a pooling mode)."""

    gguf_arch: str
    tensors: list[tuple[str, str]]
    hparams: Callable[[dict[str, Any]], dict[str, Any]]
    required: list[str] = field(default_factory=list)
    transform: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray] | None = None
    extra_tensors: Callable[[Checkpoint, dict[str, Any]], Iterator[tuple[str, tuple[int, ...], Loader]]] | None = None
    extra_kv: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None
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


def llama3_rope_factors(cfg: dict) -> np.ndarray | None:
    """Llama 3.x rope scaling (rope type "llama3") as llama.cpp's converter stores it: the tensor
    rope_freqs, one divisor per rotated pair, computed in float32 as LlamaModel.generate_extra_tensors
    does. Pairs whose wavelength is shorter than original_context / high_freq_factor keep their frequency
    (1), longer than original_context / low_freq_factor are divided by `factor`, and those between blend
    the two. None when the config's rope type is not llama3."""
    from .errors import PurelmError

    rope = hf_rope_parameters(cfg)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    values = {k: rope.get(k, d) for k, d in (("rope_theta", 10000.0), ("factor", 8.0), ("low_freq_factor", 1.0),
                                             ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192))}
    for k, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
            raise PurelmError(f"rope_scaling: llama3 {k} must be a positive number, got {v!r}")
    if values["low_freq_factor"] >= values["high_freq_factor"]:
        raise PurelmError(f"rope_scaling: llama3 low_freq_factor ({values['low_freq_factor']}) must be below "
                          f"high_freq_factor ({values['high_freq_factor']})")
    f32 = np.float32
    factor, low, high, old = (f32(values[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings"))
    freqs = f32(1.0) / f32(values["rope_theta"]) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim))
    wavelen = f32(2 * np.pi) / freqs
    smooth = (old / wavelen - low) / (high - low)
    blended = f32(1.0) / ((f32(1.0) - smooth) / factor + smooth)
    out = np.where(wavelen < old / high, f32(1.0), np.where(wavelen > old / low, factor, blended))
    return out.astype(f32)


def rope_freqs_tensor(ckpt: Any, cfg: dict) -> Iterator[tuple[str, tuple[int, ...], Loader]]:
    """A ConvertSpec.extra_tensors for LLaMA-converted checkpoints: rope_freqs.weight when the config
    asks for llama3 rope scaling (nothing otherwise), as llama.cpp's converter writes it."""
    factors = llama3_rope_factors(cfg)
    if factors is not None:
        yield "rope_freqs.weight", factors.shape, lambda: factors


def text_model_hparams(cfg: dict, arch: str) -> dict:
    """The {arch}.* keys llama.cpp's TextModel.set_gguf_parameters writes for a plain decoder config
    (Qwen3, OLMo 2, SmolLM3): sizes, rope base, RMSNorm epsilon, and key/value lengths whenever the config
    names head_dim. Only unscaled or linearly scaled rope is accepted: the rest would need keys or
    tensors these architectures do not read."""
    from .errors import PurelmError

    rope = hf_rope_parameters(cfg)
    kind = str(rope.get("rope_type", "default")).lower()
    if kind not in ("default", "linear"):
        raise PurelmError(f"{arch}: rope type {kind!r} is not supported (only the default and linear)")
    kv = {"block_count": cfg["num_hidden_layers"], "embedding_length": cfg["hidden_size"],
          "feed_forward_length": cfg["intermediate_size"], "attention.head_count": cfg["num_attention_heads"],
          "attention.head_count_kv": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
          "rope.freq_base": float(rope.get("rope_theta", 10000.0)),
          "attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6))}
    if cfg.get("max_position_embeddings") is not None:
        kv["context_length"] = cfg["max_position_embeddings"]
    if kind == "linear":
        kv["rope.scaling.type"] = "linear"
        kv["rope.scaling.factor"] = float(rope["factor"])
    if cfg.get("head_dim") is not None:
        kv["attention.key_length"] = kv["attention.value_length"] = cfg["head_dim"]
    return kv
