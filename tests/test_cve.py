"""The public attack patterns against GGUF engines, each as a small hostile file that purelm must refuse
with a PurelmError (a FormatError naming the field, where one is to blame), never a crash, hang, traceback
or huge allocation.

  CVE-2024-21802   header counts and sizes that overflow: tensor/kv counts, string lengths, array counts,
                   n_dims, dimensions whose product overflows int64
  CVE-2025-53630   tensor data size/offset arithmetic that wraps: offset + size past 2^64, past the file
  CVE-2026-7482    "Bleeding Llama": dimensions that lie (heads, widths, rope sizes, shapes that disagree
                   with the hyperparameters, values of the wrong type, NaN weights, odd layouts)

Every file is built from a real base (the tiny llama fixture, and SmolLM2 when it is in the purelm cache)
and run (load + a 2-token greedy generation) in a worker process of tests/fuzzlib.py, so a segfault is a
failing test, not a dead pytest."""
import math
import os
from pathlib import Path

import pytest

import fuzzlib
from fuzzlib import ARRAY, BOOL, F32, I32, STRING, U32, U64, Array

FIXTURES = Path(__file__).parent / "fixtures"


def smollm2_path() -> Path:
    """The cached SmolLM2 file, without downloading it."""
    env = os.environ.get("PURELM_SMOLLM2")
    if env:
        return Path(env)
    try:
        from purelm.hub import cached_path, known

        return cached_path(known("smollm2"))
    except Exception:  # noqa: BLE001
        return Path.home() / ".cache/purelm/models/SmolLM2-135M-Instruct.Q4_1.gguf"


class Base:
    """A seed model and its sizes."""

    def __init__(self, path: Path) -> None:
        self.seed = fuzzlib.load_seed(path)
        doc = self.seed.doc
        self.arch = doc.arch
        self.dim = doc.hp("embedding_length")
        self.n_head = doc.hp("attention.head_count")
        self.n_kv = doc.hp("attention.head_count_kv", self.n_head)
        self.hd = self.dim // self.n_head
        self.n_layer = doc.hp("block_count")
        self.ffn = doc.hp("feed_forward_length")

    def doc(self) -> fuzzlib.GGUFDoc:
        return self.seed.doc.copy()

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"


@pytest.fixture(scope="module", params=["llama-f32", "smollm2"])
def base(request):
    if request.param == "smollm2":
        path = smollm2_path()
        if not path.exists():
            pytest.skip(f"SmolLM2 is not in the purelm cache ({path}); `purelm pull smollm2` to run these")
        return Base(path)
    return Base(FIXTURES / f"{request.param}.gguf")


@pytest.fixture(scope="module")
def runner():
    with fuzzlib.Runner("model-build+generate", workers=1, warm=[str(FIXTURES / "llama-f32.gguf")],
                        timeout=60, rss_limit_mb=3072) as r:
        yield r


@pytest.fixture
def run(runner, tmp_path):
    """Write the file, load it and generate in the worker; the worker's record."""
    def run(data) -> dict:
        path = tmp_path / "hostile.gguf"
        fuzzlib.write_file(path, data)
        try:
            return runner.run_one(path)
        finally:
            path.unlink()
    return run


def describe(rec: dict) -> str:
    parts = [f"outcome {rec['outcome']}"]
    for k in ("exc", "message", "purelm_frame", "frame", "previous_cases"):
        if rec.get(k):
            parts.append(f"{k}: {rec[k]}")
    if rec.get("traceback"):
        parts.append("traceback (last frames):\n" + rec["traceback"][-1500:])
    if rec.get("log"):
        parts.append("worker log:\n" + rec["log"][-1500:])
    return "\n".join(parts)


