"""Speculative decoding (purelm/speculative.py): greedy output identical to plain decoding on every
architecture fixture and on SmolLM2, whatever the drafts (all accepted, all rejected, some, prompt
lookup, a draft model), at stop strings, max_tokens and the context's end; the sampled rule keeps
the target distribution; the drafters; the API and the command line."""
import warnings

import numpy as np
import pytest
from conftest import FIXTURES, rewrite_gguf

import purelm
from purelm.cli import main
from purelm.errors import UsageError
from purelm.generate import stream_tokens
from purelm.sampling import Sampler, SamplingParams
from purelm.speculative import LookupDrafter, ModelDrafter, accept, max_drafts

ARCHS = sorted(p.name.split("-ref-")[0] for p in FIXTURES.glob("*-ref-f32.npz"))
GREEDY = SamplingParams(temperature=0)


class Oracle:
    """Drafts the tokens plain decoding made (`right` of them correct, then wrong ones)."""

    def __init__(self, prompt, want, n_vocab, right=10**9):
        self.n_prompt, self.want, self.n_vocab, self.right = len(prompt), want, n_vocab, right
        self.asked = 0

    def draft(self, history, k):
        self.asked += 1
        at = len(history) - self.n_prompt
        good = self.want[at:at + k]
        return [t if j < self.right else (t + 1) % self.n_vocab for j, t in enumerate(good)]


def run(llm, prompt, drafter=None, n_ctx=64, max_tokens=40, stop=(), n_draft=None, params=GREEDY):
    """Tokens, text, finish reason, timings and the cache after a generation in a fresh cache."""
    cache = llm.model.new_cache(n_ctx)
    timings = {}
    chunks = list(stream_tokens(llm.model, llm.tokenizer, cache, prompt, params, max_tokens, stop, True,
                                timings, drafter, max_drafts(llm.model) if n_draft is None else n_draft))
    tokens = [c.token for c in chunks if c.token is not None]
    return tokens, "".join(c.text for c in chunks), chunks[-1].finish_reason, timings, cache


def prompt_ids(seed=0):
    unit = np.random.default_rng(seed).integers(1, 200, 7).tolist()
    return unit * 3  # repeated, so that prompt lookup finds matches


@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_is_plain_decoding_whatever_the_drafts(arch, qtype):
    # one thread: beside the suite's other process, 2 threads' barriers took twice as long on 2 cores
    llm = purelm.load(FIXTURES / f"{arch}-{qtype}.gguf", backend="numba", threads=1, n_ctx=64)
    prompt = prompt_ids()
    want, text, reason, _, plain_cache = run(llm, prompt)
    assert len(want) == 40 and reason == "length"
    n_vocab = llm.model.n_vocab
    drafters = {"all accepted": Oracle(prompt, want, n_vocab), "all rejected": Oracle(prompt, want, n_vocab, 0),
                "some": Oracle(prompt, want, n_vocab, 2), "lookup": LookupDrafter()}
    for name, drafter in drafters.items():
        got, got_text, got_reason, timings, cache = run(llm, prompt, drafter)
        assert (got, got_text, got_reason) == (want, text, reason), (arch, qtype, name)
        # the cache holds what plain decoding's holds: the prompt and every token but the last
        assert cache.tokens == plain_cache.tokens == prompt + want[:-1]
        assert cache.n_past == plain_cache.n_past
        if name == "all accepted":  # 11 drafts a step, fewer at the end: 1 + 12 + 12 + 12 + 3 tokens
            assert timings["decode_steps"] == 4 and timings["accepted_tokens"] == 35
        if name == "all rejected":
            assert timings["accepted_tokens"] == 0 and timings["decode_steps"] == 39
    # the truncated cache's keys and values are right: continuing from it matches a fresh run
    follow = prompt + want[:20]
    cache = run(llm, prompt, drafters["some"])[4]
    more = list(stream_tokens(llm.model, llm.tokenizer, cache, follow, GREEDY, 10, (), True))
    assert [c.token for c in more] == want[20:30]


