"""`purelm quantize` against llama.cpp's llama-quantize.

tests/fixtures/quantize_expectations.json (tools/quantize_expectations.py) holds what llama-quantize did:
for small models (three fixtures; two generated with 256-wide rows, one with 3-D expert tensors) the type
and a hash of every tensor it wrote, per TYPE, also with llama-imatrix's own files (GGUF and .dat); for
shape tables of SmolLM2-135M, TinyLlama-1.1B, a GQA and an 8-expert model, the types it chose.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import purelm
from purelm import cli, quant
from purelm.errors import FormatError, PurelmError, UsageError
from purelm.formats.gguf import GGUFFile, GGUFWriter, ValueType
from purelm.imatrix import load_imatrix
from purelm.quant.types import GGMLType
from purelm.quantize import FType, Hparams, choose_types, llama_order, parse_ftype, quantize_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
EXPECT = json.loads((FIX / "quantize_expectations.json").read_text())
MODELS = EXPECT["models"]
_spec = importlib.util.spec_from_file_location("quantize_expectations", ROOT / "tools" / "quantize_expectations.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def tensors_of(model: dict) -> list[tuple[str, tuple[int, ...], GGMLType]]:
    out = []
    for row in model["tensors"]:
        name, shape, t = row.split(" ")
        out.append((name, tuple(int(d) for d in shape.split("x")), GGMLType[t]))
    return out


def expected(model: dict, key: str, field: str = "choices") -> dict[str, str]:
    items = []
    for token in model[field][key].split(" "):
        t, _, n = token.partition("*")
        items += [t] * int(n or 1)
    names = [t[0] for t in tensors_of(model)]
    assert len(items) == len(names)
    return dict(zip(names, items))


def run_args(key: str) -> tuple[str, bool, bool]:
    ftype, _, flag = key.partition("/")
    return ftype, flag == "pure", flag == "imatrix"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_order_is_llama_quantizes(model):
    m = MODELS[model]
    assert llama_order([t[0] for t in tensors_of(m)]) == m["order"]


@pytest.mark.parametrize("model,key", [(m, k) for m in sorted(MODELS) for k in MODELS[m].get("runs", EXPECT["runs"])])
def test_type_choices_match_llama_quantize(model, key):
    m = MODELS[model]
    ftype, pure, with_imatrix = run_args(key)
    by_name = {t[0]: t for t in tensors_of(m)}
    got, _ = choose_types([by_name[n] for n in llama_order(list(by_name))], Hparams.from_metadata(model, m["hparams"]),
                          parse_ftype(ftype), with_imatrix, pure)
    want = expected(m, key)
    assert {n: t.name for n, t in got.items()} == want


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """The folder with the models tools/quantize_expectations.py generates (write_kmodel)."""
    folder = tmp_path_factory.mktemp("generated")
    tool.write_kmodel(folder / "kmodel-f16.gguf")
    tool.write_kmodel(folder / "kmoe-f16.gguf", moe=True)
    return folder


def source_of(model: str, generated: Path) -> Path:
    return generated / f"{model}.gguf" if model.startswith("km") else ROOT / MODELS[model]["fixture"]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".part", ".tmp") or p.name.startswith("out"))


@pytest.mark.parametrize("model,key", [(m, k) for m in sorted(MODELS) if "sha256" in MODELS[m]
                                       for k in MODELS[m].get("runs", EXPECT["runs"])])
def test_output_matches_llama_quantize(model, key, generated, tmp_path):
    """The file: types and tensor order as llama-quantize wrote them, and the same bytes per tensor."""
    m = MODELS[model]
    ftype, pure, with_imatrix = run_args(key)
    src, dst = source_of(model, generated), tmp_path / "out.gguf"
    imatrix = None
    if with_imatrix:
        imatrix = tmp_path / "imatrix.gguf"
        tool.write_imatrix(imatrix, [[n, list(s), t.name] for n, s, t in tensors_of(m)])
    want_types = expected(m, key)
    summary = quantize_file(src, dst, ftype, imatrix=imatrix, pure=pure, progress=False)
    from gguf import GGUFReader  # the oracle reads what purelm wrote

    reader = GGUFReader(dst)
    assert [t.name for t in reader.tensors] == m["order"]
    assert {t.name: t.tensor_type.name for t in reader.tensors} == want_types
    assert int(reader.fields["general.file_type"].parts[-1][0]) == parse_ftype(ftype).id
    want_hash = expected(m, key, "sha256")
    got_hash = {t.name: hashlib.sha256(bytes(t.data.reshape(-1).view(np.uint8))).hexdigest()[:12]
                for t in reader.tensors}
    differ = sorted(n for n in want_hash if got_hash[n] != want_hash[n])
    assert differ == [], f"tensor data differs from llama-quantize's for {differ}"
    assert {r.name: r.dst_type.name for r in summary.tensors} == want_types


@pytest.mark.parametrize("key", sorted(EXPECT["llama_imatrix"]["runs"]))
def test_llama_imatrix_files(key, tmp_path):
    """Importance matrices that llama-imatrix wrote (GGUF and legacy .dat, on agreement.txt): the same
    tensors as llama-quantize makes with them."""
    ftype, form = key.split("/")
    want = EXPECT["llama_imatrix"]["runs"][key]
    model = dict(MODELS["llama-f16"], **{k: {key: want[k]} for k in ("choices", "sha256")})
    summary = quantize_file(FIX / "llama-f16.gguf", tmp_path / "o.gguf", ftype, imatrix=FIX / f"llama-f16.imatrix.{form}",
                            progress=False)
    assert sum(t.imatrix for t in summary.tensors) == 14  # every matrix but token_embd and output
    assert "importance matrix: used for 14 tensor(s)" in summary.table()
    out = GGUFFile(tmp_path / "o.gguf")
    assert {n: t.type.name for n, t in out.tensors.items()} == expected(model, key)
    got = {n: hashlib.sha256(t.data.tobytes()).hexdigest()[:12] for n, t in out.tensors.items()}
    want_hash = expected(model, key, "sha256")
    assert sorted(n for n in got if got[n] != want_hash[n]) == []
    assert out.metadata["quantize.imatrix.entries_count"] == 14
    assert out.metadata["quantize.imatrix.dataset"] == "tests/fixtures/agreement.txt"


def test_output_loads_and_generates(tmp_path):
    src, dst = FIX / "llama-f16.gguf", tmp_path / "q8.gguf"
    quantize_file(src, dst, "q8_0", progress=False)
    ref = purelm.load(str(src), backend="numpy")
    llm = purelm.load(str(dst), backend="numpy")
    ids = ref.tokenize("The quick brown fox jumps")
    a, b = ref.logits(ids), llm.logits(ids)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999  # Q8_0 is close to f16
    assert llm.complete("The quick", max_tokens=6, temperature=0).tokens  # and it generates


def test_summary_table(tmp_path):
    s = quantize_file(FIX / "llama-f16.gguf", tmp_path / "o.gguf", "Q4_K_M", progress=False)
    counts = {}
    for t in GGUFFile(tmp_path / "o.gguf").tensors.values():
        counts[t.type.name] = counts.get(t.type.name, 0) + 1
    assert {k: v[0] for k, v in s.by_type.items()} == counts == {"Q5_0": 13, "Q8_0": 3, "F32": 5}
    assert s.by_type["Q8_0"][2] * 8 / s.by_type["Q8_0"][1] == 8.5  # 34 bytes per 32 weights
    table = s.table()
    lines = table.splitlines()
    assert lines[0].split() == ["type", "tensors", "weights", "size", "bits/weight"]
    assert lines[1].split()[:2] == ["Q5_0", "13"] and lines[1].split()[-1] == "5.50"
    assert lines[4].split()[:2] == ["total", "21"]
    assert s.n_fallback == 15 and "15 tensor(s) took a fallback type" in table
    assert f"{s.bpw():.2f} bpw" in table and s.src_file_bytes == (FIX / "llama-f16.gguf").stat().st_size
    assert s.dst_file_bytes == (tmp_path / "o.gguf").stat().st_size


def test_quantized_input_needs_allow_requantize(tmp_path):
    dst = tmp_path / "out.gguf"
    with pytest.raises(UsageError, match="--allow-requantize"):
        quantize_file(FIX / "llama-q4_0.gguf", dst, "q8_0", progress=False)
    assert leftovers(tmp_path) == []
    said = []
    s = quantize_file(FIX / "llama-q4_0.gguf", dst, "q8_0", allow_requantize=True, progress=False, warn=said.append)
    assert len(said) == 1 and "Q4_0" in said[0]
    assert {t.dst_type for t in s.tensors if t.src_type == GGMLType.Q4_0} == {GGMLType.Q8_0}
    # a tensor that already has its target type is copied as it is (llama-quantize does the same)
    s = quantize_file(FIX / "llama-q4_0.gguf", tmp_path / "same.gguf", "q4_0", allow_requantize=True, progress=False,
                      warn=said.append)
    a, b = GGUFFile(FIX / "llama-q4_0.gguf"), GGUFFile(tmp_path / "same.gguf")
    kept = [n for n in a.tensors if a.tensors[n].type == b.tensors[n].type == GGMLType.Q4_0]
    assert len(kept) == 15 and all(np.array_equal(a.tensors[n].data, b.tensors[n].data) for n in kept)


@pytest.mark.parametrize("name", ["q9_0", "Q2_K_S", "IQ2_XXS", "", "99", "COPY"])
def test_bad_type(name, tmp_path):
    with pytest.raises(UsageError):
        quantize_file(FIX / "llama-f16.gguf", tmp_path / "o.gguf", name, progress=False)
    assert leftovers(tmp_path) == []


def test_type_names_as_llama_quantize():
    assert parse_ftype("q4_k_m") == parse_ftype("Q4_K") == parse_ftype("15") == FType.MOSTLY_Q4_K_M
    assert parse_ftype("iq4_nl").id == 25 and parse_ftype("q3_k").id == 12 and parse_ftype("f32").id == 0


def test_cli(tmp_path, capsys):
    dst = tmp_path / "o.gguf"
    assert cli.main(["quantize", str(FIX / "llama-f16.gguf"), str(dst), "Q8_0", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[1].split()[:2] == ["Q8_0", "16"] and out.err == ""
    assert cli.main(["quantize", str(FIX / "llama-f16.gguf"), str(tmp_path / "x.gguf"), "Q9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("purelm: error: unknown quantization type Q9") and err.count("\n") == 1
    assert cli.main(["quantize", str(FIX / "llama-q4_0.gguf"), str(tmp_path / "x.gguf"), "q8_0"]) == 2
    assert cli.main(["quantize", str(dst), str(dst), "q8_0", "--allow-requantize"]) == 2  # same file
    assert cli.main(["quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "x.gguf"), "q8_0"]) == 1
    assert cli.main(["quantize", str(dst), str(tmp_path / "no" / "x.gguf"), "q8_0"]) == 2  # no such folder
    assert cli.main(["quantize", str(dst), str(tmp_path), "q8_0"]) == 2  # a folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]


def test_type_without_encoder_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr(quant, "SUPPORTED_QUANT", quant.SUPPORTED_QUANT - {GGMLType.Q8_0})
    with pytest.raises(UsageError, match="cannot encode Q8_0"):  # Q4_K_M's fallback for output.weight
        quantize_file(FIX / "llama-f16.gguf", tmp_path / "o.gguf", "q4_k_m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = quant.quantize

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quant, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_file(FIX / "llama-f16.gguf", tmp_path / "o.gguf", "q8_0", progress=False, threads=1)
    assert list(tmp_path.iterdir()) == []


def altered_fixture(path: Path, drop_key: str = "", edit=None, **values) -> Path:
    """llama-f16.gguf rewritten without `drop_key`, with metadata `values` and tensors passed through
    edit(name, packed uint8 copy)."""
    w = GGUFWriter(path)
    f = GGUFFile(FIX / "llama-f16.gguf")
    for k in f.metadata:
        if k in values:
            w.add(k, values.pop(k))  # its type as the value suggests (-3: INT32)
        elif k != drop_key:
            w.add(k, f.metadata[k], f.metadata.types[k], f.metadata.array_types.get(k))
    for k, v in values.items():
        w.add(k, v)
    for t in f.tensors.values():
        data = np.array(t.data)
        if edit:
            edit(t.name, data)
        w.add_tensor(t.name, data, t.type, t.shape)
    w.write()
    return path


def test_non_finite_weights_refused(tmp_path):
    def poison(name, data):
        if name == "blk.1.ffn_up.weight":
            data.view(np.float16)[3, 5] = np.inf

    src = altered_fixture(tmp_path / "inf.gguf", edit=poison)
    with pytest.raises(FormatError, match="blk.1.ffn_up.weight.*non-finite"):
        quantize_file(src, tmp_path / "out.gguf", "q4_0", progress=False)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("change", [{"drop_key": "llama.block_count"}, {"llama.block_count": 0},
                                    {"llama.attention.head_count": -3}, {"llama.expert_count": 10**6},
                                    {"drop_key": "general.architecture"}])
def test_bad_hyperparameters_refused(change, tmp_path):
    """The mixes read block_count, head counts and expert_count: each is checked before use."""
    src = altered_fixture(tmp_path / "bad.gguf", **change)
    with pytest.raises(FormatError):
        quantize_file(src, tmp_path / "out.gguf", "q4_k_m", progress=False)
    assert leftovers(tmp_path) == []
    quantize_file(src, tmp_path / "out.gguf", "q8_0", pure=True, progress=False)  # no rules: no hyperparameters


# ------------------------------------------------------------------------------------------- imatrix


def write_gguf_imatrix(path: Path, entries: dict, meta: bool = True, counts_type=np.float32) -> None:
    w = GGUFWriter(path)
    if meta:
        w.add("imatrix.datasets", ["d.txt"], ValueType.ARRAY, ValueType.STRING)
        w.add("imatrix.chunk_count", 3, ValueType.UINT32)
        w.add("imatrix.chunk_size", 512, ValueType.UINT32)
    for name, (sums, counts) in entries.items():
        if sums is not None:
            w.add_tensor(name + ".in_sum2", np.asarray(sums, np.float32).reshape(len(counts) if counts is not None
                                                                                   else 1, -1))
        if counts is not None:
            w.add_tensor(name + ".counts", np.asarray(counts, counts_type).reshape(-1, 1))
    w.write()


def write_legacy_imatrix(path: Path, entries: dict, trailer: bool = True) -> None:
    raw = struct.pack("<i", len(entries))
    for name, (values, ncall) in entries.items():
        b = name.encode()
        raw += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(values))
        raw += np.asarray(values, "<f4").tobytes()
    if trailer:
        raw += struct.pack("<ii", 3, 5) + b"d.txt"
    path.write_bytes(raw)


def test_imatrix_forms_agree(tmp_path):
    """GGUF: in_sum2 / round(count), 1 where count is 0; legacy: value / ncall (llama-quantize's load_imatrix)."""
    rng = np.random.default_rng(0)
    sums = rng.random((2, 64), dtype=np.float32) * 100
    write_gguf_imatrix(tmp_path / "a.gguf", {"blk.0.ffn_up.weight": (sums, [6.6, 0.0])})
    a = load_imatrix(tmp_path / "a.gguf")
    want = np.concatenate([sums[0] / np.float32(7), np.ones(64, np.float32)])
    assert np.array_equal(a.weights["blk.0.ffn_up.weight"], want)
    assert a.datasets == ["d.txt"] and a.chunk_count == 3 and not a.legacy
    write_legacy_imatrix(tmp_path / "b.dat", {"blk.0.ffn_up.weight": (sums[0] / np.float32(7) * np.float32(7), 7)})
    b = load_imatrix(tmp_path / "b.dat")
    assert b.legacy and b.datasets == ["d.txt"] and b.chunk_count == 3
    assert np.array_equal(b.weights["blk.0.ffn_up.weight"], (sums[0] / np.float32(7) * np.float32(7)) / np.float32(7))


def hostile_imatrices(tmp: Path) -> dict[str, Path]:
    """name -> an importance matrix file that must be refused."""
    out = {}
    good = {"blk.0.ffn_up.weight": (np.ones(64), [4.0])}

    def gguf(name, entries, **kw):
        out[name] = tmp / f"{name}.gguf"
        write_gguf_imatrix(out[name], entries, **kw)

    gguf("wrong_shape", {"blk.0.attn_q.weight": (np.ones(32), [4.0])})
    gguf("nan", {"blk.0.ffn_up.weight": (np.r_[np.ones(63), np.nan], [4.0])})
    gguf("negative", {"blk.0.ffn_up.weight": (np.r_[np.ones(63), -1.0], [4.0])})
    gguf("negative_count", {"blk.0.ffn_up.weight": (np.ones(64), [-4.0])})
    gguf("no_counts", {"blk.0.ffn_up.weight": (np.ones(64), None)})
    gguf("no_metadata", good, meta=False)
    gguf("f16_counts", {"blk.0.ffn_up.weight": (np.ones(64), [4.0])}, counts_type=np.float16)
    out["truncated"] = tmp / "truncated.gguf"
    write_gguf_imatrix(out["truncated"], good)
    out["truncated"].write_bytes(out["truncated"].read_bytes()[:-100])
    out["legacy_truncated"] = tmp / "legacy.dat"
    write_legacy_imatrix(out["legacy_truncated"], {"blk.0.ffn_up.weight": (np.ones(64), 1)})
    out["legacy_truncated"].write_bytes(out["legacy_truncated"].read_bytes()[:60])
    out["legacy_huge"] = tmp / "huge.dat"
    out["legacy_huge"].write_bytes(struct.pack("<ii", 1, 4) + b"abcd" + struct.pack("<ii", 1, 2**31 - 1))
    out["legacy_inf"] = tmp / "inf.dat"
    write_legacy_imatrix(out["legacy_inf"], {"blk.0.ffn_up.weight": (np.r_[np.ones(63), np.inf], 1)})
    out["empty"] = tmp / "empty.dat"
    out["empty"].write_bytes(b"")
    out["text"] = tmp / "text.dat"
    out["text"].write_bytes(b"this is not an imatrix\n" * 4)
    return out


@pytest.mark.parametrize("case", ["wrong_shape", "nan", "negative", "negative_count", "no_counts", "no_metadata",
                                  "f16_counts", "truncated", "legacy_truncated", "legacy_huge", "legacy_inf",
                                  "empty", "text"])
def test_hostile_imatrix(case, tmp_path):
    files = hostile_imatrices(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(PurelmError) as info:
        quantize_file(FIX / "llama-f16.gguf", out_dir / "o.gguf", "q4_0", imatrix=files[case], progress=False)
    assert str(files[case]) in str(info.value) or case == "wrong_shape"
    if case == "wrong_shape":
        assert "blk.0.attn_q.weight" in str(info.value) and "32" in str(info.value)
    assert list(out_dir.iterdir()) == []
