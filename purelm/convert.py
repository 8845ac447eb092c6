"""Hugging Face checkpoint (config.json + *.safetensors + tokenizer.json) to GGUF.

Tensor names, tensor transforms (the LLaMA q/k permutation, ...) and metadata keys follow llama.cpp's
convert_hf_to_gguf.py, so the files it writes run in llama.cpp and llama.cpp's files run here. Each
architecture's model file declares its `ConvertSpec`; this module is the engine. Tensors are read
lazily from the memory-mapped checkpoint and quantized one at a time while writing, so memory stays
near one tensor.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


def specs() -> dict[str, ConvertSpec]:
    from .models import CONVERTERS

    return CONVERTERS


def _sentencepiece_kv(path: Path, vocab_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    """A SentencePiece tokenizer.model as llama.cpp's converter writes it (tokenizer.ggml.model "llama")."""
    from .formats.spm_model import read_sentencepiece

    sp = read_sentencepiece(path)
    tokens, scores, types = list(sp.pieces), list(sp.scores), list(sp.types)
    for i in range(len(tokens), vocab_size):  # the model's embedding may have more rows than pieces
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": sp.add_dummy_prefix}
    return kv, {t: i for i, t in enumerate(tokens)}


def _tokenizer_kv(directory: Path, cfg: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    path = directory / "tokenizer.json"
    spm_path = directory / "tokenizer.model"
    tj = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    model = tj.get("model", {})
    byte_level = model.get("type") == "BPE" and isinstance(model.get("vocab"), dict) and not model.get("byte_fallback")
    if spm_path.exists() and not byte_level:
        kv, vocab = _sentencepiece_kv(spm_path, vocab_size)
    elif path.exists():
        if not byte_level:
            raise PurelmError(f"{path}: only byte-level BPE tokenizer.json files (or a SentencePiece "
                              "tokenizer.model) are converted so far")
        kv, vocab = _byte_level_kv(tj, vocab_size)
    else:
        return {}
    return {**kv, **_special_tokens_kv(directory, cfg, vocab)}


def _byte_level_kv(tj: dict[str, Any], vocab_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    model = tj["model"]
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
    return kv, vocab


def _special_tokens_kv(directory: Path, cfg: dict[str, Any], vocab: dict[str, int]) -> dict[str, Any]:
    kv: dict[str, Any] = {}
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


def out_type(name: str, shape: tuple[int, ...], target: GGMLType) -> GGMLType:
    """llama.cpp's choice: 1-D tensors (biases) and norm weights (even 2-D per-head ones) stay F32; a row
    that does not split into the target's blocks falls back to F16."""
    if len(shape) < 2 or name.endswith("_norm.weight") or target == GGMLType.F32:
        return GGMLType.F32
    if shape[-1] % BLOCK_INFO[target][0]:
        return GGMLType.F16
    return target


def _progress_bar(total_desc: str) -> Callable[[int, int], None] | None:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=total_desc,
                       file=sys.stderr, disable=None)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, out_type_name: str = "f16",
            progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert a Hugging Face model directory to GGUF; returns the output path."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_type_name not in OUT_TYPES:
        raise PurelmError(f"unknown output type {out_type_name!r} (choose from {', '.join(OUT_TYPES)})")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise PurelmError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    arch = (cfg.get("architectures") or ["?"])[0]
    spec = specs().get(arch)
    if spec is None:
        raise PurelmError(f"{cfg_path}: architecture {arch!r} is not supported "
                          f"(supported: {', '.join(sorted(specs()))})")
    ckpt = Checkpoint(hf_dir)
    n_layer = cfg[spec.n_layer_key]
    target = OUT_TYPES[out_type_name]

    w = GGUFWriter(out_path)
    w.add("general.architecture", spec.gguf_arch)
    w.add("general.name", cfg.get("_name_or_path") or hf_dir.name)
    for key, value in spec.hparams(cfg).items():
        w.add(f"{spec.gguf_arch}.{key}", value)
    w.add("general.file_type", FILE_TYPES[out_type_name])
    w.add("general.quantization_version", 2)
    vocab_size = cfg.get("vocab_size") or 0
    for key, value in _tokenizer_kv(hf_dir, cfg, vocab_size).items():
        elem = {"tokenizer.ggml.token_type": ValueType.INT32, "tokenizer.ggml.scores": ValueType.FLOAT32}.get(key)
        w.add(key, value, elem=elem)

    seen: set[str] = set()
    written: dict[str, str] = {}  # GGUF name -> HF name (for error messages)

    def add(name: str, shape: tuple[int, ...], load: Loader, source: str) -> None:
        qtype = out_type(name, shape, target)
        w.add_tensor(name, lambda: quantize(load(), qtype), qtype, shape)
        written[name] = source

    for hf_pat, gguf_pat in spec.tensors:
        for i in range(n_layer) if "{i}" in hf_pat else [None]:
            hf_name, name = hf_pat.format(i=i), gguf_pat.format(i=i)
            if hf_name not in ckpt:
                continue
            seen.add(hf_name)
            if name == "output.weight" and cfg.get("tie_word_embeddings", False):
                continue

            def load(hf_name: str = hf_name, name: str = name) -> np.ndarray:
                x = ckpt.get(hf_name)
                try:
                    return spec.transform(name, x, cfg) if spec.transform else x
                except ValueError as e:  # a reshape that the config's sizes do not allow
                    raise FormatError(hf_dir, f"tensor {hf_name!r}", f"shape {x.shape} does not fit the "
                                      f"config ({e})") from None

            add(name, ckpt.shape(hf_name), load, hf_name)
    if spec.extra_tensors:
        for name, shape, load in spec.extra_tensors(ckpt, cfg):
            add(name, shape, load, name)

    for name in spec.required:
        if name not in written:
            raise FormatError(hf_dir, f"tensor for {name!r}", "is missing from the checkpoint")
    unused = [n for n in ckpt.names() if n not in seen and not spec.ignored(n)
              and not n.endswith("rotary_emb.inv_freq")]
    if unused:
        raise PurelmError(f"{hf_dir}: tensors with no GGUF name for {arch}: {', '.join(unused[:5])}")
    w.write(progress if progress is not None else _progress_bar(f"writing {out_path.name}"))
    _check_model(hf_dir, out_path, written)
    return out_path


def _check_model(hf_dir: Path, out_path: Path, written: dict[str, str]) -> None:
    """Open the written file as a model: the model checks every tensor's presence and shape. On failure
    the output is removed and the error names the checkpoint's tensor."""
    from .backends.numpy_backend import NumpyBackend
    from .formats.gguf import GGUFFile
    from .models import build_model

    try:
        build_model(GGUFFile(out_path), NumpyBackend())
    except FormatError as e:
        out_path.unlink(missing_ok=True)
        name = e.field.removeprefix("tensor ").strip("'")
        source = written.get(name)
        where = f" (from {source!r})" if source and source != name else ""
        raise FormatError(hf_dir, f"tensor {name!r}{where}", e.problem) from None
