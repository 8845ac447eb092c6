"""GPT-2 and the decoder block it gave BLOOM, GPT-NeoX and MPT: pre-norm layers with LayerNorm, a fused
q|k|v projection, biases and a GELU feed-forward. GPT-2 adds learned position embeddings:

    x   = E[ids] + P[positions]
    h   = x + Wo · Attention(q, k, v) + bo,   q|k|v = Wqkv · LN₁(x) + bqkv
    out = h + Wdown · gelu(Wup · LN₂(h) + bup) + bdown

The subclasses change only what the GGUF file says they change: a LayerNorm on the embeddings
(`token_embd_norm`, BLOOM), ALiBi instead of position embeddings (BLOOM, MPT), rotary q/k (GPT-NeoX),
q|k|v clamped to ±clamp_kqv (MPT), missing biases (MPT), and the parallel residual of GPT-NeoX and GPT-J:

    out = x + Attention(LN₁(x)) + FFN(LN₂(x))

GELU is the tanh approximation (ggml's, and GPT-2's `gelu_new`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache, Rope
from ..convert import ConvertSpec
from ..errors import ContextOverflowError, FormatError
from ..formats.gguf import GGUFFile
from .blocks import alibi_slopes
from .common import Model, Params, Weights


class GPT2(Model):
    parallel_residual = False  # GPT-NeoX (when the file says so) and GPT-J

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=False)
        dim, hd, n_vocab = self.dim, self.head_dim, self.n_vocab
        self.ffn = p.int("feed_forward_length")
        self.q_dim, self.kv_dim = self.n_head * hd, self.n_kv_head * hd
        for name in gguf.tensors:  # variants llama.cpp runs and purelm does not (yet)
            if name.startswith("blk.0.") and name.endswith(("attn_q_norm.weight", ".scales")):
                raise FormatError(gguf.path, f"tensor {name!r}", "(q/k LayerNorm or MPT activation scales) "
                                  "is not supported")

        self.tok_embd = w.matrix("token_embd.weight", (n_vocab, dim))
        pos = gguf.tensors.get("position_embd.weight")
        self.n_pos = pos.shape[0] if pos is not None else None
        self.pos_embd = w.matrix("position_embd.weight", (self.n_pos, dim)) if pos is not None else None
        self.embd_norm = self.norm(w, "token_embd_norm", optional=True)
        self.out_norm = self.norm(w, "output_norm")
        self.output = w.matrix("output.weight", (n_vocab, dim), optional=True)
        if self.output is None:  # tied embeddings
            self.output = self.tok_embd
        self.output_b = w.vector("output.bias", n_vocab, optional=True)

        self.rope = self.rope_spec(p)
        max_bias = self.alibi_max_bias(p)
        slopes = alibi_slopes(self.n_head, max_bias) if max_bias else None
        self.attn = AttentionSpec(scale=1.0 / np.sqrt(hd), alibi_slopes=slopes)
        self.clamp_kqv = self.clamp(p)
        self.layers = [self.layer(w, f"blk.{i}.") for i in range(self.n_layer)]

    # -- what the subclasses vary
    def rope_spec(self, p: Params) -> Rope | None:
        return None

    def alibi_max_bias(self, p: Params) -> float:
        return 0.0

    def clamp(self, p: Params) -> float | None:
        return None

    def layer(self, w: Weights, b: str) -> dict[str, Any]:
        dim, ffn = self.dim, self.ffn
        qkv = self.q_dim + 2 * self.kv_dim
        return dict(
            attn_norm=self.norm(w, b + "attn_norm"),
            wqkv=w.matrix(b + "attn_qkv.weight", (qkv, dim)), bqkv=w.vector(b + "attn_qkv.bias", qkv, optional=True),
            wo=w.matrix(b + "attn_output.weight", (dim, self.q_dim)),
            bo=w.vector(b + "attn_output.bias", dim, optional=True),
            ffn_norm=self.norm(w, b + "ffn_norm"),
            up=w.matrix(b + "ffn_up.weight", (ffn, dim)), bup=w.vector(b + "ffn_up.bias", ffn, optional=True),
            down=w.matrix(b + "ffn_down.weight", (dim, ffn)),
            bdown=w.vector(b + "ffn_down.bias", dim, optional=True),
        )

    def qkv(self, n: Any, L: dict[str, Any]) -> tuple[Any, Any, Any]:
        qkv = self.ops.linear(n, L["wqkv"], L["bqkv"])
        if self.clamp_kqv:
            qkv = self.ops.clamp(qkv, -self.clamp_kqv, self.clamp_kqv)
        q, kv = self.q_dim, self.q_dim + self.kv_dim
        return qkv[:, :q], qkv[:, q:kv], qkv[:, kv:]

    # -- the forward pass
    def norm(self, w: Weights, name: str, optional: bool = False) -> tuple[Any, Any] | None:
        weight = w.vector(name + ".weight", self.dim, optional)
        return None if weight is None else (weight, w.vector(name + ".bias", self.dim, optional=True))

    def ln(self, x: Any, norm: tuple[Any, Any]) -> Any:
        return self.ops.layer_norm(x, norm[0], norm[1], self.eps)

    def new_cache(self, n_ctx: int) -> KVCache:
        return self.ops.kv_cache(self.n_layer, n_ctx, self.n_kv_head, self.head_dim, self.head_dim)

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        ops, T, hd = self.ops, len(ids), self.head_dim
        x = ops.embed(self.tok_embd, ids)
        if self.pos_embd is not None:
            if positions[-1] >= self.n_pos:
                raise ContextOverflowError(f"position {positions[-1]} is past the model's {self.n_pos} learned "
                                           "position embeddings")
            x = x + ops.embed(self.pos_embd, positions)
        if self.embd_norm is not None:
            x = self.ln(x, self.embd_norm)
        for i, L in enumerate(self.layers):
            n = self.ln(x, L["attn_norm"])
            q, k, v = self.qkv(n, L)
            q, k, v = (q.reshape(T, self.n_head, hd), k.reshape(T, self.n_kv_head, hd),
                       v.reshape(T, self.n_kv_head, hd))
            if self.rope is not None:
                q, k = ops.rope(q, positions, self.rope), ops.rope(k, positions, self.rope)
            a = ops.linear(ops.attention(q, k, v, cache, i, self.attn), L["wo"], L["bo"])
            if self.parallel_residual:
                m = n if L["ffn_norm"] is None else self.ln(x, L["ffn_norm"])  # GPT-J shares LN₁
                x = x + a + self.mlp(m, L)
            else:
                x = x + a
                x = x + self.mlp(self.ln(x, L["ffn_norm"]), L)
        return self.ln(x, self.out_norm)

    def mlp(self, m: Any, L: dict[str, Any]) -> Any:
        return self.ops.linear(self.ops.gelu(self.ops.linear(m, L["up"], L["bup"])), L["down"], L["bdown"])


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
