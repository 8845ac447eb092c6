"""`purelm convert --lora-base`: a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)
to llama.cpp's GGUF adapter file, as its convert_lora_to_gguf.py writes one, without torch.

Each adapted matrix's A is kept as it is; B's rows go where the base converter puts the matrix's rows
(llama's q/k rope permutation, GPT-NeoX's per-head q|k|v order): the converter's own `transform` is run
on a probe of row numbers, and an architecture whose transform does more than reorder rows is refused.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .convert import BAD_INPUT, _check_output, _read_json, _short, _why, specs
from .errors import FormatError, PurelmError, UsageError
from .formats.gguf import GGUFWriter
from .formats.safetensors import Checkpoint
from .quant import GGMLType, quantize

LORA_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16}
HALF = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")


def convert_lora(adapter_dir: str | os.PathLike, out_path: str | os.PathLike, base_dir: str | os.PathLike,
                 out_type_name: str = "f16") -> Path:
    """Write the GGUF adapter of the PEFT LoRA in `adapter_dir` for the Hugging Face model in `base_dir`
    (its config.json names the architecture and sizes); returns the output path (GGUFWriter writes
    it under a temporary name, renamed once complete)."""
    adapter_dir, out_path, base_dir = Path(adapter_dir), Path(out_path), Path(base_dir)
    if out_type_name not in LORA_TYPES:
        raise UsageError(f"an adapter's type must be one of {', '.join(LORA_TYPES)}, got {out_type_name!r}")
    _check_output(out_path)
    acfg_path, cfg_path = adapter_dir / "adapter_config.json", base_dir / "config.json"
    for p, what in ((acfg_path, "a PEFT adapter directory"), (cfg_path, "a Hugging Face model directory")):
        if not p.is_file():
            raise PurelmError(f"{p.parent} has no {p.name}: not {what}")
    acfg, cfg = _read_json(acfg_path), _read_json(cfg_path, 16 << 20)
    alpha = _alpha(acfg_path, acfg)
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    spec = specs().get(arch) if arch else None
    if spec is None:
        raise PurelmError(f"{cfg_path}: architecture {_short(arch)} is not supported "
                          f"(supported: {', '.join(sorted(specs()))})")
    n_layer = cfg.get(spec.n_layer_key)
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or not 0 < n_layer < 100_000:
        raise FormatError(cfg_path, spec.n_layer_key, f"must be a positive layer count, got {_short(n_layer)}")
    names = {hf.format(i=i): gg.format(i=i) for hf, gg in spec.tensors
             for i in (range(n_layer) if "{i}" in hf else [None])}
    ckpt = Checkpoint(adapter_dir)
    halves: dict[str, dict[str, str]] = {}
    for name in ckpt.names():
        m = HALF.match(name)
        if m is None:
            raise FormatError(adapter_dir, f"tensor {name!r}", "is not a LoRA half (lora_A / lora_B): "
                              "adapters with trained embeddings or norms are not supported")
        halves.setdefault(m[1] + ".weight", {})[m[2]] = name
    if not halves:
        raise FormatError(adapter_dir, "tensors", "none: the adapter changes nothing")
    w = GGUFWriter(out_path)
    for key, value in (("general.type", "adapter"), ("general.architecture", spec.gguf_arch),
                       ("general.name", adapter_dir.name), ("adapter.type", "lora"),
                       ("adapter.lora.alpha", alpha)):
        w.add(key, value)
    qtype = LORA_TYPES[out_type_name]
    for hf_name, ab in sorted(halves.items()):
        gg = names.get(hf_name)
        if gg is None or gg == "token_embd.weight":
            raise FormatError(adapter_dir, f"tensor {hf_name!r}", f"is not a matrix of {arch} that "
                              "llama.cpp's adapters take")
        if len(ab) != 2:
            raise FormatError(adapter_dir, f"tensor {hf_name!r}", "has only one of lora_A and lora_B")
        a_shape, b_shape = ckpt.shape(ab["A"]), ckpt.shape(ab["B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or not a_shape[0]:
            raise FormatError(adapter_dir, f"tensor {hf_name!r}", f"lora_A {a_shape} and lora_B {b_shape} "
                              "are not (rank, in) and (out, rank)")
        order = _row_order(adapter_dir, hf_name, gg, b_shape[0], spec, cfg)

        def a_half(name: str = ab["A"]) -> np.ndarray:
            return quantize(np.asarray(ckpt.get(name), np.float32), qtype)

        def b_half(name: str = ab["B"], order: np.ndarray = order) -> np.ndarray:
            return quantize(np.asarray(ckpt.get(name), np.float32)[order], qtype)

        w.add_tensor(gg + ".lora_a", a_half, qtype, a_shape)
        w.add_tensor(gg + ".lora_b", b_half, qtype, b_shape)
    try:
        w.write()
    except BAD_INPUT as e:
        raise FormatError(adapter_dir, "tensor data", _why(e)) from None
    except OSError as e:
        raise PurelmError(f"{out_path}: cannot be written: {e.strerror or e}") from None
    return out_path


def _alpha(path: Path, acfg: dict[str, Any]) -> float:
    """The alpha to write: llama.cpp scales B·A by alpha / rank, PEFT by alpha / rank, or by alpha /
    sqrt(rank) with use_rslora (then alpha · sqrt(rank) is written). Kinds llama.cpp cannot express are
    refused."""
    kind = acfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise FormatError(path, "peft_type", f"is {_short(kind)}: only LoRA adapters convert")
    for key in ("use_dora", "alpha_pattern"):
        if acfg.get(key):
            raise FormatError(path, key, "is set: llama.cpp's adapters have one alpha and no DoRA magnitudes")
    alpha, rank = acfg.get("lora_alpha"), acfg.get("r")
    for key, v in (("lora_alpha", alpha), ("r", rank)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise FormatError(path, key, f"must be a positive number, got {_short(v)}")
    if acfg.get("use_rslora"):
        if acfg.get("rank_pattern"):
            raise FormatError(path, "rank_pattern", "with use_rslora: ranks that differ need alphas that differ")
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


def _row_order(adapter_dir: Path, hf_name: str, gg: str, n_out: int, spec: Any, cfg: dict) -> np.ndarray:
    """Where the base converter moves each row of `hf_name`: its transform run on the row numbers."""
    probe = np.arange(n_out, dtype=np.float32)[:, None].repeat(2, axis=1)
    try:
        moved = spec.transform(gg, probe, cfg) if spec.transform else probe
        order = np.asarray(moved)
        ok = order.shape == probe.shape and (order[:, 0] == order[:, 1]).all() and \
            np.array_equal(np.sort(order[:, 0]), probe[:, 0])
    except BAD_INPUT:
        ok = False
    if not ok:
        raise PurelmError(f"{adapter_dir}: the {gg} rows of this architecture are not only reordered by its "
                          "converter: use llama.cpp's convert_lora_to_gguf.py for this adapter")
    return order[:, 0].astype(np.int64)
