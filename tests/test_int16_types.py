"""The integer-activation decode kernels of the 5- and 6-bit types (Q5_0, Q5_1, Q5_K in the nibble dot
layout with a plane of high bits, Q6_K in its own, packing.py), int16 and (but Q6_K) int8, and of the
types with only a dot layout (packing.DOT_ONLY_TYPES: Q3_K, Q2_K in 2-bit "crumbs", IQ4_XS, IQ4_NL's codes
looked up in the kernel), int16 only: the dot layouts hold the file's weights exactly (they dequantize
to the bits the float layouts give, and to gguf.quants' values), products
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
from purelm.backends.numba_kernels.packing import DOT_ONLY_TYPES, DOT_TYPES, pack
from purelm.backends.numpy_backend import NumpyBackend
from purelm.formats.gguf import GGUFFile, Tensor
from purelm.models import build_model
from purelm.quant import GGMLType as T
from purelm.quant import dequantize, quantize

NEW_TYPES = [T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q3_K, T.Q2_K, T.IQ4_XS, T.IQ4_NL]
# (type, int8 activations asked for): the dot-only types have no int8 kernels, they keep int16
KERNELS = [pytest.param(t, i, id=f"{t.name}-{'int8' if i else 'int16'}") for t in NEW_TYPES for i in (True, False)
           if not (i and t in DOT_ONLY_TYPES)]
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
    import gguf

    data = weights(qtype, 131, int(qtype))  # 131 rows: the last group padded
    dot = pack(qtype, data, N_IN, dot=True)
    assert dot.family.endswith("_dot")
    if qtype in DOT_ONLY_TYPES:  # no float layout: the file's size, give or take the scales' bytes
        with pytest.raises(ValueError, match="only a dot layout"):
            pack(qtype, data, N_IN)
        padded = dot.n_groups * dot.lanes / 131
        assert dot.nbytes <= 1.04 * data.nbytes * padded  # Q3_K: 114 bytes per 110, IQ4_XS 138 per 136
    else:
        flat = pack(qtype, data, N_IN)
        assert not flat.family.endswith("_dot")
        assert dot.nbytes == flat.nbytes  # planes replace qh: the same size
        np.testing.assert_array_equal(unpacked(dot), unpacked(flat))
    want = dequantize(data, qtype, (131, N_IN))
    assert np.abs(unpacked(dot) - want).max() <= 1e-6 * np.abs(want).max()
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(int(qtype))).reshape(131, N_IN)
    assert np.abs(unpacked(dot) - theirs).max() <= 1e-6 * np.abs(theirs).max()


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
    if qtype in (T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1):
        raw[..., 0:2] = one
        at = 4 if qtype in (T.Q5_1, T.Q4_1) else 2
        raw[..., at:] = full  # (high bits and) nibbles
    elif qtype == T.Q4_K:
        raw[..., 0:2] = one
        raw[..., 4:16] = 255  # scales and mins 63
        raw[..., 16:] = full
    elif qtype == T.Q5_K:
        raw[..., 0:2] = one
        raw[..., 4:16] = 255  # scales and mins 63
        raw[..., 16:] = full
    elif qtype == T.Q3_K:  # q 3 with scale 31, or q -4 with scale -32
        raw[..., 0:108] = full
        raw[..., 108:110] = one
    elif qtype == T.Q2_K:  # scales and mins 15
        raw[..., 0:16] = 255
        raw[..., 16:80] = full
        raw[..., 80:82] = raw[..., 82:84] = one
    elif qtype == T.IQ4_NL:  # level 113 or -127
        raw[..., 0:2] = one
        raw[..., 2:] = full
    elif qtype == T.IQ4_XS:  # level 113 with scale 31, or -127 with scale -32
        raw[..., 0:2] = one
        raw[..., 2:] = full
    else:  # Q6_K
        raw[..., 0:192] = full
        raw[..., 192:208] = np.array([127], np.int8).view(np.uint8)
        raw[..., 208:210] = one
    data = raw.reshape(n_out, -1)
    data.flags.writeable = False
    return data


@needs_int16
@pytest.mark.parametrize("qtype,int8", KERNELS + [pytest.param(t, i, id=f"{t.name}-{'int8' if i else 'int16'}")
                                                 for t in (T.Q4_0, T.Q4_1, T.Q4_K) for i in (True, False)])
def test_products_at_the_weights_extremes(qtype, int8):
    """(With AVX2 alone the int8 kernels add up to 8 pair sums of 4-bit weights, 4 of 5-bit ones, in
    int16 before widening: intrinsics._byte_pairs. Rows of 15s or 31s times +-127 are its largest.)"""
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
        make.build_writer(path, hidden=256, layers=2, ffn=512, heads=4, kv_heads=2, vocab=300, ctx=128,
                          qtype=qtype, output_type=qtype, embd_type=T.Q8_0, std=0.05).write()
        out[qtype] = path
    return out


@needs_int16
@pytest.mark.parametrize("qtype,int8", KERNELS)
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


@needs_int16
@pytest.mark.parametrize("qtype", sorted(DOT_ONLY_TYPES, key=int), ids=lambda t: t.name)
def test_decode_tokens_in_a_batch_equal_them_alone(tiny_models, qtype):
    """tests/test_batch.py's script (prompt chunks, decode tokens, a fork) on a tiny model of each
    dot-only type: a decode token's logits the same bits in the batch as alone."""
    from batchlib import SCRIPT, alone, batched

    model = build_model(GGUFFile(tiny_models[qtype]), NumbaBackend(2))
    want, got = alone(model, SCRIPT), batched(model, SCRIPT)
    scale = max(float(np.abs(x).max()) for xs in want.values() for x in xs)
    for seq in want:
        assert len(want[seq]) == len(got[seq])
        for w, g in zip(want[seq], got[seq]):
            if len(w) == 1:  # a decode token
                np.testing.assert_array_equal(g, w, err_msg=f"{qtype.name} sequence {seq}")
            else:
                assert np.abs(g - w).max() <= 1e-5 * scale, (qtype.name, seq)


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


