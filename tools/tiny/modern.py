"""Tiny random models of today's dense families for the fixtures: name -> factory(vocab).

Width 32, 4 heads of 8 (rows of 32: one q4_0/q8_0 block), so that the files stay small.
- qwen3: per-head q/k RMSNorms, no biases, head_dim 16 != hidden / heads (as Qwen3-0.6B), tied embeddings.
- olmo2: no pre-norms; q/k RMSNorms over the whole projection; post-attention and post-FFN norms.
- smollm3: 4 layers, so that layer 3 (every 4th) runs without rope; tied embeddings.
- llama3rope: Llama 3.x rope scaling (rope type llama3; original context 128, so that the 4 rotated pairs
  fall in all three bands: kept, blended, divided by the factor).
- phi4: Phi-4 as Phi3ForCausalLM: no sliding window, grouped kv heads (4 query heads per kv head).
- nemo: Mistral Nemo as MistralForCausalLM: head_dim 16 with 4 heads on a width of 32.

The quantized references swap the dequantized GGUF weights into the HF model (FROM_GGUF_WEIGHTS):
transformers' GGUF loader knows none of olmo2's, smollm3's or llama3's specifics."""
import transformers

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=128)

def _llama3rope(vocab, sizes=SMALL, n_kv=2):
    from purelm.models import CONVERTERS

    # without rope_freqs the GGUF files would not be the model the reference is made from
    if CONVERTERS["LlamaForCausalLM"].extra_tensors is None:
        raise RuntimeError("LlamaForCausalLM's ConvertSpec writes no rope_freqs (extra_tensors=rope_freqs_tensor)")
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, num_key_value_heads=n_kv, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=LLAMA3_ROPE, **sizes))


TINY = {
    "qwen3": lambda vocab: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=vocab, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), **SMALL)),
    "olmo2": lambda vocab: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        vocab_size=vocab, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0), **SMALL)),
    "smollm3": lambda vocab: transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
        vocab_size=vocab, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), **{**SMALL, "num_hidden_layers": 4})),
    "llama3rope": lambda vocab: _llama3rope(vocab),
    "phi4": lambda vocab: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=vocab, num_key_value_heads=1, rms_norm_eps=1e-5, sliding_window=None,
        original_max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=250000.0), **SMALL)),
    "nemo": lambda vocab: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=vocab, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, sliding_window=None,
        tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), **SMALL)),
}


def _same(name, x):
    return x


def _unpermute(n_head, n_kv):
    """Undo the converter's LLaMA q/k permutation (HF rotate-half rows -> GGUF adjacent pairs)."""
    def untransform(name, x):
        for part, n in (("attn_q.", n_head), ("attn_k.", n_kv)):
            if part in name:
                return x.reshape(n, x.shape[0] // n // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        return x
    return untransform


FROM_GGUF_WEIGHTS = {"qwen3": _same, "olmo2": _same, "phi4": _same,
                     **{name: _unpermute(4, 2) for name in ("smollm3", "llama3rope", "nemo")}}


# The K-quant fixtures (tools/make_fixtures.py --kquant): the same families at widths of 256, so that
# every quantized matrix's rows split into K-quants' 256-weight super-blocks (at 32 wide they fall back
# to legacy types). One layer (smollm3: 4, for its NoPE layer); qwen3 and nemo keep head_dim !=
# hidden / heads (4 heads of 128 on 256: Wo rows of 512, two super-blocks), olmo2 an FFN of 512 (the
# same for ffn_down); one kv head each (grouped-query attention, and the smallest k and v).
W256 = dict(SMALL, hidden_size=256, intermediate_size=256, num_hidden_layers=1)

KQUANT = {
    "qwen3-w256": (lambda vocab: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=vocab, num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), **W256)), _same),
    "olmo2-w256": (lambda vocab: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        vocab_size=vocab, num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0), **{**W256, "intermediate_size": 512})),
        _same),
    "smollm3-w256": (lambda vocab: transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
        vocab_size=vocab, num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), **{**W256, "num_hidden_layers": 4})),
        _unpermute(4, 1)),
    # 32 rotated pairs of head_dim 64 against an original context of 128: all three bands again
    "llama3rope-w256": (lambda vocab: _llama3rope(vocab, W256, n_kv=1), _unpermute(4, 1)),
    "phi4-w256": (lambda vocab: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=vocab, num_key_value_heads=1, rms_norm_eps=1e-5, sliding_window=None,
        original_max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=250000.0), **W256)), _same),
    "nemo-w256": (lambda vocab: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=vocab, num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-5, sliding_window=None,
        tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), **W256)),
        _unpermute(4, 1)),
}
