"""purelm/backends/malloc.py: while a prompt's pass runs, a large temporary comes from glibc's heap (no
mapping of its own) and is reused; before and after, glibc's starting behaviour (a large block gets its
own mapping); the user's environment turns it off. glibc's own counters (mallinfo2) are the witness."""
from __future__ import annotations

import ctypes
import platform
import threading

import numpy as np
import pytest
from conftest import FIXTURES

from purelm.backends import malloc
from purelm.backends.numba_backend import NumbaBackend
from purelm.formats.gguf import GGUFFile
from purelm.models import build_model

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting is glibc's")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mapped_bytes() -> int:
    """Bytes malloc holds in blocks of their own mapping (mallinfo2's hblkhd)."""
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


def mapped_by(n_bytes: int) -> int:
    """How much more malloc holds in mappings while a block of n_bytes is alive."""
    before = mapped_bytes()
    block = np.empty(n_bytes, np.uint8)
    grew = mapped_bytes() - before
    del block
    return grew


def test_large_blocks_come_from_the_heap_only_inside():
    keep = malloc.KeepFreed()
    with keep:
        if keep.libc is None:
            pytest.skip("turned off in this environment")
        assert mapped_by(8 << 20) == 0
        with keep:  # nested: still on, and still on after the inner one ends
            assert mapped_by(8 << 20) == 0
        assert mapped_by(8 << 20) == 0
    assert mapped_by(8 << 20) >= 8 << 20  # glibc's starting threshold again


def test_threads_share_one_setting():
    keep, inside, done = malloc.KeepFreed(), threading.Event(), threading.Event()

    def other():
        with keep:
            inside.set()
            done.wait(5)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(5)
    with keep:
        pass  # this thread leaves first: the other's pass still runs with the setting
    if keep.libc is not None:
        assert mapped_by(8 << 20) == 0
    done.set()
    t.join()
    assert mapped_by(8 << 20) >= 8 << 20


def test_the_environment_turns_it_off(monkeypatch):
    for name, value in (("PURELM_MALLOC_KEEP", "0"), ("MALLOC_MMAP_THRESHOLD_", "65536"),
                        ("MALLOC_TRIM_THRESHOLD_", "0")):
        monkeypatch.setenv(name, value)
        keep = malloc.KeepFreed()
        with keep:
            assert keep.libc is None
            assert mapped_by(8 << 20) >= 8 << 20
        monkeypatch.delenv(name)


def test_a_prompt_pass_puts_glibc_back(monkeypatch):
    """A model's prompt pass (and one that fails) turns the setting on for its duration only; a decode
    step does not touch it."""
    model = build_model(GGUFFile(FIXTURES / "llama-q8_0.gguf"), NumbaBackend(2))
    seen = []
    real = malloc.KeepFreed.__enter__

    def enter(self):
        real(self)
        seen.append(mapped_by(8 << 20))  # inside the pass

    monkeypatch.setattr(malloc.KeepFreed, "__enter__", enter)
    cache = model.new_cache(64)
    model.forward(np.arange(1, 21), cache)
    model.forward(np.array([5]), cache)
    assert len(seen) == 1  # the prompt of 20 tokens, not the decode step
    assert seen[0] == 0 or malloc.keep_freed.libc is None
    assert mapped_by(8 << 20) >= 8 << 20
    with pytest.raises(Exception):
        model.forward(np.full(30, 10**9), cache)  # a bad token id: the pass fails
    assert malloc.keep_freed.depth == 0 and mapped_by(8 << 20) >= 8 << 20
