"""The fast backend against the reference on the real SmolLM2 file: teacher-forced over 1000+ tokens of
text (a frozen snapshot of this repo's README and generate.py), the top-1 token agrees >= 99% of the
time and the perplexity is within 0.5%."""
import numpy as np
import pytest

from purelm.backends.numba_backend import NumbaBackend
from purelm.backends.numpy_backend import NumpyBackend
from purelm.formats.gguf import GGUFFile
from purelm.generate import prefill
from purelm.models import build_model
from purelm.tokenizer import Tokenizer

N_TOKENS, CHUNK = 1200, 400


@pytest.fixture(scope="module")
def runs(smollm2_path, fixtures):
    f = GGUFFile(smollm2_path)
    ids = Tokenizer.from_gguf_metadata(f.metadata).encode((fixtures / "agreement.txt").read_text())[:N_TOKENS]
    assert len(ids) == N_TOKENS
    out = {}
    for backend in (NumpyBackend(), NumbaBackend(2)):
        model = build_model(f, backend)
        # llama.cpp's perplexity layout: independent chunks, each scored on its second half
        chunks = [prefill(model, model.new_cache(CHUNK), ids[i : i + CHUNK], all_logits=True)
                  for i in range(0, N_TOKENS, CHUNK)]
        out[backend.name] = np.concatenate(chunks)
    return np.array(ids), out


def nll(logits, ids):
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids)), ids]


def test_top1_agreement(runs):
    ids, out = runs
    agree = np.mean(out["numba"].argmax(-1) == out["numpy"].argmax(-1))
    assert agree >= 0.99


def test_perplexity_within_half_a_percent(runs):
    ids, out = runs
    keep = np.concatenate([np.arange(i + CHUNK // 2, i + CHUNK - 1) for i in range(0, N_TOKENS, CHUNK)])
    ppl = {k: float(np.exp(nll(v[keep], ids[keep + 1]).mean())) for k, v in out.items()}
    assert abs(ppl["numba"] / ppl["numpy"] - 1) < 0.005
    assert 1 < ppl["numpy"] < 100  # a sane perplexity for English text and code
