"""GGUF reader and writer: round trips with the gguf package (the format authors' code) and hostile files."""
import struct
import time

import gguf
import numpy as np
import pytest

from purelm.errors import FormatError
from purelm.formats.gguf import GGUFFile, GGUFWriter, ValueType
from purelm.quant import quantize
from purelm.quant.types import GGMLType


def test_reads_real_model_without_copying(smollm2_path):
    f = GGUFFile(smollm2_path)
    ref = gguf.GGUFReader(smollm2_path)
    assert f.version == 3 and f.architecture == "llama"
    assert f.metadata["llama.block_count"] == 30
    assert f.metadata["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
    assert f.metadata.types["llama.rope.freq_base"] == ValueType.FLOAT32
    ref_fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(f.metadata) == set(ref_fields)
    for key, field in ref_fields.items():
        ours, theirs = f.metadata[key], field.contents()
        if isinstance(ours, np.ndarray):
            np.testing.assert_array_equal(ours, theirs)
        else:
            assert ours == pytest.approx(theirs) if isinstance(theirs, float) else ours == theirs, key
    assert len(f.tensors) == len(ref.tensors) == 272
    for rt in ref.tensors:
        t = f.tensors[rt.name]
        assert t.type == GGMLType(int(rt.tensor_type))
        assert t.shape == tuple(int(d) for d in reversed(rt.shape.tolist()))
        assert t.offset == rt.data_offset
        assert not t.data.flags.writeable and not t.data.flags.owndata  # a view into the map
        np.testing.assert_array_equal(t.data.reshape(-1), np.asarray(rt.data).reshape(-1).view(np.uint8))


def test_open_is_lazy_for_large_arrays(smollm2_path):
    f = GGUFFile(smollm2_path)
    assert f.metadata.array_length("tokenizer.ggml.merges") == len(f.metadata["tokenizer.ggml.merges"]) > 40000


def _all_kinds(w):
    values = {
        "k.u8": (7, ValueType.UINT8), "k.i8": (-7, ValueType.INT8), "k.u16": (65535, ValueType.UINT16),
        "k.i16": (-300, ValueType.INT16), "k.u32": (4000000000, ValueType.UINT32), "k.i32": (-5, ValueType.INT32),
        "k.f32": (1.5, ValueType.FLOAT32), "k.bool": (True, ValueType.BOOL), "k.str": ("héllo ✓", ValueType.STRING),
        "k.u64": (2**63 + 5, ValueType.UINT64), "k.i64": (-(2**40), ValueType.INT64), "k.f64": (0.1, ValueType.FLOAT64),
    }
    for k, (v, t) in values.items():
        w.add(k, v, t)
    w.add("a.str", ["a", "", "ü" * 3] * 40)
    w.add("a.i32", [1, -2, 3])
    w.add("a.f32", [0.5, 1.5])
    w.add("a.nested", [[1, 2], [3]], ValueType.ARRAY, ValueType.ARRAY)
    return values


def test_writer_round_trip_through_gguf_package(tmp_path):
    path = tmp_path / "t.gguf"
    w = GGUFWriter(path)
    values = _all_kinds(w)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("f32", x)
    w.add_tensor("q8", quantize(x, GGMLType.Q8_0), GGMLType.Q8_0, x.shape)
    w.add_tensor("lazy", lambda: quantize(x, GGMLType.Q4_1), GGMLType.Q4_1, x.shape)
    w.write()

    ref = gguf.GGUFReader(path)
    for k, (v, t) in values.items():
        assert ref.fields[k].types[0] == gguf.GGUFValueType(int(t))
        got = ref.fields[k].contents()
        assert got == pytest.approx(v) if isinstance(v, float) else got == v
    assert ref.fields["a.str"].contents() == ["a", "", "üüü"] * 40
    assert ref.fields["a.i32"].contents() == [1, -2, 3]
    names = {t.name: t for t in ref.tensors}
    np.testing.assert_array_equal(names["f32"].data, x)
    np.testing.assert_array_equal(gguf.quants.dequantize(names["lazy"].data, gguf.GGMLQuantizationType.Q4_1),
                                  gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_1),
                                                         gguf.GGMLQuantizationType.Q4_1))

    ours = GGUFFile(path)
    assert ours.metadata["a.nested"][0].tolist() == [1, 2]
    assert ours.metadata["k.str"] == "héllo ✓" and ours.metadata["k.u64"] == 2**63 + 5
    np.testing.assert_array_equal(ours.tensors["f32"].dequantize(), x)


def test_reads_files_written_by_gguf_package(tmp_path):
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_array("arr", ["x", "y"])
    x = np.arange(96, dtype=np.float32).reshape(3, 32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("t", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(path)
    assert f.architecture == "llama" and f.metadata["llama.block_count"] == 3 and f.metadata["arr"] == ["x", "y"]
    np.testing.assert_array_equal(f.tensors["t"].dequantize(), gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0))


# ------------------------------------------------------------------------------------------ hostile files


def _header(version=3, n_tensors=0, n_kv=0):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _tensor_info(name=b"t", dims=(32,), type_id=0, offset=0):
    return _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset)


