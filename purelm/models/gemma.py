"""Gemma, Gemma 2 and Gemma 3 (text): pre-norm decoders with RMSNorm, NeoX-style rotary embeddings,
grouped-query attention, a GeGLU feed-forward (tanh GELU) and tied embeddings.

    x0  = sqrt(d) · embed(ids)
    h   = x + P_a(Wo · Attention(rope(N_q(Wq·n)) · s, rope(N_k(Wk·n)), Wv·n)),   n = RMSNorm(x)
    out = h + P_f(Wdown · (gelu(Wgate·m) * Wup·m)),                            m = RMSNorm(h)
    logits = cap_f · tanh(Wembd · RMSNorm(x_L) / cap_f)

Every RMSNorm multiplies by (1 + w); the GGUF file already holds 1 + w (llama.cpp's converter adds
the 1). s is the query scale: 1/sqrt(head_dim), except Gemma 2/3 27B which use 1/sqrt(d / n_head).

- Gemma:   P_a = P_f = N_q = N_k = identity, no soft-capping, global attention everywhere.
- Gemma 2: P_a, P_f are RMSNorms (post_attention_norm, post_ffw_norm); attention scores are
  soft-capped (cap · tanh(score / cap)) and so are the final logits; even layers attend only to the
  last `sliding_window` positions, odd layers to everything.
- Gemma 3: as Gemma 2 without soft-capping, plus RMSNorm over each q and k head (N_q, N_k). Layers
  i with i % 6 < 5 are local (sliding window, rope base 10000, no rope scaling); every 6th layer is
  global (rope.freq_base, e.g. 1e6, with optional linear scaling).

llama.cpp hard-codes the local/global pattern (period 2 for Gemma 2, 6 for Gemma 3), the local rope
base (10000) and the query scale. purelm reads the optional keys `attention.sliding_window_pattern`
(a period or one bool per layer, true = local), `rope.freq_base_swa` and `attention.scale` first, and
its converter writes them only for checkpoints that differ from llama.cpp's fixed choices.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache
from ..convert_spec import ConvertSpec
from ..formats.gguf import GGUFFile
from .common import Model, Params, Weights
from .layers import Attention, Block, GatedFFN, HeadNorm, Norm, output_head


def local_layers(n_layer: int, pattern: Any) -> list[bool]:
    """Which layers use the sliding window: a bool per layer, or a period n (llama.cpp's
    set_swa_pattern: layer i is local when i % n < n - 1; n = 0 makes every layer local)."""
    if np.ndim(pattern) > 0:
        if len(pattern) != n_layer:
            raise ValueError(f"sliding_window_pattern has {len(pattern)} entries for {n_layer} layers")
        return [bool(b) for b in pattern]
    n = int(pattern)
    return [n == 0 or i % n < n - 1 for i in range(n_layer)]


class Gemma(Model):
    post_norms = False  # Gemma 2/3: RMSNorm on the attention and feed-forward outputs
    qk_norm = False  # Gemma 3: RMSNorm over each q and k head
    swa_period = 0  # llama.cpp's fixed local/global pattern (0: no sliding window at all)
    local_rope_base: float | None = None  # Gemma 3: local layers' rope base (None: same rope as global)
    n_layer_27b: int | None = None  # the 27B model scales queries by 1/sqrt(d / n_head)

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=True, n_ctx_default=8192)
        self.eps = p.float("attention.layer_norm_rms_epsilon", 1e-6, lo=0.0, hi=1.0)
        n_ff = p.int("feed_forward_length")
        self.embed_scale = float(np.float32(np.sqrt(self.dim)))  # sqrt(d) rounded to float32, as transformers
        self.final_softcap = p.float("final_logit_softcapping", None, lo=0.0) or None

        global_rope = self.read_rope(p, neox=True)
        local_rope = global_rope if self.local_rope_base is None else \
            self.read_rope(p, neox=True, scaling=False, base_key="rope.freq_base_swa",
                           base_default=self.local_rope_base)
        scale = p.float("attention.scale", None, lo=0.0, above=True)
        if scale is None:
            scale = 1.0 / np.sqrt(self.dim // self.n_head if self.n_layer == self.n_layer_27b else self.head_dim)
        softcap = p.float("attn_logit_softcapping", None, lo=0.0) or None
        window = (p.int("attention.sliding_window", None, lo=0) or None) if self.swa_period else None
        self.local = self.local_layers(p, self.swa_period) if window else [False] * self.n_layer

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        self.out_norm = Norm.rms_norm(self, w, "output_norm")
        self.output, self.output_b = output_head(self, w)
        post, qk = not self.post_norms, not self.qk_norm  # optional unless the architecture has them
        self.layers = []
        for i, local in enumerate(self.local):
            spec = AttentionSpec(scale=float(scale), softcap=softcap, window=window if local else None)
            self.layers.append(Block(
                attn_norm=Norm.rms_norm(self, w, f"blk.{i}.attn_norm"),
                # q/k norms: each optional alone (before Gemma 3), as in llama.cpp
                attn=Attention.load(self, w, i, local_rope if local else global_rope, spec, bias="none",
                                    q_norm=HeadNorm.rms_norm(self, w, f"blk.{i}.attn_q_norm.weight", optional=qk),
                                    k_norm=HeadNorm.rms_norm(self, w, f"blk.{i}.attn_k_norm.weight", optional=qk)),
                post_attn_norm=Norm.rms_norm(self, w, f"blk.{i}.post_attention_norm", optional=post),
                ffn_norm=Norm.rms_norm(self, w, f"blk.{i}.ffn_norm"),
                ffn=GatedFFN.load(self, w, i, n_ff, "gelu"),
                post_ffn_norm=Norm.rms_norm(self, w, f"blk.{i}.post_ffw_norm", optional=post),
            ))

    def local_layers(self, p: Params, period: int) -> list[bool]:
        """`attention.sliding_window_pattern` checked (one bool per layer, or a period), else
        llama.cpp's fixed `period`."""
        key = "attention.sliding_window_pattern"
        pattern = p.raw(key) if p.has(key) else period
        if np.ndim(pattern) > 0:
            if len(pattern) != self.n_layer or not all(isinstance(b, (bool, np.bool_)) for b in pattern):
                raise p.fail(key, pattern, f"a period or one bool per layer ({self.n_layer})")
        else:
            pattern = p.int(key, period, lo=0)
        return local_layers(self.n_layer, pattern)

    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        x = self.ops.embed(self.tok_embd, ids) * self.embed_scale
        for L in self.layers:
            x = x + post_norm(L.post_attn_norm, L.attn(L.attn_norm(x), positions, cache))
            x = x + post_norm(L.post_ffn_norm, L.ffn(L.ffn_norm(x)))
        return self.out_norm(x)

    def head(self, h: Any) -> Any:
        logits = self.ops.linear(h, self.output)
        return self.ops.softcap(logits, self.final_softcap) if self.final_softcap else logits


