"""The mixture-of-experts feed-forward (Mixtral, Qwen3-MoE, OLMoE): a router picks k of the E expert
FFNs for each token and mixes their outputs, as llama.cpp's build_moe_ffn does.

    p     = softmax(Wr·x)   (or sigmoid(Wr·x))
    top   = the k experts with the largest p
    w_e   = p_e / Σ_top p    (families that normalize: Mixtral, Qwen3-MoE; OLMoE keeps p_e)
    out   = Σ_{e in top} w_e · Wdown_e · (silu(Wgate_e·x) * Wup_e·x)

The expert tensors stay as the file packs them, (E, rows, cols): each expert is a view of its own rows,
which the backend prepares on its first use (`Backend.experts`), so the experts no token picks are never
read. A pass of many tokens groups them by expert: each picked expert's weights are read once, for all
the tokens that picked it, each token's run kept as it would be alone (`Backend.gathered`). One token
(decode) goes to `Backend.expert_ffn`, which a backend may do in one call for all its experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import GATING, Backend
from .common import Model, Params, Weights


def read_counts(p: Params) -> tuple[int, int]:
    """expert_count and expert_used_count (1 <= used <= count)."""
    n_expert = p.int("expert_count", hi=1 << 16)
    return n_expert, p.int("expert_used_count", hi=n_expert)


@dataclass
class Experts:
    """One layer's router and experts. `gate_up[e]`, `down[e]`: expert e's matrices as the backend
    keeps them."""

    ops: Backend
    router: Any  # (n_expert, dim)
    gate_up: list[Any]
    down: list[Any]
    n_used: int
    gating: str = "softmax"
    normalize: bool = True
    act: str = "silu"

    def route(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each token's picked experts (tokens, k), best first, and their weights (float32)."""
        return self.ops.route(logits, self.n_used, self.gating, self.normalize)

    def __call__(self, x: Any) -> Any:
        ops = self.ops
        top, w = self.route(ops.to_numpy(ops.linear(x, self.router)))
        if len(top) == 1:  # one token (decode): its k experts, in expert order as mix_rows adds them
            order = np.argsort(top[0])
            return ops.expert_ffn(x, self.gate_up, self.down, top[0, order], w[0, order], self.act)
        parts = []
        for e in np.unique(top):  # in expert order: each token's sum in the same order, alone or batched
            rows, slot = np.nonzero(top == e)
            with ops.gathered(len(top), rows):
                xe = x if len(rows) == len(top) else x[rows]
                y = ops.linear(ops.glu(xe, self.gate_up[e], self.act), self.down[e])
            parts.append((rows, y, w[rows, slot]))
        return ops.mix_rows(len(top), parts)

    @classmethod
    def load(cls, m: Model, w: Weights, i: int, n_expert: int, n_used: int, n_ff: int, **options: Any) -> Experts:
        """Layer i's ffn_gate_inp (n_expert, dim) and ffn_{gate,up,down}_exps, (n_expert, n_ff, dim) and
        (n_expert, dim, n_ff). `options`: gating, normalize, act."""
        b, dim, backend = f"blk.{i}.", m.dim, w.backend
        router = w.matrix(b + "ffn_gate_inp.weight", (n_expert, dim))
        gate = w.tensor(b + "ffn_gate_exps.weight", (n_expert, n_ff, dim))
        up = w.tensor(b + "ffn_up_exps.weight", (n_expert, n_ff, dim))
        down = w.tensor(b + "ffn_down_exps.weight", (n_expert, dim, n_ff))
        if options.get("gating", "softmax") not in GATING:
            raise ValueError(f"gating: {options['gating']!r}")
        return cls(m.ops, router, *backend.experts(gate, up, down), n_used, **options)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

def stacked_experts(ckpt: Any, cfg: dict[str, Any], n_expert: int, layer: str, names: dict[str, str]):
    """The extra_tensors of an MoE converter: per layer, the experts' matrices stacked into llama.cpp's
    3-D ffn_{gate,up,down}_exps (n_expert, rows, cols), as its converter does. `layer`: the HF prefix of
    a layer's experts ("model.layers.{i}.mlp.experts"); `names`: HF matrix name -> gate/up/down. Also
    reads transformers' fused form (`gate_up_proj` (E, 2·n_ff, dim) and `down_proj` (E, dim, n_ff)),
    split as llama.cpp splits it."""
    for i in range(cfg["num_hidden_layers"]):
        prefix = layer.format(i=i)
        if f"{prefix}.gate_up_proj" in ckpt and f"{prefix}.down_proj" in ckpt:
            yield from _fused_experts(ckpt, prefix, i, n_expert)
            continue
        for hf, part in names.items():
            first = f"{prefix}.0.{hf}.weight"
            if first not in ckpt:
                raise ValueError(f"{first} is missing")
            rows, cols = ckpt.shape(first)

            def load(hf: str = hf, prefix: str = prefix, shape: tuple[int, int] = (rows, cols)) -> np.ndarray:
                out = np.empty((n_expert, *shape), np.float32)
                for e in range(n_expert):
                    x = ckpt.get(f"{prefix}.{e}.{hf}.weight")
                    if x.shape != shape:
                        raise ValueError(f"{prefix}.{e}.{hf}.weight has shape {x.shape}, expected {shape}")
                    out[e] = x
                return out
            yield f"blk.{i}.ffn_{part}_exps.weight", (n_expert, rows, cols), load


def _fused_experts(ckpt: Any, prefix: str, i: int, n_expert: int):
    gate_up, down = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
    e, rows2, cols = ckpt.shape(gate_up)
    if e != n_expert or rows2 % 2 or len(ckpt.shape(down)) != 3 or ckpt.shape(down)[0] != n_expert:
        raise ValueError(f"{gate_up} {ckpt.shape(gate_up)} / {down} {ckpt.shape(down)} for {n_expert} experts")
    n_ff = rows2 // 2
    yield f"blk.{i}.ffn_gate_exps.weight", (n_expert, n_ff, cols), lambda: ckpt.get(gate_up)[:, :n_ff]
    yield f"blk.{i}.ffn_up_exps.weight", (n_expert, n_ff, cols), lambda: ckpt.get(gate_up)[:, n_ff:]
    yield f"blk.{i}.ffn_down_exps.weight", tuple(ckpt.shape(down)), lambda: ckpt.get(down)


def is_expert_tensor(layer_marker: str):
    """`ignored` for a ConvertSpec: the HF names stacked_experts consumes."""
    return lambda name: layer_marker in name
