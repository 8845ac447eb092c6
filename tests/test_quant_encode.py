"""purelm.quant.quantize against bytes llama.cpp wrote (tests/fixtures/quant_vectors.npz, made by
tools/quant_vectors.py through ggml_quantize_chunk, the function llama-quantize calls), with and
without an importance matrix: awkward rows byte for byte, many synthetic rows by digest; then
round-trip sanity and input checks."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numba
import numpy as np
import pytest

import purelm.quant as quant
from purelm.errors import PurelmError
from purelm.quant import GGMLType as T
from purelm.quant import dequantize, quantize
from purelm.quant.types import BLOCK_INFO, row_bytes

VECTORS = Path(__file__).parent / "fixtures" / "quant_vectors.npz"
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
         T.IQ4_NL, T.IQ4_XS]
NEW_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
# Relative RMS error of a round trip on Gaussian rows (measured 0.29, 0.15, 0.070, 0.036, 0.018,
# 0.075, 0.076, 0.085, 0.077, 0.042, 0.037, 0.005), with some room.
MAX_ERROR = {T.Q2_K: 0.33, T.Q3_K: 0.17, T.Q4_K: 0.08, T.Q5_K: 0.04, T.Q6_K: 0.02,
             T.IQ4_NL: 0.085, T.IQ4_XS: 0.085, T.Q4_0: 0.095, T.Q4_1: 0.085, T.Q5_0: 0.047,
             T.Q5_1: 0.042, T.Q8_0: 0.006}


# The fixture's maker, for its synthetic rows and digests.
_spec = importlib.util.spec_from_file_location(
    "quant_vectors", Path(__file__).parents[1] / "tools" / "quant_vectors.py")
MAKER = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MAKER)


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    with np.load(VECTORS) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def synthetic(vectors) -> tuple[np.ndarray, np.ndarray]:
    return MAKER.synthetic_rows(*(int(v) for v in vectors["synthetic"]))


def gaussian(rows: int, cols: int, seed: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_match_llama_cpp(vectors, qtype, with_imatrix):
    x = vectors["x"]
    imatrix = vectors["imatrix"] if with_imatrix else None
    expected = vectors[qtype.name + ("_imatrix" if with_imatrix else "")]
    got = quantize(x, qtype, imatrix)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    bad = np.flatnonzero((got != expected).any(axis=1))
    assert bad.size == 0, f"rows differing from llama.cpp: {bad.tolist()}"


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_many_rows_match_llama_cpp(vectors, synthetic, qtype, with_imatrix):
    # Per-row digests of llama.cpp's bytes for rows the maker and the test both generate.
    x, imatrix = synthetic
    key = qtype.name + "_synthetic" + ("_imatrix" if with_imatrix else "")
    got = MAKER.row_digests(quantize(x, qtype, imatrix if with_imatrix else None))
    bad = np.flatnonzero((got != vectors[key]).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {len(x)} rows differ from llama.cpp's, first {bad[:10].tolist()}"


def test_thread_count_does_not_change_bytes(vectors):
    x, imatrix = vectors["x"], vectors["imatrix"]
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = [quantize(x, t, imatrix) for t in (T.Q4_K, T.IQ4_XS)]
    finally:
        numba.set_num_threads(threads)
    assert all((a == quantize(x, t, imatrix)).all() for a, t in zip(one, (T.Q4_K, T.IQ4_XS)))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_error(qtype):
    x = gaussian(32, 512)
    for imatrix in (None, np.ones(512, np.float32)):
        y = dequantize(quantize(x, qtype, imatrix), qtype, x.shape)
        err = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
        assert err < MAX_ERROR[qtype], (qtype.name, imatrix is not None, err)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_imatrix_favours_weighted_columns(qtype):
    # Every 8th column matters 1000x more: its error must drop (Q8_0 ignores the matrix).
    x = gaussian(32, 512, seed=4)
    imatrix = np.full(512, 1e-3, np.float32)
    imatrix[::8] = 1
    plain, weighted = quantize(x, qtype), quantize(x, qtype, imatrix)
    if qtype == T.Q8_0:
        assert (plain == weighted).all()
        return

    def error(q: np.ndarray) -> float:
        e = (dequantize(q, qtype, x.shape) - x)[:, ::8]
        return float(np.sqrt(np.mean(e ** 2)))

    assert error(weighted) < 0.8 * error(plain)


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_dtypes_layouts_and_chunks(qtype, monkeypatch):
    x64 = np.random.default_rng(5).standard_normal((2, 3, 512)) * 0.05
    x32 = x64.astype(np.float32)
    expected = quantize(x32.reshape(6, 512), qtype)
    assert quantize(x32, qtype).shape == (2, 3, row_bytes(qtype, 512))
    assert (quantize(x64, qtype).reshape(6, -1) == expected).all()  # rounded to float32 first
    reversed_cols = np.ascontiguousarray(x32[..., ::-1])[..., ::-1]  # a non-contiguous view
    assert (quantize(reversed_cols, qtype).reshape(6, -1) == expected).all()
    half = x32.astype(np.float16)
    assert (quantize(half, qtype) == quantize(half.astype(np.float32), qtype)).all()
    monkeypatch.setattr(quant, "ROW_CHUNK_WEIGHTS", 1100)  # two rows a call, a partial last one
    assert (quantize(x32, qtype).reshape(6, -1) == expected).all()


def test_empty_and_all_zero():
    assert quantize(np.zeros((0, 256), np.float32), T.Q4_K).shape == (0, 144)
    assert quantize(np.zeros((2, 0), np.float32), T.Q6_K).shape == (2, 0)
    for qtype in NEW_TYPES:
        zero = quantize(np.zeros((1, 256), np.float32), qtype, np.ones(256))
        assert not dequantize(zero, qtype, (1, 256)).any()


def test_float_types_ignore_the_imatrix():
    x = gaussian(2, 64)
    for qtype in (T.F32, T.F16, T.BF16):
        assert (quantize(x, qtype, np.ones(64)) == quantize(x, qtype)).all()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.IQ4_NL, T.Q4_0, T.Q8_0], ids=lambda t: t.name)
def test_non_finite_weights_refused(qtype):
    for bad in (np.nan, np.inf, -np.inf):
        x = gaussian(3, 256)
        x[2, 77] = bad
        with pytest.raises(PurelmError, match=r"non-finite value .* \(row 2, column 77\)"):
            quantize(x, qtype)
    x = gaussian(1, 256).astype(np.float64)
    x[0, 5] = 1e300  # finite, but inf in float32
    with pytest.raises(PurelmError, match="non-finite"):
        quantize(x, qtype)
    with pytest.raises(PurelmError, match="complex"):
        quantize(np.zeros(256, np.complex64), qtype)


def test_bad_imatrix_refused():
    x = gaussian(2, 256)
    cases = [
        (np.ones(255), r"shape \(255,\), expected \(256,\)"),
        (np.ones(512), r"shape \(512,\)"),
        (np.ones((2, 256)), r"shape \(2, 256\)"),
        (np.float32(1), r"shape \(\)"),
        (np.array(["1"] * 256), "must be numbers"),
        (np.r_[np.ones(255), np.nan], "weight 255 is nan"),
        (np.r_[np.inf, np.ones(255)], "weight 0 is inf"),
        (np.r_[np.ones(10), -1.0, np.ones(245)], "weight 10 is -1.0"),
    ]
    for qtype in (T.Q4_K, T.Q4_0, T.Q8_0, T.F16):
        for imatrix, message in cases:
            with pytest.raises(PurelmError, match=message):
                quantize(x, qtype, imatrix)


def test_row_length_and_type_checked():
    with pytest.raises(PurelmError, match="not a multiple of the block size 256"):
        quantize(np.zeros((2, 128), np.float32), T.Q4_K)
    with pytest.raises(PurelmError, match="not a multiple of the block size 256"):
        quantize(np.zeros((2, 288), np.float32), T.IQ4_XS, np.ones(288))
    with pytest.raises(PurelmError, match="Q8_K"):
        quantize(np.zeros(256, np.float32), T.Q8_K)
    assert BLOCK_INFO[T.IQ4_NL][0] == 32
    assert quantize(np.ones((1, 96), np.float32), T.IQ4_NL).shape == (1, 54)