def test_dot_only_kernels_refuse_layouts_and_arrays_that_do_not_fit():
    """The dot-only types' kernels check on entry every array they index: the kind and mode (another
    type's layout or mode), the scales (per 256, 32 or 16 weights), x's width, y's rows and parts."""
    from purelm.backends.numba_kernels import packed as pk
    from purelm.backends.numba_kernels.packing import BYTES, LEVELS, LEVELS_K, SIX, THREE, TWO

    own = {T.Q2_K: (pk.matvec_dot_crumbs, pk.matvec_dot_batch_crumbs, pk.unpack_crumbs),
           T.Q3_K: (pk.matvec_dot_crumbs3, pk.matvec_dot_batch_crumbs3, pk.unpack_crumbs),
           T.IQ4_XS: (pk.matvec_dot_levels, pk.matvec_dot_batch_levels, pk.unpack_levels),
           T.IQ4_NL: (pk.matvec_dot_levels, pk.matvec_dot_batch_levels, pk.unpack_levels)}
    no_parts = np.zeros((0, 0, 0), np.float32)
    x = np.ones((2, N_IN), np.float32)
    for qtype, (one, many, unpack) in own.items():
        p = pack(qtype, weights(qtype, 64, 0), N_IN, dot=True)
        qs, d, m, sc, mn, mode, offset = p.kernel_args
        y = np.empty((2, 64), np.float32)
        for kernel in (one, many):
            kernel(qs, d, m, sc, mn, mode, offset, x, y, no_parts)  # fits
            for wrong in {0, 1, 2, BYTES, SIX, THREE, TWO, LEVELS, LEVELS_K} - {mode}:
                with pytest.raises(AssertionError):
                    kernel(qs, d, m, sc, mn, wrong, offset, x, y, no_parts)
            with pytest.raises(AssertionError):  # scales of a matrix half as wide (contiguous copies:
                # the kernels' own signature, no second compile)
                kernel(qs, d[:, : max(1, d.shape[1] // 2)].copy(), m, sc[:, : sc.shape[1] // 2].copy(), mn, mode,
                       offset, x, y, no_parts)
            with pytest.raises(AssertionError):  # x narrower than the rows
                kernel(qs, d, m, sc, mn, mode, offset, x[:, :N_IN // 2].copy(), y, no_parts)
            with pytest.raises(AssertionError):  # fewer rows of y than of x
                kernel(qs, d, m, sc, mn, mode, offset, x, y[:1], no_parts)
            with pytest.raises(AssertionError):  # column-range sums that do not hold a group
                kernel(qs, d, m, sc, mn, mode, offset, x, y, np.zeros((2, 2, 32), np.float32))
        out = np.empty((N_IN, 64), np.float32)
        unpack(qs, d, m, sc, mn, mode, offset, 0, 1, out)
        for g0, g1, o in ((0, 2, out), (0, 1, out[:N_IN // 2])):
            with pytest.raises(AssertionError):
                unpack(qs, d, m, sc, mn, mode, offset, g0, g1, o)
        if qtype == T.Q2_K:  # another family's kernel refuses this layout (one call: each foreign
            with pytest.raises(AssertionError):  # signature is a compile of its own)
                pk.matvec_dot_nibbles(qs, d, m, sc, mn, mode, offset, x, y, no_parts)
    q4 = pack(T.Q4_0, weights(T.Q4_0, 64, 0), N_IN, dot=True)  # and this family's kernels another's layout
    with pytest.raises(AssertionError):
        pk.matvec_dot_crumbs(*q4.kernel_args, x, np.empty((2, 64), np.float32), no_parts)


@pytest.mark.parametrize("qtype", sorted(DOT_ONLY_TYPES, key=int), ids=lambda t: t.name)
def test_dot_only_packing_in_chunks_equals_packing_the_concatenation(monkeypatch, qtype):
    """q|k|v parts packed a group of rows at a time (chunks straddling the parts) as one matrix."""
    from purelm.backends.numba_kernels import packing

    monkeypatch.setattr(packing, "CHUNK_BYTES", 1)
    parts = [weights(qtype, n, i) for i, n in enumerate((72, 40, 41))]
    split = packing.pack(qtype, parts, N_IN, dot=True)
    whole = packing.pack(qtype, np.concatenate(parts), N_IN, dot=True)
    assert split.arrays.keys() == whole.arrays.keys()
    for name in whole.arrays:
        np.testing.assert_array_equal(split.arrays[name], whole.arrays[name], err_msg=name)
