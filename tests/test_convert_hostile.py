"""`purelm convert` on hostile checkpoints: every malformed safetensors header, config.json, tokenizer file
or output path is one FormatError/PurelmError naming the file, the field and the problem; nothing hangs,
allocates hugely or leaves a partial output file."""
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from purelm.cli import main
from purelm.convert import FLOAT_KEYS, INT_KEYS, convert
from purelm.errors import FormatError, PurelmError, UsageError
from purelm.formats.gguf import GGUFFile
from purelm.formats.safetensors import Checkpoint, SafetensorsFile
from purelm.formats.spm_model import SentencePieceModel, parse_sentencepiece, read_sentencepiece

from test_convert import write_safetensors  # noqa: E402

HF = Path(__file__).parent / "fixtures" / "hf"
SPM = Path(__file__).parent / "fixtures" / "spm" / "tokenizer.model"


def write_raw(path, header, data=b"", length=None):
    """A safetensors file from a header (any JSON value, or raw bytes) and data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def write_tensors(path, tensors):
    write_safetensors(path, tensors)
    return path


def hf_dir(tmp_path, arch="llama", name="hf"):
    """A copy of a fixture checkpoint (a few hundred KiB) whose files can be edited."""
    return shutil.copytree(HF / arch, tmp_path / name)


DELETE = object()  # edit_config: remove the key


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "hf")


# ------------------------------------------------------------------ safetensors headers

F32_4 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}

BAD_HEADERS = {
    "list": ([F32_4], "expected an object"),
    "string": ("weights", "expected an object"),
    "number": (5, "expected an object"),
    "null": (None, "expected an object"),
    "entry-not-dict": ({"w": [0, 4]}, r"'w'.*header entry is a JSON array"),
    "entry-string": ({"w": "F32"}, r"'w'.*header entry"),
    "string-offsets": ({"w": {**F32_4, "data_offsets": ["0", "4"]}}, "data_offsets"),
    "float-offsets": ({"w": {**F32_4, "data_offsets": [0.0, 4.0]}}, "data_offsets"),
    "bool-offsets": ({"w": {**F32_4, "data_offsets": [False, 4]}}, "data_offsets"),
    "one-offset": ({"w": {**F32_4, "data_offsets": [4]}}, "data_offsets"),
    "three-offsets": ({"w": {**F32_4, "data_offsets": [0, 4, 8]}}, "data_offsets"),
    "offsets-dict": ({"w": {**F32_4, "data_offsets": {"start": 0}}}, "data_offsets"),
    "no-offsets": ({"w": {"dtype": "F32", "shape": [1]}}, "data_offsets"),
    "negative-shape": ({"w": {**F32_4, "shape": [-1]}}, "shape"),
    "float-shape": ({"w": {**F32_4, "shape": [1.0]}}, "shape"),
    "string-shape": ({"w": {**F32_4, "shape": ["1"]}}, "shape"),
    "bool-shape": ({"w": {**F32_4, "shape": [True]}}, "shape"),
    "shape-not-list": ({"w": {**F32_4, "shape": 1}}, "shape"),
    "too-many-dims": ({"w": {**F32_4, "shape": [1] * 70}}, "dimensions"),
    "overflowing-shape": ({"w": {**F32_4, "shape": [2**32, 2**32, 2**32]}}, r"hold 4 bytes.*needs"),
    "shape-vs-bytes": ({"w": {**F32_4, "shape": [2]}}, r"hold 4 bytes.*needs 8"),
    "empty-but-huge": ({"w": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}, "too large"),
    "negative-offset": ({"w": {**F32_4, "data_offsets": [-4, 0], "shape": [1]}}, "outside the file"),
    "reversed-offsets": ({"w": {**F32_4, "data_offsets": [4, 0]}}, "outside the file"),
    "past-the-end": ({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, "outside the file"),
    "dtype": ({"w": {**F32_4, "dtype": "F128"}}, "unsupported dtype"),
    "dtype-not-string": ({"w": {**F32_4, "dtype": ["F32"]}}, "unsupported dtype"),
    "metadata-list": ({"__metadata__": ["pt"], "w": F32_4}, "__metadata__"),
    "metadata-empty-list": ({"__metadata__": [], "w": F32_4}, "__metadata__"),
    "metadata-numbers": ({"__metadata__": {"format": 1}, "w": F32_4}, "__metadata__"),
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlapping tensor data"),
    "same-range": ({"a": F32_4, "b": F32_4}, "overlapping tensor data"),
    "not-json": (b"{not json", "not valid JSON"),
    "not-utf8": (b'{"\xff": 1}', "not valid JSON"),
    "deep-nesting": (b"[" * 100000, "not valid JSON"),
    "duplicate-tensor": (b'{"w": ' + json.dumps(F32_4).encode() + b', "w": ' + json.dumps(F32_4).encode() + b"}",
                         "duplicate key 'w'"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_safetensors_header(tmp_path, case):
    header, match = BAD_HEADERS[case]
    path = write_raw(tmp_path / "model.safetensors", header, bytes(16))
    with pytest.raises(FormatError, match=match) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("length, match", [(0, "length is 0"), (2**64 - 1, "larger than the file"),
                                           (1000, "larger than the file"), (200 << 20, "larger than the file")])
def test_safetensors_header_length(tmp_path, length, match):
    path = write_raw(tmp_path / "model.safetensors", {"w": F32_4}, bytes(4), length=length)
    with pytest.raises(FormatError, match=match):
        SafetensorsFile(path)


def test_safetensors_too_short(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(FormatError, match="too short"):
        SafetensorsFile(tmp_path / "model.safetensors")


def test_safetensors_gaps_are_fine(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}}
    data = np.array([1.0, 0.0, 2.0], np.float32).tobytes()
    f = SafetensorsFile(write_raw(tmp_path / "model.safetensors", header, data))
    assert f.get("a")[0] == 2.0 and f.get("b")[0] == 1.0 and f.get("empty").shape == (0, 3)
    assert f.metadata == {"format": "pt"}


def test_same_tensor_in_two_shards(tmp_path):
    write_tensors(tmp_path / "a.safetensors", {"w": np.zeros(2)})
    write_tensors(tmp_path / "b.safetensors", {"w": np.ones(2)})
    with pytest.raises(FormatError, match=r"b\.safetensors: tensor 'w': is also in .*a\.safetensors"):
        Checkpoint(tmp_path)


def test_bad_header_through_convert(tmp_path):
    d = hf_dir(tmp_path)
    write_raw(d / "model.safetensors", {"w": {**F32_4, "data_offsets": ["0", "4"]}}, bytes(4))
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor 'w': data_offsets"):
        convert(d, tmp_path / "m.gguf")
    assert leftovers(tmp_path) == []


JSON_LEAVES = [0, -1, 1.5, 2**70, "", "F32", None, True, [0, 4], [], {}]


def test_safetensors_header_fuzz(tmp_path):
    """Random header entries: only FormatError, and whatever loads reads back inside the file."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    leaf = st.sampled_from(JSON_LEAVES) | st.integers(-8, 64)
    entry = st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "BOOL", "X"]) | leaf,
        "shape": st.lists(st.integers(-2, 20) | leaf, max_size=4) | leaf,
        "data_offsets": st.lists(st.integers(-2, 70) | leaf, max_size=3) | leaf}) | leaf
    header = st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), entry, max_size=3) | leaf
    path = tmp_path / "model.safetensors"

    @hypothesis.settings(max_examples=100, deadline=None, database=None)
    @hypothesis.given(header)
    def run(h):
        write_raw(path, h, bytes(64))
        try:
            f = SafetensorsFile(path)
        except FormatError:
            return
        for name in f.keys():
            assert f.get(name).nbytes <= 64

    run()


