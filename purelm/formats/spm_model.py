"""Reads SentencePiece `tokenizer.model` files (a protobuf ModelProto) without the sentencepiece
package: the pieces (text, score, type) and the normalizer's add_dummy_prefix flag are all the GGUF
converter needs. The file is untrusted input: every length is bounds-checked, the work is one linear
pass, and anything malformed is a FormatError."""
from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError

# ModelProto: 1 = repeated SentencePiece {1: piece, 2: score (float), 3: type (enum, default NORMAL=1)},
# 3 = NormalizerSpec {2: precompiled_charsmap (bytes), 3: add_dummy_prefix (bool, default true),
# 4: remove_extra_whitespaces (bool, default true)}.
MAX_FILE = 256 << 20  # real ones are a few MiB (256k pieces)
PIECE_TYPES = range(1, 7)


@dataclass
class SentencePieceModel:
    pieces: list[str]
    scores: list[float]
    types: list[int]  # NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6 (as GGUF's)
    add_dummy_prefix: bool
    charsmap: bytes = b""  # the normalizer's precompiled rules (checked where they are used: purelm.unigram)
    remove_extra_whitespaces: bool = True


def _fields(buf: bytes, path: str, where: str) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) of one protobuf message."""
    pos, n = 0, len(buf)

    def fail(problem: str) -> FormatError:
        return FormatError(path, where, f"{problem} at byte {pos}")

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= n or shift > 63:
                raise fail("truncated or malformed varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    def take(size: int) -> bytes:
        nonlocal pos
        if size > n - pos:
            raise fail(f"a field of {size} bytes runs past the end")
        pos += size
        return buf[pos - size : pos]

    while pos < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if field == 0:
            raise fail("field number 0 (not protobuf)")
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, take(8)
        elif wire == 2:
            yield field, wire, take(varint())
        elif wire == 5:
            yield field, wire, take(4)
        else:
            raise fail(f"unsupported wire type {wire}")


def read_sentencepiece(path: str | os.PathLike) -> SentencePieceModel:
    path = str(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a fifo or device would block or never end
            raise FormatError(path, "file", "is not a regular file")
        if st.st_size > MAX_FILE:
            raise FormatError(path, "file", f"is {st.st_size} bytes, over the {MAX_FILE}-byte limit")
        buf = Path(path).read_bytes()
    except OSError as e:
        raise FormatError(path, "file", f"cannot be read: {e.strerror or e}") from None
    return parse_sentencepiece(buf, path)


def parse_sentencepiece(buf: bytes, path: str = "tokenizer.model") -> SentencePieceModel:
    """The model in `buf` (a ModelProto); `path` names it in errors."""
    pieces, scores, types, add_prefix, charsmap, squeeze = [], [], [], True, b"", True
    for field, wire, value in _fields(buf, path, "protobuf"):
        if field == 1 and wire == 2:
            where = f"piece {len(pieces)}"
            text, score, kind = "", 0.0, 1
            for f, w, v in _fields(value, path, where):
                if f == 1 and w == 2:
                    try:
                        text = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise FormatError(path, where, "text is not valid UTF-8") from None
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            if kind not in PIECE_TYPES:
                raise FormatError(path, where, f"type {kind} is not a SentencePiece piece type (1-6)")
            pieces.append(text)
            scores.append(score)
            types.append(kind)
        elif field == 3 and wire == 2:
            for f, w, v in _fields(value, path, "normalizer_spec"):
                if f == 2 and w == 2:
                    charsmap = bytes(v)
                elif f == 3 and w == 0:
                    add_prefix = bool(v)
                elif f == 4 and w == 0:
                    squeeze = bool(v)
    if not pieces:
        raise FormatError(path, "pieces", "no SentencePiece pieces found: not a tokenizer.model file")
    return SentencePieceModel(pieces, scores, types, add_prefix, charsmap, squeeze)
