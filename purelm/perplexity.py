"""Perplexity and KL divergence over a text, as llama.cpp's `llama-perplexity` computes them.

The text is tokenized whole (BOS first where the model adds one) and cut into chunks of n_ctx tokens;
each chunk is evaluated from an empty context with its first token replaced by BOS (where the model
adds one), and only its second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict the
tokens after them, so every scored token has at least n_ctx/2 tokens before it. PPL = exp(mean NLL),
± its standard error as llama.cpp estimates it.

KL divergence compares a model with a reference run. The reference run saves its log-probabilities in
llama.cpp's own `--kl-divergence-base` format, so either tool reads the other's files:
  "_logits_", int32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk * n_ctx], then per chunk
  and scored position one row of 2*ceil(n_vocab/2) + 4 uint16: float32 scale, float32 min_log_prob,
  then the quantized log-probabilities (log p = scale * q + min_log_prob; q = 0 below max - 16).
"""
from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import FormatError, UsageError

MAGIC = b"_logits_"
HEADER = struct.Struct("<8siii")  # magic, n_ctx, n_vocab, n_chunk
INT32_MAX = 2**31 - 1
DEFAULT_BATCH = 2048  # llama.cpp's n_batch: tokens per pass, so batch // n_ctx chunks go together


# -- the text and its chunks

