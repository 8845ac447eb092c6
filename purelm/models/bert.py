"""BERT, the encoder of sentence-embedding models (MiniLM, BGE, E5, ...): post-norm layers over
bidirectional attention, with learned position and token-type embeddings:

    x   = LN_e(E[ids] + T[0] + P[positions])
    h   = LN_a(x + Wo · Attention(Wq·x + bq, Wk·x + bk, Wv·x + bv) + bo)     (no causal mask)
    out = LN_o(h + Wdown · gelu(Wup · h + bup) + bdown)

Every token attends to the whole input, so an input runs in one pass. The last layer's output is the
model's result, pooled into one embedding per input (embeddings.py); there is no output head, and
`forward` refuses to run (Model.causal). Token types are all 0 ("sentence A"), as llama.cpp has
them. GELU is the exact (erf) form BERT was trained with (llama.cpp runs its tanh approximation).
"""
from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import AttentionSpec, Backend, KVCache
from ..convert_spec import ConvertSpec
from ..errors import FormatError, PurelmError, UsageError
from ..formats.gguf import GGUFFile
from .common import Model, Params, Weights
from .layers import MLP, Attention, GatedFFN, Norm


@dataclass
class EncoderLayer:
    attn: Attention
    attn_out_norm: Norm  # LN_a, over x + attention
    ffn: MLP | GatedFFN
    out_norm: Norm  # LN_o, over h + feed-forward


class Bert(Model):
    causal = False

    def __init__(self, gguf: GGUFFile, backend: Backend) -> None:
        super().__init__(gguf, backend)
        p, w = Params(gguf), Weights(gguf, backend)
        self.read_sizes(p, rms_norm=False, n_ctx_default=512)
        self.n_ff = p.int("feed_forward_length")
        if p.bool("attention.causal", False):
            raise p.fail("attention.causal", True, "false: BERT's attention is bidirectional")
        spec = AttentionSpec(scale=1.0 / math.sqrt(self.head_dim), causal=False)

        self.tok_embd = w.matrix("token_embd.weight", (self.n_vocab, self.dim))
        types = gguf.tensors.get("token_types.weight")  # (type count, dim); only row 0 is used
        self.type_embd = None if types is None else w.matrix("token_types.weight", (types.shape[0], self.dim))
        self.pos_embd = self.positions(p, w)
        self.embd_norm = Norm.layer_norm(self, w, "token_embd_norm")
        self.layers = [EncoderLayer(
            attn=self.attention(p, w, i, spec),
            attn_out_norm=Norm.layer_norm(self, w, f"blk.{i}.attn_output_norm"),
            ffn=self.feed_forward(w, i),
            out_norm=Norm.layer_norm(self, w, f"blk.{i}.layer_output_norm"),
        ) for i in range(self.n_layer)]
        # a reranker's (cross-encoder's) classification head, over the first token's hidden state
        self.cls = w.matrix("cls.weight", (self.dim, self.dim), optional=True)
        self.cls_b = w.vector("cls.bias", self.dim, optional=True) if self.cls is not None else None
        out = gguf.tensors.get("cls.output.weight")  # (scores, dim): one score for a reranker
        self.n_cls_out = out.shape[0] if out is not None else 0
        self.cls_out = None if out is None else w.matrix("cls.output.weight", (self.n_cls_out, self.dim))
        self.cls_out_b = None if out is None else w.vector("cls.output.bias", self.n_cls_out, optional=True)

    # -- what NomicBert varies
    def positions(self, p: Params, w: Weights) -> Any:
        """Learned position embeddings, one row per position of the training context."""
        self.max_positions = self.n_ctx_train
        return w.matrix("position_embd.weight", (self.n_ctx_train, self.dim))

    def attention(self, p: Params, w: Weights, i: int, spec: AttentionSpec) -> Attention:
        return Attention.load(self, w, i, spec=spec, bias="required", out_bias="optional")

    def feed_forward(self, w: Weights, i: int) -> MLP | GatedFFN:
        return MLP.load(self, w, i, self.n_ff, "gelu_erf")

    # -- the forward pass
    def hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> Any:
        x = self.ops.embed(self.tok_embd, ids)
        if self.pos_embd is not None:
            x = x + self.ops.embed(self.pos_embd, positions)
        if self.type_embd is not None:
            x = x + self.ops.embed(self.type_embd, np.zeros_like(ids))
        x = self.embd_norm(x)
        for L in self.layers:
            h = L.attn_out_norm(x + L.attn(x, positions, cache))
            x = L.out_norm(h + L.ffn(h))
        return x

    def classify(self, x: Any) -> Any:
        """A reranker's scores (rows, n_cls_out) from first tokens' hidden states (rows, dim):
        Wout · tanh(W·x + b) + bout (RoBERTa's classification head; llama.cpp's "rank" pooling)."""
        if self.cls_out is None:
            raise UsageError(f"{self.gguf.path}: this model has no classification head (cls.output.weight): it "
                             "embeds, it does not rank")
        if self.cls is not None:
            x = self.ops.softcap(self.ops.linear(x, self.cls, self.cls_b), 1.0)  # 1·tanh(y / 1)
        return self.ops.linear(x, self.cls_out, self.cls_out_b)


