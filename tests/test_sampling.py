import numpy as np
import pytest

from purelm.errors import UsageError
from purelm.sampling import Sampler, SamplingParams, draw, top_k_ids


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
