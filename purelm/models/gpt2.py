"""GPT-2 and the decoder block it gave BLOOM, GPT-NeoX and MPT: pre-norm layers with LayerNorm, a fused
q|k|v projection, biases and a GELU feed-forward. GPT-2 adds learned position embeddings:

    x   = E[ids] + P[positions]
    h   = x + Wo · Attention(q, k, v) + bo,   q|k|v = Wqkv · LN₁(x) + bqkv
    out = h + Wdown · gelu(Wup · LN₂(h) + bup) + bdown

The subclasses change only what the GGUF file says they change: a LayerNorm on the embeddings
(`token_embd_norm`, BLOOM), ALiBi instead of position embeddings (BLOOM, MPT), rotary q/k (GPT-NeoX),
q|k|v clamped to ±clamp_kqv (MPT), missing biases (MPT), and the parallel residual of GPT-NeoX and GPT-J:

    out = x + Attention(LN₁(x)) + FFN(LN₂(x))

GELU is the tanh approximation (GPT-2's `gelu_new`, BLOOM's and GPT-J's too); GPT-NeoX and MPT use the
exact (erf) form their checkpoints were trained with.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache, Rope
from ..convert_spec import ConvertSpec
from ..errors import FormatError
from ..formats.gguf import GGUFFile
from .common import Model, Params, Weights
from .layers import Attention, Block, MLP, Norm, alibi_slopes, output_head


class GPT2(Model):
    parallel_residual = False  # GPT-NeoX (when the file says so) and GPT-J
    act = "gelu"  # the MLP's activation: tanh GELU (GPT-2's gelu_new)

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=False)
        self.n_ff = p.int("feed_forward_length")
        for name in gguf.tensors:  # variants llama.cpp runs and purelm does not (yet)
            if name.startswith("blk.0.") and name.endswith(("attn_q_norm.weight", ".scales")):
                raise FormatError(gguf.path, f"tensor {name!r}", "(q/k LayerNorm or MPT activation scales) "
                                  "is not supported")
        max_bias = self.alibi_max_bias(p)
        slopes = alibi_slopes(self.n_head, max_bias) if max_bias else None
        spec = AttentionSpec(scale=1.0 / np.sqrt(self.head_dim), alibi_slopes=slopes)
        rope, clamp = self.rope_spec(p), self.clamp(p)

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        pos = gguf.tensors.get("position_embd.weight")
        self.n_pos = self.max_positions = pos.shape[0] if pos is not None else None
        self.pos_embd = w.matrix("position_embd.weight", (self.n_pos, self.dim)) if pos is not None else None
        self.embd_norm = Norm.layer_norm(self, w, "token_embd_norm", bias="optional", optional=True)
        self.out_norm = Norm.layer_norm(self, w, "output_norm", bias="optional")
        self.output, self.output_b = output_head(self, w, bias="optional")
        self.layers = [self.layer(w, i, spec, rope, clamp) for i in range(self.n_layer)]

    # -- what the subclasses vary
    def rope_spec(self, p: Params) -> Rope | None:
        return None

    def alibi_max_bias(self, p: Params) -> float:
        return 0.0

    def clamp(self, p: Params) -> float | None:
        return None

    def layer(self, w: Weights, i: int, spec: AttentionSpec, rope: Rope | None, clamp: float | None) -> Block:
        return Block(
            attn_norm=Norm.layer_norm(self, w, f"blk.{i}.attn_norm", bias="optional"),
            attn=Attention.load(self, w, i, rope, spec, fused=True, out_bias="optional", clamp=clamp),
            ffn_norm=Norm.layer_norm(self, w, f"blk.{i}.ffn_norm", bias="optional"),
            ffn=MLP.load(self, w, i, self.n_ff, self.act),
        )

    # -- the forward pass
    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        x = self.ops.embed(self.tok_embd, ids)
        if self.pos_embd is not None:  # positions below max_positions (checked before the pass)
            x = x + self.ops.embed(self.pos_embd, positions)
        if self.embd_norm is not None:
            x = self.embd_norm(x)
        for L in self.layers:
            n = L.attn_norm(x)
            if self.parallel_residual:
                m = n if L.ffn_norm is None else L.ffn_norm(x)  # GPT-J shares LN₁
                x = x + L.attn(n, positions, cache) + L.ffn(m)
            else:
                x = x + L.attn(n, positions, cache)
                x = x + L.ffn(L.ffn_norm(x))
        return self.out_norm(x)


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)
# GPT-2's Conv1D weights are stored [in, out]; llama.cpp's converter transposes them to [out, in] and keeps
# the fused q|k|v. Checkpoints saved from GPT2Model lack the "transformer." prefix: both are accepted.

CONV1D = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TENSORS = [
    (pre + hf, gg) for pre in ("transformer.", "") for hf, gg in [
        ("wte.weight", "token_embd.weight"),
        ("wpe.weight", "position_embd.weight"),
        ("ln_f.weight", "output_norm.weight"),
        ("ln_f.bias", "output_norm.bias"),
        ("h.{i}.ln_1.weight", "blk.{i}.attn_norm.weight"),
        ("h.{i}.ln_1.bias", "blk.{i}.attn_norm.bias"),
        ("h.{i}.ln_2.weight", "blk.{i}.ffn_norm.weight"),
        ("h.{i}.ln_2.bias", "blk.{i}.ffn_norm.bias"),
    ] + [(f"h.{{i}}.{hf}.bias", f"blk.{{i}}.{gg}.bias") for hf, gg in CONV1D.items()]
] + [("lm_head.weight", "output.weight")]
REQUIRED = ["token_embd.weight", "position_embd.weight", "output_norm.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "block_count": cfg["n_layer"],
        "context_length": cfg.get("n_ctx", cfg.get("n_positions")),
        "embedding_length": cfg["n_embd"],
        "feed_forward_length": cfg.get("n_inner") or 4 * cfg["n_embd"],
        "attention.head_count": cfg["n_head"],
        "attention.layer_norm_epsilon": float(cfg["layer_norm_epsilon"]),
    }


def conv1d_tensors(ckpt, cfg: dict[str, Any]):
    for i in range(cfg["n_layer"]):
        for hf, gg in CONV1D.items():
            name = next(n for n in (f"transformer.h.{i}.{hf}.weight", f"h.{i}.{hf}.weight") if n in ckpt)
            yield f"blk.{i}.{gg}.weight", tuple(ckpt.shape(name))[::-1], \
                lambda name=name: np.ascontiguousarray(ckpt.get(name).T)


def conv1d_or_buffer(name: str) -> bool:
    return name.endswith((".attn.bias", ".attn.masked_bias")) or \
        any(name.endswith(f".{hf}.weight") for hf in CONV1D)


ARCHITECTURES = {"gpt2": GPT2}
CONVERTERS = {"GPT2LMHeadModel": ConvertSpec("gpt2", TENSORS, hparams, REQUIRED, extra_tensors=conv1d_tensors,
                                             n_layer_key="n_layer", ignored=conv1d_or_buffer)}
