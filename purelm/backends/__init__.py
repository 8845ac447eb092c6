"""Backend selection: the fast CPU backend when numba imports, else the numpy reference."""
from __future__ import annotations

import os
import sys

from ..errors import PurelmError, UsageError
from .base import Backend

BACKENDS = ("numba", "numpy", "torch")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    env = os.environ.get("PURELM_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise PurelmError(f"PURELM_NUM_THREADS must be a whole number, got {env!r}") from None
        if n < 1:
            raise PurelmError(f"PURELM_NUM_THREADS must be at least 1, got {n}")
        return n
    return usable_cores()


def get_backend(name: str | None = None, threads: int | None = None, device: str | None = None,
                dtype: str | None = None) -> Backend:
    """`name`: "numba", "numpy", "torch" or None (the fastest CPU backend). `device` and `dtype`: the
    torch backend's (see TorchBackend)."""
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    if name not in (None, *BACKENDS):
        raise UsageError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if (device is not None or dtype is not None) and name != "torch":
        raise UsageError("device and dtype are options of the torch backend (backend=\"torch\")")
    if name == "torch":
        try:
            from .torch_backend import TorchBackend
        except ImportError as e:
            raise PurelmError(str(e)) from None
        return TorchBackend(device, dtype, threads)
    threads = threads or default_threads()
    if name in (None, "numba"):
        try:
            from .numba_backend import NumbaBackend
        except ImportError as e:
            if name == "numba":
                raise PurelmError(f"the numba backend is unavailable: {e}") from None
            print(f"purelm: numba is unavailable ({e}); using the slower numpy backend", file=sys.stderr)
        else:
            return NumbaBackend(threads)
    from .numpy_backend import NumpyBackend

    return NumpyBackend()
