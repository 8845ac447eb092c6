"""BERT's WordPiece, as llama.cpp runs it for `tokenizer.ggml.model = "bert"` (embedding models).

llama.cpp's converter stores a BERT vocabulary with "▁" in front of each word-start piece and with
"##" taken off the continuation pieces ("##ing" is stored "ing", "the" is stored "▁the"). Tokenizing:
  1. special tokens are cut out of the text first, longest first: user-defined ones always, control
     and unknown ones when `parse_special` (llama.cpp's `tokenizer_st_partition`);
  2. each remaining run of text is split into words (`words`): whitespace ends a word, control
     characters are dropped, and each punctuation mark, ASCII symbol and CJK ideograph is a word of
     its own; lowercasing and accent stripping follow the file's `tokenizer.ggml.normalizer.*` flags
     (both on by default, as in llama.cpp);
  3. each word, with "▁" put in front, is cut greedily into the longest pieces of the vocabulary,
     left to right; a word that cannot be cut completely becomes the unknown token.

Character classes come from Python's `unicodedata`, the source of llama.cpp's own tables, and
follow llama.cpp where it departs from transformers' BertNormalizer: accents are stripped by keeping
only the first code point of each character's NFD form, and lowercasing maps one code point to one.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

SPACE_MARK = "\u2581"  # "▁", the word-start mark of the stored pieces
# Longest piece looked for in the text (characters here, bytes in purelm.unigram). Each position of a
# word tries every length pieces have, so a hostile file's huge pieces would make a long word slow;
# real vocabularies stay far below this (BERT's longest pieces have about 20 characters).
MAX_PIECE_LEN = 256

# llama.cpp's whitespace set (Unicode White_Space): these end a word.
_WHITESPACE = frozenset(
    map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
              0x205F, 0x3000])
)
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # llama.cpp's list, its 0x2B920 included

_SKIP, _SPLIT, _KEEP, _ACCENT = 0, 1, 2, 3


@lru_cache(maxsize=65536)
def _kind(char: str) -> int:
    """What a (normalized) character does to a word: dropped, a word of its own, or part of one."""
    cat = unicodedata.category(char)
    code = ord(char)
    if char == "\0" or char == "\ufffd" or cat in ("Cc", "Cf", "Co", "Cs"):
        return _SKIP
    if cat[0] == "M":
        return _ACCENT
    if cat[0] == "P" or (code < 0x7F and cat[0] == "S") or any(lo <= code <= hi for lo, hi in _CJK):
        return _SPLIT
    return _KEEP


@lru_cache(maxsize=65536)
def _first_of_nfd(char: str) -> str:
    return unicodedata.normalize("NFD", char)[0]


@lru_cache(maxsize=65536)
def _lower(char: str) -> str:
    # The one-to-one (simple) lowercase mapping; only U+0130 lowercases to two code points in full.
    low = char.lower()
    return low if len(low) == 1 else ("i" if char == "\u0130" else char)


def words(text: str, lowercase: bool = True, strip_accents: bool = True) -> list[str]:
    """The words of `text`, as llama.cpp's WPM pre-processing splits them."""
    out: list[str] = []
    word: list[str] = []
    for char in text:
        if strip_accents:
            char = _first_of_nfd(char)
        if char in _WHITESPACE:
            if word:
                out.append("".join(word))
                word = []
            continue
        kind = _kind(char)
        if kind == _SKIP or (kind == _ACCENT and strip_accents):
            continue
        if lowercase:
            char = _lower(char)
        if kind == _SPLIT:
            if word:
                out.append("".join(word))
                word = []
            out.append(char)
        else:
            word.append(char)
    if word:
        out.append("".join(word))
    return out


class WordPiece:
    """Greedy longest-match WordPiece over a llama.cpp-style vocabulary (see the module docstring);
    unk_id is what a word that cannot be cut becomes."""

    def __init__(self, tokens: list[str], unk_id: int, *, lowercase: bool = True, strip_accents: bool = True) -> None:
        self.ids = {text: index for index, text in enumerate(tokens) if text}
        self.unk_id = unk_id
        self.lowercase, self.strip_accents = lowercase, strip_accents
        # The lengths pieces have, longest first: each position tries only these.
        self.lengths = sorted({len(text) for text in self.ids if len(text) <= MAX_PIECE_LEN}, reverse=True)

    def encode(self, text: str, specials: list[tuple[str, int]]) -> list[int]:
        """Ids for `text`; `specials` are the (text, id) tokens cut out whole first, longest first."""
        ids: list[int] = []
        for piece in partition(text, specials):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                for word in words(piece, self.lowercase, self.strip_accents):
                    ids.extend(self._cut(word))
        return ids

    def _cut(self, word: str) -> list[int]:
        word = SPACE_MARK + word
        found, start, n = [], 0, len(word)
        lookup = self.ids.get
        while start < n:
            for length in self.lengths:
                if start + length <= n:
                    index = lookup(word[start:start + length])
                    if index is not None:
                        found.append(index)
                        start += length
                        break
            else:
                return [self.unk_id]  # a piece matched nothing: the whole word is unknown
        return found


def partition(text: str, specials: list[tuple[str, int]]) -> list[str | int]:
    """`text` cut around every occurrence of the special tokens (ids), each token in turn over the
    pieces still text, longest token first, as llama.cpp's `tokenizer_st_partition` does."""
    pieces: list[str | int] = [text] if text else []
    for special, index in specials:
        if not any(isinstance(p, str) and special in p for p in pieces):
            continue
        cut: list[str | int] = []
        for piece in pieces:
            if isinstance(piece, int) or special not in piece:
                cut.append(piece)
                continue
            parts = piece.split(special)
            for k, part in enumerate(parts):
                if k:
                    cut.append(index)
                if part:
                    cut.append(part)
        pieces = cut
    return pieces


def detokenize(text: str) -> str:
    """Text from the joined pieces of a WordPiece vocabulary ("▁" already turned into spaces): without
    the space of the first word, and with llama.cpp's clean-up of spaces before punctuation and
    contractions (its `clean_spaces`, on for this vocabulary type)."""
    text = text[1:] if text.startswith(" ") else text
    out: list[str] = []
    for char in text:  # " ?", " !", " .", " ,"
        if char in "?!.," and out and out[-1] == " ":
            out.pop()
        out.append(char)
    text, out, i = "".join(out), [], 0
    while i < len(text):  # " ' " -> "'"
        char = text[i]
        if char == "'" and out and out[-1] == " " and i + 1 < len(text) and text[i + 1] == " ":
            out[-1] = "'"
            i += 2
            continue
        out.append(char)
        i += 1
    text, out = "".join(out), []
    for i, char in enumerate(text):  # " 's", " 'm", " 're", " 've"
        contraction = text[i + 1:i + 2] in ("s", "m") or text[i + 1:i + 3] in ("re", "ve")
        if char == "'" and out and out[-1] == " " and contraction:
            out.pop()
        out.append(char)
    return "".join(out)
