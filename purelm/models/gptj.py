"""GPT-J (EleutherAI): a parallel block in which attention and feed-forward read the same LayerNorm,
separate q, k, v projections without biases, and rotary q/k on the first `rope.dimension_count` features of
each head in GPT-J's interleaved-pair form (ggml's "normal" mode, x[2i] with x[2i+1]):

    n   = LN(x)
    out = x + Wo · Attention(rope(Wq·n), rope(Wk·n), Wv·n) + Wdown · gelu(Wup · n + bup) + bdown
    logits = Wout · LN_f(h) + bout

llama.cpp names the architecture and its tensors (gguf-py's MODEL_ARCH.GPTJ) but has no converter or
graph for it; the names and keys here follow those tables and the other architectures' conventions.
"""
from __future__ import annotations

from typing import Any

from ..backends.base import AttentionSpec, Rope
from ..convert_spec import ConvertSpec
from .common import Params, Weights
from .gpt2 import GPT2
from .layers import Attention, Block, MLP, Norm


class GPTJ(GPT2):
    parallel_residual = True

    def rope_spec(self, p: Params) -> Rope:
        return self.read_rope(p, neox=False, scaling=False)

    def layer(self, w: Weights, i: int, spec: AttentionSpec, rope: Rope | None, clamp: float | None) -> Block:
        return Block(  # no ffn_norm: the feed-forward reads attn_norm's output
            attn_norm=Norm.layer_norm(self, w, f"blk.{i}.attn_norm", bias="optional"),
            attn=Attention.load(self, w, i, rope, spec, bias="none"),
            ffn=MLP.load(self, w, i, self.n_ff, self.act),
        )


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)

TENSORS = [
    ("transformer.wte.weight", "token_embd.weight"),
    ("transformer.ln_f.weight", "output_norm.weight"),
    ("transformer.ln_f.bias", "output_norm.bias"),
    ("lm_head.weight", "output.weight"),
    ("lm_head.bias", "output.bias"),
    ("transformer.h.{i}.ln_1.weight", "blk.{i}.attn_norm.weight"),
    ("transformer.h.{i}.ln_1.bias", "blk.{i}.attn_norm.bias"),
    ("transformer.h.{i}.attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("transformer.h.{i}.attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("transformer.h.{i}.attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("transformer.h.{i}.attn.out_proj.weight", "blk.{i}.attn_output.weight"),
    ("transformer.h.{i}.mlp.fc_in.weight", "blk.{i}.ffn_up.weight"),
    ("transformer.h.{i}.mlp.fc_in.bias", "blk.{i}.ffn_up.bias"),
    ("transformer.h.{i}.mlp.fc_out.weight", "blk.{i}.ffn_down.weight"),
    ("transformer.h.{i}.mlp.fc_out.bias", "blk.{i}.ffn_down.bias"),
]
REQUIRED = ["token_embd.weight", "output_norm.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")]


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "context_length": cfg["n_positions"],
        "embedding_length": cfg["n_embd"],
        "block_count": cfg["n_layer"],
        "feed_forward_length": cfg.get("n_inner") or 4 * cfg["n_embd"],
        "attention.head_count": cfg["n_head"],
        "rope.dimension_count": cfg.get("rotary_dim") or cfg["n_embd"] // cfg["n_head"],
        "attention.layer_norm_epsilon": float(cfg["layer_norm_epsilon"]),
    }


def buffers(name: str) -> bool:
    return name.endswith((".attn.bias", ".attn.masked_bias"))


ARCHITECTURES = {"gptj": GPTJ}
CONVERTERS = {"GPTJForCausalLM": ConvertSpec("gptj", TENSORS, hparams, REQUIRED, n_layer_key="n_layer",
                                             ignored=buffers)}
