"""Gemma, Gemma 2, Gemma 3: what tests/test_models.py does not show by itself — that the tiny fixtures
really exercise the sliding window, the soft-capping and Gemma 3's local/global ropes, and that the
converter writes llama.cpp's names and keys (adding its own keys only where llama.cpp's fixed choices
would be wrong)."""
import dataclasses

import numpy as np
import pytest

from purelm.backends.numpy_backend import NumpyBackend
from purelm.formats.gguf import GGUFFile
from purelm.formats.safetensors import Checkpoint
from purelm.models import build_model
from purelm.models.gemma import gemma2_hparams, gemma3_hparams, local_layers


def _model(fixtures, arch):
    return build_model(GGUFFile(fixtures / f"{arch}-f32.gguf"), NumpyBackend())


def _logits(model, ids):
    return model.forward(ids, model.new_cache(64), all_logits=True)


def _ref(fixtures, arch):
    ref = np.load(fixtures / f"{arch}-ref-f32.npz")
    # the prompt and the greedy tokens: 30 positions, past the 8-token window
    return np.concatenate([ref["ids"], ref["greedy"]])


def _changes(fixtures, arch, edit):
    """Max |logit change| when the model is edited: each feature must matter far beyond 1e-4."""
    ids = _ref(fixtures, arch)
    model = _model(fixtures, arch)
    base = _logits(model, ids)
    edit(model)
    return np.abs(_logits(model, ids) - base).max()


def _set_attn(model, **kw):
    for L in model.layers:
        L.attn.spec = dataclasses.replace(L.attn.spec, **kw)


def test_gemma2_features_are_exercised(fixtures):
    m = _model(fixtures, "gemma2")
    assert m.local == [True, False] and m.final_softcap == 2.0
    assert m.layers[0].attn.spec.window == 8 and m.layers[1].attn.spec.window is None
    assert _changes(fixtures, "gemma2", lambda m: _set_attn(m, window=None)) > 1e-2
    assert _changes(fixtures, "gemma2", lambda m: _set_attn(m, softcap=None)) > 1e-2
    assert _changes(fixtures, "gemma2", lambda m: setattr(m, "final_softcap", None)) > 1e-2


def test_gemma3_features_are_exercised(fixtures):
    m = _model(fixtures, "gemma3")
    assert m.local == [True, True, False]
    assert m.layers[0].attn.rope.base == 10000.0 and m.layers[0].attn.rope.freq_scale == 1.0
    assert m.layers[2].attn.rope.base == 1e6 and m.layers[2].attn.rope.freq_scale == 0.125

    def global_rope_everywhere(m):
        for L in m.layers:
            L.attn.rope = m.layers[2].attn.rope

    def no_rope_scaling(m):
        m.layers[2].attn.rope = dataclasses.replace(m.layers[2].attn.rope, freq_scale=1.0)

    assert _changes(fixtures, "gemma3", lambda m: _set_attn(m, window=None)) > 1e-2
    assert _changes(fixtures, "gemma3", global_rope_everywhere) > 1e-2
    assert _changes(fixtures, "gemma3", no_rope_scaling) > 1e-2


def test_gemma_has_no_window_or_caps(fixtures):
    m = _model(fixtures, "gemma")
    assert m.head_dim == 32 and m.n_kv_head == 1 and m.final_softcap is None
    assert all(L.attn.spec.window is None and L.attn.spec.softcap is None for L in m.layers)
    assert m.layers[0].attn.spec.scale == pytest.approx(32 ** -0.5)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_norms_are_stored_as_one_plus_w(fixtures, arch):
    # llama.cpp's converter adds 1 to every "*norm.weight" (Gemma's RMSNorm scales by 1 + w)
    ckpt, f = Checkpoint(fixtures / "hf" / arch), GGUFFile(fixtures / f"{arch}-q8_0.gguf")
    pairs = [("model.norm.weight", "output_norm.weight"),
             ("model.layers.1.input_layernorm.weight", "blk.1.attn_norm.weight")]
    if arch == "gemma":
        pairs += [("model.layers.1.post_attention_layernorm.weight", "blk.1.ffn_norm.weight")]
    else:
        pairs += [("model.layers.1.post_attention_layernorm.weight", "blk.1.post_attention_norm.weight"),
                  ("model.layers.1.pre_feedforward_layernorm.weight", "blk.1.ffn_norm.weight"),
                  ("model.layers.1.post_feedforward_layernorm.weight", "blk.1.post_ffw_norm.weight")]
    if arch == "gemma3":
        pairs += [("model.layers.1.self_attn.q_norm.weight", "blk.1.attn_q_norm.weight"),
                  ("model.layers.1.self_attn.k_norm.weight", "blk.1.attn_k_norm.weight")]
    for hf_name, name in pairs:
        np.testing.assert_array_equal(f.tensors[name].dequantize(), ckpt.get(hf_name) + np.float32(1))
    assert "output.weight" not in f.tensors  # tied embeddings


