"""Mixture-of-experts models (Qwen3-MoE, Mixtral as GGUF `llama`, OLMoE) beyond the logit checks of
tests/test_models.py, test_batch.py and test_torch_backend.py (which cover every fixture): the converter
writes llama.cpp's names, keys and 3-D expert layout (from per-expert or fused checkpoints), one MoE layer
equals transformers' sparse MoE block, the router follows llama.cpp's rule, experts no token picks are
never repacked, and corrupt expert metadata is refused."""
import json
import shutil

import gguf
import numpy as np
import pytest
from conftest import llama_cpp_tensor_names, tensor_pattern

from purelm.backends.numba_backend import NumbaBackend, NumbaWeight
from purelm.backends.numpy_backend import NumpyBackend
from purelm.convert import convert
from purelm.errors import FormatError, PurelmError
from purelm.formats.gguf import GGUFFile, GGUFWriter
from purelm.formats.safetensors import Checkpoint
from purelm.models import build_model, llama, olmoe, qwen3moe
from purelm.models.experts import Experts

FIXTURE_ARCH = {"qwen3moe": "qwen3moe", "mixtral": "llama", "olmoe": "olmoe"}
BASE = {"context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
        "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "expert_count",
        "expert_used_count"}
# the {arch}.* keys llama.cpp's convert_hf_to_gguf.py writes for these configs
KEYS = {"qwen3moe": BASE | {"attention.key_length", "attention.value_length", "expert_feed_forward_length"},
        "mixtral": BASE | {"rope.dimension_count"}, "olmoe": BASE}
HF_EXPERTS = {"qwen3moe": ("model.layers.{i}.mlp.experts.{e}.{m}.weight", ("gate_proj", "up_proj", "down_proj")),
              "olmoe": ("model.layers.{i}.mlp.experts.{e}.{m}.weight", ("gate_proj", "up_proj", "down_proj")),
              "mixtral": ("model.layers.{i}.block_sparse_moe.experts.{e}.{m}.weight", ("w1", "w3", "w2"))}


def load(fixtures, name, qtype="f32", backend=None):
    return build_model(GGUFFile(fixtures / f"{name}-{qtype}.gguf"), backend or NumpyBackend())


@pytest.mark.parametrize("name", sorted(FIXTURE_ARCH))
def test_names_keys_and_expert_layout_are_llama_cpps(fixtures, name):
    arch = FIXTURE_ARCH[name]
    r = gguf.GGUFReader(fixtures / f"{name}-q8_0.gguf")
    allowed = llama_cpp_tensor_names(arch)
    for t in r.tensors:
        assert tensor_pattern(t.name) in allowed, t.name
        if t.name.endswith("_norm.weight") or len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
    assert r.fields["general.architecture"].contents() == arch
    assert {k[len(arch) + 1:] for k in r.fields if k.startswith(arch + ".")} == KEYS[name]
    # ggml's ne (gguf-py's shape): {n_embd, n_ff, n_expert} for gate/up, {n_ff, n_embd, n_expert} for down
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == (64, 32, 4)
    assert shapes["blk.1.ffn_down_exps.weight"] == (32, 64, 4) and shapes["blk.1.ffn_gate_inp.weight"] == (64, 4)
    # each expert's matrices are HF's, stacked in expert order
    f, ckpt = GGUFFile(fixtures / f"{name}-f32.gguf"), Checkpoint(fixtures / "hf" / name)
    pattern, hf_names = HF_EXPERTS[name]
    for part, hf in zip(("gate", "up", "down"), hf_names):
        stacked = f.tensors[f"blk.1.ffn_{part}_exps.weight"].dequantize()
        for e in range(4):
            np.testing.assert_array_equal(stacked[e], ckpt.get(pattern.format(i=1, e=e, m=hf)))