def expect_rejected(rec: dict, *names: str, cls: str = "FormatError") -> None:
    """One `cls` (a PurelmError subclass) whose message names one of `names`; no crash, hang, traceback."""
    assert rec["outcome"] == "purelm_error", f"expected a {cls}, got:\n{describe(rec)}"
    assert cls in rec["mro"], f"expected a {cls}, got:\n{describe(rec)}"
    if names:
        assert any(n in rec["message"] for n in names), f"the message should name one of {names}:\n{describe(rec)}"


def first_matrix(doc: fuzzlib.GGUFDoc) -> fuzzlib.TensorInfo:
    return doc.tensor("blk.0.attn_q.weight")


# ------------------------------------------------------------------------------------ CVE-2024-21802

@pytest.mark.parametrize("count", [2**31, 2**32, 2**63, 2**64 - 1])
def test_cve_2024_21802_tensor_count_huge(base, run, count):
    doc = base.doc()
    doc.n_tensors = count
    expect_rejected(run(doc.to_chunks()), "tensor_count")


@pytest.mark.parametrize("count", [2**31, 2**32, 2**63, 2**64 - 1])
def test_cve_2024_21802_kv_count_huge(base, run, count):
    doc = base.doc()
    doc.n_kv = count
    expect_rejected(run(doc.to_chunks()), "kv_count")


def _patch(doc: fuzzlib.GGUFDoc, label: tuple, value: int) -> bytearray:
    """The emitted file with the u64/u32 field `label` overwritten."""
    buf = bytearray(doc.to_bytes())
    fields = {f[2]: f for f in fuzzlib.parse_gguf(bytes(buf)).fields}
    pos, size, _ = fields[label]
    buf[pos:pos + size] = value.to_bytes(size, "little")
    return buf


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 2**64 - 8])
def test_cve_2024_21802_key_string_length_huge(base, run, length):
    expect_rejected(run(_patch(base.doc(), ("kv", 1, "key_len"), length)))


@pytest.mark.parametrize("length", [2**63, 2**64 - 1])
def test_cve_2024_21802_value_string_length_huge(base, run, length):
    expect_rejected(run(_patch(base.doc(), ("kv", "general.name", "len"), length)), "general.name")


@pytest.mark.parametrize("length", [2**63, 2**64 - 1])
def test_cve_2024_21802_tensor_name_length_huge(base, run, length):
    expect_rejected(run(_patch(base.doc(), ("tensor", 1, "name_len"), length)), "tensor")


@pytest.mark.parametrize("key,count", [
    ("tokenizer.ggml.tokens", 2**64 - 1),  # strings
    ("tokenizer.ggml.tokens", 2**61),  # 2^61 * 8-byte length prefixes wraps to 0
    ("tokenizer.ggml.token_type", 2**62),  # 2^62 * 4 bytes wraps to 0
    ("tokenizer.ggml.token_type", 2**63),
])
def test_cve_2024_21802_array_count_huge(base, run, key, count):
    expect_rejected(run(_patch(base.doc(), ("kv", key, "count"), count)), key)


@pytest.mark.parametrize("n_dims", [5, 8, 2**31, 2**32 - 1])
def test_cve_2024_21802_too_many_dims(base, run, n_dims):
    doc = base.doc()
    name = first_matrix(doc).name
    if n_dims <= 8:  # a well-formed record with extra dimensions of 1
        t = first_matrix(doc)
        t.dims = t.dims + [1] * (n_dims - len(t.dims))
        data = doc.to_chunks()
    else:
        data = _patch(doc, ("tensor", name, "n_dims"), n_dims)
    expect_rejected(run(data), name)


@pytest.mark.parametrize("dims", [
    [2**32, 2**32],  # 2^64 elements: wraps to 0 in 64-bit arithmetic
    [2**32, 2**31, 2],
    [2**16, 2**16, 2**16, 2**16],
    [2**40, 2**40],
    [2**63, 1],
    [2**64 - 2**8, 2],  # the row length itself near 2^64
])
def test_cve_2024_21802_dims_product_overflows(base, run, dims):
    doc = base.doc()
    t = first_matrix(doc)
    t.dims = list(dims)
    expect_rejected(run(doc.to_chunks()), t.name)


