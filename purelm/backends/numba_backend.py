"""The default CPU backend: numba kernels over the file's quantized blocks, no float copy of the model.

Decode (a few tokens): matrix-vector kernels read quantized weights directly, multithreaded with
numba's prange. By default matrices are repacked at load so that R rows sit side by side (vector lanes
are rows, x is broadcast); q|k|v and gate|up are merged into one matrix each so one pass serves all.
The repacked copy replaces the file's pages in memory (they are released after repacking), so the
resident size stays about the file's size; the repacked matrices of a large file are also written
to an on-disk cache and memory-mapped from it on later loads (pack_cache.py; `PURELM_PACK_CACHE=0`
turns it off). `repack=False` reads the mmap'd blocks in place. On x86
CPUs with AVX2, decode products of every repacked quantized type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS; the last four and Q2_K repacked only for these kernels) round
the activations to int16 (per 32) and use integer multiply-adds (`int16_dot`,
packing.py's dot layouts): 1.1-3.5x the float kernels' speed (benchmarks/README.md). Optionally
(`int8_dot`, $PURELM_INT8_DOT=1) they round to int8 instead, prompts included, at llama.cpp's rounding
(its q8 activations), which moves logits ~100x more than int16 and flips near-ties (README:
Correctness): with AVX512-VNNI all but Q6_K (vpdpbusd does twice vpdpwssd's multiply-adds), with AVX2
alone the 4- and 5-bit types (vpmaddubsw, int16 sums: int8_families).

Prefill (many tokens): the types with integer kernels (int16_dot, or int8_dot) take the prompt through
the same kernels as decode, PREFILL_ROWS rows a call (each call reads the weights once; each row rounded
as a decode token is: 1.4-1.7x float32 BLAS on this project's CPUs, benchmarks/README.md), their rows
cut into token ranges rather than column ranges (packed.token_splits: a decode step's bits, no serial
sum); other types' tiles of rows are dequantized to float32 and multiplied with BLAS. Attention is done
as matrix products: blocked in numba (ops.attention_prompt) where head sizes fit, else with BLAS.
The work is split over our own pool of `threads` Python threads, each running serial (GIL-free) numba
kernels and single-threaded BLAS: numba's and OpenBLAS's spinning thread pools never run at the same time (measured: letting both spin was 3-10x slower on 2 cores).

Threads: a pass uses numba's `threads` threads, or as many as other processes leave free, and a decode
step one thread where that is faster (ThreadGuard: where another process keeps a core busy, spinning
workers cost more than they bring).
Kernels live in numba_kernels/: packing.py (repacked layouts), packed.py (kernels over them),
rows.py (kernels over the file's own rows), ops.py (norms, rope, attention, activations).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import sys
import threading
from pathlib import Path
from time import monotonic, perf_counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: warm-up steps are not locked
    fcntl = None

# numba's OpenMP workers spin-wait this long after a kernel before sleeping (libgomp reads it when
# numba first starts its threads). A decode step's kernels come tens of microseconds apart: a worker
# that has fallen asleep is late for each, as llama.cpp's polling threads are not. The cost is a core
# taken from whatever else runs meanwhile (another busy process: README, "Defaults purelm sets");
# measured in benchmarks/README.md ("numba's spin count"). A value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "100000")

import numba  # noqa: E402
import numpy as np  # noqa: E402

from ..formats.gguf import Tensor
from ..quant import dequantize, dequantize_rows
from ..quant.types import BLOCK_INFO, GGMLType
from ..errors import ShapeError, UsageError
from . import usable_cores
from .base import (MIN_EXPERT_SUM, AttentionSpec, Backend, KVCache, PassView, Rope, as_view, check_attention, check_norm,
                   check_rope, check_rotate, check_route, expert_tensors)
from .kv_cache import BLOCK
from .interim import OPS as INTERIM_OPS, Interim
from .numba_kernels import ops, packed as pk, rows as rk
from .numba_kernels.intrinsics import has_int8_bytes, has_int8_dot, has_int16_dot
from .pack_cache import PackCache
from .pages import page_out_library, release_file_pages
from .numba_kernels.experts import FUSED, ExpertStack, expert_groups, glu_picked, mix_picked, route_rows
from .numba_kernels.packing import (DEFAULT_LANES, DOT_ONLY_TYPES, PACKED_TYPES, Arena, Packed, column_splits, pack,
                                    token_ranges)

# LoRA products (lora): runs of this many rows or more (prompts) go through BLAS; shorter ones through
# ops.lora_rows, shared among the threads from LORA_PARALLEL_ROWS rows on
LORA_BLAS_ROWS = 16
LORA_PARALLEL_ROWS = 8
# At most this many tokens go through the matrix-vector kernels; more take the dequantize+BLAS path.
MATVEC_MAX_TOKENS = 12
# Prompt rows per call of the integer kernels in prefill: each call reads the weights once.
PREFILL_ROWS = 128
# float32 weights per dequantized tile: 1 MiB, stays in L2 between the dequantize and the multiply.
TILE_FLOATS = 1 << 18
# Queries per block in prefill attention; key positions per work item in long-context decode.
ATTENTION_BLOCK = 128
# An encoder's (non-causal) inputs of at most this many tokens go through the tiled kernel, longer ones
# through BLAS: the kernel's start-up outweighs its blocks' speed on long runs (benchmarks/README.md:
# embeddings).
ENCODER_TILED_TOKENS = 64
ATTENTION_CHUNK = 256
BLOCK_SHIFT = BLOCK.bit_length() - 1  # position -> block: p >> BLOCK_SHIFT
MAX_LANES = 32  # running maxima side by side in the softmax's max (a runtime count, see ops.span_max)
EMPTY = np.zeros(0, np.float32)
# Kernels per repacked family (packing.py); their leading arguments are Packed.kernel_args.
MATVEC = {"nibble": pk.matvec_nibble, "q8": pk.matvec_q8, "q6k": pk.matvec_q6k,
          "nibble_dot": pk.matvec_dot_nibbles, "five_dot": pk.matvec_dot_five, "q6k_dot": pk.matvec_dot_six,
          "q8_dot": pk.matvec_dot_bytes, "q2k_dot": pk.matvec_dot_crumbs, "q3k_dot": pk.matvec_dot_crumbs3,
          "iq4_dot": pk.matvec_dot_levels}
MATVEC_MANY = {"nibble_dot": pk.matvec_dot_batch_nibbles, "five_dot": pk.matvec_dot_batch_five,  # 2+ rows,
               "q6k_dot": pk.matvec_dot_batch_six, "q8_dot": pk.matvec_dot_batch_bytes,  # where it differs
               "q2k_dot": pk.matvec_dot_batch_crumbs, "q3k_dot": pk.matvec_dot_batch_crumbs3,
               "iq4_dot": pk.matvec_dot_batch_levels}
# The int8-activation kernels (int8_dot) of the dot families that have them (Q6_K's keeps int16).
MATVEC8 = {"nibble_dot": pk.matvec_dot8_nibbles, "five_dot": pk.matvec_dot8_five, "q8_dot": pk.matvec_dot8_bytes}
MATVEC8_MANY = {"nibble_dot": pk.matvec_dot8_batch_nibbles, "five_dot": pk.matvec_dot8_batch_five,
                "q8_dot": pk.matvec_dot8_batch_bytes}


def int8_families() -> frozenset[str]:
    """The families of MATVEC8 whose int8 kernels run on this CPU (intrinsics.int8_kinds: with AVX2
    alone, not Q8_0's)."""
    return frozenset(MATVEC8) if has_int8_bytes() else frozenset(MATVEC8) - {"q8_dot"}


# The kernels that take prompts too (`_matvec_prefill`): the integer ones, int16 or int8 activations.
PREFILL_KERNELS = frozenset(MATVEC_MANY.values()) | frozenset(MATVEC8_MANY.values())
UNPACK = {"nibble": pk.unpack_nibble, "q8": pk.unpack_q8, "q6k": pk.unpack_q6k,
          **{f: pk.unpack_dot for f in ("nibble_dot", "five_dot", "q6k_dot", "q8_dot")},
          "q2k_dot": pk.unpack_crumbs, "q3k_dot": pk.unpack_crumbs, "iq4_dot": pk.unpack_levels}
NO_PARTS = np.zeros((0, 0, 0), np.float32)
_TOKEN_PARTS: dict[tuple[int, int], np.ndarray] = {}


def _token_parts(n: int, columns: int) -> np.ndarray:
    """The `parts` argument asking the dot kernels for n token ranges, each item summing the matrix's
    column splits itself (packed.token_splits, column_ranges)."""
    got = _TOKEN_PARTS.get((n, columns))
    if got is None:
        got = _TOKEN_PARTS[n, columns] = np.zeros((0, n, columns), np.float32)
    return got


class NumbaWeight:
    """A matrix as this backend keeps it: the file's rows (`data`, for embedding lookups and the
    zero-copy mode) and/or a repacked copy (`packed`). A merged matrix (q|k|v) has `splits`, the
    output widths of its parts, and no file rows."""

    __slots__ = ("qtype", "n_out", "n_in", "data", "packed", "splits", "column_splits", "pack_later", "kernel",
                 "kernel_many", "kernel_args", "source", "tensors")

    def __init__(self, qtype: GGMLType, n_out: int, n_in: int, data: np.ndarray | None = None,
                 packed: Packed | None = None, splits: tuple[int, ...] | None = None, threads: int = 1,
                 int8: bool = False) -> None:
        self.qtype, self.n_out, self.n_in = GGMLType(qtype), n_out, n_in
        self.data, self.splits = data, splits
        self.pack_later = False  # repack on first use in `linear` (a matrix only looked up stays as is)
        self.source: list[Tensor] | None = None  # what pack_later repacks (names, offsets: the pack cache's key)
        self.tensors: list[Tensor] | None = None  # the file's 2-D tensors it was made from (interim.py)
        self.set_packed(packed, threads, int8)

    def set_packed(self, packed: Packed | None, threads: int, int8: bool = False) -> None:
        """Use `packed` for products (`int8`: by the int8-activation kernels where its family has them);
        its matrix-vector kernel and arguments are looked up once here (a decode step makes ~4
        products per layer: per-call lookups showed in profiles)."""
        self.packed = packed
        self.column_splits = column_splits(packed.n_groups, packed.n_sub, threads) if packed else 1
        one, many = (MATVEC8, MATVEC8_MANY) if int8 and packed and packed.family in int8_families() else (MATVEC, MATVEC_MANY)
        self.kernel = one[packed.family] if packed else None
        self.kernel_many = many.get(packed.family, self.kernel) if packed else None
        self.kernel_args = packed.kernel_args if packed else ()

    @property
    def nbytes(self) -> int:
        """Bytes this weight owns (the repacked copy; file rows belong to the mmap)."""
        return self.packed.nbytes if self.packed is not None else 0


class ExpertWeight(NumbaWeight):
    """One expert's matrix: repacked on its first use into its rows of the layer's ExpertStack."""

    __slots__ = ("stack", "index")


class OtherLoad:
    """The cores of this process's CPU set that other processes kept busy, averaged over the last
    CHECK_SECONDS or more (/proc/stat's lines of those CPUs, less this process's own CPU time); 0 where
    the OS does not say. Read at most once per CHECK_SECONDS."""

    CHECK_SECONDS = 0.5

    def __init__(self) -> None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.lines = {f"cpu{c}" for c in cpus}
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last: tuple[float, float, float] | None = None
        self.value = 0.0

    def busy_seconds(self) -> float | None:
        """CPU seconds the CPU set has spent busy since boot (user, nice, system, irq, softirq)."""
        if not self.lines:
            return None
        try:
            with open("/proc/stat") as f:
                total = 0
                for line in f:
                    if not line.startswith("cpu"):
                        break
                    head = line.split()
                    if head[0] in self.lines:
                        total += sum(int(v) for v in head[1:4]) + sum(int(v) for v in head[6:8])
            return total / self.tick
        except (OSError, ValueError, IndexError):
            return None

    def __call__(self) -> float:
        now = monotonic()
        if self.last is not None and now - self.last[0] < self.CHECK_SECONDS:
            return self.value
        busy = self.busy_seconds()
        if busy is None:
            return 0.0
        times = os.times()
        own = times.user + times.system  # all of this process's threads; its children count as others
        if self.last is not None:
            t0, busy0, own0 = self.last
            self.value = max(0.0, ((busy - busy0) - (own - own0)) / (now - t0))
        self.last = (now, busy, own)
        return self.value


class ThreadGuard:
    """Picks, per forward pass, how many of `threads` numba's kernels use.

    numba's worker threads spin between kernels and meet at a barrier after each one. Where other
    processes keep cores of this CPU set busy (another purelm decoding, say), a spinning worker and
    that process take turns on a core and both crawl (two purelm decodes side by side on 2 cores:
    benchmarks/README.md, "Other processes on the same cores"). So a pass uses only the cores the others leave free (`others`: their load, OtherLoad); such decode steps
    are not timed.

    Otherwise whole decode steps (one token, embed to logits) are timed, all threads or the calling
    thread alone: now and then a step runs the other way (a probe); the other way takes over when its
    probe beats the usual way's running time by 10%. While probes keep losing they come less often. A
    single slow step moves the running time at most 2x, so a hiccup cannot flip it."""

    ALPHA = 0.3
    MARGIN = 0.9
    PROBE_MIN, PROBE_MAX = 16, 128  # decode steps between probes

    def __init__(self, threads: int, others: Callable[[], float] | None = None, cores: int | None = None) -> None:
        self.threads = threads
        if others is None:  # $PURELM_WATCH_LOAD=0: every thread, whatever else runs
            others = OtherLoad() if os.environ.get("PURELM_WATCH_LOAD", "1").strip() != "0" else (lambda: 0.0)
        self.others = others
        self.cores = cores or usable_cores()
        self.mode = threads  # the usual way
        self.step_time: dict[int, float] = {}  # thread count -> seconds per decode step
        self.steps = 0
        self.next_probe = self.PROBE_MIN
        self.interval = self.PROBE_MIN
        self.current = threads
        self.started: float | None = None

    def other(self) -> int:
        return 1 if self.mode == self.threads else self.threads

    def begin(self, n_tokens: int) -> int:
        """A forward pass starts; returns the thread count for its kernels."""
        self.started = None
        if self.threads == 1:
            self.current = 1
            return 1
        crowd = self.others() - max(0, self.cores - self.threads)  # beyond the cores these threads leave
        free = max(1, self.threads - int(max(0.0, crowd) + 0.5))
        if free < self.threads or n_tokens != 1:  # others hold cores these threads need, or a prompt's
            self.current = free  # pass (never timed): the cores left
            return free
        self.steps += 1
        self.current = self.other() if self.steps >= self.next_probe else self.mode
        self.started = perf_counter()
        return self.current

    def cancel(self) -> None:
        """The pass that `begin` announced ended in an exception: its time says nothing."""
        self.started = None

    def end(self) -> None:
        """The pass that `begin` announced has its logits."""
        if self.started is None:
            return
        seconds = perf_counter() - self.started
        self.started = None
        if self.current == self.mode:
            old = self.step_time.get(self.mode)
            self.step_time[self.mode] = seconds if old is None else old + self.ALPHA * (min(seconds, 2 * old) - old)
            return
        # a probe: its time is the freshest word on the other way
        self.step_time[self.current] = seconds
        usual = self.step_time.get(self.mode)
        if usual is not None and seconds < self.MARGIN * usual:
            self.mode, self.interval = self.current, self.PROBE_MIN  # switch, and keep checking often
        else:
            self.interval = min(2 * self.interval, self.PROBE_MAX)
        self.next_probe = self.steps + self.interval


class NumbaBackend(Backend):
    name = "numba"
    short_run = MATVEC_MAX_TOKENS

    def __init__(self, threads: int | None = None, repack: bool = True, int16_dot: bool | None = None,
                 int8_dot: bool | None = None) -> None:
        self.threads = max(1, min(int(threads or os.cpu_count() or 1), numba.config.NUMBA_NUM_THREADS))
        self.repack = repack
        # Decode products of the repacked quantized types with int16 activations and integer dot products where
        # they are faster (x86 with AVX2). None: $PURELM_INT16_DOT ("0": float32 kernels), else yes.
        if int16_dot is None:
            int16_dot = os.environ.get("PURELM_INT16_DOT", "1").strip().lower() not in ("0", "no", "off", "false")
        self.int16_dot = bool(int16_dot) and has_int16_dot()
        # Optionally, int8 activations where the CPU has int8 kernels (int8_families; twice the
        # multiply-adds per instruction; llama.cpp's rounding). None: $PURELM_INT8_DOT ("1": yes), else no.
        if int8_dot is None:
            int8_dot = os.environ.get("PURELM_INT8_DOT", "0").strip().lower() in ("1", "yes", "on", "true")
        self.int8_dot = bool(int8_dot) and self.int16_dot and has_int8_dot()
        # Types repacked at load: the dot-only ones (Q2_K, Q3_K, IQ4_*) only for the int16 kernels
        self.packed_types = PACKED_TYPES | DOT_ONLY_TYPES if self.int16_dot else PACKED_TYPES
        self._pool: ThreadPoolExecutor | None = None
        self._blas: Any = None
        self._rope_tables: dict[Rope, tuple[np.ndarray, np.ndarray]] = {}
        self._by_id: dict[int, tuple[Any, Any]] = {}  # id(rope or spec) -> (it, what it gives)
        self._lock = threading.Lock()
        self._scratch = threading.local()
        self._arena = Arena()
        self._pack_cache: PackCache | None | bool = False  # False: not opened yet (pack_cache.py)
        self._guard = ThreadGuard(self.threads)
        self._groups: tuple[dict, dict] = ({}, {})  # (the layouts they are for, row count -> groups)
        # numba's thread count before the pass in progress (per calling thread; put back at its end)
        self._outer_threads: int | None = None
        self._numba_threads = numba.get_num_threads()
        self._prepared: set[GGMLType] | None = None
        self._pending: dict[str, _CompileWorker] = {}  # warm-up steps a worker process still compiles
        self._compile_lock = threading.Lock()
        self._compilers: list[_CompileWorker] = []  # worker processes this backend started
        self._interim: Interim | None = None  # a first start's numpy ops while workers compile (interim.py)
        self._interim_steps: list[tuple[str, Callable[[], None]]] = []  # the decode steps it waits for
        self._interim_until = 0.0  # (monotonic seconds) when it stops waiting for the workers alone

    # -- weights

    def prepare(self, types: set[GGMLType], lookups: set[GGMLType] = frozenset(), n_weights: int = 0) -> None:
        """Load (or compile) every kernel a model with tensors of `types` calls, by running each op
        once on tiny inputs through the same methods a forward pass uses (row lookups for the types of
        `lookups`, the embeddings' only), then hand LLVM's pages back
        to the OS: ~65 MB of the compiler that inference does not touch again. Done before the weights
        are repacked, so those pages and the model are never resident together (peak RSS).

        On a first start (steps not yet in numba's cache, see _WarmNotes) the steps are compiled in
        worker processes (compile_worker: numba compiles in one thread per process), which fill the
        on-disk cache that this process then loads from. By default this process compiles nothing
        meanwhile: its ops run as the numpy backend's (interim.py) until the workers have every step
        decode needs, and it switches to the kernels between two passes (`_leave_interim`). For a
        model of more than INTERIM_MAX_WEIGHTS weights (`n_weights`; 0: unknown), or with
        $PURELM_COMPILE_WAIT=1, it takes a share of the decode steps itself and waits for the rest
        before returning. Either way the prompt-only steps (batch products, prefill attention) go on
        in the background and are waited for where first used (`_ready`)."""
        if self._prepared is not None and types <= self._prepared:
            return
        self._prepared = (self._prepared or set()) | set(types)
        guard, self._guard = self._guard, ThreadGuard(self.threads)  # warm-up steps are not decode steps
        outer = numba.get_num_threads()
        try:
            steps = self._warm_steps(types, lookups)
            notes = _WarmNotes(self)
            missing = [s for s in steps if not notes.done(s[0])]
            fresh = [s for s in missing if s[0] not in self._pending]
            critical = [(name, step) for name, needed, step in steps if needed]
            if self._interim is not None:  # another model meanwhile: its steps join (loaded at the switch)
                if fresh:
                    self._compile_apart(fresh, here=False)  # (no workers: compiled here at the switch)
                known = {name for name, _ in self._interim_steps}
                self._begin_interim(notes, self._interim_steps + [s for s in critical if s[0] not in known])
                return
            small = 0 < n_weights <= INTERIM_MAX_WEIGHTS
            if fresh and small and any(s[1] for s in fresh) and _answer_while_compiling():
                if self._compile_apart(fresh, here=False) is not None:
                    self._begin_interim(notes, critical)
                    return
            mine = self._compile_apart(missing) if missing else None
            if mine is not None:  # compile this process's share first, then wait for the workers' decode steps
                for name, _, step in _compile_progress(iter(mine), len(mine)):
                    notes.run(name, step, load=True)
                for name, critical, _ in steps:
                    if critical:
                        self._ready(name)
            todo = [s for s in steps if s[0] not in self._pending]
            for name, _, step in _compile_progress(iter(todo), len(todo)):
                notes.run(name, step, load=True)
        finally:
            self._guard = guard
            self._enter(outer)  # the caller's thread count, as it was
        page_out_library("llvmlite")

    def _compile_apart(self, missing: list[tuple[str, bool, Callable[[], None]]], here: bool = True
                       ) -> list[tuple[str, bool, Callable[[], None]]] | None:
        """Start worker processes on a share of the `missing` steps: the decode steps split between
        them and this process (`here`; else between the workers alone) so that all finish soonest
        (_share_out; this process's share is returned), the prompt-only steps all to the workers,
        after their decode steps. None (and no workers) where there is one core or
        $PURELM_COMPILE_WORKERS is 0."""
        n_workers = _compile_workers(len(missing))
        if n_workers == 0:
            return None
        critical = [s for s in missing if s[1]]
        names = [s[0] for s in critical]
        shares = _share_out(names, n_workers) if here else [[]] + _share_out(names, n_workers - 1)
        by_name = {s[0]: s for s in missing}
        shares = [[by_name[n] for n in share] for share in shares]
        # prompt-only: workers, after their decode steps; the types' last first (a prompt needs the first
        # type's first, and this process takes a step the worker has not started: `_ready`), then
        # prefill attention (prompts over MATVEC_MAX_TOKENS tokens)
        later = [s for s in missing if not s[1]]
        for step in sorted(later, key=lambda s: (s[0].startswith("attention"), -later.index(s))):
            i = min(range(1, n_workers + 1), key=lambda i: _share_cost([s[0] for s in shares[i]] + [step[0]], True))
            shares[i].append(step)
        types = sorted({int(t) for t in self._prepared or ()})
        for share in shares[1:]:
            if share:
                try:
                    worker = _CompileWorker(self, types, [name for name, _, _ in share])
                except OSError:  # no interpreter to start (an embedded Python): its steps compile here
                    continue
                self._compilers.append(worker)
                for name, _, _ in share:
                    self._pending[name] = worker
        return shares[0]

    def _ready(self, name: str) -> None:
        """Wait until warm-up step `name`, compiled by a worker process, is in numba's cache (its
        kernels then load from there instead of compiling here too)."""
        with self._compile_lock:  # one reader of a worker's pipe at a time
            worker = self._pending.get(name)
            if worker is not None:
                worker.wait_for(name, self._pending)

    def _compiled(self, name: str) -> bool:
        """Whether warm-up step `name` is done (in numba's cache, or never left to a worker), without
        waiting for it."""
        with self._compile_lock:
            worker = self._pending.get(name)
            if worker is None:
                return True
            worker._read(block=False)
            if name not in worker.done:
                return False
            del self._pending[name]
            return True

    def _begin_interim(self, notes: _WarmNotes, steps: list[tuple[str, Callable[[], None]]]) -> None:
        """Run the ops as the numpy backend's until the workers have compiled `steps` (interim.py):
        the ops that call kernels are shadowed on this instance, so the kernels' own path pays
        nothing for it afterwards."""
        if self._interim is None:
            self._interim = Interim(self)
            for name in INTERIM_OPS:
                setattr(self, name, getattr(self._interim, name))
            if sys.stderr.isatty():
                print("purelm: compiling kernels for this CPU in the background (once); slower until then",
                      file=sys.stderr, flush=True)
            self._interim_until = monotonic() + INTERIM_SECONDS
        self._interim_notes = notes
        self._interim_steps = steps

    def _leave_interim(self) -> None:
        """Back to the kernels where the workers have compiled every decode step, loading them from
        numba's cache (a second or two); a step whose worker exited without it compiles here. Else
        nothing (the next pass asks again), until INTERIM_SECONDS have passed: then this process
        waits for the steps the workers are on and compiles those they have not started, as a start
        with $PURELM_COMPILE_WAIT=1 does (the interim's slow tokens would otherwise hold a core
        that the compiles need, and a long first generation would end later)."""
        with self._compile_lock:
            for name, _ in self._interim_steps:
                worker = self._pending.get(name)
                if (worker is not None and worker._read(block=False) and name not in worker.done
                        and monotonic() < self._interim_until):
                    return
        for name in INTERIM_OPS:
            self.__dict__.pop(name, None)
        self._interim = None
        self._guard = ThreadGuard(self.threads)  # (what it timed so far was the numpy ops)
        outer = numba.get_num_threads()
        try:
            # last first: a worker goes through its steps in order, so this process takes the ones it
            # has not started while it finishes its current one (in order, each next step would be
            # the one the worker just started, and waited for)
            for name, step in reversed(self._interim_steps):
                self._ready(name)
                self._interim_notes.run(name, step, load=True)
        finally:
            self._guard = ThreadGuard(self.threads)  # warm-up steps are not decode steps
            self._enter(outer)
        page_out_library("llvmlite")

    def finish_compiling(self) -> None:
        """Wait for the worker processes of a first start to finish all their steps, including any
        this process took over (`purelm warmup`: every kernel cached, every step noted)."""
        with self._compile_lock:
            for worker in set(self._pending.values()) | set(self._compilers):
                while worker._read(block=True):
                    pass
                worker.proc.wait()
            self._pending.clear()
        if self._interim is not None:
            self._leave_interim()

    def _warm_steps(self, types: set[GGMLType], lookups: set[GGMLType] = frozenset()
                    ) -> list[tuple[str, bool, Callable[[], None]]]:
        """The warm-up as named steps (name, whether decode needs it, run): per type its decode
        products, and its products of 2+ tokens; row lookups of the types of `lookups`; norms and
        activations; rope; attention of decode tokens, and of prompts. compile_worker runs the same
        steps by name."""
        rng = np.random.default_rng(0)
        n_in, n_many = 256, MATVEC_MAX_TOKENS + 1  # one K-quant block per row; tokens: decode and prefill
        x = rng.standard_normal((n_many, n_in)).astype(np.float32)
        ones = np.ones(n_in, np.float32)
        steps: list[tuple[str, bool, Callable[[], None]]] = []

        def file_rows(qtype: GGMLType) -> np.ndarray:
            block, size = BLOCK_INFO[qtype]
            rows = np.zeros((2 * DEFAULT_LANES, n_in // block * size), np.uint8)
            rows.flags.writeable = False  # as the file's mmap'd rows are (numba types them apart)
            return rows

        def lookup(qtype: GGMLType) -> Callable[[], None]:  # a kernel per type (rk.dequant_rows)
            return lambda: self.embed(NumbaWeight(qtype, 1, n_in, file_rows(qtype)[:1]), np.zeros(1))

        def products(qtype: GGMLType, token_counts: tuple[int, ...]) -> Callable[[], None]:
            def run() -> None:
                rows = file_rows(qtype)
                merged = NumbaWeight(qtype, rows.shape[0], n_in, None, None, (DEFAULT_LANES, DEFAULT_LANES),
                                     self.threads)
                if self.repack and qtype in self.packed_types:
                    merged.set_packed(pack(qtype, rows, n_in, dot=self.int16_dot), self.threads, self.int8_dot)
                else:
                    merged.data = rows
                for n_tok in token_counts:
                    for split in {1, merged.column_splits, 2}:
                        merged.column_splits = split
                        gate, up = self.linear_many(x[:n_tok], merged)
                        self.swiglu(gate, up), self.geglu(gate, up)
                        self.glu(x[:n_tok], merged, "silu"), self.glu(x[:n_tok], merged, "gelu")
                self.to_numpy(x)
            return run

        for qtype in sorted(types):
            if qtype in rk.ROW_TYPES or (self.repack and qtype in self.packed_types):
                steps.append((f"{qtype.name}-decode", True, products(qtype, (1,))))
                steps.append((f"{qtype.name}-batch", False, products(qtype, (2, n_many))))
        steps += [(f"{q.name}-lookup", True, lookup(q)) for q in sorted(lookups) if q in rk.ROW_TYPES]

        def norms() -> None:
            for n_tok in (1, n_many):
                xt = x[:n_tok]
                self.rms_norm(xt, ones, 1e-5), self.layer_norm(xt, ones, ones, 1e-5)
                self.layer_norm(xt, None, None, 1e-5)
                self.silu(xt), self.gelu(xt), self.gelu_erf(xt), self.swiglu(xt, xt), self.geglu(xt, xt)
                self.rotate(xt, 64)

        def rope() -> None:
            for neox in (False, True):
                r = Rope(n_dims=32, base=10000.0, neox=neox)
                for n_tok in (1, n_many):
                    self.rope(x[:n_tok].reshape(n_tok, 4, 64), np.arange(n_tok), r)
                    self.rope(x[:n_tok].reshape(n_tok, 4, 64), -np.ones(n_tok, np.int64), r)

        spec = AttentionSpec(scale=0.125, alibi_slopes=np.ones(4, np.float32))

        def attention(n_tok: int) -> Callable[[], None]:
            def run() -> None:  # a prompt (matrix products), or decode: the paged kernel over 1 and 2 chunks
                cache = self.kv_cache(1, 2 * ATTENTION_CHUNK, 1, 64, 64)
                q = x[:n_tok].reshape(n_tok, 4, 64)
                self.attention(q, q[:, :1], q[:, :1], cache, 0, spec)
                if n_tok > 1:  # heads the tiled prompt kernel does not take (ops.prompt_tiles_fit): BLAS
                    q8 = x[:n_tok, :32].reshape(n_tok, 4, 8)
                    self.attention(q8, q8[:, :1], q8[:, :1], self.kv_cache(1, 2 * ATTENTION_CHUNK, 1, 8, 8), 0, spec)
                if n_tok == 1:
                    cache.commit(1)
                    cache.n_past = 2 * ATTENTION_CHUNK - 1
                    q1, kv1 = x[:1].reshape(1, 4, 64), x[:1, :64].reshape(1, 1, 64)
                    self.attention(q1, kv1, kv1, cache, 0, spec)
            return run

        steps += [("norms", True, norms), ("rope", True, rope), ("attention-decode", True, attention(1)),
                  ("attention-prompt", False, attention(n_many))]
        return steps

    def weight(self, t: Tensor) -> NumbaWeight:
        n_in = t.shape[-1]
        n_out = t.n_elements // n_in  # leading dims flattened into rows
        data = t.data.reshape(n_out, -1)
        w = NumbaWeight(t.type, n_out, n_in, data)
        w.tensors = [dataclasses.replace(t, shape=(n_out, n_in), data=data)]
        # Repacked on first use in `linear`: a token embedding that is only looked up row by row (an
        # untied model's) never gets a copy.
        w.pack_later = self.repack and t.type in self.packed_types
        w.source = [dataclasses.replace(t, data=data)] if w.pack_later else None
        return w

    def _pack(self, w: NumbaWeight) -> None:
        with self._lock:
            if w.pack_later:
                p = w.stack.fill(w.index, self._packed) if isinstance(w, ExpertWeight) else self._packed(w.source)
                w.set_packed(p, self.threads, self.int8_dot)
                w.pack_later, w.source = False, None

    def _packed(self, ts: list[Tensor]) -> Packed:
        """The repacked matrix of `ts` (rows concatenated): from the on-disk cache where it holds
        them, else repacked (and stored there). The file's pages are handed back as they are copied."""
        if self._pack_cache is False:
            self._pack_cache = PackCache.open(DEFAULT_LANES, self.int16_dot)
        cache, qtype, n_in = self._pack_cache, ts[0].type, ts[0].shape[-1]
        packed = cache.load(qtype, ts, n_in) if cache else None
        data = [t.data for t in ts]
        if packed is None:
            packed = pack(qtype, data if len(data) > 1 else data[0], n_in, alloc=self._arena,
                          release=release_file_pages, dot=self.int16_dot)
            if cache:
                cache.store(qtype, ts, n_in, packed)
        for d in data:  # the pages that straddled two chunks, or that reads of nearby tensors mapped
            release_file_pages(d)
        return packed

    def weights(self, ts: list[Tensor]) -> Any:
        same = len({(t.type, t.shape[-1]) for t in ts}) == 1 and all(len(t.shape) == 2 for t in ts)
        if not (self.repack and same and ts[0].type in self.packed_types):
            return [self.weight(t) for t in ts]
        packed = self._packed(ts)
        w = NumbaWeight(ts[0].type, packed.n_out, ts[0].shape[1], None, packed, tuple(t.shape[0] for t in ts),
                        self.threads, self.int8_dot)
        w.tensors = list(ts)
        return w

    def experts(self, gate: Tensor, up: Tensor, down: Tensor) -> tuple[list[Any], list[Any]]:
        """Each 3-D tensor (gate|up as pairs) an ExpertStack: an expert is repacked into its rows
        there on its first use, so decode can multiply all picked experts in one kernel call."""
        if not (self.repack and gate.type == up.type and gate.type in self.packed_types and down.type in self.packed_types):
            return super().experts(gate, up, down)
        out = []
        for ts in ([list(p) for p in zip(expert_tensors(gate), expert_tensors(up))], [[d] for d in expert_tensors(down)]):
            stack = ExpertStack(ts)
            ws = []
            for e, parts in enumerate(ts):
                w = ExpertWeight(parts[0].type, sum(t.shape[0] for t in parts), parts[0].shape[1], None, None,
                                 tuple(t.shape[0] for t in parts) if len(parts) > 1 else None, self.threads)
                w.pack_later, w.source, w.stack, w.index = True, parts, stack, e
                w.tensors = list(parts)
                ws.append(w)
            out.append(ws)
        return out[0], out[1]

    def route(self, logits: np.ndarray, n_used: int, gating: str, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
        logits = np.ascontiguousarray(logits, np.float32)
        check_route(logits, n_used, gating)
        top = np.empty((logits.shape[0], n_used), np.int64)
        w = np.empty((logits.shape[0], n_used), np.float32)
        route_rows(logits, n_used, gating == "sigmoid", normalize, np.float32(MIN_EXPERT_SUM), top, w)
        return top, w

    def expert_ffn(self, x: Any, gate_up: list[Any], down: list[Any], picks: np.ndarray, weights: np.ndarray,
                   act: str) -> Any:
        g0, d0 = gate_up[picks[0]], down[picks[0]]
        if not (type(g0) is ExpertWeight and type(d0) is ExpertWeight) or x.shape[0] != 1:
            return super().expert_ffn(x, gate_up, down, picks, weights, act)
        sg, sd = g0.stack, d0.stack
        picks = np.ascontiguousarray(picks, np.int64)
        groups, groups_d = expert_groups(picks, sg.filled, sg.groups, sd.filled, sd.groups)
        if not len(groups):  # first uses: repack these experts into the stacks
            for ws in (gate_up, down):
                for e in picks:
                    if ws[e].pack_later:
                        self._pack(ws[e])
            groups, groups_d = sg.group_ids(picks), sd.group_ids(picks)
        if not (_fusable(g0) and _fusable(d0)):
            return super().expert_ffn(x, gate_up, down, picks, weights, act)
        # one kernel call for all picked experts' gate|up rows, one for their down rows (see experts.py)
        self._kernel_threads()
        x2 = np.ascontiguousarray(x, np.float32).reshape(1, -1)
        n2, dim, k = g0.n_out, d0.n_out, len(picks)
        width_g, width_d = sg.groups * sg.big.lanes, sd.groups * sd.big.lanes
        y = self._scratch_floats("experts_gate_up", sg.n_expert * width_g)  # only picked rows written
        FUSED[g0.kernel][0](*sg.big.kernel_args, x2, y.reshape(1, -1), groups, NO_PARTS)
        h = np.empty((k, n2 // 2), np.float32)
        glu_picked(y, picks, width_g, n2 // 2, act == "silu", h)
        yd = self._scratch_floats("experts_down", k * sd.n_expert * width_d).reshape(k, -1)
        FUSED[d0.kernel][1](*sd.big.kernel_args, h, yd, groups_d, sd.rows_of(k), NO_PARTS)
        out = np.empty((1, dim), np.float32)
        mix_picked(yd, picks, width_d, np.ascontiguousarray(weights, np.float32), out)
        return out

    def expert_weights(self, ts: list[Tensor]) -> Any:
        """As `weights`, but a pair is repacked on its first product: an expert no token picks is
        never read from the file (the pair's rows stay views of the mmap until then)."""
        same = len({(t.type, t.shape[-1]) for t in ts}) == 1
        if len(ts) == 1 or not (self.repack and same and ts[0].type in self.packed_types):
            return self.weight(ts[0]) if len(ts) == 1 else [self.weight(t) for t in ts]
        w = NumbaWeight(ts[0].type, sum(t.shape[0] for t in ts), ts[0].shape[1], None, None,
                        tuple(t.shape[0] for t in ts), self.threads)
        w.pack_later, w.source = True, list(ts)
        w.tensors = list(ts)
        return w

    # -- threads

    def begin_pass(self, segments: list[int], head_segments: list[int]) -> None:
        if self._interim is not None:
            self._leave_interim()
        super().begin_pass(segments, head_segments)
        self._outer_threads = self._numba_threads = numba.get_num_threads()
        self._enter(self._guard.begin(sum(segments)))

    def end_pass(self, failed: bool = False) -> None:
        if failed:
            self._guard.cancel()
        else:
            self._guard.end()
        super().end_pass(failed)
        if self._outer_threads is not None:
            self._enter(self._outer_threads)
            self._outer_threads = None

    def _enter(self, threads: int) -> None:
        """Set numba's thread count for the calling thread (the one running the model)."""
        if threads != self._numba_threads:
            numba.set_num_threads(threads)
            self._numba_threads = threads

    def _kernel_threads(self) -> None:
        """Outside a pass (ops called directly), kernels use this backend's threads too."""
        if self._outer_threads is None:
            self._numba_threads = numba.get_num_threads()
            self._enter(self.threads)

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="purelm-numba")
        return self._pool

    def _single_threaded_blas(self) -> Any:
        if self._blas is None:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
        return self._blas.limit(limits=1, user_api="blas")

    def _run_split(self, tasks: list[Callable[[], None]]) -> None:
        """Run tasks on the worker threads (the caller's thread when only one)."""
        if self.threads == 1 or len(tasks) == 1:
            for task in tasks:
                task()
            return
        for f in [self._workers().submit(task) for task in tasks]:
            f.result()

    # -- matrix products

    def linear(self, x: np.ndarray, w: NumbaWeight, bias: np.ndarray | None = None) -> np.ndarray:
        y = self._decode_product(x, w)
        if y is not None:
            return y if bias is None else y + bias
        if w.pack_later:
            self._pack(w)
        if not isinstance(x, np.ndarray):
            x = np.asarray(x, np.float32)
        if x.shape[-1:] != (w.n_in,):
            raise ValueError(f"linear: input of width {x.shape[-1:]} for a matrix of {w.n_in} columns")
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, w.n_in), np.float32)
        if w.packed is None and w.qtype not in rk.ROW_TYPES:
            y = self._matmul(x2, w)
        elif self._matvec_prefill(w):  # all rows by the integer kernels, whatever runs they belong to
            y = self._product(x2, w, x2.shape[0] <= PREFILL_ROWS)
        else:
            groups = self._row_groups(x2.shape[0])
            if len(groups) == 1:
                y = self._product(x2, w, groups[0][2])
            else:
                y = np.empty((x2.shape[0], w.n_out), np.float32)
                long = [(a, b) for a, b, short in groups if not short]
                shared = len(long) > 1 and not self._matvec_prefill(w)  # prompt chunks of several sequences
                for a, b, short in groups:
                    if short or not shared:
                        y[a:b] = self._product(x2[a:b], w, short)
                if shared:
                    self._matmul(x2, w, long, y)
        if bias is not None:
            y += bias
        return y.reshape(lead + (w.n_out,)) if len(lead) != 1 else y

    def linear_many(self, x: np.ndarray, ws: Any) -> list[np.ndarray]:
        if not isinstance(ws, NumbaWeight):
            return [self.linear(x, w) for w in ws]
        y = self.linear(x, ws)
        parts, start = [], 0
        for n in ws.splits:  # views: a copy of gate|up for a 512-token prompt would be 23 MB (1.1B)
            parts.append(y[..., start:start + n])
            start += n
        return parts

    def _row_groups(self, n_rows: int) -> list[tuple[int, int, bool]]:
        """Rows a..b-1 and whether they go to the matrix-vector kernels (short runs: decode tokens,
        prompt chunks of up to MATVEC_MAX_TOKENS; each row's result is the same whatever rows share
        the call) or to a matrix product (one per longer run, as if it were alone). Outside a pass,
        or for rows the pass did not announce, the row count decides. Worked out once per pass and
        row count (a decode step asks ~4 times per layer)."""
        layouts, known = self._groups
        if layouts is not self.layouts:
            known = {}
            self._groups = (self.layouts, known)
        groups = known.get(n_rows)
        if groups is None:
            groups = []
            for a, b in self.row_runs(n_rows):
                short = b - a <= MATVEC_MAX_TOKENS
                if short and groups and groups[-1][2]:
                    groups[-1] = (groups[-1][0], b, True)
                else:
                    groups.append((a, b, short))
            known[n_rows] = groups
        return groups

    def _product(self, x: np.ndarray, w: NumbaWeight, short: bool) -> np.ndarray:
        """x @ W.T: by the matrix-vector kernels for a short group of rows, else a matrix product."""
        if w.pack_later:
            self._pack(w)
        if short and (w.packed is not None or w.qtype in rk.ROW_TYPES):
            if self._pending and x.shape[0] > 1 and not self._compiled(f"{w.qtype.name}-batch"):
                if x.shape[0] <= MATVEC_MAX_TOKENS:  # a first start's short prompt: row by row by the decode
                    # kernel (each row's bits are the same), rather than wait for the batch kernel's compile
                    return np.concatenate([self._matvec_kernel(x[t:t + 1], w) for t in range(x.shape[0])])
                self._ready(f"{w.qtype.name}-batch")
            return self._matvec_kernel(x, w)
        if self._pending:
            self._ready(f"{w.qtype.name}-batch")
        if self._matvec_prefill(w):  # each row's result is its own: any rows, PREFILL_ROWS a call
            if x.shape[0] <= PREFILL_ROWS:
                return self._matvec_kernel(x, w)
            y = np.empty((x.shape[0], w.n_out), np.float32)
            for t0 in range(0, x.shape[0], PREFILL_ROWS):
                y[t0:t0 + PREFILL_ROWS] = self._matvec_kernel(x[t0:t0 + PREFILL_ROWS], w)
            return y
        return self._matmul(x, w)

    def _matvec_prefill(self, w: Any) -> bool:
        """Whether long runs of rows (prompts) take the integer kernels too, PREFILL_ROWS rows a call,
        rather than dequantize + float32 BLAS: vpdpwssd does 2x an FMA's multiply-adds (vpdpbusd 4x),
        and a prompt's rows are then rounded as decode tokens are."""
        return isinstance(w, NumbaWeight) and w.kernel_many in PREFILL_KERNELS

    def _matvec_kernel(self, x: np.ndarray, w: NumbaWeight) -> np.ndarray:
        """x @ W.T by the matrix-vector kernels: the weight is read once for all rows of x, and each
        row's result is the same whatever the other rows are."""
        self._kernel_threads()
        y = np.empty((x.shape[0], w.n_out), np.float32)
        if w.kernel is not None:
            n, p = w.column_splits, w.packed
            ranges = 1
            if x.shape[0] > 1 and self._matvec_prefill(w):
                # several tokens (dot kernels): token ranges where the groups alone would leave a thread
                # idle, each item adding up the column splits (no serial sum; a decode step's bits)
                ranges = token_ranges(p.n_groups, x.shape[0], self.threads)
            if ranges > 1:
                parts = _token_parts(ranges, n)
            else:
                parts = np.empty((n, x.shape[0], p.n_groups * p.lanes), np.float32) if n > 1 else NO_PARTS
            (w.kernel if x.shape[0] == 1 else w.kernel_many)(*w.kernel_args, x, y, parts)
        else:
            rk.matvec_rows(w.data, int(w.qtype), BLOCK_INFO[w.qtype][0], x, y)
        return y

    def _decode_product(self, x: Any, w: Any) -> np.ndarray | None:
        """x @ W.T for one decode token straight to the matrix-vector kernel, or None where linear's
        general path is needed (several rows, an unpacked or not yet packed weight, a first start's
        pending compiles, x not one contiguous float32 row). The same kernel as that path, with ~10
        fewer Python calls: a decode step makes ~4 products a layer (benchmarks/README.md)."""
        if (type(x) is not np.ndarray or type(w) is not NumbaWeight or w.kernel is None or w.pack_later
                or self._pending or x.shape != (1, w.n_in) or x.dtype != np.float32 or not x.flags.c_contiguous):
            return None
        return self._matvec_kernel(x, w)

    def _matmul(self, x: np.ndarray, w: NumbaWeight, runs: list[tuple[int, int]] | None = None,
                y: np.ndarray | None = None) -> np.ndarray:
        """x @ W.T, W dequantized a tile at a time, tiles spread over the worker threads. `runs`: rows
        a..b-1 of x that each get their own product with each tile, as if alone (the tiles do not
        depend on x), into those rows of `y`: prompt chunks of several sequences in one pass
        dequantize the weights once, not once a sequence."""
        n_tok = x.shape[0]
        runs = runs or [(0, n_tok)]
        y = np.empty((n_tok, w.n_out), np.float32) if y is None else y
        p = w.packed
        if p is not None:
            unit, n_units = p.lanes, p.n_groups
            fill = self._packed_filler(p)
        elif w.qtype == GGMLType.F32:
            unit, n_units = 1, w.n_out
            weights = w.data.view(np.float32)

            def fill(u0: int, u1: int) -> np.ndarray:
                return weights[u0:u1].T
        elif w.qtype in rk.ROW_TYPES:
            unit, n_units = 1, w.n_out
            qtype, block = int(w.qtype), BLOCK_INFO[w.qtype][0]

            def fill(u0: int, u1: int) -> np.ndarray:
                out = self._tile(u1 - u0, w.n_in)
                rk.dequant_range(w.data, qtype, block, u0, out)
                return out.T
        else:  # types without kernels: purelm.quant decodes, correct but slow
            unit, n_units = 1, w.n_out

            def fill(u0: int, u1: int) -> np.ndarray:
                return dequantize(w.data[u0:u1], w.qtype, (u1 - u0, w.n_in)).T

        def task(u0: int, u1: int) -> Callable[[], None]:
            def run() -> None:
                wt = fill(u0, u1)
                r0, r1 = u0 * unit, min(u1 * unit, w.n_out)
                for a, b in runs:
                    np.matmul(x[a:b], wt[:, : r1 - r0], out=y[a:b, r0:r1])
            return run

        tasks = [task(u0, u1) for u0, u1 in self._tile_ranges(n_units, unit, w.n_in)]
        with self._single_threaded_blas():
            self._run_split(tasks)
        return y

    def _tile_ranges(self, n_units: int, unit: int, n_in: int) -> list[tuple[int, int]]:
        """Unit ranges of about TILE_FLOATS weights each, in whole rounds of the thread count (so no
        thread idles at the end)."""
        per_tile = max(1, TILE_FLOATS // (n_in * unit))
        n_tiles = -(-n_units // per_tile)
        n_tiles = -(-n_tiles // self.threads) * self.threads
        per_tile = -(-n_units // n_tiles)
        return [(u0, min(u0 + per_tile, n_units)) for u0 in range(0, n_units, per_tile)]

    def glu(self, x: np.ndarray, ws: Any, act: str) -> np.ndarray:
        splits = getattr(ws, "splits", None)
        if splits is not None and len(splits) == 2 and splits[0] == splits[1]:  # gate|up side by side
            y = self._decode_product(x, ws)
            if y is not None:  # as _glu_rows does it
                n = splits[0]
                out, flat = np.empty((1, n), np.float32), y.reshape(-1)
                (ops.swiglu if act == "silu" else ops.geglu)(flat, 2 * n, flat[n:], 2 * n, out)
                return out
        if isinstance(ws, NumbaWeight) and ws.pack_later:  # an expert's pair, on its first use
            self._pack(ws)
        x2 = np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
        groups = self._row_groups(x2.shape[0])  # as in linear: short runs by the matrix-vector kernels
        if self._pending and isinstance(ws, NumbaWeight) and x2.shape[0] > MATVEC_MAX_TOKENS:
            self._ready(f"{ws.qtype.name}-batch")  # (short runs: _product sees to it)
        long = [(a, b) for a, b, short in groups if not short]
        if self._matvec_prefill(ws):  # all rows by the integer kernels, whatever runs they belong to (as in linear)
            out = self._glu_rows(x2, ws, act, x2.shape[0] <= PREFILL_ROWS)
        elif len(long) > 1 and self._glu_tiles(ws):  # prompt chunks of several sequences: tiles shared
            out = np.empty((x2.shape[0], ws.splits[0]), np.float32)
            for a, b, short in groups:
                if short:
                    out[a:b] = self._glu_rows(x2[a:b], ws, act, short)
            self._glu_tiled(x2, ws, act, long, out)
        else:
            parts = [self._glu_rows(x2[a:b], ws, act, short) for a, b, short in groups]
            out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out.reshape(x.shape[:-1] + (out.shape[-1],))

    def _glu_tiles(self, ws: Any) -> bool:
        """Whether a prompt's gate|up product goes a tile of rows at a time (_glu_tiled): packed halves
        in whole groups of rows, and no prefill by the integer kernels (_matvec_prefill)."""
        p = ws.packed if isinstance(ws, NumbaWeight) else None
        return (p is not None and len(ws.splits) == 2 and ws.splits[0] == ws.splits[1]
                and not ws.splits[0] % p.lanes and not self._matvec_prefill(ws))

    def _glu_rows(self, x2: np.ndarray, ws: Any, act: str, short: bool) -> np.ndarray:
        if not short and self._matvec_prefill(ws) and x2.shape[0] > PREFILL_ROWS:  # PREFILL_ROWS at a time
            return np.concatenate([self._glu_rows(x2[t0:t0 + PREFILL_ROWS], ws, act, short)
                                   for t0 in range(0, x2.shape[0], PREFILL_ROWS)])
        if short or not self._glu_tiles(ws):  # decode, or halves not in whole groups of rows
            if isinstance(ws, NumbaWeight):
                y, n = self._product(x2, ws, short), ws.splits[0]
                if y.shape[1] == 2 * n:  # gate|up side by side in each row of y: straight to the kernel
                    out, flat = np.empty((y.shape[0], n), np.float32), y.reshape(-1)
                    (ops.swiglu if act == "silu" else ops.geglu)(flat, 2 * n, flat[n:], 2 * n, out)
                    return out
                gate, up = y[:, :n], y[:, n:]
            else:
                gate, up = (self._product(x2, w, short) for w in ws)
            return self.swiglu(gate, up) if act == "silu" else self.geglu(gate, up)
        out = np.empty((x2.shape[0], ws.splits[0]), np.float32)
        return self._glu_tiled(x2, ws, act, [(0, x2.shape[0])], out)

    def _glu_tiled(self, x2: np.ndarray, ws: NumbaWeight, act: str, runs: list[tuple[int, int]],
                   out: np.ndarray) -> np.ndarray:
        """Prefill: per tile of gate rows, the same rows of up, then act(gate) * up straight into the
        output: no (tokens, 2 * ffn) product (23 MB for a 512-token prompt on a 1.1B model). Each run
        of rows a..b-1 is multiplied as if alone, with the tiles dequantized once for all of them."""
        p = ws.packed
        kernel = ops.swiglu if act == "silu" else ops.geglu
        n, lanes = ws.splits[0], p.lanes
        half = n // lanes  # groups of gate rows; up's start right after
        fill = self._packed_filler(p)

        total = sum(b - a for a, b in runs)

        def task(g0: int, g1: int) -> Callable[[], None]:
            def run() -> None:
                rows = (g1 - g0) * lanes
                buf = self._scratch_floats("products", 2 * total * rows)
                gate, up = buf[: total * rows].reshape(total, rows), buf[total * rows:].reshape(total, rows)
                for half_at, products in ((g0, gate), (half + g0, up)):  # (one tile buffer: gate's, then up's)
                    tile, at = fill(half_at, half_at + g1 - g0), 0
                    for a, b in runs:
                        np.matmul(x2[a:b], tile, out=products[at:at + b - a])
                        at += b - a
                kernel(gate.reshape(-1), rows, up.reshape(-1), rows, gate)  # in place, in cache; then one copy into the output's columns
                at = 0
                for a, b in runs:
                    out[a:b, g0 * lanes:g1 * lanes] = gate[at:at + b - a]
                    at += b - a
            return run

        tasks = [task(g0, g1) for g0, g1 in self._tile_ranges(half, lanes, p.n_in)]
        with self._single_threaded_blas():
            self._run_split(tasks)
        return out

    def _scratch_floats(self, name: str, size: int) -> np.ndarray:
        """This thread's float32 scratch buffer `name`, at least `size` long: reused from call to
        call, so no page faults per tile."""
        buf = getattr(self._scratch, name, None)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, TILE_FLOATS), np.float32)
            setattr(self._scratch, name, buf)
        return buf[:size]

    def _tile(self, rows: int, cols: int) -> np.ndarray:
        """This thread's scratch for a dequantized tile."""
        return self._scratch_floats("tile", rows * cols).reshape(rows, cols)

    def _packed_filler(self, p: Packed) -> Callable[[int, int], np.ndarray]:
        unpack, args = UNPACK[p.family], p.kernel_args

        def fill(g0: int, g1: int) -> np.ndarray:
            out = self._tile(p.n_in, (g1 - g0) * p.lanes)
            unpack(*args, g0, g1, out)
            return out
        return fill

    def embed(self, w: NumbaWeight, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= w.n_out):
            raise ShapeError(f"embed: token id out of range [0, {w.n_out})")
        if w.data is None:
            raise ValueError("a merged matrix has no rows to look up")
        if w.qtype not in rk.ROW_TYPES:
            out = dequantize_rows(w.data, w.qtype, w.n_in, ids)
        else:
            out = np.empty((ids.size, w.n_in), np.float32)
            rk.dequant_rows(int(w.qtype))(w.data, BLOCK_INFO[w.qtype][0], ids, out)
        # A lookup maps the file's pages around each row too (the kernel's fault-around: 64 KiB), so a
        # prompt of scattered ids would keep megabytes of the table resident; the page cache keeps
        # them, a later lookup maps them again (measured: a 512-token prompt, 1.1B: ~20 MiB less RSS).
        release_file_pages(w.data)
        return out

    # -- the rest

    def lora_weights(self, a: Tensor, b: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Aᵀ (in, rank) and Bᵀ (rank, out) for ops.lora_rows: f16 halves as their bits (decode reads
        an adapter's every byte each token, as it reads the model's), others in float32."""
        def transposed(t: Tensor) -> np.ndarray:
            if t.type == GGMLType.F16:
                return np.ascontiguousarray(t.data.view(np.uint16).reshape(t.shape).T)
            return np.ascontiguousarray(t.dequantize().T)

        return transposed(a), transposed(b)

    def lora(self, x: np.ndarray, y: np.ndarray, ab: tuple[np.ndarray, np.ndarray], factor: float) -> np.ndarray:
        """Runs of LORA_BLAS_ROWS rows or more (prompts) through single-threaded BLAS, the others
        (decode tokens, drafts), side by side in one call, through ops.lora_rows, a row at a time."""
        a_t, bt = ab
        x2, y2 = _rows(x), _strided_rows(y)
        if x2.shape != (y2.shape[0], a_t.shape[0]) or y2.shape[1] != bt.shape[1] or a_t.shape[1] != bt.shape[0]:
            raise ShapeError(f"lora: x {x.shape} and y {y.shape} do not fit Aᵀ {a_t.shape} and Bᵀ {bt.shape}")
        out = np.empty(y2.shape, np.float32)
        f = np.float32(factor)
        if x2.shape[0] < LORA_PARALLEL_ROWS:  # (decode: every run is short)
            ops.lora_rows(x2, a_t, bt, f, y2, out)
            return out.reshape(y.shape)
        small: list[tuple[int, int]] = []  # consecutive short runs, computed in one call
        for a, b in self.row_runs(x2.shape[0]) + [(x2.shape[0], x2.shape[0])]:
            if 0 < b - a < LORA_BLAS_ROWS:
                small = small[:-1] + [(small[-1][0], b)] if small and small[-1][1] == a else small + [(a, b)]
                continue
            for s0, s1 in small:
                kernel = ops.lora_rows_parallel if s1 - s0 >= LORA_PARALLEL_ROWS else ops.lora_rows
                kernel(x2[s0:s1], a_t, bt, f, y2[s0:s1], out[s0:s1])
            small = []
            if b > a:
                with self._single_threaded_blas():
                    t = x2[a:b] @ _float32(a_t)
                    t *= f
                    np.add(y2[a:b], t @ _float32(bt), out=out[a:b])
        return out.reshape(y.shape)

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        x2 = _rows(x)
        check_norm(x2, w, "rms_norm")
        out = np.empty_like(x2)
        ops.rms_norm(x2, w, np.float32(eps), out)
        return out.reshape(x.shape)

    def rotate(self, x: np.ndarray, n: int) -> np.ndarray:
        check_rotate(x, n)
        rows = _rows(x).reshape(-1, n)
        out = np.empty_like(rows)
        ops.hadamard_rows(rows, _inverse_root(n), out)
        return out.reshape(x.shape)

    def layer_norm(self, x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float) -> np.ndarray:
        x2 = _rows(x)
        check_norm(x2, w, "layer_norm", optional=True), check_norm(x2, b, "layer_norm", optional=True)
        out = np.empty_like(x2)
        ops.layer_norm(x2, EMPTY if w is None else w, EMPTY if b is None else b, np.float32(eps), out)
        return out.reshape(x.shape)

    def _rope_table(self, rope: Rope, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
        # by identity first: hashing the dataclass (its fields, freq_factors too) on every call of a
        # decode step showed in profiles
        seen = self._by_id.get(id(rope))
        if seen is not None and seen[0] is rope and seen[1][0].shape[0] >= n_positions:
            return seen[1]
        table = self._rope_tables.get(rope)
        if table is None or table[0].shape[0] < n_positions:
            size = max(n_positions, 2 * table[0].shape[0] if table else 0, 1024)
            table = rope.cos_sin(np.arange(size))  # same float64 math as the reference, per position
            self._rope_tables[rope] = table
        self._by_id[id(rope)] = (rope, table)
        return table

    def rope(self, x: np.ndarray, positions: np.ndarray, rope: Rope) -> np.ndarray:
        positions = np.asarray(positions, np.int64).reshape(-1)
        check_rope(x, positions, rope)
        if positions.size == 1:  # decode: skip two numpy reductions
            lo = hi = int(positions[0])
        else:
            lo, hi = (int(positions.min()), int(positions.max())) if positions.size else (0, 0)
        if lo < 0:
            return self._rope_slow(x, positions, rope)
        cos, sin = self._rope_table(rope, hi + 1)
        x3 = np.ascontiguousarray(x, np.float32)
        out = np.empty_like(x3)
        ops.rope(x3, positions, cos, sin, rope.n_dims, rope.neox, out)
        return out

    def _rope_slow(self, x: np.ndarray, positions: np.ndarray, rope: Rope) -> np.ndarray:
        cos, sin = rope.cos_sin(positions)  # rows already in the order of `positions`
        x3 = np.ascontiguousarray(x, np.float32)
        out = np.empty_like(x3)
        ops.rope(x3, np.arange(len(positions)), cos, sin, rope.n_dims, rope.neox, out)
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: PassView | KVCache, layer: int,
                  spec: AttentionSpec) -> np.ndarray:
        view = as_view(cache, q.shape[0])
        check_attention(q, k, v, view, layer, spec)
        keys, values = view.k[layer], view.v[layer]
        rounded = view.type_k != "f32" or view.type_v != "f32"
        if rounded:  # the kernels take f16 stores as their bits (numba has no float16), q8_0 as int8
            keys, values = _kernel_store(keys), _kernel_store(values)
        store = ops.store_rows_rounded if rounded else ops.store_rows
        store(np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32), keys, values,
              view.write_rows)
        q = np.ascontiguousarray(q, np.float32)
        out = np.empty((q.shape[0], q.shape[1] * view.v_dim), np.float32)
        args = self._spec_args(spec)
        if not spec.causal:  # every run (an encoder's inputs) as matrix products, nothing masked
            if self._pending:
                self._ready("attention-prompt")
            for i, run in enumerate(view.runs):
                rows = view.rows_upto[i]
                k_run, v_run = _gather(keys, rows, view.k_dim), _gather(values, rows, view.v_dim)
                if run.t1 - run.t0 <= ENCODER_TILED_TOKENS and ops.prompt_tiles_fit(view.k_dim, view.v_dim):
                    self._kernel_threads()
                    ops.attention_prompt(q[run.t0:run.t1], k_run, v_run, run.p0, *args, MAX_LANES, out[run.t0:run.t1],
                                         False)
                else:
                    self._attention_blas(q[run.t0:run.t1], k_run, v_run, run.p0, *args, out[run.t0:run.t1],
                                         causal=False)
            return out
        for i, run in enumerate(view.runs):
            if run.t1 - run.t0 > MATVEC_MAX_TOKENS:  # a prompt chunk: matrix products over its rows, gathered
                if self._pending:
                    self._ready("attention-prompt")
                rows = view.rows_upto[i]
                k_run, v_run = _gather(keys, rows, view.k_dim), _gather(values, rows, view.v_dim)
                if ops.prompt_tiles_fit(view.k_dim, view.v_dim):
                    self._kernel_threads()
                    ops.attention_prompt(q[run.t0:run.t1], k_run, v_run, run.p0, *args, MAX_LANES, out[run.t0:run.t1])
                else:
                    self._attention_blas(q[run.t0:run.t1], k_run, v_run, run.p0, *args, out[run.t0:run.t1])
        tokens, tables, pos = self._paged_tokens(view)
        if len(tokens):
            qt = q if len(tokens) == len(q) else q[tokens]
            ot = out if len(tokens) == len(q) else np.empty((len(tokens), out.shape[1]), np.float32)
            # Both kernels run their items through one compiled function (ops.paged_share), so a
            # token's bits depend neither on the kernel nor on the batch or ThreadGuard's choice; a
            # one-thread backend takes the serial one and never compiles the parallel wrapper.
            self._kernel_threads()
            if self.threads == 1:
                ops.attention_paged(qt, keys, values, tables, pos, BLOCK_SHIFT, *args, ATTENTION_CHUNK, ot)
            else:
                ops.attention_paged_parallel(qt, keys, values, tables, pos, BLOCK_SHIFT, *args, ATTENTION_CHUNK,
                                             self.threads, ot)
            if ot is not out:
                out[tokens] = ot
        return out

    def _paged_tokens(self, view: PassView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tokens of a pass that the paged kernel serves (decode tokens and short prompt runs),
        with each one's block table and position: worked out once per pass, kept on the view."""
        got = view.__dict__.get("_numba_paged")
        if got is None:
            short = [(r, t) for r, t in zip(view.runs, view.tables) if r.t1 - r.t0 <= MATVEC_MAX_TOKENS]
            tokens = np.concatenate([np.arange(r.t0, r.t1) for r, _ in short]) if short else np.zeros(0, np.int64)
            tables = np.zeros((len(tokens), max((len(t) for _, t in short), default=1)), np.int32)
            i = 0
            for r, t in short:
                tables[i:i + r.t1 - r.t0, :len(t)] = t
                i += r.t1 - r.t0
            got = view.__dict__["_numba_paged"] = (tokens, tables, view.positions[tokens])
        return got

    def _spec_args(self, spec: AttentionSpec) -> tuple[np.float32, np.float32, int, np.ndarray]:
        """The kernels' arguments for `spec`, converted once per spec object. The spec is mutable: a
        field set to another object is seen (fields are compared by identity), an array changed in
        place is not."""
        fields = (spec.scale, spec.softcap, spec.window, spec.alibi_slopes)
        seen = self._by_id.get(id(spec))
        if seen is not None and seen[0] is spec and all(a is b for a, b in zip(seen[1][0], fields)):
            return seen[1][1]
        slopes = EMPTY if spec.alibi_slopes is None else np.ascontiguousarray(spec.alibi_slopes, np.float32)
        args = (np.float32(spec.scale), np.float32(spec.softcap or 0), int(spec.window or 0), slopes)
        self._by_id[id(spec)] = (spec, (fields, args))
        return args

    def _attention_blas(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, p0: int, scale: np.float32,
                        softcap: np.float32, window: int, slopes: np.ndarray, out: np.ndarray,
                        causal: bool = True) -> None:
        """Prefill attention as matrix products: per KV head and block of queries, scores = Q K^T and
        out = P V with BLAS, the masked softmax in between in numba. Each block only reads the keys
        its queries can see (all of them where not `causal`: each query then counts as the last one,
        which sees every key). 2.3x faster than the per-query kernel at 512 tokens (measured)."""
        n_tok, n_head, dim = q.shape
        n_kv, v_dim = keys.shape[1], values.shape[2]
        group = n_head // n_kv
        block = ATTENTION_BLOCK

        def task(kv: int, t0: int, t1: int) -> Callable[[], None]:
            def run() -> None:
                k_end = p0 + (t1 if causal else n_tok)
                k0 = max(0, p0 + t0 - window + 1) if window > 0 else 0
                qb = q[t0:t1, kv * group:(kv + 1) * group].reshape(-1, dim) * scale
                scores = qb @ keys[k0:k_end, kv].T
                pos0 = p0 + t0 if causal else k_end - 1
                ops.softmax_rows(scores, pos0, group, k0, softcap, window, slopes, kv * group, MAX_LANES)
                o = scores @ values[k0:k_end, kv]
                out[t0:t1, kv * group * v_dim:(kv + 1) * group * v_dim] = o.reshape(t1 - t0, group * v_dim)
            return run

        # the last blocks see the most keys: hand them out first so the threads finish together
        tasks = [task(kv, t0, min(t0 + block, n_tok)) for t0 in reversed(range(0, n_tok, block))
                 for kv in range(n_kv)]
        with self._single_threaded_blas():
            self._run_split(tasks)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32)

    def silu(self, x: np.ndarray) -> np.ndarray:
        return _elementwise(ops.silu, x)

    def gelu(self, x: np.ndarray) -> np.ndarray:
        return _elementwise(ops.gelu, x)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return _gated(ops.swiglu, gate, up)

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return _gated(ops.geglu, gate, up)

    def gelu_erf(self, x: np.ndarray) -> np.ndarray:
        return _elementwise(ops.gelu_erf, x)


def _fusable(w: ExpertWeight) -> bool:
    """Whether an expert's stack can go through one fused kernel call: repacked by a dot kernel with
    no column splits (every expert of a stack has the same shape, type and kernel), so that the
    fused products have the per-expert kernels' bits."""
    return w.packed is not None and w.kernel in FUSED and w.column_splits == 1


# Compile times of the warm-up steps, CPU seconds measured on the project's machine (SmolLM2's and a
# Q4_K_M file's steps one after another in a fresh process, 2026-11-26): how _compile_apart shares
# them out. "shared": what the first product step in a process also compiles (rounding activations);
# "start": a worker's interpreter, imports and numba's own helpers.
STEP_COSTS = {"decode": 3.5, "batch": 4.6, "lookup": 0.9, "attention-decode": 4.5, "attention-prompt": 2.4,
              "norms": 0.7, "rope": 0.3, "shared": 1.4, "start": 1.0}
MAX_COMPILE_WORKERS = 4  # each holds numba and LLVM (~250 MB) while it runs
# Largest model (matrices' weights) a first start answers through the numpy ops while its kernels
# compile: they dequantize every weight for each token, so a larger model's first tokens would come
# later than by waiting for the kernels (benchmarks/README.md, "First start without waiting")
INTERIM_MAX_WEIGHTS = 500_000_000
INTERIM_SECONDS = 8.0  # how long the interim ops answer before this process joins the compiles


def _step_cost(name: str) -> float:
    return STEP_COSTS.get(name, STEP_COSTS.get(name.rsplit("-", 1)[-1], 1.0))


def _share_cost(names: list[str], worker: bool) -> float:
    """The compile time of a process running the steps `names`: a worker first starts (STEP_COSTS);
    the first product step in a process also compiles what they all share (rounding activations)."""
    products = any(n.endswith(("-decode", "-batch")) and not n.startswith("attention") for n in names)
    return (sum(_step_cost(n) for n in names) + STEP_COSTS["shared"] * products
            + STEP_COSTS["start"] * worker)


def _share_out(names: list[str], n_workers: int) -> list[list[str]]:
    """The steps `names` shared between this process (first share) and n_workers workers so that the
    last to finish finishes first: every assignment where there are few, else longest first to the
    share it delays least."""
    n = n_workers + 1

    def finish(shares: list[list[str]]) -> float:
        return max(_share_cost(share, i > 0) for i, share in enumerate(shares))

    if n ** len(names) <= 4096:
        best = None
        for owners in itertools.product(range(n), repeat=len(names)):
            shares = [[name for name, o in zip(names, owners) if o == i] for i in range(n)]
            if best is None or finish(shares) < finish(best):
                best = shares
        return best or [[] for _ in range(n)]
    shares = [[] for _ in range(n)]
    for name in sorted(names, key=lambda m: -_step_cost(m)):
        i = min(range(n), key=lambda i: _share_cost(shares[i] + [name], i > 0))
        shares[i].append(name)
    return shares


def _answer_while_compiling() -> bool:
    """Whether a first start answers through the numpy ops while workers compile (the default), or
    waits for its decode kernels ($PURELM_COMPILE_WAIT=1)."""
    return os.environ.get("PURELM_COMPILE_WAIT", "0").strip().lower() not in ("1", "yes", "on", "true")


def _compile_workers(n_missing: int) -> int:
    """Worker processes for a first start's compiles: $PURELM_COMPILE_WORKERS, else one per core
    beside this process's (at most MAX_COMPILE_WORKERS), never more than the steps to compile. (Where
    this process answers through the interim ops meanwhile, it keeps its core for them: one worker
    per core slowed a short first start more than it sped up a long one, benchmarks/README.md.)"""
    value = os.environ.get("PURELM_COMPILE_WORKERS", "").strip()
    if value:
        if not value.isdigit():
            raise UsageError(f"PURELM_COMPILE_WORKERS must be a count of processes (0: none), got {value!r}")
        n = int(value)
    else:
        n = min(usable_cores() - 1, MAX_COMPILE_WORKERS)
    return max(0, min(n, n_missing))


class _WarmNotes:
    """Which warm-up steps numba's on-disk cache holds for a backend's settings: a file per step in
    paths.numba_notes_dir (beside the kernels' cache), written once the step ran in some process.
    A start that finds all of them loads every kernel in this process, as it always did."""

    def __init__(self, backend: NumbaBackend) -> None:
        import hashlib

        from ..paths import numba_notes_dir

        # numba keys its cache entries by the sources' path too: another install of the same sources
        # (a second venv, a clone) shares the folder but not the entries, so it has notes of its own
        setting = repr((backend.repack, backend.int16_dot, backend.int8_dot, numba.__version__,
                        numba.config.CPU_NAME, numba.config.CPU_FEATURES, sys.version_info[:2],
                        str(Path(__file__).resolve().parent)))
        self.key = hashlib.sha256(setting.encode()).hexdigest()[:12]
        self.dir = numba_notes_dir("backend")

    def done(self, name: str) -> bool:
        return self.dir is not None and (self.dir / f"{name}-{self.key}").exists()

    def mark(self, name: str) -> None:
        if self.dir is None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / f"{name}-{self.key}").touch()
        except OSError:  # a read-only cache: the next start compiles in workers again, nothing worse
            pass

    def run(self, name: str, step: Callable[[], None], load: bool, wait: bool = True) -> bool:
        """Run warm-up step `name` (its kernels compiled into the cache, or loaded from it) and note it
        done, holding the step's lock file meanwhile: a step another process is compiling (say the
        background worker of a start that has already exited) is waited for, then loaded from the
        cache, not compiled a second time beside it. `load`: run the step even where the cache has it
        (this process needs its kernels; a worker does not). `wait=False`: return False at once,
        running nothing, where another process holds the step."""
        with self._locked(name, wait) as held:
            if not held:
                return False
            if load or not self.done(name):
                step()
                self.mark(name)
        return True

    @contextlib.contextmanager
    def _locked(self, name: str, wait: bool) -> Iterator[bool]:
        """An exclusive flock on the step's lock file while the block runs (the kernel drops it if the
        process dies); yields whether this process holds it. Where the step is done, or there is no
        folder, no fcntl or no way to open the file: no lock, as before locks."""
        if self.dir is None or fcntl is None or self.done(name):
            yield True
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.dir / f"{name}-{self.key}.lock", "a")
        except OSError:
            yield True
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            except OSError:  # a file system without locks
                pass
            yield True


_WORKERS: list = []  # every compile worker this process started


class _CompileWorker:
    """A process running compile_worker on some warm-up steps; it says `done NAME` on its stdout
    after each step, its kernels then in numba's cache. It finishes its steps even when this process
    ends first (a short `purelm generate`), so the next start finds them all cached."""

    def __init__(self, backend: NumbaBackend, types: list[int], names: list[str]) -> None:
        import subprocess

        from ..paths import numba_cache_folder

        root = str(Path(__file__).resolve().parents[2])  # the folder holding this purelm package
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        folder = numba_cache_folder("backend")
        if folder is not None:  # this process's kernel cache, whatever PURELM_CACHE says by now
            env["NUMBA_CACHE_DIR"] = str(folder)
        code = "import sys; from purelm.backends.numba_backend import compile_worker; compile_worker(sys.argv[1:])"
        args = [str(backend.threads), str(int(backend.repack)), str(int(backend.int16_dot)),
                str(int(backend.int8_dot)), ",".join(map(str, types)), ",".join(names)]
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        _WORKERS.append(self.proc)  # held to the end: a dropped Popen of a running process warns
        self.names, self.done, self.buffer = names, set(), b""

    def wait_for(self, name: str, pending: dict[str, _CompileWorker]) -> None:
        """Step `name` is needed now: wait while the worker compiles it; if it has not started it yet,
        leave it to this process (the worker then finds its kernels in the cache). Drops what the
        worker finished (or, once it exited, all its steps: they compile here) from `pending`."""
        alive = self._read(block=False)
        current = next((n for n in self.names if n not in self.done), None)
        if alive and name not in self.done and name != current:
            del pending[name]
            return
        while alive and name not in self.done:
            alive = self._read(block=True)
        for n in [n for n, w in pending.items() if w is self and (not alive or n in self.done)]:
            del pending[n]

    def _read(self, block: bool) -> bool:
        """Take in what the worker said, waiting for a line if `block`; False once it exited."""
        import select

        fd = self.proc.stdout.fileno()
        while block or select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 4096)
            if not data:
                return False
            *lines, self.buffer = (self.buffer + data).split(b"\n")
            self.done.update(line[5:].decode().strip() for line in lines if line.startswith(b"done "))
            if block:
                break
        return True


def compile_worker(argv: list[str]) -> None:
    """A worker process of NumbaBackend._compile_apart: argv = threads, repack, int16_dot, int8_dot
    (0/1), the types (GGMLType numbers) and the steps to run, comma-separated."""
    threads, repack, int16_dot, int8_dot = (int(a) for a in argv[:4])
    types = {GGMLType(int(t)) for t in argv[4].split(",") if t}
    backend = NumbaBackend(threads, bool(repack), bool(int16_dot), bool(int8_dot))
    backend._prepared = set(types)
    steps = {name: run for name, _, run in backend._warm_steps(types, types)}  # the lookups asked for by name
    notes = _WarmNotes(backend)
    busy = []  # steps another process was compiling: waited for after the others
    for name in argv[5].split(","):
        if notes.run(name, steps[name], load=False, wait=False):  # (skipped where the cache has it)
            _say_done(name)
        else:
            busy.append(name)
    for name in busy:
        notes.run(name, steps[name], load=False)
        _say_done(name)


def _say_done(name: str) -> None:
    try:
        print("done", name, flush=True)
    except OSError:  # the starting process is gone: its cache is filled all the same
        pass


def _compile_progress(steps: Iterator[Any], total: int) -> Iterator[Any]:
    """A progress bar on a terminal's stderr, shown only when loading the kernels takes over a
    second: numba compiling them for this CPU, on the first start after an install."""
    from tqdm import tqdm

    return tqdm(steps, total=total, delay=1.0, disable=None, file=sys.stderr, unit="step",
                desc="purelm: compiling kernels for this CPU (once)")


def _kernel_store(store: np.ndarray) -> np.ndarray:
    """A cache store as the kernels take it: f16 as its bits, q8_0 bytes as int8, f32 as it is."""
    return store.view(np.uint16) if store.dtype == np.float16 else store.view(np.int8) if store.dtype == np.uint8 \
        else store


def _gather(store: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows of a cache store (as _kernel_store gives it) as float32 (len(rows), n_kv, dim)."""
    if store.dtype == np.float32:
        return store[rows]
    out = np.empty((len(rows), store.shape[1], dim), np.float32)
    ops.gather_rows(store, rows, out)
    return out


@functools.cache
def _inverse_root(n: int) -> np.float32:
    """1/sqrt(n) as float32, once per n (numpy's scalar sqrt costs microseconds a decode step)."""
    return np.float32(1 / np.sqrt(n))


def _float32(m: np.ndarray) -> np.ndarray:
    """A LoRA half as float32 (lora_weights keeps f16 halves as their bits)."""
    return m.view(np.float16).astype(np.float32) if m.dtype == np.uint16 else m


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    return x.reshape(-1, x.shape[-1])


def _gated(kernel: Callable[..., None], gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """act(gate) * up over (tokens, n) arrays whose rows may be strided (linear_many's column views)."""
    g, u = _strided_rows(gate), _strided_rows(up)
    if g.shape != u.shape:
        raise ShapeError(f"gated activation: gate {g.shape} and up {u.shape} differ")
    out = np.empty(g.shape, np.float32)
    kernel(*_flat_rows(g), *_flat_rows(u), out)
    return out.reshape(gate.shape)


def _strided_rows(x: np.ndarray) -> np.ndarray:
    """x as float32 (rows, n) with unit stride along a row; rows may be apart (no copy then)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.strides[1] != 4 or x.strides[0] % 4 or x.strides[0] < 4 * x.shape[1]:
        x = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    return x


def _flat_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """A (rows, n) float32 array with unit stride along a row as the kernels take it: a 1-D view from
    its first element to its last, and the distance between rows in elements."""
    rows, n = x.shape
    if rows <= 1 or x.strides[0] == 4 * n:  # contiguous: a plain view (as_strided costs ~3 us a call)
        return x.reshape(-1), n
    stride = x.strides[0] // 4
    return np.lib.stride_tricks.as_strided(x, ((rows - 1) * stride + n,), (4,)), stride


def _elementwise(kernel: Callable[[np.ndarray, np.ndarray], None], x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    kernel(x.reshape(-1), out.reshape(-1))
    return out
