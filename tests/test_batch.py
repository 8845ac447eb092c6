"""Many sequences in one forward pass: each sequence's logits in a mixed batch (prompt chunks and decode
tokens of different lengths, a sequence forked mid-way) equal that sequence run alone; decode tokens
bit for bit (they run the same kernels whatever the batch holds), prompt chunks within 1e-5 of the
largest logit. And the engine after a failed pass, the paged cache's blocks, threads put back."""
import numpy as np
import pytest
from batchlib import SCRIPT, alone, batched, tokens  # noqa: F401
from conftest import FIXTURES

from purelm.backends.kv_cache import BLOCK, KVCache
from purelm.backends.numba_backend import NumbaBackend
from purelm.backends.numpy_backend import NumpyBackend
from purelm.errors import ContextOverflowError, UsageError
from purelm.formats.gguf import GGUFFile
from purelm.models import build_model

ARCHS = sorted(p.name.split("-ref-")[0] for p in FIXTURES.glob("*-ref-f32.npz"))
TYPES = ["f32", "q8_0", "q4_0"]


def make_backend(name):
    if name == "torch":  # torch's CPU device (tests/test_torch_backend.py covers the rest of it)
        pytest.importorskip("torch", reason="the torch backend needs PyTorch: pip install 'purelm[torch]'")
        from purelm.backends.torch_backend import TorchBackend

        return TorchBackend("cpu", "fp32")
    if name == "numba-int8":  # the int8 kernels, prompts included (where the CPU has AVX512-VNNI)
        return NumbaBackend(2, int8_dot=True)
    return NumbaBackend(2) if name == "numba" else NumpyBackend()


@pytest.mark.parametrize("backend", ["numba", "numba-int8", "numpy"])
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_each_sequence_of_a_batch_equals_it_alone(arch, qtype, backend):
    model = build_model(GGUFFile(FIXTURES / f"{arch}-{qtype}.gguf"), make_backend(backend))
    want, got = alone(model, SCRIPT), batched(model, SCRIPT)
    scale = max(float(np.abs(x).max()) for xs in want.values() for x in xs)
    for seq in want:
        assert len(want[seq]) == len(got[seq])
        for w, g in zip(want[seq], got[seq]):
            assert w.shape == g.shape
            if len(w) == 1:  # a decode token: the same kernels, the same bits
                np.testing.assert_array_equal(g, w, err_msg=f"{arch} {qtype} sequence {seq}")
            else:
                assert np.abs(g - w).max() <= 1e-5 * scale, (arch, qtype, seq)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "falcon_mqa"])
def test_a_rotated_cache_keeps_each_decode_tokens_bits_in_a_batch(arch, backend):
    """As above with the cache rotating keys and values (what a q8_0 cache does; the fixtures' heads
    are too narrow for q8_0 blocks, so a float32 cache is made to rotate, by the largest power of two
    dividing the head): a decode token's rotations, and so its logits, are the same bits in a batch."""
    model = build_model(GGUFFile(FIXTURES / f"{arch}-q8_0.gguf"), make_backend(backend))
    new_cache = model.new_cache

    def rotating(n_ctx):
        cache = new_cache(n_ctx)
        cache.rotate_k, cache.rotate_v = cache.k_dim & -cache.k_dim, cache.v_dim & -cache.v_dim
        assert cache.rotate_k >= 8 and cache.rotate_v >= 8
        return cache

    model.new_cache = rotating
    want, got = alone(model, SCRIPT), batched(model, SCRIPT)
    for seq in want:
        for w, g in zip(want[seq], got[seq]):
            if len(w) == 1:
                np.testing.assert_array_equal(g, w, err_msg=f"{arch} {backend} sequence {seq}")


