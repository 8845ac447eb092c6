"""Tiny random GPT-2, GPT-J, GPT-NeoX, BLOOM and MPT models for the fixtures: name -> factory(vocab).

GELU as the real checkpoints have it: the tanh form for GPT-2 and GPT-J (`gelu_new`) and BLOOM, the exact
(erf) form for GPT-NeoX (Pythia's `gelu`) and MPT (transformers' MptMLP hard-codes it); purelm follows
each architecture (llama.cpp uses the tanh form for all)."""
import transformers

COMMON = dict(bos_token_id=0, eos_token_id=0)


def _gpt2(vocab):  # n_positions 1024 (GPT-2's): transformers' GGUF loader ignores context_length for it
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=2, n_head=4, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, **COMMON))


def _gptj(vocab):  # rotary on 8 of the 16 features of each head
    return transformers.GPTJForCausalLM(transformers.GPTJConfig(
        vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=False, **COMMON))


def _gptneox(vocab, parallel=True, rotary_pct=0.5):
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        hidden_act="gelu", rotary_pct=rotary_pct, rotary_emb_base=10000, max_position_embeddings=256,
        layer_norm_eps=1e-5, use_parallel_residual=parallel, tie_word_embeddings=False, **COMMON))


def _bloom(vocab):
    return transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-5, **COMMON))


def _mpt(vocab):  # clip_qkv 2 clamps a good share of q|k|v with these weights
    return transformers.MptForCausalLM(transformers.MptConfig(
        vocab_size=vocab, d_model=64, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=256,
        attn_config=dict(alibi=True, alibi_bias_max=8, clip_qkv=2.0), layer_norm_epsilon=1e-5, **COMMON))


TINY = {
    "gpt2": _gpt2,
    "gptj": _gptj,
    "gptneox": _gptneox,  # parallel residual, rotary on half of each head
    "gptneox_seq": lambda vocab: _gptneox(vocab, parallel=False, rotary_pct=1.0),
    "bloom": _bloom,
    "mpt": _mpt,
}


def _same(name, x):
    return x


def _neox_qkv_per_head(name, x, n_head=4):
    """Undo the converter's q|k|v-blocks order (purelm.convert_spec.qkv_blocks)."""
    if ".attn_qkv." not in name:
        return x
    return x.reshape(3, n_head, -1, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


# transformers' GGUF loader has no gptj, gptneox or mpt: their quantized references swap the dequantized
# GGUF weights into the HF model instead (gpt2 and bloom load through transformers' GGUF support).
FROM_GGUF_WEIGHTS = {"gptj": _same, "gptneox": _neox_qkv_per_head, "gptneox_seq": _neox_qkv_per_head,
                     "mpt": _same}
