"""purelm.tokenizer against transformers' reference ids (stored fixtures; no torch needed).

Fixtures come from tools/make_tokenizer_fixtures.py:
  tokenizer_smollm2.json  ids for the real SmolLM2-135M-Instruct GGUF ("gpt2" byte-level BPE)
  tok_llama_spm.gguf + tokenizer_spm.json  a tiny SentencePiece ("llama") vocabulary and its ids
"""

from __future__ import annotations

import json
import re
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from purelm.errors import PurelmError
from purelm.tokenizer import _CHAR_OF_BYTE, _SPLITS, Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SMOLLM2 = Path(
    os.environ.get("PURELM_SMOLLM2", "~/.cache/purelm/models/SmolLM2-135M-Instruct.Q4_1.gguf")
).expanduser()
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"SmolLM2 GGUF not found at {SMOLLM2}")

# Where purelm follows llama.cpp (and the model's own tokenizer.json) instead of transformers.
# pre "smollm" splits digits off first; transformers' GGUF loader skips that step, so a run of
# spaces before a digit comes out as single spaces there ("  1" -> "Ġ","Ġ","1" instead of "ĠĠ","1").
SMOLLM2_KNOWN_DIFFERENCES = {
    "def f(x):\n\treturn x  +  1\n\n\n": [1604, 275, 24, 104, 727, 198, 197, 5406, 1792, 216, 1232, 256, 33, 16506],
}


def metadata_of(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {field.name: field.contents() for field in reader.fields.values()}


def load_cases(name: str) -> list[dict]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))["cases"]


SMOLLM2_CASES = load_cases("tokenizer_smollm2.json")
SPM_CASES = load_cases("tokenizer_spm.json")
# The same SentencePiece vocabulary under architectures transformers tokenizes differently.
SPM_ARCHITECTURES = json.loads((FIXTURES / "tokenizer_spm.json").read_text(encoding="utf-8"))["architectures"]


@pytest.fixture(scope="module")
def smollm2_meta() -> dict:
    if not SMOLLM2.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2}")
    return metadata_of(SMOLLM2)


@pytest.fixture(scope="module")
def smollm2(smollm2_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_meta)


@pytest.fixture(scope="module")
def spm_meta() -> dict:
    return metadata_of(FIXTURES / "tok_llama_spm.gguf")