@pytest.mark.parametrize("backend", ["numba", "numpy", "torch"])
def test_a_failed_pass_leaves_the_engine_usable(backend, monkeypatch):
    ops = make_backend(backend)
    model = build_model(GGUFFile(FIXTURES / "llama-q8_0.gguf"), ops)
    prompt, nxt = tokens(6, 1), tokens(1, 2)
    ref_cache = model.new_cache(16)
    model.forward(prompt, ref_cache)
    want = model.forward(nxt, ref_cache)

    cache = model.new_cache(16)
    model.forward(prompt, cache)
    with pytest.raises(UsageError):
        model.forward(np.array([10**6]), cache)  # a token id past the vocabulary
    with pytest.raises(ContextOverflowError):
        model.forward(tokens(11, 3), cache)  # 6 + 11 > 16
    # an exception inside the layers, half-way through a pass
    real, calls = ops.attention, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(*a, **k)
    monkeypatch.setattr(ops, "attention", failing)
    with pytest.raises(RuntimeError, match="injected"):
        model.forward(nxt, cache)
    monkeypatch.setattr(ops, "attention", real)
    assert cache.n_past == 6  # nothing of the failed passes was committed
    np.testing.assert_array_equal(model.forward(nxt, cache), want)


def test_numba_threads_are_put_back_after_a_pass():
    import numba

    numba.set_num_threads(1)
    try:
        model = build_model(GGUFFile(FIXTURES / "llama-q8_0.gguf"), NumbaBackend(2))  # loading kernels
        assert numba.get_num_threads() == 1
        model.forward(tokens(4, 1), model.new_cache(16))
        assert numba.get_num_threads() == 1
        with pytest.raises(UsageError):
            model.forward(np.array([-1]), model.new_cache(16))
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_forks_share_blocks_and_copy_on_write():
    cache = KVCache(1, 4 * BLOCK, 1, 2, 2)
    cache.reserve(BLOCK + 10)
    cache.k[0][: BLOCK + 10] = np.arange(BLOCK + 10, dtype=np.float32)[:, None, None]
    cache.commit(BLOCK + 10)
    kids = [cache.fork(0) for _ in range(7)]
    assert cache.capacity - len(cache.free_blocks) == 2  # 8 sequences of 74 positions, 2 blocks in all
    cache.reserve(BLOCK + 11, kids[0])  # the first write into the shared, partly filled block copies it
    assert cache.capacity - len(cache.free_blocks) == 3
    assert cache.seqs[kids[0]].blocks[0] == cache.seqs[0].blocks[0]  # the full block stays shared
    new, old = cache.seqs[kids[0]].blocks[1], cache.seqs[0].blocks[1]
    assert new != old
    np.testing.assert_array_equal(cache.k[0][new * BLOCK:(new + 1) * BLOCK], cache.k[0][old * BLOCK:(old + 1) * BLOCK])
    for k in kids:
        cache.remove(k)
    assert cache.capacity - len(cache.free_blocks) == 2
    cache.truncate(3)
    assert cache.capacity - len(cache.free_blocks) == 1
    with pytest.raises(UsageError, match="no sequence 99"):
        cache.fork(99)
    with pytest.raises(ContextOverflowError):
        cache.reserve(4 * BLOCK + 1)


def test_one_sequence_twice_in_a_pass_is_refused():
    model = build_model(GGUFFile(FIXTURES / "llama-q8_0.gguf"), NumpyBackend())
    cache = model.new_cache(16)
    with pytest.raises(UsageError, match="twice"):
        model.forward_batch(cache, [(0, [1]), (0, [2])])


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_generate_batch_equals_each_prompt_alone(backend):
    """n samples of several prompts generated together: sample j of a prompt is exactly what the
    single-sequence API gives with seed + j (greedy too), though all of them ran in shared passes."""
    import purelm

    llm = purelm.load(str(FIXTURES / "llama-q8_0.gguf"), backend=backend, n_ctx=96)
    prompts = [[5, 17, 42, 9, 3, 8, 100], [7, 7], list(range(30, 50))]
    for opts in (dict(temperature=0), dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=5)):
        got = llm.generate_batch(prompts, n=2, max_tokens=6, ignore_eos=True, **opts)
        assert len(got) == 6
        for i, c in enumerate(got):
            p, j = divmod(i, 2)
            seed = {"seed": opts["seed"] + j} if "seed" in opts else {}
            # from an empty cache: reusing the last call's prompt would compute its last token as a
            # decode token (rounded activations), where the batch's prompt pass takes a matrix product
            llm.reset()
            want = llm.complete(prompts[p], max_tokens=6, ignore_eos=True, **{**opts, **seed})
            assert c.tokens == want.tokens and c.text == want.text, (i, opts)
            assert c.finish_reason == "length" and c.prompt_tokens == len(prompts[p])
        if "seed" in opts:  # the samples of one prompt differ from each other
            assert got[0].tokens != got[1].tokens or got[2].tokens != got[3].tokens


