"""Tiny random mixture-of-experts models for the fixtures (4 experts, 2 picked per token): name -> factory(vocab).

qwen3moe: Qwen3's per-head q/k norms, head_dim 32 != hidden / heads, renormalized top-k (norm_topk_prob).
mixtral: LLaMA with experts (GGUF arch llama), grouped kv heads. olmoe: q/k norms over the whole
projection, softmax weights not renormalized (kv heads = heads: llama.cpp's olmoe sizes k_norm by the width).
Their quantized references swap the dequantized GGUF weights into the HF model (transformers' GGUF loader
has no OLMoE, and would not load these files' 3-D expert tensors the way the converter wrote them)."""
import numpy as np
import transformers

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
             rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
N_EXPERT, N_USED, N_FF = 4, 2, 32

TINY = {
    "qwen3moe": lambda vocab: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=vocab, num_key_value_heads=2, head_dim=32, intermediate_size=128, moe_intermediate_size=N_FF,
        num_experts=N_EXPERT, num_experts_per_tok=N_USED, norm_topk_prob=True, **SMALL)),
    "mixtral": lambda vocab: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=vocab, num_key_value_heads=2, intermediate_size=N_FF, num_local_experts=N_EXPERT,
        num_experts_per_tok=N_USED, sliding_window=None, **SMALL)),
    "olmoe": lambda vocab: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=vocab, num_key_value_heads=4, intermediate_size=N_FF, num_experts=N_EXPERT,
        num_experts_per_tok=N_USED, norm_topk_prob=False, **SMALL)),
}


class _Unstack:
    """Undoes the converter: the stacked 3-D experts back to the HF model's fused expert parameters
    (`extra`; transformers keeps gate|up as one (E, 2·n_ff, dim) tensor in memory), and for mixtral
    LLaMA's q/k row permutation and the router's in-memory name."""

    def __init__(self, n_head=None, n_kv=None, n_layer=SMALL["num_hidden_layers"], n_expert=N_EXPERT, n_ff=N_FF):
        self.n_head, self.n_kv = n_head, n_kv
        self.n_layer, self.n_expert, self.n_ff = n_layer, n_expert, n_ff

    def __call__(self, name, x):
        if self.n_head and name.endswith(("attn_q.weight", "attn_k.weight")):
            n = self.n_head if "attn_q" in name else self.n_kv
            return x.reshape(n, x.shape[0] // n // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        return x

    def extra(self, arrays):
        out = {}
        for i in range(self.n_layer):
            gate, up, down = (arrays[f"blk.{i}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
            gate, up = gate.reshape(self.n_expert, self.n_ff, -1), up.reshape(self.n_expert, self.n_ff, -1)
            out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
            out[f"model.layers.{i}.mlp.experts.down_proj"] = down.reshape(self.n_expert, -1, self.n_ff)
            if self.n_head:  # mixtral's router: block_sparse_moe.gate on disk, mlp.gate in memory
                out[f"model.layers.{i}.mlp.gate.weight"] = arrays[f"blk.{i}.ffn_gate_inp.weight"]
        return out


FROM_GGUF_WEIGHTS = {"qwen3moe": _Unstack(), "olmoe": _Unstack(), "mixtral": _Unstack(4, 2)}


# The K-quant fixtures (tools/make_fixtures.py --kquant): the same families at widths of 256 (every
# quantized row splits into K-quants' 256-weight super-blocks): one layer, 4 heads of 64, one kv head
# (olmoe: 4, as above), experts 256 wide.
W256 = dict(SMALL, hidden_size=256, num_hidden_layers=1)
N_FF_W256 = 256
_unstack_w256 = dict(n_layer=1, n_ff=N_FF_W256)

KQUANT = {
    "qwen3moe-w256": (lambda vocab: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=vocab, num_key_value_heads=1, head_dim=64, intermediate_size=N_FF_W256,
        moe_intermediate_size=N_FF_W256, num_experts=N_EXPERT, num_experts_per_tok=N_USED, norm_topk_prob=True,
        **W256)), _Unstack(**_unstack_w256)),
    "mixtral-w256": (lambda vocab: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=vocab, num_key_value_heads=1, intermediate_size=N_FF_W256, num_local_experts=N_EXPERT,
        num_experts_per_tok=N_USED, sliding_window=None, **W256)), _Unstack(4, 1, **_unstack_w256)),
    "olmoe-w256": (lambda vocab: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=vocab, num_key_value_heads=4, intermediate_size=N_FF_W256, num_experts=N_EXPERT,
        num_experts_per_tok=N_USED, norm_topk_prob=False, **W256)), _Unstack(**_unstack_w256)),
}
