"""llama.cpp's own tokenizer suite, run on purelm: tests/test-tokenizer-0 over models/ggml-vocab-*.gguf.

Each vocabulary with test cases comes as three files from llama.cpp (the llama-cpp-python 0.3.36 sdist):
`ggml-vocab-NAME.gguf` (metadata only: no tensors, and the file ends right after the metadata, without
the padding a tensor section would need), `.gguf.inp` (the texts, separated by
"\\n__ggml_vocab_test__\\n") and `.gguf.out` (one line of ids per text). As test-tokenizer-0.cpp does,
each text is tokenized without BOS/EOS and without parsing special tokens, and the ids must be equal.

The files are found in $PURELM_LLAMA_CPP_DIR/models (default: the llama.cpp of the project's other
references, ~/.cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp); without them these tests
skip, saying how to fetch them. The vocabulary-only reading itself is tested on small files written
here, so it is checked everywhere.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

import purelm
from purelm.cli import main
from purelm.errors import FormatError, PurelmError
from purelm.formats.gguf import GGUFFile, GGUFWriter
from purelm.tokenizer import Tokenizer
from conftest import LLAMA_CPP

MODELS = LLAMA_CPP / "models"
HOW = (f"llama.cpp's vocabulary files are not in {MODELS}: run `python tools/fetch_llama_cpp_vocabs.py` "
       "(downloads the llama-cpp-python 0.3.36 sdist from PyPI and extracts models/ggml-vocab-*), or set "
       "PURELM_LLAMA_CPP_DIR to a llama.cpp checkout")
# The vocabularies with test cases in llama-cpp-python 0.3.36's llama.cpp.
WITH_CASES = ["bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2",
              "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"]
SEP = "\n__ggml_vocab_test__\n"

# llama.cpp's ids (llama_tokenize of libllama from llama-cpp-python 0.3.36, called through ctypes) for
# texts beyond the suite's: per vocabulary and text, (no BOS/EOS, no special parsing) and (both).
# nomic-bert-moe (a "t5" unigram vocabulary) ships without .inp/.out, so this is its check.
EXTRA_TEXTS = [
    'Hello world',
    '  Hello   World  ',
    '',
    ' ',
    'Ça va? ÉCOLE naïve café',
    '日本語のテキスト、中文。한국어',
    'tab\tand\nnewline\r\n',
    '<s>special</s> <mask> [PAD250001]',
    'ﬁne Ⅻ ① ｆｕｌｌｗｉｄｔｈ',
    '🦙 llama.cpp 🚀!',
    'x\u200dy\xa0z',
    "don't stop 3.14159",
]
EXTRA_IDS = {
    'nomic-bert-moe': [
        ([35378, 8999],
         [0, 35378, 8999, 2]),
        ([35378, 6661],
         [0, 35378, 6661, 2]),
        ([],
         [0, 2]),
        ([],
         [0, 2]),
        ([25909, 307, 32, 3050, 441, 71621, 24, 9392, 272, 26216],
         [0, 25909, 307, 32, 3050, 441, 71621, 24, 9392, 272, 26216, 2]),
        ([6, 98449, 154, 193508, 37, 32095, 30, 41526, 2211],
         [0, 6, 98449, 154, 193508, 37, 32095, 30, 41526, 2211, 2]),
        ([20928, 136, 3525, 2256],
         [0, 20928, 136, 3525, 2256, 2]),
        ([4426, 7, 2740, 146981, 42946, 7, 2740, 4426, 1510, 92, 2740, 378, 116908, 2588, 188735, 268],
         [0, 0, 5361, 2, 250001, 378, 116908, 2588, 188735, 268, 2]),
        ([5885, 39198, 106, 4393, 146984],
         [0, 5885, 39198, 106, 4393, 146984, 2]),
        ([6, 3, 67140, 5, 238, 6366, 6, 247206, 38],
         [0, 6, 3, 67140, 5, 238, 6366, 6, 247206, 38, 2]),
        ([1022, 113, 97],
         [0, 1022, 113, 97, 2]),
        ([2301, 25, 18, 7279, 1031, 2592, 146086],
         [0, 2301, 25, 18, 7279, 1031, 2592, 146086, 2]),
    ],
    'bert-bge': [
        ([7592, 2088],
         [101, 7592, 2088, 102]),
        ([7592, 2088],
         [101, 7592, 2088, 102]),
        ([],
         [101, 102]),
        ([],
         [101, 102]),
        ([6187, 12436, 1029, 12431, 15743, 7668],
         [101, 6187, 12436, 1029, 12431, 15743, 7668, 102]),
        ([1864, 1876, 1950, 1671, 30239, 30227, 30233, 30240, 1635, 1746, 1861, 1636, 1469, 29991, 29999],
         [101, 1864, 1876, 1950, 1671, 30239, 30227, 30233, 30240, 1635, 1746, 1861, 1636, 1469, 29991,
         29999, 102]),
        ([21628, 1998, 2047, 4179],
         [101, 21628, 1998, 2047, 4179, 102]),
        ([1026, 1055, 1028, 2569, 1026, 1013, 1055, 1028, 1026, 7308, 1028, 1031, 11687, 17788, 8889,
         24096, 1033],
         [101, 1026, 1055, 1028, 2569, 1026, 1013, 1055, 1028, 1026, 7308, 1028, 1031, 11687, 17788, 8889,
         24096, 1033, 102]),
        ([1984, 2638, 100, 100, 100],
         [101, 1984, 2638, 100, 100, 100, 102]),
        ([100, 2222, 8067, 1012, 18133, 2361, 100, 999],
         [101, 100, 2222, 8067, 1012, 18133, 2361, 100, 999, 102]),
        ([1060, 2100, 1062],
         [101, 1060, 2100, 1062, 102]),
        ([2123, 1005, 1056, 2644, 1017, 1012, 15471, 28154],
         [101, 2123, 1005, 1056, 2644, 1017, 1012, 15471, 28154, 102]),
    ],
    'gemma-4': [
        ([9259, 1902],
         [2, 9259, 1902]),
        ([138, 9259, 139, 14447, 138],
         [2, 138, 9259, 139, 14447, 138]),
        ([],
         [2]),
        ([236743],
         [2, 236743]),
        ([231436, 5380, 236881, 9848, 2457, 1618, 120362, 33443],
         [2, 231436, 5380, 236881, 9848, 2457, 1618, 120362, 33443]),
        ([94951, 236945, 95830, 236951, 55041, 236924, 114216, 237430],
         [2, 94951, 236945, 95830, 236951, 55041, 236924, 114216, 237430]),
        ([4823, 255968, 624, 107, 73481, 251, 107],
         [2, 4823, 255968, 624, 107, 73481, 251, 107]),
        ([236820, 236751, 236813, 18146, 954, 236751, 236813, 655, 1080, 236813, 870, 67074, 236778,
         236810, 236771, 236771, 236771, 236770, 236842],
         [2, 236820, 236751, 236813, 18146, 954, 236751, 236813, 236743, 4, 870, 67074, 236778, 236810,
         236771, 236771, 236771, 236770, 236842]),
        ([240811, 866, 236743, 464, 371, 409, 85761, 236743, 244912, 244305, 243317, 243317, 241038,
         242749, 244118, 242832, 244367],
         [2, 240811, 866, 236743, 464, 371, 409, 85761, 236743, 244912, 244305, 243317, 243317, 241038,
         242749, 244118, 242832, 244367]),
        ([478, 397, 404, 391, 43507, 236761, 12362, 236743, 242015, 236888],
         [2, 478, 397, 404, 391, 43507, 236761, 12362, 236743, 242015, 236888]),
        ([236781, 237243, 236762, 432, 398, 236802],
         [2, 236781, 237243, 236762, 432, 398, 236802]),
        ([13246, 236789, 236745, 4721, 236743, 236800, 236761, 236770, 236812, 236770, 236810, 236819],
         [2, 13246, 236789, 236745, 4721, 236743, 236800, 236761, 236770, 236812, 236770, 236810, 236819]),
    ],
}


def vocab_path(name: str) -> Path:
    path = MODELS / f"ggml-vocab-{name}.gguf"
    if not MODELS.is_dir():
        pytest.skip(HOW)
    return path


def read_cases(path: Path) -> dict[str, list[int]]:
    """test-tokenizer-0.cpp's read_tests: the .inp split at each separator (a separator at the very end
    starts no further case), the .out read line by line, each line stripped and cut at single spaces;
    a text given twice keeps its last ids (a std::map)."""
    raw = Path(f"{path}.inp").read_bytes().decode("utf-8")
    texts, pos = [], 0
    while pos < len(raw):
        end = raw.find(SEP, pos)
        if end < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:end])
        pos = end + len(SEP)
    lines = Path(f"{path}.out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":  # getline: a final newline ends the last line, it starts none
        lines.pop()
    assert len(texts) == len(lines), f"{path}: {len(texts)} inputs but {len(lines)} outputs"
    return {text: [int(tok) for tok in line.strip(" \t\n\v\f\r").split(" ")] if line.strip(" \t\n\v\f\r") else []
            for text, line in zip(texts, lines)}


def test_every_vocabulary_with_cases_is_listed():
    # A llama.cpp with more vocabularies than WITH_CASES would leave some unchecked: say so.
    if not MODELS.is_dir():
        pytest.skip(HOW)
    found = sorted(p.name[len("ggml-vocab-"):-len(".gguf.inp")] for p in MODELS.glob("ggml-vocab-*.gguf.inp"))
    assert found == sorted(WITH_CASES)


@pytest.mark.parametrize("name", WITH_CASES + ["nomic-bert-moe"])
def test_llama_cpp_tokenizer(name):
    path = vocab_path(name)
    tok = Tokenizer.from_file(path)
    if name in WITH_CASES:  # test-tokenizer-0: no BOS/EOS, special text not parsed
        cases = read_cases(path)
        assert len(cases) >= 40
        wrong = [(text, ids, got) for text, ids in cases.items()
                 if (got := tok.encode(text, add_special=False, parse_special=False)) != ids]
        assert not wrong, f"{len(wrong)} of {len(cases)} cases differ; first: {wrong[:3]}"
    # Also with special text parsed and BOS/EOS added (gemma4 always adds BOS; bert [CLS] and [SEP];
    # t5 EOS as its file says), spaces merged and text normalized by nomic's SentencePiece charsmap.
    for text, (plain, special) in zip(EXTRA_TEXTS, EXTRA_IDS.get(name, ())):
        assert tok.encode(text, add_special=False, parse_special=False) == plain, text
        assert tok.encode(text, add_special=True, parse_special=True) == special, text


@pytest.mark.parametrize("name", ["aquila", "baichuan", "gpt-neox", "nomic-bert-moe"] + WITH_CASES)
def test_vocabulary_only_files_open(name):
    # Every file llama.cpp ships opens; those without cases too (their tokenizers are not checked here).
    path = vocab_path(name)
    f = GGUFFile(path)
    assert f.tensors == {} and f.data_offset == f.file_size
    assert len(f.metadata["tokenizer.ggml.tokens"]) > 1000


def test_purelm_tokenize_reads_a_vocabulary_file(capsys):
    path = vocab_path("gpt-2")
    text, ids = next((t, i) for t, i in read_cases(path).items() if len(i) > 3)
    assert main(["tokenize", str(path), text, "--ids", "--no-bos"]) == 0
    assert json.loads(capsys.readouterr().out) == ids


def test_a_vocabulary_file_does_not_run():
    with pytest.raises(FormatError, match="vocabulary-only"):
        purelm.load(vocab_path("llama-spm"))


def test_bert_special_tokens_and_decode():
    tok = Tokenizer.from_file(vocab_path("bert-bge"))
    ids = tok.encode("Hello, World! It's [SEP] fine.")
    assert ids[0] == tok.bos_id == 101 and ids[-1] == tok.sep_id == 102
    assert 102 in ids[1:-1]  # "[SEP]" in the text is the token when special text is parsed
    assert 102 not in tok.encode("[SEP]", add_special=False, parse_special=False)
    assert tok.decode(ids, skip_special=True) == "hello, world! it's fine."


# --- the vocabulary-only reading, on files written here ----------------------------------------


def _vocab_only(tmp_path: Path, name: str = "v.gguf") -> Path:
    """A GGUF file with a small SentencePiece-style vocabulary and no tensors, ending right after the
    metadata, as llama.cpp's ggml-vocab-*.gguf do."""
    w = GGUFWriter(tmp_path / name)
    w.add("general.architecture", "llama")
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "▁ab", "ab"]
    w.add("tokenizer.ggml.model", "llama")
    w.add("tokenizer.ggml.tokens", tokens)
    w.add("tokenizer.ggml.scores", [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5, -0.1, -0.2])
    w.add("tokenizer.ggml.token_type", [2, 3, 3] + [1] * 6)
    w.add("tokenizer.ggml.bos_token_id", 1)
    w.add("general.name", "vocab")  # last, so the metadata ends in a letter and the padding is all zeros
    w.write()
    path = tmp_path / name
    raw = path.read_bytes()
    end = len(raw.rstrip(b"\0"))
    assert end % 32, "the writer's padding must be there to take off"
    path.write_bytes(raw[:end])
    return path


