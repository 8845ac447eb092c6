"""Every bad argument to the Python API raises UsageError (a PurelmError and a ValueError) naming the
argument and what it may be, before any work is done."""
import numpy as np
import pytest

import purelm
from purelm.errors import PurelmError, UsageError


@pytest.fixture(scope="module")
def tiny(fixtures):
    return purelm.load(fixtures / "llama-f32.gguf", backend="numpy", n_ctx=64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_ctx=0), "n_ctx must be >= 1"),
    (dict(n_ctx=-5), "n_ctx must be >= 1"),
    (dict(n_ctx="4096"), "n_ctx must be a whole number"),
    (dict(n_ctx=64.0), "n_ctx must be a whole number"),
    (dict(threads=0), "threads must be >= 1"),
    (dict(threads=True), "threads must be a whole number"),
    (dict(backend="cuda"), "backend must be one of 'numba', 'numpy'"),
])
def test_load_arguments(fixtures, kwargs, message):
    with pytest.raises(UsageError, match=message):
        purelm.load(fixtures / "llama-f32.gguf", **kwargs)


def test_load_path_type():
    with pytest.raises(UsageError, match="path_or_name must be a path"):
        purelm.load(42)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temprature=0.5), "unknown generation option.*temprature.*known: max_tokens"),
    (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(max_tokens="5"), "max_tokens must be a whole number"),
    (dict(max_tokens=True), "max_tokens must be a whole number"),
    (dict(max_tokens=2.5), "max_tokens must be a whole number"),
    (dict(temperature=-1), "temperature must be >= 0; 0 is greedy"),
    (dict(temperature=float("inf")), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=1.5), "top_p must be between 0 and 1"),
    (dict(min_p=-0.5), "min_p must be between 0 and 1"),
    (dict(repeat_penalty=0), "repeat_penalty must be > 0"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(seed=-1), "seed must be >= 0, or None"),
    (dict(stop=5), "stop must be a str or a list of str"),
    (dict(stop=["ok", None]), "stop must be a str or a list of str"),
])
def test_generation_options(tiny, kwargs, message):
    with pytest.raises(UsageError, match=message):
        tiny.stream_chunks("The quick", **kwargs)  # raised at the call, before any token


@pytest.mark.parametrize("prompt, message", [
    ([], "the prompt is empty"),
    (b"bytes", "prompt must be a str or a list of token ids, got bytes"),
    (7, "prompt must be a str or a list of token ids, got int"),
    ([1, 10**6], r"prompt: 1000000 is not a token id \(whole numbers in \[0, "),
    ([1, -1], "prompt: -1 is not a token id"),
    ([1, 2.0], "prompt: 2.0 is not a token id"),
    ("a\udcff", "text is not valid Unicode"),
])
def test_prompts(tiny, prompt, message):
    with pytest.raises(UsageError, match=message):
        tiny.generate(prompt, max_tokens=1)


def test_ids_of_logits_tokenize_and_detokenize(tiny):
    for bad, message in [([], "ids is empty"), ([tiny.n_vocab], "is not a token id"), ([True], "True is not"),
                         (3, "ids must be a str or a list of token ids")]:
        with pytest.raises(UsageError, match=message):
            tiny.logits(bad)
    with pytest.raises(UsageError, match="is not a token id"):
        tiny.detokenize([tiny.tokenizer.vocab_size])
    with pytest.raises(UsageError, match="text must be a str, got bytes"):
        tiny.tokenize(b"x")
    # numpy ints and arrays are fine
    assert tiny.detokenize(np.array(tiny.tokenize("The quick"))) == "The quick"


def test_usage_error_is_a_purelm_error_and_a_value_error(tiny):
    with pytest.raises(PurelmError):
        tiny.generate("x", max_tokens=-1)
    with pytest.raises(ValueError):
        tiny.generate("x", max_tokens=-1)


def test_a_stop_string_alone_is_one_stop(tiny):
    opts = dict(max_tokens=24, temperature=0, ignore_eos=True)
    full = tiny.generate("The quick", **opts)
    stop = full[5:8]
    assert tiny.generate("The quick", stop=stop, **opts) == full[: full.index(stop)]


def test_a_batch_or_cache_larger_than_memory_is_refused_before_any_work(tiny, monkeypatch):
    from purelm.backends import kv_cache

    monkeypatch.setattr(kv_cache, "available_memory", lambda: 2**30)  # this test's host: 1 GiB free
    block = tiny.model.new_cache(64).block_bytes  # 64 positions of every layer's keys and values
    n = 2**30 // block + 1  # one block a sample is more than 1 GiB
    with pytest.raises(UsageError, match=rf"1 prompt\(s\) x n = {n} samples .* blocks .* GiB of KV cache, and 1.0 GiB"):
        tiny.generate_batch(["x"], n=n, max_tokens=2)  # at once: no sampler, fork or pass made first
    assert len(tiny.generate_batch(["x"], n=3, max_tokens=2)) == 3
    with pytest.raises(UsageError, match="the logits of 900000 positions take 1.1 GiB, and 1.0 GiB"):
        tiny.logits([1] * 900_000)  # 900,000 x 320 float32
    # any growth of a cache past the memory available: an error, the cache as it was
    cache = tiny.model.new_cache(64)
    cache.reserve(64)
    monkeypatch.setattr(kv_cache, "available_memory", lambda: block - 1)
    with pytest.raises(UsageError, match="growing the KV cache to 512 positions needs"):
        for _ in range(8):
            cache.reserve(64, cache.add())
    assert cache.capacity == 4 and cache.nbytes == 4 * block
    # the 4 blocks a doubling adds are zero pages until written: the block asked for and a store's
    # copy must fit, not all of them
    monkeypatch.setattr(kv_cache, "available_memory", lambda: 3 * block)
    cache.reserve(64, cache.add())
    assert cache.capacity == 8
    monkeypatch.setattr(kv_cache, "available_memory", lambda: None)  # unknown (not Linux): no check
    for _ in range(4):
        cache.reserve(64, cache.add())
    assert cache.capacity == 16
