"""The Python API: `purelm.load(path_or_name)` and what a loaded model can do."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from .backends import get_backend
from .backends.base import Backend
from .formats.gguf import GGUFFile
from .generate import Chunk, Completion, prefill, stream_tokens
from .hub import resolve
from .models import build_model
from .sampling import SamplingParams
from .tokenizer import Tokenizer

DEFAULT_CTX = 4096
_SAMPLING_KEYS = {f.name for f in fields(SamplingParams)}


class LLM:
    """A loaded model: its file, tokenizer, backend and one KV cache reused across calls (a prompt that
    extends the previous one is not evaluated again)."""

    def __init__(self, path: str | os.PathLike, backend: str | Backend | None = None,
                 n_ctx: int | None = None, threads: int | None = None) -> None:
        self.path = str(path)
        self.file = GGUFFile(path)
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend, threads)
        self.model = build_model(self.file, self.backend)
        self.tokenizer = Tokenizer.from_gguf_metadata(self.file.metadata)
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        self.n_ctx = n_ctx or min(self.model.n_ctx_train, DEFAULT_CTX)
        self.cache = self.model.new_cache(self.n_ctx)

    # -- tokens
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    # -- logits
    def logits(self, ids: Sequence[int] | str) -> np.ndarray:
        """Float32 logits of every position, shape (len(ids), vocab), from a fresh context."""
        if isinstance(ids, str):
            ids = self.tokenize(ids)
        cache = self.model.new_cache(max(self.n_ctx, len(ids)))
        return prefill(self.model, cache, list(ids), all_logits=True)

    # -- generation
    def stream_chunks(self, prompt: str | Sequence[int], max_tokens: int = 256, stop: Sequence[str] = (),
                      ignore_eos: bool = False, timings: dict | None = None, truncate: bool = False,
                      **sampling: Any) -> Iterator[Chunk]:
        """Chunks of generated text with their tokens; the last chunk carries the finish reason.

        `sampling`: the fields of `SamplingParams` (temperature, top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, frequency_penalty, presence_penalty, seed). `truncate`: keep the end of a prompt
        that is too long for the context instead of raising `ContextOverflowError`."""
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if truncate and len(ids) >= self.n_ctx:
            ids = ids[len(ids) - (self.n_ctx - 1) :]
        return stream_tokens(self.model, self.tokenizer, self.cache, ids, SamplingParams(**sampling),
                             max_tokens, stop, ignore_eos, timings)

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[str]:
        """Generated text, piece by piece, as it is produced."""
        for chunk in self.stream_chunks(prompt, **kwargs):
            if chunk.text:
                yield chunk.text

    def complete(self, prompt: str | Sequence[int], **kwargs: Any) -> Completion:
        timings: dict[str, float] = {}
        texts, tokens, reason = [], [], "length"
        for chunk in self.stream_chunks(prompt, timings=timings, **kwargs):
            texts.append(chunk.text)
            if chunk.token is not None:
                tokens.append(chunk.token)
            reason = chunk.finish_reason or reason
        return Completion("".join(texts), tokens, reason, int(timings.get("prompt_tokens", 0)), timings)

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> str:
        """The generated text (see `stream_chunks` for the options)."""
        return self.complete(prompt, **kwargs).text

    def reset(self) -> None:
        """Forget the cached context."""
        self.cache.truncate(0)

    @property
    def metadata(self):
        return self.file.metadata


def load(path_or_name: str | os.PathLike | None = None, backend: str | Backend | None = None,
         n_ctx: int | None = None, threads: int | None = None) -> LLM:
    """Open a GGUF file (or a known model's name, pulled on first use; None: the default model)."""
    return LLM(resolve(path_or_name), backend=backend, n_ctx=n_ctx, threads=threads)