def test_unpadded_vocabulary_only_file_tokenizes(tmp_path):
    path = _vocab_only(tmp_path)
    f = GGUFFile(path)
    assert f.tensors == {} and f.data_offset == f.file_size == path.stat().st_size
    assert Tokenizer.from_file(path).encode("ab a") == [1, 7, 6]
    assert main(["tokenize", str(path), "ab a", "--ids"]) == 0


def test_vocabulary_only_file_still_bounds_checked(tmp_path):
    raw = _vocab_only(tmp_path).read_bytes()
    for cut in (len(raw) - 1, len(raw) - 40, 30):  # inside the last value, the tokens, the first key
        (tmp_path / "cut.gguf").write_bytes(raw[:cut])
        with pytest.raises(FormatError, match="truncated|cannot fit"):
            GGUFFile(tmp_path / "cut.gguf")


def test_model_file_still_needs_its_tensor_data(tmp_path):
    # A file that declares a tensor and ends after the metadata is truncated, padding or not.
    w = GGUFWriter(tmp_path / "m.gguf")
    w.add("general.architecture", "llama")
    w.add_tensor("token_embd.weight", np.ones((2, 32), np.float32))
    w.write()
    raw = (tmp_path / "m.gguf").read_bytes()
    data_start = len(raw) - 2 * 32 * 4
    for cut in (data_start, data_start - 1, len(raw) - 4):  # no data, short padding, short data
        (tmp_path / "cut.gguf").write_bytes(raw[:cut])
        with pytest.raises(FormatError, match="truncated"):
            GGUFFile(tmp_path / "cut.gguf")