class NomicBert(Bert):
    """nomic-embed-text (llama.cpp's `nomic-bert`): BERT with rotary positions (NeoX pairs) instead of
    learned ones, a fused q|k|v without biases, and a SwiGLU feed-forward:

        h   = LN_a(x + Wo · Attention(rope(q), rope(k), v)),   q|k|v = Wqkv · x
        out = LN_o(h + Wdown · (silu(Wgate · h) * Wup · h))
    """

    def positions(self, p: Params, w: Weights) -> Any:
        self.rope = self.read_rope(p, neox=True)
        return None

    def attention(self, p: Params, w: Weights, i: int, spec: AttentionSpec) -> Attention:
        return Attention.load(self, w, i, self.rope, spec, fused=True, bias="none", out_bias="optional")

    def feed_forward(self, w: Weights, i: int) -> MLP | GatedFFN:
        return GatedFFN.load(self, w, i, self.n_ff, "silu")


# ------------------------------------------------------------------ Hugging Face -> GGUF (purelm convert)
# As llama.cpp's converter (conversion/bert.py): the pooler and the masked-LM heads are dropped, the
# pooling mode comes from a sentence-transformers folder's modules.json.

def _names(prefixes: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(pre + hf, gg) for pre in prefixes for hf, gg in [
        ("embeddings.word_embeddings.weight", "token_embd.weight"),
        ("embeddings.position_embeddings.weight", "position_embd.weight"),
        ("embeddings.token_type_embeddings.weight", "token_types.weight"),
        ("embeddings.LayerNorm.weight", "token_embd_norm.weight"),
        ("embeddings.LayerNorm.bias", "token_embd_norm.bias"),
    ] + [(f"encoder.layer.{{i}}.{hf}.{kind}", f"blk.{{i}}.{gg}.{kind}") for kind in ("weight", "bias") for hf, gg in [
        ("attention.self.query", "attn_q"),
        ("attention.self.key", "attn_k"),
        ("attention.self.value", "attn_v"),
        ("attention.output.dense", "attn_output"),
        ("attention.output.LayerNorm", "attn_output_norm"),
        ("intermediate.dense", "ffn_up"),
        ("output.dense", "ffn_down"),
        ("output.LayerNorm", "layer_output_norm"),
    ]]]


TENSORS = _names(("", "bert."))
REQUIRED = ["token_embd.weight", "position_embd.weight", "token_embd_norm.weight"] + [
    f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up",
                                  "ffn_down", "layer_output_norm")]
POOLING_TYPES = {"mean": 1, "cls": 2, "lasttoken": 3}  # llama.cpp's PoolingType


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise PurelmError(f"bert: hidden_act {cfg.get('hidden_act')!r} is not supported (only \"gelu\")")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise PurelmError(f"bert: position_embedding_type {cfg.get('position_embedding_type')!r} is not supported")
    return {
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg["intermediate_size"],
        "block_count": cfg["num_hidden_layers"],
        "attention.head_count": cfg["num_attention_heads"],
        "attention.layer_norm_epsilon": float(cfg.get("layer_norm_eps", 1e-12)),
        "attention.causal": False,
    }


def encoder_kv(arch: str, directory: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """A ConvertSpec.extra_kv (with `arch` bound): tokenizer.ggml.token_type_count (llama.cpp refuses a
    BERT file without it) and, from a sentence-transformers folder (modules.json naming a Pooling
    module), `{arch}.pooling_type`."""
    kv: dict[str, Any] = {"tokenizer.ggml.token_type_count": cfg.get("type_vocab_size", 1)}
    modules = _json(directory / "modules.json", list)
    pooling = next((m.get("path") for m in modules or [] if isinstance(m, dict)
                    and str(m.get("type", "")).endswith("Pooling")), None)
    if isinstance(pooling, str):
        pcfg = _json(directory / pooling / "config.json", dict)
        if pcfg is None:
            raise FormatError(directory / pooling, "config.json", "is missing: modules.json names this Pooling module")
        flags = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                 "lasttoken": "pooling_mode_lasttoken"}
        mode = next((m for m, key in flags.items() if pcfg.get(key)), pcfg.get("pooling_mode"))
        if mode not in POOLING_TYPES:
            raise FormatError(directory / pooling / "config.json", "pooling_mode",
                              f"{mode!r}: only mean, cls and lasttoken pooling are supported")
        kv[f"{arch}.pooling_type"] = POOLING_TYPES[mode]
    return kv


