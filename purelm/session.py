"""Sessions: one sequence's state (its tokens, its keys and values, the logits after its last prompt)
written to a file and read back, so that a long prompt or a conversation is not evaluated again in a
later process (llama.cpp's --prompt-cache, rustformers/llm's session files). The restored cache is the
saved one bit for bit, so generation continues exactly as it would have without the interruption.

A session file is untrusted input like a model file: every field is checked (types, ranges, the model
it was made with, the cache's types, sizes against the file's length) before anything is allocated or
copied, and each problem is one FormatError naming the field.

Layout (little-endian):
    magic  b"PURELMKV"
    u32    version (1), u32 0
    u64    length of the header
    header UTF-8 JSON: {"model": {...}, "cache": {...}, "n_past", "tokens", "logits_at", "messages"}
    zero bytes up to a multiple of 8
    per layer: its keys (n_past, n_kv_heads, width), then its values, in the store's dtype
               (f32: float32, f16: float16, q8_0: the q8_0 blocks' bytes)
    the logits after position logits_at - 1 (float32, n_vocab), where logits_at is not null
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, UsageError
from .backends.kv_cache import CACHE_TYPES, store_width

MAGIC = b"PURELMKV"
PREFIX = struct.Struct("<8sIIQ")  # magic, version, 0, header length
VERSION = 1
# bytes of JSON at most: a 128k-token context's ids take ~1 MiB; a hostile header must not make the
# parser build a list of tens of millions of items
HEADER_MAX = 32 << 20
STORE_DTYPES = {"f32": np.float32, "f16": np.float16, "q8_0": np.uint8}
FINGERPRINT_SPAN = 1 << 20  # bytes hashed at each end of the model file


def _check_path(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(f"a session file's path must be a non-empty str or os.PathLike, got {path!r}")
    return os.fspath(path)


def model_fingerprint(path: str | os.PathLike) -> str:
    """A model file's identity, cheap for any size: sha256 of its size and its first and last MiB
    (the header, vocabulary and hyperparameters; the last tensors' weights)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        h = hashlib.sha256(str(size).encode())
        f.seek(0)
        h.update(f.read(FINGERPRINT_SPAN))
        f.seek(max(0, size - FINGERPRINT_SPAN))
        h.update(f.read(FINGERPRINT_SPAN))
    return h.hexdigest()


def _identity(llm: Any) -> tuple[dict, dict]:
    cache = llm.cache
    model = {"fingerprint": model_fingerprint(llm.file.path), "n_layers": cache.n_layers,
             "n_kv_heads": cache.n_kv_heads, "k_dim": cache.k_dim, "v_dim": cache.v_dim, "n_vocab": llm.n_vocab}
    adapters = getattr(llm, "adapters", None)
    if adapters:  # the keys and values were made with them (left out without: older sessions still load)
        model["lora"] = [[model_fingerprint(a.path), a.scale] for a in adapters]
    kinds = {"type_k": cache.type_k, "type_v": cache.type_v, "rotate_k": cache.rotate_k, "rotate_v": cache.rotate_v}
    return model, kinds


def save(llm: Any, path: str | os.PathLike, messages: list | None = None) -> None:
    """Write `llm`'s sequence (tokens, keys and values, last prompt's logits) and `messages` (a chat's,
    any JSON) to `path`. Written to a temporary file first: `path` is never seen half written."""
    path = Path(_check_path(path))
    if not path.name or path.is_dir():
        raise UsageError(f"cannot write the session {path}: it is a directory; give a file's path")
    for model_file in getattr(llm.file, "shards", None) or [llm.file.path]:
        if path.exists() and os.path.exists(model_file) and os.path.samefile(path, model_file):
            raise UsageError(f"cannot write the session {path}: it is the model file; give another path")
    cache, seq = llm.cache, llm.cache.seqs[0]
    if len(seq.tokens) != seq.n_past:
        raise UsageError(f"the cache holds {seq.n_past} positions but {len(seq.tokens)} known tokens: "
                         f"only a sequence run through generate/stream/chat can be saved")
    model, kinds = _identity(llm)
    logits = None
    if seq.prompt_logits is not None and seq.prompt_logits[0] <= seq.n_past:
        logits = np.ascontiguousarray(llm.backend.to_numpy(seq.prompt_logits[1]), np.float32).reshape(-1)
    header = {"model": model, "cache": kinds, "n_past": seq.n_past, "tokens": [int(t) for t in seq.tokens],
              "logits_at": None if logits is None else int(seq.prompt_logits[0]), "messages": messages}
    try:
        head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise UsageError(f"messages must be JSON (lists, dicts, strings, numbers): {e}") from None
    if len(head) > HEADER_MAX:
        raise UsageError(f"the session's tokens and messages take {len(head)} bytes of JSON, more than a session "
                         f"file holds ({HEADER_MAX})")
    keys, values = cache.stored(0)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(PREFIX.pack(MAGIC, VERSION, 0, len(head)) + head)
            f.write(b"\0" * (-(PREFIX.size + len(head)) % 8))
            for k, v in zip(keys, values):
                f.write(np.ascontiguousarray(k).tobytes())
                f.write(np.ascontiguousarray(v).tobytes())
            if logits is not None:
                f.write(logits.tobytes())
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"cannot write the session {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def load(llm: Any, path: str | os.PathLike) -> Any:
    """Replace `llm`'s sequence by the one saved in `path`; returns the saved `messages`."""
    path = _check_path(path)

    def bad(field: str, problem: str) -> FormatError:
        return FormatError(path, field, problem)

    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read the session {path}: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        start = f.read(PREFIX.size)
        if len(start) < PREFIX.size or start[:len(MAGIC)] != MAGIC:
            raise bad("magic", "not a purelm session file")
        _, version, _, n_head = PREFIX.unpack(start)
        if version != VERSION:
            raise bad("version", f"{version}; this purelm reads version {VERSION}")
        if n_head > min(HEADER_MAX, size - len(start)):
            raise bad("header", f"{n_head} bytes, past the end of the file ({size} bytes) or over {HEADER_MAX}")
        try:
            header = json.loads(f.read(n_head).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise bad("header", f"not UTF-8 JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise bad("header", "not a JSON object")
        n_past, tokens, logits_at = _check_header(llm, header, bad)
        data_at = len(start) + n_head + (-(len(start) + n_head) % 8)
        cache = llm.cache
        widths = (store_width(cache.type_k, cache.k_dim), store_width(cache.type_v, cache.v_dim))
        dtypes = (STORE_DTYPES[cache.type_k], STORE_DTYPES[cache.type_v])
        shapes = [(n_past, cache.n_kv_heads, w) for w in widths]
        counts = [int(np.prod(s)) for s in shapes]
        n_bytes = cache.n_layers * sum(c * np.dtype(d).itemsize for c, d in zip(counts, dtypes))
        n_bytes += 0 if logits_at is None else 4 * llm.n_vocab
        if size != data_at + n_bytes:
            raise bad("data", f"{size - data_at} bytes of keys, values and logits; {n_past} positions of this "
                              f"model's cache take {n_bytes}")
        f.seek(data_at)
        keys, values = [], []
        for _ in range(cache.n_layers):
            for out, shape, count, dtype in zip((keys, values), shapes, counts, dtypes):
                out.append(np.fromfile(f, dtype, count).reshape(shape))
        logits = None if logits_at is None else np.fromfile(f, np.float32, llm.n_vocab)
    if logits is not None and not np.isfinite(logits).all():
        raise bad("logits", "NaN or infinite values")
    cache.restore(0, keys, values, tokens)
    if logits is not None:
        cache.seqs[0].prompt_logits = (logits_at, logits)
    return header.get("messages")


def _check_header(llm: Any, header: dict, bad: Any) -> tuple[int, list[int], int | None]:
    """The header's numbers, each checked against this model and cache; (n_past, tokens, logits_at)."""
    model, kinds = _identity(llm)
    saved_model, saved_cache = header.get("model"), header.get("cache")
    if not isinstance(saved_model, dict) or not isinstance(saved_cache, dict):
        raise bad("header", "no model or cache description")
    if saved_model != model and {k: v for k, v in saved_model.items() if k != "lora"} == \
            {k: v for k, v in model.items() if k != "lora"}:
        raise bad("model", "made with other LoRA adapters or scales than this model's (--lora, --lora-scaled): "
                           "its keys and values would not be this model's")
    if saved_model != model:
        raise bad("model", "made with another model file (or another version of this one): a session only "
                           "continues on the model that wrote it")
    if saved_cache != kinds:
        shown = {k: v for k, v in saved_cache.items() if k in ("type_k", "type_v") and v in CACHE_TYPES}
        if len(shown) == 2:
            raise bad("cache", f"keys and values stored as {shown['type_k']}/{shown['type_v']}; this model's cache "
                               f"is {kinds['type_k']}/{kinds['type_v']} (load it with -ctk {shown['type_k']} "
                               f"-ctv {shown['type_v']})")
        raise bad("cache", "not this cache's types")
    n_past, tokens, logits_at = header.get("n_past"), header.get("tokens"), header.get("logits_at")
    if type(n_past) is not int or not 0 <= n_past <= llm.cache.n_ctx:
        raise bad("n_past", f"{n_past!r}: must be a count of positions within the context ({llm.cache.n_ctx}, -c)")
    if not isinstance(tokens, list) or len(tokens) != n_past:
        raise bad("tokens", f"must be a list of the {n_past} stored positions' ids")
    if not all(type(t) is int and 0 <= t < llm.n_vocab for t in tokens):
        raise bad("tokens", f"every id must be an integer in [0, {llm.n_vocab})")
    if logits_at is not None and (type(logits_at) is not int or not 1 <= logits_at <= n_past):
        raise bad("logits_at", f"{logits_at!r}: must be null or a position count in [1, {n_past}]")
    return n_past, tokens, logits_at