# ------------------------------------------------------------------ config.json

@pytest.mark.parametrize("text, match", [
    ('{"architectures": ["LlamaForCausalLM"],}', r"config\.json: JSON: .* line 1 column 40"),
    ('{"a": 1\n"b": 2}', r"config\.json: JSON: Expecting ',' delimiter at line 2 column 1"),
    ("", r"config\.json: JSON: Expecting value at line 1 column 1"),
    ("[" * 100000, r"config\.json: JSON: .*recursion"),
    ('{"a": ' + "9" * 5000 + "}", r"config\.json: JSON: .*digits"),
    ('["LlamaForCausalLM"]', r"config\.json: top level: is a JSON array, expected an object"),
    ('"LlamaForCausalLM"', r"config\.json: top level: is a JSON string"),
    ("42", r"config\.json: top level: is a JSON number"),
])
def test_config_not_an_object(tmp_path, text, match):
    d = hf_dir(tmp_path)
    (d / "config.json").write_text(text)
    with pytest.raises(FormatError, match=match):
        convert(d, tmp_path / "m.gguf")


def test_config_not_utf8(tmp_path):
    d = hf_dir(tmp_path)
    (d / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(FormatError, match=r"config\.json: file: is not UTF-8"):
        convert(d, tmp_path / "m.gguf")


@pytest.mark.parametrize("value, match", [
    (DELETE, "architectures: is missing"), (None, "architectures: is missing"),
    ("LlamaForCausalLM", "architectures: must be a list"), ([], "architectures: must be a list"),
    ([1], "architectures: must be a list"), ({"LlamaForCausalLM": 1}, "architectures: must be a list"),
])
def test_config_architectures(tmp_path, value, match):
    d = edit_config(hf_dir(tmp_path), architectures=value)
    with pytest.raises(FormatError, match=r"config\.json: " + match):
        convert(d, tmp_path / "m.gguf")


BAD_INTS = [0, -1, "4", 4.0, True, [4], {"n": 4}, 10**12, 10**400]


def _int_cases():
    """Each integer key in INT_KEYS with a fixture whose config has it (the checks are shared by all)."""
    cases = {}
    for arch in sorted(p.name for p in HF.iterdir()):
        cfg = json.loads((HF / arch / "config.json").read_text())
        for key in INT_KEYS:
            if cfg.get(key) is not None:
                cases.setdefault(key, arch)
    return [(arch, key) for key, arch in cases.items()]


@pytest.mark.parametrize("arch, key", list(_int_cases()))
def test_config_integer_hyperparameters(tmp_path, arch, key):
    d = hf_dir(tmp_path, arch)
    for bad in BAD_INTS:
        if key == "sliding_window" and bad == 0:  # 0 means no window
            continue
        edit_config(d, **{key: bad})
        with pytest.raises(FormatError, match=rf"config\.json: {key}: ") as e:
            convert(d, tmp_path / "m.gguf")
        assert "\n" not in str(e.value)
    assert leftovers(tmp_path) == []


def test_every_integer_key_the_converters_read_is_checked():
    # A converter reading a new integer size must add it to INT_KEYS (or FLOAT_KEYS).
    src = "".join(p.read_text() for p in (Path(__file__).parent.parent / "purelm" / "models").glob("*.py"))
    read = set(re.findall(r'cfg(?:\.get\(|\[)"(\w+)"', src))
    ints = {k for p in HF.iterdir() for k, v in json.loads((p / "config.json").read_text()).items()
            if isinstance(v, int) and not isinstance(v, bool)}
    # token ids are dropped where out of range, not refused; RoBERTa's converter checks the one it uses
    # (models/bert.py: position_offset; tests/test_bert.py)
    ids_checked_where_read = {"pad_token_id"}
    assert read & ints - set(INT_KEYS) - set(FLOAT_KEYS) - ids_checked_where_read == set()
    assert {"num_attention_heads", "n_head", "n_layer", "n_embd", "n_positions", "n_ctx", "num_kv_heads",
            "n_heads", "d_model", "vocab_size", "head_dim"} <= set(INT_KEYS)


def test_zero_heads_is_not_a_zero_division(tmp_path):
    d = edit_config(hf_dir(tmp_path), num_attention_heads=0, head_dim=None)
    with pytest.raises(FormatError, match="num_attention_heads: 0 is less than 1"):
        convert(d, tmp_path / "m.gguf")


def test_absurd_layer_count_does_not_hang(tmp_path):
    d = edit_config(hf_dir(tmp_path), num_hidden_layers=10**12)
    n = len(Checkpoint(HF / "llama").names())
    with pytest.raises(FormatError, match=rf"num_hidden_layers: 1000000000000 layers, but .* holds only {n} tensors"):
        convert(d, tmp_path / "m.gguf")


def test_absurd_vocab_size_allocates_nothing(tmp_path):
    d = edit_config(hf_dir(tmp_path), vocab_size=10**9)
    with pytest.raises(FormatError, match=r"vocab_size: 1000000000 is larger than any tensor dimension .*largest: 320"):
        convert(d, tmp_path / "m.gguf")


def test_more_layers_than_the_checkpoint_holds(tmp_path):
    # within the tensor count, so it gets past the config check: the missing layer is named
    d = edit_config(hf_dir(tmp_path), num_hidden_layers=3)
    with pytest.raises(FormatError, match=r"blk\.2\..*missing"):
        convert(d, tmp_path / "m.gguf")
    d = edit_config(hf_dir(tmp_path, "gpt2", "gpt2"), n_layer=3)  # GPT-2's Conv1D loop runs past the layers
    with pytest.raises(FormatError, match="tensors for GPT2LMHeadModel: do not match the config"):
        convert(d, tmp_path / "g.gguf")
    assert leftovers(tmp_path) == ["gpt2"]


def test_more_kv_heads_than_heads(tmp_path):
    d = edit_config(hf_dir(tmp_path), num_key_value_heads=8)
    with pytest.raises(FormatError, match="num_key_value_heads: 8 key/value heads is more than the 4"):
        convert(d, tmp_path / "m.gguf")


@pytest.mark.parametrize("key, value, match", [
    ("rms_norm_eps", 0, "must be positive"), ("rms_norm_eps", -1e-5, "must be positive"),
    ("rms_norm_eps", "1e-5", "must be a number"), ("rms_norm_eps", float("nan"), "not a finite"),
    ("rms_norm_eps", float("inf"), "not a finite"), ("rms_norm_eps", 1e300, "not a finite"),
    ("rms_norm_eps", True, "must be a number"), ("rms_norm_eps", 10**400, "not a finite"),
    ("rope_theta", -10000.0, "must be positive"), ("rope_theta", [1.0], "must be a number"),
    ("partial_rotary_factor", 1.5, r"must be in \(0, 1\]"),
    ("rope_parameters", {"rope_theta": float("-inf")}, r"rope_parameters\.rope_theta: .*not a finite"),
    ("rope_parameters", {"rope_type": "linear", "factor": 0}, r"rope_parameters\.factor: must be positive"),
    ("rope_parameters", [10000.0], "rope_parameters: is a JSON array, expected an object"),
    ("rope_scaling", "linear", "rope_scaling: is a JSON string"),
    ("rope_scaling", {"original_max_position_embeddings": -1}, "original_max_position_embeddings: -1 is less"),
    ("rope_scaling", {"type": "linear", "factor": "4"}, r"rope_scaling\.factor: must be a number"),
])
def test_config_float_hyperparameters(tmp_path, key, value, match):
    d = edit_config(hf_dir(tmp_path), **{key: value})
    with pytest.raises(FormatError, match=rf"config\.json: .*{match}"):
        convert(d, tmp_path / "m.gguf")


@pytest.mark.parametrize("arch, key, value", [
    ("gptneox", "layer_norm_eps", 0.0), ("gpt2", "layer_norm_epsilon", "x"), ("gemma2", "query_pre_attn_scalar", -16),
    ("mpt", "attn_config", {"alibi": True, "alibi_bias_max": float("nan")}), ("mpt", "expansion_ratio", 1e39),
    ("mpt", "attn_config", {"kv_n_heads": [2]}), ("mpt", "attn_config", {"kv_n_heads": 8}),
    ("gptneox", "rotary_pct", 0), ("gemma2", "final_logit_softcapping", "30"),
])
def test_config_floats_of_other_architectures(tmp_path, arch, key, value):
    d = edit_config(hf_dir(tmp_path, arch), **{key: value})
    with pytest.raises(FormatError, match=rf"config\.json: (attn_config\.)?\w*{key.split('_')[0]}"):
        convert(d, tmp_path / "m.gguf")


def test_layer_types_must_match_the_layers(tmp_path):
    d = edit_config(hf_dir(tmp_path, "gemma2"), layer_types=["sliding_attention"] * 10**5)
    with pytest.raises(FormatError, match=r"config\.json: layer_types: must be a list of 2 strings"):
        convert(d, tmp_path / "m.gguf")


@pytest.mark.parametrize("arch, changes, match", [
    ("llama", {"rope_parameters": {"rope_type": "linear"}}, r"config\.json: factor: is missing"),
    ("gptneox", {"layer_norm_eps": DELETE}, r"config\.json: layer_norm_eps: is missing"),
    ("gpt2", {"n_embd": DELETE}, r"config\.json: n_embd: is missing"),
    ("gpt2", {"n_ctx": DELETE, "n_positions": DELETE}, r"config\.json: hyperparameters: do not make"),
    ("gemma2", {"sliding_window_pattern": "abc", "layer_types": DELETE},
     r"config\.json: hyperparameters: .*ValueError"),
    ("gemma3", {"rope_parameters": {"full_attention": 5}}, r"config\.json: hyperparameters: .*AttributeError"),
    ("phi3_longrope", {"rope_parameters": {"rope_type": "longrope", "long_factor": "x", "short_factor": [1.0]}},
     r"tensors for Phi3ForCausalLM: do not match the config \(ValueError"),
    ("llama", {"num_hidden_layers": DELETE}, r"config\.json: num_hidden_layers: is missing"),
])
def test_remaining_converter_errors_name_config_json(tmp_path, arch, changes, match):
    # Problems the central checks do not know about still come out of the architecture's hparams as
    # FormatErrors naming config.json, never as KeyError/TypeError/ValueError.
    d = edit_config(hf_dir(tmp_path, arch), **changes)
    with pytest.raises(FormatError, match=match):
        convert(d, tmp_path / "m.gguf")


# ------------------------------------------------------------------ tokenizer files

def _tok(d, edit):
    tj = json.loads((d / "tokenizer.json").read_text())
    edit(tj)
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return d


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update(model=[1]), r"tokenizer\.json: model: is a JSON array"),
    (lambda t: t["model"]["vocab"].update({"x": "7"}), r"tokenizer\.json: model\.vocab\['x'\]: id '7'"),
    (lambda t: t["model"]["vocab"].update({"x": -1}), r"model\.vocab\['x'\]: id -1 is not"),
    (lambda t: t["model"]["vocab"].update({"x": 10**12}), r"model\.vocab\['x'\]: id 1000000000000 is not"),
    (lambda t: t["model"]["vocab"].update({"x": 1.0}), r"model\.vocab\['x'\]"),
    (lambda t: t.update(added_tokens={"a": 1}), r"tokenizer\.json: added_tokens: must be a list"),
    (lambda t: t.update(added_tokens=[{"id": 3}]), r"added_tokens: must be a list of objects"),
    (lambda t: t.update(added_tokens=[{"content": "<x>"}]), r"added_tokens\['<x>'\]: id None"),
    (lambda t: t.update(added_tokens=[{"content": "<x>", "id": 10**9}]), r"added_tokens\['<x>'\]: id 1000000000"),
    (lambda t: t["model"].update(merges=[[1, 2]]), r"tokenizer\.json: model\.merges: must be"),
    (lambda t: t["model"].update(merges=[["a", "b", "c"]]), r"model\.merges"),
    (lambda t: t["model"].update(merges="a b"), r"model\.merges"),
])
def test_malformed_tokenizer_json(tmp_path, edit, match):
    d = _tok(hf_dir(tmp_path), edit)
    with pytest.raises(FormatError, match=match):
        convert(d, tmp_path / "m.gguf")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text, match", [('{"model": ', r"JSON: Expecting value at line 1 column 11"),
                                         ("[1, 2]", "top level: is a JSON array"),
                                         ("null", "top level: is a JSON null")])