def post_norm(norm: Norm | None, y: Any) -> Any:
    """P_a, P_f: Gemma 2/3 normalize each sublayer's output too (Gemma 1 does not)."""
    return y if norm is None else norm(y)


class Gemma2(Gemma):
    post_norms = True
    swa_period = 2
    n_layer_27b = 46


class Gemma3(Gemma):
    post_norms = True
    qk_norm = True
    swa_period = 6
    local_rope_base = 10000.0
    n_layer_27b = 62


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

COMMON_TENSORS = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
]
GEMMA_TENSORS = COMMON_TENSORS + [("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight")]
GEMMA2_TENSORS = COMMON_TENSORS + [
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight"),
]
# llama.cpp keeps an untied Gemma 3 lm_head (and drops Gemma/Gemma 2's, which are always tied)
GEMMA3_TENSORS = GEMMA2_TENSORS + [
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
]


def _required(tensors: list[tuple[str, str]]) -> list[str]:
    return [g.format(i=0) for _, g in tensors if g != "output.weight"]


def _rope(cfg: dict[str, Any], layer_type: str) -> tuple[float | None, dict[str, Any]]:
    """(rope base, scaling dict) of one layer type from transformers' old keys (rope_theta,
    rope_local_base_freq, rope_scaling) or its newer rope_parameters (flat or per layer type)."""
    params = cfg.get("rope_parameters") or {}
    if layer_type in params:
        params = params[layer_type] or {}
    elif "full_attention" in params or "sliding_attention" in params:
        params = {}
    if layer_type == "sliding_attention":
        return params.get("rope_theta", cfg.get("rope_local_base_freq")), {}
    scaling = cfg.get("rope_scaling") or params
    return params.get("rope_theta", cfg.get("rope_theta")), scaling


