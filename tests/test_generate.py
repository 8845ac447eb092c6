"""Generation and the Python API, on the tiny llama fixture (fast) and the real SmolLM2 file."""
import numpy as np
import pytest

import purelm
from purelm.backends.base import KVCache
from purelm.errors import ContextOverflowError, UsageError
from purelm.generate import _StopMatcher, stream_tokens, truncate_prompt
from purelm.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(fixtures):
    return purelm.load(fixtures / "llama-f32.gguf", backend="numpy", n_ctx=64)


def test_logits_equal_transformers(tiny, fixtures):
    ref = np.load(fixtures / "llama-ref-f32.npz")
    assert np.abs(tiny.logits(ref["ids"].tolist()) - ref["logits"]).max() < 1e-4


def test_greedy_generation_follows_argmax(tiny, fixtures):
    ref = np.load(fixtures / "llama-ref-f32.npz")
    done = tiny.complete(ref["ids"].tolist(), max_tokens=8, temperature=0, ignore_eos=True)
    assert done.tokens == ref["greedy"].tolist()
    assert done.finish_reason == "length"
    assert done.text == tiny.detokenize(done.tokens)


def test_stream_pieces_join_to_the_plain_call(tiny):
    opts = dict(max_tokens=20, temperature=0.9, seed=3, ignore_eos=True)
    assert "".join(tiny.stream("The quick", **opts)) == tiny.generate("The quick", **opts)


def test_seed_reproducible_and_different_seeds_differ(tiny):
    opts = dict(max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True)
    a = tiny.complete("The", seed=1, **opts).tokens
    assert a == tiny.complete("The", seed=1, **opts).tokens
    assert a != tiny.complete("The", seed=2, **opts).tokens


def test_cached_prefix_gives_the_same_result_as_a_fresh_context(tiny, fixtures):
    opts = dict(max_tokens=6, temperature=0, ignore_eos=True)
    tiny.reset()
    first = tiny.complete("The quick brown", **opts).tokens
    again = tiny.complete("The quick brown fox", **opts).tokens  # reuses the cached "The quick brown"
    assert tiny.cache.n_past > 0
    fresh = purelm.load(fixtures / "llama-f32.gguf", backend="numpy", n_ctx=64)
    assert fresh.complete("The quick brown fox", **opts).tokens == again
    assert fresh.complete("The quick brown", **opts).tokens == first


def test_stop_string_cuts_the_text(tiny):
    opts = dict(max_tokens=24, temperature=0, ignore_eos=True)
    full = tiny.generate("The quick", **opts)
    stop = full[5:8]
    cut = tiny.complete("The quick", stop=[stop], **opts)
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_max_tokens_and_context_limits(tiny):
    done = tiny.complete("The quick", max_tokens=3, temperature=0, ignore_eos=True)
    assert len(done.tokens) == 3 and done.finish_reason == "length"
    long_prompt = list(range(5, 69))  # 64 tokens: no room left in a 64-token context
    with pytest.raises(ContextOverflowError, match="64 tokens but the context holds 64"):
        tiny.generate(long_prompt, max_tokens=2)
    done = tiny.complete(long_prompt, max_tokens=2, temperature=0, truncate=True, ignore_eos=True)
    assert len(done.tokens) == 2 and done.finish_reason == "length"


def test_truncation_leaves_room_for_max_tokens(tiny):
    long_prompt = list(range(5, 205))  # 200 tokens, a 64-token context
    opts = dict(temperature=0, truncate=True, ignore_eos=True)
    done = tiny.complete(long_prompt, max_tokens=20, **opts)
    assert len(done.tokens) == 20 and done.prompt_tokens == 44
    # the kept end is what a fresh context sees
    assert done.tokens == tiny.complete(long_prompt[-44:], max_tokens=20, **opts).tokens
    done = tiny.complete(long_prompt, max_tokens=500, **opts)  # more than the context: keep half of it
    assert done.prompt_tokens == 32 and len(done.tokens) == 33  # until full (the last token needs no slot)


def test_truncate_prompt_rule():
    ids = list(range(100))
    assert truncate_prompt(ids, 64, 10) == ids[-54:]
    assert truncate_prompt(ids[:20], 64, 10) == ids[:20]  # short enough: whole
    assert truncate_prompt(ids, 64, 63) == ids[-1:]  # at least one prompt token
    assert truncate_prompt(ids, 64, 64) == ids[-32:] == truncate_prompt(ids, 64, 1000)


def test_bad_options_are_rejected(tiny):
    with pytest.raises(UsageError, match="unknown generation option.*temprature"):
        tiny.generate("x", temprature=0.5)
    with pytest.raises(UsageError, match="max_tokens must be >= 1"):
        tiny.generate("x", max_tokens=0)


def test_stop_matcher_holds_back_partial_matches():
    m = _StopMatcher(["</s>", "STOP"])
    assert m.feed("hello <") == ("hello ", False)
    assert m.feed("/") == ("", False)
    assert m.feed("x") == ("</x", False)
    assert m.feed(" ST") == (" ", False)
    assert m.feed("OP more") == ("", True)


class _ScriptedModel:
    """Emits logits that pick the scripted tokens in order, to drive the generation loop exactly."""

    n_ctx_train = 32

    def __init__(self, script, vocab=10):
        self.script, self.vocab, self.calls = list(script), vocab, 0

    def forward(self, ids, cache, all_logits=False):
        cache.commit(len(ids))
        logits = np.zeros(self.vocab, np.float32)
        logits[self.script[min(self.calls, len(self.script) - 1)]] = 10
        self.calls += 1
        return logits


class _ByteTokenizer:
    eog_ids = {0}

    def stream_decoder(self):
        tok = self

        class D:
            buf = b""

            def feed(self, i):
                self.buf += bytes([tok.bytes[i]])
                try:
                    text, self.buf = self.buf.decode(), b""
                    return text
                except UnicodeDecodeError:
                    return ""

            def flush(self):
                return self.buf.decode(errors="replace")

        return D()

    bytes = {1: 0x61, 2: 0xF0, 3: 0x9F, 4: 0x98, 5: 0x80}  # 'a' and the 4 bytes of U+1F600


def test_generation_stops_at_eos_and_streams_whole_characters():
    model = _ScriptedModel([1, 2, 3, 4, 5, 1, 0, 1])
    cache = KVCache(1, 32, 1, 1, 1)
    chunks = list(stream_tokens(model, _ByteTokenizer(), cache, [1], SamplingParams(temperature=0), 50))
    assert [c.text for c in chunks] == ["a", "", "", "", "😀", "a", ""]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token is None


def test_smollm2_says_paris(smollm2_path):
    llm = purelm.load(smollm2_path, backend="numpy", n_ctx=128)
    assert llm.generate("The capital of France is", max_tokens=2, temperature=0).startswith(" Paris")


def test_the_same_prompt_twice_gives_the_same_sample(fixtures):
    """The second run reuses the cached prompt and its logits: not its last token run again as a
    decode token (whose rounded activations would give other bits than the prompt pass)."""
    import purelm

    llm = purelm.load(fixtures / "llama-q8_0.gguf", backend="numba", threads=2, n_ctx=96)
    prompt = list(range(30, 50))  # longer than a decode step: its pass is a matrix product
    opts = dict(max_tokens=8, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True)
    runs = [llm.complete(prompt, seed=s, **opts).tokens for s in (1, 2, 3, 1, 2, 3)]
    assert runs[:3] == runs[3:]
    llm.reset()
    assert llm.complete(prompt, seed=2, **opts).tokens == runs[1]  # as from an empty cache
