"""purelm/backends/malloc.py: while a prompt's pass runs, glibc's malloc keeps freed blocks (its mmap and
trim thresholds raised); after it the thresholds are where glibc's own adjustment takes them (a decode
step's vocabulary-sized arrays stay in the heap) and the free memory is returned; nesting and threads
share one setting; the user's environment turns it off. The logic against a recording stand-in for
libc; the effect on glibc itself in a fresh process, with glibc's own counters (mallinfo2) and the
process's page faults as witnesses."""
from __future__ import annotations

import platform
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import FIXTURES

from purelm.backends import malloc
from purelm.backends.numba_backend import NumbaBackend
from purelm.formats.gguf import GGUFFile
from purelm.models import build_model

RAISED = [("mallopt", malloc.M_MMAP_THRESHOLD, malloc.KEEP_BYTES), ("mallopt", malloc.M_TRIM_THRESHOLD, malloc.KEEP_BYTES)]
PUT_BACK = [("mallopt", malloc.M_TRIM_THRESHOLD, malloc.AFTER_TRIM),
            ("mallopt", malloc.M_MMAP_THRESHOLD, malloc.AFTER_MMAP), ("malloc_trim", 0)]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def recording() -> tuple[malloc.KeepFreed, Recorder]:
    keep, libc = malloc.KeepFreed(), Recorder()
    keep.libc = libc
    return keep, libc


def test_nested_passes_set_once_and_put_back_once():
    keep, libc = recording()
    with keep:
        assert libc.calls == RAISED
        with keep:
            pass
        assert libc.calls == RAISED
    assert libc.calls == RAISED + PUT_BACK and keep.depth == 0
    with pytest.raises(KeyError):
        with keep:
            raise KeyError("a failed pass")
    assert libc.calls == 2 * (RAISED + PUT_BACK) and keep.depth == 0


def test_threads_share_one_setting():
    keep, libc = recording()
    inside, done = threading.Event(), threading.Event()

    def other():
        with keep:
            inside.set()
            done.wait(5)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(5)
    with keep:
        pass  # this thread leaves first: the other's pass still runs with the setting
    assert libc.calls == RAISED
    done.set()
    t.join()
    assert libc.calls == RAISED + PUT_BACK


def test_the_environment_turns_it_off(monkeypatch):
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert malloc._libc() is None
        return
    assert malloc._libc() is not None
    for name, value in (("PURELM_MALLOC_KEEP", "0"), ("MALLOC_MMAP_THRESHOLD_", "65536"),
                        ("MALLOC_TRIM_THRESHOLD_", "0"), ("MALLOC_TOP_PAD_", "0"), ("MALLOC_MMAP_MAX_", "0")):
        monkeypatch.setenv(name, value)
        assert malloc._libc() is None, name
        keep = malloc.KeepFreed()
        with keep:  # nothing to call: a no-op
            assert keep.libc is None
        monkeypatch.delenv(name)


def test_only_prompt_passes_use_it(monkeypatch):
    """A model's prompt pass (and one that fails) turns the setting on for its duration only; a decode
    step and a short batch do not touch it."""
    keep, libc = recording()
    monkeypatch.setattr(malloc, "keep_freed", keep)
    model = build_model(GGUFFile(FIXTURES / "llama-q8_0.gguf"), NumbaBackend(2))
    cache = model.new_cache(64)
    model.forward(np.arange(1, malloc.MIN_TOKENS + 4), cache)
    assert libc.calls == RAISED + PUT_BACK
    model.forward(np.array([5]), cache)
    model.forward(np.arange(1, malloc.MIN_TOKENS), cache)  # 15 tokens
    assert libc.calls == RAISED + PUT_BACK
    with pytest.raises(Exception):
        model.forward(np.full(30, 10**9), cache)  # a bad token id: the pass fails
    assert keep.depth == 0 and libc.calls[-3:] == PUT_BACK


WITNESS = r"""
import ctypes, numpy as np
from purelm.backends.malloc import KeepFreed

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_by(n):  # how much more malloc holds in blocks of their own mapping while n bytes are alive
    before = libc.mallinfo2().hblkhd
    block = np.ones(n, np.uint8)
    grew = libc.mallinfo2().hblkhd - before
    del block
    return grew

def faults_of_blocks(n, times=50):  # page faults of allocating, writing and freeing n bytes, `times` times
    import resource
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = np.ones(n, np.uint8)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

keep = KeepFreed()
out = [mapped_by(8 << 20)]
with keep:
    out.append(mapped_by(8 << 20))
    with keep:
        out.append(mapped_by(8 << 20))
out += [mapped_by(8 << 20), mapped_by(48 << 20), faults_of_blocks(400 << 10)]
print(*out, keep.libc is not None)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's setting")
def test_glibc_takes_it():
    """In a fresh process: an 8 MiB block gets its own mapping before (glibc's start), comes from the
    heap during (nested too) and after; a 48 MiB block gets its own mapping after; a decode step's
    sizes (a vocabulary's int64 indices: 400 KiB) reuse heap pages after, not faulting them in each
    time (mapped, 50 blocks of 100 pages fault ~5000 times)."""
    import ctypes

    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("MALLOC_", "PURELM_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", WITNESS], capture_output=True, text=True, env=env, check=True)
    before, during, nested, after, big_after, faults, active = out.stdout.split()
    assert active == "True"
    assert int(before) >= 8 << 20 and int(during) == 0 and int(nested) == 0 and int(after) == 0
    assert int(big_after) >= 48 << 20 and int(faults) < 500
