"""The K-quant fixtures: each of issue 16's architectures at widths of 256 (`NAME-w256-q4_k_m.gguf`, made
by `tools/make_fixtures.py --kquant`: purelm convert to f32, then `purelm quantize ... Q4_K_M`, llama-quantize's
mix), so that every quantized matrix is Q4_K or Q6_K rather than a legacy fallback, against transformers
running the same dequantized weights (`NAME-w256-ref-q4_k_m.npz`), on every backend: numpy, numba's float32,
int16 and (with AVX512-VNNI) int8 decode paths, and torch on the CPU device. Tolerances are those of
tests/test_models.py (conftest.logits_rel); the mixture-of-experts fixtures run the int8 path too: on these
files no router pick moves far enough to leave its bound (measured: 4.9e-2 of 0.4 at most)."""
import gguf
import numpy as np
import pytest
from conftest import FIXTURES, activation_rule, int8_activations, int16_activations
from test_models import backend_id, backends, logits_tol

from purelm.formats.gguf import GGUFFile
from purelm.models import build_model

# fixture -> GGUF architecture (mixtral and the llama3 rope scaling are `llama`, Phi-4 is `phi3`)
ARCH = {"qwen3-w256": "qwen3", "olmo2-w256": "olmo2", "smollm3-w256": "smollm3", "llama3rope-w256": "llama",
        "phi4-w256": "phi3", "nemo-w256": "llama", "qwen3moe-w256": "qwen3moe", "mixtral-w256": "llama",
        "olmoe-w256": "olmoe"}
MOE = {"qwen3moe-w256", "mixtral-w256", "olmoe-w256"}
QTYPE = "q4_k_m"
K_TYPES = {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K}


def torch_cpu():
    """fp32 on torch's CPU device (skipped, with the reason, where PyTorch is not installed)."""
    pytest.importorskip("torch", reason="the torch backend needs PyTorch: pip install 'purelm[torch]'")
    from purelm.backends.torch_backend import TorchBackend

    return TorchBackend("cpu", "fp32", triton=False)


BACKENDS = [pytest.param(b, id=backend_id(b)) for b in backends()] + [pytest.param(torch_cpu, id="torch-cpu")]


def test_every_architecture_has_its_fixture():
    made = sorted(p.name[: -len(f"-ref-{QTYPE}.npz")] for p in FIXTURES.glob(f"*-ref-{QTYPE}.npz"))
    assert made == sorted(ARCH)


def test_rows_of_two_super_blocks_are_covered():
    # qwen3's and nemo's Wo (4 heads of 128 on a width of 256) and olmo2's ffn_down (FFN of 512): rows of
    # 512, so that the kernels step from one super-block to the next in both types
    wide = {(n, t.name): t.tensor_type for n in ARCH for t in gguf.GGUFReader(FIXTURES / f"{n}-{QTYPE}.gguf").tensors
            if len(t.shape) > 1 and int(t.shape[0]) == 512}
    assert set(wide.values()) == K_TYPES, wide
    assert {n for n, _ in wide} == {"qwen3-w256", "nemo-w256", "olmo2-w256"}


@pytest.mark.parametrize("name", sorted(ARCH))
def test_every_matrix_is_a_k_quant(name):
    # what llama-quantize's Q4_K_M gives these widths: Q4_K, Q6_K for output / attn_v / ffn_down (and the
    # fused qkv) where the mix bumps them; no tensor fell back to a legacy type
    r = gguf.GGUFReader(FIXTURES / f"{name}-{QTYPE}.gguf")
    assert r.fields["general.architecture"].contents() == ARCH[name]
    quantized = {t.name: t.tensor_type for t in r.tensors if t.tensor_type != gguf.GGMLQuantizationType.F32}
    assert set(quantized.values()) == K_TYPES, quantized
    for t in r.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:  # norms, rope factors and the router only
            assert len(t.shape) == 1 or "ffn_gate_inp" in t.name, t.name
        else:
            assert int(t.shape[0]) % 256 == 0, t.name
    if name in MOE:
        assert {quantized[f"blk.0.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")} == K_TYPES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(ARCH))
def test_k_quant_fixture_matches_transformers(name, backend):
    # the reference is transformers with the dequantized Q4_K/Q6_K weights (gguf-py's dequantization), so
    # only float rounding (and the numba int paths' activation rounding, conftest.logits_rel) separates them
    if callable(backend):
        backend = backend()
    ref = np.load(FIXTURES / f"{name}-ref-{QTYPE}.npz")
    model = build_model(GGUFFile(FIXTURES / f"{name}-{QTYPE}.gguf"), backend)
    cache = model.new_cache(64)
    logits = model.forward(ref["ids"], cache, all_logits=True)
    tol = logits_tol(backend, ref["logits"])
    assert np.abs(logits - ref["logits"]).max() < tol
    step = logits[-1]
    assert len(ref["greedy"]) > 0
    for i, expected in enumerate(ref["greedy"]):  # greedy decoding through the KV cache
        assert np.abs(step - ref["greedy_logits"][i]).max() < tol, i
        if getattr(backend, "int8_dot", False):  # within tol of the reference's: only a near-tie may flip
            assert step[int(expected)] >= step.max() - 2 * tol
        else:
            assert int(step.argmax()) == int(expected)
        step = model.forward(np.array([expected]), cache)
    if backend.name == "numba":  # and the K-quant kernels of the path the backend claims ran
        wo = model.layers[0].attn.wo
        assert wo.qtype.name in ("Q4_K", "Q6_K")
        want = int8_activations if backend.int8_dot else int16_activations if backend.int16_dot else None
        assert activation_rule(wo) is want