def test_greedy_limits_inside_accepted_runs(fixtures):
    """max_tokens, a stop string and the context's end falling inside a run of accepted drafts."""
    llm = purelm.load(fixtures / "llama-q8_0.gguf", backend="numba", threads=2, n_ctx=64)
    prompt = prompt_ids(1)
    want, text, *_ = run(llm, prompt, max_tokens=40)
    n_vocab = llm.model.n_vocab
    for max_tokens in (1, 2, 5, 12, 13, 27):
        got = run(llm, prompt, Oracle(prompt, want, n_vocab), max_tokens=max_tokens)
        assert got[0] == want[:max_tokens] and got[2] == "length"
    stop = next(text[i:i + 3] for i in range(len(text) // 2, len(text)) if text[i:i + 3].strip())
    plain = run(llm, prompt, stop=[stop])
    assert plain[2] == "stop" and plain[1] == text[:text.index(stop)]
    got = run(llm, prompt, Oracle(prompt, want, n_vocab), stop=[stop])
    assert got[:3] == plain[:3] and got[4].tokens == plain[4].tokens
    n_ctx = len(prompt) + 17  # the context fills in the middle of the second step's drafts
    plain = run(llm, prompt, n_ctx=n_ctx)
    assert plain[2] == "length" and len(plain[0]) == 18
    for drafter in (Oracle(prompt, want, n_vocab), LookupDrafter()):
        got = run(llm, prompt, drafter, n_ctx=n_ctx)
        assert got[:3] == plain[:3] and got[4].n_past == plain[4].n_past == n_ctx


def test_without_exact_short_runs_no_drafts_are_made(fixtures):
    """The numpy backend promises nothing for runs of several tokens: lookup changes nothing there."""
    llm = purelm.load(fixtures / "llama-f32.gguf", backend="numpy", n_ctx=64)
    assert max_drafts(llm.model) == 0
    prompt = prompt_ids()
    c = llm.complete(prompt, max_tokens=12, temperature=0, ignore_eos=True, lookup=8)
    assert c.tokens == llm.complete(prompt, max_tokens=12, temperature=0, ignore_eos=True).tokens
    assert c.timings["draft_tokens"] == 0 and c.timings["decode_steps"] == 11


def test_lookup_drafter_drafts_after_the_longest_match():
    d = LookupDrafter()  # 2- and 3-grams; a match of m tokens drafts up to m - 1
    assert d.draft([5], 4) == []
    assert d.draft([1, 2, 3, 4, 9, 2, 3], 4) == [4]  # "2 3" matched: 2 tokens, 1 draft
    assert d.draft([1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3], 4) == [4, 9]  # "1 2 3": 2 drafts
    assert LookupDrafter().draft([7, 1, 2, 3, 4, 5, 6, 8, 7, 1, 2, 3], 9) == [4, 5, 6]  # "7 1 2 3"
    # of two "1 2 3", the one matching further back ("9 1 2 3") wins over the later one
    assert LookupDrafter().draft([9, 1, 2, 3, 4, 5, 8, 1, 2, 3, 6, 7, 0, 9, 1, 2, 3], 3) == [4, 5, 8]
    assert LookupDrafter().draft([1, 2, 3, 5, 1, 2, 3, 6, 1, 2, 3], 2) == [6, 1]  # a tie: the latest
    assert d.draft([6, 6, 6], 3) == [6]  # another text: the index starts again
    assert LookupDrafter(n_max=3, n_min=3).draft([1, 2, 3, 9, 2, 3], 3) == []  # no 3-gram match
    with pytest.raises(UsageError):
        LookupDrafter(n_max=1, n_min=2)


def test_accept_greedy_keeps_the_agreeing_prefix():
    rows = np.full((4, 6), -5.0, np.float32)
    for i, t in enumerate([2, 3, 1, 5]):
        rows[i, t] = 1.0
    sampler = Sampler(GREEDY)
    assert accept(sampler, [0], rows, [2, 3, 1]) == [2, 3, 1, 5]  # all accepted, plus the next token
    assert accept(sampler, [0], rows, [2, 4, 1]) == [2, 3]  # second rejected: the model's token instead
    assert accept(sampler, [0], rows, [0, 3, 1]) == [2]
    with pytest.raises(UsageError):
        accept(sampler, [0], rows[:2], [2, 3])


def test_accept_sampled_keeps_the_target_distribution():
    """A point-mass draft accepted with probability p(d), else a sample of p without d: the first token
    is distributed as p, whatever d; a second one is drawn only after an accepted draft."""
    rng = np.random.default_rng(0)
    row0 = rng.standard_normal(6).astype(np.float32) * 1.5
    row1 = rng.standard_normal(6).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=5, top_p=1.0, min_p=0.0, seed=7)
    sampler = Sampler(params)
    ids, probs = sampler.probabilities(row0)
    p = np.zeros(6)
    p[ids] = probs
    n = 20000
    for draft in (int(np.argmax(p)), int(np.argsort(p)[-3]), int(np.argmin(row0))):  # likely, less, filtered out
        firsts = np.zeros(6)
        for _ in range(n):
            out = accept(sampler, [], np.stack([row0, row1]), [draft])
            firsts[out[0]] += 1
            assert len(out) == (2 if out[0] == draft else 1)
        assert np.abs(firsts / n - p).max() < 4 * np.sqrt(0.25 / n), (draft, firsts / n, p)
        assert firsts[np.argmin(row0)] == 0  # top-k removed it: never emitted


class Echo:
    """Always drafts: the history's last tokens again."""

    def draft(self, history, k):
        return list(history[-k:])


def test_sampled_speculative_generation_runs_and_is_seeded(fixtures):
    llm = purelm.load(fixtures / "llama-q8_0.gguf", backend="numba", threads=2, n_ctx=64)
    params = SamplingParams(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    a = run(llm, prompt_ids(), Echo(), max_tokens=24, params=params)
    assert len(a[0]) == 24 and a[3]["draft_tokens"] > 0
    assert run(llm, prompt_ids(), Echo(), max_tokens=24, params=params)[0] == a[0]
    assert a[4].tokens == prompt_ids() + a[0][:-1]
    opts = dict(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    assert llm.complete(prompt_ids(), lookup=6, **opts).tokens == llm.complete(prompt_ids(), lookup=6, **opts).tokens


def test_api_and_cli_options(fixtures, capsys, tmp_path):
    path = fixtures / "llama-q8_0.gguf"
    llm = purelm.load(path, backend="numba", threads=2, n_ctx=64)
    opts = dict(max_tokens=16, temperature=0, ignore_eos=True)
    want = llm.generate("hello hello hello", **opts)
    assert llm.generate("hello hello hello", lookup=4, **opts) == want
    assert "".join(llm.stream("hello hello hello", lookup=4, **opts)) == want
    assert llm.generate("hello hello hello", draft=str(path), **opts) == want  # itself as the draft
    for bad in (0, -1, "3", True, 2.5):
        with pytest.raises(UsageError, match="lookup"):
            llm.generate("hi", lookup=bad, **opts)
    with pytest.raises(UsageError, match="not both"):
        llm.generate("hi", lookup=2, draft=str(path), **opts)
    tokens = list(llm.tokenizer.tokens)
    other = rewrite_gguf(path, tmp_path / "other-vocab.gguf",
                         {"tokenizer.ggml.tokens": tokens[:-2] + [tokens[-1], tokens[-2]]})  # two swapped
    with pytest.raises(UsageError, match="vocabulary"):
        llm.generate("hi", draft=str(other), **opts)
    for bad in (3, llm):
        with pytest.raises(UsageError, match="draft must be"):
            llm.generate("hi", draft=bad, **opts)

    args = ["generate", "-m", str(path), "--backend", "numba", "--temp", "0", "-n", "16", "--ignore-eos",
            "hello hello hello"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--lookup", "4", "-v"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "[speculative:" in out.err
    assert main(args + ["--draft", str(path)]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--lookup", "0"]) == 2
    assert "--lookup" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return purelm.load(smollm2_path, n_ctx=512)


DOC = ("def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n\n\n"
       "def describe(w, h):\n    print('area', area(w, h), 'perimeter', perimeter(w, h))\n")


def test_smollm2_greedy_with_lookup_equals_plain(smollm2):
    messages = [{"role": "user", "content": "Add type hints to every function and print the whole code:\n\n" + DOC}]
    ids = smollm2.chat_prompt(messages)
    plain = smollm2.complete(ids, max_tokens=80, temperature=0)
    spec = smollm2.complete(ids, max_tokens=80, temperature=0, lookup=10)
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert spec.timings["accepted_tokens"] >= 20  # the code is copied: most drafts hold
    assert spec.timings["decode_steps"] < len(plain.tokens) / 2
    stop = plain.text[len(plain.text) // 2:][:4]  # a stop string inside an accepted run
    cut = smollm2.complete(ids, max_tokens=80, temperature=0, lookup=10, stop=[stop])
    assert cut.text == plain.text[:plain.text.index(stop)] and cut.finish_reason == "stop"
    assert smollm2.chat(messages, max_tokens=80, temperature=0, lookup=10).text == plain.text


def test_smollm2_requantized_draft_model_is_exact(smollm2, smollm2_path, tmp_path):
    from purelm.quantize import quantize_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-quantizing a Q4_1 file: the warning is the point here
        quantize_file(smollm2_path, tmp_path / "draft-q4_0.gguf", "q4_0", allow_requantize=True)
    draft = purelm.load(tmp_path / "draft-q4_0.gguf", n_ctx=512)
    ids = smollm2.chat_prompt([{"role": "user", "content": "What is the capital of France? Explain."}])
    plain = smollm2.complete(ids, max_tokens=48, temperature=0)
    timings = {}
    chunks = list(stream_tokens(smollm2.model, smollm2.tokenizer, smollm2.model.new_cache(512), ids, GREEDY,
                                48, (), False, timings, ModelDrafter(draft.model, draft.cache), 8))
    assert [c.token for c in chunks if c.token is not None] == plain.tokens
    assert timings["accepted_tokens"] > timings["draft_tokens"] / 2  # a close copy: its guesses mostly hold
    assert smollm2.complete(ids, max_tokens=48, temperature=0, draft=draft).tokens == plain.tokens
