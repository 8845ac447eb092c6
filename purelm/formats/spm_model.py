"""Reads SentencePiece `tokenizer.model` files (a protobuf ModelProto) without the sentencepiece
package: the pieces (text, score, type) and the normalizer's add_dummy_prefix flag are all the GGUF
converter needs."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError

# ModelProto: 1 = repeated SentencePiece {1: piece, 2: score (float), 3: type (enum, default NORMAL=1)},
# 3 = NormalizerSpec {3: add_dummy_prefix (bool, default true)}.


@dataclass
class SentencePieceModel:
    pieces: list[str]
    scores: list[float]
    types: list[int]  # NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6 (as GGUF's)
    add_dummy_prefix: bool


def _fields(buf: bytes, path: str):
    """Yield (field number, wire type, value) of one protobuf message."""
    pos, n = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= n or shift > 63:
                raise FormatError(path, "protobuf", "truncated or malformed varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    while pos < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            pos += 8
            yield field, wire, buf[pos - 8 : pos]
        elif wire == 2:
            size = varint()
            if pos + size > n:
                raise FormatError(path, "protobuf", "a field runs past the end of the file")
            pos += size
            yield field, wire, buf[pos - size : pos]
        elif wire == 5:
            pos += 4
            yield field, wire, buf[pos - 4 : pos]
        else:
            raise FormatError(path, "protobuf", f"unsupported wire type {wire}")
        if pos > n:
            raise FormatError(path, "protobuf", "truncated")


def read_sentencepiece(path: str | Path) -> SentencePieceModel:
    path = str(path)
    buf = Path(path).read_bytes()
    pieces, scores, types, add_prefix = [], [], [], True
    for field, wire, value in _fields(buf, path):
        if field == 1 and wire == 2:
            text, score, kind = "", 0.0, 1
            for f, w, v in _fields(value, path):
                if f == 1 and w == 2:
                    text = v.decode("utf-8", errors="replace")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            pieces.append(text)
            scores.append(score)
            types.append(kind)
        elif field == 3 and wire == 2:
            for f, w, v in _fields(value, path):
                if f == 3 and w == 0:
                    add_prefix = bool(v)
    if not pieces:
        raise FormatError(path, "pieces", "no SentencePiece pieces found: not a tokenizer.model file")
    return SentencePieceModel(pieces, scores, types, add_prefix)