def _hparams(cfg: dict[str, Any], period: int = 0, n_layer_27b: int | None = None) -> dict[str, Any]:
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    kv = {
        "context_length": cfg.get("max_position_embeddings", 8192),
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": n_head,
        "attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        "attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
    }
    base, scaling = _rope(cfg, "full_attention")
    kv["rope.freq_base"] = float(base if base is not None else 10000.0)
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        kv["rope.scaling.type"] = "linear"
        kv["rope.scaling.factor"] = float(scaling["factor"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key):
            kv[key] = float(cfg[key])
    if not period:
        return kv
    if cfg.get("sliding_window"):
        kv["attention.sliding_window"] = int(cfg["sliding_window"])
        n = cfg["num_hidden_layers"]
        types = cfg.get("layer_types")
        local = [t == "sliding_attention" for t in types] if types else \
            local_layers(n, cfg.get("sliding_window_pattern") or period)
        if local != local_layers(n, period):  # llama.cpp hard-codes the period
            kv["attention.sliding_window_pattern"] = local
    # llama.cpp derives the query scale from the model size; say so only where that would be wrong
    qpas = cfg.get("query_pre_attn_scalar")
    if qpas:
        rule = cfg["hidden_size"] // n_head if cfg["num_hidden_layers"] == n_layer_27b else head_dim
        if qpas != rule:
            kv["attention.scale"] = float(qpas) ** -0.5
    return kv


def gemma2_hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    return _hparams(cfg, Gemma2.swa_period, Gemma2.n_layer_27b)


def gemma3_hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    kv = _hparams(cfg, Gemma3.swa_period, Gemma3.n_layer_27b)
    local_base, _ = _rope(cfg, "sliding_attention")
    if local_base is not None and float(local_base) != 10000.0:  # llama.cpp hard-codes 10000
        kv["rope.freq_base_swa"] = float(local_base)
    return kv


def shift_norms(name: str, x: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """Gemma's RMSNorm scales by (1 + w): store 1 + w, as llama.cpp does."""
    return x + np.float32(1) if name.endswith("norm.weight") else x


ARCHITECTURES = {"gemma": Gemma, "gemma2": Gemma2, "gemma3": Gemma3}
CONVERTERS = {
    "GemmaForCausalLM": ConvertSpec("gemma", GEMMA_TENSORS, _hparams, _required(GEMMA_TENSORS), shift_norms,
                                    ignored=lambda n: n == "lm_head.weight"),
    "Gemma2ForCausalLM": ConvertSpec("gemma2", GEMMA2_TENSORS, gemma2_hparams, _required(GEMMA2_TENSORS),
                                     shift_norms, ignored=lambda n: n == "lm_head.weight"),
    "Gemma3ForCausalLM": ConvertSpec("gemma3", GEMMA3_TENSORS, gemma3_hparams, _required(GEMMA3_TENSORS),
                                     shift_norms),
}