def _json(path: Path, want: type) -> Any:
    if not path.exists():
        return None
    from ..convert import _read_json

    return _read_json(path, want=want)


def unused(name: str) -> bool:
    name = name.removeprefix("bert.")
    return name in ("embeddings.position_ids", "embeddings.token_type_ids") or name.startswith(
        ("pooler.", "cls.predictions", "cls.seq_relationship"))


# DistilBERT: BERT's layers under other names, without token types (llama.cpp's DistilBertModel)
DISTIL_TENSORS = [(pre + hf, gg) for pre in ("", "distilbert.") for hf, gg in [
    ("embeddings.word_embeddings.weight", "token_embd.weight"),
    ("embeddings.position_embeddings.weight", "position_embd.weight"),
    ("embeddings.LayerNorm.weight", "token_embd_norm.weight"),
    ("embeddings.LayerNorm.bias", "token_embd_norm.bias"),
] + [(f"transformer.layer.{{i}}.{hf}.{kind}", f"blk.{{i}}.{gg}.{kind}") for kind in ("weight", "bias") for hf, gg in [
    ("attention.q_lin", "attn_q"),
    ("attention.k_lin", "attn_k"),
    ("attention.v_lin", "attn_v"),
    ("attention.out_lin", "attn_output"),
    ("sa_layer_norm", "attn_output_norm"),
    ("ffn.lin1", "ffn_up"),
    ("ffn.lin2", "ffn_down"),
    ("output_layer_norm", "layer_output_norm"),
]]]


def distil_hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("activation", "gelu") != "gelu":
        raise PurelmError(f"distilbert: activation {cfg.get('activation')!r} is not supported (only \"gelu\")")
    return hparams({"hidden_act": "gelu", "max_position_embeddings": cfg["max_position_embeddings"],
                    "hidden_size": cfg["dim"], "intermediate_size": cfg["hidden_dim"],
                    "num_hidden_layers": cfg["n_layers"], "num_attention_heads": cfg["n_heads"],
                    "layer_norm_eps": 1e-12})


def distil_unused(name: str) -> bool:
    name = name.removeprefix("distilbert.")
    return name == "embeddings.position_ids" or name.startswith(("vocab_", "pre_classifier.", "classifier."))


# RoBERTa: BERT under "roberta.", with a byte-level BPE vocabulary (XLM-RoBERTa: SentencePiece's
# unigram, convert.py) and positions that start after the padding id (HF counts them from
# pad_token_id + 1): llama.cpp's converter drops those first rows.
ROBERTA_TENSORS = [(hf, gg) for hf, gg in _names(("", "roberta.")) if gg != "position_embd.weight"]


def position_offset(cfg: dict[str, Any]) -> int:
    """Position rows before the first one used: pad_token_id + 1 (a token id, so convert.py's size
    checks leave it to the converter that reads it)."""
    pad = cfg.get("pad_token_id")
    if pad is None:
        return 0
    if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < cfg["max_position_embeddings"] - 1:
        raise PurelmError(f"roberta: pad_token_id {pad!r} must be an integer in [0, max_position_embeddings - 1): "
                          "the positions start after it")
    return pad + 1


def roberta_hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    kv = hparams(cfg)
    kv["context_length"] = cfg["max_position_embeddings"] - position_offset(cfg)
    if kv["context_length"] < 1:
        raise PurelmError(f"roberta: max_position_embeddings {cfg['max_position_embeddings']} leaves no position "
                          f"past the padding id {cfg.get('pad_token_id')}")
    return kv


def roberta_positions(ckpt: Any, cfg: dict[str, Any]):
    name = next((n for n in ("roberta.embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight")
                 if n in ckpt), None)
    if name is None:
        raise PurelmError("roberta: the checkpoint has no embeddings.position_embeddings.weight")
    rows, width = ckpt.shape(name)
    offset = position_offset(cfg)
    yield "position_embd.weight", (rows - offset, width), lambda: np.ascontiguousarray(ckpt.get(name)[offset:])


def roberta_unused(name: str) -> bool:
    return unused(name.removeprefix("roberta.")) or name.endswith("embeddings.position_embeddings.weight")


# A RoBERTa cross-encoder (reranker): its classification head, out_proj(tanh(dense(h[first]))), as
# llama.cpp's converter names it; the labels as it writes them (a 2-label config's defaults dropped).
CLASSIFIER = [(f"classifier.{hf}.{kind}", f"{gg}.{kind}") for kind in ("weight", "bias")
              for hf, gg in (("dense", "cls"), ("out_proj", "cls.output"))]


