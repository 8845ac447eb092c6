"""SentencePiece's unigram model, as llama.cpp runs it for `tokenizer.ggml.model = "t5"` (T5, and the
XLM-R vocabularies of embedding models such as nomic-embed-text-v2-moe).

Tokenizing (llama.cpp's UGM tokenizer, itself a port of SentencePiece's):
  1. special tokens are cut out of the text first (purelm.wordpiece.partition);
  2. each remaining run of text is normalized with the file's `tokenizer.ggml.precompiled_charsmap`,
     SentencePiece's compiled normalization rules: at each point the longest prefix the rules know is
     replaced (an XOR-compressed double array maps it to a replacement string), else one character is
     kept; spaces become "▁", one goes in front when `add_space_prefix`, and with
     `remove_extra_whitespaces` runs of spaces shrink to one "▁" before each word;
  3. the normalized bytes are cut by Viterbi: the cut whose token scores (log probabilities) sum
     highest, user-defined tokens scoring 0 and a character no token covers scoring the lowest token
     score minus 10 as the unknown token (runs of unknowns become one).

Everything read from the charsmap is bounds-checked: a bad one is a FormatError.
"""

from __future__ import annotations

import struct

from purelm.errors import FormatError
from purelm.wordpiece import MAX_PIECE_LEN, partition

SPACE = "\u2581".encode()  # "▁"
UNKNOWN_PENALTY = 10.0
NORMAL, USER_DEFINED, UNUSED = 1, 4, 5


def _utf8_len(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


class CharsMap:
    """SentencePiece's precompiled normalization rules: a uint32 blob size, the XCDA entries, then
    NUL-terminated replacement strings."""

    def __init__(self, blob: bytes, path: str) -> None:
        self.path = path
        if len(blob) < 4:
            raise self.fail("too small to hold its header")
        (size,) = struct.unpack_from("<I", blob)
        if size % 4 or size + 4 >= len(blob):
            raise self.fail(f"its double array ({size} bytes) does not fit in {len(blob)} bytes")
        self.nodes = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self.replacements = blob[4 + size:]

    def fail(self, problem: str) -> FormatError:
        return FormatError(self.path, "tokenizer.ggml.precompiled_charsmap", problem)

    def _node(self, index: int) -> int:
        if index >= len(self.nodes):
            raise self.fail(f"node {index} is outside its {len(self.nodes)}-entry double array")
        return self.nodes[index]

    def _base(self, index: int) -> int:
        node = self._node(index)
        return (node >> 10) << ((node & (1 << 9)) >> 6)

    def longest(self, text: bytes, start: int) -> tuple[bytes, int] | None:
        """The replacement for the longest prefix of text[start:] that has one, and its length."""
        found_len = found_at = 0
        index = self._base(0)
        for pos in range(start, len(text)):
            c = text[pos]
            if c == 0:
                break
            index ^= c
            node = self._node(index)
            if node & ((1 << 31) | 0xFF) != c:  # LCHECK: not a child of the previous node
                break
            leaf = (node >> 8) & 1
            index ^= self._base(index)
            if leaf:
                found_len, found_at = pos - start + 1, self._node(index) & ((1 << 31) - 1)
        if not found_len:
            return None
        if found_at >= len(self.replacements):
            raise self.fail(f"replacement offset {found_at} is outside its {len(self.replacements)} bytes")
        end = self.replacements.find(b"\0", found_at)
        if end < 0:
            raise self.fail(f"replacement at {found_at} is not NUL-terminated")
        return self.replacements[found_at:end], found_len


class Unigram:
    """Viterbi over a unigram vocabulary, llama.cpp's way (see the module docstring)."""

    def __init__(self, tokens: list[str], token_types: list[int], scores: list[float], unk_id: int, *,
                 charsmap: bytes | None, add_space_prefix: bool, remove_extra_whitespaces: bool,
                 path: str = "GGUF metadata") -> None:
        self.unk_id = unk_id
        self.scores = scores
        self.charsmap = CharsMap(charsmap, path) if charsmap else None
        self.add_space_prefix, self.merge_spaces = add_space_prefix, remove_extra_whitespaces
        self.ids: dict[bytes, int] = {}
        self.user_defined: set[int] = set()
        normal_scores = []
        for index, (text, kind) in enumerate(zip(tokens, token_types)):
            if kind == NORMAL:
                normal_scores.append(scores[index])
            if text and kind in (NORMAL, USER_DEFINED, UNUSED):
                self.ids[text.encode()] = index
            if kind == USER_DEFINED:
                self.user_defined.add(index)
        self.unknown_score = min(normal_scores, default=float(3.4028234663852886e38)) - UNKNOWN_PENALTY
        # Token lengths in bytes, longest first: each position tries only these (see MAX_PIECE_LEN).
        self.lengths = sorted({len(t) for t in self.ids if len(t) <= MAX_PIECE_LEN}, reverse=True)
        user = {tokens[i].encode() for i in self.user_defined if tokens[i]}
        self.user_texts = user
        self.user_lengths = sorted({len(t) for t in user}, reverse=True)

    def encode(self, text: str, specials: list[tuple[str, int]]) -> list[int]:
        """Ids for `text`; `specials` are the (text, id) tokens cut out whole first, longest first."""
        ids: list[int] = []
        for piece in partition(text, specials):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(self._viterbi(self.normalize(piece.encode())))
        return ids

    def _prefix(self, text: bytes, start: int) -> tuple[bytes, int]:
        for length in self.user_lengths:  # a user-defined token stays as it is
            if text[start:start + length] in self.user_texts:
                return text[start:start + length], length
        if self.charsmap is not None:
            found = self.charsmap.longest(text, start)
            if found is not None:
                return found
        n = min(_utf8_len(text[start]), len(text) - start)
        return text[start:start + n], n

    def normalize(self, text: bytes) -> bytes:
        out = bytearray()
        in_word = space_prepended = False
        pos = 0
        while pos < len(text):
            replacement, consumed = self._prefix(text, pos)
            for c in replacement:
                if c != 0x20:
                    if not in_word:
                        in_word = True
                        if (self.add_space_prefix and not space_prepended) or self.merge_spaces:
                            out += SPACE
                            space_prepended = True
                    out.append(c)
                else:
                    in_word = False
                    if not self.merge_spaces:
                        out += SPACE
            pos += consumed
        return bytes(out)

    def _viterbi(self, text: bytes) -> list[int]:
        n = len(text)
        if not n:
            return []
        unk, scores, lookup = self.unk_id, self.scores, self.ids.get
        # best[end] = (token, start, score) of the best cut of text[:end]
        best: list[tuple[int, int, float]] = [(unk, 0, float("-inf"))] * (n + 1)
        best[0] = (unk, 0, 0.0)
        pos = 0
        while pos < n:
            char_len = min(_utf8_len(text[pos]), n - pos)
            base = best[pos][2]
            covered = False
            for length in self.lengths:
                if pos + length > n:
                    continue
                token = lookup(text[pos:pos + length])
                if token is None:
                    continue
                covered = covered or length == char_len
                score = base + (0.0 if token in self.user_defined else scores[token])
                if score > best[pos + length][2]:
                    best[pos + length] = (token, pos, score)
            if not covered:
                score = base + self.unknown_score
                if score > best[pos + char_len][2]:
                    best[pos + char_len] = (unk, pos, score)
            pos += char_len
        ids: list[int] = []
        end, prev_unknown = n, False
        while True:
            token, start, _ = best[end]
            if not (prev_unknown and token == unk):
                ids.append(token)
            if start == 0:
                break
            prev_unknown, end = token == unk, start
        ids.reverse()
        return ids
