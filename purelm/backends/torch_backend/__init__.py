"""The torch backend: the same model code on a CUDA GPU, or on torch's CPU device.

Weights stay packed on the device (packed.py: the file's bits regrouped into planes, never a float copy
of the model). Activation rows multiply the planes directly with Triton kernels on CUDA (a few rows:
decode steps; a prompt's rows through tensor cores, triton_kernels.py); without Triton a tile of
weights at a time is dequantized for a matrix product in the activation dtype. Decode tokens attend
over the paged cache in one Triton kernel; a prompt's tokens through torch's
scaled_dot_product_attention (the causal mask, sliding window and ALiBi as its additive bias; Gemma 2's
softcap written out). Activations are bfloat16 on CUDA by default
(float16 or float32 on request), float32 on the CPU. On CUDA a decode step (once per batch size and context
bucket) and a prompt that starts its sequence (once per bucket of 64 tokens) are captured as CUDA graphs and
replayed (graphs.py), since a pass is hundreds of small kernels whose launches cost more than their work.
"""
from __future__ import annotations


import os
import warnings
from typing import Any

import numpy as np

from ...errors import PurelmError, ShapeError, UsageError
from ...formats.gguf import Tensor
from ...quant import dequantize_rows, dequantize as dequantize_np
from ..base import (AttentionSpec, Backend, KVCache, PassView, Rope, as_view, check_attention, check_norm, check_rope,
                    check_rotate)

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - exercised by test_torch_backend's subprocess check
    raise ImportError(f"the torch backend needs PyTorch ({e}): pip install 'purelm[torch]'") from None

from ..kv_cache import BLOCK, hadamard
from .cache import DeviceRuns, StagedView, TorchKVCache, device_runs
from .packed import DENSE, DENSE_DTYPES, LAYOUTS, Packed, dequantize, pack

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
TILE_FLOATS = 8 << 20  # weights dequantized at once for a matrix product (32 MiB of float32)


_fused: Any = None  # the Triton kernels' modules, imported where Triton is usable (_triton_ok)
_kernels: Any = None


def _triton_ok(device: torch.device) -> bool:
    global _fused, _kernels
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from . import fused, triton_kernels
    except ImportError:
        return False
    _fused, _kernels = fused, triton_kernels
    return True


