"""Batch inference with Ray Data: a callable class for `Dataset.map_batches`.

    ds = ray.data.read_parquet("prompts/")                         # larger than memory: streamed
    out = ds.map_batches(Processor, fn_constructor_kwargs=dict(model="smollm2", max_tokens=64),
                         compute=ray.data.ActorPoolStrategy(size=4), batch_size=32, num_cpus=1)
    out.write_parquet("completions/")

Ray Data runs a pool of actors, each loading the model once, and streams blocks of rows through them
with back-pressure (a slow pool holds back the readers) and its progress bars. Each batch's prompts are
generated together (`LLM.generate_batch`: one forward pass per step for the whole batch). Every other
column of the batch passes through unchanged, so an id column comes out beside its completion."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from ...errors import UsageError
from ...sampling import check_int

TASKS = ("completion", "chat", "embedding")


class Processor:
    """`task`: "completion" (column of prompt strings), "chat" (column of message lists, or their JSON
    text) or "embedding" (column of strings). Writes `output_column` (default "text", or "embedding")
    and, for generation, "finish_reason" and "completion_tokens". `max_tokens`, `stop` and the sampling
    options (temperature, top_k, top_p, min_p, seed, ...) are those of `LLM.generate`; the default is
    greedy decoding. `model`, `n_ctx`, `backend`, `threads`, `device`, `dtype`: as in `purelm.load`."""

    def __init__(self, model: str | None = None, task: str = "completion", column: str = "prompt",
                 output_column: str | None = None, max_tokens: int = 256, stop: Any = (), n_ctx: int | None = None,
                 backend: str | None = None, threads: int | None = None, device: str | None = None,
                 dtype: str | None = None, **sampling: Any) -> None:
        from ...api import _generation_options, load

        if task not in TASKS:
            raise UsageError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if not isinstance(column, str):
            raise UsageError(f"column must be a column name (a string), got {column!r}")
        self.task, self.column = task, column
        self.output = output_column or ("embedding" if task == "embedding" else "text")
        sampling.setdefault("temperature", 0.0)
        max_tokens, stops, _ = _generation_options(check_int("max_tokens", max_tokens, 1), stop, sampling)
        self.options = dict(max_tokens=max_tokens, stop=stops, **sampling)
        self.llm = load(model, backend=backend, n_ctx=n_ctx, threads=threads, device=device, dtype=dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise UsageError(f"the batch has no column {self.column!r} (columns: {', '.join(batch)})")
        rows = list(batch[self.column])
        out = dict(batch)
        if self.task == "embedding":
            texts = [_text(x, self.column, i) for i, x in enumerate(rows)]
            vectors = self.llm.embed(texts)
            out[self.output] = np.empty(len(rows), dtype=object)  # one float32 vector per row
            for i, v in enumerate(vectors):
                out[self.output][i] = v
            return out
        if self.task == "chat":
            template = self.llm.chat_template
            prompts: list[Any] = [self.llm.chat_prompt(_messages(x, self.column, i)) for i, x in enumerate(rows)]
            options = dict(self.options, stop=[*template.stop_strings, *self.options["stop"]])
        else:
            prompts = [_text(x, self.column, i) for i, x in enumerate(rows)]
            options = self.options
        done = self.llm.generate_batch(prompts, **options) if prompts else []
        out[self.output] = np.array([c.text for c in done], dtype=object)
        out["finish_reason"] = np.array([c.finish_reason for c in done], dtype=object)
        out["completion_tokens"] = np.array([len(c.tokens) for c in done], dtype=np.int64)
        return out


def _text(x: Any, column: str, i: int) -> str:
    if isinstance(x, bytes):
        x = x.decode("utf-8", "replace")
    if not isinstance(x, str):
        raise UsageError(f"{column}[{i}] must be a string, got {type(x).__name__}")
    return x


def _messages(x: Any, column: str, i: int) -> list[dict]:
    """A row's messages: a list (or array, as Arrow hands lists of structs) of {"role", "content"}, or
    their JSON text."""
    if isinstance(x, (str, bytes)):
        try:
            x = json.loads(x)
        except (ValueError, RecursionError) as e:
            raise UsageError(f"{column}[{i}] is not JSON messages: {e}") from None
    if isinstance(x, np.ndarray):
        x = list(x)
    if not isinstance(x, list) or not all(isinstance(m, dict) for m in x):
        raise UsageError(f"{column}[{i}] must be a list of messages ({{'role', 'content'}}), got {type(x).__name__}")
    return [dict(m) for m in x]


def process(ds: Any, model: str | None = None, concurrency: int = 1, batch_size: int = 32, num_cpus: float = 1,
            num_gpus: float = 0, **kwargs: Any) -> Any:
    """`ds.map_batches(Processor, ...)` with an actor pool of `concurrency` actors, each with
    `num_cpus` CPUs (threads, unless given) or `num_gpus` GPUs (the torch backend on CUDA)."""
    from ...api import _generation_options

    check_int("concurrency", concurrency, 1)
    check_int("batch_size", batch_size, 1)
    if kwargs.get("task", "completion") not in TASKS:  # checked here too: an actor's failure reads worse
        raise UsageError(f"task must be one of {', '.join(TASKS)}, got {kwargs['task']!r}")
    known = ("task", "column", "output_column", "n_ctx", "backend", "threads", "device", "dtype")
    sampling = {k: v for k, v in kwargs.items() if k not in known + ("max_tokens", "stop")}
    _generation_options(kwargs.get("max_tokens", 256), kwargs.get("stop", ()), sampling)
    if num_gpus:
        kwargs.setdefault("backend", "torch")
        kwargs.setdefault("device", "cuda")
    kwargs.setdefault("threads", max(1, int(num_cpus)))
    from ray.data import ActorPoolStrategy

    return ds.map_batches(Processor, fn_constructor_kwargs=dict(model=model, **kwargs),
                          compute=ActorPoolStrategy(size=concurrency), batch_size=batch_size, num_cpus=num_cpus,
                          num_gpus=num_gpus or None, batch_format="numpy")
