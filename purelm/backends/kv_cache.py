"""The KV cache of many sequences, and the view of it that one forward pass works on.

Keys and values live in blocks of BLOCK positions (vLLM's paged attention idea) rather than in one
slot of n_ctx positions per sequence, for two reasons: a forked sequence (n samples of one prompt, a
conversation branching from a shared system prompt) shares its parent's blocks instead of storing
the prefix again, and memory grows with the positions stored, not with n_ctx x sequences. A block
that several sequences share is copied when one of them writes into it (copy-on-write); in practice
that is only a fork's last, partly filled block.

Layout: layer i keeps k[i] of shape (capacity * BLOCK, n_kv_heads, k_dim) (v[i] likewise); block b
is rows b*BLOCK ... b*BLOCK + BLOCK-1. A sequence maps position p to row
blocks[p // BLOCK] * BLOCK + p % BLOCK. Kernels index rows through that table, or gather a run of
rows for a matrix product.

Storage types (llama.cpp's --cache-type-k/--cache-type-v): "f32" keeps float32 rows; "f16" keeps
numpy float16 rows (half the bytes); "q8_0" keeps each head's row as llama.cpp's q8_0 blocks, 34 bytes
per 32 values (an f16 scale, then 32 int8), in a uint8 store of k_dim / 32 * 34 bytes per head (about
a quarter of f32's bytes). A key or value is rounded once, when it is stored, as llama.cpp rounds
when it copies k and v into its cache: f16 to nearest-even, q8_0 as ggml's reference quantizer
(quantize_row_q8_0_ref, gguf.quants: d = max|x| / 127, q = roundf(x / d)). ggml-cpu's AVX2 copy
multiplies by 127 / max|x| and rounds half to even instead; the two differ by one step in rare values.
Attention then reads the rounded values back as float32 (`decode_rows`).

Rotation (llama.cpp's attention rotation, its PR 21038, on whenever a store is quantized): a q8_0
block's scale is set by its largest value, and a few outlier channels of the keys make the rest of
their block coarse. An orthonormal Hadamard matrix H (symmetric, H·H = I) spreads them: the layer
stores H·k and queries with H·q (dot products are unchanged, (Hq)·(Hk) = q·k), stores H·v and turns
the output back with H (it is a sum of rotated values). `rotate_k`/`rotate_v` are H's sizes, 0 for
none: for keys the largest power of two from 64 up that divides the head size, for values 64.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ContextOverflowError, MemoryLimitError, UsageError
from ..quant.legacy import decode_q8_0, encode_q8_0

BLOCK = 64  # positions per block: a power of two, and a divisor of the kernels' chunk of positions
CACHE_TYPES = ("f32", "f16", "q8_0")
Q8_0_VALUES, Q8_0_BYTES = 32, 34  # one q8_0 block: 32 values in an f16 scale and 32 int8


def available_memory() -> int | None:
    """Bytes the host can still give without swapping (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


ROTATION_MIN = 64  # the smallest Hadamard block; a head size it does not divide is not rotated


def rotation_size(kind: str, dim: int, largest: bool) -> int:
    """H's size for a store of type `kind` and heads of `dim` values (0: none; see the docstring)."""
    if kind != "q8_0" or dim % ROTATION_MIN:
        return 0
    n = ROTATION_MIN
    while largest and dim % (2 * n) == 0:
        n *= 2
    return n


@functools.cache
def hadamard(n: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix of size n (a power of two), Sylvester's construction."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def rotate(x: np.ndarray, n: int) -> np.ndarray:
    """x (..., dim) with each run of n values multiplied by hadamard(n) (its own inverse): the fast
    Walsh-Hadamard transform, stage by stage over all rows at once, so that a row gets the same bits
    alone as among others (a BLAS product sums a lone row in another order than a block of rows)."""
    x = np.asarray(x, np.float32)
    y, h = np.array(x, np.float32, order="C"), 1
    while h < n:  # pairs (j, j + h) of each run of 2h values: their sum, then their difference
        pairs = y.reshape(-1, n // (2 * h), 2, h)
        first, second = pairs[:, :, 0], pairs[:, :, 1]
        a = first.copy()
        first += second
        np.subtract(a, second, out=second)
        h *= 2
    y *= np.float32(1 / np.sqrt(n))
    return y


def check_cache_type(name: str, value: object) -> str:
    """`value` if it is a cache type, else a UsageError naming `name` (the argument or flag)."""
    if not isinstance(value, str) or value not in CACHE_TYPES:
        raise UsageError(f"{name} must be one of {', '.join(CACHE_TYPES)}, got {value!r}")
    return value


def store_width(kind: str, dim: int) -> int:
    """Elements of a store's row per head for `dim` values: bytes for q8_0, whose blocks must not
    straddle heads (llama.cpp's cache views rows per head too)."""
    if kind != "q8_0":
        return dim
    if dim % Q8_0_VALUES:
        raise UsageError(f"a q8_0 cache needs head sizes that are multiples of {Q8_0_VALUES}; this "
                         f"model's are {dim} (use f16)")
    return dim // Q8_0_VALUES * Q8_0_BYTES


def encode_rows(kind: str, x: np.ndarray) -> np.ndarray:
    """float rows (..., dim) as a store of type `kind` keeps them (f32: x itself)."""
    if kind == "f32":
        return x
    x = np.asarray(x, np.float32)
    if kind == "f16":
        return x.astype(np.float16)
    out = np.empty((x.size // Q8_0_VALUES, Q8_0_BYTES), np.uint8)
    encode_q8_0(x.reshape(-1, Q8_0_VALUES), out)
    return out.reshape(x.shape[:-1] + (store_width(kind, x.shape[-1]),))


def decode_rows(kind: str, rows: np.ndarray, dim: int) -> np.ndarray:
    """A store's rows (..., width) of type `kind` as float32 (..., dim) (f32: `rows` itself)."""
    if kind == "f32":
        return rows
    if kind == "f16":
        return rows.astype(np.float32)
    blocks = np.ascontiguousarray(rows).reshape(-1, Q8_0_BYTES)
    out = np.empty((len(blocks), Q8_0_VALUES), np.float32)
    decode_q8_0(blocks, out)
    return out.reshape(rows.shape[:-1] + (dim,))


def _row_bytes(store: Any) -> int:
    """Bytes of one row (position) of a numpy or torch store."""
    item = store.element_size() if hasattr(store, "element_size") else store.itemsize
    return int(np.prod(store.shape[1:])) * item


@dataclass
class Sequence:
    blocks: list[int] = field(default_factory=list)
    n_past: int = 0  # positions stored
    tokens: list[int] = field(default_factory=list)  # the ids at 0..n_past-1, when the caller tracks them
    # (n, logits after position n - 1) of the last prompt the caller ran, while those positions stay:
    # the same prompt again takes them rather than running its last token once more, which would give
    # other bits (a decode token's rounded activations, not the prompt pass's product)
    prompt_logits: Any = None


class KVCache:
    """Keys and values of every layer for any number of sequences of up to `n_ctx` positions each.

    Sequence 0 exists from the start; `n_past`, `tokens`, `truncate` and `commit` without a sequence
    id are about it (one sequence is the common case). `add`, `fork` and `remove` manage others.
    `type_k`, `type_v`: the stores' types (CACHE_TYPES); "f32" is `dtype` (a device cache's float)."""

    def __init__(self, n_layers: int, n_ctx: int, n_kv_heads: int, k_dim: int, v_dim: int,
                 dtype: Any = np.float32, type_k: str = "f32", type_v: str = "f32") -> None:
        self.n_layers, self.n_ctx, self.n_kv_heads = n_layers, n_ctx, n_kv_heads
        self.k_dim, self.v_dim, self.dtype = k_dim, v_dim, dtype
        self.type_k, self.type_v = check_cache_type("type_k", type_k), check_cache_type("type_v", type_v)
        self.rotate_k, self.rotate_v = rotation_size(type_k, k_dim, True), rotation_size(type_v, v_dim, False)
        k_width, v_width = store_width(type_k, k_dim), store_width(type_v, v_dim)
        self.k = [self._zeros((0, n_kv_heads, k_width), type_k) for _ in range(n_layers)]
        self.v = [self._zeros((0, n_kv_heads, v_width), type_v) for _ in range(n_layers)]
        self.refs = np.zeros(0, np.int32)  # sequences holding each block
        self.free_blocks: list[int] = []
        self.seqs: dict[int, Sequence] = {0: Sequence()}
        self._next_id = 1

    # -- sequences
    def add(self) -> int:
        """A new, empty sequence; returns its id."""
        seq, self._next_id = self._next_id, self._next_id + 1
        self.seqs[seq] = Sequence()
        return seq

    def fork(self, seq: int = 0) -> int:
        """A new sequence with `seq`'s positions (and tokens), sharing its blocks; returns its id."""
        parent = self.seq(seq)
        child = self.add()
        self.seqs[child] = Sequence(list(parent.blocks), parent.n_past, list(parent.tokens))
        self.refs[parent.blocks] += 1
        return child

    def remove(self, seq: int) -> None:
        """Forget a sequence and free the blocks no other sequence holds."""
        self._release(self.seq(seq).blocks)
        del self.seqs[seq]

    def seq(self, seq: int) -> Sequence:
        try:
            return self.seqs[seq]
        except (KeyError, TypeError):
            raise UsageError(f"no sequence {seq!r} in this cache (sequences: {sorted(self.seqs)})") from None

    def truncate(self, n_past: int, seq: int = 0) -> None:
        """Forget positions from n_past on (to reuse a shared prompt prefix); frees whole blocks."""
        s = self.seq(seq)
        s.n_past = max(0, min(s.n_past, n_past))
        del s.tokens[s.n_past:]
        if s.prompt_logits is not None and s.prompt_logits[0] > s.n_past:
            s.prompt_logits = None
        keep = -(-s.n_past // BLOCK)
        self._release(s.blocks[keep:])
        del s.blocks[keep:]

    def commit(self, n_tokens: int, seq: int = 0) -> None:
        if n_tokens < 0:
            raise UsageError(f"commit of {n_tokens} tokens: it must be >= 0 (truncate forgets positions)")
        self.seq(seq).n_past += n_tokens

    # sequence 0, for the single-sequence API
    @property
    def n_past(self) -> int:
        return self.seqs[0].n_past

    @n_past.setter
    def n_past(self, value: int) -> None:
        """Pretend positions 0..value-1 are stored (zeros where nothing was written)."""
        if value < 0:
            raise UsageError(f"n_past must be >= 0, got {value}")
        self.reserve(value)
        self.seqs[0].n_past = value

    @property
    def tokens(self) -> list[int]:
        return self.seqs[0].tokens

    @tokens.setter
    def tokens(self, value: list[int]) -> None:
        self.seqs[0].tokens = value

    # -- a sequence's state, as a session file holds it (purelm/session.py)
    def stored(self, seq: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of `seq`'s keys and values per layer, (n_past, n_kv_heads, width) each, as numpy
        arrays of the stores' types (f32 as float32)."""
        rows = self.rows(seq, 0, self.seq(seq).n_past)
        return [self._take(s, rows) for s in self.k], [self._take(s, rows) for s in self.v]

    def restore(self, seq: int, keys: list[np.ndarray], values: list[np.ndarray], tokens: list[int]) -> None:
        """`seq` becomes the sequence whose keys and values `stored` returned, and its `tokens`."""
        self.truncate(0, seq)
        self.reserve(len(tokens), seq)
        rows = self.rows(seq, 0, len(tokens))
        for store, x in zip(self.k + self.v, keys + values):
            self._put(store, rows, x)
        s = self.seq(seq)
        s.n_past, s.tokens = len(tokens), list(tokens)

    def _take(self, store: Any, rows: np.ndarray) -> np.ndarray:
        return np.asarray(store[rows], np.float32 if store.dtype == self.dtype else store.dtype)

    def _put(self, store: Any, rows: np.ndarray, x: np.ndarray) -> None:
        store[rows] = x

    # -- blocks
    @property
    def capacity(self) -> int:
        """Blocks allocated (used or free)."""
        return len(self.refs)

    def reserve(self, n_positions: int, seq: int = 0) -> None:
        """Make positions n_past .. n_positions-1 of `seq` writable: blocks allocated, and shared
        blocks among them copied (copy-on-write). When the memory runs out (MemoryLimitError) no new
        block is left taken."""
        if n_positions > self.n_ctx:
            raise ContextOverflowError(f"{n_positions} positions do not fit in the context of {self.n_ctx}")
        s = self.seq(seq)
        first = s.n_past // BLOCK
        for i in range(first, min(len(s.blocks), -(-n_positions // BLOCK))):
            b = s.blocks[i]
            if self.refs[b] > 1:  # shared with another sequence: this one gets its own copy
                new = self._allocate()
                for store in self.k + self.v:
                    store[new * BLOCK:(new + 1) * BLOCK] = store[b * BLOCK:(b + 1) * BLOCK]
                self.refs[b] -= 1
                s.blocks[i] = new
        n_had = len(s.blocks)
        try:
            while len(s.blocks) * BLOCK < n_positions:
                s.blocks.append(self._allocate())
        except MemoryLimitError:  # all or nothing: the blocks taken so far go back
            self._release(s.blocks[n_had:])
            del s.blocks[n_had:]
            raise

    def rows(self, seq: int, p0: int, p1: int) -> np.ndarray:
        """Pool rows of positions p0..p1-1 of `seq` (allocated: see reserve)."""
        p = np.arange(p0, p1)
        return np.asarray(self.seq(seq).blocks, np.int64)[p // BLOCK] * BLOCK + p % BLOCK

    def table(self, seq: int) -> np.ndarray:
        return np.asarray(self.seq(seq).blocks, np.int32)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of positions: keys and values of every layer."""
        return BLOCK * sum(_row_bytes(store) for store in self.k + self.v)

    def available_bytes(self) -> int | None:
        """Memory the stores can still grow into (None: unknown, no check): the host's, here."""
        return available_memory()

    def check_room(self, need: int, what: str) -> None:
        """A MemoryLimitError, before any allocation, when `need` more bytes would not fit in the
        memory available (else the kernel's OOM killer ends the process mid-generation)."""
        free = self.available_bytes()
        if free is not None and need > free:
            raise MemoryLimitError(f"{what} needs up to {need / 2**30:.1f} GiB of KV cache, and {free / 2**30:.1f} GiB "
                             f"of memory is available")

    def samples_blocks(self, prompt_lengths: list[int], n: int, max_tokens: int) -> int:
        """The most blocks `n` samples of each prompt can take: each prompt's blocks once, then each
        sample's own positions, from a copy of its prompt's last block (copy-on-write) on."""
        own = -(-(min(max_tokens, self.n_ctx) + BLOCK - 1) // BLOCK)
        return sum(-(-p // BLOCK) for p in prompt_lengths) + len(prompt_lengths) * n * own

    def _growth_bytes(self, old: int, capacity: int) -> int:
        """The memory a growth from `old` to `capacity` blocks takes at once. numpy's zeroed stores are
        pages the kernel hands out as they are written (calloc): the block asked for, and the copy of
        the largest store while its old array still lives. (A device store takes all of it at once.)"""
        return self.block_bytes + old * BLOCK * max(_row_bytes(store) for store in self.k + self.v)

    def _allocate(self) -> int:
        if not self.free_blocks:
            self._grow(max(4, 2 * self.capacity))
        b = self.free_blocks.pop()
        self.refs[b] = 1
        return b

    def _release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_blocks.append(b)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        self.check_room(self._growth_bytes(old, capacity), f"growing the KV cache to {capacity * BLOCK} positions")
        for stores, kind in ((self.k, self.type_k), (self.v, self.type_v)):
            for i, store in enumerate(stores):
                new = self._zeros((capacity * BLOCK,) + tuple(store.shape[1:]), kind)
                new[: old * BLOCK] = store
                stores[i] = new
        self.refs = np.concatenate([self.refs, np.zeros(capacity - old, np.int32)])
        self.free_blocks.extend(range(capacity - 1, old - 1, -1))  # lowest first

    def _zeros(self, shape: tuple[int, ...], kind: str) -> Any:
        """A zeroed store of type `kind` (a backend's cache subclass puts it on its device). Zero
        bytes read back as 0.0 in every type (a q8_0 block of scale 0)."""
        return np.zeros(shape, {"f32": self.dtype, "f16": np.float16, "q8_0": np.uint8}[kind])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    # -- passes
    def view(self, runs: list[tuple[int, int]]) -> "PassView":
        """The view a forward pass of `runs` works on: (sequence id, tokens) in batch order, each
        sequence's tokens at its next positions. Blocks are reserved here (before any kernel)."""
        return PassView(self, runs)


@dataclass(frozen=True)
class Run:
    """Consecutive tokens t0..t1-1 of a pass, of one sequence, at positions p0..p0+(t1-t0)-1."""

    seq: int
    t0: int
    t1: int
    p0: int

    @property
    def p1(self) -> int:
        return self.p0 + self.t1 - self.t0


class PassView:
    """What the attention op of one forward pass sees of the cache: where each token's key and
    value go (`write_rows`), and per run of one sequence the rows of every position it attends to
    (`rows_upto[i]`: positions 0..p1-1) and its block table. Built once per pass, used by every
    layer. The cache's sizes, store types and per-layer stores (n_layers, n_kv_heads, k_dim, v_dim,
    n_ctx, type_k, type_v, rotate_k, rotate_v, k, v) are copied here: the ops read them for every layer."""

    def __init__(self, cache: KVCache, runs: list[tuple[int, int]]) -> None:
        self.cache = cache
        self.n_layers, self.n_kv_heads, self.n_ctx = cache.n_layers, cache.n_kv_heads, cache.n_ctx
        self.k_dim, self.v_dim = cache.k_dim, cache.v_dim
        self.type_k, self.type_v = cache.type_k, cache.type_v
        self.rotate_k, self.rotate_v = cache.rotate_k, cache.rotate_v
        self.k, self.v = cache.k, cache.v  # the lists: a store that grows is replaced in them
        self.runs: list[Run] = []
        seen, t = set(), 0
        for seq, n in runs:
            s = cache.seq(seq)
            if seq in seen:
                raise UsageError(f"sequence {seq} appears twice in one pass")
            if n < 1:
                raise UsageError(f"sequence {seq}: a pass needs at least one token")
            if s.n_past + n > cache.n_ctx:
                raise ContextOverflowError(
                    f"{s.n_past + n} tokens do not fit in the context of {cache.n_ctx} tokens")
            seen.add(seq)
            self.runs.append(Run(seq, t, t + n, s.n_past))
            t += n
        self.n_tokens = t
        for r in self.runs:
            cache.reserve(r.p1, r.seq)
        self.write_rows = np.concatenate([cache.rows(r.seq, r.p0, r.p1) for r in self.runs]) \
            if self.runs else np.zeros(0, np.int64)
        self.positions = np.concatenate([np.arange(r.p0, r.p1) for r in self.runs]) if self.runs \
            else np.zeros(0, np.int64)
        self.tables = [cache.table(r.seq) for r in self.runs]

    @functools.cached_property
    def rows_upto(self) -> list[np.ndarray]:
        """Per run, the rows of its sequence's positions 0..p1-1 (to gather them for a product)."""
        return [self.cache.rows(r.seq, 0, r.p1) for r in self.runs]

    def commit(self) -> None:
        """The pass has its logits: each sequence's positions are stored."""
        for r in self.runs:
            self.cache.seqs[r.seq].n_past = r.p1


def as_view(cache: Any, n_tokens: int) -> PassView:
    """A pass view for `cache`: itself if it is one; for a bare KVCache, its sequence 0's next
    `n_tokens` positions (callers that drive attention directly, as the tests do)."""
    return cache if isinstance(cache, PassView) else cache.view([(0, n_tokens)])
