"""Qwen3, OLMo 2, SmolLM3, Llama 3.x rope scaling, Phi-4 and Mistral Nemo beyond the logit checks of
tests/test_models.py and tests/test_torch_backend.py (which cover every fixture on every backend): the
converter writes what llama.cpp's own converter writes for the same checkpoints (run here when its
sources are present), each fixture exercises its architecture's features and switching a feature off
breaks the match with transformers, the llama3 rope factors are transformers' frequencies, and (where
llama-cpp-python is installed) llama.cpp itself computes the same logits from the same files."""
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import LLAMA_CPP, llama_cpp_tensor_names, rewrite_gguf, tensor_pattern

from purelm.backends.numpy_backend import NumpyBackend
from purelm.convert import convert
from purelm.convert_spec import llama3_rope_factors
from purelm.errors import FormatError, PurelmError
from purelm.formats.gguf import GGUFFile
from purelm.models import build_model, olmo2, qwen3, smollm3

FIXTURE_ARCH = {"qwen3": "qwen3", "olmo2": "olmo2", "smollm3": "smollm3", "llama3rope": "llama", "phi4": "phi3",
                "nemo": "llama"}
BASE = {"context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
        "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon"}
# The {arch}.* keys llama.cpp's convert_hf_to_gguf.py writes for these configs (the LLaMA ones: what
# purelm's llama converter writes, which leaves out llama.cpp's redundant vocab_size and equal key lengths)
KEYS = {
    "qwen3": BASE | {"attention.key_length", "attention.value_length"},
    "olmo2": BASE,
    "smollm3": BASE | {"vocab_size", "rope.dimension_count"},
    "llama3rope": BASE | {"rope.dimension_count"},
    "phi4": BASE | {"rope.scaling.original_context_length", "rope.dimension_count", "attention.sliding_window"},
    "nemo": BASE | {"rope.dimension_count", "attention.key_length", "attention.value_length"},
}


def load(fixtures, name, qtype="f32"):
    return build_model(GGUFFile(fixtures / f"{name}-{qtype}.gguf"), NumpyBackend())


def logits(model, ids, n_ctx=64):
    return model.forward(np.asarray(ids), model.new_cache(n_ctx), all_logits=True)


def ref_gap(fixtures, name, edit):
    """How far the f32 fixture's logits move from transformers' after `edit(model)`."""
    ref = np.load(fixtures / f"{name}-ref-f32.npz")
    model = load(fixtures, name)
    edit(model)
    return float(np.abs(logits(model, ref["ids"]) - ref["logits"]).max())


@pytest.mark.parametrize("name", sorted(FIXTURE_ARCH))
def test_names_and_keys_are_llama_cpps(fixtures, name):
    arch = FIXTURE_ARCH[name]
    r = gguf.GGUFReader(fixtures / f"{name}-q4_0.gguf")
    allowed = llama_cpp_tensor_names(arch)
    for t in r.tensors:
        assert tensor_pattern(t.name) in allowed, t.name
        if t.name.endswith("_norm.weight") or len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name  # llama.cpp keeps norms f32
    assert r.fields["general.architecture"].contents() == arch
    assert {k[len(arch) + 1:] for k in r.fields if k.startswith(arch + ".")} == KEYS[name]


# llama.cpp's converter with its vocabulary step skipped: the tiny fixtures' tokenizer is not in its table
# of known pre-tokenizers, and the vocabulary is not what is compared here
REF_CONVERT = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion
get = conversion.get_model_class
def no_vocab(*a, **k):
    cls = get(*a, **k)
    cls.set_vocab = lambda self: None
    return cls
