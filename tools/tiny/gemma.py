"""Tiny random Gemma-family models for the fixtures: name -> factory(vocab) returning a transformers model.

The sliding window is 8 tokens, so the fixture prompt (22 tokens + 8 greedy steps) runs past it, and
gemma3 uses a local/local/global layer pattern so that a 3-layer model has both kinds of layer."""
import transformers

COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=256,
              rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
              pad_token_id=0, tie_word_embeddings=True)

TINY = {
    # head_dim 32 != hidden / heads: exercises attention.key_length and a non-square output projection
    "gemma": lambda vocab: transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=1, head_dim=32, **COMMON)),
    # layer 0 local (window 8), layer 1 global; soft-capping small enough to bend the logits
    "gemma2": lambda vocab: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=2.0, **COMMON)),
    # layers 0, 1 local (rope base 10000, window 8), layer 2 global (rope base 1e6, linear scaling x8)
    "gemma3": lambda vocab: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=vocab, num_hidden_layers=3, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        **COMMON)),
}


def _unshift_norms(name, x):
    return x - 1 if name.endswith("norm.weight") else x


# transformers' GGUF loader drops gemma2/3's soft-capping, query scale, layer pattern and local rope base
# (and has no gemma at all), so the quantized references swap the dequantized GGUF weights into the HF
# model instead; the function undoes the converter's (1 + w) norm shift.
FROM_GGUF_WEIGHTS = {name: _unshift_norms for name in TINY}
