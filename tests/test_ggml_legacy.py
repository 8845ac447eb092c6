"""The legacy containers (ggml, ggmf v1, ggjt v1-v3): each architecture and container version written by
tools/write_ggml_legacy.py from the tiny GGUF fixtures loads with the same tensors and gives the same
logits; llama.cpp's convert_llama_ggml_to_gguf.py agrees with the reader; the old block layouts decode
as the ggml.c of their time did; hostile files end in one FormatError."""
import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import purelm
from purelm.backends.numpy_backend import NumpyBackend
from purelm.cli import main
from purelm.errors import FormatError
from purelm.formats import ggml_legacy as gl
from purelm.formats.gguf import GGUFFile
from purelm.generate import prefill
from purelm.models import build_model
from purelm.quant import dequantize
from purelm.quant.types import GGMLType
from conftest import LLAMA_CPP

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests/fixtures"
LEGACY = FIXTURES / "legacy"
IDS = [5, 17, 42, 100, 7, 9, 261, 314]

_spec = importlib.util.spec_from_file_location("write_ggml_legacy", ROOT / "tools/write_ggml_legacy.py")
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)

ARCHS = ["llama", "gpt2", "gptj", "gptneox", "gptneox_seq", "bloom", "mpt", "falcon", "falcon_mqa"]
# (container, version, qnt): every container version, ggml examples at each quantization version
CONTAINERS = [("ggml", 0, 0), ("ggml", 0, 1), ("ggml", 0, 2), ("ggmf", 1, 0), ("ggjt", 1, 0), ("ggjt", 2, 0),
              ("ggjt", 3, 0)]


def _reference_logits(gguf_path: Path, legacy: gl.LegacyFile) -> np.ndarray:
    """The GGUF fixture's logits, with the metadata a legacy file cannot carry (LLaMA's RMS epsilon)
    set as the legacy reader sets it."""
    f = GGUFFile(gguf_path)
    key = "llama.attention.layer_norm_rms_epsilon"
    if key in f.metadata:
        f.metadata._values[key] = legacy.metadata[key]
    model = build_model(f, NumpyBackend())
    return prefill(model, model.new_cache(64), IDS, all_logits=True)


def _same_tensors(a, b) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (t.type, t.shape) == (u.type, u.shape), name
        assert np.array_equal(t.data, u.data), name


@pytest.mark.parametrize("container,version,qnt", CONTAINERS, ids=lambda v: str(v))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_and_container_gives_the_gguf_logits(tmp_path, arch, container, version, qnt):
    qtype = {0: "q4_0", 1: "q8_0", 2: "q4_0", 3: "f16"}[(ARCHS.index(arch) + version + qnt) % 4]
    src = FIXTURES / f"{arch}-{qtype}.gguf"
    path = tmp_path / "m.bin"
    writer.write(src, path, container, version, qnt)
    legacy = gl.LegacyFile(path)
    assert legacy.architecture == arch.split("_")[0]
    _same_tensors(legacy, GGUFFile(src))  # layouts 1 and 2 converted back exactly (f16-exact scales)
    got = purelm.load(path, backend="numpy").logits(IDS)
    assert np.array_equal(got, _reference_logits(src, legacy))


def test_layouts_follow_container_and_quantization_version(tmp_path):
    cases = {("ggml", 0, 0, "llama"): 1, ("ggmf", 1, 0, "llama"): 1, ("ggjt", 1, 0, "llama"): 1,
             ("ggjt", 2, 0, "llama"): 2, ("ggjt", 3, 0, "llama"): 3, ("ggml", 0, 0, "gpt2"): 1,
             ("ggml", 0, 1, "gpt2"): 2, ("ggml", 0, 2, "gpt2"): 3}
    sizes = {}
    for (container, version, qnt, arch), layout in cases.items():
        path = tmp_path / "m.bin"
        writer.write(FIXTURES / f"{arch}-q8_0.gguf", path, container, version, qnt)
        f = gl.LegacyFile(path)
        assert (f.container, f.version, f.layout) == (container, version, layout)
        sizes[container, version, qnt, arch] = path.stat().st_size
    # layouts 1-2 store q8_0 with an f32 scale: 36 bytes a block on disk instead of 34
    blocks = sum(t.data.nbytes // 34 for t in GGUFFile(FIXTURES / "gpt2-q8_0.gguf").tensors.values()
                 if t.type == GGMLType.Q8_0)
    assert sizes["ggml", 0, 0, "gpt2"] == sizes["ggml", 0, 1, "gpt2"] == sizes["ggml", 0, 2, "gpt2"] + 2 * blocks


