"""The on-disk cache of repacked matrices (purelm/backends/pack_cache.py): a second load maps the cached
copy and gives the same logits; a changed model file or layout, a corrupt, truncated or hostile entry,
a read-only or full cache folder, and the opt-out all fall back to repacking."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest

from purelm.backends import numba_backend, pack_cache
from purelm.backends.numba_backend import NumbaBackend
from purelm.backends.numba_kernels.intrinsics import has_int16_dot
from purelm.formats.gguf import GGUFFile
from purelm.models import build_model

IDS = np.array([1, 5, 9, 2, 7], np.int64)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder, caching even the tiny fixtures; returns its `packed` folder."""
    monkeypatch.setenv("PURELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PURELM_PACK_CACHE", raising=False)
    monkeypatch.setattr(pack_cache, "MIN_FILE_BYTES", 0)
    monkeypatch.setattr(pack_cache, "_warned", False)
    return tmp_path / "cache" / "packed"


@pytest.fixture
def model_file(tmp_path, fixtures):
    path = tmp_path / "model.gguf"
    shutil.copyfile(fixtures / "llama-q4_0.gguf", path)
    return path


class Repacks:
    """Counts the model file's matrices repacked (not taken from the cache)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = numba_backend.pack

        def counting(qtype, data, *args, **kwargs):
            first = data[0] if isinstance(data, list) else data
            self.count += pack_cache.source_of(first) is not None  # not the warm-up's tiny matrices
            return real(qtype, data, *args, **kwargs)

        monkeypatch.setattr(numba_backend, "pack", counting)


def run(path, threads=1):
    """Load `path` in a new backend and return the logits of IDS (prefill) and of one decode step."""
    with GGUFFile(path) as g:
        model = build_model(g, NumbaBackend(threads))
        cache = model.new_cache(16)
        return [np.array(model.forward(IDS, cache)), np.array(model.forward(IDS[:1], cache))]


def entries(folder):
    return sorted(folder.rglob("*.pack"))


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_second_load_maps_the_cache(cache, model_file, monkeypatch):
    first = run(model_file)
    files = entries(cache)
    assert files, "nothing was cached"
    repacks = Repacks(monkeypatch)
    second = run(model_file)
    assert repacks.count == 0
    assert same(first, second)
    # the cached arrays are views of the entry files, not copies
    g = GGUFFile(model_file)
    backend = NumbaBackend(1)
    weight = backend.weight(g.tensors["blk.0.ffn_down.weight"])
    backend._pack(weight)
    owner = weight.packed.arrays["qs"]
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner, memoryview) and type(owner.obj).__name__ == "mmap"
    assert weight.packed.arrays["qs"].flags.writeable  # as the warm-up's arrays (one numba signature)


def test_q8_0_and_both_layouts(cache, tmp_path, fixtures, monkeypatch):
    path = tmp_path / "q8.gguf"
    shutil.copyfile(fixtures / "llama-q8_0.gguf", path)
    repacks = Repacks(monkeypatch)
    counts = []
    for dot in ("1", "0"):  # the int16 kernels' layout (where the CPU has them), then the float one
        monkeypatch.setenv("PURELM_INT16_DOT", dot)
        first = run(path)
        counts.append(len(entries(cache)))
        repacks.count = 0
        assert same(first, run(path)) and repacks.count == 0
    assert counts[1] == (2 * counts[0] if has_int16_dot() else counts[0])  # one entry set per layout


def test_changed_model_file_is_repacked(cache, model_file, monkeypatch):
    first = run(model_file)
    st = os.stat(model_file)
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    repacks = Repacks(monkeypatch)
    assert same(first, run(model_file))
    assert repacks.count > 0
    keys = {json.dumps(trailer(p)["key"]["source"], sort_keys=True) for p in entries(cache)}
    assert len(keys) == 1 and str(st.st_mtime_ns + 10**9) in keys.pop()  # rewritten with the new stamp
    repacks.count = 0
    with open(model_file, "ab") as f:  # a longer file: the GGUF reader ignores bytes past its data
        f.write(bytes(64))
    assert same(first, run(model_file)) and repacks.count > 0


def test_format_version_and_layout_change_invalidate(cache, model_file, monkeypatch):
    first = run(model_file)
    repacks = Repacks(monkeypatch)
    monkeypatch.setattr(pack_cache, "FORMAT_VERSION", pack_cache.FORMAT_VERSION + 1)
    assert same(first, run(model_file)) and repacks.count > 0
    n = repacks.count
    assert same(first, run(model_file)) and repacks.count == n  # rewritten under the new version
    monkeypatch.setattr(pack_cache, "_layouts_digest", lambda: "another layout")
    assert same(first, run(model_file)) and repacks.count == 2 * n


def trailer(path):
    data = path.read_bytes()
    n = int.from_bytes(data[-16:-8], "little")
    return json.loads(data[-16 - n:-16])


def _flip_data(p):
    data = bytearray(p.read_bytes())
    data[100] ^= 0x10
    p.write_bytes(bytes(data))


def _flip_trailer(p):
    data = bytearray(p.read_bytes())
    at = data.rindex(b'"lanes":')
    data[at + 8] = ord("9")
    p.write_bytes(bytes(data))


def _huge_shape_trailer(p):
    """A well-formed trailer whose key is right but which claims the file is something else."""
    t = trailer(p)
    t["arrays"] = [["qs", "|O", [2**62], 0]]
    t["sum"] = -1
    text = json.dumps(t).encode()
    body = p.read_bytes()[:-16 - int.from_bytes(p.read_bytes()[-16:-8], "little")]
    p.write_bytes(body + text + len(text).to_bytes(8, "little") + b"PLMPACK1")


def _long_trailer(p):
    p.write_bytes(p.read_bytes()[:-16] + (2**63).to_bytes(8, "little") + b"PLMPACK1")


def _fifo(p):
    p.unlink()
    os.mkfifo(p)


def _symlink(p):
    p.unlink()
    p.symlink_to("/dev/zero")


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "tiny": lambda p: p.write_bytes(b"PLM"),
    "empty": lambda p: p.write_bytes(b""),
    "appended": lambda p: p.write_bytes(p.read_bytes() + bytes(64)),
    "flipped data": _flip_data,
    "flipped key": _flip_trailer,
    "lying trailer": _huge_shape_trailer,
    "trailer length": _long_trailer,
    "not json": lambda p: p.write_bytes(p.read_bytes()[:-20] + b"\xff\xfe" + p.read_bytes()[-18:]),
    "fifo": _fifo,
    "symlink": _symlink,
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_bad_entries_are_ignored_and_rewritten(cache, model_file, monkeypatch, how):
    first = run(model_file)
    files = entries(cache)
    for p in files:
        CORRUPTIONS[how](p)
    repacks = Repacks(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert same(first, run(model_file))
    assert not [w for w in record if "cache" in str(w.message)]  # a bad entry is quietly replaced
    assert repacks.count == len(files)
    repacks.count = 0
    assert same(first, run(model_file)) and repacks.count == 0  # rewritten, good again
    assert not list(cache.rglob("*.tmp"))


def test_unwritable_cache_folder_still_loads(cache, model_file, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"x")  # a file where the folder would go: no user, root included, can write under it
    monkeypatch.setenv("PURELM_CACHE", str(blocker / "cache"))
    with pytest.warns(RuntimeWarning, match="repacked-weights cache") as record:
        first = run(model_file)
        second = run(model_file)
    assert len(record) == 1  # one warning at most
    assert same(first, second)


def test_full_disk_leaves_no_partial_file(cache, model_file, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    reference = run(model_file)
    shutil.rmtree(cache)
    monkeypatch.setattr(pack_cache.os, "replace", full)
    with pytest.warns(RuntimeWarning, match="No space left") as record:
        assert same(reference, run(model_file))
    assert len(record) == 1
    assert not [p for p in cache.rglob("*") if p.is_file()]  # the temporary file is gone too


def test_size_bound_evicts_least_recently_used(cache, model_file, tmp_path, monkeypatch):
    other = tmp_path / "other.gguf"
    shutil.copyfile(model_file, other)
    run(other)
    (old,) = [p for p in cache.iterdir()]
    size = sum(p.stat().st_size for p in old.iterdir())
    monkeypatch.setattr(pack_cache, "MAX_BYTES", size + size // 2)
    run(model_file)  # does not fit beside the other model's entries: those go
    assert not old.exists()
    assert len(list(cache.iterdir())) == 1 and entries(cache)
    kept = {p.parent for p in entries(cache)}
    monkeypatch.setattr(pack_cache, "MIN_FREE_BYTES", 1 << 62)  # and a full disk: nothing written, one warning
    with pytest.warns(RuntimeWarning, match="no room"):
        run(other)
    assert {p.parent for p in entries(cache)} == kept


def test_opt_out(cache, model_file, monkeypatch):
    monkeypatch.setenv("PURELM_PACK_CACHE", "0")
    first = run(model_file)
    assert not cache.exists()
    monkeypatch.delenv("PURELM_PACK_CACHE")
    assert same(first, run(model_file)) and entries(cache)


def test_small_files_are_not_cached(cache, model_file, monkeypatch):
    monkeypatch.setattr(pack_cache, "MIN_FILE_BYTES", 32 << 20)
    run(model_file)
    assert not cache.exists()


def test_folders_of_deleted_model_files_go(cache, model_file, tmp_path):
    other = tmp_path / "other.gguf"
    shutil.copyfile(model_file, other)
    run(other)
    (old,) = list(cache.iterdir())
    other.unlink()
    run(model_file)  # its first store looks over the folder
    assert not old.exists() and entries(cache)


def test_a_file_name_that_is_not_utf8(cache, model_file, tmp_path, monkeypatch):
    odd = tmp_path / os.fsdecode(b"mod\xffel .gguf")
    shutil.copyfile(model_file, odd)
    first = run(odd)
    repacks = Repacks(monkeypatch)
    assert same(first, run(odd)) and repacks.count == 0 and entries(cache)
