"""purelm.tokenizer against hostile GGUF metadata: malformed values, huge tokens, bad text and ids.

Every malformed value must be a FormatError naming its key (never a TypeError, an IndexError or a
panic from `tokenizers`), and nothing may cost time quadratic in a token's length.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import purelm.tokenizer as tokenizer_module
from purelm.errors import FormatError, PurelmError, UsageError
from purelm.formats.gguf import GGUFFile, GGUFWriter
from purelm.tokenizer import _CHAR_OF_BYTE, MAX_MERGE_TOKEN_LEN, Tokenizer, _merges_from_scores
from test_tokenizer import FIXTURES, SMOLLM2, metadata_of, needs_smollm2, tiny_byte_level_meta

PATH = "hostile.gguf"
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def reference_merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The implementation before the length cap (quadratic in a token's length), kept to compare with."""
    found = []
    for piece, score in scores.items():
        pairs = [
            (piece[:cut], piece[cut:], score)
            for cut in range(1, len(piece))
            if piece[:cut] in vocab and piece[cut:] in vocab
        ]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found.extend(pairs)
    found.sort(key=lambda pair: (pair[2], len(pair[0]), len(pair[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


@pytest.fixture(scope="module")
def spm_meta() -> dict:
    return metadata_of(FIXTURES / "tok_llama_spm.gguf")


def llama_meta(tokens: list[str], **overrides) -> dict:
    """A SentencePiece-style vocabulary without merges: they come from the scores."""
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
        "tokenizer.ggml.token_type": [1] * len(tokens),
    }
    meta.update(overrides)
    return meta


BASE = ["<unk>", "<s>", "</s>", "▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


# --- merges from scores: the same merges, without the quadratic cost ------------------------------


def test_merges_unchanged_on_sentencepiece_fixture(spm_meta):
    tokens = spm_meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    by_score = dict(zip(tokens, spm_meta["tokenizer.ggml.scores"]))
    by_order = {t: -i for i, t in enumerate(tokens)}  # the Gemma ordering
    for scores in (by_score, by_order):
        merges = _merges_from_scores(vocab, scores)
        assert merges and merges == reference_merges_from_scores(vocab, scores)


@needs_smollm2
def test_merges_unchanged_on_a_real_50k_vocabulary():
    # SmolLM2's 49152 tokens (up to 81 characters) with tied scores, which exercise the tie order.
    tokens = GGUFFile(SMOLLM2).metadata["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = {t: float(-(i % 37)) for i, t in enumerate(tokens)}
    merges = _merges_from_scores(vocab, scores)
    assert len(merges) > 100_000
    assert merges == reference_merges_from_scores(vocab, scores)


vocabularies = st.lists(st.text(alphabet="ab▁<>", min_size=1, max_size=9), min_size=1, max_size=60, unique=True)


@FUZZ
@given(tokens=vocabularies, data=st.data())
def test_merges_unchanged_on_random_vocabularies(tokens, data):
    scores = data.draw(st.lists(st.integers(-3, 0), min_size=len(tokens), max_size=len(tokens)))  # many ties
    vocab = {t: i for i, t in enumerate(tokens)}
    by_score = dict(zip(tokens, map(float, scores)))
    assert _merges_from_scores(vocab, by_score) == reference_merges_from_scores(vocab, by_score)


@FUZZ
@given(tokens=vocabularies, cap=st.integers(1, 6))
def test_tokens_over_the_cap_get_no_merges(tokens, cap):
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = {t: -float(i) for i, t in enumerate(tokens)}
    kept = {t: s for t, s in scores.items() if len(t) <= cap}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_module, "MAX_MERGE_TOKEN_LEN", cap)
        assert _merges_from_scores(vocab, scores) == reference_merges_from_scores(vocab, kept)


def test_merge_cap_boundary():
    # A token at the cap still gets its merge; one past it gets none.
    at_cap, past_cap = "a" * MAX_MERGE_TOKEN_LEN, "b" * (MAX_MERGE_TOKEN_LEN + 1)
    tokens = ["a", at_cap[1:], "b", past_cap[1:], at_cap, past_cap]
    merges = _merges_from_scores({t: i for i, t in enumerate(tokens)}, dict.fromkeys(tokens, 0.0))
    assert ("a", at_cap[1:]) in merges
    assert not any(left + right == past_cap for left, right in merges)
    assert MAX_MERGE_TOKEN_LEN >= 128  # SentencePiece's default longest piece is 16


@pytest.mark.parametrize(
    "long_tokens",
    [["a" * 1_000_000], [chr(0x4E00 + i) * 10_000 for i in range(1000)]],
    ids=["one 1 MB token", "1000 tokens of 10 KB"],
)
def test_long_tokens_build_fast(long_tokens):
    # Before the cap: 100 s for the first, 20 s for the second.
    meta = llama_meta(BASE + long_tokens)
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(meta)
    ids = tok.encode("hello world", add_special=False)
    assert time.perf_counter() - start < 2.0
    assert tok.decode(ids) == "hello world"


def test_long_token_from_a_file(tmp_path):
    path = tmp_path / "long.gguf"
    writer = GGUFWriter(path)
    for key, value in llama_meta(BASE + ["▁" + "x" * 400_000]).items():
        writer.add(key, value)
    writer.write()
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, path=path)
    assert tok.decode(tok.encode("a b")) == "a b"
    assert time.perf_counter() - start < 2.0


# --- malformed metadata: one FormatError naming the key ------------------------------------------

N = 420  # tokens in the SentencePiece fixture
TOKENS, SCORES, TYPES, MERGES = (f"tokenizer.ggml.{k}" for k in ("tokens", "scores", "token_type", "merges"))

MALFORMED = [
    # (what is wrong, the key, its value); the error must name that key
    ("model not a string", "tokenizer.ggml.model", 3),
    ("model as bytes", "tokenizer.ggml.model", b"llama"),
    ("model unknown", "tokenizer.ggml.model", "rwkv"),
    ("model missing", "tokenizer.ggml.model", None),
    ("tokens missing", TOKENS, None),
    ("tokens empty", TOKENS, []),
    ("tokens a string", TOKENS, "abc"),
    ("tokens a number", TOKENS, 42),
    ("tokens numbers", TOKENS, list(range(N))),
    ("tokens nested arrays", TOKENS, [["a"]] * N),
    ("tokens a 2-D array", TOKENS, np.zeros((N, 2))),
    ("scores short", SCORES, [0.0] * (N - 1)),
    ("scores strings", SCORES, ["0.5"] * N),
    ("scores NaN", SCORES, [0.0] * (N - 1) + [math.nan]),
    ("scores NaN numpy", SCORES, np.full(N, np.nan, dtype=np.float32)),
    ("scores bools", SCORES, [True] * N),
    ("scores None", SCORES, [None] * N),
    ("scores a number", SCORES, 1.0),
    ("types long", TYPES, [1] * (N + 1)),
    ("types 7", TYPES, [1] * (N - 1) + [7]),
    ("types -1", TYPES, [-1] + [1] * (N - 1)),
    ("types floats", TYPES, [1.0] * N),
    ("types bools numpy", TYPES, np.ones(N, dtype=bool)),
    ("types a dict", TYPES, {"a": 1}),
    ("merge a number", MERGES, [3]),
    ("merge without space", MERGES, ["▁t"]),
    ("merge with leading space only", MERGES, [" ▁t"]),
    ("merge an array", MERGES, [["▁", "t"]]),
    ("merges a string", MERGES, "▁ t"),
    ("bos a string", "tokenizer.ggml.bos_token_id", "1"),
    ("eos a bool", "tokenizer.ggml.eos_token_id", True),
    ("unk a float", "tokenizer.ggml.unknown_token_id", 0.0),
    ("pad an array", "tokenizer.ggml.padding_token_id", [0]),
    ("eot a float", "tokenizer.ggml.eot_token_id", 2.5),
    ("add_bos an int", "tokenizer.ggml.add_bos_token", 1),
    ("add_eos a string", "tokenizer.ggml.add_eos_token", "false"),
    ("add_space_prefix numpy int", "tokenizer.ggml.add_space_prefix", np.int8(0)),
    ("pre a number", "tokenizer.ggml.pre", 7),
    ("pre an array", "tokenizer.ggml.pre", ["llama3"]),
    ("architecture a number", "general.architecture", 1),
    ("chat template bytes", "tokenizer.chat_template", b"{{ x }}"),
]


@pytest.mark.parametrize("key, value", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_value_is_a_format_error(spm_meta, key, value):
    meta = dict(spm_meta, **{key: value})
    with pytest.raises(FormatError) as caught:
        Tokenizer.from_gguf_metadata(meta, path=PATH).encode("hi")
    assert str(caught.value).startswith(f"{PATH}: {key}: ")


def test_bad_token_entries_are_named(spm_meta):
    tokens = list(spm_meta[TOKENS])
    for bad, problem in [(None, "entry 7 is NoneType"), ("a\udc80", "entry 7 holds a lone surrogate")]:
        hostile = tokens[:7] + [bad] + tokens[8:]
        with pytest.raises(FormatError, match=problem) as caught:
            Tokenizer.from_gguf_metadata(dict(spm_meta, **{TOKENS: hostile}), path=PATH)
        assert caught.value.field == TOKENS


def test_duplicate_tokens_are_an_error(spm_meta):
    # llama.cpp refuses them too (an assertion); which id would encode give?
    tokens = list(spm_meta[TOKENS])
    tokens[300] = tokens[200]
    with pytest.raises(FormatError, match="entries 200 and 300 are both"):
        Tokenizer.from_gguf_metadata(dict(spm_meta, **{TOKENS: tokens}), path=PATH)


@pytest.mark.parametrize("meta_of", [lambda spm: spm, lambda spm: tiny_byte_level_meta()], ids=["llama", "gpt2"])
def test_empty_tokens_are_allowed(spm_meta, meta_of):
    # Real files have them (llama.cpp warns and loads); encode never gives one, decode gives "".
    meta = dict(meta_of(spm_meta))
    tokens = list(meta[TOKENS])
    types = list(meta.get(TYPES) or [1] * len(tokens))
    tokens[10] = tokens[12] = ""
    types[12] = 3  # also as a control token
    tok = Tokenizer.from_gguf_metadata(dict(meta, **{TOKENS: tokens, TYPES: types}))
    ids = tok.encode("hello world", add_special=False)
    assert tok.decode(ids) == "hello world"
    assert 10 not in ids and 12 not in ids
    assert tok.token_to_piece(10) == tok.token_to_piece(12) == b""


@pytest.mark.parametrize("value", [-1, 420, 2**32 - 1, np.uint32(2**32 - 1), np.int64(-5)])
def test_special_ids_outside_the_vocabulary_are_ignored(spm_meta, value):
    # As llama.cpp does: real files carry padding_token_id = 2**32 - 1.
    meta = dict(spm_meta, **{f"tokenizer.ggml.{k}_token_id": value for k in ("bos", "eos", "padding", "eot")})
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.bos_id is tok.eos_id is tok.pad_id is None
    assert tok.eot_id == tok.tokens.index("<|im_end|>")  # found by its text instead
    assert tok.add_bos is False
    assert tok.decode(tok.encode("hi there")) == "hi there"


@pytest.mark.parametrize(
    "merges", [["▁ t", "t zz"], ["▁ t", "q z"]], ids=["half not a token", "join not a token"]
)
def test_merges_that_make_no_token_are_a_format_error(spm_meta, merges):
    # tokenizers raises for the first and panics (a BaseException) for the second.
    tok = Tokenizer.from_gguf_metadata(dict(spm_meta, **{MERGES: merges}), path=PATH)
    with pytest.raises(FormatError, match="entry 1") as caught:
        tok.encode("hi")
    assert caught.value.field == MERGES


def test_gpt2_merge_whose_join_is_missing():
    meta = tiny_byte_level_meta(**{MERGES: ["Ġ t", "t h"]})  # "th" is not a token
    with pytest.raises(FormatError, match="'t h'"):
        Tokenizer.from_gguf_metadata(meta, path=PATH).encode("the")


def test_misnamed_byte_token_is_taken_as_text(spm_meta):
    tokens, types = list(spm_meta[TOKENS]), list(spm_meta[TYPES])
    tokens[100], types[100] = "<0xZZ>", 6
    tok = Tokenizer.from_gguf_metadata(dict(spm_meta, **{TOKENS: tokens, TYPES: types}))
    assert tok.token_to_piece(100) == b"<0xZZ>"


def test_numpy_values_are_accepted(spm_meta):
    meta = dict(
        spm_meta,
        **{
            SCORES: np.asarray(spm_meta[SCORES], dtype=np.float64),
            TYPES: np.asarray(spm_meta[TYPES], dtype=np.uint8),
            "tokenizer.ggml.eos_token_id": np.int32(2),
            "tokenizer.ggml.add_bos_token": np.bool_(False),
        },
    )
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.eos_id == 2 and tok.add_bos is False
    assert tok.encode("hi") == Tokenizer.from_gguf_metadata(spm_meta).encode("hi", add_special=False)


def test_file_with_wrong_types_names_the_file(tmp_path):
    path = tmp_path / "types.gguf"
    writer = GGUFWriter(path)
    writer.add("tokenizer.ggml.model", "llama")
    writer.add(TOKENS, np.arange(5, dtype=np.int32))  # numbers where strings belong
    writer.write()
    with pytest.raises(FormatError, match="entry 0 is int, not a string") as caught:
        Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, path=path)
    assert caught.value.path == str(path) and caught.value.field == TOKENS


# --- text and ids from the user ------------------------------------------------------------------


@pytest.fixture(scope="module")
def spm(spm_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(spm_meta)


@pytest.mark.parametrize("meta_of", [lambda spm: spm, lambda spm: tiny_byte_level_meta()], ids=["llama", "gpt2"])
def test_lone_surrogates_become_replacement_characters(spm_meta, meta_of):
    tok = Tokenizer.from_gguf_metadata(meta_of(spm_meta))
    # b"caf\xe9 ok" read with errors="surrogateescape", as Python does for sys.argv.
    text = b"caf\xe9 ok".decode("utf-8", "surrogateescape")
    assert text == "caf\udce9 ok"
    assert tok.encode(text) == tok.encode("caf\ufffd ok")
    assert tok.decode(tok.encode(text, add_special=False)) == "caf\ufffd ok"
    # A surrogate pair left as two code points is two lone surrogates.
    assert tok.encode("\ud83d\ude00") == tok.encode("\ufffd\ufffd")


@pytest.mark.parametrize("bad", [420, -1, 10**30, 1.0, "1", None, [1]])
def test_bad_ids_are_usage_errors(spm, bad):
    for call in (
        lambda: spm.decode([1, bad]),
        lambda: spm.token_to_piece(bad),
        lambda: spm.stream_decoder(skip_special=True).feed(bad),
    ):
        with pytest.raises(UsageError):
            call()


@pytest.mark.parametrize("ids", [5, None, "12"])
def test_ids_that_are_not_a_list_are_usage_errors(spm, ids):
    with pytest.raises(UsageError):
        spm.decode(ids)


def test_encode_rejects_non_text(spm):
    with pytest.raises(UsageError, match="expected str"):
        spm.encode(None)


# --- fuzzing: a PurelmError or a working tokenizer, nothing else ------------------------------------

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
GPT2_ALPHABET = [_CHAR_OF_BYTE[b] for b in range(256)]

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=5),
    st.binary(max_size=4), st.lists(st.integers(-2, 8), max_size=3),
)
piece = st.text(alphabet="ab ▁<>|s/0xAF", min_size=0, max_size=6)


@st.composite
def metadata(draw) -> tuple[dict, bool]:
    """Random tokenizer metadata, each value often valid and sometimes junk; and whether its
    vocabulary can spell any ASCII text (so that decode(encode(text)) must give the text back)."""
    def maybe(valid):
        return draw(st.one_of(valid, junk) if draw(st.integers(0, 9)) == 0 else valid)

    model = maybe(st.sampled_from(["llama", "gpt2"]))
    complete = draw(st.booleans())
    base = (BYTE_TOKENS if model != "gpt2" else GPT2_ALPHABET) if complete else ["a", "b", " "]
    base = base + ["ab"]  # with the merge "a b", so that gpt2 vocabularies have one that works
    extra = [t for t in draw(st.lists(piece, max_size=25, unique=True)) if t not in base]
    tokens = base + extra
    n = len(tokens)

    # Merges that make a token (splits of the extra tokens), now and then any pair.
    known = set(tokens)
    splits = [f"{t[:i]} {t[i:]}" for t in extra for i in range(1, len(t)) if {t[:i], t[i:]} <= known]
    any_pair = st.tuples(st.sampled_from(tokens), st.sampled_from(tokens)).map(" ".join)
    merges = st.lists(st.sampled_from(["a b"] + splits), max_size=10).map(lambda m: ["a b"] + m)
    if draw(st.integers(0, 9)) == 0:
        merges = merges | st.lists(any_pair, min_size=1, max_size=3)
    if model != "gpt2":
        merges = merges | st.none()  # usually from the scores
    # Drawn for the extra tokens only: hundreds of drawn values per example would make this slow.
    k = len(extra)
    scores = st.lists(st.floats(-100, 0), min_size=k, max_size=k).map(lambda s: [0.0] * len(base) + s)
    kinds = st.lists(st.sampled_from([1, 1, 1, 3, 4, 5, 6]), min_size=k, max_size=k)
    byte_kind = 6 if complete and model != "gpt2" else 1  # "▁" too: harmless
    meta = {
        "tokenizer.ggml.model": model,
        TOKENS: maybe(st.just(tokens)),
        SCORES: maybe(scores | st.none()),
        TYPES: maybe(kinds.map(lambda t: [byte_kind] * len(base) + t) | st.none()),
        MERGES: maybe(merges),
        "tokenizer.ggml.pre": maybe(st.sampled_from(["default", "llama3", "smollm", "qwen2", "no-such"])),
        "general.architecture": maybe(st.sampled_from(["llama", "gemma", "gpt2"])),
    }
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        meta[f"tokenizer.ggml.{key}_token_id"] = maybe(st.integers(-1, n) | st.none())
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        meta[f"tokenizer.ggml.{key}"] = maybe(st.booleans() | st.none())
    return meta, complete


@FUZZ
@given(case=metadata(), text=st.text(alphabet="abc xyz.,!019", max_size=20))
def test_random_metadata_builds_or_raises_purelm_error(case, text):
    meta, complete = case
    try:
        tok = Tokenizer.from_gguf_metadata(meta, path=PATH)
        ids = tok.encode(text, add_special=False)
        decoded = tok.decode(ids)
        tok.decode(tok.encode(text), skip_special=True)
        pieces = b"".join(tok.token_to_piece(i) for i in ids)
    except PurelmError as exc:
        event(f"error {getattr(exc, 'field', '?')}")
        return
    event(f"built {tok.model} complete={complete}")
    assert all(0 <= i < tok.vocab_size for i in ids)
    # Special and user-defined tokens are matched whole, and a "llama" vocabulary puts "▁" after
    # each: the text comes back when the vocabulary can spell it and has none of them in it.
    whole = {tok.tokens[i] for i in tok.special_ids}
    whole.update(t for t, kind in zip(tok.tokens, tok.token_types) if kind == 4)
    if complete and not any(t and t in text for t in whole):
        assert decoded == text
        if meta[TYPES] is not None or tok.model == "gpt2":  # "<0x41>" is a byte only when typed so
            assert pieces.decode("utf-8").lstrip(" ") == text.lstrip(" ")
