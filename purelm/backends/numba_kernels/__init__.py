"""numba kernels of the numba backend (purelm.backends.numba_backend); compiled on first use and cached
on disk (cache=True), so only a process's first start after an install pays for compilation."""