def test_fused_checkpoints_convert_to_the_same_file(fixtures, tmp_path):
    # transformers >= 5 holds experts as gate_up_proj (E, 2·n_ff, dim) and down_proj (E, dim, n_ff);
    # llama.cpp's converter splits gate_up_proj in halves, and so does purelm's
    from test_convert import write_safetensors  # no safetensors package among the test dependencies

    src = fixtures / "hf" / "qwen3moe"
    ckpt = Checkpoint(src)
    hf = tmp_path / "fused"
    shutil.copytree(src, hf, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {n: ckpt.get(n) for n in ckpt.names() if ".experts." not in n}
    for i in range(2):
        get = lambda m: np.stack([ckpt.get(f"model.layers.{i}.mlp.experts.{e}.{m}.weight") for e in range(4)])  # noqa: E731
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([get("gate_proj"), get("up_proj")], 1)
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = get("down_proj")
    write_safetensors(hf / "model.safetensors", tensors)
    convert(hf, tmp_path / "fused.gguf", "f32")
    want, got = GGUFFile(fixtures / "qwen3moe-f32.gguf"), GGUFFile(tmp_path / "fused.gguf")
    assert set(want.tensors) == set(got.tensors)
    for n, t in want.tensors.items():
        np.testing.assert_array_equal(got.tensors[n].data, t.data, err_msg=n)


@pytest.mark.parametrize("name", ["qwen3moe", "olmoe", "mixtral"])
def test_one_layer_equals_transformers_sparse_moe_block(fixtures, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(fixtures / "hf" / name, dtype=torch.float32).eval()
    block = hf.model.layers[1].mlp
    x = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32) * 4
    with torch.no_grad():
        out = block(torch.from_numpy(x)[None])
    want = (out[0] if isinstance(out, tuple) else out)[0].numpy()
    for backend in (NumpyBackend(), NumbaBackend(1, int16_dot=False)):
        layer = load(fixtures, name, backend=backend).layers[1].ffn
        assert isinstance(layer, Experts) and layer.normalize == (name != "olmoe")
        got = layer(x)
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
        # the renormalization matters: switched, the layer is far off
        layer.normalize = not layer.normalize
        assert np.abs(layer(x) - want).max() > 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("backend", [NumpyBackend(), NumbaBackend(1)], ids=["numpy", "numba"])
def test_router_follows_llama_cpps_rule(backend):
    # build_moe_ffn: probs = softmax (or sigmoid) of the logits, top-k of probs, weights = the picked
    # probs, divided by their sum (clamped below at 6.1e-5) where the family normalizes
    logits = np.array([[2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.1, -0.1], [-40, -41, -42, -43]], np.float32)
    layer = Experts(backend, None, [], [], n_used=2)
    top, w = layer.route(logits)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert top.tolist() == [[3, 0], [2, 0], [0, 1]]
    np.testing.assert_allclose(w, np.take_along_axis(p, top, 1) / np.take_along_axis(p, top, 1).sum(1, keepdims=True),
                               rtol=1e-6)
    layer.normalize = False
    np.testing.assert_allclose(layer.route(logits)[1], np.take_along_axis(p, top, 1), rtol=1e-6)
    layer.gating, layer.normalize = "sigmoid", True
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    top, w = layer.route(logits)
    assert top.tolist() == [[3, 0], [2, 0], [0, 1]]
    picked = np.take_along_axis(s, top, 1)
    np.testing.assert_allclose(w, picked / np.maximum(picked.sum(1, keepdims=True), 6.103515625e-5), rtol=1e-5)


@pytest.mark.parametrize("gating,normalize", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_numba_router_picks_as_the_reference_and_alone_as_in_a_batch(gating, normalize):
    # numba routes with one compiled kernel a row at a time: the numpy reference's experts (ties to the
    # lower expert), its weights to float32 rounding, and each row's bits whatever rows share the call
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 60)) * 3).astype(np.float32)
    logits[0, [5, 9, 40]] = logits[0].max() + 1  # a three-way tie at the top
    logits[1] = 0.5  # all equal
    want_top, want_w = NumpyBackend().route(logits, 8, gating, normalize)
    numba = NumbaBackend(1)
    top, w = numba.route(logits, 8, gating, normalize)
    assert top.tolist() == want_top.tolist() and top[0, :3].tolist() == [5, 9, 40] and top[1].tolist() == list(range(8))
    np.testing.assert_allclose(w, want_w, rtol=2e-6)
    assert w.dtype == np.float32
    for t in (0, 17, 63):
        alone = numba.route(logits[t:t + 1], 8, gating, normalize)
        assert alone[0].tolist() == top[t:t + 1].tolist() and alone[1].tobytes() == w[t:t + 1].tobytes()
    with pytest.raises(PurelmError):
        numba.route(logits, 61, gating, normalize)


def test_experts_are_repacked_on_first_use_only(fixtures):
    # numba repacks a pair of expert matrices when a token first picks that expert: the others stay
    # views of the file's rows, never read
    model = load(fixtures, "qwen3moe", "q4_0", NumbaBackend(1))
    experts = [L.ffn for L in model.layers]
    for layer in experts:
        for w in layer.gate_up + layer.down:
            assert isinstance(w, NumbaWeight) and w.packed is None and w.pack_later
    picked = []
    for layer in experts:
        route = layer.route
        layer.route = lambda logits, route=route: picked.append(route(logits)[0]) or route(logits)
    model.forward(np.array([5]), model.new_cache(8))
    for layer, top in zip(experts, picked):
        used = set(top.reshape(-1).tolist())
        assert len(used) == 2
        for e in range(4):
            assert (layer.gate_up[e].packed is not None) == (e in used)
            assert (layer.down[e].packed is not None) == (e in used)
        # an expert's pair is one matrix of gate rows then up rows, a view of nothing but its own rows
        e = min(used)
        assert layer.gate_up[e].splits == (32, 32)


def _edited(src, dst, **changes):
    f = GGUFFile(src)
    w = GGUFWriter(dst)
    for k in f.metadata:
        w.add(k, changes.get(k, f.metadata[k]), f.metadata.types[k], f.metadata.array_types.get(k))
    for t in f.tensors.values():
        w.add_tensor(t.name, t.data, t.type, t.shape)
    w.write()
    return dst


