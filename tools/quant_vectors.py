"""Make tests/fixtures/quant_vectors.npz: rows quantized by llama.cpp itself, for
tests/test_quant_encode.py to compare purelm.quant.quantize against without llama.cpp: the full
bytes of a few awkward rows, and per-row digests of many synthetic rows (made again by the test
with synthetic_rows: integer arithmetic, the same floats everywhere), so that search branches
taken by a fraction of a percent of blocks are covered too.

    python tools/quant_vectors.py --lib DIR [--out PATH]
    python tools/quant_vectors.py --lib DIR --compare [OTHER_DIR ...] [--model GGUF] [--rows N]
    python tools/quant_vectors.py --lib DIR --bench

DIR holds a libggml-base.so; its exported `ggml_quantize_chunk` (the function llama-quantize calls)
does the quantizing, through ctypes. Use a build made with -ffp-contract=off (purelm computes in
plain float32, one rounding per operation), e.g.

    cmake -S vendor/llama.cpp -B fpcontract-off -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
        -DCMAKE_C_FLAGS=-ffp-contract=off -DCMAKE_CXX_FLAGS=-ffp-contract=off
    cmake --build fpcontract-off --target ggml-base

(ggml-base is built for baseline x86-64 even with GGML_NATIVE, which only applies to ggml-cpu: it
holds no FMA instructions, so a native build gives the same bytes.) --compare prints, per type, the
fraction of blocks where purelm agrees with each build given, on random, synthetic and (--model)
real weights; --bench the weights/s of purelm and ggml_quantize_chunk on one thread.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from purelm.quant import GGMLType, quantize  # noqa: E402
from purelm.quant.types import BLOCK_INFO, row_bytes  # noqa: E402

T = GGMLType
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
         T.IQ4_NL, T.IQ4_XS]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests/fixtures/quant_vectors.npz"
N_PER_ROW = 512  # two K-quant super-blocks, sixteen legacy blocks
SYNTHETIC = (768, 1024, 7)  # rows, columns, seed of synthetic_rows: 3072 super-blocks a type


def load_ggml(lib_dir: str | Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(lib_dir) / "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(lib: ctypes.CDLL, qtype: GGMLType, x: np.ndarray,
                  imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for rows x (n_rows, n_per_row), as llama-quantize makes them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows, n = x.shape
    out = np.zeros((n_rows, row_bytes(qtype, n)), np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    size = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, n_rows, n,
                                   None if qw is None else qw.ctypes.data)
    assert size == out.nbytes, (qtype, size, out.nbytes)
    return out


def test_rows(rng: np.random.Generator, n: int = N_PER_ROW) -> np.ndarray:
    """Rows covering ordinary and awkward weights (all finite, float32)."""
    normal = rng.standard_normal((6, n))

    def one_hot(v: float) -> np.ndarray:
        r = np.zeros(n)
        r[rng.integers(n)] = v
        return r

    rows = [
        *normal * 0.02,                                   # typical weight magnitudes
        rng.standard_t(3, n) * 0.05,                      # heavy tails
        np.abs(normal[0]), -np.abs(normal[1]) - 1,        # one-signed blocks
        np.zeros(n), np.full(n, 0.3), np.full(n, -2.5),
        one_hot(3.7), one_hot(-1e-3),
        normal[2] * 1e-6, normal[3] * 1e-30, normal[4] * 1e4,   # f16 subnormal / zero / large
        rng.integers(-8, 8, n), rng.integers(-4, 4, n) / 4,     # grid points, ties
        np.linspace(-1, 1, n),
        np.where(rng.random(n) < 0.9, 0, normal[5]),      # mostly zero
        normal[0] * 1e30, one_hot(-3e38), np.full(n, 3e38),  # sums and scales overflow to inf
        np.where(normal[1] > 0, 1e20, -1e-20), np.full(n, -1e-45),
    ]
    return np.array(rows, dtype=np.float32)


def test_imatrix(rng: np.random.Generator, n: int = N_PER_ROW) -> np.ndarray:
    """Importance weights shaped like llama-imatrix's (mean squared activations), a few zero."""
    w = rng.gamma(0.7, 1.0, n) ** 2
    w[rng.random(n) < 0.03] = 0
    return w.astype(np.float32)


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: well-mixed uint64 from counters (wrapping integer arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def synthetic_rows(n_rows: int, n_cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and an importance matrix from integer arithmetic only, so every platform and numpy
    version makes the same floats (the fixture stores digests of these rows' bytes, not the rows):
    sums of four 12-bit uniforms (near Gaussian, sd ~0.018), every third row times an 8-bit
    uniform (heavier tails), row scales 2**-3..2**3; all exact in float32."""
    z = mix64(np.arange(n_rows * n_cols, dtype=np.uint64) + np.uint64(seed << 40))
    fields = [((z >> np.uint64(12 * k)) & np.uint64(0xFFF)).astype(np.int64) for k in range(5)]
    q = fields[0] + fields[1] + fields[2] + fields[3] - 2 * 4095
    q = q.reshape(n_rows, n_cols)
    q[::3] *= fields[4].reshape(n_rows, n_cols)[::3] >> 4
    x = q.astype(np.float32) * np.float32(2.0**-17)
    x[1::3] *= np.float32(2.0**-12)
    x *= (2.0 ** (np.arange(n_rows) % 7 - 3)).astype(np.float32)[:, None]
    w = (mix64(np.arange(n_cols, dtype=np.uint64) + np.uint64((seed + 1) << 40))
         & np.uint64(0xFFF)).astype(np.float32)
    w = w * w * np.float32(2.0**-20)
    w[::37] = 0
    return x, w


def row_digests(q: np.ndarray) -> np.ndarray:
    """8 bytes of BLAKE2b per row of quantized bytes."""
    return np.array([np.frombuffer(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), np.uint8)
                     for r in q])


def make(lib_dir: str, out: Path) -> None:
    lib = load_ggml(lib_dir)
    rng = np.random.default_rng(20261126)
    x = test_rows(rng)
    imatrix = test_imatrix(rng)
    sx, sw = synthetic_rows(*SYNTHETIC)
    arrays = {"x": x, "imatrix": imatrix, "synthetic": np.array(SYNTHETIC)}
    for qtype in TYPES:
        arrays[qtype.name] = ggml_quantize(lib, qtype, x)
        arrays[qtype.name + "_imatrix"] = ggml_quantize(lib, qtype, x, imatrix)
        arrays[qtype.name + "_synthetic"] = row_digests(ggml_quantize(lib, qtype, sx))
        arrays[qtype.name + "_synthetic_imatrix"] = row_digests(ggml_quantize(lib, qtype, sx, sw))
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(x)} rows of {x.shape[1]})")


def real_rows(model: str, max_rows: int) -> np.ndarray:
    """Weight rows of a GGUF model (dequantized): the first max_rows of each 2-D tensor whose rows
    are whole K-quant super-blocks (SmolLM2: the 30 ffn_down, rows of 1536)."""
    from purelm.formats.gguf import GGUFFile

    rows = []
    with GGUFFile(model) as f:
        for t in f.tensors.values():
            if len(t.shape) == 2 and t.shape[-1] % 256 == 0:
                rows.append(t.dequantize()[:max_rows])
    return np.concatenate(rows).astype(np.float32)


def block_agreement(a: np.ndarray, b: np.ndarray, qtype: GGMLType) -> float:
    size = BLOCK_INFO[qtype][1]
    return float((a.reshape(-1, size) == b.reshape(-1, size)).all(axis=1).mean())


def compare(libs: list[str], model: str | None, n_random: int) -> None:
    rng = np.random.default_rng(1)
    sets = {"random": (rng.standard_normal((n_random, 1024)) * rng.uniform(0.005, 0.1, (n_random, 1)))
            .astype(np.float32)}
    sets["synthetic"] = synthetic_rows(*SYNTHETIC)[0]
    if model:
        sets["real"] = real_rows(model, 64)
    loaded = [load_ggml(d) for d in libs]
    print("fraction of identical blocks, purelm against: " + "  ".join(libs))
    for name, x in sets.items():
        imatrix = test_imatrix(rng, x.shape[1])
        for qtype in TYPES:
            for qw in (None, imatrix):
                ours = quantize(x, qtype, qw)
                cols = [f"{block_agreement(ours, ggml_quantize(lib, qtype, x, qw), qtype):.6f}"
                        for lib in loaded]
                label = qtype.name + (" +imatrix" if qw is not None else "")
                blocks = x.size // BLOCK_INFO[qtype][0]
                print(f"{name:9s} {label:16s} {blocks:7d} blocks  " + "  ".join(cols))


def bench(lib_dir: str, x: np.ndarray, types: list[GGMLType]) -> None:
    """Weights/s of purelm and of ggml_quantize_chunk (one thread each; purelm also on all of
    numba's threads), without and with an importance matrix, runs alternating."""
    import numba

    threads = numba.get_num_threads()
    lib = load_ggml(lib_dir)
    imatrix = test_imatrix(np.random.default_rng(3), x.shape[1])
    for qtype in types:
        for qw in (None, imatrix):
            quantize(x[:2], qtype, qw)  # compile / load
            numba.set_num_threads(1)
            t0 = time.perf_counter()
            quantize(x, qtype, qw)
            t1 = time.perf_counter()
            ggml_quantize(lib, qtype, x, qw)
            t2 = time.perf_counter()
            numba.set_num_threads(threads)
            quantize(x, qtype, qw)
            t3 = time.perf_counter()
            label = qtype.name + (" +imatrix" if qw is not None else "")
            print(f"{label:16s} Mweights/s, 1 thread: purelm {x.size / (t1 - t0) / 1e6:6.1f}  "
                  f"ggml_quantize_chunk {x.size / (t2 - t1) / 1e6:6.1f}  |  purelm on {threads} "
                  f"threads {x.size / (t3 - t2) / 1e6:6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", required=True, help="folder with libggml-base.so (-ffp-contract=off)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the fixture to write")
    ap.add_argument("--compare", nargs="*", metavar="DIR",
                    help="instead of writing: agreement with --lib and these builds")
    ap.add_argument("--model", help="a GGUF model whose weights --compare also uses")
    ap.add_argument("--rows", type=int, default=512, help="random rows for --compare")
    ap.add_argument("--bench", action="store_true", help="instead of writing: weights/s of both")
    args = ap.parse_args()
    if args.bench:
        x = (np.random.default_rng(2).standard_normal((1024, 2048)) * 0.02).astype(np.float32)
        bench(args.lib, x, [T.Q4_K, T.Q2_K, T.Q3_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.Q4_0])
    elif args.compare is not None:
        compare([args.lib, *args.compare], args.model, args.rows)
    else:
        make(args.lib, args.out)


if __name__ == "__main__":
    main()
