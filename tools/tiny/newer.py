"""Tiny random Falcon, Phi-2, Phi-3 and StableLM models for the fixtures: name -> factory(vocab).

GELU as the real checkpoints have it: Phi's `gelu_new` (the tanh form) and Falcon's exact `gelu` (erf), which
purelm follows per architecture (llama.cpp uses the tanh form for both).
phi3 has a sliding window of 16 (the 22-token prompt + 8 greedy steps run past it); phi3_longrope is
Phi-4-mini-like: partial rotary (12 of 16 features), longrope short/long factors, tied embeddings."""
import numpy as np
import transformers

from purelm.models.falcon import qkv_order

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
             bos_token_id=0, eos_token_id=0)
FALCON = dict(SMALL, layer_norm_epsilon=1e-5, activation="gelu", bias=False, alibi=False,
              ffn_hidden_size=128, tie_word_embeddings=True)
FALCON_CFGS = {
    # Falcon-40B style: grouped kv heads interleaved per group in query_key_value, ln_attn + ln_mlp
    "falcon": dict(FALCON, new_decoder_architecture=True, num_kv_heads=2),
    # Falcon-7B style: multi-query (one kv head), one input norm shared by attention and MLP
    "falcon_mqa": dict(FALCON, new_decoder_architecture=False, multi_query=True, parallel_attn=True),
}
PHI3 = dict(SMALL, intermediate_size=128, num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0)
STABLELM = dict(SMALL, intermediate_size=128, layer_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25))


def _falcon(name):
    return lambda vocab: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=vocab, **FALCON_CFGS[name]))


TINY = {
    **{name: _falcon(name) for name in FALCON_CFGS},
    "phi2": lambda vocab: transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=vocab, intermediate_size=128, hidden_act="gelu_new", layer_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        tie_word_embeddings=False, **SMALL)),
    "phi3": lambda vocab: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=vocab, original_max_position_embeddings=256, sliding_window=16, tie_word_embeddings=False,
        **PHI3)),
    "phi3_longrope": lambda vocab: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=vocab, original_max_position_embeddings=64, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                             short_factor=[1.0, 1.1, 1.3, 1.7, 2.5, 4.0],
                             long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0]), **PHI3)),
    # StableLM 2 1.6B style: q/k/v biases, sequential residual with its own FFN norm
    "stablelm": lambda vocab: transformers.StableLmForCausalLM(transformers.StableLmConfig(
        vocab_size=vocab, num_key_value_heads=4, use_qkv_bias=True, use_parallel_residual=False, **STABLELM)),
    # StableLM 2 12B style: per-head q/k LayerNorms, parallel residual (no FFN norm), grouped kv heads
    "stablelm_qknorm": lambda vocab: transformers.StableLmForCausalLM(transformers.StableLmConfig(
        vocab_size=vocab, num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True, **STABLELM)),
}


def _same(name, x):
    return x


def _falcon_qkv(cfg):
    order = qkv_order(cfg)

    def untransform(name, x):  # the converter wrote x_hf[order]
        if not name.endswith("attn_qkv.weight"):
            return x
        out = np.empty_like(x)
        out[order] = x
        return out
    return untransform


class _StackedHeadNorms:
    """No tensor edits; `extra` splits the stacked attn_q_norm/attn_k_norm back into HF's per-head norms
    (reference_from_gguf_weights calls it with every dequantized GGUF tensor)."""

    def __init__(self, n_layer, n_head, n_kv):
        self.n_layer, self.n_head, self.n_kv = n_layer, n_head, n_kv

    def __call__(self, name, x):
        return x

    def extra(self, arrays):
        out = {}
        for i in range(self.n_layer):
            for hf, g, n in (("q_layernorm", "attn_q_norm", self.n_head), ("k_layernorm", "attn_k_norm", self.n_kv)):
                stacked = arrays[f"blk.{i}.{g}.weight"].reshape(n, -1)
                out.update({f"model.layers.{i}.self_attn.{hf}.norms.{h}.weight": stacked[h] for h in range(n)})
        return out


# transformers' GGUF loader has no phi2, does not undo falcon's q|k|v reordering, drops phi3's sliding
# window and longrope settings and stablelm's q/k norms: every quantized reference here swaps the
# dequantized GGUF weights into the HF model instead.
FROM_GGUF_WEIGHTS = {
    **{name: _falcon_qkv(cfg) for name, cfg in FALCON_CFGS.items()},
    "phi2": _same, "phi3": _same, "phi3_longrope": _same, "stablelm": _same,
    "stablelm_qknorm": _StackedHeadNorms(2, 4, 2),
}
