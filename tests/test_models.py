"""Model logits against transformers (fixtures made by tools/make_fixtures.py) and the real SmolLM2 file."""

import numpy as np
import pytest

from purelm.backends.numpy_backend import NumpyBackend
from purelm.errors import FormatError
from purelm.formats.gguf import GGUFFile, GGUFWriter
from purelm.models import build_model

from conftest import FIXTURES, logits_rel

# Every tiny architecture that tools/make_fixtures.py made.
TINY = sorted(p.name.split("-ref-")[0] for p in FIXTURES.glob("*-ref-f32.npz"))
TYPES = ["f32", "f16", "q8_0", "q4_0"]
MOE = {"qwen3moe", "mixtral", "olmoe"}  # mixture-of-experts fixtures


def backends():
    # The reference backend and the fast CPU backend (numba is a dependency, so it is always there),
    # both held to the same 1e-4 where the fast kernels accumulate in float32 like the reference; and
    # the fast backend's decode kernels where the CPU has integer dot products: int16 activations, and
    # int8 ones where it has AVX512-VNNI (conftest.logits_rel).
    from purelm.backends.numba_backend import NumbaBackend

    out = [NumpyBackend(), NumbaBackend(2, int16_dot=False)]
    int16, int8 = NumbaBackend(2), NumbaBackend(2, int8_dot=True)
    return out + [b for b in (int16, int8) if b.int16_dot and (b is int16 or b.int8_dot)]


def backend_id(b) -> str:
    return b.name + ("-int8" if getattr(b, "int8_dot", False) else "-int16" if getattr(b, "int16_dot", False) else "")


def logits_tol(backend, ref_logits) -> float:
    if getattr(backend, "int16_dot", False):
        return logits_rel(backend) * float(np.abs(ref_logits).max())
    return 1e-4


@pytest.mark.parametrize("backend", backends(), ids=backend_id)
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("arch", TINY)
def test_tiny_model_matches_transformers(fixtures, arch, qtype, backend):
    # f32: the reference is the original HF model; other types: transformers running the same GGUF.
    if arch in MOE and getattr(backend, "int8_dot", False):
        pytest.skip("int8 activations move a router's input enough to pick other experts (llama.cpp's "
                    "q8 activations do too), and a flipped pick moves logits without bound; the MoE "
                    "layers are held to the float32 and int16 paths, the int8 kernels per product")
    ref = np.load(fixtures / f"{arch}-ref-{qtype}.npz")
    model = build_model(GGUFFile(fixtures / f"{arch}-{qtype}.gguf"), backend)
    cache = model.new_cache(64)
    logits = model.forward(ref["ids"], cache, all_logits=True)
    tol = logits_tol(backend, ref["logits"])
    assert np.abs(logits - ref["logits"]).max() < tol
    step = logits[-1]
    for i, expected in enumerate(ref["greedy"]):  # greedy decoding through the KV cache
        assert np.abs(step - ref["greedy_logits"][i]).max() < tol
        if getattr(backend, "int8_dot", False):  # logits within tol of the reference's: only a near-tie may flip
            assert step[int(expected)] >= step.max() - 2 * tol
        else:
            assert int(step.argmax()) == int(expected)
        step = model.forward(np.array([expected]), cache)


@pytest.mark.parametrize("arch", TINY)
def test_quantized_conversions_stay_near_f32(fixtures, arch):
    # Relative RMS error of the logits against the f32 file. The tiny models have random weights
    # scaled up 8x, which amplifies rounding, so q4_0's bound is loose; f16 and q8_0 are tight.
    ids = np.load(fixtures / f"{arch}-ref-f32.npz")["ids"]
    out = {}
    for qtype in TYPES:
        m = build_model(GGUFFile(fixtures / f"{arch}-{qtype}.gguf"), NumpyBackend())
        out[qtype] = m.forward(ids, m.new_cache(64), all_logits=True)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    # MoE: rounded weights also flip a few expert picks per layer (q8_0 measured 0.044-0.084)
    q8_tol = 0.12 if arch in MOE else 0.06
    for qtype, tol in (("f16", 0.005), ("q8_0", q8_tol), ("q4_0", 0.6)):
        assert rms(out[qtype] - out["f32"]) < tol * rms(out["f32"]), qtype


