"""Falcon, Phi-2, Phi-3 and StableLM beyond the logit checks of tests/test_models.py: the converter writes
llama.cpp's names, keys and tensor layouts, each fixture exercises its architecture's features, Phi-3's
long rope factors match transformers, Falcon matches with the exact (erf) GELU, not the tanh form, and (where
llama-cpp-python is installed) llama.cpp itself computes the same logits from the same files."""
import math

import gguf
import numpy as np
import pytest
from conftest import llama_cpp_tensor_names, tensor_pattern

from purelm.backends.numpy_backend import NumpyBackend
from purelm.errors import PurelmError
from purelm.formats.gguf import GGUFFile, GGUFWriter
from purelm.formats.safetensors import Checkpoint
from purelm.models import build_model
from purelm.models import falcon, phi2, phi3, stablelm

# The {arch}.* keys llama.cpp's convert_hf_to_gguf.py writes for these configs.
BASE = {"context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
        "attention.head_count_kv"}
KEYS = {
    "falcon": BASE | {"tensor_data_layout", "attention.layer_norm_epsilon"},
    "phi2": BASE | {"attention.layer_norm_epsilon", "rope.dimension_count"},
    "phi3": BASE | {"rope.scaling.original_context_length", "attention.layer_norm_rms_epsilon",
                    "rope.dimension_count", "rope.freq_base", "attention.sliding_window"},
    "stablelm": BASE | {"rope.dimension_count", "use_parallel_residual", "attention.layer_norm_epsilon"},
}
FIXTURE_ARCH = {"falcon": "falcon", "falcon_mqa": "falcon", "phi2": "phi2", "phi3": "phi3",
                "phi3_longrope": "phi3", "stablelm": "stablelm", "stablelm_qknorm": "stablelm"}


def load(fixtures, name, qtype="f32", backend=None):
    return build_model(GGUFFile(fixtures / f"{name}-{qtype}.gguf"), backend or NumpyBackend())


def logits(model, ids, n_ctx=64):
    return model.forward(np.asarray(ids), model.new_cache(n_ctx), all_logits=True)


def hf_model(fixtures, name, **config):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    return transformers.AutoModelForCausalLM.from_pretrained(fixtures / "hf" / name, dtype=torch.float32,
                                                             **config).eval()


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


@pytest.mark.parametrize("name", sorted(FIXTURE_ARCH))
def test_names_and_keys_are_llama_cpps(fixtures, name):
    arch = FIXTURE_ARCH[name]
    r = gguf.GGUFReader(fixtures / f"{name}-q8_0.gguf")
    allowed = llama_cpp_tensor_names(arch)
    for t in r.tensors:
        assert tensor_pattern(t.name) in allowed, t.name
        if t.name.endswith("_norm.weight") or len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name  # llama.cpp keeps norms f32
    assert r.fields["general.architecture"].contents() == arch
    extra = {"rope.scaling.attn_factor"} if name == "phi3_longrope" else set()
    assert {k[len(arch) + 1:] for k in r.fields if k.startswith(arch + ".")} == KEYS[arch] | extra