def classifier_kv(directory: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    kv = encoder_kv("bert", directory, cfg)
    labels = cfg.get("id2label")
    if isinstance(labels, dict) and labels and not (len(labels) == 2 and labels.get("0") == "LABEL_0"):
        # in label order: the keys are ids ("0", "1", ... "10"), compared as numbers
        order = sorted(labels, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))
        kv["bert.classifier.output_labels"] = [str(labels[k]) for k in order]
    return kv


# nomic-embed-text v1/v1.5 (NomicBertModel: remote code, named as llama.cpp's converter names it)
NOMIC_TENSORS = [
    ("embeddings.word_embeddings.weight", "token_embd.weight"),
    ("embeddings.token_type_embeddings.weight", "token_types.weight"),
    ("emb_ln.weight", "token_embd_norm.weight"),
    ("emb_ln.bias", "token_embd_norm.bias"),
] + [(f"encoder.layers.{{i}}.{hf}", f"blk.{{i}}.{gg}") for hf, gg in [
    ("attn.Wqkv.weight", "attn_qkv.weight"),
    ("attn.out_proj.weight", "attn_output.weight"),
    ("norm1.weight", "attn_output_norm.weight"),
    ("norm1.bias", "attn_output_norm.bias"),
    ("mlp.fc11.weight", "ffn_up.weight"),
    ("mlp.fc12.weight", "ffn_gate.weight"),
    ("mlp.fc2.weight", "ffn_down.weight"),
    ("norm2.weight", "layer_output_norm.weight"),
    ("norm2.bias", "layer_output_norm.bias"),
]]


def nomic_hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    """As llama.cpp's NomicBertModel: only the dense, post-norm, SwiGLU, full-rotary variant; its 8192
    positions are the 2048 it was trained for."""
    wanted = {"activation_function": "swiglu", "causal": False, "qkv_proj_bias": False, "mlp_fc1_bias": False,
              "mlp_fc2_bias": False, "prenorm": False, "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False,
              "rotary_emb_scale_base": None}
    for key, value in wanted.items():
        if cfg.get(key, value) != value or cfg.get("moe_every_n_layers"):
            raise PurelmError(f"nomic-bert: {key} = {cfg.get(key)!r} is not supported (only {value!r}; no MoE)")
    n_pos, trained = cfg["n_positions"], cfg.get("max_trained_positions", 2048)
    if (n_pos, trained) not in ((8192, 2048), (2048, 2048)):
        raise PurelmError(f"nomic-bert: n_positions {n_pos} with max_trained_positions {trained} is not a known model")
    return {
        "context_length": 2048 if n_pos == 8192 else 512,
        "embedding_length": cfg["n_embd"],
        "feed_forward_length": cfg["n_inner"],
        "block_count": cfg["n_layer"],
        "attention.head_count": cfg["n_head"],
        "attention.layer_norm_epsilon": float(cfg.get("layer_norm_epsilon", 1e-12)),
        "rope.freq_base": float(cfg.get("rotary_emb_base", 10000.0)),
        # (llama.cpp's converter reads transformers' own NomicBertConfig, which names the head size)
        "attention.key_length": cfg["n_embd"] // cfg["n_head"],
        "attention.value_length": cfg["n_embd"] // cfg["n_head"],
        "attention.causal": False,
    }


ARCHITECTURES = {"bert": Bert, "nomic-bert": NomicBert}
CONVERTERS = {
    **{name: ConvertSpec("bert", TENSORS, hparams, REQUIRED, ignored=unused,
                         extra_kv=partial(encoder_kv, "bert"))
       for name in ("BertModel", "BertForMaskedLM")},
    **{name: ConvertSpec("bert", DISTIL_TENSORS, distil_hparams, REQUIRED, ignored=distil_unused,
                         extra_kv=partial(encoder_kv, "bert"), n_layer_key="n_layers")
       for name in ("DistilBertModel", "DistilBertForMaskedLM")},
    **{name: ConvertSpec("bert", ROBERTA_TENSORS, roberta_hparams, REQUIRED, extra_tensors=roberta_positions,
                         ignored=roberta_unused, extra_kv=partial(encoder_kv, "bert"))
       for name in ("RobertaModel", "RobertaForMaskedLM", "XLMRobertaModel", "XLMRobertaForMaskedLM")},
    **{name: ConvertSpec("bert", ROBERTA_TENSORS + CLASSIFIER, roberta_hparams, REQUIRED + ["cls.output.weight"],
                         extra_tensors=roberta_positions, ignored=roberta_unused, extra_kv=classifier_kv)
       for name in ("RobertaForSequenceClassification", "XLMRobertaForSequenceClassification")},
    "NomicBertModel": ConvertSpec("nomic-bert", NOMIC_TENSORS, nomic_hparams,
                                  ["token_embd.weight", "token_embd_norm.weight", "blk.0.attn_qkv.weight"],
                                  extra_kv=partial(encoder_kv, "nomic-bert"), n_layer_key="n_layer"),
}
