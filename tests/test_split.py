"""Split GGUF files (llama.cpp's gguf-split convention): read as one model from the first shard, every
shard checked, written by `purelm convert --split-max-size`; checked against llama.cpp's gguf-split
(built from the llama.cpp sources when build/bin lacks it) and gguf-py."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from purelm.backends.numpy_backend import NumpyBackend
from purelm.backends.pack_cache import source_of
from purelm.cli import main
from purelm.convert import convert
from purelm.errors import FormatError, UsageError
from purelm.formats import split
from purelm.formats.gguf import GGUFFile, GGUFWriter, ValueType
from purelm.models import build_model
from purelm.perplexity import BaseLogits
from conftest import LLAMA_CPP



def same_model(a: GGUFFile, b: GGUFFile) -> None:
    """Equal metadata (keys in order, stored types, values) and tensors (names in order, types, shapes,
    bytes)."""
    assert list(a.metadata) == list(b.metadata)
    for k in a.metadata:
        assert a.metadata.types[k] == b.metadata.types[k], k
        va, vb = a.metadata[k], b.metadata[k]
        assert (np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb), k
    assert list(a.tensors) == list(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (t.type, t.shape) == (u.type, u.shape) and np.array_equal(t.data, u.data), name


def split_cli(src, out, size) -> list[Path]:
    assert main(["convert", str(src), str(out), "--split-max-size", size]) == 0
    return sorted(Path(out).parent.glob(Path(out).stem + "-*-of-*.gguf"))


def logits(f: GGUFFile, ids) -> np.ndarray:
    model = build_model(f, NumpyBackend())
    return model.forward(np.asarray(ids), model.new_cache(64), all_logits=True)


def test_split_reads_back_equal_to_the_unsplit_file(fixtures, tmp_path):
    src = fixtures / "llama-f32.gguf"
    shards = split_cli(src, tmp_path / "m.gguf", "120K")
    assert [p.name for p in shards] == [f"m-{i:05d}-of-00005.gguf" for i in range(1, 6)]
    whole, joined = GGUFFile(src), GGUFFile(shards[0])
    same_model(whole, joined)
    assert joined.shards == [str(p) for p in shards]
    assert joined.file_size == sum(p.stat().st_size for p in shards)
    # each tensor is a view of its own shard's map (the file as the OS sees it), inside that shard
    homes = {source_of(t.data)["path"] for t in joined.tensors.values()}
    assert homes == {str(p) for p in shards}
    for t in joined.tensors.values():
        assert t.offset + t.nbytes <= os.path.getsize(source_of(t.data)["path"])
    # tensor bytes per shard stay within the limit (the first also holds the metadata)
    for p in shards:
        one = GGUFFile(p, join=False)
        assert sum(t.nbytes + -t.nbytes % 32 for t in one.tensors.values()) <= 120_000
        assert (one.metadata["split.no"], one.metadata["split.count"]) == (shards.index(p), 5)
        assert one.metadata["split.tensors.count"] == len(whole.tensors)
    ref = np.load(fixtures / "llama-ref-f32.npz")
    ids = ref["ids"].tolist()
    ours = logits(joined, ids)
    assert np.array_equal(ours, logits(whole, ids))
    assert np.abs(ours - ref["logits"]).max() < 1e-4  # and transformers' logits, as for the unsplit file
    import purelm  # the default backend's kernels over tensors mapped from five files

    fast = [purelm.load(str(p)).logits(ids) for p in (shards[0], src)]
    assert np.array_equal(fast[0], fast[1])
    # merged back: byte for byte the original
    assert main(["convert", str(shards[0]), str(tmp_path / "merged.gguf")]) == 0
    assert (tmp_path / "merged.gguf").read_bytes() == src.read_bytes()


def test_convert_checkpoint_with_split_max_size(fixtures, tmp_path):
    whole = convert(fixtures / "hf" / "llama", tmp_path / "whole.gguf", "q8_0")
    first = convert(fixtures / "hf" / "llama", tmp_path / "s.gguf", "q8_0", split_max_size=40_000)
    assert re.fullmatch(r"s-00001-of-0000\d\.gguf", first.name)
    same_model(GGUFFile(whole), GGUFFile(first))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["whole.gguf"] + [Path(p).name for p in GGUFFile(first).shards])  # no temporary file left
    # everything fits: one plain file, no split keys (as gguf-py's writer does)
    one = convert(fixtures / "hf" / "llama", tmp_path / "one.gguf", "q8_0", split_max_size=10**9)
    assert one.name == "one.gguf" and not any(k.startswith("split.") for k in GGUFFile(one, join=False).metadata)


def test_no_shard_is_left_behind_on_error(fixtures, tmp_path, monkeypatch):
    calls = []
    original = GGUFWriter._write_to

    def failing(self, *args):
        calls.append(self.path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(self, *args)

    monkeypatch.setattr(GGUFWriter, "_write_to", failing)
    assert main(["convert", str(fixtures / "llama-q8_0.gguf"), str(tmp_path / "m.gguf"), "--split-max-size",
                 "20K"]) == 1
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_split_max_size_is_read_as_llama_cpp_reads_it():
    assert split.parse_size("50M") == 50_000_000 and split.parse_size("2G") == 2_000_000_000
    assert split.parse_size("20K") == 20_000 and split.parse_size("4096") == 4096
    for bad in ("0M", "-1G", "1.5G", "M", "", "12X", "1e6", "\u00b2M"):
        with pytest.raises(UsageError):
            split.parse_size(bad)
    assert split.plan([100, 100, 100], 260, 32) == [0, 0, 1]  # 128 + 128 fits, a third does not
    assert split.plan([1000, 10], 100, 32) == [0, 1]  # an oversized tensor gets a shard of its own


def _rewrite_shard(path, meta=None, drop=()):
    """Rewrite one shard in place with metadata changed (value, or (value, ValueType); None removes)
    and tensors dropped."""
    f = GGUFFile(path, join=False)
    w = split.copy_model(f, str(path) + ".new")
    for k, v in (meta or {}).items():
        if v is None:
            w.kv.pop(k, None)
        else:
            w.add(k, *(v if isinstance(v, tuple) else (v,)))
    w.tensors = [t for t in w.tensors if t.name not in drop]
    w.write()
    f.close()
    os.replace(str(path) + ".new", path)


@pytest.fixture
def shards(fixtures, tmp_path):
    return split_cli(fixtures / "llama-q8_0.gguf", tmp_path / "m.gguf", "40K")


def _error(path) -> str:
    with pytest.raises(FormatError) as e:
        GGUFFile(path)
    return str(e.value)


def test_every_shard_is_checked(shards, fixtures):
    n = len(shards)
    assert n == 4
    # a missing shard
    moved = shards[2].with_suffix(".bak")
    shards[2].rename(moved)
    assert f"shard 3 of {n} is missing: {shards[2]}" in _error(shards[0])
    moved.rename(shards[2])
    # the second shard opened alone
    assert "split.no: is 1: this is shard 2 of 4; open the first shard (" in _error(shards[1])
    assert "m-00001-of-00004.gguf" in _error(shards[1])
    # a first shard renamed: the others cannot be found
    odd = shards[0].with_name("model.gguf")
    shutil.copy(shards[0], odd)
    assert "the first shard must be named PREFIX-00001-of-00004.gguf" in _error(odd)
    # numbering, counts and tensors across shards
    cases = [({"split.no": (3, ValueType.UINT16)}, (), "split.no: is 3, but"),
             ({"split.count": (5, ValueType.UINT16)}, (), "split.count: is 5, but"),
             ({"split.tensors.count": (99, ValueType.INT32)}, (), "split.tensors.count: is 99, but"),
             ({"split.no": None}, (), "split.no: is missing"),
             ({"split.count": ("4", ValueType.STRING)}, (), "split.count: is '4' (string)")]
    victim = shards[1]
    saved = victim.read_bytes()
    for meta, drop, message in cases:
        _rewrite_shard(victim, meta, drop)
        assert message in _error(shards[0]), message
        victim.write_bytes(saved)
    # a tensor in two shards; and one fewer than split.tensors.count says
    first_names = list(GGUFFile(shards[0], join=False).tensors)
    _rewrite_shard(victim, drop=[list(GGUFFile(victim, join=False).tensors)[0]])
    assert "split.tensors.count: says 21 tensors but the 4 shards hold 20" in _error(shards[0])
    victim.write_bytes(saved)
    f = GGUFFile(fixtures / "llama-q8_0.gguf")
    w = split.copy_model(GGUFFile(victim, join=False), str(victim) + ".new")
    t = f.tensors[first_names[-1]]
    w.add_tensor(t.name, t.data, t.type, t.shape)
    w.write()
    os.replace(str(victim) + ".new", victim)
    assert f"tensor {first_names[-1]!r}: is also in an earlier shard" in _error(shards[0])
    victim.write_bytes(saved)
    # a truncated shard: its offsets are checked against its own size
    with open(shards[3], "r+b") as fh:
        fh.truncate(shards[3].stat().st_size - 100)
    assert "lies beyond the end of the file's" in _error(shards[0]) and str(shards[3]) in _error(shards[0])
    GGUFFile(fixtures / "llama-q8_0.gguf")  # the unsplit file is untouched by all this


def test_gguf_py_reads_our_shards_and_we_read_its(fixtures, tmp_path, shards):
    gguf = pytest.importorskip("gguf")
    whole = GGUFFile(fixtures / "llama-q8_0.gguf")
    n_tensors = 0
    for i, p in enumerate(shards):
        r = gguf.GGUFReader(p)
        fields = {k: (f.types[0], f.contents()) for k, f in r.fields.items() if k.startswith("split.")}
        assert fields == {"split.no": (gguf.GGUFValueType.UINT16, i), "split.count": (gguf.GGUFValueType.UINT16, 4),
                          "split.tensors.count": (gguf.GGUFValueType.INT32, len(whole.tensors))}
        for t in r.tensors:
            assert bytes(t.data.reshape(-1).view(np.uint8)) == whole.tensors[t.name].data.tobytes()
        n_tensors += len(r.tensors)
    assert n_tensors == len(whole.tensors)
    # gguf-py's writer, splitting by tensor count (as convert_hf_to_gguf.py --split-max-tensors)
    out = tmp_path / "py" / "model.gguf"
    out.parent.mkdir()
    w = gguf.GGUFWriter(out, "llama", split_max_tensors=6)
    for k in whole.metadata:
        if k in ("general.architecture", "GGUF.version"):
            continue
        v = whole.metadata[k]
        t = whole.metadata.types[k]
        sub = whole.metadata.array_types.get(k)
        w.add_key_value(k, list(v) if t == ValueType.ARRAY else v, gguf.GGUFValueType(int(t)),
                        sub_type=gguf.GGUFValueType(int(sub)) if sub is not None else None)
    for t in whole.tensors.values():
        if t.type.name == "F32":
            w.add_tensor(t.name, t.data.view(np.float32).reshape(t.shape))
        else:  # packed blocks: gguf-py takes the byte shape
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=gguf.GGMLQuantizationType(int(t.type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs = GGUFFile(out.parent / "model-00001-of-00004.gguf")
    assert len(theirs.shards) == 4
    assert list(theirs.tensors) == list(whole.tensors)
    for name, t in whole.tensors.items():
        u = theirs.tensors[name]
        assert (u.type, u.shape) == (t.type, t.shape) and np.array_equal(u.data, t.data)
    assert {k: theirs.metadata[k] for k in ("llama.block_count", "general.name")} == \
        {k: whole.metadata[k] for k in ("llama.block_count", "general.name")}


@pytest.fixture(scope="module")
def gguf_split_tool(tmp_path_factory) -> Path:
    """llama.cpp's llama-gguf-split: from build/bin, else compiled from tools/gguf-split against the
    built libraries (under a second); skipped when neither is possible."""
    built = LLAMA_CPP / "build" / "bin" / "llama-gguf-split"
    if built.is_file():
        return built
    src, libs, cxx = LLAMA_CPP / "tools" / "gguf-split" / "gguf-split.cpp", LLAMA_CPP / "build" / "bin", \
        shutil.which("c++") or shutil.which("g++")
    if not (src.is_file() and (libs / "libllama-common.so").exists() and cxx):
        pytest.skip(f"llama-gguf-split is not built at {built} and cannot be built here (set PURELM_LLAMA_CPP_DIR)")
    exe = tmp_path_factory.mktemp("llama") / "llama-gguf-split"
    cmd = [cxx, "-std=c++17", "-O1", "-DGGML_SHARED", "-DLLAMA_SHARED", f"-I{LLAMA_CPP / 'common'}",
           f"-I{LLAMA_CPP / 'include'}", f"-I{LLAMA_CPP / 'ggml' / 'include'}", f"-I{LLAMA_CPP / 'vendor'}",
           "-o", str(exe), str(src), f"-L{libs}", "-lllama-common", "-lllama", "-lggml", "-lggml-base",
           f"-Wl,-rpath,{libs}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"could not build llama-gguf-split: {done.stderr[-500:]}")
    return exe


def test_llama_cpp_gguf_split_agrees(fixtures, tmp_path, shards, gguf_split_tool):
    whole = GGUFFile(fixtures / "llama-q8_0.gguf")
    # its merge of our shards is the original model (it leaves split.* keys, with split.count 0)
    merged = tmp_path / "merged.gguf"
    subprocess.run([str(gguf_split_tool), "--merge", str(shards[0]), str(merged)], check=True, capture_output=True)
    same_model(whole, GGUFFile(merged))
    assert GGUFFile(merged, join=False).metadata["split.count"] == 0
    # its shards read as the original model
    out = tmp_path / "theirs"
    out.mkdir()
    subprocess.run([str(gguf_split_tool), "--split", "--split-max-tensors", "6", str(fixtures / "llama-q8_0.gguf"),
                    str(out / "ll")], check=True, capture_output=True)
    assert len(list(out.iterdir())) == 4
    same_model(whole, GGUFFile(out / "ll-00001-of-00004.gguf"))
    # the same cut by size: a model over its 1M unit, split with its --dry-run plan and ours
    big = tmp_path / "big.gguf"
    w = GGUFWriter(big)
    w.add("general.architecture", "llama")
    sizes = [300_000, 100_000, 500_000, 80, 700_000, 300_000, 300_000]
    for i, n in enumerate(sizes):
        w.add_tensor(f"t{i}", np.zeros(n // 4, np.float32))
    w.write()
    plan = subprocess.run([str(gguf_split_tool), "--split", "--split-max-size", "1M", "--dry-run", str(big),
                           str(tmp_path / "x")], check=True, capture_output=True, text=True).stdout
    theirs = [int(n) for n in re.findall(r"n_tensors = (\d+)", plan)]
    ours = np.bincount(split.plan(sizes, split.parse_size("1M"))).tolist()
    assert theirs == ours == [4, 2, 1]


def test_llama_cpp_runs_our_shards(fixtures, tmp_path, shards):
    """llama.cpp's loader opens purelm's shards from the first one and computes the same logits as on the
    unsplit file."""
    tool = LLAMA_CPP / "build" / "bin" / "llama-perplexity"
    if not tool.is_file():
        pytest.skip(f"llama-perplexity is not built at {tool} (set PURELM_LLAMA_CPP_DIR)")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ate the hat. " * 40)

    def logits(model, name):
        # the logits file (tokens, then every chunk's logits) is written by the main thread before exit;
        # the log comes from a thread of its own which the tool may leave before its last lines (CI lost
        # the "Final estimate" line on 4 runs in a row), so the log is not what is compared
        out = tmp_path / name
        done = subprocess.run([str(tool), "-m", str(model), "-f", str(text), "-c", "32", "--chunks", "4", "-t", "1",
                               "-b", "32", "--kl-divergence-base", str(out)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        base = BaseLogits(out, n_vocab)  # the format checked whole: header, tokens, rows for 4 chunks of 32
        assert (base.n_ctx, base.n_chunk) == (32, 4)
        rows = np.concatenate([base.rows(c) for c in range(4)])
        assert rows.shape == (4 * base.rows_per_chunk, base.width) and rows[:, 4:].any()
        return out.read_bytes()

    n_vocab = len(GGUFFile(fixtures / "llama-q8_0.gguf").metadata["tokenizer.ggml.tokens"])
    ours, whole = logits(shards[0], "shards.kld"), logits(fixtures / "llama-q8_0.gguf", "whole.kld")
    # (the first shard alone holds only some of the tensors: the rest came from the other shards)
    assert ours == whole


def test_one_file_with_split_keys(fixtures, tmp_path):
    """split.count 0 (llama-gguf-split --merge writes it) or 1: one file, its split keys still checked."""
    from conftest import rewrite_gguf

    src = fixtures / "llama-q8_0.gguf"
    u16, i32 = ValueType.UINT16, ValueType.INT32

    def with_keys(no, count, total):
        return rewrite_gguf(src, tmp_path / "one.gguf", {"split.no": (no, u16), "split.count": (count, u16),
                                                         "split.tensors.count": (total, i32)})

    same_model(GGUFFile(src), GGUFFile(with_keys(0, 0, 21)))
    same_model(GGUFFile(src), GGUFFile(with_keys(0, 1, 21)))
    assert "split.no: is 1 but split.count is 1" in _error(with_keys(1, 1, 21))
    assert "split.tensors.count: says 5 tensors but the file holds 21" in _error(with_keys(0, 0, 5))
    assert "split.count: is 70000 (uint32)" in _error(
        rewrite_gguf(src, tmp_path / "big.gguf", {"split.count": (70000, ValueType.UINT32)}))