@pytest.mark.parametrize("name", ["falcon", "falcon_mqa"])
def test_falcon_qkv_is_reordered_as_llama_cpp_does(fixtures, name):
    # llama.cpp's FalconModel.modify_tensors, in numpy: view (n_kv, group + 2, head_dim, dim), then all q,
    # all k, all v
    f, ckpt = GGUFFile(fixtures / f"{name}-f32.gguf"), Checkpoint(fixtures / "hf" / name)
    n_head, n_kv, hd = 4, (2 if name == "falcon" else 1), 16
    w = ckpt.get("transformer.h.1.self_attention.query_key_value.weight")
    qkv = w.reshape(n_kv, n_head // n_kv + 2, hd, 64)
    expected = np.concatenate([qkv[:, :-2].reshape(-1, 64), qkv[:, -2].reshape(-1, 64), qkv[:, -1].reshape(-1, 64)])
    np.testing.assert_array_equal(f.tensors["blk.1.attn_qkv.weight"].dequantize(), expected)
    assert f.metadata["falcon.attention.head_count_kv"] == n_kv


def test_stablelm_per_head_norms_are_stacked(fixtures):
    ckpt = Checkpoint(fixtures / "hf" / "stablelm_qknorm")
    for qtype in ("f32", "q4_0"):
        f = GGUFFile(fixtures / f"stablelm_qknorm-{qtype}.gguf")
        for part, name, n in (("q", "attn_q_norm", 4), ("k", "attn_k_norm", 2)):
            t = f.tensors[f"blk.1.{name}.weight"]
            assert t.shape == (n, 16) and t.type.name == "F32"
            heads = [ckpt.get(f"model.layers.1.self_attn.{part}_layernorm.norms.{h}.weight") for h in range(n)]
            np.testing.assert_array_equal(t.dequantize(), np.stack(heads))


def test_each_fixture_exercises_its_features(fixtures):
    fal, mqa = load(fixtures, "falcon"), load(fixtures, "falcon_mqa")
    assert (fal.n_kv_head, mqa.n_kv_head) == (2, 1)
    # Falcon-40B style: attention reads attn_norm_2 (ln_attn), the MLP attn_norm (ln_mlp); 7B: one norm
    assert all(L.ffn_norm is not None for L in fal.layers) and all(L.ffn_norm is None for L in mqa.layers)
    assert fal.output is fal.tok_embd  # tied
    p2 = load(fixtures, "phi2")
    rope = p2.layers[0].attn.rope
    assert (rope.n_dims, rope.neox) == (8, True) and p2.output_b is not None
    assert "blk.0.attn_qkv.weight" not in p2.gguf.tensors and p2.layers[0].attn.bq is not None
    p3, lr = load(fixtures, "phi3"), load(fixtures, "phi3_longrope")
    assert p3.layers[0].attn.spec.window == 16 and p3.rope_short.freq_factors is None
    assert "blk.0.attn_qkv.weight" in p3.gguf.tensors  # fused q|k|v and gate|up
    ids = np.load(fixtures / "phi3-ref-f32.npz")["ids"]
    assert len(ids) + 8 > 16  # the prompt and the greedy steps run past the window
    assert lr.layers[0].attn.spec.window is None and lr.rope_short.n_dims == 12 and lr.output is lr.tok_embd
    assert np.allclose(lr.rope_short.freq_factors, [1.0, 1.1, 1.3, 1.7, 2.5, 4.0])
    assert math.isclose(lr.rope_short.attn_factor, math.sqrt(1 + math.log(4) / math.log(64)), rel_tol=1e-6)
    assert lr.rope_long.freq_factors == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0) and lr.n_ctx_orig == 64
    s, q = load(fixtures, "stablelm"), load(fixtures, "stablelm_qknorm")
    assert s.layers[0].attn.rope.n_dims == 4
    assert all(L.attn.bq is not None and L.ffn_norm is not None for L in s.layers)
    assert all(L.attn.q_norm is not None and L.ffn_norm is None and L.attn.bq is None for L in q.layers)
    assert q.n_kv_head == 2


def test_phi3_window_and_rope_factors_matter(fixtures):
    # Switching off what the fixtures test moves the logits far past the 1e-4 tolerance.
    import dataclasses

    for name, edit in [("phi3", lambda m: setattr(m.layers[0].attn.spec, "window", None)),  # one spec: all layers
                       ("phi3_longrope", lambda m: setattr(m, "rope_short", dataclasses.replace(m.rope_short,
                                                                                             attn_factor=1.0))),
                       ("phi3_longrope", lambda m: setattr(m, "rope_short", m.rope_long))]:
        ref = np.load(fixtures / f"{name}-ref-f32.npz")
        model = load(fixtures, name)
        edit(model)
        assert np.abs(logits(model, ref["ids"]) - ref["logits"]).max() > 0.1


def test_phi3_long_factors_match_transformers(fixtures):
    # Past original_max_position_embeddings (64) transformers switches to the long factors for the whole
    # sequence; purelm (like llama.cpp) uses them when the context is longer than 64.
    hf = hf_model(fixtures, "phi3_longrope")
    ids = np.random.default_rng(0).integers(0, 320, 80)
    expected = hf_logits(hf, ids)
    model = load(fixtures, "phi3_longrope")
    assert np.abs(logits(model, ids, n_ctx=128) - expected).max() < 1e-4
    assert np.abs(logits(model, ids, n_ctx=80) - expected).max() < 1e-4
    short = hf_logits(hf, ids[:60])
    assert np.abs(logits(model, ids[:60], n_ctx=64) - short).max() < 1e-4


@pytest.mark.parametrize("name", ["falcon", "falcon_mqa"])
def test_falcon_exact_gelu_is_what_matches_transformers(fixtures, name):
    # Falcon checkpoints use the exact erf GELU (activation "gelu") and so does purelm: within 1e-4 of
    # transformers, where the tanh form (llama.cpp's) is ~1e-3 away on these 8x-scaled random models.
    ref = np.load(fixtures / f"{name}-ref-f32.npz")
    model = load(fixtures, name)
    assert all(L.ffn.act == "gelu_erf" for L in model.layers)
    assert np.abs(logits(model, ref["ids"]) - ref["logits"]).max() < 1e-4
    for L in model.layers:
        L.ffn.act = "gelu"
    assert 5e-4 < np.abs(logits(model, ref["ids"]) - ref["logits"]).max() < 5e-3


def test_unsupported_configs_are_refused():
    f40 = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "new_decoder_architecture": True,
           "num_kv_heads": 2}
    for bad in ({"alibi": True}, {"bias": True}, {"activation": "relu"}):
        with pytest.raises(PurelmError, match="not supported"):
            falcon.hparams({**f40, **bad})
    with pytest.raises(PurelmError, match="parallel_attn"):
        falcon.hparams({**f40, "new_decoder_architecture": False, "parallel_attn": False})
    with pytest.raises(PurelmError, match="qk_layernorm"):
        phi2.hparams({"hidden_size": 64, "num_attention_heads": 4, "qk_layernorm": True})
    with pytest.raises(PurelmError, match="yarn2"):
        phi3.hparams({"hidden_size": 64, "num_attention_heads": 4, "rope_scaling": {"type": "yarn2"}})


