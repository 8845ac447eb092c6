"""`purelm convert`: block data, names and errors. (Logits of converted files: tests/test_models.py.)"""
import json
import shutil
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest
from conftest import llama_cpp_tensor_names, tensor_pattern

from purelm.cli import main
from purelm.convert import convert
from purelm.convert_spec import permute_qk
from purelm.errors import FormatError, PurelmError
from purelm.formats.gguf import GGUFFile
from purelm.formats.safetensors import Checkpoint


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr, np.float32)
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def edited_checkpoint(fixtures, tmp_path, edit):
    src = fixtures / "hf" / "llama"
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    ckpt = Checkpoint(src)
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    edit(tensors)
    (dst / "model.safetensors").unlink()
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16"])
def test_blocks_equal_gguf_quants(fixtures, tmp_path, qtype):
    out = convert(fixtures / "hf" / "llama", tmp_path / "m.gguf", qtype)
    cfg = json.loads((fixtures / "hf" / "llama" / "config.json").read_text())
    ckpt = Checkpoint(fixtures / "hf" / "llama")
    f = GGUFFile(out)
    gtype = gguf.GGMLQuantizationType[qtype.upper()]
    for hf_name, name, transform in [
        ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", None),
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", cfg["num_attention_heads"]),
        ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", cfg["num_key_value_heads"]),
        ("model.embed_tokens.weight", "token_embd.weight", None),
    ]:
        x = ckpt.get(hf_name)
        if transform:
            x = permute_qk(x, transform)
        expected = gguf.quants.quantize(x, gtype)
        np.testing.assert_array_equal(f.tensors[name].data.reshape(-1), expected.reshape(-1).view(np.uint8))
    assert f.tensors["blk.0.attn_norm.weight"].type.name == "F32"  # norms stay f32, as llama.cpp keeps them