def test_vocabulary_only_model_does_not_load(tmp_path):
    with pytest.raises(PurelmError, match="vocabulary-only"):
        purelm.load(_vocab_only(tmp_path))


def test_header_counts_still_checked(tmp_path):
    raw = bytearray(_vocab_only(tmp_path).read_bytes())
    struct.pack_into("<Q", raw, 8, 1)  # one tensor declared, none there
    (tmp_path / "t.gguf").write_bytes(bytes(raw))
    with pytest.raises(FormatError):
        GGUFFile(tmp_path / "t.gguf")


# --- the new vocabulary kinds on hostile metadata ---------------------------------------------------


def _meta(model: str, tokens: list[str], **extra) -> dict:
    return {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array([3] + [1] * (len(tokens) - 1), np.int32), **extra}


def test_bert_needs_an_unknown_token():
    with pytest.raises(FormatError, match="unknown_token_id"):
        Tokenizer.from_gguf_metadata(_meta("bert", ["[PAD]", "▁a", "b"]))  # the default, 100, is outside
    tok = Tokenizer.from_gguf_metadata(_meta("bert", ["[UNK]", "▁a", "b", "▁ab"], **{
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 0}))
    assert tok.encode("AB a abc", add_special=False) == [3, 1, 0]  # "abc" cannot be cut: unknown


