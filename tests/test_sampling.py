import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from purelm.errors import GenerationError, UsageError
from purelm.sampling import Sampler, SamplingParams, draw, top_k_ids
from purelm.tokenizer import Tokenizer
from conftest import LLAMA_CPP


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


LOGITS = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 2.5, -3.0], np.float32)


def test_greedy_is_argmax_whatever_the_rng():
    for seed in range(5):
        assert Sampler(SamplingParams(temperature=0, seed=seed))(LOGITS) == 3


def test_top_k_one_is_greedy_at_any_temperature():
    s = Sampler(SamplingParams(temperature=5.0, top_k=1, top_p=1, min_p=0, seed=0))
    assert {s(LOGITS) for _ in range(50)} == {3}


def test_top_k_keeps_the_k_largest():
    ids, p = Sampler(SamplingParams(temperature=1, top_k=3, top_p=1, min_p=0)).probabilities(LOGITS)
    assert ids.tolist() == [3, 6, 0]
    np.testing.assert_allclose(p, softmax(LOGITS[[3, 6, 0]]), rtol=1e-6)


def test_top_k_ids_are_a_stable_sorts_first_k():
    """Against numpy's stable sort: ties (at the cut too) go to the lowest ids; NaNs never enter
    while there are numbers enough."""
    rng = np.random.default_rng(0)
    for trial in range(500):
        n = int(rng.integers(2, 80))
        k = int(rng.integers(1, n))
        v = (rng.integers(-3, 3, n) if trial % 2 else rng.standard_normal(n)).astype(np.float32)
        if trial % 5 == 0:
            v[rng.integers(0, n, 1 + n // 4 if n - k > n // 4 else 0)] = np.nan
        finite = np.flatnonzero(~np.isnan(v))
        if len(finite) < k:
            continue
        expected = np.sort(finite[np.argsort(-v[finite], kind="stable")][:k])
        assert np.array_equal(top_k_ids(v, k), expected), (v, k)


def test_top_k_ids_over_a_vocabulary_with_the_prefilter():
    """The column-maxima prefilter (vocabularies of 128 rows of 4k columns and more) picks what a stable sort
    does: ties at the cut, in one block or spread over many, values of a few levels, infinities, a
    tail past the last whole block, and NaNs (the full selection then)."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.choice([49152, 49152 + 77, 32000, 151936 // 4]))
        k = int(rng.choice([1, 2, 40, 50, 100]))
        style = trial % 6
        if style == 0:
            v = rng.standard_normal(n).astype(np.float32) * 3
        elif style == 1:  # few levels: many ties at the cut
            v = rng.integers(-5, 5, n).astype(np.float32)
        elif style == 2:  # ties of the top values packed in one block, and in the tail
            v = rng.standard_normal(n).astype(np.float32)
            v[256:256 + k + 5] = 9.0
            v[-3:] = 9.0
        elif style == 3:
            v = rng.standard_normal(n).astype(np.float32)
            v[rng.integers(0, n, 3)] = np.inf
            v[rng.integers(0, n, 1000)] = -np.inf
        elif style == 4:  # NaNs
            v = rng.standard_normal(n).astype(np.float32)
            v[rng.integers(0, n, 5)] = np.nan
        else:  # everything equal
            v = np.full(n, -2.5, np.float32)
        finite = np.flatnonzero(~np.isnan(v))
        expected = np.sort(finite[np.argsort(-v[finite], kind="stable")][:k])
        assert np.array_equal(top_k_ids(v, k), expected), (trial, n, k, style)


def test_draw_is_numpys_choice():
    """The sampler's draw takes the same index as Generator.choice(p=) from the same state, so a seed
    gives the tokens it gave before draw replaced choice."""
    rng = np.random.default_rng(2)
    for _ in range(2000):
        n = int(rng.integers(1, 60))
        p = rng.random(n) ** 3 + 1e-12
        p /= p.sum()
        seed = int(rng.integers(0, 2 ** 31))
        assert draw(np.random.default_rng(seed), p) == np.random.default_rng(seed).choice(n, p=p)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    full = softmax(LOGITS.astype(np.float64))
    order = np.argsort(-full)
    cum = np.cumsum(full[order])
    for top_p in (0.3, 0.5, 0.8, 0.95):
        n = int(np.argmax(cum >= top_p)) + 1
        ids, _ = Sampler(SamplingParams(temperature=1, top_k=0, top_p=top_p, min_p=0)).probabilities(LOGITS)
        assert ids.tolist() == order[:n].tolist(), top_p


def test_min_p_is_relative_to_the_best_token():
    full = softmax(LOGITS.astype(np.float64))
    ids, _ = Sampler(SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0.3)).probabilities(LOGITS)
    assert set(ids.tolist()) == set(np.nonzero(full >= 0.3 * full.max())[0].tolist())


def test_temperature_applies_after_filtering():
    ids, p = Sampler(SamplingParams(temperature=0.5, top_k=4, top_p=1, min_p=0)).probabilities(LOGITS)
    np.testing.assert_allclose(p, softmax(LOGITS[ids] / 0.5), rtol=1e-6)


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    s = Sampler(SamplingParams(repeat_penalty=2.0))
    out = s.apply_penalties(LOGITS, [0, 4, 4])
    assert out[0] == pytest.approx(1.0) and out[4] == pytest.approx(-2.0) and out[3] == LOGITS[3]


def test_repeat_penalty_window():
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=1))
    out = s.apply_penalties(LOGITS, [0, 6])
    assert out[0] == LOGITS[0] and out[6] == pytest.approx(1.25)
    # a history shorter than the window but longer than half of it: every token of it counts
    s = Sampler(SamplingParams(frequency_penalty=1.0, repeat_last_n=4))
    out = s.apply_penalties(LOGITS, [0, 1, 6])
    assert (out[[0, 1, 6]] == LOGITS[[0, 1, 6]] - 1).all()


def test_frequency_and_presence_penalties():
    s = Sampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    out = s.apply_penalties(LOGITS, [1, 1, 1, 2])
    assert out[1] == pytest.approx(1.0 - 1.5 - 0.25)
    assert out[2] == pytest.approx(0.5 - 0.5 - 0.25)
    assert out[0] == LOGITS[0]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = Sampler(SamplingParams(seed=7, **params))
    b = Sampler(SamplingParams(seed=7, **params))
    draws = [a(LOGITS) for _ in range(4000)]
    assert draws == [b(LOGITS) for _ in range(4000)]
    freq = np.bincount(draws, minlength=len(LOGITS)) / len(draws)
    np.testing.assert_allclose(freq, softmax(LOGITS.astype(np.float64)), atol=0.03)


@pytest.mark.parametrize("bad, message", [
    (dict(min_p=2.0), "min_p must be between 0 and 1"),
    (dict(top_p=-0.1), "top_p must be between 0 and 1"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(temperature=-1.0), "temperature must be >= 0; 0 is greedy"),
    (dict(temperature="0.5"), "temperature must be a number"),
    (dict(temperature=True), "temperature must be a number"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=2.0), "top_k must be a whole number"),
    (dict(repeat_penalty=0.0), "repeat_penalty must be > 0"),
    (dict(repeat_last_n=-2), "repeat_last_n must be >= -1"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty must be a finite number"),
    (dict(top_p=10**400), "top_p must be between 0 and 1, got an integer beyond a float's range"),
    (dict(presence_penalty=-10**400), "presence_penalty must be a finite number, got an integer beyond"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(seed=-1), "seed must be >= 0, or None"),
    (dict(seed=False), "seed must be a whole number"),
])
def test_invalid_parameters_are_rejected(bad, message):
    with pytest.raises(UsageError, match=message):
        Sampler(SamplingParams(**bad))


def test_validate_names_the_callers_spelling():
    with pytest.raises(UsageError, match="^--temp must be >= 0; 0 is greedy, got -1"):
        SamplingParams(temperature=-1).validate({"temperature": "--temp"})


def test_edge_values_are_accepted():
    SamplingParams(temperature=0, top_k=0, top_p=0.0, min_p=1.0, repeat_last_n=-1, seed=np.int64(3)).validate()
    assert Sampler(SamplingParams(temperature=0.0, top_p=0.0))(LOGITS) == 3


# ------------------------------------------------------------------ against llama.cpp's own samplers
SAMPLERS = Path(__file__).parent / "fixtures" / "samplers.npz"


def ours_like_llama_cpp(case: dict, logits: list[np.ndarray], result: dict, tokenizer=None) -> None:
    """purelm's sampler on a case of tests/llama_samplers.py: the same candidates (and probabilities)
    as llama.cpp's chain left; for Mirostat, step after step with the tokens llama.cpp drew; for DRY,
    the same penalties."""
    if case["kind"] == "dry":
        p = SamplingParams(dry_multiplier=case["multiplier"], dry_base=case["base"], dry_allowed_length=case["allowed"],
                           dry_penalty_last_n=case["last_n"], dry_sequence_breakers=case["breakers"])
        got = -Sampler(p, tokenizer).apply_dry(np.zeros(tokenizer.vocab_size, np.float32), case["history"])
        want = np.zeros_like(got)
        want[[int(t) for t in result["penalties"]]] = list(result["penalties"].values())
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(case))
        return
    if case["kind"] == "filters":
        p = SamplingParams(temperature=case["temperature"], top_k=case["top_k"], top_p=case["top_p"],
                           min_p=case["min_p"], top_n_sigma=case["top_n_sigma"], typical_p=case["typical_p"],
                           xtc_probability=1.0 if case["xtc"] else 0.0, xtc_threshold=case["xtc_threshold"], seed=0,
                           logit_bias={int(k): v for k, v in case.get("logit_bias", {}).items()})
        ids, probs = Sampler(p).probabilities(logits[0])
        assert ids.tolist() == result["ids"], case
        np.testing.assert_allclose(probs, result["probs"], rtol=1e-5, atol=1e-7)
        return
    sampler = Sampler(SamplingParams(temperature=case["temperature"], mirostat=int(case["kind"][-1]),
                                     mirostat_tau=case["tau"], mirostat_eta=case["eta"]))
    for i, (row, step) in enumerate(zip(logits, result["steps"])):
        ids, probs = sampler.probabilities(row)
        if len(step["ids"]) == 1 < len(ids) and case["kind"] == "mirostat1":  # llama.cpp's int32(k) overflowed
            assert sampler.mirostat_k(row.astype(np.float64) / case["temperature"]) >= 2**31
        else:
            assert sorted(ids.tolist()) == sorted(step["ids"]), (case["kind"], i, len(ids), len(step["ids"]))
        assert step["token"] in ids
        sampler.chosen(step["token"], ids, probs)


def test_samplers_leave_the_candidates_and_penalties_llama_cpp_leaves(smollm2_path):
    """tests/fixtures/samplers.npz, made by llama.cpp's samplers (tests/llama_samplers.py): top-n-sigma,
    typical-p and XTC alone and with top-k, top-p, min-p, temperature; Mirostat 1 and 2 over 6 steps;
    DRY over SmolLM2's vocabulary, with llama.cpp's sequence breakers, others and none."""
    tokenizer = Tokenizer.from_file(smollm2_path)
    ref = np.load(SAMPLERS)
    cases, results = json.loads(str(ref["cases"])), json.loads(str(ref["results"]))
    rows = iter(ref["logits"].astype(np.float32))
    kinds = Counter()
    for case, result in zip(cases, results, strict=True):
        logits = [next(rows) for _ in range({"filters": 1, "dry": 0}.get(case["kind"], 6))]
        ours_like_llama_cpp(case, logits, result, tokenizer)
        kinds[case["kind"]] += 1
    assert kinds == {"filters": 20, "mirostat1": 10, "mirostat2": 10, "dry": 40}
    penalized = [len(r["penalties"]) for c, r in zip(cases, results) if c["kind"] == "dry"]
    assert sum(n > 0 for n in penalized) >= 20 and max(penalized) >= 3  # the cases reach the penalties


PEERS = LLAMA_CPP


def test_fresh_cases_leave_the_candidates_llama_cpp_leaves(smollm2_path):
    """New cases (another seed: 120 of the filters and Mirostat, 40 of DRY, 20 of DRY over a SentencePiece
    vocabulary, 24 of DRY over both with breakers of characters of several bytes) through llama.cpp's samplers
    in a child process, where ../shared/peers/build-llama-cpp.sh has built the library."""
    lib, package = PEERS / "build" / "bin", PEERS.parent.parent
    if not (lib / "libllama.so").is_file() or not (package / "llama_cpp").is_dir():
        pytest.skip(f"llama.cpp's library or llama-cpp-python's package is not at {PEERS} (set PURELM_LLAMA_CPP_DIR)")
    sys.path.insert(0, str(Path(__file__).parent))
    from llama_samplers import WIDE_BREAKERS, WIDE_PHRASES, make_cases, make_dry_cases

    tokenizer = Tokenizer.from_file(smollm2_path)

    spm = PEERS / "models" / "ggml-vocab-llama-spm.gguf"  # SentencePiece: its tokens' leading spaces
    cases = make_cases(seed=1, n=120) + make_dry_cases(tokenizer, str(smollm2_path), seed=1, n=40) + \
        make_dry_cases(Tokenizer.from_file(spm), str(spm), seed=2, n=20) + \
        make_dry_cases(tokenizer, str(smollm2_path), 3, 16, WIDE_PHRASES, WIDE_BREAKERS) + \
        make_dry_cases(Tokenizer.from_file(spm), str(spm), 4, 8, WIDE_PHRASES, WIDE_BREAKERS)
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib), PYTHONPATH=str(package))
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "llama_samplers.py")], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tokenizers = {str(smollm2_path): tokenizer, str(spm): Tokenizer.from_file(spm)}
    for case, result in zip(cases, json.loads(done.stdout), strict=True):
        ours_like_llama_cpp(case, [np.asarray(r, np.float32) for r in case.get("logits", [])], result,
                            tokenizers.get(case.get("model"), tokenizer))


def test_xtc_removes_the_likeliest_tokens_as_often_as_its_probability():
    """Three tokens above the threshold: XTC leaves only the least likely of them, in 30% of the draws."""
    logits = np.array([5.0, 4.8, 4.5, 1.0, 0.5, 0.0], np.float32)
    s = Sampler(SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0, xtc_probability=0.3, xtc_threshold=0.1,
                               seed=4))
    firsts = Counter(int(s.probabilities(logits)[0][0]) for _ in range(4000))
    assert set(firsts) == {0, 2} and abs(firsts[2] / 4000 - 0.3) < 0.03, firsts
    ids, _ = Sampler(SamplingParams(top_k=0, top_p=1, min_p=0, xtc_probability=1.0, xtc_threshold=0.6)).probabilities(
        logits)  # a threshold above 0.5 turns XTC off (two tokens cannot both pass it)
    assert ids[0] == 0


def test_mirostat_moves_its_target_by_each_tokens_surprise():
    """mu starts at 2 tau and moves by eta times (surprise - tau) per token, drawn or accepted by
    speculative decoding's rule (speculative.accept)."""
    from purelm.speculative import accept

    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((3, 64)) * 2).astype(np.float32)
    rows[0, 7] = rows[1, 9] = 30  # drafts the rule accepts
    for version in (1, 2):
        p = SamplingParams(temperature=1.0, mirostat=version, mirostat_tau=3.0, mirostat_eta=0.5, seed=1)
        a, b = Sampler(p), Sampler(p)
        assert a.mu == 6.0
        tokens = accept(a, [1, 2], rows, [7, 9])
        assert tokens[:2] == [7, 9] and len(tokens) == 3
        for row, token in zip(rows, tokens):
            ids, probs = b.probabilities(row)
            before = b.mu
            b.chosen(token, ids, probs)
            assert b.mu == pytest.approx(before - 0.5 * (-np.log2(probs[ids == token][0]) - 3.0))
        assert a.mu == pytest.approx(b.mu) and a.mu != 6.0


@pytest.mark.parametrize("field, value, message", [
    ("typical_p", 1.5, "typical_p must be between 0 and 1"),
    ("top_n_sigma", float("nan"), "top_n_sigma must be a finite number"),
    ("xtc_probability", -0.5, "xtc_probability must be between 0 and 1"),
    ("xtc_threshold", "0.1", "xtc_threshold must be a number"),
    ("mirostat", 3, "mirostat must be 0 (off), 1 or 2"),
    ("mirostat", 1.0, "mirostat must be a whole number"),
    ("mirostat_tau", -1.0, "mirostat_tau must be >= 0"),
    ("mirostat_eta", float("inf"), "mirostat_eta must be >= 0"),
    ("dry_multiplier", -1.0, "dry_multiplier must be >= 0"),
    ("dry_base", 0.5, "dry_base must be >= 1"),
    ("dry_allowed_length", -1, "dry_allowed_length must be >= 0"),
    ("dry_penalty_last_n", 2.0, "dry_penalty_last_n must be a whole number"),
    ("dry_sequence_breakers", "\n", "dry_sequence_breakers must be a list of at most 16 strings"),
    ("dry_sequence_breakers", [""], "dry_sequence_breakers must be a list"),
    ("dry_sequence_breakers", ["x"] * 17, "dry_sequence_breakers must be a list"),
    ("dry_sequence_breakers", [3], "dry_sequence_breakers must be a list"),
])
def test_other_samplers_settings_are_checked(field, value, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Sampler(SamplingParams(**{field: value}))


def test_dry_penalizes_the_tokens_that_would_extend_a_repeat():
    """llama.cpp's own example: after a b c c b c y a b c, c would extend "a b c" (3 tokens), y "b c"
    (2), b "c" (1, within the allowed length): multiplier * base^(length - allowed) off c and y only."""
    a, b, c, y = 1, 2, 3, 9
    history = [a, b, c, c, b, c, y, a, b, c]
    s = Sampler(SamplingParams(dry_multiplier=0.5, dry_base=2.0, dry_allowed_length=2, dry_penalty_last_n=64))
    out = s.apply_dry(np.zeros(16, np.float32), history)
    assert {i: float(v) for i, v in enumerate(out) if v} == {c: -0.5 * 2.0, y: -0.5}
    # only the last dry_penalty_last_n tokens count: y a b c holds no repeat
    s = Sampler(SamplingParams(dry_multiplier=0.5, dry_allowed_length=2, dry_penalty_last_n=4))
    assert not s.apply_dry(np.zeros(16, np.float32), history).any()
    assert s.probabilities(np.zeros(16, np.float32), history)[0].size == 16  # nothing penalized, nothing cut


def test_logit_bias_comes_first_and_minus_inf_bans():
    """llama.cpp's chain starts with the logit bias: before penalties, greedy and every filter;
    -inf bans a token; an id outside the logits is refused rather than read."""
    assert Sampler(SamplingParams(temperature=0, logit_bias={3: -1.5}))(LOGITS) == 6  # 3.0 - 1.5 < 2.5
    s = Sampler(SamplingParams(temperature=1, top_k=2, top_p=1, min_p=0, logit_bias={3: -np.inf, 7: 10.0}))
    ids, p = s.probabilities(LOGITS)
    assert ids.tolist() == [7, 6]  # -3 + 10 = 7 leads; 3 is gone
    np.testing.assert_allclose(p, softmax(np.array([7.0, 2.5])), rtol=1e-6)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        Sampler(SamplingParams(logit_bias={8: 1.0})).probabilities(LOGITS)
    masked = np.full(8, -np.inf, np.float32)
    masked[3] = 1.0  # a grammar that allows one token, which the bias bans: an error, not token 0
    with pytest.raises(GenerationError, match="no token is left"):
        Sampler(SamplingParams(logit_bias={3: -np.inf})).probabilities(masked)
    s = Sampler(SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0, logit_bias={1: 1e30, 2: 1e30}))
    assert s.probabilities(LOGITS)[0].tolist() == [1, 2]  # huge biases stay numbers (float32's largest)
    for bad in ({-1: 1.0}, {1: float("nan")}, {1: float("inf")}, {1: 1e31}, {2**70: 1.0}, {True: 1.0}, {1: "2"},
                [(1, 2.0)]):
        with pytest.raises(UsageError, match="logit_bias must map token ids"):
            Sampler(SamplingParams(logit_bias=bad))