def test_real_configs_get_llama_cpps_keys():
    # tiiuae/falcon-7b as transformers saves it: num_kv_heads defaults to the head count, but the old
    # decoder is multi-query
    f7 = {"hidden_size": 4544, "num_attention_heads": 71, "num_kv_heads": 71, "num_hidden_layers": 32,
          "multi_query": True, "new_decoder_architecture": False, "parallel_attn": True, "bias": False,
          "alibi": False, "layer_norm_epsilon": 1e-5, "max_position_embeddings": 2048}
    kv = falcon.hparams(f7)
    assert kv["attention.head_count_kv"] == 1 and kv["feed_forward_length"] == 4 * 4544
    assert kv["tensor_data_layout"] == "jploski" and "rope.freq_base" not in kv
    f40 = {**f7, "hidden_size": 8192, "num_attention_heads": 128, "num_kv_heads": 8, "num_hidden_layers": 60,
           "new_decoder_architecture": True}
    assert falcon.hparams(f40)["attention.head_count_kv"] == 8
    # microsoft/phi-2
    p2 = {"hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 32, "num_key_value_heads": 32,
          "num_hidden_layers": 32, "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "layer_norm_eps": 1e-5,
          "max_position_embeddings": 2048, "hidden_act": "gelu_new", "qk_layernorm": False}
    kv = phi2.hparams(p2)
    assert kv["rope.dimension_count"] == 32 and kv["feed_forward_length"] == 10240 and set(kv) == KEYS["phi2"]
    # microsoft/Phi-3-mini-128k-instruct (rope_scaling longrope, 48 factors per list)
    p3 = {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32,
          "num_hidden_layers": 32, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 262144,
          "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}}
    kv = phi3.hparams(p3)
    assert kv["rope.dimension_count"] == 96 and kv["rope.scaling.original_context_length"] == 4096
    assert math.isclose(kv["rope.scaling.attn_factor"], math.sqrt(1 + math.log(32) / math.log(4096)))
    assert set(kv) == KEYS["phi3"] | {"rope.scaling.attn_factor"}
    assert [n for n, _, _ in phi3.extra_tensors(None, p3)] == ["rope_factors_long.weight", "rope_factors_short.weight"]
    # microsoft/Phi-3-mini-4k-instruct: no factors, window 2047
    kv = phi3.hparams({**p3, "max_position_embeddings": 4096, "sliding_window": 2047, "rope_scaling": None})
    assert kv["attention.sliding_window"] == 2047 and "rope.scaling.attn_factor" not in kv
    # stabilityai/stablelm-2-1_6b
    s2 = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 32,
          "num_hidden_layers": 24, "partial_rotary_factor": 0.25, "rope_theta": 10000, "use_qkv_bias": True,
          "use_parallel_residual": False, "layer_norm_eps": 1e-5, "max_position_embeddings": 4096}
    kv = stablelm.hparams(s2)
    assert kv["rope.dimension_count"] == 16 and kv["use_parallel_residual"] is False and set(kv) == KEYS["stablelm"]


def _renamed(src, dst):
    # llama.cpp applies Phi-3 tokenizer fix-ups (looking up "</s>") when general.name contains "phi3"
    f = GGUFFile(src)
    w = GGUFWriter(dst)
    for k in f.metadata:
        w.add(k, "tiny" if k == "general.name" else f.metadata[k], f.metadata.types[k], f.metadata.array_types.get(k))
    for t in f.tensors.values():
        w.add_tensor(t.name, t.data, t.type, t.shape)
    w.write()
    return dst


# llama.cpp computes GELU in the tanh form through a float16 lookup table (~2e-3 here on these 8x-scaled
# models), and Falcon's checkpoints use the exact form (~1e-3 more); the others agree to float rounding.
# llama.cpp disables Phi-3's sliding window: compared before it applies.
LLAMA_CPP_TOL = {"falcon": 5e-3, "falcon_mqa": 5e-3, "phi2": 5e-3}


@pytest.mark.parametrize("name", sorted(FIXTURE_ARCH))
def test_llama_cpp_computes_the_same_logits(fixtures, tmp_path, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = np.load(fixtures / f"{name}-ref-f32.npz")
    ids = ref["ids"].tolist() + ref["greedy"].tolist()
    path = _renamed(fixtures / f"{name}-f32.gguf", tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0, flash_attn=False)  # f32 KV cache
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    model = load(fixtures, name)
    ours = logits(model, ids, n_ctx=llm.n_ctx())  # llama.cpp pads the context (phi3_longrope: long factors)
    n = 16 if name == "phi3" else len(ids)
    assert np.abs(ours[:n] - theirs[:n]).max() < LLAMA_CPP_TOL.get(name, 1e-4)
