"""Tiny random LLaMA-family models for the fixtures: name -> factory(vocab) returning a transformers model."""
import transformers

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=0, eos_token_id=0)

TINY = {
    "llama": lambda vocab: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, num_key_value_heads=4, tie_word_embeddings=False, **COMMON)),
    "mistral_gqa": lambda vocab: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None, **COMMON)),
    "qwen2": lambda vocab: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=True, **COMMON)),
}