def test_generate_batch_arguments():
    import purelm

    llm = purelm.load(str(FIXTURES / "llama-q8_0.gguf"), backend="numpy", n_ctx=16)
    with pytest.raises(UsageError, match="n must be"):
        llm.generate_batch([[1, 2]], n=0)
    with pytest.raises(UsageError, match="prompts must be a list"):
        llm.generate_batch("hello")
    with pytest.raises(UsageError, match="prompt 1 is empty"):
        llm.generate_batch([[1], []])
    with pytest.raises(ContextOverflowError, match="prompt 0 has 16 tokens"):
        llm.generate_batch([list(range(1, 17))])
    # a sequence that reaches the context's end stops with "length"; the others go on
    out = llm.generate_batch([list(range(1, 14)), [1]], max_tokens=8, ignore_eos=True, temperature=0)
    alone = llm.complete(list(range(1, 14)), max_tokens=8, ignore_eos=True, temperature=0)
    assert out[0].tokens == alone.tokens and out[0].finish_reason == "length"
    assert len(alone.tokens) == 16 - 13 + 1  # positions 13-15, and the last token sampled from them
    assert len(out[1].tokens) == 8


def test_many_short_runs_in_one_pass_match_alone():
    """More short rows than the matrix-vector limit in one pass (13 decode tokens, or short prompt
    chunks side by side): still each as alone, in the feed-forward's gated product too (review)."""
    model = build_model(GGUFFile(FIXTURES / "llama-q8_0.gguf"), NumbaBackend(2))
    prompts = [tokens(3 + i % 5, i) for i in range(13)]
    want = [model.forward(p, model.new_cache(64), all_logits=True) for p in prompts]
    cache = model.new_cache(64)
    seqs = [cache.add() for _ in prompts]
    got = model.forward_batch(cache, list(zip(seqs, prompts)), all_logits=True)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    nxt = [tokens(1, 100 + i) for i in range(13)]
    got = model.forward_batch(cache, list(zip(seqs, nxt)))
    for p, t, g in zip(prompts, nxt, got):
        c = model.new_cache(64)
        model.forward(p, c)
        np.testing.assert_array_equal(g, model.forward(t, c))


def test_long_context_decode_in_a_batch_matches_alone():
    """Past two attention chunks (256 positions), across blocks: the decode token's attention runs
    the same kernel alone and among 8 (review: the serial and parallel kernels round differently)."""
    model = build_model(GGUFFile(FIXTURES / "mistral_gqa-f32.gguf"), NumbaBackend(2))
    prompt, nxt = tokens(300, 1), tokens(1, 2)
    c = model.new_cache(320)
    model.forward(prompt, c)
    want = model.forward(nxt, c)
    cache = model.new_cache(320)
    seqs = [cache.add() for _ in range(8)]
    for s in seqs:
        model.forward_batch(cache, [(s, prompt)])
    for g in model.forward_batch(cache, [(s, nxt) for s in seqs]):
        np.testing.assert_array_equal(g, want)


def test_generate_batch_takes_any_iterable_of_prompts():
    import purelm

    llm = purelm.load(str(FIXTURES / "llama-q8_0.gguf"), backend="numpy", n_ctx=32)
    timings = {}
    out = llm.generate_batch((p for p in [[1, 2], [3]]), max_tokens=2, ignore_eos=True, timings=timings)
    assert [len(c.tokens) for c in out] == [2, 2] and timings["generated_tokens"] == 4
    out = llm.generate_batch(np.array([[1, 2], [3, 4]]), max_tokens=1, ignore_eos=True)
    assert len(out) == 2


def test_negative_positions_are_refused():
    cache = KVCache(1, 16, 1, 2, 2)
    with pytest.raises(UsageError):
        cache.commit(-1)
    with pytest.raises(UsageError):
        cache.n_past = -3