# ------------------------------------------------------------------------------------ CVE-2025-53630

@pytest.mark.parametrize("where", ["wraps", "wraps-by-size", "past-end", "runs-past-end", "2^63"])
def test_cve_2025_53630_tensor_offset_overflow(base, run, where):
    doc = base.doc()
    t = first_matrix(doc)
    align, end = doc.alignment(), len(doc.data)
    t.offset = {
        "wraps": 2**64 - align,  # offset + size wraps past 2^64 to a small number
        "wraps-by-size": (2**64 - t.nbytes) // align * align,
        "past-end": end + align,
        "runs-past-end": (end - t.nbytes // 2) // align * align,
        "2^63": 2**63,
    }[where]
    expect_rejected(run(doc.to_chunks()), t.name)


@pytest.mark.parametrize("dims", [[2**32, 2**30], [2**33, 2**29], [2**31, 2**31, 1]])
def test_cve_2025_53630_data_size_wraps_to_zero(base, run, dims):
    """Dimensions whose byte size is 2^64 or more (0 or small modulo 2^64), at a valid offset."""
    doc = base.doc()
    t = first_matrix(doc)
    t.dims = [int(d) for d in dims]
    t.type = fuzzlib.F32_TYPE
    expect_rejected(run(doc.to_chunks()), t.name)


def test_cve_2025_53630_truncated_data(base, run):
    doc = base.doc()
    data = doc.to_bytes()
    expect_rejected(run(data[:len(data) - 64]))


# ------------------------------------------------------------------- CVE-2026-7482 "Bleeding Llama"

def test_bleeding_llama_kv_heads_not_dividing_heads(base, run):
    """head_count_kv that does not divide head_count, with attn_k/attn_v shaped to match it."""
    doc = base.doc()
    n_kv = next(k for k in range(2, base.n_head) if base.n_head % k)
    doc.set(base.key("attention.head_count_kv"), U32, n_kv)
    for i in range(base.n_layer):
        for w in ("attn_k", "attn_v"):
            t = doc.tensor(f"blk.{i}.{w}.weight")
            doc.set_tensor(t.name, [t.dims[0], n_kv * base.hd], t.type, fuzzlib.rows_blob(doc, t.name, n_kv * base.hd))
    expect_rejected(run(doc.to_chunks(relayout=True)), "head_count_kv")


@pytest.mark.parametrize("name,change", [
    ("blk.0.attn_q.weight", "half-rows"),
    ("blk.0.attn_k.weight", "double-rows"),
    ("blk.1.ffn_down.weight", "half-row-length"),
    ("output_norm.weight", "half-length"),
    ("token_embd.weight", "half-row-length"),
])
def test_bleeding_llama_tensor_shape_disagrees_with_hparams(base, run, name, change):
    doc = base.doc()
    t = doc.tensor(name)
    block = fuzzlib.GGML_BLOCKS[t.type][0]
    if change.endswith("rows"):
        rows = t.dims[1] // 2 if change == "half-rows" else t.dims[1] * 2
        doc.set_tensor(name, [t.dims[0], rows], t.type, fuzzlib.rows_blob(doc, name, rows))
    else:  # same bytes per row halved: a narrower matrix (or vector) with the first half of the data
        dims = [max(t.dims[0] // 2 // block * block, block)] + t.dims[1:]
        doc.set_tensor(name, dims, t.type, doc.tensor_bytes(name)[:fuzzlib.tensor_nbytes(dims, t.type)])
    expect_rejected(run(doc.to_chunks(relayout=True)), name)


@pytest.mark.parametrize("factor", ["x2", "half", "+1", "2^31-1"])
def test_bleeding_llama_embedding_length_lies(base, run, factor):
    value = {"x2": base.dim * 2, "half": base.dim // 2, "+1": base.dim + 1, "2^31-1": 2**31 - 1}[factor]
    doc = base.doc()
    doc.set(base.key("embedding_length"), U32, value)
    # (halved, the head size shrinks below rope.dimension_count, and the message says the head size is
    # embedding_length / head_count)
    expect_rejected(run(doc.to_chunks()), "embedding_length", "token_embd.weight", ".weight")


@pytest.mark.parametrize("value", ["2*head", 63, 5, 0, 2**31 - 1, 2**32 - 1])
def test_bleeding_llama_rope_dimension_count(base, run, value):
    """Larger than the head size, odd, zero, huge."""
    value = 2 * base.hd if value == "2*head" else value
    doc = base.doc()
    doc.set(base.key("rope.dimension_count"), U32, value)
    expect_rejected(run(doc.to_chunks()), "rope.dimension_count")


@pytest.mark.parametrize("key,value", [
    ("attention.head_count", 0), ("attention.head_count_kv", 0), ("block_count", 0),
    ("attention.head_count", 2**31 - 1), ("attention.head_count_kv", 2**32 - 1),
    ("feed_forward_length", 0), ("context_length", 0),
])
def test_bleeding_llama_zero_and_huge_sizes(base, run, key, value):
    doc = base.doc()
    doc.set(base.key(key), U32, value)
    expect_rejected(run(doc.to_chunks()), key)


@pytest.mark.parametrize("extra", [1, 2**31 - 1])
def test_bleeding_llama_block_count_beyond_the_layers(base, run, extra):
    doc = base.doc()
    doc.set(base.key("block_count"), U32, base.n_layer + extra if extra == 1 else extra)
    expect_rejected(run(doc.to_chunks()), "block_count", f"blk.{base.n_layer}.")


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_bleeding_llama_rope_freq_base(base, run, value):
    doc = base.doc()
    doc.set(base.key("rope.freq_base"), F32, value)
    expect_rejected(run(doc.to_chunks()), "rope.freq_base")


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_bleeding_llama_norm_epsilon(base, run, value):
    doc = base.doc()
    doc.set(base.key("attention.layer_norm_rms_epsilon"), F32, value)
    expect_rejected(run(doc.to_chunks()), "layer_norm_rms_epsilon")


@pytest.mark.parametrize("name", ["output_norm.weight", "blk.0.attn_q.weight", "token_embd.weight"])
def test_bleeding_llama_nan_weights(base, run, name):
    """A model whose weights are NaN: refused (at load or when the logits come out NaN), not a garbage
    generation."""
    doc = base.doc()
    t = doc.tensor(name)
    doc.set_tensor(name, t.dims, t.type, fuzzlib.nan_blob(t.type, t.nbytes))
    expect_rejected(run(doc.to_chunks(relayout=True)), cls="PurelmError")


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "attention.head_count",
                                 "attention.head_count_kv", "context_length", "rope.dimension_count"])
@pytest.mark.parametrize("kind", ["string", "float", "array", "bool"])
def test_bleeding_llama_wrong_type_for_an_integer(base, run, key, kind):
    doc = base.doc()
    real = doc.hp(key)
    vtype, value = {"string": (STRING, str(real)), "float": (F32, float(real)),
                    "array": (ARRAY, Array(I32, [real, real])), "bool": (BOOL, True)}[kind]
    doc.set(base.key(key), vtype, value)
    expect_rejected(run(doc.to_chunks()), key)


@pytest.mark.parametrize("kind", ["string", "array", "bool"])
def test_bleeding_llama_wrong_type_for_a_float(base, run, kind):
    doc = base.doc()
    vtype, value = {"string": (STRING, "10000"), "array": (ARRAY, Array(F32, [1.0, 2.0])), "bool": (BOOL, True)}[kind]
    doc.set(base.key("rope.freq_base"), vtype, value)
    expect_rejected(run(doc.to_chunks()), "rope.freq_base")


@pytest.mark.parametrize("shape", ["2-D (n, 1)", "2-D (2, n)", "1-D too long", "1-D too short"])
def test_bleeding_llama_rope_freqs_shape(base, run, shape):
    doc = base.doc()
    n = base.hd // 2
    dims = {"2-D (n, 1)": [1, n], "2-D (2, n)": [n, 2], "1-D too long": [n + 3], "1-D too short": [n - 1]}[shape]
    count = math.prod(dims)
    doc.set_tensor("rope_freqs.weight", dims, fuzzlib.F32_TYPE, fuzzlib.float_blob([1.0] * count))
    expect_rejected(run(doc.to_chunks(relayout=True)), "rope_freqs")


@pytest.mark.parametrize("present", [("attn_q",), ("attn_q", "attn_v"), ("attn_k",)])
def test_bleeding_llama_partial_qkv_biases(base, run, present):
    """attn_q.bias without attn_k.bias (and the like): each bias is optional alone, as in llama.cpp, so the
    file runs (it used to add None and die with a TypeError). tests/test_validation.py checks the bias is
    applied."""
    doc = base.doc()
    sizes = {"attn_q": base.n_head * base.hd, "attn_k": base.n_kv * base.hd, "attn_v": base.n_kv * base.hd}
    for w in present:
        doc.set_tensor(f"blk.0.{w}.bias", [sizes[w]], fuzzlib.F32_TYPE, fuzzlib.float_blob([0.5] * sizes[w]))
    rec = run(doc.to_chunks(relayout=True))
    assert rec["outcome"] == "ok", describe(rec)


@pytest.mark.parametrize("name", ["output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_norm.weight"])
def test_bleeding_llama_norm_stored_as_dim_by_1(base, run, name):
    """A norm of shape (dim, 1): dim rows of one weight. ((1, dim) is ggml's own padding of a vector,
    which llama.cpp accepts, so it is not tested here.)"""
    doc = base.doc()
    doc.tensor(name).dims = [1, base.dim]  # ggml order: row length first
    expect_rejected(run(doc.to_chunks()), name)


def test_bleeding_llama_vocabulary_larger_than_embedding(base, run):
    """Token ids the tokenizer can produce that have no embedding row (a read past the matrix)."""
    doc = base.doc()
    rows = doc.tensor("token_embd.weight").dims[1] // 2
    for name in ("token_embd.weight", "output.weight"):
        if doc.has_tensor(name):
            t = doc.tensor(name)
            doc.set_tensor(name, [t.dims[0], rows], t.type, fuzzlib.rows_blob(doc, name, rows))
    if doc.index(base.key("vocab_size")) >= 0:
        doc.remove(base.key("vocab_size"))
    expect_rejected(run(doc.to_chunks(relayout=True)), "tokenizer.ggml.tokens", "token_embd.weight", "vocab")


@pytest.mark.parametrize("key,vtype,value", [
    ("tokenizer.ggml.bos_token_id", U32, 2**32 - 1),
    ("tokenizer.ggml.eos_token_id", I32, -1),
    ("tokenizer.ggml.token_type", ARRAY, Array(I32, [2**31 - 1])),
    ("tokenizer.ggml.tokens", ARRAY, Array(I32, [1, 2, 3])),
    ("tokenizer.ggml.merges", ARRAY, Array(U64, [2**64 - 1])),
    ("tokenizer.ggml.model", U64, 2**63),
])
def test_bleeding_llama_tokenizer_metadata(base, run, key, vtype, value):
    """Tokenizer keys of the wrong type or out of range: refused or ignored, never a traceback."""
    doc = base.doc()
    doc.set(key, vtype, value)
    rec = run(doc.to_chunks())
    if key.endswith("_token_id") and rec["outcome"] == "ok":
        return  # an id outside the vocabulary may be ignored, as llama.cpp does
    expect_rejected(rec, key, cls="PurelmError")