def test_ggjt_is_memory_mapped_and_ggml_is_read(tmp_path):
    mapped = gl.LegacyFile(LEGACY / "llama-q4_0.ggjtv3.bin")
    assert all(not t.data.flags.writeable for t in mapped.tensors.values())  # views of the read-only map
    assert all(t.offset % 32 == 0 for t in mapped.tensors.values())
    read = gl.LegacyFile(LEGACY / "llama-q4_0.ggml.bin")  # unaligned: copied out of the map
    assert all(t.data.flags.writeable for t in read.tensors.values())


def test_committed_fixtures_are_what_the_writer_makes(tmp_path):
    for stem, container, version, qnt in writer.FIXTURES:
        name = writer.fixture_name(stem, container, version, qnt)
        writer.write(FIXTURES / f"{stem}.gguf", tmp_path / name, container, version, qnt)
        assert (tmp_path / name).read_bytes() == (LEGACY / name).read_bytes(), name
    assert sorted(p.name for p in LEGACY.glob("*.bin")) == sorted(
        writer.fixture_name(*f) for f in writer.FIXTURES)


# -- the old block layouts, decoded as ggml.c before ggml@fe48e22f (layout 1) / b0d536bb (layout 2) did


def _old_dequantize(raw: np.ndarray, qtype: GGMLType, layout: int) -> np.ndarray:
    """One row of legacy blocks to float32, written from the scalar dequantize_row_* of the time."""
    out = []
    size = {GGMLType.Q4_0: 20, GGMLType.Q4_1: 24, GGMLType.Q8_0: 36, GGMLType.Q5_0: 22, GGMLType.Q5_1: 24}[qtype]
    for blk in raw.reshape(-1, size):
        b = blk.tobytes()
        if qtype == GGMLType.Q8_0:
            d = struct.unpack_from("<f", b)[0]
            out += [d * q for q in struct.unpack_from("<32b", b, 4)]
            continue
        if qtype in (GGMLType.Q4_0, GGMLType.Q4_1):
            d, m = struct.unpack_from("<ff", b) if qtype == GGMLType.Q4_1 else (struct.unpack_from("<f", b)[0], None)
            qs, qh, off = b[8 if m is not None else 4:], 0, 8
        else:
            d, m = struct.unpack_from("<ee", b) if qtype == GGMLType.Q5_1 else (struct.unpack_from("<e", b)[0], None)
            at = 4 if m is not None else 2
            qh, qs, off = struct.unpack_from("<I", b, at)[0], b[at + 4:], 16
        q = [0] * 32
        for j in range(16):
            lo, hi = qs[j] & 0x0F, qs[j] >> 4
            if layout == 1:  # pairs: weights 2j, 2j+1
                q[2 * j], q[2 * j + 1] = lo, hi
            else:  # halves: weights j, j+16
                q[j], q[j + 16] = lo, hi
        q = [v | (((qh >> i) & 1) << 4) for i, v in enumerate(q)]
        out += [d * v + m if m is not None else d * (v - off) for v in q]
    return np.array(out, np.float32)