def test_converter_keys(fixtures):
    g2 = GGUFFile(fixtures / "gemma2-f16.gguf").metadata
    assert g2["gemma2.attn_logit_softcapping"] == 5.0 and g2["gemma2.final_logit_softcapping"] == 2.0
    assert g2["gemma2.attention.sliding_window"] == 8 and g2["gemma2.attention.key_length"] == 16
    # period 2 (llama.cpp's) and query_pre_attn_scalar == head_dim: nothing beyond llama.cpp's keys
    assert "gemma2.attention.sliding_window_pattern" not in g2 and "gemma2.attention.scale" not in g2
    g3 = GGUFFile(fixtures / "gemma3-f16.gguf").metadata
    assert g3["gemma3.rope.freq_base"] == 1e6 and g3["gemma3.rope.scaling.type"] == "linear"
    assert g3["gemma3.rope.scaling.factor"] == 8.0 and "gemma3.rope.freq_base_swa" not in g3
    # 3 layers local, local, global: llama.cpp's fixed period 6 would make all three local
    assert list(g3["gemma3.attention.sliding_window_pattern"]) == [True, True, False]


def test_layer_patterns_match_llama_cpp():
    assert local_layers(12, 6) == [True] * 5 + [False] + [True] * 5 + [False]
    assert local_layers(4, 2) == [True, False, True, False]
    assert local_layers(3, [1, 1, 0]) == [True, True, False]


def _hub_gemma3_4b():
    # google/gemma-3-4b-it's text config as on the Hub (transformers 4.x keys)
    return {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 131072, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
            "sliding_window_pattern": 6, "final_logit_softcapping": None, "attn_logit_softcapping": None}


def test_real_configs_get_exactly_llama_cpps_keys():
    kv = gemma3_hparams(_hub_gemma3_4b())
    assert kv["rope.freq_base"] == 1e6 and kv["rope.scaling.factor"] == 8.0
    assert kv["attention.sliding_window"] == 1024 and kv["attention.key_length"] == 256
    for extra in ("attention.sliding_window_pattern", "attention.scale", "rope.freq_base_swa",
                  "final_logit_softcapping", "attn_logit_softcapping"):
        assert extra not in kv
    # Gemma 2 27B: query_pre_attn_scalar = hidden / heads, which llama.cpp infers from its 46 layers
    g2_27b = {"hidden_size": 4608, "intermediate_size": 36864, "num_hidden_layers": 46, "num_attention_heads": 32,
              "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 144, "sliding_window": 4096,
              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "rope_theta": 10000.0}
    kv = gemma2_hparams(g2_27b)
    assert "attention.scale" not in kv and "attention.sliding_window_pattern" not in kv
    assert kv["attn_logit_softcapping"] == 50.0 and kv["final_logit_softcapping"] == 30.0
    # ... and a checkpoint llama.cpp's rule would get wrong says so explicitly
    assert gemma2_hparams({**g2_27b, "num_hidden_layers": 4})["attention.scale"] == pytest.approx(144 ** -0.5)


def test_transformers_reads_our_gguf(fixtures):
    # interchange: transformers' own GGUF loader maps our names back to the HF weights (norms included)
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    for arch in ("gemma2", "gemma3"):
        m = transformers.AutoModelForCausalLM.from_pretrained(fixtures, gguf_file=f"{arch}-f32.gguf",
                                                              dtype=torch.float32)
        ckpt, sd = Checkpoint(fixtures / "hf" / arch), m.state_dict()
        for name in ckpt.names():
            assert np.abs(sd[name].numpy() - ckpt.get(name)).max() < 1e-6, name


def test_bad_layer_pattern_is_named(fixtures, tmp_path):
    from purelm.errors import FormatError
    from purelm.formats.gguf import GGUFWriter

    f = GGUFFile(fixtures / "gemma3-f32.gguf")
    w = GGUFWriter(tmp_path / "m.gguf")
    for k in f.metadata:
        value = [True, False] if k == "gemma3.attention.sliding_window_pattern" else f.metadata[k]
        w.add(k, value, f.metadata.types[k], f.metadata.array_types.get(k))
    for t in f.tensors.values():
        w.add_tensor(t.name, t.data, t.type, t.shape)
    w.write()
    with pytest.raises(FormatError, match=r"sliding_window_pattern.*array of 2.*one bool per layer \(3\)"):
        build_model(GGUFFile(tmp_path / "m.gguf"), NumpyBackend())
