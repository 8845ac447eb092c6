"""The torch backend: every architecture's unchanged model code on torch's CPU device (CI) or on CUDA
(PURELM_TEST_DEVICE=cuda, benchmarks/gpu_check.sh), against the numpy reference backend; the packed
planes against gguf.quants; the Triton kernels (Triton's interpreter without a GPU) against float64
products; SmolLM2's greedy text against the numba backend's."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs PyTorch: pip install 'purelm[torch]'")

from conftest import FIXTURES  # noqa: E402
from batchlib import SCRIPT, alone, batched, tokens  # noqa: E402

from purelm.backends import get_backend  # noqa: E402
from purelm.backends.numpy_backend import NumpyBackend  # noqa: E402
from purelm.backends.torch_backend import TorchBackend  # noqa: E402
from purelm.backends.torch_backend.packed import LAYOUTS, dequantize, pack  # noqa: E402
from purelm.errors import PurelmError, ShapeError, UsageError  # noqa: E402
from purelm.formats.gguf import GGUFFile  # noqa: E402
from purelm.models import build_model  # noqa: E402
from purelm.quant.types import BLOCK_INFO, GGMLType  # noqa: E402

DEVICE = os.environ.get("PURELM_TEST_DEVICE", "cpu")
if DEVICE == "cpu":  # the Triton kernels run in Triton's interpreter (read when a kernel is defined)
    os.environ["TRITON_INTERPRET"] = "1"
ARCHS = sorted(p.name.split("-ref-")[0] for p in FIXTURES.glob("*-ref-f32.npz"))
TYPES = ["f32", "f16", "q8_0", "q4_0"]


def torch_backend(triton=False):
    """fp32 on the test device; the Triton kernels only where asked (on the CPU they are interpreted)."""
    return TorchBackend(DEVICE, "fp32", triton=None if DEVICE != "cpu" else triton)


@pytest.fixture(scope="module")
def ops():
    return torch_backend()


# -- every architecture, single sequences and mixed batches

@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_the_reference_backend(arch, qtype, ops):
    f = GGUFFile(FIXTURES / f"{arch}-{qtype}.gguf")
    ref, model = build_model(f, NumpyBackend()), build_model(f, ops)
    ids = tokens(9, 0)
    want, got = ref.forward(ids, ref.new_cache(32), True), model.forward(ids, model.new_cache(32), True)
    assert np.abs(got - want).max() < 1e-4
    transformers_ref = np.load(FIXTURES / f"{arch}-ref-{qtype}.npz")  # and the original model
    logits = model.forward(transformers_ref["ids"], model.new_cache(64), all_logits=True)
    assert np.abs(logits - transformers_ref["logits"]).max() < 1e-4


@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batches_equal_each_sequence_alone_on_the_reference(arch, qtype, ops):
    f = GGUFFile(FIXTURES / f"{arch}-{qtype}.gguf")
    want = alone(build_model(f, NumpyBackend()), SCRIPT)
    got = batched(build_model(f, ops), SCRIPT)
    for seq in want:
        assert len(want[seq]) == len(got[seq])
        for w, g in zip(want[seq], got[seq]):
            assert w.shape == g.shape and np.abs(g - w).max() < 1e-4, (arch, qtype, seq)


@pytest.mark.skipif(DEVICE != "cpu", reason="threads are the CPU device's")
def test_threads_apply_during_a_pass_and_are_put_back():
    before = torch.get_num_threads()
    ops = TorchBackend("cpu", threads=1)
    model = build_model(GGUFFile(FIXTURES / "llama-f32.gguf"), ops)
    seen = []
    real = ops.rms_norm

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)
    ops.rms_norm = spy
    model.forward(tokens(3, 1), model.new_cache(8))
    assert set(seen) == {1} and torch.get_num_threads() == before


# -- packed planes and kernels

F16_FIELDS = {GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2],
              GGMLType.Q8_0: [0], GGMLType.Q2_K: [80, 82], GGMLType.Q3_K: [108], GGMLType.Q4_K: [0, 2],
              GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208], GGMLType.IQ4_NL: [0], GGMLType.IQ4_XS: [0]}


def random_blocks(qtype, n_out, n_in, seed=0):
    """Random bytes with finite float16 scales: every code and scale pattern of the type."""
    rng = np.random.default_rng(seed)
    block, bpb = BLOCK_INFO[qtype]
    raw = rng.integers(0, 256, (n_out, n_in // block * bpb), dtype=np.uint8)
    blocks = raw.reshape(-1, bpb)
    for at in F16_FIELDS[qtype]:
        blocks[:, at:at + 2] = rng.uniform(-1, 1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return raw


def gguf_dequantize(raw, qtype, shape):
    import gguf.quants

    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(qtype))).reshape(shape)


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda t: t.name)
def test_planes_dequantize_exactly_as_gguf_quants(qtype):
    pytest.importorskip("gguf")
    raw = random_blocks(qtype, 7, 512)
    p = pack(qtype, [(7, raw)], 512, torch.device(DEVICE))
    np.testing.assert_array_equal(dequantize(p).cpu().numpy(), gguf_dequantize(raw, qtype, (7, 512)))
    # the planes hold the file's bits: the same bytes, but for K-quants' unpacked 6-bit scales
    grown = {GGMLType.Q2_K: 1.20, GGMLType.Q3_K: 1.04, GGMLType.Q4_K: 1.03, GGMLType.Q5_K: 1.03, GGMLType.IQ4_XS: 1.02}
    assert raw.nbytes <= p.nbytes <= raw.nbytes * grown.get(qtype, 1.0)


def _triton_or_skip():
    pytest.importorskip("triton", reason="Triton is not installed (PyTorch's CUDA wheels bring it; "
                        "`pip install triton` runs its interpreter on the CPU)")
    from purelm.backends.torch_backend import triton_kernels

    return triton_kernels


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 17, "groups", "rows", "wide"])
def test_triton_product_matches_a_float64_product(qtype, rows):
    # one row: "wide" (the interpreter's default); 3 rows: "pairs"; 17: "dot" (more than 16 rows: a
    # prompt); "groups": one row through the kernel that scales whole groups of columns at once;
    # "rows": several rows, a program each; "wide": several rows from the same unpacked weights, in
    # steps of fewer columns than a row has
    kernels = _triton_or_skip()
    config = None
    if rows == "groups":
        rows, config = 1, ("groups", 8, 256, 4)
    elif rows == "rows":
        rows, config = 3, ("rows", 4, 256, 4)
    elif rows == "wide":
        rows, config = 3, ("wide", 8, 128, 4)
    block = BLOCK_INFO[qtype][0]
    n_out, n_in = 20, 512 if block == 256 else 352  # partial tiles of outputs and of columns
    raw = random_blocks(qtype, n_out, n_in, seed=rows)
    w = gguf_dequantize(raw, qtype, (n_out, n_in)).astype(np.float64)
    x = np.random.default_rng(rows).standard_normal((rows, n_in)).astype(np.float32)
    p = pack(qtype, [(n_out, raw)], n_in, torch.device(DEVICE))
    y = kernels.product(torch.from_numpy(x).to(DEVICE), p, config=config).cpu().numpy()
    ref = x.astype(np.float64) @ w.T
    assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max()
    # each activation row alone gives the same bits as in the batch (its program sees only its row)
    if rows > 1:
        one = kernels.product(torch.from_numpy(x[1:2]).to(DEVICE), p).cpu().numpy()
        assert np.abs(one[0] - y[1]).max() <= 2e-6 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda t: t.name)
def test_triton_dot_product_in_16_bit_activations(qtype):
    # a prompt's product in the activation dtype: weights rounded to it, float32 accumulation, in
    # tiles of 16 rows by 16 outputs (partial ones at both edges); float16 here, bfloat16 on CUDA too
    # (Triton's interpreter multiplies bfloat16 tiles wrongly: its numpy has no bfloat16)
    kernels = _triton_or_skip()
    block = BLOCK_INFO[qtype][0]
    n_out, n_in = 40, 512 if block == 256 else 352
    raw = random_blocks(qtype, n_out, n_in, seed=7)
    w = gguf_dequantize(raw, qtype, (n_out, n_in)).astype(np.float64)
    x = np.random.default_rng(7).standard_normal((21, n_in)).astype(np.float32)
    p = pack(qtype, [(n_out, raw)], n_in, torch.device(DEVICE))
    for dtype in (torch.float16,) + ((torch.bfloat16,) if DEVICE != "cpu" else ()):
        xt = torch.from_numpy(x).to(DEVICE, dtype)
        y = kernels.product(xt, p, torch.float32, config=("dot", 16, 64, 4, 16)).cpu().numpy()
        w16 = torch.from_numpy(w).to(dtype).double().numpy()  # what the kernel multiplies
        ref = xt.double().cpu().numpy() @ w16.T
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), dtype
        assert np.abs(y - x @ w.T).max() <= 2e-2 * np.abs(ref).max(), dtype
    assert kernels.product(torch.zeros((0, n_in), device=DEVICE), p).shape == (0, n_out)  # no rows: nothing to launch


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q6_K], ids=lambda t: t.name)
def test_triton_wide_product_takes_more_rows_than_a_program_holds(qtype):
    # 17 rows: programs of 16 rows and of 1 (a tuned table may name "wide" for any row count)
    kernels = _triton_or_skip()
    n_out, n_in = 12, 512
    raw = random_blocks(qtype, n_out, n_in, seed=5)
    w = gguf_dequantize(raw, qtype, (n_out, n_in)).astype(np.float64)
    x = np.random.default_rng(5).standard_normal((17, n_in)).astype(np.float32)
    p = pack(qtype, [(n_out, raw)], n_in, torch.device(DEVICE))
    y = kernels.product(torch.from_numpy(x).to(DEVICE), p, config=("wide", 8, 256, 4)).cpu().numpy()
    ref = x.astype(np.float64) @ w.T
    assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("kernel", ["wide", "groups", "dot"])
def test_triton_glu_product_matches_a_float64_reference(qtype, act, kernel):
    # gate|up stacked in one matrix: act(x gate.T) * (x up.T) in one kernel (a prompt's rows: "dot")
    kernels = _triton_or_skip()
    rows = 20 if kernel == "dot" else 1
    n_ff, n_in = 12, 512
    raw = random_blocks(qtype, 2 * n_ff, n_in, seed=rows)
    w = gguf_dequantize(raw, qtype, (2 * n_ff, n_in)).astype(np.float64)
    x = np.random.default_rng(rows).standard_normal((rows, n_in)).astype(np.float32)
    p = pack(qtype, [(n_ff, raw[:n_ff]), (n_ff, raw[n_ff:])], n_in, torch.device(DEVICE))
    config = ("dot", 16, 256, 4, 16) if kernel == "dot" else (kernel, 8, 256, 4)
    y = kernels.product(torch.from_numpy(x).to(DEVICE), p, glu=act, config=config).cpu().numpy()
    g, u = x.astype(np.float64) @ w[:n_ff].T, x.astype(np.float64) @ w[n_ff:].T
    a = g * 0.5 * (1 + np.tanh(g / 2)) if act == "silu" else 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    ref = a * u
    assert y.shape == (rows, n_ff)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_tuned_product_configurations_are_read_checked_and_chosen_by_size(tmp_path, monkeypatch):
    # configs/<GPU>.json (or PURELM_TRITON_CONFIGS): the entry of the same row bucket and kind nearest
    # in size; malformed entries are ignored, an unreadable file gives the rule
    import json
    from pathlib import Path

    kernels = _triton_or_skip()
    cuda = torch.device("cuda")  # (only its type is read when the file is named)
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"entries": [
        {"rows": 1, "glu": False, "n": 2048, "k": 2048, "config": ["pairs", 1, 256, 4]},
        {"rows": 1, "glu": False, "n": 2048, "k": 8192, "config": ["pairs", 2, 512, 8]},
        {"rows": 4, "glu": False, "n": 2048, "k": 2048, "config": ["rows", 1, 512, 4]},
        {"rows": 1, "glu": True, "n": 5632, "k": 2048, "config": ["pairs", 1, 256, 2], "unfused": True},
        {"rows": 512, "glu": True, "n": 5632, "k": 2048, "config": ["dot", 64, 64, 4, 64]},  # a prompt's
        {"rows": 512, "glu": False, "n": 9, "k": 9, "config": ["dot", 8, 64, 4, 64]},  # tl.dot: 16 at least
        {"rows": 512, "glu": False, "n": 9, "k": 9, "config": ["wide", 8, 64, 4, 64]},  # 5: "dot" only
        {"rows": 512, "glu": False, "n": 9, "k": 9, "config": ["wide", 128, 64, 4]},  # 128 outputs: "dot" only
        {"rows": 1, "glu": False, "n": 9, "k": 9, "config": ["wide", 8, 256, True]},  # warps: not a bool
        {"rows": 1, "glu": False, "n": 9, "k": 9, "config": ["wide", 8, 256.0, 4]},  # nor a float
        {"rows": 1, "glu": False, "n": 9, "k": 9, "config": ["pairs", 3, 256, 4]},  # not a power of two
        {"rows": 1, "glu": False, "n": 9, "k": 9, "config": ["magic", 1, 256, 4]},
        {"rows": 1, "glu": True, "n": 9, "k": 9, "config": ["pairs", 1, 256, 4]},  # fused: groups or wide
        {"rows": "1", "n": 9, "k": 9, "config": ["pairs", 1, 256, 4]}, "junk"]}))
    monkeypatch.setenv("PURELM_TRITON_CONFIGS", str(table))
    assert kernels.default_config(1, 2560, 2048, device=cuda) == ("pairs", 1, 256, 4)
    assert kernels.default_config(1, 2048, 6000, device=cuda) == ("pairs", 2, 512, 8)
    assert kernels.default_config(3, 2048, 2048, device=cuda) == ("rows", 1, 512, 4)  # bucket of 4
    assert kernels.default_config(1, 5632, 2048, glu=True, device=cuda) is None  # two steps were faster
    rule = ("wide", kernels.BN_WIDE, kernels.BK_WIDE, 4)
    assert kernels.default_config(16, 2048, 2048, device=cuda) == rule  # no entry: the rule
    assert kernels.default_config(300, 5632, 2048, glu=True, device=cuda) == ("dot", 64, 64, 4, 64)
    assert kernels.default_config(17, 2048, 2048, device=cuda) == kernels.DOT_RULE  # no entry: the rule
    assert len(kernels.tuned(cuda)) == 5
    shipped = Path(kernels.__file__).parent / "configs" / "NVIDIA_H200.json"  # every entry of it valid
    monkeypatch.setenv("PURELM_TRITON_CONFIGS", str(shipped))
    assert len(kernels.tuned(cuda)) == len(json.loads(shipped.read_text())["entries"]) > 0
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    monkeypatch.setenv("PURELM_TRITON_CONFIGS", str(broken))
    assert kernels.tuned(cuda) == [] and kernels.default_config(1, 2048, 2048, device=cuda) == rule


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda t: t.name)
def test_triton_dequantize_matches_gguf_quants(qtype):
    kernels = _triton_or_skip()
    raw = random_blocks(qtype, 20, 768, seed=3)
    p = pack(qtype, [(20, raw)], 768, torch.device(DEVICE))
    want = gguf_dequantize(raw, qtype, (20, 768))
    got = kernels.dequantize(p, torch.float32).cpu().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)  # a fused multiply-add at most (GPU)
    bf16 = kernels.dequantize(p, torch.bfloat16).float().cpu().numpy()
    np.testing.assert_allclose(bf16, want, rtol=2 ** -7, atol=0)  # rounded (GPU) or cut (interpreter)


@pytest.mark.parametrize("window", [None, 1000])
def test_triton_decode_attention_splits_long_contexts(window):
    # positions split over programs (several steps each) and joined: equal to a plain softmax
    _triton_or_skip()
    from purelm.backends.kv_cache import BLOCK
    from purelm.backends.torch_backend import fused

    rng = np.random.default_rng(0)
    B, H, n_kv, D, n_blocks = 2, 4, 2, 16, 4096 // BLOCK
    lens = np.array([700, 4000])
    tables = np.stack([rng.permutation(2 * n_blocks)[:n_blocks] for _ in range(B)])
    keys = rng.standard_normal((2 * n_blocks * BLOCK, n_kv, D)).astype(np.float32)
    values = rng.standard_normal((2 * n_blocks * BLOCK, n_kv, D)).astype(np.float32)
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    t = lambda a: torch.from_numpy(a).to(DEVICE)  # noqa: E731
    out = torch.empty((B, H * D), device=DEVICE)
    fused.decode_attention(t(q), t(keys), t(values), t(tables), t(lens), 0.25, None, window, None, out, BLOCK)
    for b in range(B):
        pos = np.arange(lens[b])
        rows = tables[b][pos // BLOCK] * BLOCK + pos % BLOCK
        seen = pos > lens[b] - 1 - window if window else pos >= 0
        for h in range(H):
            s = keys[rows, h // 2] @ q[b, h] * 0.25
            s = np.where(seen, s, -np.inf)
            p = np.exp(s - s.max())
            want = p @ values[rows, h // 2] / p.sum()
            np.testing.assert_allclose(out[b, h * D:(h + 1) * D].cpu().numpy(), want, rtol=1e-4, atol=1e-5)


# the architectures that together use every variant (interpreted kernels are slow: not all of them)
TRITON_ARCHS = ["llama", "gemma2", "mpt", "bloom", "gptneox", "falcon_mqa", "phi3", "stablelm_qknorm"]


@pytest.mark.parametrize("arch", TRITON_ARCHS)
def test_models_through_the_triton_kernels(arch):
    # every op's Triton kernel: norms, rope (both layouts, partial rotation), the KV store, the decode
    # attention (GQA, ALiBi, softcap, sliding window), gated activations, packed products
    _triton_or_skip()
    f = GGUFFile(FIXTURES / f"{arch}-q4_0.gguf")
    want = alone(build_model(f, NumpyBackend()), SCRIPT)
    got = batched(build_model(f, torch_backend(triton=True)), SCRIPT)
    for seq in want:
        for w, g in zip(want[seq], got[seq]):
            assert np.abs(g - w).max() < 1e-4, (arch, seq)


# -- prompts through CUDA graphs (graphs.py)

@pytest.mark.parametrize("arch", ["llama", "gemma2", "mpt", "gpt2", "phi3_longrope"])
def test_a_prompt_padded_as_its_graph_runs_computes_what_it_would_alone(arch, ops):
    # a graph runs a prompt padded to a multiple of 64 tokens (ids and positions 0, keys and values
    # into the rest of the sequence's last block): run uncaptured through the same staged view, the
    # real tokens' logits and the next decode token equal the plain pass's (causal attention, the
    # softcap's path through the cache, ALiBi, learned positions, LongRoPE)
    from purelm.backends.torch_backend.graphs import prompt_inputs, staged

    model = build_model(GGUFFile(FIXTURES / f"{arch}-q4_0.gguf"), ops)
    ids = tokens(9, 2)
    plain = model.new_cache(160)
    want = model.forward(ids, plain, True)
    want_next = model.forward(ids[:1], plain)
    cache = model.new_cache(160)
    cache.add()  # another sequence holds blocks too: the padding stays in sequence 1's own
    model.forward(tokens(5, 3), cache)
    view = cache.view([(1, len(ids))])
    host = prompt_inputs(ids, view, None)
    assert len(host["ids"]) == len(host["positions"]) == len(host["write"]) == 64 and len(host["rows"]) == 9
    assert set(host["write"] // 64) == {cache.table(1)[0]}
    other = [x.clone() for x in cache.k]
    static, _, staged_view = staged(host, cache, ops.device)
    with ops.forward_pass([9]):
        got = ops.to_numpy(model.logits_of(static["ids"], static["positions"], staged_view, static["rows"]))
    view.commit()
    assert np.abs(got - want).max() < 1e-5
    assert all(torch.equal(a[:64], b[:64]) for a, b in zip(cache.k, other))  # sequence 0's block untouched
    assert np.abs(model.forward_batch(cache, [(1, ids[:1])])[0] - want_next).max() < 1e-5


def test_prompts_are_captured_from_the_second_of_a_shape_on(ops):
    # which passes a graph runner takes: decode steps always; a prompt that starts its sequence once a
    # prompt of the same bucket of 64 tokens and logit rows has run (a one-off prompt stays uncaptured)
    from purelm.backends.torch_backend.graphs import GraphRunner

    runner, cache = GraphRunner(ops), build_model(GGUFFile(FIXTURES / "llama-q4_0.gguf"), ops).new_cache(256)
    cache.add()

    def view(*runs, p0=0):
        cache.truncate(p0, 0), cache.truncate(0, 1)
        if p0:
            cache.reserve(p0, 0)
            cache.seqs[0].n_past = p0
        return cache.view(list(runs))

    last = lambda n: np.array([n - 1])  # noqa: E731  (the rows whose logits a prompt asks for)
    assert not runner.eligible(view((0, 9)), last(9))  # first of its shape
    assert runner.eligible(view((0, 30)), last(30))  # the same bucket and number of logit rows
    assert runner.eligible(view((0, 64)), last(64))
    assert not runner.eligible(view((0, 30)), None)  # every row's logits: a shape of its own
    assert runner.eligible(view((0, 30)), None)
    assert not runner.eligible(view((0, 65)), last(65))  # the next bucket
    assert not runner.eligible(view((0, 9), p0=5), None) and not runner.eligible(view((0, 9), p0=5), None)  # continues
    assert not runner.eligible(view((0, 9), (1, 9)), None) and not runner.eligible(view((0, 9), (1, 9)), None)
    assert runner.eligible(view((0, 1), (1, 1)), None)  # a decode step


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs are CUDA's (the padded pass they replay is tested "
                    "above on every device)")
@pytest.mark.parametrize("arch", ["llama", "gemma2", "mpt", "gpt2", "phi3_longrope", "qwen3"])
def test_prompts_replay_their_graphs_as_they_run_eagerly(arch):
    f = GGUFFile(FIXTURES / f"{arch}-q4_0.gguf")
    ops = torch_backend()
    model, eager = build_model(f, ops), build_model(f, TorchBackend(DEVICE, "fp32", graphs=False))
    cache, eager_cache = model.new_cache(256), eager.new_cache(256)
    for n, all_logits in ((9, False), (30, False), (70, True), (9, False), (64, False), (70, True), (70, True)):
        ids = tokens(n, n)
        cache.truncate(0), eager_cache.truncate(0)
        got, want = model.forward(ids, cache, all_logits), eager.forward(ids, eager_cache, all_logits)
        assert np.abs(got - want).max() < 1e-4, (arch, n)
        nxt, want_nxt = model.forward(ids[:1], cache), eager.forward(ids[:1], eager_cache)
        assert np.abs(nxt - want_nxt).max() < 1e-4, (arch, n)
    # one graph per (bucket of 64 tokens, logits asked for), captured at the second prompt of its shape:
    # 9, 30 and 64 tokens share the first
    assert sorted(k[3:5] for k in ops.graphs.prompts) == [(64, 1), (128, 70)]


# -- the real model, choices and errors

@pytest.mark.slow
def test_smollm2_greedy_text_equals_the_numba_backend(smollm2_path):
    # (the CPU device dequantizes every matrix for every token: a few tokens only; mixed batches are
    # covered on every architecture above)
    import purelm

    prompt = "The capital of France is"
    want = purelm.load(smollm2_path, backend="numba", n_ctx=64).generate(prompt, max_tokens=4, temperature=0)
    llm = purelm.load(smollm2_path, backend="torch", device=DEVICE, dtype="fp32", n_ctx=64)
    assert llm.generate(prompt, max_tokens=4, temperature=0) == want


def test_options_are_checked():
    with pytest.raises(UsageError, match="device"):
        get_backend("numba", device="cpu")
    with pytest.raises(UsageError, match="dtype"):
        TorchBackend("cpu", "int3")
    with pytest.raises(UsageError, match="device"):
        TorchBackend("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PurelmError, match="CUDA"):
            TorchBackend("cuda")
    ops = torch_backend()
    with pytest.raises(ShapeError):
        ops.linear(torch.zeros((2, 5)), torch.zeros((3, 4)))


def test_without_torch_the_error_is_one_line(tmp_path):
    (tmp_path / "torch.py").write_text("raise ImportError('No module named torch')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    code = "from purelm.backends import get_backend\nget_backend('torch')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "pip install 'purelm[torch]'" in r.stderr and r.returncode != 0
    r = subprocess.run([sys.executable, "-m", "purelm.cli", "generate", "-m", str(FIXTURES / "llama-f32.gguf"),
                        "--backend", "torch", "hi"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'purelm[torch]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_command_line_takes_backend_device_and_dtype():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "purelm.cli", "generate", "-m", str(FIXTURES / "llama-f32.gguf"),
                               "-n", "6", "--temp", "0", *args, "hello"], capture_output=True, text=True)
    want = run("--backend", "numpy")
    got = run("--backend", "torch", "--device", "cpu", "--dtype", "fp32")
    assert want.returncode == got.returncode == 0 and got.stdout == want.stdout, got.stderr
    bad = run("--device", "cpu")
    assert bad.returncode == 2 and "--backend torch" in bad.stderr
