"""Hyperparameters that lie: each is refused at load with one FormatError naming the key, before any
kernel runs; and the kernels' entry checks refuse shapes that do not fit, whatever the loader missed."""
import math

import numpy as np
import pytest
from conftest import FIXTURES, rewrite_gguf

import purelm
from purelm.backends.base import AttentionSpec, KVCache, Rope
from purelm.backends.numba_backend import NumbaBackend
from purelm.backends.numpy_backend import NumpyBackend
from purelm.errors import ContextOverflowError, FormatError, ShapeError
from purelm.formats.gguf import ValueType

LLAMA = FIXTURES / "llama-f32.gguf"  # 2 layers, width 64, 4 heads of 16, rope over 16, vocab 320
BACKENDS = ["numba", "numpy"]


def load_and_generate(path, backend):
    llm = purelm.load(str(path), backend=backend, n_ctx=64)
    return llm.generate("hello", max_tokens=2, temperature=0)


def rng_matrix(rows, cols, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.1


# (case id, metadata changes, tensor changes, what the message must name)
CASES = [
    ("head_count 0", {"llama.attention.head_count": 0}, {}, r"head_count: is 0; it must be an integer in \[1,"),
    ("head_count string", {"llama.attention.head_count": "4"}, {}, r"head_count: is '4'"),
    ("head_count float", {"llama.attention.head_count": 4.0}, {}, r"head_count: is 4.0"),
    ("head_count bool", {"llama.attention.head_count": (True, ValueType.BOOL)}, {}, r"head_count: is True"),
    ("head_count array", {"llama.attention.head_count": [4, 4]}, {}, r"head_count: is an array of 2"),
    ("head_count -1", {"llama.attention.head_count": (-1, ValueType.INT32)}, {}, r"head_count: is -1"),
    ("head_count 2^63", {"llama.attention.head_count": (2**63, ValueType.UINT64)}, {}, r"head_count: is 9223"),
    ("block_count 0", {"llama.block_count": 0}, {}, r"block_count: is 0"),
    ("block_count 2^31-1", {"llama.block_count": 2**31 - 1}, {}, r"block_count: is 2147483647"),
    ("embedding_length 65", {"llama.embedding_length": 65}, {}, r"head_count: is 4; it must be a divisor"),
    ("embedding_length 128", {"llama.embedding_length": 128}, {}, r"token_embd.weight.*expected \(320, 128\)"),
    ("rope dims 128 > head 16", {"llama.rope.dimension_count": 128}, {}, r"dimension_count: is 128.*\[2, 16\]: the head size"),
    ("rope dims odd", {"llama.rope.dimension_count": 5}, {}, r"dimension_count: is 5; it must be even"),
    ("rope dims 2^31-1", {"llama.rope.dimension_count": 2**31 - 1}, {}, r"dimension_count: is 2147483647"),
    ("rope dims 0", {"llama.rope.dimension_count": 0}, {}, r"dimension_count: is 0"),
    ("freq_base 0", {"llama.rope.freq_base": 0.0}, {}, r"freq_base: is 0.0; it must be a finite number in \(0"),
    ("freq_base nan", {"llama.rope.freq_base": math.nan}, {}, r"freq_base: is nan"),
    ("freq_base -inf", {"llama.rope.freq_base": -math.inf}, {}, r"freq_base: is -inf"),
    ("freq_base string", {"llama.rope.freq_base": "1e4"}, {}, r"freq_base: is '1e4'"),
    ("eps nan", {"llama.attention.layer_norm_rms_epsilon": math.nan}, {}, r"rms_epsilon: is nan"),
    ("eps -1", {"llama.attention.layer_norm_rms_epsilon": -1.0}, {}, r"rms_epsilon: is -1.0"),
    ("context 0", {"llama.context_length": 0}, {}, r"context_length: is 0"),
    ("ffn wrong", {"llama.feed_forward_length": 127}, {}, r"ffn_gate.weight.*expected \(127, 64\)"),
    ("ffn missing", {"llama.feed_forward_length": None}, {}, r"feed_forward_length: required metadata key"),
    ("scaling type int", {"llama.rope.scaling.type": 1}, {}, r"scaling.type: is 1; it must be a string"),
    ("window -1", {"llama.attention.sliding_window": (-1, ValueType.INT32)}, {}, r"sliding_window: is -1"),
    ("kv heads 0", {"llama.attention.head_count_kv": 0}, {}, r"head_count_kv: is 0"),
    ("kv heads > heads", {"llama.attention.head_count_kv": 8}, {}, r"head_count_kv: is 8.*\[1, 4\]"),
    # CVE-2026-7482's pattern: KV heads that do not divide the query heads, with k and v shaped to match
    ("kv heads 3 of 4", {"llama.attention.head_count_kv": 3},
     {f"blk.{i}.attn_{x}.weight": rng_matrix(48, 64) for i in (0, 1) for x in "kv"}, r"head_count_kv: is 3.*divisor"),
    ("more tokens than rows", {"tokenizer.ggml.tokens": [f"t{i}" for i in range(400)]}, {},
     r"tokenizer.ggml.tokens: has 400 tokens but the model has 320 embedding rows"),
    ("rope_freqs 2-D", {}, {"rope_freqs.weight": np.ones((2, 4), np.float32)}, r"rope_freqs.weight.*expected \(8,\)"),
    ("rope_freqs zero", {}, {"rope_freqs.weight": np.zeros(8, np.float32)}, r"rope_freqs.weight.*positive finite"),
    ("norm (64, 1)", {}, {"blk.0.attn_norm.weight": np.ones((64, 1), np.float32)}, r"attn_norm.weight.*\(64, 1\)"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("meta,tensors,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lying_hyperparameters_are_refused_at_load(tmp_path, backend, meta, tensors, match):
    path = rewrite_gguf(LLAMA, tmp_path / "m.gguf", meta=meta, tensors=tensors)
    with pytest.raises(FormatError, match=match):
        load_and_generate(path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_consistent_variants_still_load(tmp_path, backend):
    """What llama.cpp accepts runs: a norm stored as (1, 64) (ggml pads shapes with ones), one bias
    without the others, rope over fewer features than the head, valid rope frequency factors."""
    path = rewrite_gguf(LLAMA, tmp_path / "m.gguf", meta={"llama.rope.dimension_count": 8},
                        tensors={"blk.0.attn_norm.weight": np.ones((1, 64), np.float32),
                                 "blk.1.attn_q.bias": np.full(64, 0.01, np.float32),
                                 "rope_freqs.weight": np.linspace(1, 4, 4).astype(np.float32)})
    llm = purelm.load(str(path), backend=backend, n_ctx=64)
    logits = llm.logits(llm.tokenize("hello world"))
    assert np.isfinite(logits).all()
    # the bias and the factors are used, not dropped: the logits differ from the file without them
    plain = rewrite_gguf(LLAMA, tmp_path / "p.gguf", meta={"llama.rope.dimension_count": 8},
                         tensors={"blk.0.attn_norm.weight": np.ones((64,), np.float32)})
    base = purelm.load(str(plain), backend=backend, n_ctx=64)
    assert np.abs(base.logits(base.tokenize("hello world")) - logits).max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_weights_are_named_not_sampled(tmp_path, backend):
    w = rng_matrix(64, 64)
    w[3, 5] = np.nan
    path = rewrite_gguf(LLAMA, tmp_path / "m.gguf", tensors={"blk.1.attn_output.weight": w})
    with pytest.raises(FormatError, match="non-finite logits"):
        load_and_generate(path, backend)


def test_smollm2_rope_dims_past_the_head_is_refused(tmp_path, smollm2_path):
    """The crash of the issue: rope over 128 features of SmolLM2's 64-wide heads (the numba kernel
    wrote past its output)."""
    path = rewrite_gguf(smollm2_path, tmp_path / "m.gguf", meta={"llama.rope.dimension_count": 128})
    with pytest.raises(FormatError, match=r"llama.rope.dimension_count: is 128.*\[2, 64\]: the head size"):
        purelm.load(str(path))


# -- the kernels' own entry checks, called directly with shapes no loader would let through

def make_backend(name):
    return NumbaBackend(threads=1) if name == "numba" else NumpyBackend()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_entry_check(backend):
    ops = make_backend(backend)
    x = np.ones((2, 3, 16), np.float32)
    for n_dims in (18, 5, 0):
        with pytest.raises(ShapeError, match="rope"):
            ops.rope(x, np.arange(2), Rope(n_dims=n_dims))
    with pytest.raises(ShapeError, match="rope"):
        ops.rope(x, np.arange(3), Rope(n_dims=16))
    with pytest.raises(ShapeError, match="frequency factors"):
        ops.rope(x, np.arange(2), Rope(n_dims=16, freq_factors=(1.0,)))
    assert ops.rope(x, np.arange(2), Rope(n_dims=16)).shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_entry_check(backend):
    ops = make_backend(backend)
    cache = KVCache(2, 8, 3, 16, 16)
    spec = AttentionSpec(scale=0.25)
    q = np.ones((1, 4, 16), np.float32)  # 4 query heads over 3 KV heads: a head past the cache
    kv = np.ones((1, 3, 16), np.float32)
    with pytest.raises(ShapeError, match="cannot share 3 KV heads"):
        ops.attention(q, kv, kv, cache, 0, spec)
    q = np.ones((1, 6, 16), np.float32)
    for k, v, layer in [(np.ones((1, 3, 8), np.float32), kv, 0), (kv, np.ones((1, 2, 16), np.float32), 0),
                        (kv, kv, 2), (kv, kv, -1)]:
        with pytest.raises(ShapeError, match="attention"):
            ops.attention(q, k, v, cache, layer, spec)
    with pytest.raises(ShapeError, match="ALiBi"):
        ops.attention(q, kv, kv, cache, 0, AttentionSpec(scale=0.25, alibi_slopes=np.ones(2, np.float32)))
    cache.n_past = 8  # full: one more position would be written past the cache
    with pytest.raises(ContextOverflowError, match="9 tokens do not fit in the context of 8"):
        ops.attention(q, kv, kv, cache, 0, spec)
    cache.n_past = 0
    assert ops.attention(q, kv, kv, cache, 0, spec).shape == (1, 6 * 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_entry_check(backend):
    ops = make_backend(backend)
    x = np.ones((2, 8), np.float32)
    for w in (np.ones(7, np.float32), np.ones((8, 1), np.float32), np.ones(9, np.float32)):
        with pytest.raises(ShapeError, match="rms_norm"):
            ops.rms_norm(x, w, 1e-5)
        with pytest.raises(ShapeError, match="layer_norm"):
            ops.layer_norm(x, w, None, 1e-5)
        with pytest.raises(ShapeError, match="layer_norm"):
            ops.layer_norm(x, None, w, 1e-5)


def test_prompt_attention_kernel_entry_check():
    """ops.attention_prompt (the tiled prompt attention) refuses shapes that do not fit: keys short of
    the queries' positions, query heads that do not share the KV heads evenly, head sizes it does not
    take, an output of the wrong shape."""
    from purelm.backends.numba_kernels import ops as kernels

    def run(n_tok=4, n_head=4, n_kv=2, dim=16, v_dim=32, n_keys=6, p0=2, out=None):
        q = np.ones((n_tok, n_head, dim), np.float32)
        k, v = np.ones((n_keys, n_kv, dim), np.float32), np.ones((n_keys, n_kv, v_dim), np.float32)
        out = np.empty((n_tok, n_head * v_dim), np.float32) if out is None else out
        kernels.attention_prompt(q, k, v, p0, np.float32(0.25), np.float32(0), 0, np.zeros(0, np.float32), 32, out)
        return out

    np.testing.assert_allclose(run(), 1.0)  # every value row is ones
    for bad in (dict(n_keys=5), dict(p0=-1), dict(n_head=5), dict(dim=24), dict(v_dim=16),
                dict(out=np.empty((4, 64), np.float32))):
        with pytest.raises(AssertionError):
            run(**bad)


@pytest.mark.parametrize("parallel", [False, True])
def test_paged_attention_kernel_entry_check(parallel):
    """ops.attention_paged(_parallel), the decode attention over cache blocks, refuses shapes that do not
    fit: query heads that do not share the KV heads evenly, head sizes or an output unlike the pools',
    a position past its block table, a block outside the pools, mismatched tokens."""
    from purelm.backends.numba_kernels import ops as kernels

    def run(n_head=4, n_kv=2, dim=16, n_rows=128, pos=(3, 70), tables=((0, 1), (1, 0)), out=None, q_dim=None,
            v_kv=None):
        q = np.ones((len(pos), n_head, q_dim or dim), np.float32)
        k = np.ones((n_rows, n_kv, dim), np.float32)
        v = np.ones((n_rows, v_kv or n_kv, dim), np.float32)
        out = np.empty((len(pos), n_head * dim), np.float32) if out is None else out
        args = (q, k, v, np.array(tables, np.int32), np.array(pos, np.int64), 6, np.float32(0.25), np.float32(0), 0,
                np.zeros(0, np.float32), 256)
        if parallel:
            kernels.attention_paged_parallel(*args, 2, out)
        else:
            kernels.attention_paged(*args, out)
        return out

    np.testing.assert_allclose(run(), 1.0)  # every value row is ones
    for bad in (dict(n_head=5), dict(q_dim=8), dict(v_kv=1), dict(out=np.empty((2, 32), np.float32)),
                dict(pos=(3, 128)), dict(pos=(-1, 3)), dict(tables=((0, 1), (2, 0))), dict(tables=((0, 1), (1, -1))),
                dict(n_rows=100), dict(tables=((0, 1),))):
        with pytest.raises(AssertionError):
            run(**bad)


def test_dot_kernels_refuse_more_token_ranges_than_tokens():
    from purelm.backends.numba_backend import _token_parts
    from purelm.quant import GGMLType, quantize
    from purelm.formats.gguf import Tensor

    be = NumbaBackend(threads=1)
    w = be.weight(Tensor("w", GGMLType.Q4_0, (64, 256), 0, quantize(np.ones((64, 256), np.float32), GGMLType.Q4_0)))
    be.linear(np.ones((1, 256), np.float32), w)
    if w.packed is None or not w.packed.family.endswith("_dot"):
        pytest.skip("no dot kernels on this CPU")
    x, y = np.ones((3, 256), np.float32), np.empty((3, 64), np.float32)
    w.kernel_many(*w.kernel_args, x, y, _token_parts(3, 1))
    with pytest.raises(AssertionError):
        w.kernel_many(*w.kernel_args, x, y, _token_parts(4, 1))


def test_gated_activation_entry_check():
    ops = make_backend("numba")
    with pytest.raises(ShapeError, match="gate"):
        ops.swiglu(np.ones((2, 8), np.float32), np.ones((2, 4), np.float32))


# -- what the fuzzer found (tools/fuzz.py), kept as named cases

@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_that_is_not_an_array(tmp_path, backend):
    path = rewrite_gguf(LLAMA, tmp_path / "m.gguf", meta={"tokenizer.ggml.tokens": (2**63, ValueType.UINT64)})
    with pytest.raises(FormatError, match="tokenizer.ggml.tokens: is a uint64, not an array"):
        load_and_generate(path, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fixture,norm", [("stablelm_qknorm-f32.gguf", "attn_k_norm"),
                                          ("stablelm_qknorm-f32.gguf", "attn_q_norm")])
def test_one_head_norm_without_the_other(tmp_path, backend, fixture, norm):
    """Each of q_norm and k_norm is optional alone (llama.cpp's rule); one missing is not None passed on."""
    drop = [f"blk.{i}.{norm}.weight" for i in range(2)]
    path = rewrite_gguf(FIXTURES / fixture, tmp_path / "m.gguf", drop=drop)
    llm = purelm.load(str(path), backend=backend, n_ctx=64)
    assert np.isfinite(llm.logits(llm.tokenize("hello"))).all()


def test_matrix_padded_with_a_leading_one_runs_on_both_backends(tmp_path):
    """A matrix stored with a trailing ggml dimension of 1, (1, 64, 64) here: both backends see (64, 64)."""
    w = rng_matrix(64, 64)
    path = rewrite_gguf(LLAMA, tmp_path / "m.gguf", tensors={"blk.0.attn_output.weight": w[None]})
    ref = rewrite_gguf(LLAMA, tmp_path / "r.gguf", tensors={"blk.0.attn_output.weight": w})
    for backend in BACKENDS:
        a, b = (purelm.load(str(p), backend=backend, n_ctx=64) for p in (path, ref))
        np.testing.assert_array_equal(a.logits(a.tokenize("hello")), b.logits(b.tokenize("hello")))
