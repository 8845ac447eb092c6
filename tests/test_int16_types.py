"""The integer-activation decode kernels of the 5- and 6-bit types (Q5_0, Q5_1, Q5_K in the nibble dot
layout with a plane of high bits, Q6_K in its own, packing.py), int16 and (but Q6_K) int8: the dot
layouts hold the file's weights exactly (they dequantize to the bits the float layouts give), products
stay within the bounds of tests/test_numba_backend.py at the weights' extremes (no int32 overflow, signs
kept), and a small model of each type decodes within conftest.logits_rel of the reference. (Random weights of every
type, 1-37 tokens, merged and split, repacked and not, and a row's product the same bits whatever other
rows share the call: tests/test_numba_backend.py.)"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import activation_rule, logits_rel

from purelm.backends.numba_backend import UNPACK, NumbaBackend
from purelm.backends.numba_kernels.intrinsics import has_int16_dot
from purelm.backends.numba_kernels.packing import DOT_TYPES, pack
from purelm.backends.numpy_backend import NumpyBackend
from purelm.formats.gguf import GGUFFile, Tensor
from purelm.models import build_model
from purelm.quant import GGMLType as T
from purelm.quant import dequantize, quantize

NEW_TYPES = [T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K]
N_IN = 512
REF = NumpyBackend()
needs_int16 = pytest.mark.skipif(not has_int16_dot(), reason="int16 dot kernels run on x86 CPUs with AVX2 only")


def weights(qtype, n_out, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    data = quantize((scale * rng.standard_normal((n_out, N_IN))).astype(np.float32), qtype)
    data.flags.writeable = False
    return data


def unpacked(p):
    out = np.empty((p.n_in, p.n_groups * p.lanes), np.float32)
    UNPACK[p.family](*p.kernel_args, 0, p.n_groups, out)
    return out.T[:p.n_out]


@pytest.mark.parametrize("qtype", sorted(DOT_TYPES, key=int), ids=lambda t: t.name)
def test_dot_layout_dequantizes_like_the_float_layout(qtype):
    data = weights(qtype, 131, int(qtype))  # 131 rows: the last group padded
    dot, flat = pack(qtype, data, N_IN, dot=True), pack(qtype, data, N_IN)
    assert dot.family.endswith("_dot") and not flat.family.endswith("_dot")
    assert dot.nbytes == flat.nbytes  # planes replace qh: the same size
    np.testing.assert_array_equal(unpacked(dot), unpacked(flat))
    want = dequantize(data, qtype, (131, N_IN))
    assert np.abs(unpacked(dot) - want).max() <= 1e-6 * np.abs(want).max()


def extreme_blocks(qtype, n_out):
    """Every weight at its type's smallest or largest value (Q6_K: q - 32 of -32 and 31), in rows
    of each sign pattern, with scales of 1 (K-quants: sub-block scales 63 or 127 too)."""
    from purelm.quant.types import BLOCK_INFO

    block, size = BLOCK_INFO[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = np.zeros((n_out, N_IN // block, size), np.uint8)
    one = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    top = rng.integers(0, 2, n_out).astype(bool)[:, None, None]  # per row: all q at max, or at 0
    full = np.where(top, 255, 0).astype(np.uint8)
    if qtype in (T.Q5_0, T.Q5_1):
        raw[..., 0:2] = one
        at = 4 if qtype == T.Q5_1 else 2
        raw[..., at:] = full  # high bits and nibbles
    elif qtype == T.Q5_K:
        raw[..., 0:2] = one
        raw[..., 4:16] = 255  # scales and mins 63
        raw[..., 16:] = full
    else:  # Q6_K
        raw[..., 0:192] = full
        raw[..., 192:208] = np.array([127], np.int8).view(np.uint8)
        raw[..., 208:210] = one
    data = raw.reshape(n_out, -1)
    data.flags.writeable = False
    return data


@needs_int16
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "int16"])
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_products_at_the_weights_extremes(qtype, int8):
    be = NumbaBackend(1, int8_dot=int8)
    t = Tensor("w", qtype, (64, N_IN), 0, extreme_blocks(qtype, 64))
    w = be.weight(t)
    x = np.random.default_rng(2).standard_normal((5, N_IN)).astype(np.float32)
    x[1] = 1e3  # every activation at the top after rounding (+32767, +127): the largest integer sums
    x[2] = -1e3
    got = be.linear(x, w)
    assert w.packed.family.endswith("_dot")
    want = REF.linear(activation_rule(w)(x), t)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale
    np.testing.assert_array_equal(be.linear(x[:1], w), got[:1])  # one token alone: the same bits


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A 2-layer LLaMA of each type, rows of 256 so that K-quants apply (make_synthetic.py)."""
    spec = importlib.util.spec_from_file_location("make_synthetic", Path(__file__).parents[1] / "benchmarks" /
                                                  "make_synthetic.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    out = {}
    for qtype in NEW_TYPES:
        path = tmp_path_factory.mktemp("tiny") / f"{qtype.name}.gguf"
        make.build_writer(path, hidden=256, layers=2, ffn=512, heads=4, kv_heads=2, vocab=300, ctx=64,
                          qtype=qtype, output_type=qtype, embd_type=T.Q8_0, std=0.05).write()
        out[qtype] = path
    return out


@needs_int16
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "int16"])
@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_tiny_model_decodes_like_the_reference(tiny_models, qtype, int8):
    f = GGUFFile(tiny_models[qtype])
    be = NumbaBackend(2, int8_dot=int8)
    assert be.int16_dot and qtype in DOT_TYPES
    fast, ref = build_model(f, be), build_model(f, REF)
    ids = np.random.default_rng(0).integers(3, 300, 8)
    caches = fast.new_cache(32), ref.new_cache(32)
    fast.forward(ids[:4], caches[0]), ref.forward(ids[:4], caches[1])
    for i in ids[4:]:  # decode steps: the integer kernels
        got, want = fast.forward(np.array([i]), caches[0]), ref.forward(np.array([i]), caches[1])
        assert np.abs(got - want).max() <= logits_rel(be) * np.abs(want).max()


def test_dot_kernels_refuse_groups_that_do_not_fit_the_mode():
    """The kernels' entry check: the 4-byte groups per sub-block (which pick the unrolled unpacking)
    must be those of the scale mode, or a kernel would read a plane as weights or past a sub-block."""
    from purelm.backends.numba_kernels import packed as pk
    from purelm.backends.numba_kernels.packing import BYTES, SIX

    p = pack(T.Q5_0, weights(T.Q5_0, 64, 0), N_IN, dot=True)
    x = np.ones((2, N_IN), np.float32)
    y = np.empty((2, 64), np.float32)
    no_parts = np.zeros((0, 0, 0), np.float32)
    qs, d, m, sc, mn, mode, offset = p.kernel_args
    for wrong in (BYTES, SIX):
        for kernel in (pk.matvec_dot_five, pk.matvec_dot_batch_five):
            with pytest.raises(AssertionError):
                kernel(qs, d, m, sc, mn, wrong, offset, x, y, no_parts)
        with pytest.raises(AssertionError):
            pk.unpack_dot(qs, d, m, sc, mn, wrong, offset, 0, 1, np.empty((N_IN, 64), np.float32))
    for kernel in (pk.matvec_dot_nibbles, pk.matvec_dot_batch_bytes, pk.matvec_dot_six):  # other kinds' kernels
        with pytest.raises(AssertionError):
            kernel(qs, d, m, sc, mn, mode, offset, x, y, no_parts)
