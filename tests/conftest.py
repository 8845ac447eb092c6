import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
# llama.cpp's source and build from the peers' sdist (../shared/peers/build-llama-cpp.sh): the tests that run
# its tools or read its reference files skip, saying so, where it is absent
LLAMA_CPP = Path(os.environ.get("PURELM_LLAMA_CPP_DIR",
                                Path.home() / ".cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp"))
# A first start compiles in worker processes (numba_backend.prepare); the tests compile in this one, as
# they did, so that workers outliving a test neither race it for cores nor land in its warning checks
# (tests/test_first_start.py runs the workers itself).
os.environ.setdefault("PURELM_COMPILE_WORKERS", "0")
# The suite runs a process per core, each with kernels on every core: spinning workers would take the
# cores from each other (test_batch.py and test_models.py took 1.6x as long with purelm's default of 100000). The spin count
# moves timing only, never results.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# Passes take every thread they were given, whatever the other test process is doing: else the suite's
# processes would send each other's passes to one thread at random, and the tests of the threaded paths
# would run them only sometimes.
os.environ.setdefault("PURELM_WATCH_LOAD", "0")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): a process per core, at most 4. Each test file runs whole in one
    process (--dist loadfile), so a file's fixtures (a Ray cluster, a server) are made once and files
    that start servers or subprocesses never share their state."""
    from purelm.backends import usable_cores

    return min(4, usable_cores())


# The longest test files, longest first as timed on a 2-core machine with the kernels compiled
# (test_numba_backend.py is the longest of all while it compiles them the first time), started first so
# that the processes finish together rather than one of them running a long file alone at the end.
LONG_FILES = ["test_torch_backend.py", "test_ray.py", "test_kv_cache_types.py", "test_numba_backend.py",
              "test_speculative.py", "test_batch.py", "test_server.py", "test_models.py", "test_chat.py",
              "test_fuzz.py", "test_cve.py", "test_install.py", "test_llama_cpp_vocabs.py",
              "test_benchmarks_smoke.py", "test_backend_agreement.py"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def smollm2_file() -> Path:
    """The real SmolLM2 Q4_1 file: $PURELM_SMOLLM2, else the purelm cache (pulled if absent, so these
    tests run rather than skip; `purelm pull smollm2` beforehand avoids the download inside the run)."""
    env = os.environ.get("PURELM_SMOLLM2")
    if env:
        return Path(env)
    from purelm.hub import pull

    return pull("smollm2")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_file()


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


def llama_cpp_tensor_names(arch: str) -> set[str]:
    """The tensor names gguf-py (llama.cpp's own tables) allows for an architecture, blocks as {bid}."""
    import gguf

    return {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}


def tensor_pattern(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'blk.{bid}.attn_q' (the form of gguf-py's TENSOR_NAMES)."""
    base = name.rsplit(".", 1)[0]
    return base.replace(base.split(".")[1], "{bid}", 1) if base.startswith("blk.") else base


def rounded_activations(x, top):
    """What the numba backend's dot kernels multiply instead of x: each run of 32 values rounded to
    integer steps of max|run| / top (numpy, written from the rule, not from the kernel's code)."""
    import numpy as np

    x = np.asarray(x, np.float32)
    runs = x.reshape(-1, 32)
    scale = (np.abs(runs).max(-1, keepdims=True) / np.float32(top)).astype(np.float32)
    safe = np.where(scale > 0, scale, 1).astype(np.float64)
    q = np.clip(np.rint(runs.astype(np.float64) / safe), -top, top) * (scale > 0)
    return (q * scale).astype(np.float32).reshape(x.shape)


def int16_activations(x):
    return rounded_activations(x, 32767)


def int8_activations(x):
    return rounded_activations(x, 127)


def activation_rule(w):
    """The rounding the numba backend's kernel for weight `w` applies to x (a few rows of it), or None
    for the float kernels."""
    from purelm.backends import numba_backend

    if getattr(w, "kernel", None) in numba_backend.MATVEC8.values():
        return int8_activations
    p = getattr(w, "packed", None)
    return int16_activations if p is not None and p.family.endswith("_dot") else None


def logits_rel(backend):
    """The fraction of the largest logit a numba backend's decode path may move a tiny model's logits:
    by its activation rounding (INT8_LOGITS_REL, INT16_LOGITS_REL), else float32 sums (1e-5)."""
    if getattr(backend, "int8_dot", False):
        return INT8_LOGITS_REL
    return INT16_LOGITS_REL if getattr(backend, "int16_dot", False) else 1e-5


# The int16-activation decode path (numba backend, x86 CPUs with AVX2): a product moves by up to
# ~1e-4 of its largest value (measured on random and real weights), so whole-model logits are held to
# this fraction of their largest magnitude there, 3x the worst seen on the tiny models.
INT16_LOGITS_REL = 3e-4
# The int8 path (AVX512-VNNI): a product moves by up to ~1e-2 of its largest value, llama.cpp's own
# rounding (its q8_0/q8_1 activations); through a tiny random model's layers, logits move by up to 3.9%
# of the largest (measured; llama.cpp's differ from the reference as much, benchmarks/interop.py), so
# the bound is 3x that. The kernels themselves are held to 1e-5 against the rule (test_numba_backend).
INT8_LOGITS_REL = 0.12


def rewrite_gguf(src, dst, meta=None, drop=(), tensors=None):
    """Copy the GGUF `src` to `dst` with metadata keys changed (`meta`: key -> value, or key -> (value,
    ValueType) to force a type; None removes the key), tensors dropped (`drop`), and tensors replaced or
    added (`tensors`: name -> float32 array, or None to remove). For building hostile files."""
    import numpy as np

    from purelm.formats.gguf import GGUFFile, GGUFWriter, ValueType

    meta, tensors = dict(meta or {}), dict(tensors or {})
    f = GGUFFile(src)
    w = GGUFWriter(dst)
    for k in f.metadata:
        if k in meta:
            continue
        w.add(k, f.metadata[k], f.metadata.types[k], f.metadata.array_types.get(k))
    for k, v in meta.items():
        if v is None:
            continue
        value, vtype = v if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], ValueType) else (v, None)
        w.add(k, value, vtype)
    for t in f.tensors.values():
        if t.name in drop or t.name in tensors:
            continue
        w.add_tensor(t.name, t.data, t.type, t.shape)
    for name, arr in tensors.items():
        if arr is not None:
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
    w.write()
    f.close()
    return dst