conversion.get_model_class = no_vocab
for hf, out in zip(sys.argv[2::2], sys.argv[3::2]):
    sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", "f32"]
    runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def test_llama_cpps_converter_writes_the_same_files(fixtures, tmp_path):
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").exists():
        pytest.skip(f"llama.cpp's sources are not at {LLAMA_CPP} (set PURELM_LLAMA_CPP_DIR)")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    names = sorted(FIXTURE_ARCH)
    args = [str(a) for n in names for a in (fixtures / "hf" / n, tmp_path / f"{n}.gguf")]
    script = tmp_path / "ref_convert.py"
    script.write_text(REF_CONVERT)
    run = subprocess.run([sys.executable, str(script), str(LLAMA_CPP), *args], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for n in names:
        theirs, ours = gguf.GGUFReader(tmp_path / f"{n}.gguf"), gguf.GGUFReader(fixtures / f"{n}-f32.gguf")
        arch = FIXTURE_ARCH[n]
        assert ours.fields["general.architecture"].contents() == theirs.fields["general.architecture"].contents()
        kv = [{k: r.fields[k].contents() for k in r.fields if k.startswith(arch + ".")} for r in (theirs, ours)]
        if arch == "llama":  # purelm's llama converter leaves out what llama.cpp reads the same way when absent
            dim = kv[0][f"{arch}.embedding_length"] // kv[0][f"{arch}.attention.head_count"]
            assert kv[0].pop(f"{arch}.vocab_size") == 320
            for k in ("key_length", "value_length"):
                if f"{arch}.attention.{k}" not in kv[1]:
                    assert kv[0].pop(f"{arch}.attention.{k}") == dim
        assert kv[1] == kv[0], n
        tensors = [{t.name: t for t in r.tensors} for r in (theirs, ours)]
        assert set(tensors[1]) == set(tensors[0]), n
        for name, t in tensors[0].items():
            mine = tensors[1][name]
            assert list(mine.shape) == list(t.shape) and mine.tensor_type == t.tensor_type, (n, name)
            np.testing.assert_array_equal(np.asarray(mine.data), np.asarray(t.data), err_msg=f"{n} {name}")
        # and purelm runs llama.cpp's file as it runs its own
        ref = np.load(fixtures / f"{n}-ref-f32.npz")
        model = build_model(GGUFFile(tmp_path / f"{n}.gguf"), NumpyBackend())
        assert np.abs(logits(model, ref["ids"]) - ref["logits"]).max() < 1e-4


def test_each_fixture_exercises_its_features(fixtures):
    q = load(fixtures, "qwen3")
    assert (q.head_dim, q.dim // q.n_head, q.n_kv_head) == (16, 8, 2) and q.output is q.tok_embd
    assert all(L.attn.q_norm is not None and L.attn.k_norm is not None and L.attn.bq is None for L in q.layers)
    assert q.layers[0].attn.rope.neox
    o = load(fixtures, "olmo2")
    assert all(L.attn_norm is None and L.ffn_norm is None and L.post_attn_norm is not None
               and L.post_ffn_norm is not None for L in o.layers)
    assert o.gguf.tensors["blk.0.attn_q_norm.weight"].shape == (32,)  # over all 4 heads
    assert o.gguf.tensors["blk.0.attn_k_norm.weight"].shape == (16,)  # over the 2 kv heads
    s = load(fixtures, "smollm3")
    assert [L.attn.rope is not None for L in s.layers] == [True, True, True, False] and s.output is s.tok_embd
    assert not s.layers[0].attn.rope.neox
    lr = load(fixtures, "llama3rope")
    factors = np.asarray(lr.layers[0].attn.rope.freq_factors)
    assert factors[0] == 1.0 and 2.0 < factors[1] < 3.0 and (factors[2:] == 8.0).all()  # all three bands
    p4 = load(fixtures, "phi4")
    assert p4.layers[0].attn.spec.window is None and (p4.n_head, p4.n_kv_head) == (4, 1)
    assert p4.rope_short.freq_factors is None and p4.rope_short.base == 250000.0
    n = load(fixtures, "nemo")
    assert (n.head_dim, n.dim // n.n_head) == (16, 8) and n.layers[0].attn.rope.n_dims == 16
    assert n.gguf.tensors["blk.0.attn_output.weight"].shape == (32, 64)  # Wo: heads · head_dim -> width


def test_switching_a_feature_off_breaks_the_match(fixtures):
    import dataclasses

    def no_qk_norms(m):
        for L in m.layers:
            L.attn.q_norm = L.attn.k_norm = None

    def rope_everywhere(m):
        m.layers[3].attn.rope = m.layers[0].attn.rope

    def no_llama3_factors(m):
        rope = dataclasses.replace(m.layers[0].attn.rope, freq_factors=None)
        for L in m.layers:
            L.attn.rope = rope

    def per_head_olmo_norms(m):  # the same weights applied per head (Qwen3's way) instead of over q and k
        from purelm.models.layers import HeadNorm, Norm
        for L in m.layers:
            for part in ("q_norm", "k_norm"):
                w = getattr(L.attn, part).norm.weight[:m.head_dim]
                setattr(L.attn, part, HeadNorm(Norm(m.ops, True, m.eps, w)))

    for name, edit in [("qwen3", no_qk_norms), ("olmo2", no_qk_norms), ("olmo2", per_head_olmo_norms),
                       ("smollm3", rope_everywhere), ("llama3rope", no_llama3_factors)]:
        assert ref_gap(fixtures, name, lambda m: None) < 1e-4
        assert ref_gap(fixtures, name, edit) > 0.01, (name, edit.__name__)


LLAMA31_8B = {"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
LLAMA32_1B = {"hidden_size": 2048, "num_attention_heads": 32, "head_dim": 64, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}


@pytest.mark.parametrize("cfg", [LLAMA31_8B, LLAMA32_1B], ids=["llama3.1-8b", "llama3.2-1b"])
def test_llama3_factors_give_transformers_frequencies(cfg):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")},
                                      rope_parameters={**cfg["rope_scaling"], "rope_theta": cfg["rope_theta"]})
    inv, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    factors = llama3_rope_factors(cfg)
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert factors.shape == (dim // 2,) and factors.dtype == np.float32 and attention_factor == 1.0
    base = cfg["rope_theta"] ** (-np.arange(0, dim, 2) / dim)
    np.testing.assert_allclose(base / factors, inv.numpy(), rtol=2e-6)


def test_llama_converter_writes_rope_freqs(fixtures, tmp_path):
    # the registered LlamaForCausalLM converter (not a patched one) writes the factors the fixture holds
    out = convert(fixtures / "hf" / "llama3rope", tmp_path / "m.gguf", "f32")
    f = GGUFFile(out)
    assert "rope_freqs.weight" in f.tensors, "LlamaForCausalLM's ConvertSpec needs extra_tensors=rope_freqs_tensor"
    expected = GGUFFile(fixtures / "llama3rope-f32.gguf").tensors["rope_freqs.weight"].dequantize()
    np.testing.assert_array_equal(f.tensors["rope_freqs.weight"].dequantize(), expected)
    # and a plain llama writes none
    out = convert(fixtures / "hf" / "llama", tmp_path / "plain.gguf", "f32")
    assert "rope_freqs.weight" not in GGUFFile(out).tensors


def test_unsupported_configs_are_refused():
    base = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 4,
            "vocab_size": 320}
    with pytest.raises(PurelmError, match="no_rope_layers"):
        smollm3.hparams({**base, "no_rope_layers": [1, 1, 0, 1]})
    with pytest.raises(PurelmError, match="sliding_window"):
        smollm3.hparams({**base, "use_sliding_window": True, "sliding_window": 8})
    with pytest.raises(PurelmError, match="sliding_window"):
        qwen3.hparams({**base, "use_sliding_window": True})
    with pytest.raises(PurelmError, match="'yarn' is not supported"):
        qwen3.hparams({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(PurelmError, match="'llama3' is not supported"):
        smollm3.hparams({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(PurelmError, match="OLMo 3"):
        olmo2.hparams({**base, "sliding_window": 4096})
    with pytest.raises(PurelmError, match="tie_word_embeddings"):
        olmo2.hparams({**base, "tie_word_embeddings": True})
    for bad in ({"low_freq_factor": 4.0}, {"factor": -1.0}, {"original_max_position_embeddings": "x"}):
        with pytest.raises(PurelmError, match="llama3"):
            llama3_rope_factors({**LLAMA31_8B, "rope_scaling": {**LLAMA31_8B["rope_scaling"], **bad}})
    assert smollm3.hparams({**base, "no_rope_layers": [1, 1, 1, 0]})["rope.dimension_count"] == 16


def test_olmo3_style_files_are_refused(fixtures, tmp_path):
    bad = rewrite_gguf(fixtures / "olmo2-q4_0.gguf", tmp_path / "swa.gguf",
                       meta={"olmo2.attention.sliding_window": 4096})
    with pytest.raises(FormatError, match="sliding_window"):
        build_model(GGUFFile(bad), NumpyBackend())


def test_real_configs_get_llama_cpps_keys():
    # Qwen/Qwen3-0.6B
    q = {"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 8,
         "head_dim": 128, "num_hidden_layers": 28, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
         "rope_theta": 1000000, "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
         "tie_word_embeddings": True}
    kv = qwen3.hparams(q)
    assert kv["attention.key_length"] == 128 and kv["rope.freq_base"] == 1e6 and set(kv) == KEYS["qwen3"]
    # allenai/OLMo-2-1124-7B
    o = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
         "num_hidden_layers": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 500000,
         "rope_scaling": None, "tie_word_embeddings": False}
    assert set(olmo2.hparams(o)) == KEYS["olmo2"]
    # HuggingFaceTB/SmolLM3-3B
    s = {"hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16, "num_key_value_heads": 4,
         "num_hidden_layers": 36, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "rope_theta": 5000000.0,
         "rope_scaling": None, "vocab_size": 128256, "no_rope_layer_interval": 4, "use_sliding_window": False,
         "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)]}
    kv = smollm3.hparams(s)
    assert kv["rope.dimension_count"] == 128 and set(kv) == KEYS["smollm3"]


@pytest.mark.parametrize("name", sorted(FIXTURE_ARCH))
def test_llama_cpp_computes_the_same_logits(fixtures, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = np.load(fixtures / f"{name}-ref-f32.npz")
    ids = ref["ids"].tolist() + ref["greedy"].tolist()
    llm = llama_cpp.Llama(model_path=str(fixtures / f"{name}-f32.gguf"), n_ctx=64, n_batch=64, logits_all=True,
                          verbose=False, n_threads=1, type_k=0, type_v=0, flash_attn=False)  # f32 KV cache
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    ours = logits(load(fixtures, name), ids, n_ctx=llm.n_ctx())
    assert np.abs(ours - theirs).max() < 1e-4