def test_tokenizer_files_not_json_objects(tmp_path, name, text, match):
    d = hf_dir(tmp_path)
    (d / name).write_text(text)
    with pytest.raises(FormatError, match=re.escape(name) + ": " + match):
        convert(d, tmp_path / "m.gguf")


def test_out_of_range_special_token_ids_are_dropped(tmp_path):
    d = edit_config(hf_dir(tmp_path), eos_token_id=10**12, bos_token_id=-1, pad_token_id=True, unk_token_id=3)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": ["<s>"], "eos_token": {"content": 5}}))
    meta = GGUFFile(convert(d, tmp_path / "m.gguf", "f32")).metadata
    assert meta["tokenizer.ggml.unknown_token_id"] == 3
    assert not {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.padding_token_id"} & set(meta)


def _spm_dir(tmp_path, data):
    d = hf_dir(tmp_path)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").write_bytes(data)
    return d


def piece(text=b"a", score=None, kind=None):
    body = b"\x0a" + bytes([len(text)]) + text
    if score is not None:
        body += b"\x15" + struct.pack("<f", score)
    if kind is not None:
        body += b"\x18" + bytes([kind])
    return b"\x0a" + bytes([len(body)]) + body


@pytest.mark.parametrize("data, match", [
    (b"", r"pieces: no SentencePiece pieces"),
    (b"\xff" * 20, r"protobuf: truncated or malformed varint"),
    (b"\x0a\xff\xff\xff\xff\x0f", r"protobuf: a field of 4294967295 bytes runs past the end"),
    (b"\x0b", r"protobuf: unsupported wire type 3"),
    (b"\x00\x01", r"protobuf: field number 0"),
    (b"\x0d\x01\x02", r"protobuf: a field of 4 bytes runs past the end"),
    (b"\x09\x01", r"protobuf: a field of 8 bytes runs past the end"),
    (b"\x0a\x03\x0a\x05a", r"piece 0: a field of 5 bytes"),
    (piece(b"a", kind=99), r"piece 0: type 99 is not"),
    (piece(b"a") + piece(b"b", kind=0), r"piece 1: type 0 is not"),
    (piece(b"\xff\xfe"), r"piece 0: text is not valid UTF-8"),
    (b"\x0a\x02\x15\x00", r"piece 0: a field of 4 bytes runs past the end"),
    (b"\x1a\x01\x18", r"normalizer_spec: truncated or malformed varint"),
])
def test_malformed_tokenizer_model(tmp_path, data, match):
    with pytest.raises(FormatError, match=r"tokenizer\.model: " + match):
        convert(_spm_dir(tmp_path, data), tmp_path / "m.gguf")


def test_tokenizer_model_well_formed_pieces(tmp_path):
    sp = parse_sentencepiece(piece(b"<unk>", 0.0, 2) + piece(b"a", -1.5) + b"\x1a\x02\x18\x00")
    assert (sp.pieces, sp.scores, sp.types, sp.add_dummy_prefix) == (["<unk>", "a"], [0.0, -1.5], [2, 1], False)
    with pytest.raises(FormatError, match=r"tokenizer\.model: file: is not a regular file"):
        read_sentencepiece((tmp_path / "tokenizer.model").mkdir() or tmp_path / "tokenizer.model")  # a folder


def test_tokenizer_model_fuzz():
    """Random and mutated tokenizer.model bytes: a model or a FormatError, nothing else, quickly."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    good = SPM.read_bytes()
    assert len(parse_sentencepiece(good).pieces) == 320

    @st.composite
    def mutated(draw):
        buf = bytearray(good[: draw(st.integers(0, len(good)))])
        for _ in range(draw(st.integers(0, 8))):
            if buf:
                buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        at = draw(st.integers(0, len(buf)))
        return bytes(buf[:at]) + draw(st.binary(max_size=16)) + bytes(buf[at:])

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(st.binary(max_size=64) | mutated())
    def run(data):
        try:
            sp = parse_sentencepiece(data)
        except FormatError as e:
            assert "\n" not in str(e)
            return
        assert isinstance(sp, SentencePieceModel) and len(sp.pieces) == len(sp.scores) == len(sp.types)
        assert all(t in range(1, 7) for t in sp.types)

    run()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                  "tokenizer.model"])
def test_fifo_instead_of_a_file_does_not_block(tmp_path, name):
    import os

    d = hf_dir(tmp_path)
    if name == "tokenizer.model":
        (d / "tokenizer.json").unlink()
    else:
        (d / name).unlink()
    os.mkfifo(d / name)
    with pytest.raises(FormatError, match=re.escape(name) + ": file: is not a regular file"):
        convert(d, tmp_path / "m.gguf")


# ------------------------------------------------------------------ output

def test_output_folder_must_exist(tmp_path):
    out = tmp_path / "no" / "such" / "m.gguf"
    folder = re.escape(str(tmp_path / "no" / "such"))
    with pytest.raises(UsageError, match=folder + ": the output folder does not exist"):
        convert(HF / "llama", out)
    assert not (tmp_path / "no").exists()


def test_output_is_a_folder(tmp_path):
    with pytest.raises(UsageError, match="is a folder"):
        convert(HF / "llama", tmp_path)
    assert list(tmp_path.iterdir()) == []


def _failing_midway(tmp_path):
    """A checkpoint whose layer-1 q_proj passes every header and config check but cannot be permuted
    into llama.cpp's layout: the error comes while tensors are being written."""
    d = hf_dir(tmp_path)
    ckpt = Checkpoint(HF / "llama")
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    tensors["model.layers.1.self_attn.q_proj.weight"] = tensors["model.layers.1.self_attn.q_proj.weight"][:60]
    write_tensors(d / "model.safetensors", tensors)
    return d


def test_failure_midway_leaves_no_file(tmp_path):
    d = _failing_midway(tmp_path)
    done = []
    with pytest.raises(FormatError, match=r"tensor 'model\.layers\.1\.self_attn\.q_proj\.weight': shape \(60, 64\)"):
        convert(d, tmp_path / "m.gguf", "f32", progress=lambda n, total: done.append(n))
    assert done, "the failure should come after some tensors were written"
    assert leftovers(tmp_path) == []


def test_failure_keeps_an_existing_output(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(FormatError):
        convert(_failing_midway(tmp_path), tmp_path / "m.gguf", "f32")
    assert (tmp_path / "m.gguf").read_bytes() == b"old" and leftovers(tmp_path) == ["m.gguf"]


def test_failing_model_check_leaves_no_file(tmp_path):
    d = hf_dir(tmp_path)
    ckpt = Checkpoint(HF / "llama")
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    del tensors["model.layers.1.mlp.up_proj.weight"]  # written fine; the model check finds it missing
    write_tensors(d / "model.safetensors", tensors)
    with pytest.raises(FormatError, match=r"blk\.1\.ffn_up\.weight"):
        convert(d, tmp_path / "m.gguf")
    assert leftovers(tmp_path) == []


def test_interrupt_leaves_no_file(tmp_path):
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(HF / "llama", tmp_path / "m.gguf", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_write_error_is_a_purelm_error(tmp_path, monkeypatch):
    import errno

    from purelm.formats.gguf import GGUFWriter

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write", full)
    with pytest.raises(PurelmError, match=r"m\.gguf: cannot be written: No space left on device"):
        convert(HF / "llama", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_good_conversion_leaves_only_the_output(tmp_path):
    out = convert(HF / "llama", tmp_path / "m.gguf", "q8_0")
    assert out == tmp_path / "m.gguf" and list(tmp_path.iterdir()) == [out]
    assert GGUFFile(out).metadata["llama.block_count"] == 2


# ------------------------------------------------------------------ the command line

@pytest.mark.parametrize("make, word", [
    (lambda tmp: edit_config(hf_dir(tmp), num_attention_heads=0), "num_attention_heads"),
    (lambda tmp: write_raw(hf_dir(tmp) / "model.safetensors", b"[1, 2]").parent, "expected an object"),
])
def test_cli_reports_one_line(tmp_path, capsys, make, word):
    d = make(tmp_path)
    rc = main(["convert", str(d), str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("purelm: error: ") and err.count("\n") == 1 and word in err
    assert "Traceback" not in err
    assert leftovers(tmp_path) == []


def test_more_experts_per_token_than_experts_is_refused(tmp_path):
    src = hf_dir(tmp_path, "qwen3moe")
    cfg = json.loads((src / "config.json").read_text())
    n = cfg.get("num_experts") or cfg["num_local_experts"]
    d = edit_config(src, num_experts_per_tok=n + 1)
    with pytest.raises(FormatError, match=f"num_experts_per_tok: {n + 1} experts per token is more than the {n}"):
        convert(d, tmp_path / "m.gguf")