@pytest.mark.parametrize("backend", backends(), ids=backend_id)
def test_smollm2_matches_transformers(smollm2_path, fixtures, backend):
    ref = np.load(fixtures / "smollm2-ref.npz")
    model = build_model(GGUFFile(smollm2_path), backend)
    # short prompts take the decode kernels: int16 activations through 30 layers move these logits (up
    # to 37) by up to 8.6e-3 (measured), float32 ones by 5e-5, int8 ones by ~1 (as llama.cpp's)
    int8 = getattr(backend, "int8_dot", False)
    tol = 2.5 if int8 else 0.04 if getattr(backend, "int16_dot", False) else 2e-3
    for i in range(3):
        logits = model.forward(ref[f"ids{i}"], model.new_cache(128), all_logits=True)
        assert np.abs(logits[-1] - ref[f"last{i}"]).max() < tol
        assert np.abs(logits[:, ref["cols"]] - ref[f"cols{i}"]).max() < tol
    cache = model.new_cache(64)
    step = model.forward(ref["ids0"], cache)
    greedy = []
    for expected in ref["greedy0"].tolist():
        greedy.append(int(step.argmax()))
        if int8:  # within tol of the reference's logits: a near-tie may flip; go on with its token
            assert step[expected] >= step.max() - 2 * tol
            greedy[-1] = expected
        step = model.forward(np.array(greedy[-1:]), cache)
    assert greedy == ref["greedy0"].tolist()


def _copy_without(src, dst, drop=None, reshape=None, arch=None):
    f = GGUFFile(src)
    w = GGUFWriter(dst)
    for k in f.metadata:
        value = f.metadata[k]
        if k == "general.architecture" and arch:
            value = arch
        w.add(k, value, f.metadata.types[k], f.metadata.array_types.get(k))
    for t in f.tensors.values():
        if t.name == drop:
            continue
        shape = reshape[1] if reshape and t.name == reshape[0] else t.shape
        data = t.data if shape == t.shape else np.zeros(int(np.prod(shape)) * t.data.nbytes // t.n_elements, np.uint8)
        w.add_tensor(t.name, data, t.type, shape)
    w.write()
    return dst


def test_missing_tensor_is_named(fixtures, tmp_path):
    path = _copy_without(fixtures / "llama-f32.gguf", tmp_path / "m.gguf", drop="blk.1.ffn_up.weight")
    with pytest.raises(FormatError, match=r"blk\.1\.ffn_up\.weight.*missing.*\(128, 64\)"):
        build_model(GGUFFile(path), NumpyBackend())


def test_shape_mismatch_is_named(fixtures, tmp_path):
    path = _copy_without(fixtures / "llama-f32.gguf", tmp_path / "m.gguf", reshape=("blk.0.attn_k.weight", (32, 64)))
    with pytest.raises(FormatError, match=r"blk\.0\.attn_k\.weight.*\(32, 64\), expected \(64, 64\)"):
        build_model(GGUFFile(path), NumpyBackend())


def test_unknown_architecture(fixtures, tmp_path):
    path = _copy_without(fixtures / "llama-f32.gguf", tmp_path / "m.gguf", arch="mamba9")
    with pytest.raises(FormatError, match="'mamba9' is not supported"):
        build_model(GGUFFile(path), NumpyBackend())


def test_context_overflow_is_clear(fixtures):
    from purelm.errors import ContextOverflowError

    model = build_model(GGUFFile(fixtures / "llama-f32.gguf"), NumpyBackend())
    cache = model.new_cache(8)
    with pytest.raises(ContextOverflowError, match="do not fit in the context of 8"):
        model.forward(np.arange(9), cache)
