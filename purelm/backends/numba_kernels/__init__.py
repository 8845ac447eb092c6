"""numba kernels of the numba backend (purelm.backends.numba_backend); compiled on first use and cached
on disk (cache=True, in the user cache folder: see purelm.paths.numba_cache), so only a process's first
start after an install pays for compilation."""
from pathlib import Path

from ...paths import numba_cache

with numba_cache("backend", Path(__file__).parent.glob("*.py")):
    from . import common, intrinsics, ops, packed, packing, rows  # noqa: F401
    from . import experts  # noqa: F401  (after packed: its kernels inline packed's work items)