@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0])
def test_old_blocks_convert_to_the_same_weights(qtype, layout):
    rng = np.random.default_rng(int(qtype) * 10 + layout)
    size = {GGMLType.Q4_0: 20, GGMLType.Q4_1: 24, GGMLType.Q8_0: 36, GGMLType.Q5_0: 22, GGMLType.Q5_1: 24}[qtype]
    rows = rng.integers(0, 256, (3, 4 * size), dtype=np.uint8)
    blocks = rows.reshape(3, 4, size)
    scales = rng.uniform(-2, 2, (3, 4, 2)).astype(np.float16)
    if qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):  # f32 scales holding float16 values: exact
        n = 2 if qtype == GGMLType.Q4_1 else 1
        blocks[..., :4 * n] = scales[..., :n].astype("<f4").view(np.uint8)
    else:
        blocks[..., :4] = scales.view(np.uint8)
    if layout == 2 and qtype in (GGMLType.Q5_0, GGMLType.Q5_1):
        converted = gl.convert_blocks("t", "w", rows, qtype, layout)
        assert converted is rows  # layout 2 is GGUF's for q5
    converted = gl.convert_blocks("t", "w", rows, qtype, layout)
    got = dequantize(converted, qtype, (3, 128))
    want = np.stack([_old_dequantize(r, qtype, layout) for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_f32_scales_round_to_float16_or_are_refused():
    rows = np.zeros((1, 36), np.uint8)
    rows[0, 4:] = np.arange(32, dtype=np.int8).view(np.uint8)
    rows[0, :4] = np.array([0.1], "<f4").view(np.uint8)  # not a float16 value
    got = dequantize(gl.convert_blocks("t", "w", rows, GGMLType.Q8_0, 2), GGMLType.Q8_0, (1, 32))
    np.testing.assert_allclose(got[0], 0.1 * np.arange(32), rtol=2**-11)
    rows[0, :4] = np.array([1e6], "<f4").view(np.uint8)
    with pytest.raises(FormatError, match="beyond float16's range"):
        gl.convert_blocks("t", "w", rows, GGMLType.Q8_0, 2)


# -- llama.cpp's converter as the oracle


def _llama_cpp_convert(src: Path, out: Path) -> None:
    script = LLAMA_CPP / "convert_llama_ggml_to_gguf.py"
    if not script.exists():
        pytest.skip(f"llama.cpp's convert_llama_ggml_to_gguf.py is not at {script} (set PURELM_LLAMA_CPP_DIR)")
    # The script passes element shapes with its uint8 tensor bytes; gguf-py since 0.10 reads a uint8
    # tensor's shape as bytes and fails on every file (llama.cpp issue #11976). The shim gives the shape
    # back its element meaning; nothing else of the script or gguf-py changes.
    shim = ("import runpy, sys, gguf.gguf_writer as w\n"
            "w.quant_shape_from_byte_shape = lambda shape, qtype: tuple(shape)\n"
            "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {**os.environ, "NO_LOCAL_GGUF": "1"}
    r = subprocess.run([sys.executable, "-c", shim, str(script), "-i", str(src), "-o", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("stem,container,version,spm", [
    ("llama-q4_0", "ggjt", 3, False), ("llama-q8_0", "ggjt", 3, True), ("llama-f16", "ggjt", 2, False),
    ("llama-f32", "ggml", 0, False), ("llama-f16", "ggmf", 1, True)])
def test_llama_cpp_converter_agrees(tmp_path, stem, container, version, spm):
    """Tensors, hyperparameters and vocabulary (tokens, scores, types, special ids) as llama.cpp's
    converter reads the same file; `spm`: a real SentencePiece vocabulary (tests/fixtures/spm)."""
    src = tmp_path / "m.bin"
    writer.write(FIXTURES / f"{stem}.gguf", src, container, version,
                 spm=FIXTURES / "spm/tokenizer.model" if spm else None)
    _llama_cpp_convert(src, tmp_path / "ref.gguf")
    ref, ours = GGUFFile(tmp_path / "ref.gguf"), gl.LegacyFile(src)
    _same_tensors(ref, ours)
    skip = {"general.name", "general.description"}  # the file's name and a free text
    assert set(ref.metadata) - skip <= set(ours.metadata)
    for key in set(ref.metadata) - skip:
        a, b = ref.metadata[key], ours.metadata[key]
        assert np.array_equal(np.asarray(a), np.asarray(b)), key


# -- purelm convert old.bin new.gguf


def test_convert_round_trip(tmp_path, capsys):
    src = LEGACY / "llama-q4_0.ggjtv1.bin"
    out = tmp_path / "new.gguf"
    assert main(["convert", str(src), str(out)]) == 0
    assert "GGJT v1 llama" in capsys.readouterr().out
    new, old = GGUFFile(out), gl.LegacyFile(src)
    _same_tensors(new, old)
    assert set(new.metadata) == set(old.metadata)
    for key in new.metadata:
        assert np.array_equal(np.asarray(new.metadata[key]), np.asarray(old.metadata[key])), key
    assert np.array_equal(purelm.load(out, backend="numpy").logits(IDS), purelm.load(src, backend="numpy").logits(IDS))
    # the merges rebuilt from a byte-level vocabulary are written out too
    assert main(["convert", str(LEGACY / "mpt-q4_0.ggml-qnt1.bin"), str(out)]) == 0
    assert list(GGUFFile(out).metadata["tokenizer.ggml.merges"]) == list(
        GGUFFile(FIXTURES / "mpt-q4_0.gguf").metadata["tokenizer.ggml.merges"])


def test_convert_refuses_type_and_leaves_nothing_on_failure(tmp_path, capsys):
    out = tmp_path / "new.gguf"
    assert main(["convert", str(LEGACY / "llama-q4_0.ggjtv3.bin"), str(out), "--type", "q8_0"]) == 2
    bad = tmp_path / "bad.bin"
    bad.write_bytes((LEGACY / "llama-q4_0.ggjtv3.bin").read_bytes()[:-100])
    assert main(["convert", str(bad), str(out)]) == 1
    assert "truncated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]


def test_info_and_tokenize_open_legacy_files(capsys):
    assert main(["info", str(LEGACY / "falcon-q4_0.ggjtv3.bin")]) == 0
    assert "GGJT v3 (legacy)" in capsys.readouterr().out
    assert main(["tokenize", str(LEGACY / "gpt2-q4_0.ggml-qnt0.bin"), "--ids", "the cat"]) == 0
    assert capsys.readouterr().out.strip() == "[261, 314]"


# -- the vocabulary


def test_byte_level_vocabulary_tokenizes_as_the_gguf_file():
    text = (FIXTURES / "agreement.txt").read_text()[:3000]
    from purelm.tokenizer import Tokenizer

    for name, pre in (("gpt2-q4_0.ggml-qnt0.bin", "gpt-2"), ("mpt-q4_0.ggml-qnt1.bin", "mpt")):
        legacy = purelm.load(LEGACY / name, backend="numpy")
        assert legacy.metadata["tokenizer.ggml.pre"] == pre
        # the GGUF fixture's vocabulary and merges (it says pre "default", as its converter wrote for the
        # tiny model: llama.cpp's default split), tokenized with GPT-2's split as the legacy file's is
        meta = dict(GGUFFile(FIXTURES / (name.split(".")[0] + ".gguf")).metadata)
        ref = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": pre})
        assert legacy.tokenize(text) == ref.encode(text), name
        assert legacy.detokenize(legacy.tokenize(text)) == text
    # Falcon's and BLOOM's files get llama.cpp's pre-tokenizers for them (the tiny fixtures say "default")
    falcon = purelm.load(LEGACY / "falcon-q4_0.ggjtv3.bin", backend="numpy")
    assert falcon.metadata["tokenizer.ggml.pre"] == "falcon"
    assert falcon.detokenize(falcon.tokenize(text)) == text


def test_mpt_latin1_tokens_and_merges_from_ranks():
    for b in range(256):  # ggml's MPT converter: chr(byte) then UTF-8
        assert gl._mpt_bytes(chr(b).encode()) == bytes([b])
    assert gl._mpt_bytes(b"\xff\xfe") == b"\xff\xfe"  # not UTF-8: taken as it is
    # every split into two tokens, by the token's id, then the parts' ids (transformers' tiktoken converter)
    assert gl.merges_from_ranks(["a", "b", "c", "ab", "abc", "bc"]) == ["a b", "a bc", "ab c", "b c"]
    assert gl.merges_from_ranks(["a", "b", "<|x|>", "ab"], [1, 1, 3, 1]) == ["a b"]


def test_merges_from_ranks_tokenize_a_real_vocabulary_as_its_merges(smollm2_path):
    """SmolLM2's byte-level BPE (49152 tokens, ids in merge order as a BPE trainer assigns them): the
    merges rebuilt from the ids alone tokenize the agreement text as the file's own merges do."""
    from purelm.tokenizer import Tokenizer

    meta = dict(GGUFFile(smollm2_path).metadata)
    rebuilt = {**meta, "tokenizer.ggml.merges": gl.merges_from_ranks(list(meta["tokenizer.ggml.tokens"]),
                                                                      list(meta["tokenizer.ggml.token_type"]))}
    text = (FIXTURES / "agreement.txt").read_text()
    ids = Tokenizer.from_gguf_metadata(meta).encode(text)
    assert len(ids) > 2000 and Tokenizer.from_gguf_metadata(rebuilt).encode(text) == ids


@pytest.mark.parametrize("container,version", [("ggmf", 1), ("ggjt", 3)])
def test_llama_sentencepiece_vocabulary_tokenizes_as_sentencepiece(tmp_path, container, version):
    """A real SentencePiece model's 320 pieces (tests/fixtures/spm) written as convert-pth-to-ggml.py did:
    the legacy file's tokenizer gives sentencepiece's own ids and text for the whole corpus. (An
    unversioned ggml file has no scores, so its BPE pieces cannot be merged as trained.)"""
    import json

    path = tmp_path / "m.bin"
    writer.write(FIXTURES / "llama-q4_0.gguf", path, container, version, spm=FIXTURES / "spm/tokenizer.model")
    llm = purelm.load(path, backend="numpy")
    ref = json.loads((FIXTURES / "spm/reference.json").read_text(encoding="utf-8"))
    for case in ref["cases"]:
        ids = llm.tokenize(case["text"], add_special=False, parse_special=False)
        assert ids == case["ids"], case["text"]
        assert llm.detokenize(ids) == case["decoded"]


def test_llama_vocabulary_follows_llama_cpp():
    f = gl.LegacyFile(LEGACY / "llama-q4_0.ggml.bin")  # ggml: no scores in the file
    tokens, types = f.metadata["tokenizer.ggml.tokens"], list(f.metadata["tokenizer.ggml.token_type"])
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert not np.any(f.metadata["tokenizer.ggml.scores"])
    assert all(t.startswith("<0x") for t, k in zip(tokens, types) if k == 6)
    assert any(t.startswith("\u2581") for t in tokens)


# -- hostile files


def _blob(name: str = "llama-q4_0.ggjtv3.bin") -> bytearray:
    return bytearray((LEGACY / name).read_bytes())


def _raises(tmp_path, data: bytes, match: str | None = None) -> FormatError:
    path = tmp_path / "h.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=match) as e:
        purelm.load(path, backend="numpy")
    return e.value


def _tensor_header_at(data: bytes) -> int:
    """Offset of the first tensor header of a legacy LLaMA fixture (after hyperparameters and vocabulary)."""
    f = gl._Cursor("x", memoryview(bytes(data)))
    f.pos = 8 if data[:4] != b"lmgg" else 4
    return gl._Layout(f, gl.MAGICS[bytes(data[:4])], 3, gl.ARCH_BY_NAME["llama"]).tensors_at


def test_truncated_at_every_section_is_one_format_error(tmp_path):
    for name in ("llama-q4_0.ggjtv3.bin", "llama-q4_0.ggml.bin"):
        data = _blob(name)
        first = _tensor_header_at(data)
        cuts = [0, 1, 3, 4, 5, 7, 8, 12, 20, 35, 36, 37, 40, 41, 100, first - 5, first - 1, first, first + 4,
                first + 12, first + 15, first + 30, first + 60, len(data) // 2, len(data) - 33, len(data) - 1]
        cuts += list(range(36, first, 97))
        for cut in cuts:
            err = _raises(tmp_path, data[:cut])
            assert err.path.endswith("h.bin")


def test_hostile_counts_types_and_dims(tmp_path):
    data = _blob()
    first = _tensor_header_at(data)
    put = lambda d, at, v, fmt="<i": (struct.pack_into(fmt, d, at, v), d)[1]  # noqa: E731
    _raises(tmp_path, b"", "empty")
    _raises(tmp_path, b"xxxx" + bytes(40), "not a GGUF file")  # neither kind: the GGUF reader says so
    (tmp_path / "x.bin").write_bytes(b"xxxx" + bytes(40))
    with pytest.raises(FormatError, match="not a ggml, ggmf or ggjt file"):
        gl.LegacyFile(tmp_path / "x.bin")
    _raises(tmp_path, put(_blob(), 4, 4, "<I"), "ggjt version 4 is unknown")
    _raises(tmp_path, b"fmgg" + struct.pack("<I", 2) + bytes(64), "ggmf version 2 is unknown")
    for n_vocab, problem in ((2**31 - 1, "cannot fit|need at least"), (-1, "at least 1"), (0, "at least 1"),
                             (10**6, "need at least 8000000 bytes")):
        assert _raises(tmp_path, put(_blob(), 8, n_vocab), problem).field == "n_vocab"
    _raises(tmp_path, put(_blob(), 36, 2**31 - 1, "<I"), "vocabulary item")  # the first token's length
    # the first tensor header: n_dims, name length, type, dims
    for n_dims in (0, 5, -1, 2**31 - 1):
        _raises(tmp_path, put(_blob(), first, n_dims), f"n_dims is {n_dims}; must be 1 to 4")
    for name_len in (0, -1, 2**31 - 1, 5000):
        _raises(tmp_path, put(_blob(), first + 4, name_len), f"name length is {name_len}; must be 1 to 4096")
    _raises(tmp_path, put(_blob(), first + 8, 4), "q4_2 .*no GGUF equivalent")
    _raises(tmp_path, put(_blob(), first + 8, 99), "unknown tensor type id 99")
    for dims, problem in (((2**31 - 1, 2**31 - 1), "not a multiple of the Q4_0 block size"),
                          ((64, 2**31 - 1), "beyond the end"), ((-64, 320), "invalid dimensions"),
                          ((2**31 - 32, 2**31 - 1), "beyond the end"), ((33, 320), "not a multiple")):
        d = _blob()
        struct.pack_into("<ii", d, first + 12, *dims)
        _raises(tmp_path, d, problem)
    # a K-quant in a ggjt v2 file, a retired type id in a ggml file
    d = put(_blob(), 4, 2, "<I")
    _raises(tmp_path, put(d, first + 8, 10), "Q2_K cannot appear in a layout-2")


def test_hostile_names_and_hyperparameters(tmp_path):
    data = _blob()
    first = _tensor_header_at(data)
    n_dims, name_len = struct.unpack_from("<ii", data, first)
    name_at = first + 12 + 4 * n_dims
    d = _blob()
    d[name_at:name_at + 3] = b"xyz"  # tok_embeddings.weight -> xyz_embeddings.weight
    _raises(tmp_path, d, "tensor 'xyz_embeddings.weight': is not a llama tensor name")
    # a second tensor renamed to the first's name
    f = gl.LegacyFile(LEGACY / "llama-q4_0.ggjtv3.bin")
    second = f.tensors["output_norm.weight"].offset  # after its header: walk back over 'norm.weight'
    d = _blob()
    at = bytes(d).rindex(b"norm.weight", 0, second)
    d[at:at + 11] = b"norm.weighx"
    _raises(tmp_path, d, "not a llama tensor name")
    # GPT-2's n_vocab written twice must agree; a GPT-NeoX parallel-residual flag is 0 or 1
    g = _blob("gpt2-q4_0.ggml-qnt0.bin")
    struct.pack_into("<i", g, 4 + 6 * 4, 7)
    _raises(tmp_path, g, "before the vocabulary")
    neox = tmp_path / "neox.bin"
    writer.write(FIXTURES / "gptneox-q4_0.gguf", neox, "ggjt", 3)
    n = bytearray(neox.read_bytes())
    struct.pack_into("<i", n, 8 + 6 * 4, 2)
    _raises(tmp_path, n, "use_parallel_residual")
    # a ggml-example file whose ftype claims a future quantization version
    g = _blob("mpt-q4_0.ggml-qnt1.bin")
    struct.pack_into("<i", g, 4 + 7 * 4, 3002)
    _raises(tmp_path, g, "quantization version 3")
    # hyperparameters the model cannot use
    d = _blob()
    struct.pack_into("<i", d, 8 + 3 * 4, 0)  # n_head = 0
    _raises(tmp_path, d, "head_count")


def test_not_a_regular_file(tmp_path):
    with pytest.raises(FormatError, match="not a regular file"):
        gl.LegacyFile(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FormatError):
        purelm.load(fifo)
