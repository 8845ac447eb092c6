"""GPT-2, GPT-J, GPT-NeoX, BLOOM and MPT beyond the logit checks of tests/test_models.py: the converter
writes llama.cpp's names, keys and tensor layouts, each fixture exercises its architecture's features,
and GPT-NeoX and MPT match transformers with the exact (erf) GELU, not the tanh form."""
import shutil

import gguf
import numpy as np
import pytest
from conftest import llama_cpp_tensor_names, tensor_pattern

from purelm.backends.numpy_backend import NumpyBackend
from purelm.convert import convert
from purelm.errors import ContextOverflowError, FormatError
from purelm.formats.gguf import GGUFFile, GGUFWriter
from purelm.formats.safetensors import Checkpoint
from purelm.models import build_model
from purelm.convert_spec import qkv_blocks
from purelm.models.layers import alibi_slopes
from purelm.models.gptneox import hparams as neox_hparams
from purelm.models.mpt import hparams as mpt_hparams

# The {arch}.* keys llama.cpp's convert_hf_to_gguf.py writes (GPT-J: it has no converter; ours).
KEYS = {
    "gpt2": {"block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.layer_norm_epsilon"},
    "gptneox": {"context_length", "embedding_length", "block_count", "feed_forward_length", "rope.dimension_count",
                "attention.head_count", "use_parallel_residual", "attention.layer_norm_epsilon"},
    "bloom": {"context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
              "attention.head_count_kv", "attention.layer_norm_epsilon"},
    "mpt": {"context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
            "attention.layer_norm_epsilon", "attention.clamp_kqv", "attention.max_alibi_bias"},
    "gptj": {"context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "rope.dimension_count", "attention.layer_norm_epsilon"},
}
FIXTURE_ARCH = {"gpt2": "gpt2", "gptj": "gptj", "gptneox": "gptneox", "gptneox_seq": "gptneox", "bloom": "bloom",
                "mpt": "mpt"}


def load(fixtures, name, qtype="f32", backend=None):
    return build_model(GGUFFile(fixtures / f"{name}-{qtype}.gguf"), backend or NumpyBackend())


def logits(model, ids):
    return model.forward(ids, model.new_cache(64), all_logits=True)


@pytest.mark.parametrize("name", sorted(FIXTURE_ARCH))
def test_names_and_keys_are_llama_cpps(fixtures, name):
    arch = FIXTURE_ARCH[name]
    r = gguf.GGUFReader(fixtures / f"{name}-q8_0.gguf")
    allowed = llama_cpp_tensor_names(arch)
    for t in r.tensors:
        assert tensor_pattern(t.name) in allowed, t.name
    assert r.fields["general.architecture"].contents() == arch
    assert {k[len(arch) + 1:] for k in r.fields if k.startswith(arch + ".")} == KEYS[arch]


def test_gpt2_conv1d_weights_are_transposed(fixtures):
    f, ckpt = GGUFFile(fixtures / "gpt2-f32.gguf"), Checkpoint(fixtures / "hf" / "gpt2")
    for hf, name in [("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"),
                     ("mlp.c_proj", "ffn_down")]:
        np.testing.assert_array_equal(f.tensors[f"blk.1.{name}.weight"].dequantize(),
                                      ckpt.get(f"transformer.h.1.{hf}.weight").T)
    assert "output.weight" not in f.tensors  # tied to token_embd, as llama.cpp's converter leaves it


def test_gpt2_checkpoint_without_prefix_and_with_attn_buffers(fixtures, tmp_path):
    # openai-community/gpt2 was saved from GPT2Model: no "transformer." prefix, plus the causal-mask buffers
    from test_convert import write_safetensors

    src, dst = fixtures / "hf" / "gpt2", tmp_path / "gpt2"
    shutil.copytree(src, dst)
    ckpt = Checkpoint(src)
    tensors = {n.removeprefix("transformer."): ckpt.get(n) for n in ckpt.names()}
    tensors["h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)
    (dst / "model.safetensors").unlink()
    write_safetensors(dst / "model.safetensors", tensors)
    a, b = GGUFFile(convert(dst, tmp_path / "a.gguf", "f32")), GGUFFile(fixtures / "gpt2-f32.gguf")
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensors[name].dequantize(), b.tensors[name].dequantize())


@pytest.mark.parametrize("name,hf_name", [("bloom", "transformer.h.0.self_attention.query_key_value"),
                                          ("gptneox", "gpt_neox.layers.0.attention.query_key_value")])
def test_fused_qkv_is_reordered_to_blocks(fixtures, name, hf_name):
    # HF: rows [head][q|k|v][head_dim]; llama.cpp's converter: [q|k|v][head][head_dim]
    f, ckpt = GGUFFile(fixtures / f"{name}-f32.gguf"), Checkpoint(fixtures / "hf" / name)
    w, b = ckpt.get(hf_name + ".weight"), ckpt.get(hf_name + ".bias")
    hd = 16
    for part in range(3):
        for head in range(4):
            got = f.tensors["blk.0.attn_qkv.weight"].dequantize()[(part * 4 + head) * hd:][:hd]
            np.testing.assert_array_equal(got, w[(head * 3 + part) * hd:][:hd])
    np.testing.assert_array_equal(f.tensors["blk.0.attn_qkv.bias"].dequantize(), qkv_blocks(b, 4))


def test_bloom_head_is_a_copy_of_the_embeddings(fixtures):
    # llama.cpp's converter writes BLOOM's tied head as output.weight
    f = GGUFFile(fixtures / "bloom-q4_0.gguf")
    np.testing.assert_array_equal(f.tensors["output.weight"].data, f.tensors["token_embd.weight"].data)


def test_each_fixture_exercises_its_features(fixtures):
    bloom, mpt = load(fixtures, "bloom"), load(fixtures, "mpt")
    np.testing.assert_array_equal(bloom.layers[0].attn.spec.alibi_slopes, alibi_slopes(4, 8.0))
    np.testing.assert_array_equal(mpt.layers[0].attn.spec.alibi_slopes, alibi_slopes(4, 8.0))
    assert bloom.embd_norm is not None and bloom.pos_embd is None and bloom.layers[0].attn.rope is None
    assert all(b is None for L in mpt.layers
               for b in (L.attn.bq, L.attn.bk, L.attn.bv, L.attn.bo, L.ffn.b_up, L.ffn.b_down, L.attn_norm.bias))
    neox, seq, gptj = load(fixtures, "gptneox"), load(fixtures, "gptneox_seq"), load(fixtures, "gptj")
    assert neox.parallel_residual and not seq.parallel_residual and gptj.parallel_residual
    neox_rope, seq_rope, gptj_rope = (m.layers[0].attn.rope for m in (neox, seq, gptj))
    assert (neox_rope.n_dims, neox_rope.neox, seq_rope.n_dims) == (8, True, 16)  # head_dim 16
    assert (gptj_rope.n_dims, gptj_rope.neox) == (8, False)
    assert gptj.output_b is not None  # GPT-J's lm_head has a bias

    class Spy(NumpyBackend):
        def __init__(self):
            self.clamped = []

        def clamp(self, x, lo, hi):
            self.clamped.append(float(np.mean(np.abs(x) > hi)))
            return super().clamp(x, lo, hi)

    ids = np.load(fixtures / "mpt-ref-f32.npz")["ids"]
    spy = Spy()
    logits(load(fixtures, "mpt", backend=spy), ids)
    assert mpt.layers[0].attn.clamp == 2.0 and len(spy.clamped) == 6 and min(spy.clamped) > 0.05  # q, k, v per layer


def test_learned_positions_end_with_a_clear_error(fixtures):
    model = load(fixtures, "gpt2")
    cache = model.new_cache(1100)
    cache.n_past = 1024
    with pytest.raises(ContextOverflowError, match="1024 learned position"):
        model.forward(np.array([1]), cache)


def test_mpt_qk_layernorm_is_refused(fixtures, tmp_path):
    f = GGUFFile(fixtures / "mpt-f32.gguf")
    w = GGUFWriter(tmp_path / "m.gguf")
    for k in f.metadata:
        w.add(k, f.metadata[k], f.metadata.types[k], f.metadata.array_types.get(k))
    for t in f.tensors.values():
        w.add_tensor(t.name, t.data, t.type, t.shape)
    w.add_tensor("blk.0.attn_q_norm.weight", np.ones(64, np.float32))
    w.write()
    with pytest.raises(FormatError, match="attn_q_norm.*not supported"):
        build_model(GGUFFile(tmp_path / "m.gguf"), NumpyBackend())


def test_real_configs_get_llama_cpps_keys():
    # EleutherAI/pythia-70m (transformers 4.x keys)
    pythia = {"hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 6, "intermediate_size": 2048,
              "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000,
              "use_parallel_residual": True, "layer_norm_eps": 1e-5}
    kv = neox_hparams(pythia)
    assert kv["rope.dimension_count"] == 16 and kv["use_parallel_residual"] is True and "rope.freq_base" not in kv
    # mosaicml/mpt-7b: ALiBi, no clamp
    mpt7b = {"d_model": 4096, "n_heads": 32, "n_layers": 32, "expansion_ratio": 4, "max_seq_len": 2048,
             "attn_config": {"alibi": True, "alibi_bias_max": 8, "clip_qkv": None}}
    kv = mpt_hparams(mpt7b)
    assert kv["attention.max_alibi_bias"] == 8.0 and "attention.clamp_kqv" not in kv
    assert kv["feed_forward_length"] == 16384 and kv["attention.layer_norm_epsilon"] == 1e-5


@pytest.mark.parametrize("backend", [NumpyBackend(), None], ids=["numpy", "numba"])
@pytest.mark.parametrize("name", ["mpt", "gptneox", "gptneox_seq"])
def test_exact_gelu_is_what_matches_transformers(fixtures, name, backend):
    # MPT and Pythia-style GPT-NeoX (hidden_act "gelu") are trained with the exact erf GELU, and purelm
    # computes it: within 1e-4 of transformers (as in tests/test_models.py). The tanh form (llama.cpp's)
    # is ~1e-3 away on these 8x-scaled random models, so that bound tells the two apart.
    from purelm.backends.numba_backend import NumbaBackend

    ref = np.load(fixtures / f"{name}-ref-f32.npz")
    model = load(fixtures, name, backend=backend or NumbaBackend(2, int16_dot=False))
    assert all(L.ffn.act == "gelu_erf" for L in model.layers)
    assert np.abs(logits(model, ref["ids"]) - ref["logits"]).max() < 1e-4
    for L in model.layers:
        L.ffn.act = "gelu"
    assert 5e-4 < np.abs(logits(model, ref["ids"]) - ref["logits"]).max() < 5e-3
