"""Hugging Face checkpoint (config.json + *.safetensors + tokenizer.json) to GGUF.

Tensor names, the q/k permutation and the metadata keys follow llama.cpp's convert_hf_to_gguf.py, so the
files it writes run in llama.cpp and llama.cpp's files run here. Tensors are read lazily from the
memory-mapped checkpoint and quantized one at a time while writing, so memory stays near one tensor.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, PurelmError
from .formats.gguf import GGUFWriter, ValueType
from .formats.safetensors import Checkpoint
from .quant import quantize
from .quant.types import BLOCK_INFO, GGMLType

OUT_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0,
             "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1, "q5_0": GGMLType.Q5_0, "q5_1": GGMLType.Q5_1}
# general.file_type (llama_ftype) of each output type
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}

# token types as llama.cpp stores them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows to GGUF's adjacent-pair layout (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class ArchSpec:
    gguf_arch: str
    # (HF name pattern, GGUF name); {i} is the layer number
    tensors: list[tuple[str, str]]
    permute_qk: bool = False


_LLAMA_TENSORS = [
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

ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", _LLAMA_TENSORS, permute_qk=True),
    "MistralForCausalLM": ArchSpec("llama", _LLAMA_TENSORS, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec("qwen2", _LLAMA_TENSORS),
}


def _hparams(cfg: dict[str, Any], arch: str, spec: ArchSpec) -> dict[str, Any]:
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    a = spec.gguf_arch
    kv = {
        f"{a}.context_length": cfg.get("max_position_embeddings", 2048),
        f"{a}.embedding_length": cfg["hidden_size"],
        f"{a}.block_count": cfg["num_hidden_layers"],
        f"{a}.feed_forward_length": cfg["intermediate_size"],
        f"{a}.attention.head_count": n_head,
        f"{a}.attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        f"{a}.rope.freq_base": float(cfg.get("rope_theta", 10000.0)),
        f"{a}.attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        f"{a}.rope.dimension_count": head_dim,
    }
    if head_dim != cfg["hidden_size"] // n_head:
        kv[f"{a}.attention.key_length"] = kv[f"{a}.attention.value_length"] = head_dim
    if arch == "MistralForCausalLM" and cfg.get("sliding_window"):
        pass  # llama.cpp ignores Mistral's sliding window; so do we, to compute the same thing
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) == "linear":
        kv[f"{a}.rope.scaling.type"] = "linear"
        kv[f"{a}.rope.scaling.factor"] = float(scaling["factor"])
    return kv


def _tokenizer_kv(directory: Path, cfg: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    path = directory / "tokenizer.json"
    if not path.exists():
        return {}
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise PurelmError(f"{path}: only byte-level BPE tokenizer.json files are converted so far")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for text, t in added.items():
        vocab[text] = t["id"]
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL
    for text, t in added.items():
        types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kv: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    tcfg_path = directory / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.exists() else {}

    def token_id(key: str) -> int | None:
        tok = tcfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str) and tok in vocab:
            return vocab[tok]
        cid = cfg.get(f"{key}_id")
        return cid if isinstance(cid, int) else None

    for key, gkey in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        tid = token_id(key)
        if tid is not None:
            kv[f"tokenizer.ggml.{gkey}"] = tid
    if "add_bos_token" in tcfg:
        kv["tokenizer.ggml.add_bos_token"] = bool(tcfg["add_bos_token"])
    if isinstance(tcfg.get("chat_template"), str):
        kv["tokenizer.chat_template"] = tcfg["chat_template"]
    return kv


def _out_type(name: str, shape: tuple[int, ...], target: GGMLType) -> GGMLType:
    """llama.cpp's choice: 1-D tensors (norms, biases) stay F32; a row that does not split into the
    target's blocks falls back to F16."""
    if len(shape) < 2 or target == GGMLType.F32:
        return GGMLType.F32
    if shape[-1] % BLOCK_INFO[target][0]:
        return GGMLType.F16
    return target


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, out_type: str = "f16",
            progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert a Hugging Face model directory to GGUF; returns the output path."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        raise PurelmError(f"unknown output type {out_type!r} (choose from {', '.join(OUT_TYPES)})")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise PurelmError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    arch = (cfg.get("architectures") or ["?"])[0]
    spec = ARCHS.get(arch)
    if spec is None:
        raise PurelmError(f"{cfg_path}: architecture {arch!r} is not supported "
                          f"(supported: {', '.join(sorted(ARCHS))})")
    ckpt = Checkpoint(hf_dir)
    n_layer = cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    target = OUT_TYPES[out_type]

    w = GGUFWriter(out_path)
    w.add("general.architecture", spec.gguf_arch)
    w.add("general.name", cfg.get("_name_or_path") or hf_dir.name)
    for key, value in _hparams(cfg, arch, spec).items():
        w.add(key, value)
    w.add("general.file_type", FILE_TYPES[out_type])
    w.add("general.quantization_version", 2)
    vocab_size = cfg.get("vocab_size") or ckpt.shape("model.embed_tokens.weight")[0]
    for key, value in _tokenizer_kv(hf_dir, cfg, vocab_size).items():
        w.add(key, value, elem=ValueType.INT32 if key == "tokenizer.ggml.token_type" else None)

    seen = set()
    for hf_pat, gguf_pat in spec.tensors:
        for i in range(n_layer) if "{i}" in hf_pat else [None]:
            hf_name, name = hf_pat.format(i=i), gguf_pat.format(i=i)
            if hf_name not in ckpt:
                continue
            seen.add(hf_name)
            if name == "output.weight" and cfg.get("tie_word_embeddings", False):
                continue
            shape = ckpt.shape(hf_name)
            qtype = _out_type(name, shape, target)

            def load(hf_name: str = hf_name, name: str = name, qtype: GGMLType = qtype) -> np.ndarray:
                x = ckpt.get(hf_name)
                if spec.permute_qk and re.search(r"attn_q\.(weight|bias)$", name):
                    x = permute_qk(x, n_head)
                elif spec.permute_qk and re.search(r"attn_k\.(weight|bias)$", name):
                    x = permute_qk(x, n_kv)
                return quantize(x, qtype)

            w.add_tensor(name, load, qtype, shape)
    required = [p.format(i=0) for p, _ in spec.tensors if "proj.weight" in p or "layernorm" in p]
    missing = [n for n in required if n not in ckpt]
    if missing or "model.embed_tokens.weight" not in ckpt:
        raise FormatError(hf_dir, f"tensor {(missing or ['model.embed_tokens.weight'])[0]!r}",
                          "is missing from the checkpoint")
    unused = [n for n in ckpt.names() if n not in seen and not n.endswith("rotary_emb.inv_freq")]
    if unused:
        raise PurelmError(f"{hf_dir}: tensors with no GGUF name for {arch}: {', '.join(unused[:5])}")
    w.write(progress)
    return out_path