def test_names_and_keys_are_llama_cpps(fixtures, tmp_path):
    out = convert(fixtures / "hf" / "qwen2", tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(out)
    allowed = llama_cpp_tensor_names("qwen2")
    for t in r.tensors:
        assert tensor_pattern(t.name) in allowed, t.name
    keys = set(r.fields)
    for key in (gguf.Keys.LLM.CONTEXT_LENGTH, gguf.Keys.LLM.EMBEDDING_LENGTH, gguf.Keys.LLM.BLOCK_COUNT,
                gguf.Keys.LLM.FEED_FORWARD_LENGTH, gguf.Keys.Attention.HEAD_COUNT, gguf.Keys.Attention.HEAD_COUNT_KV,
                gguf.Keys.Attention.LAYERNORM_RMS_EPS, gguf.Keys.Rope.FREQ_BASE):
        assert key.format(arch="qwen2") in keys, key
    assert r.fields["qwen2.block_count"].types[0] == gguf.GGUFValueType.UINT32


def test_missing_tensor_is_named(fixtures, tmp_path):
    hf = edited_checkpoint(fixtures, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(FormatError, match=r"blk\.1\.ffn_up\.weight.*missing.*expected shape \(128, 64\)"):
        convert(hf, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_shape_mismatch_is_named(fixtures, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.gate_proj.weight"] = t["model.layers.0.mlp.gate_proj.weight"][:96]

    hf = edited_checkpoint(fixtures, tmp_path, shrink)
    with pytest.raises(FormatError, match=r"blk\.0\.ffn_gate\.weight.*gate_proj.*\(96, 64\), expected \(128, 64\)"):
        convert(hf, tmp_path / "m.gguf", "q8_0")


def test_unsupported_architecture(fixtures, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(fixtures / "hf" / "llama", hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PurelmError, match="'MambaForCausalLM' is not supported"):
        convert(hf, tmp_path / "m.gguf")


def test_cli_convert(fixtures, tmp_path, capsys):
    assert main(["convert", str(fixtures / "hf" / "llama"), str(tmp_path / "o.gguf"), "--type", "q4_0"]) == 0
    assert GGUFFile(tmp_path / "o.gguf").tensors["blk.0.ffn_up.weight"].type.name == "Q4_0"
    assert main(["convert", str(tmp_path), str(tmp_path / "x.gguf")]) == 1
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("style", ["nested", "top-level"])
def test_rope_settings_in_either_config_style(fixtures, tmp_path, style):
    # transformers >= 5 nests rope settings in rope_parameters; older configs keep them at the top level.
    hf = tmp_path / "hf"
    shutil.copytree(fixtures / "hf" / "llama", hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    if style == "nested":
        cfg["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "linear", "factor": 4.0}
    else:
        cfg["rope_theta"], cfg["rope_scaling"] = 500000.0, {"type": "linear", "factor": 4.0}
    (hf / "config.json").write_text(json.dumps(cfg))
    meta = GGUFFile(convert(hf, tmp_path / "m.gguf", "f32")).metadata
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 4.0


def _fixture_archs():
    from conftest import FIXTURES

    return sorted(p.name.split("-ref-")[0] for p in FIXTURES.glob("*-ref-f32.npz"))


@pytest.mark.parametrize("arch", _fixture_archs())
def test_every_architectures_blocks_equal_gguf_quants(fixtures, arch):
    # The f32 file holds each tensor exactly as the converter transformed it, so every quantized file's
    # blocks must be gguf.quants.quantize of the f32 file's tensor of the same name.
    f32 = GGUFFile(fixtures / f"{arch}-f32.gguf")
    for qtype in ("f16", "q8_0", "q4_0"):
        f = GGUFFile(fixtures / f"{arch}-{qtype}.gguf")
        assert set(f.tensors) == set(f32.tensors)
        for name, t in f.tensors.items():
            x = f32.tensors[name].dequantize()
            gtype = gguf.GGMLQuantizationType(int(t.type))
            expected = x if gtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(x, gtype)
            np.testing.assert_array_equal(t.data.reshape(-1), np.ascontiguousarray(expected).reshape(-1).view(np.uint8),
                                          err_msg=f"{arch} {qtype} {name}")
            if name.endswith("ffn_gate_inp.weight"):
                assert t.type.name == "F32", name  # MoE routers stay F32, as llama.cpp keeps them
            elif x.ndim == 2 and qtype != "f16" and x.shape[1] % 32 == 0 and not name.endswith("_norm.weight"):
                assert t.type.name == qtype.upper(), name  # matrices take the asked type


def test_sentencepiece_checkpoint_tokenizer(fixtures, tmp_path):
    # A checkpoint with a SentencePiece tokenizer.model (LLaMA 2, Mistral, Gemma style) converts to a
    # "llama" vocabulary whose ids are sentencepiece's own (tests/fixtures/spm, tools/make_spm_fixture.py).
    import purelm
    from purelm.formats.spm_model import read_sentencepiece

    hf = tmp_path / "hf"
    shutil.copytree(fixtures / "hf" / "llama", hf)
    (hf / "tokenizer.json").unlink()
    shutil.copy(fixtures / "spm" / "tokenizer.model", hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    ref = json.loads((fixtures / "spm" / "reference.json").read_text(encoding="utf-8"))
    out = convert(hf, tmp_path / "m.gguf", "q8_0")
    meta = GGUFFile(out).metadata
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.bos_token_id"] == ref["bos_id"]
    sp = read_sentencepiece(hf / "tokenizer.model")
    assert meta["tokenizer.ggml.tokens"] == sp.pieces and list(meta["tokenizer.ggml.scores"]) == sp.scores
    llm = purelm.load(out, backend="numpy")
    for case in ref["cases"]:
        assert llm.tokenize(case["text"], parse_special=False) == [ref["bos_id"]] + case["ids"], case["text"]
        assert llm.detokenize(case["ids"]) == case["decoded"], case["text"]


def test_corrupt_tokenizer_model_is_a_clear_error(fixtures, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(fixtures / "hf" / "llama", hf)
    (hf / "tokenizer.json").unlink()
    (hf / "tokenizer.model").write_bytes((fixtures / "spm" / "tokenizer.model").read_bytes()[:1000])
    with pytest.raises(FormatError, match="tokenizer.model"):
        convert(hf, tmp_path / "m.gguf")


def test_models_do_not_import_the_converter():
    # Model files declare their ConvertSpec through the leaf module purelm.convert_spec; the converter
    # (which imports every model) stays out of a process that only runs models.
    code = ("import sys, purelm.models.llama; "
            "print(sorted(m for m in sys.modules if m in ('purelm.convert', 'purelm.formats.safetensors')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre, name", [
    (None, "gpt-2"),  # the fixture's own: GPT-2's ByteLevel split
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                             "use_regex": True}]},
     "smollm"),
    ({"type": "Split", "pattern": {"Regex": "[a-z]"}, "behavior": "Isolated", "invert": False}, "default"),
])
def test_byte_level_tokenizer_gets_the_pre_tokenizer_that_splits_as_it_does(fixtures, tmp_path, pre, name, capsys):
    """tokenizer.ggml.pre names the split the checkpoint's tokenizer.json does (llama.cpp's converter
    names it by the ids a test text gets), so that purelm and llama.cpp tokenize the file as
    transformers does; none that fits: "default", with a warning."""
    from tokenizers import Tokenizer as HFTokenizer

    src = tmp_path / "hf"
    shutil.copytree(fixtures / "hf" / "gpt2", src)
    if pre is not None:
        tj = json.loads((src / "tokenizer.json").read_text())
        tj["pre_tokenizer"] = pre
        (src / "tokenizer.json").write_text(json.dumps(tj))
    convert(src, tmp_path / "m.gguf", "f32")
    f = GGUFFile(tmp_path / "m.gguf")
    assert f.metadata["tokenizer.ggml.pre"] == name
    assert ("no known pre-tokenizer" in capsys.readouterr().err) == (name == "default")
    if name != "default":
        import purelm

        text = "Hello  world!! 12345 6789 ... it's  #tag\n\n  done"
        want = HFTokenizer.from_file(str(src / "tokenizer.json")).encode(text, add_special_tokens=False).ids
        assert purelm.load(tmp_path / "m.gguf", backend="numpy").tokenizer.encode(
            text, add_special=False, parse_special=False) == want