def test_gemma4_needs_merges():
    with pytest.raises(FormatError, match="merges"):
        Tokenizer.from_gguf_metadata(_meta("gemma4", ["<pad>", "a"]))


@pytest.mark.parametrize("charsmap", [b"\1\0", b"\x08\0\0\0" + b"\0" * 4, b"\x04\0\0\0\xff\xff\xff\xff\x01",
                                      b"\x04\0\0\0" + bytes([0x61, 0x02, 0, 0]) + b"x"])
def test_t5_hostile_charsmap_is_a_format_error(charsmap):
    meta = _meta("t5", ["<unk>", "▁a", "a"], **{
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.ggml.scores": np.array([0, -1, -2], np.float32),
        "tokenizer.ggml.precompiled_charsmap": np.frombuffer(charsmap, np.uint8)})
    # Too short, a blob size past the end, a node index outside the array (twice).
    with pytest.raises(FormatError, match="precompiled_charsmap"):
        Tokenizer.from_gguf_metadata(meta).encode("a a", add_special=False)


@pytest.mark.parametrize("model", ["bert", "t5"])
def test_huge_pieces_do_not_make_long_words_slow(model):
    # Pieces of every length up to 3000 (a hostile file): each position of a 20000-character word
    # tries at most 256 lengths (MAX_PIECE_LEN), so this takes about a second, not minutes.
    tokens = ["[UNK]", "▁a", "a"] + ["a" * n for n in range(2, 3000)]
    meta = _meta(model, tokens, **{"tokenizer.ggml.unknown_token_id": 0,
                                   "tokenizer.ggml.scores": np.zeros(len(tokens), np.float32)})
    tok = Tokenizer.from_gguf_metadata(meta)
    start = time.perf_counter()
    ids = tok.encode("a" * 20000, add_special=False)
    assert time.perf_counter() - start < 20
    assert "".join(tok.tokens[i] for i in ids).replace("▁", "") == "a" * 20000
