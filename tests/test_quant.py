"""purelm.quant against the oracle gguf.quants: every result must be bit-identical."""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import quants as gq

import purelm.quant as quant
from purelm.errors import PurelmError
from purelm.quant import (
    SUPPORTED_DEQUANT,
    SUPPORTED_QUANT,
    GGMLType,
    dequantize,
    dequantize_rows,
    quantize,
)
from purelm.quant.types import BLOCK_INFO, row_bytes

T = GGMLType
DEQUANT_TYPES = sorted(SUPPORTED_DEQUANT)
# gguf.quants encodes only these; the rest are checked against llama.cpp in test_quant_encode.py.
QUANT_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
BLOCK_TYPES = [t for t in DEQUANT_TYPES if BLOCK_INFO[t][0] > 1]

# Byte offsets of the f16 scale fields inside one block.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2],
    T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0],
}

# Overflowing scales, inf * 0 and the like are part of what we compare.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bit patterns, so -0.0 != 0.0 and NaN payloads count."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bits_equal(got: np.ndarray, expected: np.ndarray) -> None:
    expected = np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(bits(got), bits(expected))


def oracle_quantize(x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    out = gq.quantize(x, gguf.GGMLQuantizationType(int(qtype)))
    return np.ascontiguousarray(out).view(np.uint8)  # F32/F16 come back as floats


def oracle_dequantize(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    return gq.dequantize(raw, gguf.GGMLQuantizationType(int(qtype)))


def edge_rows(block: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of 2 blocks each covering the awkward cases, float32."""
    n = 2 * block

    def one_hot(v: float) -> np.ndarray:
        r = np.zeros(n)
        r[rng.integers(n)] = v
        return r

    normal = rng.standard_normal((8, n))
    rows = [
        *normal,
        np.zeros(n),
        normal[0] * 1e30, normal[1] * 1e4,        # overflows f16 scales / still finite
        normal[2] * 1e-30, normal[3] * 1e-6,      # underflows f16 / f16 subnormals
        np.abs(normal[4]), -np.abs(normal[5]),   # one-signed blocks
        np.abs(normal[6]) + 5, -np.abs(normal[7]) - 5,
        one_hot(3.7), one_hot(-3.7), one_hot(1e30),
        np.full(n, 0.3), np.full(n, -2.5), np.full(n, 1e-30),
        rng.integers(-8, 8, n), rng.integers(-16, 16, n),  # exact grid points
        np.concatenate([[127.0], rng.integers(-254, 255, n - 1) / 2]),  # .5 ties
        np.linspace(-1, 1, n),
    ]
    return np.array(rows, dtype=np.float32)


def random_blocks(qtype: GGMLType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks whose f16 scales are finite, of varied magnitude."""
    size = BLOCK_INFO[qtype][1]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.standard_normal(n_blocks) * 10.0 ** rng.uniform(-7, 2, n_blocks)
        scale[rng.random(n_blocks) < 0.05] = 0.0
        raw[:, off:off + 2] = scale.astype(np.float16).reshape(-1, 1).view(np.uint8)
    return raw


def random_float_bytes(qtype: GGMLType, n: int, rng: np.random.Generator) -> np.ndarray:
    """Finite random F32/F16/BF16 values as raw bytes."""
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 4, n)
    x[::7] = 0.0
    if qtype == T.F16:
        return x.astype(np.float16).view(np.uint8)
    x = x.astype(np.float32)
    if qtype == T.BF16:
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return x.view(np.uint8)


# --- quantize ---------------------------------------------------------------

def test_supported_sets():
    assert SUPPORTED_QUANT == set(QUANT_TYPES) | {
        T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS}
    assert SUPPORTED_DEQUANT == SUPPORTED_QUANT


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    x = edge_rows(max(BLOCK_INFO[qtype][0], 16), rng)
    got = quantize(x, qtype)
    assert got.dtype == np.uint8
    assert got.shape == (len(x), row_bytes(qtype, x.shape[1]))
    assert_bits_equal(got, oracle_quantize(x, qtype))
    # and the round trip decodes to the same floats as gguf's
    assert_bits_equal(dequantize(got, qtype, x.shape), oracle_dequantize(got, qtype))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_nd_and_other_dtypes(qtype):
    rng = np.random.default_rng(7)
    block = BLOCK_INFO[qtype][0]
    x64 = rng.standard_normal((2, 3, 2 * max(block, 8))) * 3
    for x in (x64, x64.astype(np.float16), x64.astype(np.float32)[..., ::-1]):
        got = quantize(x, qtype)
        assert got.shape == x.shape[:-1] + (row_bytes(qtype, x.shape[-1]),)
        assert_bits_equal(got, oracle_quantize(x, qtype))


def test_f16_rounding_from_float64():
    # Rounding float64 -> float32 -> float16 would differ from gguf's direct cast.
    x = np.array([1 + 2.0**-11 + 2.0**-40, 65520.0, 7e4, 1e-8, -3e-5, np.inf, np.nan])
    assert_bits_equal(quantize(x, T.F16), oracle_quantize(x, T.F16))


def test_bf16_rounding_and_nan():
    patterns = np.array([
        0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F80FFFF,  # ties to even, near ties
        0x7F7FFFFF, 0xFF7FFFFF,                          # rounds up to +-inf
        0x7F800000, 0xFF800000, 0x7F800001, 0xFFFFFFFF,  # inf, signalling / negative NaN
        0x7FC00000, 0x00000001, 0x80000000, 0x00000000,
    ], dtype=np.uint32)
    rng = np.random.default_rng(3)
    x = np.concatenate([patterns, rng.integers(0, 2**32, 242, dtype=np.uint32)]).view(np.float32)
    got = quantize(x, T.BF16)
    assert_bits_equal(got, oracle_quantize(x, T.BF16))
    assert_bits_equal(dequantize(got, T.BF16, x.shape), oracle_dequantize(got, T.BF16))


def test_quantize_many_chunks(monkeypatch):
    monkeypatch.setattr(quant, "CHUNK_WEIGHTS", 96)  # several chunks, a partial last one
    x = np.random.default_rng(5).standard_normal((7, 160)).astype(np.float32)
    for qtype in QUANT_TYPES:
        assert_bits_equal(quantize(x, qtype), oracle_quantize(x, qtype))


# --- dequantize -------------------------------------------------------------

@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    block, size = BLOCK_INFO[qtype]
    if block == 1:
        raw = random_float_bytes(qtype, 12 * 64, rng).reshape(12, -1)
    else:
        raw = random_blocks(qtype, 12 * 3, rng).reshape(12, 3 * size)
    n_cols = raw.shape[1] // size * block
    got = dequantize(raw, qtype, (12, n_cols))
    assert got.dtype == np.float32 and got.shape == (12, n_cols)
    assert np.isfinite(got).all()
    assert_bits_equal(got, oracle_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_arbitrary_bytes_matches_gguf(qtype):
    # Any bytes at all, inf/NaN scales included: same bits as gguf, no crash.
    block, size = BLOCK_INFO[qtype]
    width = 4 * max(size, 4)
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (5, width), dtype=np.uint8)
    got = dequantize(raw, qtype, (5, width // size * block))
    assert_bits_equal(got, oracle_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", [T.F32, T.Q4_1, T.Q5_0, T.Q3_K, T.Q6_K, T.IQ4_XS],
                         ids=lambda t: t.name)
def test_dequantize_layouts_and_readonly(qtype, monkeypatch):
    monkeypatch.setattr(quant, "CHUNK_WEIGHTS", 512)  # force several chunks
    rng = np.random.default_rng(11)
    block, size = BLOCK_INFO[qtype]
    n_cols = 4 * max(block, 64)
    rb = row_bytes(qtype, n_cols)
    if block == 1:
        raw2d = random_float_bytes(qtype, 9 * n_cols, rng).reshape(9, rb)
    else:
        raw2d = random_blocks(qtype, 9 * rb // size, rng).reshape(9, rb)
    expected = oracle_dequantize(raw2d, qtype)
    before = raw2d.copy()

    readonly = np.frombuffer(raw2d.tobytes(), dtype=np.uint8)  # like an mmap view
    assert not readonly.flags.writeable
    flat = dequantize(readonly, qtype, (9, n_cols))
    assert flat.flags.writeable and flat.flags.c_contiguous
    assert_bits_equal(flat, expected)
    assert_bits_equal(dequantize(raw2d, qtype, (9, n_cols)), expected)
    assert_bits_equal(dequantize(raw2d, qtype, (3, 3, n_cols)), expected.reshape(3, 3, n_cols))
    assert_bits_equal(dequantize(raw2d.tobytes(), qtype, (9, n_cols)), expected)
    np.testing.assert_array_equal(raw2d, before)


def test_dequantize_takes_typed_arrays_as_bytes():
    # GGUFReader hands F32/F16 tensors over as float arrays, not uint8.
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    assert_bits_equal(dequantize(x, T.F32, x.shape), x)
    h = x.astype(np.float16)
    assert_bits_equal(dequantize(h, T.F16, h.shape), h.astype(np.float32))
    out = dequantize(x, T.F32, x.shape)
    assert not np.shares_memory(out, x)


# --- dequantize_rows ----------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q8_0, T.Q4_1, T.Q4_K, T.Q5_K, T.IQ4_NL],
                         ids=lambda t: t.name)
def test_dequantize_rows_matches_full(qtype):
    rng = np.random.default_rng(21)
    block, size = BLOCK_INFO[qtype]
    n_rows, n_cols = 20, 2 * max(block, 32)
    rb = row_bytes(qtype, n_cols)
    if block == 1:
        table = random_float_bytes(qtype, n_rows * n_cols, rng).reshape(n_rows, rb)
    else:
        table = random_blocks(qtype, n_rows * rb // size, rng).reshape(n_rows, rb)
    table.setflags(write=False)
    full = dequantize(table, qtype, (n_rows, n_cols))

    rows = np.array([19, 0, 5, 5, 3])
    got = dequantize_rows(table, qtype, n_cols, rows)
    assert got.shape == (5, n_cols)
    assert_bits_equal(got, full[rows])
    assert_bits_equal(dequantize_rows(table.reshape(-1), qtype, n_cols, rows), full[rows])
    grid = np.array([[1, 2], [18, 1]], dtype=np.uint16)
    assert_bits_equal(dequantize_rows(table, qtype, n_cols, grid), full[grid])
    assert dequantize_rows(table, qtype, n_cols, np.array([], dtype=np.int64)).shape == (0, n_cols)


def test_dequantize_rows_errors():
    table = np.zeros((4, row_bytes(T.Q8_0, 64)), dtype=np.uint8)
    with pytest.raises(PurelmError, match="out of range"):
        dequantize_rows(table, T.Q8_0, 64, np.array([4]))
    with pytest.raises(PurelmError, match="out of range"):
        dequantize_rows(table, T.Q8_0, 64, np.array([-1]))
    with pytest.raises(PurelmError, match="integers"):
        dequantize_rows(table, T.Q8_0, 64, np.array([1.0]))
    with pytest.raises(PurelmError, match="whole number of rows"):
        dequantize_rows(table, T.Q8_0, 96, np.array([0]))
    with pytest.raises(PurelmError, match="type#99"):
        dequantize_rows(table, 99, 64, np.array([0]))


# --- errors -------------------------------------------------------------------

def test_unknown_and_unsupported_types():
    raw = np.zeros(64, dtype=np.uint8)
    with pytest.raises(PurelmError, match="type#99"):
        dequantize(raw, 99, (16,))
    with pytest.raises(PurelmError, match="Q8_1"):
        dequantize(raw, T.Q8_1, (32,))
    with pytest.raises(PurelmError, match="type#99"):
        quantize(np.zeros(32, np.float32), 99)
    with pytest.raises(PurelmError, match="Q8_K"):
        quantize(np.zeros(256, np.float32), T.Q8_K)
    with pytest.raises(PurelmError, match="'Q4_0'"):
        dequantize(raw, "Q4_0", (32,))
    # gguf's own enum and numpy integers work as type ids
    assert dequantize(raw[:18], gguf.GGMLQuantizationType.Q4_0, (32,)).shape == (32,)
    assert dequantize(raw[:18], np.int64(2), (32,)).shape == (32,)


def test_bad_lengths():
    raw = np.zeros(row_bytes(T.Q4_0, 64), dtype=np.uint8)
    assert dequantize(raw, T.Q4_0, (64,)).shape == (64,)
    assert dequantize(raw, int(T.Q4_0), (2, 32)).shape == (2, 32)
    with pytest.raises(PurelmError, match="needs 36 bytes, got 35"):
        dequantize(raw[:-1], T.Q4_0, (64,))
    with pytest.raises(PurelmError, match="needs"):
        dequantize(raw, T.Q4_0, (96,))
    with pytest.raises(PurelmError, match="not a multiple of the block size 32"):
        dequantize(raw, T.Q4_0, (2, 48))
    with pytest.raises(PurelmError, match="not a multiple of the block size 256"):
        dequantize(raw, T.Q4_K, (128,))
    with pytest.raises(PurelmError, match="not a multiple of the block size 32"):
        quantize(np.zeros((2, 48), np.float32), T.Q8_0)
    with pytest.raises(PurelmError):
        quantize(np.float32(1.0), T.F32)


# --- the real model file --------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    default = Path.home() / ".cache/purelm/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    path = Path(os.environ.get("PURELM_SMOLLM2") or default)
    if not path.is_file():
        pytest.skip(f"model file not found: {path} (set PURELM_SMOLLM2)")
    return path


def test_every_tensor_of_smollm2(smollm2_path):
    reader = gguf.GGUFReader(smollm2_path)
    seen = set()
    for tensor in reader.tensors:
        qtype = T(int(tensor.tensor_type))
        shape = tuple(int(n) for n in reversed(tensor.shape))  # numpy order
        got = dequantize(tensor.data, qtype, shape)
        expected = gq.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        assert_bits_equal(got, expected)
        seen.add(qtype)
    assert seen >= {T.Q4_1, T.Q8_0, T.F32}