@pytest.mark.parametrize("key, value, match", [
    ("qwen3moe.expert_used_count", 5, r"expert_used_count.*is 5.*\[1, 4\]"),
    ("qwen3moe.expert_count", 0, r"expert_count.*is 0"),
    ("qwen3moe.expert_count", 8, r"ffn_gate_inp.*shape \(4, 64\), expected \(8, 64\)"),
    ("qwen3moe.expert_feed_forward_length", 48, r"ffn_gate_exps.*expected \(4, 48, 64\)"),
])
def test_corrupt_expert_metadata_is_refused(fixtures, tmp_path, key, value, match):
    path = _edited(fixtures / "qwen3moe-q8_0.gguf", tmp_path / "m.gguf", **{key: value})
    with pytest.raises(FormatError, match=match):
        build_model(GGUFFile(path), NumpyBackend())


def test_configs_llama_cpp_would_run_differently_are_refused():
    q = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
         "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}
    for bad in ({"norm_topk_prob": False}, {"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}):
        with pytest.raises(PurelmError, match="not supported"):
            qwen3moe.hparams({**q, **bad})
    for bad in ({"norm_topk_prob": True}, {"clip_qkv": 8.0}):
        with pytest.raises(PurelmError, match="not supported"):
            olmoe.hparams({**q, "norm_topk_prob": False, **bad})


def test_real_configs_get_llama_cpps_keys():
    # Qwen/Qwen3-30B-A3B
    q = {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
         "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48, "num_experts": 128,
         "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
         "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960}
    kv = qwen3moe.hparams(q)
    assert set(kv) == KEYS["qwen3moe"]
    assert (kv["expert_count"], kv["expert_used_count"], kv["expert_feed_forward_length"]) == (128, 8, 768)
    assert kv["attention.key_length"] == 128 and kv["feed_forward_length"] == 6144
    # allenai/OLMoE-1B-7B-0924
    o = {"hidden_size": 2048, "intermediate_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 16,
         "num_hidden_layers": 16, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
         "clip_qkv": None, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
    kv = olmoe.hparams(o)
    assert set(kv) == KEYS["olmoe"] and (kv["expert_count"], kv["expert_used_count"]) == (64, 8)
    # mistralai/Mixtral-8x7B-v0.1
    m = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
         "num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6,
         "rms_norm_eps": 1e-5, "max_position_embeddings": 32768}
    kv = llama.hparams(m)
    assert set(kv) == KEYS["mixtral"] and (kv["expert_count"], kv["expert_used_count"]) == (8, 2)
    assert kv["feed_forward_length"] == 14336  # each expert's width, as llama.cpp reads it


def test_mixtral_layers_pick_the_experts_by_their_router(fixtures):
    m = load(fixtures, "mixtral")
    assert all(isinstance(L.ffn, Experts) and L.ffn.n_used == 2 and len(L.ffn.down) == 4 for L in m.layers)
    assert m.rope_neox is False  # GGUF llama: q/k permuted as for any LLaMA
    cfg = json.loads((fixtures / "hf" / "mixtral" / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_fused_decode_has_the_per_expert_kernels_bits(fixtures, qtype):
    # numba multiplies one token's picked experts in one kernel call per stack (numba_kernels/experts.py):
    # the same work items as each expert's own kernel, so the same bits as the generic loop of glu/linear
    from purelm.backends.base import Backend
    from purelm.backends.numba_backend import _fusable

    ops = NumbaBackend(1)
    layer = load(fixtures, "qwen3moe", qtype, ops).layers[0].ffn
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.standard_normal((1, 64)).astype(np.float32) * 3
        picks = np.sort(rng.choice(4, 2, replace=False))
        w = rng.random(2).astype(np.float32)
        got = ops.expert_ffn(x, layer.gate_up, layer.down, picks, w, "silu")
        assert all(_fusable(layer.gate_up[e]) and _fusable(layer.down[e]) for e in picks)
        want = Backend.expert_ffn(ops, x, layer.gate_up, layer.down, picks, w, "silu")
        np.testing.assert_array_equal(got, want)
        # and both near the reference backend's float products
        ref = load(fixtures, "qwen3moe", qtype).layers[0].ffn
        assert np.abs(got - NumpyBackend().expert_ffn(x, ref.gate_up, ref.down, picks, w, "silu")).max() < 0.05 * np.abs(got).max()


@pytest.mark.parametrize("name", sorted(FIXTURE_ARCH))
def test_llama_cpp_computes_the_same_logits(fixtures, name):
    # f32: llama.cpp's own qwen3moe / llama-with-experts / olmoe graphs (build_moe_ffn) on purelm's files
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = np.load(fixtures / f"{name}-ref-f32.npz")
    ids = ref["ids"].tolist() + ref["greedy"].tolist()
    llm = llama_cpp.Llama(model_path=str(fixtures / f"{name}-f32.gguf"), n_ctx=64, n_batch=64, logits_all=True,
                          verbose=False, n_threads=1, type_k=0, type_v=0, flash_attn=False)  # f32 KV cache
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    model = load(fixtures, name)
    ours = model.forward(np.asarray(ids), model.new_cache(llm.n_ctx()), all_logits=True)
    assert np.abs(ours - theirs).max() < 1e-4