def read_text(path: str | os.PathLike) -> str:
    """A text file as llama.cpp's `-f` reads it: its bytes, less one trailing newline (invalid UTF-8
    becomes U+FFFD)."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    return text[:-1] if text.endswith("\n") else text


def text_tokens(tokenizer: Any, text: str) -> list[int]:
    """The whole text's ids, BOS first where the model adds one; special-token text stays plain text
    (llama.cpp's common_tokenize(ctx, text, add_special=true, parse_special=false), less any EOS)."""
    ids = tokenizer.encode(text, add_special=False, parse_special=False)
    return [tokenizer.bos_id] + ids if tokenizer.add_bos else ids


def _check_int(name: str, value: Any, lo: int, hi: int = INT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise UsageError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    return int(value)


def count_chunks(n_tokens: int, n_ctx: int, chunks: int | None, what: str = "perplexity") -> int:
    """How many whole chunks of n_ctx tokens are scored (at most `chunks`); llama.cpp wants the text to
    hold at least two."""
    if n_tokens < 2 * n_ctx:
        raise UsageError(f"the text has {n_tokens} tokens; {what} with a context of {n_ctx} needs at "
                         f"least {2 * n_ctx} (a longer text, or a smaller -c)")
    n = n_tokens // n_ctx
    return n if chunks is None else min(n, chunks)


def chunk_logits(model: Any, tokens: Sequence[int] | np.ndarray, n_ctx: int, n_chunk: int,
                 bos: int | None, batch: int = DEFAULT_BATCH) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per chunk c (in order): (c, logits of its scored positions, the tokens they predict), shapes
    (n_ctx - 1 - n_ctx//2, vocab) and (n_ctx - 1 - n_ctx//2,). Each chunk is a fresh sequence of one
    cache, its first token replaced by `bos` when given; max(1, batch // n_ctx) chunks share each
    forward pass, in passes of at most `batch` tokens, and only second-half passes return every
    position's logits."""
    first = n_ctx // 2
    n_seq = max(1, batch // n_ctx)
    step = max(1, min(batch, n_ctx))  # positions per pass and sequence
    # pass boundaries: every `step` positions, and at `first`, so that a pass is all unscored or all scored
    cuts = sorted(set(range(0, n_ctx, step)) | {first, n_ctx})
    tokens = np.asarray(tokens, np.int64)
    cache = model.new_cache(n_ctx)
    for c0 in range(0, n_chunk, n_seq):
        group = range(c0, min(c0 + n_seq, n_chunk))
        ids = {c: tokens[c * n_ctx:(c + 1) * n_ctx].copy() for c in group}
        if bos is not None:
            for c in group:
                ids[c][0] = bos
        seqs = {c: cache.add() for c in group}
        try:
            scored = {c: [] for c in group}
            for p0, p1 in zip(cuts, cuts[1:]):
                want = p0 >= first
                outs = model.forward_batch(cache, [(seqs[c], ids[c][p0:p1]) for c in group], want)
                if want:
                    for c, out in zip(group, outs):
                        scored[c].append(out)
            for c in group:
                logits = np.concatenate(scored.pop(c))[: n_ctx - 1 - first]
                yield c, logits, tokens[c * n_ctx + first + 1:(c + 1) * n_ctx]
        finally:
            for s in seqs.values():
                cache.remove(s)


# -- llama.cpp's per-row arithmetic (float32 logits, float32 exp, float64 sums)

def _softmax_parts(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest logit (float32) and log(sum exp(logit - max)) (float64 sum, as llama.cpp)."""
    mx = logits.max(axis=1)
    sum_exp = np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)
    return mx, np.log(sum_exp)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, float64."""
    mx, lse = _softmax_parts(logits)
    picked = logits[np.arange(len(targets)), targets]
    return -((picked - mx).astype(np.float64) - lse)


def row_width(n_vocab: int) -> int:
    """uint16 per saved row: 2 float32 (4 uint16) and the vocabulary padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def pack_log_probs(logits: np.ndarray) -> np.ndarray:
    """The rows llama.cpp saves for `logits` (its log_softmax with uint16 output): log-probabilities
    from max - 16 up, in 65535 steps, as (rows, row_width(vocab)) uint16."""
    n, vocab = logits.shape
    mx, lse = _softmax_parts(logits)
    lse = lse.astype(np.float32)
    mn = np.maximum(logits.min(axis=1), mx - np.float32(16))
    min_log_prob = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    out = np.zeros((n, row_width(vocab)), np.uint16)
    head = out[:, :4].view(np.float32)
    head[:, 0], head[:, 1] = scale, min_log_prob
    safe = np.where(scale > 0, scale, np.float32(1))
    inv = (np.float32(1) / safe).astype(np.float32)
    q = np.rint(inv[:, None] * (logits - mn[:, None]))  # round half to even, as nearest_int
    q = np.where((logits > mn[:, None]) & (scale[:, None] > 0), q, 0)
    out[:, 4:4 + vocab] = np.clip(q, 0, 65535).astype(np.uint16)
    return out


@dataclass
class KLDRows:
    """Per scored token of a chunk: NLL of both models, KL(base || model), Δp, same top token."""

    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    p_diff: np.ndarray
    same_top: np.ndarray


def kld_rows(logits: np.ndarray, targets: np.ndarray, base: np.ndarray) -> KLDRows:
    """llama.cpp's comparison of `logits` with saved base rows (pack_log_probs' layout): float32 as it
    computes them, the KL sum over tokens whose base log-probability is above -16 in float64."""
    n, vocab = logits.shape
    rows = np.arange(n)
    head = np.ascontiguousarray(base[:, :4]).view(np.float32)
    scale, min_lp = head[:, 0], head[:, 1]
    base_lp = scale[:, None] * base[:, 4:4 + vocab].astype(np.float32) + min_lp[:, None]
    mx, lse = _softmax_parts(logits)
    log_norm = (mx + lse.astype(np.float32)).astype(np.float32)  # max + log_sum_exp (float)
    nll = (log_norm - logits[rows, targets]).astype(np.float32)
    nll_base = (-(scale * base[rows, 4 + targets].astype(np.float32) + min_lp)).astype(np.float32)
    keep = base_lp > np.float32(-16)
    terms = np.exp(base_lp) * (base_lp - logits + log_norm[:, None])
    kld = np.where(keep, terms, np.float32(0)).sum(axis=1, dtype=np.float64)
    p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
    same = logits.argmax(axis=1) == base_lp.argmax(axis=1)
    return KLDRows(nll, nll_base, kld, p_diff, same)


# -- running statistics

def mean_and_error(s: float, s2: float, count: int) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and the standard error of the mean (0 for <= 10)."""
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    return f, math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0


def _covariance(sa: float, sb: float, sab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def _percentile(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile of sorted values: linear between neighbours, in float32."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = np.float32(fraction) * np.float32(len(values) - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    return float((np.float32(1) - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)])


def _median(values: np.ndarray) -> float:
    n = len(values)
    return float(values[n // 2]) if n % 2 else float(np.float32(0.5) * (values[n // 2] + values[n // 2 - 1]))


KLD_POINTS = ("99.9", "99.0", "95.0", "90.0", "median", "10.0", "5.0", "1.0", "0.1")  # as llama.cpp lists them
P_DIFF_POINTS = ("99.9", "99.0", "95.0", "90.0", "75.0", "median", "25.0", "10.0", "5.0", "1.0", "0.1")


def _percentiles(values: np.ndarray, points: Sequence[str]) -> dict:
    return {"max": float(values[-1]),
            **{p: _median(values) if p == "median" else _percentile(values, float(p) / 100) for p in points},
            "min": float(values[0])}


@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float  # standard error of the PPL (llama.cpp's "+/-")
    n_ctx: int
    n_chunks: int
    n_tokens: int  # tokens of the whole text
    n_scored: int
    seconds: float  # evaluation, after loading and tokenizing
    chunks: list[dict] = field(default_factory=list)  # per chunk: running PPL, the chunk's own

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class KLDResult:
    n_ctx: int
    n_chunks: int
    n_scored: int
    seconds: float
    sums: dict  # llama.cpp's kl_divergence_result
    kld_sorted: np.ndarray = field(repr=False)
    p_diff_sorted: np.ndarray = field(repr=False)
    chunks: list[dict] = field(default_factory=list)

    def stats(self) -> dict:
        """The figures llama.cpp prints after a KL-divergence run (percentages as fractions)."""
        out = kld_figures(self.sums, self.n_scored)
        out["kld_percentiles"] = _percentiles(self.kld_sorted, KLD_POINTS)
        out["p_diff_percentiles"] = _percentiles(self.p_diff_sorted, P_DIFF_POINTS)
        return out

    def to_dict(self) -> dict:
        return {"n_ctx": self.n_ctx, "n_chunks": self.n_chunks, "n_scored": self.n_scored, "seconds": self.seconds,
                **self.stats(), "sums": self.sums, "chunks": self.chunks}


# -- the saved reference log-probabilities

class BaseLogits:
    """A `--kl-divergence-base` file, checked whole before use (it is untrusted): header, exact size
    for its counts, tokens inside the vocabulary; each row's scale and offset as it is read.
    Memory-mapped: nothing is read until asked for."""

    def __init__(self, path: str | os.PathLike, n_vocab: int) -> None:
        self.path = str(path)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise UsageError(f"{path}: cannot read the KL-divergence base: {e.strerror or e}") from None
        if size < HEADER.size:
            raise FormatError(path, "header", f"the file has {size} bytes, fewer than the {HEADER.size} of a header")
        with open(path, "rb") as f:
            magic, n_ctx, vocab, n_chunk = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise FormatError(path, "magic", f"is {magic!r}, not {MAGIC!r}: not a file of saved log-probabilities")
        if not 3 <= n_ctx:
            raise FormatError(path, "n_ctx", f"is {n_ctx}; it must be at least 3")
        if vocab != n_vocab:
            raise FormatError(path, "n_vocab", f"is {vocab}, but the model has {n_vocab} tokens: it was saved "
                                               "with another vocabulary")
        if n_chunk < 1:
            raise FormatError(path, "n_chunk", f"is {n_chunk}; it must be at least 1")
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, vocab, n_chunk
        self.rows_per_chunk = n_ctx - 1 - n_ctx // 2
        self.width = row_width(vocab)
        want = HEADER.size + 4 * n_chunk * n_ctx + 2 * n_chunk * self.rows_per_chunk * self.width
        if size != want:
            raise FormatError(path, "size", f"is {size} bytes, but n_ctx {n_ctx}, n_vocab {vocab} and n_chunk "
                                            f"{n_chunk} make {want}: truncated or not this format")
        self._map = np.memmap(path, np.uint8, "r")
        self.tokens = self._map[HEADER.size:HEADER.size + 4 * n_chunk * n_ctx].view("<i4")
        bad = np.flatnonzero((self.tokens < 0) | (self.tokens >= vocab))
        if bad.size:
            raise FormatError(path, f"token {bad[0]}", f"is {self.tokens[bad[0]]}, outside the vocabulary [0, {vocab})")
        self._rows = self._map[HEADER.size + 4 * n_chunk * n_ctx:].view("<u2").reshape(-1, self.width)

    def rows(self, chunk: int) -> np.ndarray:
        """Chunk `chunk`'s saved rows, (rows_per_chunk, width) uint16, each row's scale and offset checked."""
        rows = np.asarray(self._rows[chunk * self.rows_per_chunk:(chunk + 1) * self.rows_per_chunk])
        head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
        # llama.cpp writes scale = (max - min) / 65535 with 0 <= max - min <= 16, and
        # min_log_prob = min - max - log(sum exp(logit - max)), in [-16 - log(n_vocab), 0]
        lo = -16 - math.log(self.n_vocab) - 0.01
        ok = np.isfinite(head).all(axis=1) & (head[:, 0] >= 0) & (head[:, 0] <= 16.01 / 65535) \
            & (head[:, 1] <= 0) & (head[:, 1] >= lo)
        if not ok.all():
            r = int(np.flatnonzero(~ok)[0])
            raise FormatError(self.path, f"chunk {chunk} row {r}",
                              f"has scale {float(head[r, 0])!r} and min_log_prob {float(head[r, 1])!r}: the scale "
                              f"must be in [0, 16/65535] and the minimum in [{lo:.2f}, 0]")
        return rows

    def close(self) -> None:
        self.__dict__.pop("_map", None)
        self.__dict__.pop("_rows", None)
        self.__dict__.pop("tokens", None)


def write_atomically(path: str | os.PathLike, fill: Callable[[Any], None]) -> None:
    """Write `path` through a temporary file beside it, renamed only once `fill(f)` has finished."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.part"
    try:
        with open(tmp, "wb") as f:
            fill(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- the runs

ChunkCallback = Callable[[int, int, dict], None]  # (chunk index, chunks in all, that chunk's row)


def _options(n_ctx: Any, chunks: Any, batch: Any) -> tuple[int, int | None, int]:
    return (_check_int("n_ctx", n_ctx, 3), None if chunks is None else _check_int("chunks", chunks, 1),
            _check_int("batch", batch, 1))


def perplexity(llm: Any, text: str | Sequence[int], n_ctx: int = 512, chunks: int | None = None,
               batch: int = DEFAULT_BATCH, save_base: str | os.PathLike | None = None,
               on_chunk: ChunkCallback | None = None) -> PerplexityResult:
    """llama.cpp's perplexity of `llm` (a `purelm.LLM`) over `text` (a str, or token ids with BOS
    already first where the model adds one): chunks of `n_ctx` tokens, at most `chunks` of them,
    `batch` tokens per forward pass. `save_base`: also save the log-probabilities there for a later
    `kl_divergence` (written whole or not at all)."""
    n_ctx, chunks, batch = _options(n_ctx, chunks, batch)
    tokens = text_tokens(llm.tokenizer, text) if isinstance(text, str) else \
        [_check_int("token id", t, 0, llm.n_vocab - 1) for t in text]
    n_chunk = count_chunks(len(tokens), n_ctx, chunks)
    bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
    if save_base is None:
        return _perplexity(llm, tokens, n_ctx, n_chunk, bos, batch, None, on_chunk)
    result: list[PerplexityResult] = []

    def fill(f: Any) -> None:
        f.write(HEADER.pack(MAGIC, n_ctx, llm.n_vocab, n_chunk))
        f.write(np.asarray(tokens[:n_chunk * n_ctx], "<i4").tobytes())
        result.append(_perplexity(llm, tokens, n_ctx, n_chunk, bos, batch, f, on_chunk))
    write_atomically(save_base, fill)
    return result[0]


def _perplexity(llm: Any, tokens: list[int], n_ctx: int, n_chunk: int, bos: int | None, batch: int,
                out: Any, on_chunk: ChunkCallback | None) -> PerplexityResult:
    t0 = time.perf_counter()
    nll = nll2 = 0.0
    count = 0
    rows = []
    for c, logits, targets in chunk_logits(llm.model, tokens, n_ctx, n_chunk, bos, batch):
        v = token_nll(logits, targets)
        if out is not None:
            out.write(pack_log_probs(logits).tobytes())
        nll, nll2, count = nll + float(v.sum()), nll2 + float((v * v).sum()), count + len(v)
        row = {"chunk": c + 1, "ppl": math.exp(nll / count), "chunk_ppl": math.exp(float(v.mean())),
               "chunk_nll": float(v.mean()), "tokens": int(len(v)), "seconds": time.perf_counter() - t0}
        rows.append(row)
        if on_chunk:
            on_chunk(c, n_chunk, row)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl, err, n_ctx, n_chunk, len(tokens), count, time.perf_counter() - t0, rows)


_SUM_KEYS = ("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "p_diff", "p_diff2",
             "p_diff4", "max_p_diff", "same_top")


def kl_divergence(llm: Any, base: str | os.PathLike, chunks: int | None = None, batch: int = DEFAULT_BATCH,
                  on_chunk: ChunkCallback | None = None) -> KLDResult:
    """llama.cpp's KL divergence of `llm` from the log-probabilities saved in `base` (by `perplexity`'s
    save_base or llama-perplexity's --kl-divergence-base), over the same tokens and context; at most
    `chunks` of the file's chunks. A file that does not fit the model raises FormatError."""
    _, chunks, batch = _options(3, chunks, batch)
    ref = BaseLogits(base, llm.n_vocab)
    try:
        n_chunk = ref.n_chunk if chunks is None else min(chunks, ref.n_chunk)
        bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
        t0 = time.perf_counter()
        s = dict.fromkeys(_SUM_KEYS, 0.0)
        count = 0
        kld_all, dp_all, rows = [], [], []
        for c, logits, targets in chunk_logits(llm.model, ref.tokens, ref.n_ctx, n_chunk, bos, batch):
            k = kld_rows(logits, targets, ref.rows(c))
            nll, nb = k.nll.astype(np.float64), k.nll_base.astype(np.float64)
            dp = k.p_diff.astype(np.float64)
            for key, v in (("nll", nll), ("nll2", nll * nll), ("nll_base", nb), ("nll_base2", nb * nb),
                           ("nll_nll_base", nll * nb), ("kld", k.kld), ("kld2", k.kld * k.kld),
                           ("p_diff", dp), ("p_diff2", dp * dp), ("p_diff4", dp ** 4)):
                s[key] += float(v.sum())
            s["max_p_diff"] = max(s["max_p_diff"], float(np.abs(dp).max()))
            s["same_top"] += int(k.same_top.sum())
            count += len(targets)
            kld_all.append(k.kld.astype(np.float32))
            dp_all.append(k.p_diff)
            rows.append(_kld_row(c, s, count, k, time.perf_counter() - t0))
            if on_chunk:
                on_chunk(c, n_chunk, rows[-1])
        s["same_top"] = int(s["same_top"])
        return KLDResult(ref.n_ctx, n_chunk, count, time.perf_counter() - t0, s,
                         np.sort(np.concatenate(kld_all)), np.sort(np.concatenate(dp_all)), rows)
    finally:
        ref.close()


def kld_figures(s: dict, count: int) -> dict:
    """llama.cpp's KL-divergence figures from the sums over `count` tokens: means and their errors."""
    lp, lp_err = mean_and_error(s["nll"], s["nll2"], count)
    lb, lb_err = mean_and_error(s["nll_base"], s["nll_base2"], count)
    cov = _covariance(s["nll"], s["nll_base"], s["nll_nll_base"], count)
    ratio_err = math.sqrt(max(0.0, lp_err ** 2 + lb_err ** 2 - 2 * cov))
    ppl, ppl_base = math.exp(lp), math.exp(lb)
    kld, kld_err = mean_and_error(s["kld"], s["kld2"], count)
    dp, dp_err = mean_and_error(s["p_diff"], s["p_diff2"], count)
    mse, mse_err = mean_and_error(s["p_diff2"], s["p_diff4"], count)
    rms = math.sqrt(mse)
    top = s["same_top"] / count
    return {
        "ppl": ppl, "ppl_error": ppl * lp_err, "ppl_base": ppl_base, "ppl_base_error": ppl_base * lb_err,
        "ln_ppl_correlation": cov / (lp_err * lb_err) if lp_err and lb_err else float("nan"),
        "ln_ppl_ratio": lp - lb, "ln_ppl_ratio_error": ratio_err,
        "ppl_ratio": math.exp(lp - lb), "ppl_ratio_error": math.exp(lp - lb) * ratio_err,
        "ppl_diff": ppl - ppl_base,
        "ppl_diff_error": math.sqrt(max(0.0, (ppl * lp_err) ** 2 + (ppl_base * lb_err) ** 2
                                        - 2 * ppl * ppl_base * cov)),
        "kld": kld, "kld_error": kld_err,
        "p_diff": dp, "p_diff_error": dp_err,
        "p_diff_rms": rms, "p_diff_rms_error": 0.5 / rms * mse_err if rms else 0.0,
        "same_top": top, "same_top_error": math.sqrt(top * (1 - top) / (count - 1)) if count > 1 else 0.0,
    }


def _kld_row(c: int, s: dict, count: int, k: KLDRows, seconds: float) -> dict:
    """The running figures after chunk c (llama.cpp prints some of them), and the chunk's own mean KLD."""
    return {"chunk": c + 1, **kld_figures(s, count), "chunk_kld": float(k.kld.mean()), "seconds": seconds}


# -- reports

def kld_table_header() -> str:
    return ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
            "Δp RMS            Same top p")


def kld_table_line(row: dict) -> str:
    """One line of llama.cpp's running KL-divergence table."""
    return (f"{row['chunk']:4d}    {row['ppl']:9.4f} ± {row['ppl_error']:9.4f}"
            f"    {row['ln_ppl_ratio']:10.5f} ± {row['ln_ppl_ratio_error']:10.5f}"
            f"    {row['kld']:10.5f} ± {row['kld_error']:10.5f}"
            f"    {100 * row['p_diff_rms']:6.3f} ± {100 * row['p_diff_rms_error']:6.3f} %"
            f"    {100 * row['same_top']:6.3f} ± {100 * row['same_top_error']:6.3f} %")


def _label(point: str) -> str:
    return "Median  " if point == "median" else f"{point + '%':>5}   "


def kld_report(result: KLDResult) -> str:
    """The statistics llama.cpp prints at the end of a KL-divergence run, in its layout."""
    if result.n_scored < 100:
        return "(fewer than 100 scored tokens: no statistics, as llama.cpp)"
    s = result.stats()
    k, d = s["kld_percentiles"], s["p_diff_percentiles"]
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_error']:10.6f}",
        f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_error']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['ln_ppl_correlation']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± {s['ln_ppl_ratio_error']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_error']:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f} ± {s['ppl_diff_error']:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {s['kld']:10.6f} ± {s['kld_error']:10.6f}",
        f"Maximum KLD: {k['max']:10.6f}",
    ]
    lines += [f"{_label(name)}KLD: {k[name]:10.6f}" for name in KLD_POINTS]
    lines.append(f"Minimum KLD: {k['min']:10.6f}")
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s['p_diff']:6.3f} ± {100 * s['p_diff_error']:5.3f} %",
              f"Maximum Δp: {100 * d['max']:6.3f}%"]
    lines += [f"{_label(name)}Δp: {100 * d[name]:6.3f}%" for name in P_DIFF_POINTS]
    lines += [f"Minimum Δp: {100 * d['min']:6.3f}%",
              f"RMS Δp    : {100 * s['p_diff_rms']:6.3f} ± {100 * s['p_diff_rms_error']:5.3f} %",
              f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_error']:5.3f} %"]
    return "\n".join(lines)


def write_table(path: str | os.PathLike, result: PerplexityResult | KLDResult) -> None:
    """The per-chunk table, and for JSON the summary too: JSON or CSV by the file's extension."""
    import csv
    import io
    import json

    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in (".json", ".csv"):
        raise UsageError(f"--output {path}: the name must end in .json or .csv")
    if ext == ".json":
        data = json.dumps(result.to_dict(), indent=1).encode()
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(result.chunks[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(result.chunks)
        data = buf.getvalue().encode()
    write_atomically(path, lambda f: f.write(data))
