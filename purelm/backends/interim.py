"""A first start's answers before its kernels exist: while worker processes compile the numba
backend's kernels for this CPU (NumbaBackend.prepare), its ops run as the numpy backend's on the
file's own blocks, so the first `purelm generate` answers in seconds instead of after half a minute
of compiling. The backend switches to its kernels between two forward passes, once the workers have
them in numba's cache. Results are the numpy backend's (float32 products of dequantized weights), so
a first start's tokens can differ from later starts' where two logits nearly tie.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..formats.gguf import Tensor
from .base import Backend
from .numpy_backend import NumpyBackend

# The NumbaBackend methods that run numba kernels: shadowed on the instance while it is interim
OPS = ("embed", "linear", "linear_many", "glu", "rms_norm", "layer_norm", "rope", "attention", "silu", "gelu",
       "swiglu", "geglu", "gelu_erf", "expert_ffn", "rotate")


def tensors(w: Any) -> list[Tensor]:
    """The file's 2-D tensors a numba weight was made from (several for a merged q|k|v or gate|up)."""
    ts = getattr(w, "tensors", None)
    if not ts:
        raise RuntimeError("a weight made without its tensors cannot run before the kernels are compiled")
    return ts


class Interim:
    """The ops of `backend` as the numpy backend computes them, on its weights' tensors, with the
    backend's pass layout (each sequence's rows as a run of their own)."""

    def __init__(self, backend: Any) -> None:  # a NumbaBackend
        self.backend = backend
        self.numpy = NumpyBackend()

    def _ops(self) -> NumpyBackend:
        self.numpy.layouts = self.backend.layouts
        return self.numpy

    def embed(self, w: Any, ids: np.ndarray) -> np.ndarray:
        return self._ops().embed(tensors(w)[0], ids)

    def linear(self, x: np.ndarray, w: Any, bias: np.ndarray | None = None) -> np.ndarray:
        # one BLAS thread: the compile workers have the other cores
        with self.backend._single_threaded_blas():
            ys = [self._ops().linear(x, t) for t in tensors(w)]
        y = ys[0] if len(ys) == 1 else np.concatenate(ys, axis=-1)
        return y if bias is None else y + bias

    def linear_many(self, x: np.ndarray, ws: Any) -> list[np.ndarray]:
        if isinstance(ws, (list, tuple)):
            return [self.linear(x, w) for w in ws]
        with self.backend._single_threaded_blas():
            return [self._ops().linear(x, t) for t in tensors(ws)]

    def glu(self, x: np.ndarray, ws: Any, act: str) -> np.ndarray:
        gate, up = self.linear_many(x, ws)
        return self.numpy.swiglu(gate, up) if act == "silu" else self.numpy.geglu(gate, up)

    def expert_ffn(self, x: Any, gate_up: list[Any], down: list[Any], picks: np.ndarray, weights: np.ndarray,
                   act: str) -> Any:
        return Backend.expert_ffn(self.backend, x, gate_up, down, picks, weights, act)  # through the ops above

    def __getattr__(self, name: str) -> Any:  # norms, rope, attention, activations: the numpy backend's own
        if name not in OPS:
            raise AttributeError(name)
        op = getattr(NumpyBackend, name)
        return lambda *args, **kwargs: op(self._ops(), *args, **kwargs)