def _open(tmp_path, data: bytes):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    return GGUFFile(p)


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 32)


HOSTILE = {
    "bad magic": (b"GGML" + b"\0" * 40, "magic"),
    "old ggjt": (b"tjgg" + b"\0" * 40, "older GGML"),
    "version 99": (_header(99), "unsupported GGUF version 99"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "empty": (b"", "empty"),
    "huge kv count": (_header(n_kv=10**12), "cannot fit"),
    "huge tensor count": (_header(n_tensors=10**12), "cannot fit"),
    "1e12-element array": (_header(n_kv=1) + _str(b"a") + struct.pack("<IIQ", 9, 4, 10**12), "cannot fit"),
    "1e12 strings": (_header(n_kv=1) + _str(b"a") + struct.pack("<IIQ", 9, 8, 10**12), "cannot fit"),
    "huge string": (_header(n_kv=1) + _str(b"a") + struct.pack("<IQ", 8, 2**62), "truncated"),
    "unknown value type": (_header(n_kv=1) + _str(b"a") + struct.pack("<I", 99), "unknown metadata value type 99"),
    "unknown tensor type": (_pad(_header(n_tensors=1) + _tensor_info(type_id=99)) + b"\0" * 128, "unknown or unsupported tensor type id 99"),
    "retired type 4": (_pad(_header(n_tensors=1) + _tensor_info(type_id=4)) + b"\0" * 128, "tensor type id 4"),
    "tensor beyond EOF": (_pad(_header(n_tensors=1) + _tensor_info(dims=(32, 1000))) + b"\0" * 128, "beyond the end"),
    "offset beyond EOF": (_pad(_header(n_tensors=1) + _tensor_info(offset=2**63)) + b"\0" * 128, "beyond the end"),
    "dims overflow": (_pad(_header(n_tensors=1) + _tensor_info(dims=(32, 2**40, 2**40, 2**40))) + b"\0" * 128, "beyond the end"),
    "zero dim": (_pad(_header(n_tensors=1) + _tensor_info(dims=(32, 0))) + b"\0" * 128, "invalid dimensions"),
    "5 dims": (_pad(_header(n_tensors=1) + _tensor_info(dims=(1, 1, 1, 1, 1))) + b"\0" * 128, "n_dims is 5"),
    "bad block multiple": (_pad(_header(n_tensors=1) + _tensor_info(dims=(33,), type_id=8)) + b"\0" * 128, "not a multiple"),
    "misaligned": (_pad(_header(n_tensors=1) + _tensor_info(offset=4)) + b"\0" * 256, "not aligned"),
    "overlapping": (_pad(_header(n_tensors=2) + _tensor_info(b"a", offset=0, dims=(64,)) + _tensor_info(b"b", offset=64))
                    + b"\0" * 512, "overlaps"),
    "duplicate tensor": (_pad(_header(n_tensors=2) + _tensor_info(b"a") + _tensor_info(b"a", offset=128)) + b"\0" * 512, "duplicate"),
    "duplicate key": (_header(n_kv=2) + (_str(b"k") + struct.pack("<II", 4, 1)) * 2, "duplicate metadata key"),
    "bad alignment": (_header(n_kv=1) + _str(b"general.alignment") + struct.pack("<II", 4, 3), "power of two"),
    "deep nesting": (_header(n_kv=1) + _str(b"a") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 20
                     + struct.pack("<IQ", 4, 0), "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_raises_clear_error(tmp_path, case):
    data, words = HOSTILE[case]
    t = time.perf_counter()
    with pytest.raises(FormatError) as e:
        _open(tmp_path, data)
    assert words in str(e.value)
    assert str(tmp_path / "bad.gguf") in str(e.value)
    assert time.perf_counter() - t < 2  # no hang on hostile counts


def test_every_truncation_of_a_valid_file_is_caught(tmp_path):
    src = tmp_path / "ok.gguf"
    w = GGUFWriter(src)
    _all_kinds(w)
    w.add_tensor("t", np.ones((2, 32), np.float32))
    w.write()
    data = src.read_bytes()
    for cut in range(0, len(data) - 1):
        with pytest.raises(FormatError):
            _open(tmp_path, data[:cut])


def test_random_corruption_never_escapes_as_another_exception(tmp_path):
    src = tmp_path / "ok.gguf"
    w = GGUFWriter(src)
    _all_kinds(w)
    w.add_tensor("t", np.ones((2, 32), np.float32))
    w.add_tensor("q", quantize(np.ones((2, 64), np.float32), GGMLType.Q4_0), GGMLType.Q4_0, (2, 64))
    w.write()
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(1)
    for _ in range(400):
        bad = bytearray(data)
        for pos in rng.integers(0, len(bad), rng.integers(1, 4)):
            bad[pos] = rng.integers(0, 256)
        try:
            f = _open(tmp_path, bytes(bad))
        except FormatError:
            continue
        for t in f.tensors.values():  # whatever opened must be readable within bounds
            t.dequantize()


def test_a_fifo_or_device_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", tmp_path):
        with pytest.raises(FormatError, match="not a regular file"):
            GGUFFile(path)