class Merged:
    """Matrices that multiply the same input (q|k|v, gate|up), stacked into one: one kernel for all."""

    def __init__(self, w: Any, sizes: list[int]) -> None:
        self.w, self.sizes = w, sizes
        self.shape = (sum(sizes), w.shape[1])


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str | None = None, dtype: str | None = None, threads: int | None = None,
                 graphs: bool | None = None, triton: bool | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise UsageError(f"unknown torch device {device!r} (use cuda, cuda:N or cpu)") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PurelmError("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
        if self.device.type not in ("cuda", "cpu"):
            raise UsageError(f"device {device!r}: the torch backend runs on cuda or cpu")
        if dtype is None:
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif dtype in DTYPES:
            self.dtype = DTYPES[dtype]
        else:
            raise UsageError(f"unknown dtype {dtype!r} (choose from bf16, fp16, fp32)")
        self.threads = threads
        # Triton on CUDA; on the CPU only when asked and interpreted (TRITON_INTERPRET=1: the tests)
        self.use_triton = _triton_ok(self.device) and (triton if triton is not None else self.device.type == "cuda")
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs and self.device.type == "cuda"
        self._consts: dict[Any, Any] = {}  # per-op constants made once (rope frequencies, ALiBi slopes)
        self._scratch: dict[Any, Any] = {}  # per-pass values shared by the layers (cos/sin)
        self._saved_threads: int | None = None
        self.graphs = None
        if self.use_graphs:
            from .graphs import GraphRunner

            self.graphs = GraphRunner(self)

    def __repr__(self) -> str:
        return f"TorchBackend(device={self.device}, dtype={str(self.dtype).replace('torch.', '')})"

    # -- passes
    def begin_pass(self, segments: list[int], head_segments: list[int]) -> None:
        super().begin_pass(segments, head_segments)
        self._scratch = {}
        if self.threads and self.device.type == "cpu":
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def end_pass(self, failed: bool = False) -> None:
        super().end_pass(failed)
        self._scratch = {}
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def run(self, compute: Any, ids: np.ndarray, view: PassView, rows: np.ndarray | None) -> Any:
        if self.graphs is not None and self.graphs.eligible(view, rows):
            return self.graphs.run(compute, ids, view, rows)
        return compute(self._index(ids), self._index(view.positions), view,
                       None if rows is None else self._index(rows))

    def _index(self, a: Any) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a
        return torch.from_numpy(np.ascontiguousarray(a, np.int64)).to(self.device)

    # -- weights
    def weight(self, t: Tensor) -> Any:
        if t.type in DENSE:
            with warnings.catch_warnings():  # the file's pages are read-only; nothing writes to them
                warnings.simplefilter("ignore", UserWarning)
                data = torch.from_numpy(np.asarray(t.data).view(np.uint8)).view(DENSE_DTYPES[t.type])
            return data.reshape(t.shape).to(self.device)
        if t.type in LAYOUTS:
            return pack(t.type, [(t.shape[0], t.data)], t.shape[1], self.device)
        return t  # other types: dequantized on the host a tile at a time (slow, but any type runs)

    def weights(self, ts: list[Tensor]) -> Any:
        """One stacked matrix where the parts share a type and width (one kernel for q|k|v)."""
        if len(ts) > 1 and len({t.type for t in ts}) == 1 and len({t.shape[1] for t in ts}) == 1 \
                and ts[0].type in LAYOUTS:
            sizes = [t.shape[0] for t in ts]
            return Merged(pack(ts[0].type, [(t.shape[0], t.data) for t in ts], ts[0].shape[1], self.device), sizes)
        return [self.weight(t) for t in ts]

    def vector(self, t: Tensor) -> torch.Tensor:
        return torch.from_numpy(t.dequantize()).to(self.device, self.dtype)

    def kv_cache(self, n_layers: int, n_ctx: int, n_kv_heads: int, k_dim: int, v_dim: int, type_k: str = "f32",
                 type_v: str = "f32") -> KVCache:
        return TorchKVCache(n_layers, n_ctx, n_kv_heads, k_dim, v_dim, self.device, self.dtype, type_k, type_v)

    # -- products
    def embed(self, w: Any, ids: Any) -> torch.Tensor:
        idx = self._index(ids).reshape(-1)
        if isinstance(w, Packed):
            return self._dequantize(w.rows(idx))
        if isinstance(w, torch.Tensor):
            return w[idx].to(self.dtype)
        rows = dequantize_rows(w.data, w.type, w.shape[-1], idx.cpu().numpy())
        return torch.from_numpy(rows).to(self.device, self.dtype)

    def linear(self, x: torch.Tensor, w: Any, bias: Any = None) -> torch.Tensor:
        if isinstance(w, Merged):
            w = w.w
        if x.ndim != 2 or x.shape[1] != w.shape[1]:
            raise ShapeError(f"linear: input of shape {tuple(x.shape)} for a matrix of shape {tuple(w.shape)}")
        if isinstance(w, Packed) and self.use_triton:
            y = _kernels.product(x, w, self.dtype)
        else:
            y = self._tiled(x, w)
        return y if bias is None else y + bias

    def _tiled(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        """x @ w.T a tile of weight rows at a time; on the CPU each run of the pass separately (as
        alone: BLAS rounds by shape), on CUDA all rows at once."""
        n_out, n_in = w.shape
        runs = self.row_runs(x.shape[0]) if self.device.type == "cpu" else [(0, x.shape[0])]
        step = max(1, TILE_FLOATS // n_in)
        if n_out <= step and len(runs) == 1:  # one tile: the product is the result (no copy)
            return x @ self._tile(w, 0, n_out).T
        y = torch.empty((x.shape[0], n_out), dtype=self.dtype, device=x.device)
        for r in range(0, n_out, step):
            r1 = min(n_out, r + step)
            wt = self._tile(w, r, r1)
            for a, b in runs:
                y[a:b, r:r1] = x[a:b] @ wt.T
        return y

    def _tile(self, w: Any, r: int, r1: int) -> torch.Tensor:
        """Rows r..r1 of a matrix as a dense tensor of the activation dtype."""
        if isinstance(w, Packed):
            return self._dequantize(w.slice(r, r1))
        if isinstance(w, torch.Tensor):
            return w[r:r1].to(self.dtype)
        rows = w.data[r:r1]
        return torch.from_numpy(dequantize_np(rows, w.type, (rows.shape[0], w.shape[1]))).to(self.device, self.dtype)

    def _dequantize(self, w: Packed) -> torch.Tensor:
        if self.use_triton:
            return _kernels.dequantize(w, self.dtype)
        return dequantize(w, self.dtype)

    def glu(self, x: torch.Tensor, w_gate_up: Any, act: str) -> torch.Tensor:
        # where the kernels' choice says so (a prompt; one row where this GPU's tuning found it faster):
        # one kernel reads the gate and up rows of each output together and writes act(gate) * up, so
        # the two halves never go through memory
        if isinstance(w_gate_up, Merged) and isinstance(w_gate_up.w, Packed) and self.use_triton \
                and x.ndim == 2 and w_gate_up.sizes[0] == w_gate_up.sizes[1] and x.shape[1] == w_gate_up.shape[1]:
            config = _kernels.default_config(x.shape[0], w_gate_up.sizes[0], x.shape[1], True, self.device)
            if config is not None:
                return _kernels.product(x.to(self.dtype), w_gate_up.w, self.dtype, glu=act, config=config)
        return super().glu(x, w_gate_up, act)

    def linear_many(self, x: torch.Tensor, ws: Any) -> list[torch.Tensor]:
        if isinstance(ws, Merged):
            return list(torch.split(self.linear(x, ws.w), ws.sizes, dim=1))
        return [self.linear(x, w) for w in ws]

    # -- norms and position
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        check_norm(x, w, "rms_norm")
        if self.use_triton:
            return _fused.norm(x.to(self.dtype), w, None, eps, rms=True)
        xf = x.float()
        ms = torch.mean(xf * xf, dim=-1, keepdim=True)
        return ((xf / torch.sqrt(ms + eps)) * w.float()).to(self.dtype)

    def layer_norm(self, x: torch.Tensor, w: Any, b: Any, eps: float) -> torch.Tensor:
        check_norm(x, w, "layer_norm", optional=True), check_norm(x, b, "layer_norm", optional=True)
        if self.use_triton:
            return _fused.norm(x.to(self.dtype), w, b, eps, rms=False)
        xf = x.float()
        xc = xf - xf.mean(dim=-1, keepdim=True)
        y = xc / torch.sqrt(torch.mean(xc * xc, dim=-1, keepdim=True) + eps)
        if w is not None:
            y = y * w.float()
        if b is not None:
            y = y + b.float()
        return y.to(self.dtype)

    def _cos_sin(self, positions: Any, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("cos_sin", id(positions), rope)
        hit = self._scratch.get(key)
        if hit is not None and hit[0] is positions:
            return hit[1], hit[2]
        inv = self._consts.get(("inv_freq", rope))
        if inv is None:
            inv = self._consts[("inv_freq", rope)] = torch.from_numpy(rope.inv_freq()).to(self.device)
        theta = (self._index(positions).to(torch.float64) * rope.freq_scale)[:, None] * inv[None, :]
        cos = (torch.cos(theta) * rope.attn_factor).float()
        sin = (torch.sin(theta) * rope.attn_factor).float()
        self._scratch[key] = (positions, cos, sin)
        return cos, sin

    def rope(self, x: torch.Tensor, positions: Any, rope: Rope) -> torch.Tensor:
        check_rope(x, positions, rope)
        cos, sin = self._cos_sin(positions, rope)  # (T, n_dims / 2)
        if self.use_triton:
            return _fused.rope(x.to(self.dtype), cos, sin, rope.n_dims, rope.neox)
        cos, sin = cos[:, None, :], sin[:, None, :]
        half, n = rope.n_dims // 2, rope.n_dims
        xf = x.float()
        out = xf.clone()
        if rope.neox:
            a, b = xf[..., :half], xf[..., half:n]
            out[..., :half] = a * cos - b * sin
            out[..., half:n] = a * sin + b * cos
        else:
            a, b = xf[..., 0:n:2], xf[..., 1:n:2]
            out[..., 0:n:2] = a * cos - b * sin
            out[..., 1:n:2] = a * sin + b * cos
        return out.to(self.dtype)

    # -- attention
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PassView | KVCache, layer: int,
                  spec: AttentionSpec) -> torch.Tensor:
        view = cache if isinstance(cache, StagedView) else as_view(cache, q.shape[0])
        check_attention(q, k, v, view, layer, spec)
        meta: DeviceRuns = device_runs(view, self.device)  # a captured pass's view holds its own
        keys, values = view.k[layer], view.v[layer]
        if self.use_triton:
            _fused.store(keys, values, meta.write, k, v)
        else:
            keys[meta.write] = k.to(keys.dtype)
            values[meta.write] = v.to(values.dtype)
        n_tok, n_head, _ = q.shape
        n_kv = keys.shape[1]
        B = meta.n_decode
        if not B and len(meta.runs) == 1 and not spec.softcap:  # one prompt run: its result is the output
            return self._prompt_attention(q, k, v, keys, values, meta.runs[0], spec, n_kv, n_head)
        out = torch.empty((n_tok, n_head * values.shape[2]), dtype=self.dtype, device=q.device)
        if B and self.use_triton:
            _fused.decode_attention(q[:B], keys, values, meta.tables, meta.lens, spec.scale, spec.softcap,
                                   spec.window, self._slopes(spec, n_kv, n_head), out[:B], BLOCK)
        elif B:
            kd, vd = keys[meta.gather].float(), values[meta.gather].float()  # (B, L, kv, dim)
            L = kd.shape[1]
            pos = torch.arange(L, device=q.device)
            q_pos = meta.lens - 1
            masked = pos[None, :] > q_pos[:, None]  # (B, L)
            if spec.window:
                masked = masked | (pos[None, :] <= q_pos[:, None] - spec.window)
            qg = q[:B].float().reshape(B, n_kv, n_head // n_kv, -1)
            scores = torch.einsum("bkgd,blkd->bkgl", qg, kd) * spec.scale
            scores = self._bias(scores, pos, spec, n_kv, n_head, q_axis=False)
            scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[:B] = torch.einsum("bkgl,blkd->bkgd", probs, vd).reshape(B, -1).to(self.dtype)
        for run in meta.runs:
            t0, t1, p0, rows = run
            n, T = len(rows), t1 - t0
            if not spec.softcap:
                out[t0:t1] = self._prompt_attention(q, k, v, keys, values, run, spec, n_kv, n_head)
                continue
            kr, vr = keys[rows].float(), values[rows].float()  # (n, kv, dim)
            pos, keep = self._attended(T, n, p0, spec)
            masked = ~keep
            qg = q[t0:t1].float().reshape(T, n_kv, n_head // n_kv, -1)
            scores = torch.einsum("tkgd,skd->kgts", qg, kr) * spec.scale
            scores = self._bias(scores, pos, spec, n_kv, n_head, q_axis=True)
            scores = scores.masked_fill(masked, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[t0:t1] = torch.einsum("kgts,skd->tkgd", probs, vr).reshape(T, -1).to(self.dtype)
        return out

    def _prompt_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, run: tuple, spec: AttentionSpec, n_kv: int, n_head: int) -> torch.Tensor:
        """One run of T tokens through torch's fused attention: causal, else a mask (ALiBi: an additive
        bias); (T, heads * dim). A run that starts its sequence attends to exactly its own keys and
        values, which are k and v as stored where the stores have their dtype (no gather)."""
        t0, t1, p0, rows = run
        n, T = len(rows), t1 - t0
        dt = self.dtype if spec.alibi_slopes is None else torch.float32  # (bias * positions: float32)
        if p0 == 0 and n == T and keys.dtype == k.dtype and values.dtype == v.dtype:
            kr, vr = k[t0:t1].to(dt), v[t0:t1].to(dt)
        else:
            kr, vr = keys[rows].to(dt), values[rows].to(dt)  # (n, kv, dim)
        mask = self._prompt_mask(T, n, p0, spec, n_kv, n_head)
        o = F.scaled_dot_product_attention(q[t0:t1].to(dt).transpose(0, 1)[None], kr.transpose(0, 1)[None],
                                           vr.transpose(0, 1)[None], attn_mask=mask,
                                           is_causal=mask is None and spec.causal,
                                           scale=spec.scale, enable_gqa=n_kv != n_head)
        return o[0].transpose(0, 1).reshape(T, -1).to(self.dtype)

    def _prompt_mask(self, T: int, n: int, p0: int, spec: AttentionSpec, n_kv: int, n_head: int) -> Any:
        """What scaled_dot_product_attention takes for T queries at positions p0.. over keys 0..n-1: None
        where its own causal mask is the one (no earlier positions, no window, no ALiBi) or none is
        (not `spec.causal`: every key attended), else a boolean mask (True: attended), or with ALiBi a
        float32 bias (heads, T, n). Made once per pass: every layer of the pass shares it."""
        if not spec.causal or (p0 == 0 and n == T and not spec.window and spec.alibi_slopes is None):
            return None
        key = ("prompt_mask", T, n, p0, spec.window, id(spec) if spec.alibi_slopes is not None else None)
        hit = self._scratch.get(key)
        if hit is not None:
            return hit
        pos, keep = self._attended(T, n, p0, spec)
        mask: Any = keep
        if spec.alibi_slopes is not None:
            bias = torch.zeros((T, n), dtype=torch.float32, device=self.device).masked_fill(~keep, float("-inf"))
            mask = (bias + self._slopes(spec, n_kv, n_head)[:, None, None] * pos.float())[None]
        self._scratch[key] = mask
        return mask

    def _attended(self, T: int, n: int, p0: int, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Key positions 0..n-1, and which of them each of T queries at positions p0.. attends (T, n):
        its own and earlier ones (all, where not `spec.causal`), within the window where there is one."""
        pos = torch.arange(n, device=self.device)
        q_pos = p0 + torch.arange(T, device=self.device)
        keep = pos[None, :] <= (q_pos[:, None] if spec.causal else n - 1)
        if spec.window:
            keep = keep & (pos[None, :] > q_pos[:, None] - spec.window)
        return pos, keep

    def _bias(self, scores: torch.Tensor, pos: torch.Tensor, spec: AttentionSpec, n_kv: int, n_head: int,
              q_axis: bool) -> torch.Tensor:
        """Softcap and ALiBi on scores (kv, group, queries, keys) (`q_axis`) or (B, kv, group, keys)."""
        if spec.softcap:
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        if spec.alibi_slopes is not None:
            slopes = self._slopes(spec, n_kv, n_head).reshape(n_kv, n_head // n_kv)
            scores = scores + slopes.reshape(slopes.shape + (1,) * (2 if q_axis else 1)) * pos.float()
        return scores

    def _slopes(self, spec: AttentionSpec, n_kv: int, n_head: int) -> torch.Tensor | None:
        """The spec's ALiBi slopes on the device (made once per spec)."""
        if spec.alibi_slopes is None:
            return None
        key = ("alibi", id(spec))
        hit = self._consts.get(key)
        if hit is None or hit[0] is not spec:
            slopes = torch.from_numpy(np.asarray(spec.alibi_slopes, np.float32)).to(self.device)
            hit = self._consts[key] = (spec, slopes)
        return hit[1]

    # -- elementwise
    def silu(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x.float()).to(self.dtype)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x.float(), approximate="tanh").to(self.dtype)

    def gelu_erf(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x.float()).to(self.dtype)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            return _fused.glu(gate, up, silu=True)
        return (F.silu(gate.float()) * up.float()).to(self.dtype)

    def geglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            return _fused.glu(gate, up, silu=False)
        return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(self.dtype)

    def lora_weights(self, a: Tensor, b: Tensor) -> Any:
        # an adapter's scale is read at each call, which a captured CUDA graph would not replay
        self.graphs = None
        a32, bt32 = super().lora_weights(a, b)
        return torch.from_numpy(a32).to(self.device, self.dtype), torch.from_numpy(bt32).to(self.device, self.dtype)

    def lora(self, x: torch.Tensor, y: torch.Tensor, ab: Any, factor: float) -> torch.Tensor:
        a, bt = ab
        return y + ((x.to(self.dtype) @ a.T) * factor) @ bt

    def softcap(self, x: torch.Tensor, cap: float) -> torch.Tensor:
        return (torch.tanh(x.float() / cap) * cap).to(self.dtype)

    def rotate(self, x: torch.Tensor, n: int) -> torch.Tensor:
        check_rotate(x, n)
        h = torch.from_numpy(hadamard(n)).to(x.device, x.dtype)
        return (x.reshape(-1, n) @ h).reshape(x.shape)

    def clamp(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.clamp(x, lo, hi)

    def experts(self, gate: Tensor, up: Tensor, down: Tensor) -> tuple[list[Any], list[Any]]:
        # the router's picks are read on the host (models/experts.py) every layer, which a captured
        # CUDA graph could not replay: a model with experts runs its decode steps uncaptured
        self.graphs = None
        return super().experts(gate, up, down)

    def mix_rows(self, n_rows: int, parts: list[tuple[np.ndarray, Any, np.ndarray]]) -> torch.Tensor:
        out = torch.zeros((n_rows, parts[0][1].shape[1]), dtype=self.dtype, device=self.device)
        for rows, y, w in parts:  # experts in order: a token's sum does not depend on its company
            out.index_add_(0, self._index(rows), y * torch.from_numpy(w).to(self.device, self.dtype)[:, None])
        return out

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


__all__ = ["TorchBackend"]