@pytest.fixture(scope="module")
def spm(spm_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(spm_meta)


def tiny_byte_level_meta(**overrides) -> dict:
    """A made-up gpt2 vocabulary: the 256 byte characters plus a few merges."""
    tokens = [_CHAR_OF_BYTE[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_end|>"]
    meta = {
        "general.architecture": "gpt2",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 259 + [3, 3],
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.eos_token_id": 259,
        "tokenizer.ggml.bos_token_id": 259,
    }
    meta.update(overrides)
    return meta


# --- against transformers --------------------------------------------------------------------------


@needs_smollm2
@pytest.mark.parametrize("case", SMOLLM2_CASES, ids=lambda c: repr(c["text"])[:40])
def test_smollm2_matches_transformers(smollm2, case):
    text = case["text"]
    expected = SMOLLM2_KNOWN_DIFFERENCES.get(text, case["ids"])
    assert smollm2.encode(text) == expected
    assert smollm2.encode(text, add_special=False) == SMOLLM2_KNOWN_DIFFERENCES.get(text, case["ids_no_special"])
    assert smollm2.decode(case["ids"]) == case["decode"]
    assert smollm2.decode(case["ids"], skip_special=True) == case["decode_skip_special"]


SPM_LLAMA_CPP = json.loads((FIXTURES / "tokenizer_spm_llama_cpp.json").read_text(encoding="utf-8"))["ids"]


@pytest.mark.parametrize("case", SPM_CASES, ids=lambda c: repr(c["text"])[:40])
def test_sentencepiece_matches_llama_cpp_and_transformers(spm, case):
    # llama.cpp (tools/make_llama_cpp_token_fixture.py), like sentencepiece itself, puts "▁" before every
    # run of text: also one that already starts with a space, and text after a special token.
    # transformers' GGUF loader skips it there; everywhere else the three agree.
    text, expected = case["text"], SPM_LLAMA_CPP[case["text"]]
    assert spm.encode(text) == expected
    assert spm.encode(text, add_special=False) == expected[1:]  # without the BOS
    if expected != case["ids"]:
        after_special = re.search(r"(<\|im_start\|>|<\|im_end\|>|<s>|</s>|<think>|</think>)[^<]", text)
        assert text.startswith(" ") or after_special, text
    assert spm.decode(case["ids"]) == case["decode"]
    assert spm.decode(case["ids"], skip_special=True) == case["decode_skip_special"]


@pytest.mark.parametrize("architecture", sorted(SPM_ARCHITECTURES))
def test_sentencepiece_architecture_variants(spm_meta, architecture):
    tok = Tokenizer.from_gguf_metadata(dict(spm_meta, **{"general.architecture": architecture}))
    for case, expected in zip(SPM_CASES, SPM_ARCHITECTURES[architecture]):
        assert tok.encode(case["text"]) == expected["ids"], case["text"]
        assert tok.decode(expected["ids"]) == expected["decode"], case["text"]


def test_known_differences_are_still_in_the_fixture():
    texts = {case["text"] for case in SMOLLM2_CASES}
    assert set(SMOLLM2_KNOWN_DIFFERENCES) <= texts


# --- properties of the SmolLM2 vocabulary ------------------------------------------------------------


@needs_smollm2
def test_smollm2_properties(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id) == (1, 2)
    assert smollm2.add_bos is False and smollm2.add_eos is False
    # llama.cpp: <|endoftext|> and <|im_end|> by text, <reponame> as the FIM repo token.
    assert smollm2.eog_ids == {0, 2, 4}
    assert smollm2.eot_id == 2
    assert smollm2.chat_template.startswith("{% for message in messages %}")


@needs_smollm2
def test_smollm2_builds_fast(smollm2_meta):
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(smollm2_meta)
    opened = time.perf_counter() - start
    tok.encode("warm up")
    built = time.perf_counter() - start
    # Targets are 0.3 s; the bounds leave room for a busy test machine.
    assert opened < 0.3
    assert built < 1.5


@needs_smollm2
def test_token_to_piece_byte_level(smollm2):
    assert smollm2.token_to_piece(smollm2.encode(" lead")[0]) == b" lead"
    assert smollm2.token_to_piece(2) == b"<|im_end|>"
    # An emoji cut across tokens: the pieces are raw bytes, not text.
    pieces = [smollm2.token_to_piece(i) for i in smollm2.encode("\U0001f600")]
    assert b"".join(pieces) == "\U0001f600".encode("utf-8")
    assert len(pieces) > 1


# --- streaming ----------------------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    decoder = tokenizer.stream_decoder(skip_special=skip_special)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@needs_smollm2
@pytest.mark.parametrize(
    "text",
    [
        "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
        "flags \U0001f1fa\U0001f1f8 and \U0001f3f3\ufe0f\u200d\U0001f308!",
        "\u65e5\u672c\u8a9e and \u00e9\u0301",
        "<|im_start|>user\n\U0001f600<|im_end|>",
    ],
)
def test_stream_matches_decode_byte_level(smollm2, text):
    ids = smollm2.encode(text)
    parts = stream(smollm2, ids)
    assert "".join(parts) == smollm2.decode(ids) == text
    assert not any("\ufffd" in part for part in parts)  # never half a character
    assert "" in parts[:-1]  # some token ended mid-character and was held back


@needs_smollm2
def test_stream_skip_special(smollm2):
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    assert "".join(stream(smollm2, ids, skip_special=True)) == smollm2.decode(ids, skip_special=True) == "user\nhi"


@needs_smollm2
def test_stream_flush_unfinished_character(smollm2):
    first = smollm2.encode("\U0001f600")[0]
    decoder = smollm2.stream_decoder()
    assert decoder.feed(first) == ""
    assert decoder.flush() == "\ufffd"


def test_stream_byte_fallback(spm):
    ids = spm.encode("\U0001f600 ok \U0001f44d\U0001f3fd", add_special=False)
    parts = stream(spm, ids)
    assert not any("\ufffd" in part for part in parts)
    # The stream keeps the "▁" prefix space that decode() strips, like llama.cpp's pieces.
    assert "".join(parts) == " " + spm.decode(ids)


def test_token_to_piece_sentencepiece(spm):
    newline = spm.tokens.index("<0x0A>")
    assert spm.token_to_piece(newline) == b"\n"
    assert spm.token_to_piece(spm.tokens.index("▁")) == b" "
    assert spm.token_to_piece(spm.bos_id) == b"<s>"


# --- BOS / EOS ------------------------------------------------------------------------------------


def test_sentencepiece_adds_bos(spm):
    assert spm.add_bos is True and spm.bos_id == 1
    assert spm.encode("hi")[0] == 1
    assert spm.encode("hi", add_special=False)[0] != 1
    assert spm.encode("") == [1]
    assert spm.encode("", add_special=False) == []


def test_bos_eos_flags_from_metadata(spm_meta):
    meta = dict(spm_meta, **{"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True})
    tok = Tokenizer.from_gguf_metadata(meta)
    ids = tok.encode("hi")
    assert ids[0] != 1 and ids[-1] == 2
    assert tok.encode("hi", add_special=False) == ids[:-1]


def test_bos_default_when_flag_missing(spm_meta):
    llama = {k: v for k, v in spm_meta.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf_metadata(llama).add_bos is True  # SentencePiece: llama.cpp adds BOS
    assert Tokenizer.from_gguf_metadata(tiny_byte_level_meta()).add_bos is False
    assert Tokenizer.from_gguf_metadata(tiny_byte_level_meta(**{"tokenizer.ggml.pre": "llama-bpe"})).add_bos is True


@needs_smollm2
def test_smollm2_bos_when_asked(smollm2_meta):
    tok = Tokenizer.from_gguf_metadata(dict(smollm2_meta, **{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hi") == [1] + tok.encode("hi", add_special=False)


# --- special-token text --------------------------------------------------------------------------


@needs_smollm2
def test_special_parsing_on_and_off(smollm2):
    text = "<|im_start|>user\nhi<|im_end|>"
    assert smollm2.encode(text) == [1, 4093, 198, 6004, 2]
    plain = smollm2.encode(text, parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert smollm2.decode(plain) == text
    # The switch does not stick.
    assert smollm2.encode(text) == [1, 4093, 198, 6004, 2]


def test_special_parsing_sentencepiece(spm):
    think = spm.tokens.index("<think>")
    im_start = spm.tokens.index("<|im_start|>")
    parsed = spm.encode("<|im_start|><think>", add_special=False)
    assert parsed == [im_start, think]
    plain = spm.encode("<|im_start|><think>", add_special=False, parse_special=False)
    assert im_start not in plain
    assert think in plain  # user-defined tokens are matched whole either way, as in llama.cpp
    assert spm.decode(plain) == "<|im_start|><think>"


def test_sentencepiece_eog(spm):
    assert spm.eos_id == 2
    assert spm.eog_ids == {2, spm.tokens.index("<|im_end|>")}


# --- metadata shapes, pre-tokenizers, errors -------------------------------------------------------


def test_numpy_arrays_and_callable_metadata(spm_meta):
    reference = Tokenizer.from_gguf_metadata(spm_meta)
    as_numpy = dict(spm_meta)
    as_numpy["tokenizer.ggml.scores"] = np.asarray(spm_meta["tokenizer.ggml.scores"], dtype=np.float32)
    as_numpy["tokenizer.ggml.token_type"] = np.asarray(spm_meta["tokenizer.ggml.token_type"], dtype=np.int32)
    as_numpy["tokenizer.ggml.bos_token_id"] = np.uint32(1)
    text = "Hello world 1234 \U0001f600 <think>"
    for meta in (as_numpy, spm_meta.get):
        tok = Tokenizer.from_gguf_metadata(meta)
        assert tok.encode(text) == reference.encode(text)


@pytest.mark.parametrize("pre", sorted(_SPLITS) + ["no-such-pre"])
def test_every_pre_tokenizer_builds_and_round_trips(pre):
    tok = Tokenizer.from_gguf_metadata(tiny_byte_level_meta(**{"tokenizer.ggml.pre": pre}))
    text = "Hello  the world's 1234567 I'M \u65e5\u672c x\n\n  y \U0001f600<|im_end|>"
    ids = tok.encode(text, add_special=False)
    assert tok.decode(ids) == text
    assert tok.token_to_piece(tok.tokens.index("<|im_end|>")) == b"<|im_end|>"


def test_unknown_pre_falls_back_to_gpt2():
    text = "Hello  the world's 1234567 x\n\n  y"
    fallback = Tokenizer.from_gguf_metadata(tiny_byte_level_meta(**{"tokenizer.ggml.pre": "no-such-pre"}))
    missing = Tokenizer.from_gguf_metadata(tiny_byte_level_meta(**{"tokenizer.ggml.pre": None}))
    gpt2 = Tokenizer.from_gguf_metadata(tiny_byte_level_meta(**{"tokenizer.ggml.pre": "gpt-2"}))
    assert fallback.encode(text) == missing.encode(text) == gpt2.encode(text)


def test_merges_are_used():
    tok = Tokenizer.from_gguf_metadata(tiny_byte_level_meta())
    # "t" is byte 116; "he" and "Ġthe" come from the merges.
    assert tok.encode("the the", add_special=False) == [ord("t"), tok.tokens.index("he"), tok.tokens.index("Ġthe")]


def test_unknown_model_is_an_error(spm_meta):
    with pytest.raises(PurelmError, match="'rwkv'"):
        Tokenizer.from_gguf_metadata(dict(spm_meta, **{"tokenizer.ggml.model": "rwkv"}))


def test_missing_pieces_are_errors(spm_meta):
    with pytest.raises(PurelmError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({k: v for k, v in spm_meta.items() if k != "tokenizer.ggml.tokens"})
    with pytest.raises(PurelmError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata({k: v for k, v in spm_meta.items() if k != "tokenizer.ggml.model"})
    no_merges = {k: v for k, v in tiny_byte_level_meta().items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(PurelmError, match="merges"):
        Tokenizer.from_gguf_metadata(no_merges)
    with pytest.raises(PurelmError, match="token_type"):
        Tokenizer.from_gguf_metadata(dict(spm_meta, **{"tokenizer.ggml.token_type": [1, 2]}))


def test_bad_ids_and_text_are_errors(spm):
    with pytest.raises(PurelmError, match="outside the vocabulary"):
        spm.decode([1, spm.vocab_size])
    with pytest.raises(PurelmError, match="outside the vocabulary"):
        spm.token_to_piece(-1)
    with pytest.raises(PurelmError, match="expected str"):
        spm.encode(b"bytes")


def test_default_pre_tokenizer_splits_as_llama_cpp():
    """A "gpt2" vocabulary with pre "default" (or none): llama.cpp cuts punctuation runs off before
    GPT-2's split, so a run of spaces before "#" is one piece, not spaces and " #". Ids from llama.cpp's
    own llama_tokenize on the fixture's vocabulary (tests/fixtures/tokenizer_default_pre_llama_cpp.json)."""
    ref = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_default_pre_llama_cpp.json").read_text())
    tok = Tokenizer.from_file(Path(__file__).parent.parent / ref["model"])
    assert tok.pre in (None, "default")
    for case in ref["cases"]:
        assert tok.encode(case["text"], add_special=False, parse_special=False) == case["ids"], case["text"]
