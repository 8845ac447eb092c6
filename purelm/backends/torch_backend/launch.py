"""Triton kernels launched with less host time.

`kernel[grid](...)` costs tens of microseconds of Python per call in Triton 3.x (binding the arguments,
the specialization key, the cache lookup): more than most of our kernels take on the GPU, and a prompt
launches hundreds of them eagerly (decode steps replay CUDA graphs instead). `fast(kernel)[grid](...)`
goes through Triton once per specialization and keeps the compiled kernel; later calls with the same
constants, the same argument types and the same specialization (Triton's: a pointer or an integer
divisible by 16, an integer equal to 1, 32- or 64-bit integers) launch it directly. The key is finer
than Triton's, never coarser, so a launch can only miss the cache (and go through Triton), never run a
kernel compiled for other arguments. Under Triton's interpreter, and while Triton's launch hooks are
set (profilers), every call goes through Triton.
"""
from __future__ import annotations

from typing import Any

import torch
from triton import knobs

_launchers: dict[Any, "Launcher"] = {}


def _spec(a: Any) -> Any:
    """What Triton specializes a runtime argument on (and a little more)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0, a.device.index)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31, 0 <= a < 2 ** 64)
    if isinstance(a, float):
        return "f"
    if a is None:
        return None
    return ("?", a)  # anything else: its value


def _hooked() -> bool:
    """Whether Triton's launch hooks are set (a HookChain with calls, or a plain hook)."""
    return any(h is not None and getattr(h, "calls", True)
               for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


class Launcher:
    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.names = list(getattr(kernel, "arg_names", []))
        self.compiled: dict[tuple, Any] = {}

    def __getitem__(self, grid: tuple) -> Any:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        if _hooked():
            self.kernel[grid](*args, **kwargs)
            return
        key = (tuple(map(_spec, args)), tuple(kwargs.items()))
        hit = self.compiled.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if not hasattr(compiled, "packed_metadata") or not self.names:
                return  # (the interpreter: nothing compiled to keep)
            rest = self.names[len(args):]
            if all(name in kwargs for name in rest):  # (a parameter left to its default: through Triton)
                self.compiled[key] = (compiled, rest)
            return
        compiled, rest_names = hit
        g = tuple(grid) + (1, 1)
        stream = torch.cuda.current_stream().cuda_stream
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *[kwargs[n] for n in rest_names])


def fast(kernel: Any) -> Launcher:
    """The launcher of a @triton.jit kernel (one per kernel)."""
    launcher = _launchers.get(kernel)
    if launcher is None:
        launcher = _launchers[kernel] = Launcher(kernel)
    return launcher


__all__ = ["fast"]
