"""LoRA adapters (purelm.lora) against PEFT: adapters that llama.cpp's convert_lora_to_gguf.py wrote
from seeded random PEFT adapters of the tiny models (tools/make_lora_fixtures.py), and PEFT's logits."""
import importlib.util
import subprocess

import numpy as np
import pytest

from purelm.api import LLM, load
from purelm.errors import FormatError, UsageError
from purelm.formats.gguf import GGUFFile, GGUFWriter

from conftest import FIXTURES

NAMES = ["llama", "phi3", "gptneox"]  # q, k, v apart; q|k|v and gate|up fused; q|k|v fused per head


def backends() -> list[str]:
    out = ["numpy", "numba"]
    try:
        import torch  # noqa: F401
    except ImportError:
        return out
    return out + ["torch"]


def adapter(name: str) -> str:
    return str(FIXTURES / "peft" / f"{name}-lora-f32.gguf")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", NAMES)
def test_adapted_logits_match_peft(name, backend):
    ref = np.load(FIXTURES / "peft" / f"{name}-lora-ref.npz")
    ids = ref["ids"].tolist()
    base = str(FIXTURES / f"{name}-f32.gguf")
    # the adapter moves the logits by whole units, so matching PEFT to 1e-4 means it is applied right
    assert np.abs(ref["logits"] - ref["plain"]).max() > 1.0
    for scale, key in ((1.0, "logits"), (0.5, "half"), (0.0, "plain")):
        llm = LLM(base, backend=backend, lora=[(adapter(name), scale)])
        assert np.abs(llm.logits(ids) - ref[key]).max() < 1e-4, (scale, key)
    # two adapters add up: the same one twice at 0.25 each is the adapter at 0.5
    llm = LLM(base, backend=backend, lora=[(adapter(name), 0.25), (adapter(name), 0.25)])
    assert np.abs(llm.logits(ids) - ref["half"]).max() < 1e-4


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_quantized_base_with_an_adapter(name):
    # the adapter's product is added to the packed weights' (int16 kernels on x86): the logits stay
    # as close to PEFT's as the base model's own rounding keeps them to transformers'
    ref = np.load(FIXTURES / "peft" / f"{name}-lora-ref.npz")
    ids = ref["ids"].tolist()
    for qtype, tol in (("f16", 0.05), ("q8_0", 0.6)):
        llm = LLM(str(FIXTURES / f"{name}-{qtype}.gguf"), backend="numba", lora=[adapter(name)])
        got = llm.logits(ids)
        assert np.abs(got - ref["logits"]).max() < tol
        assert (got.argmax(-1) == ref["logits"].argmax(-1)).mean() >= 0.9


def test_generation_and_batches_use_the_adapter():
    ref = np.load(FIXTURES / "peft" / "llama-lora-ref.npz")
    ids = ref["ids"].tolist()
    llm = LLM(str(FIXTURES / "llama-f32.gguf"), backend="numba", lora=[adapter("llama")])
    # greedy decode (the cached decode path) agrees with the adapted full-sequence logits
    out = llm.generate(ids[:10], max_tokens=6, temperature=0, ignore_eos=True)
    steps = llm.tokenize(out, add_special=False, parse_special=False)
    seq = ids[:10]
    for _ in range(6):
        seq.append(int(llm.logits(seq)[-1].argmax()))
    assert llm.tokenize(llm.detokenize(seq[10:]), add_special=False, parse_special=False) == steps
    # the batched engine: each prompt's greedy reply in a batch is the one it gets alone
    prompts = [ids[:7], ids[:15], ids[3:12]]
    alone = [llm.generate(p, max_tokens=5, temperature=0, ignore_eos=True) for p in prompts]
    together = [c.text for c in llm.generate_batch(prompts, max_tokens=5, temperature=0, ignore_eos=True)]
    assert together == alone


def test_api_arguments_are_checked():
    base = str(FIXTURES / "llama-f32.gguf")
    for bad in (adapter("llama"), 3, [(adapter("llama"), float("nan"))], [(adapter("llama"), "1")], [(1, 2)],
                [(adapter("llama"), 1.0, 2)], [(adapter("llama"), True)]):
        with pytest.raises(UsageError):
            load(base, backend="numpy", lora=bad)
    with pytest.raises(FormatError, match="made for another model"):
        LLM(str(FIXTURES / "gpt2-f32.gguf"), backend="numpy", lora=[adapter("llama")])
    with pytest.raises(FormatError, match="not a LoRA adapter"):
        LLM(base, backend="numpy", lora=[base])  # a model, not an adapter


def rewrite(src: str, dst, meta: dict | None = None, drop: str | None = None, rename: dict | None = None,
            replace: tuple | None = None) -> str:
    """A copy of the adapter `src` with metadata changed (None deletes), a tensor dropped, renamed, or
    its data replaced by a float32 array of another shape."""
    rename = rename or {}
    f = GGUFFile(src)
    w = GGUFWriter(dst)
    meta = meta or {}
    for k in f.metadata:
        if k in meta:
            continue
        w.add(k, f.metadata[k], f.metadata.types[k], f.metadata.array_types.get(k))
    for k, v in meta.items():
        if v is not None:
            w.add(k, v)
    for t in f.tensors.values():
        if t.name == drop:
            continue
        name = rename.get(t.name, t.name)
        if replace and t.name == replace[0]:
            w.add_tensor(name, replace[1])
        else:
            w.add_tensor(name, t.data, t.type, t.shape)
    w.write()
    f.close()
    return str(dst)


@pytest.mark.parametrize("change, message", [
    ({"meta": {"general.type": "model"}}, "expected 'adapter'"),
    ({"meta": {"general.type": None}}, "general.type: is missing"),
    ({"meta": {"general.type": 7}}, "must be a string"),
    ({"meta": {"adapter.type": "control_vector"}}, "only 'lora'"),
    ({"meta": {"general.architecture": "qwen3"}}, "another model"),
    ({"meta": {"adapter.lora.alpha": float("nan")}}, "alpha"),
    ({"meta": {"adapter.lora.alpha": -1.0}}, "alpha"),
    ({"meta": {"adapter.lora.alpha": "8"}}, "alpha"),
    ({"meta": {"adapter.alora.invocation_tokens": [1, 2]}}, "aLoRA"),
    ({"drop": "blk.0.attn_q.weight.lora_b"}, "no .lora_b"),
    ({"rename": {"blk.0.attn_q.weight.lora_a": "blk.0.attn_q.weight.extra"}}, "neither"),
    ({"rename": {f"blk.0.attn_q.weight.lora_{h}": f"blk.9.attn_q.weight.lora_{h}" for h in "ab"}},
     "not in the model"),
    ({"replace": ("blk.0.attn_q.weight.lora_a", np.zeros((4, 8), np.float32))}, "do not fit"),
    ({"replace": ("blk.0.attn_q.weight.lora_b", np.zeros((64, 3), np.float32))}, "do not fit"),
    ({"replace": ("blk.0.attn_q.weight.lora_a", np.zeros((2, 4, 64), np.float32))}, "is a matrix"),
])
def test_hostile_adapters_are_refused(tmp_path, change, message):
    bad = rewrite(adapter("llama"), tmp_path / "bad.gguf", **change)
    with pytest.raises(FormatError, match=message):
        LLM(str(FIXTURES / "llama-f32.gguf"), backend="numpy", lora=[bad])


def test_an_embedding_adapter_is_refused(tmp_path):
    f = GGUFFile(str(FIXTURES / "llama-f32.gguf"))
    n_vocab, dim = f.tensors["token_embd.weight"].shape
    f.close()
    bad = rewrite(adapter("llama"), tmp_path / "embd.gguf")
    w = GGUFWriter(tmp_path / "embd2.gguf")
    g = GGUFFile(bad)
    for k in g.metadata:
        w.add(k, g.metadata[k], g.metadata.types[k], g.metadata.array_types.get(k))
    w.add_tensor("token_embd.weight.lora_a", np.zeros((4, dim), np.float32))
    w.add_tensor("token_embd.weight.lora_b", np.zeros((n_vocab, 4), np.float32))
    w.write()
    g.close()
    with pytest.raises(FormatError, match="embedding"):
        LLM(str(FIXTURES / "llama-f32.gguf"), backend="numpy", lora=[str(tmp_path / "embd2.gguf")])


def smollm2_adapter(path, out) -> str:
    """A seeded random adapter for SmolLM2 (rank 8, alpha 16) on q, v, the attention output and down of
    every layer (benchmarks/make_synthetic.py's write_lora)."""
    spec = importlib.util.spec_from_file_location("make_synthetic", FIXTURES.parents[1] / "benchmarks" /
                                                  "make_synthetic.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    make.write_lora(path, out, 8, ("attn_q", "attn_v", "attn_output", "ffn_down"), b_scale=0.06, seed=5)
    return str(out)


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_llama_cpp_computes_what_purelm_does_with_the_adapter(model, fixtures, tmp_path, request):
    """llama-perplexity --lora-scaled writes its logits (--kl-divergence-base); purelm with the same
    adapter and scale is as close to them as the two engines are without adapters, and far closer than
    purelm without the adapter."""
    from conftest import LLAMA_CPP
    from purelm.perplexity import kl_divergence

    tool = LLAMA_CPP / "build" / "bin" / "llama-perplexity"
    if not tool.is_file():
        pytest.skip(f"llama-perplexity is not built at {tool} (set PURELM_LLAMA_CPP_DIR)")
    if model == "tiny":
        path, lora, ctx = fixtures / "llama-f32.gguf", adapter("llama"), 32
    else:
        path = request.getfixturevalue("smollm2_path")
        lora, ctx = smollm2_adapter(path, tmp_path / "smollm2-lora.gguf"), 128
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat, and the dog ate the hat; then all of them went home. " * 60)
    base = tmp_path / "llama.kld"
    done = subprocess.run([str(tool), "-m", str(path), "--lora-scaled", f"{lora}:0.75", "-f", str(text), "-c", str(ctx),
                           "--chunks", "3", "-t", "2", "-b", str(ctx), "--kl-divergence-base", str(base)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with_adapter = kl_divergence(LLM(str(path), lora=[(lora, 0.75)], n_ctx=ctx), base).stats()
    without = kl_divergence(LLM(str(path), n_ctx=ctx), base).stats()
    print(model, "KL with the adapter", with_adapter["kld"], "without", without["kld"])
    if model == "tiny":  # float32 weights: the same logits to float32 rounding
        assert with_adapter["kld"] < 1e-5 and with_adapter["same_top"] == 1.0
    else:  # Q4_1 weights: llama.cpp rounds activations to 8 bits, purelm to 16
        assert with_adapter["kld"] < 0.02 and with_adapter["same_top"] >= 0.9
    assert without["kld"] > 20 * with_adapter["kld"]


def test_an_importance_matrix_of_an_adapted_model_names_the_models_matrices():
    from purelm.imatrix import compute_imatrix

    base = str(FIXTURES / "llama-f32.gguf")
    ids = np.load(FIXTURES / "peft" / "llama-lora-ref.npz")["ids"].tolist() * 4
    plain = compute_imatrix(LLM(base, backend="numba"), ids, 32, batch=32)
    adapted = compute_imatrix(LLM(base, backend="numba", lora=[adapter("llama")]), ids, 32, batch=32)
    assert set(adapted.sums) == set(plain.sums) and not any("lora" in name for name in adapted.sums)
    # the adapter changes the activations every later matrix sees
    assert not np.allclose(adapted.sums["blk.1.attn_q.weight"], plain.sums["blk.1.attn_q.weight"])
    np.testing.assert_allclose(adapted.sums["blk.0.attn_q.weight"], plain.sums["blk.0.attn_q.weight"], rtol=1e-5)


def test_an_f16_adapter_on_every_backend(tmp_path):
    # convert_lora_to_gguf.py writes f16 by default: the numba backend keeps its halves as f16 bits
    src = GGUFFile(adapter("phi3"))
    w = GGUFWriter(tmp_path / "f16.gguf")
    for k in src.metadata:
        w.add(k, src.metadata[k], src.metadata.types[k], src.metadata.array_types.get(k))
    for t in src.tensors.values():
        w.add_tensor(t.name, t.dequantize().astype(np.float16))
    w.write()
    src.close()
    ref = np.load(FIXTURES / "peft" / "phi3-lora-ref.npz")
    ids = ref["ids"].tolist()
    got = {b: LLM(str(FIXTURES / "phi3-f32.gguf"), backend=b, lora=[(str(tmp_path / "f16.gguf"), 0.5)]).logits(ids)
           for b in backends()}
    for b, logits in got.items():
        assert np.abs(logits - got["numpy"]).max() < 1e-4, b
    assert np.abs(got["numpy"] - ref["half"]).max() < 0.05  # f16 rounding of the halves, nothing more


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_decode_tokens_logits_do_not_depend_on_its_batch(backend):
    # (the numba backend takes prompt runs through BLAS and decode tokens a row at a time)
    ids = np.load(FIXTURES / "peft" / "llama-lora-ref.npz")["ids"].tolist()
    llm = LLM(str(FIXTURES / "llama-f32.gguf"), backend=backend, lora=[adapter("llama")])
    m = llm.model

    def start(cache):
        seq = cache.add()
        m.forward_batch(cache, [(seq, ids[:20])])
        return seq

    cache = m.new_cache(64)
    alone = m.forward_batch(cache, [(start(cache), [ids[20]])])[0]
    cache = m.new_cache(64)
    a, b = start(cache), start(cache)
    together = m.forward_batch(cache, [(cache.add(), ids[1:19]), (a, [ids[20]]), (b, [ids[3]])])
    assert np.array_equal(together[1], alone)
    # nine decode tokens at once (the numba backend shares such rows among its threads)
    cache = m.new_cache(64)
    seqs = [start(cache) for _ in range(9)]
    many = m.forward_batch(cache, [(s, [ids[20]]) for s in seqs] + [(cache.add(), ids[1:19])])
    assert all(np.array_equal(row, alone) for row in many[:9])


@pytest.mark.parametrize("name", NAMES)
def test_convert_writes_what_llama_cpps_converter_writes(name, tmp_path, capsys):
    # tests/fixtures/peft/NAME-lora-f32.gguf: llama.cpp's convert_lora_to_gguf.py on the PEFT adapter in
    # tests/fixtures/peft/NAME-lora; purelm's converter must put every value where it did
    from purelm.cli import main

    out = tmp_path / "ours.gguf"
    assert main(["convert", str(FIXTURES / "peft" / f"{name}-lora"), str(out), "--lora-base",
                 str(FIXTURES / "hf" / name), "--type", "f32"]) == 0
    ours, theirs = GGUFFile(out), GGUFFile(adapter(name))
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    for n, t in theirs.tensors.items():
        assert ours.tensors[n].shape == t.shape and np.array_equal(ours.tensors[n].dequantize(), t.dequantize()), n
    for key in ("general.type", "general.architecture", "adapter.type", "adapter.lora.alpha"):
        assert ours.metadata[key] == theirs.metadata[key]
    ours.close(), theirs.close()
    # the default type is f16, as llama.cpp's converter's
    assert main(["convert", str(FIXTURES / "peft" / f"{name}-lora"), str(tmp_path / "f16.gguf"), "--lora-base",
                 str(FIXTURES / "hf" / name)]) == 0
    assert {t.type.name for t in GGUFFile(tmp_path / "f16.gguf").tensors.values()} == {"F16"}


def test_convert_refuses_what_it_cannot_express(tmp_path, capsys):
    import json
    import shutil

    from purelm.cli import main

    src, base = FIXTURES / "peft" / "llama-lora", str(FIXTURES / "hf" / "llama")

    def variant(**changes):
        d = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return str(d)

    for changes, message in (({"use_dora": True}, "DoRA"), ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
                             ({"peft_type": "IA3"}, "only LoRA"), ({"lora_alpha": float("inf")}, "lora_alpha"),
                             ({"r": "4"}, "positive number")):
        assert main(["convert", variant(**changes), str(tmp_path / "x.gguf"), "--lora-base", base]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.gguf").exists()
    # rsLoRA scales by alpha / sqrt(r): the file's alpha makes llama.cpp's alpha / r the same
    assert main(["convert", variant(use_rslora=True), str(tmp_path / "rs.gguf"), "--lora-base", base]) == 0
    assert GGUFFile(tmp_path / "rs.gguf").metadata["adapter.lora.alpha"] == pytest.approx(8 * 2.0)
    assert main(["convert", str(src), str(tmp_path / "y.gguf")]) == 2  # a PEFT adapter needs its base
    assert main(["convert", base, str(tmp_path / "y.gguf"), "--lora-base", base]) == 2
    assert main(["convert", str(src), str(tmp_path / "y.gguf"), "--lora-base", str(FIXTURES / "hf" / "gpt2")]) == 1
    assert "not a matrix of" in capsys.readouterr().err


def test_a_session_continues_only_with_the_adapters_that_made_it(tmp_path):
    base = str(FIXTURES / "llama-f32.gguf")
    llm = LLM(base, backend="numpy", lora=[(adapter("llama"), 0.5)])
    first = llm.generate("The quick", max_tokens=4, temperature=0, ignore_eos=True)
    llm.save_session(tmp_path / "s.bin")
    again = LLM(base, backend="numpy", lora=[(adapter("llama"), 0.5)])
    again.load_session(tmp_path / "s.bin")
    assert again.cache.seqs[0].n_past == llm.cache.seqs[0].n_past and first
    for other in ([], [(adapter("llama"), 1.0)], [(adapter("llama"), 0.5)] * 2):
        with pytest.raises(FormatError, match="LoRA adapters or scales"):
            LLM(base, backend="numpy", lora=other).load_session(tmp_path / "s.bin")


def requantized(src: str, dst, qtype: str, only: str | None = None) -> str:
    """The adapter `src` with its halves (or the one named `only`) stored as `qtype`."""
    from purelm.quant import GGMLType, quantize

    f = GGUFFile(src)
    w = GGUFWriter(dst)
    for k in f.metadata:
        w.add(k, f.metadata[k], f.metadata.types[k], f.metadata.array_types.get(k))
    for t in f.tensors.values():
        if only in (None, t.name):
            w.add_tensor(t.name, quantize(t.dequantize(), GGMLType[qtype]), GGMLType[qtype], t.shape)
        else:
            w.add_tensor(t.name, t.data, t.type, t.shape)
    w.write()
    f.close()
    return str(dst)


def test_q8_0_halves_and_other_types(tmp_path):
    base = str(FIXTURES / "llama-f32.gguf")
    ids = np.load(FIXTURES / "peft" / "llama-lora-ref.npz")["ids"].tolist()
    # rank 4 rows cannot hold 32-value blocks: Q8_0 for every A (width 64), f32 for every B
    q8 = tmp_path / "q8.gguf"
    f = GGUFFile(adapter("llama"))
    names = [n for n in f.tensors if n.endswith(".lora_a")]
    f.close()
    src = adapter("llama")
    for i, name in enumerate(names):
        src = requantized(src, tmp_path / f"step{i}.gguf", "Q8_0", only=name)
    got = {b: LLM(base, backend=b, lora=[src]).logits(ids) for b in ("numpy", "numba")}
    assert np.abs(got["numba"] - got["numpy"]).max() < 1e-4
    assert np.abs(got["numpy"] - np.load(FIXTURES / "peft" / "llama-lora-ref.npz")["logits"]).max() < 0.1
    bad = requantized(adapter("llama"), q8, "Q4_0", only=names[0])
    with pytest.raises(FormatError, match="is Q4_0: a LoRA half is one of"):
        LLM(base, backend="numpy", lora=[bad])


def test_an_adapter_at_scale_0_leaves_the_model_as_it_is():
    ids = np.load(FIXTURES / "peft" / "llama-lora-ref.npz")["ids"].tolist()
    plain = LLM(str(FIXTURES / "llama-q8_0.gguf"), backend="numba").logits(ids)
    off = LLM(str(FIXTURES / "llama-q8_0.gguf"), backend="numba", lora=[(adapter("llama"), 0.0)])
    assert np.array_equal(off.logits(ids), plain)  # the same kernels (glu fused), the same bits
    off.set_lora_scales([1.0])
    assert not np.allclose(off.logits(ids), plain, atol=0.1)


def test_export_lora_merges_the_adapter_into_the_weights(tmp_path, capsys):
    # llama-export-lora's tool: the merged model computes what the model with its adapter does
    from purelm.cli import main

    ref = np.load(FIXTURES / "peft" / "llama-lora-ref.npz")
    ids = ref["ids"].tolist()
    out = tmp_path / "merged.gguf"
    assert main(["export-lora", "-m", str(FIXTURES / "llama-f32.gguf"), "--lora-scaled", adapter("llama") + ":0.5",
                 "-o", str(out), "-q"]) == 0
    merged = GGUFFile(out)
    assert merged.metadata["general.file_type"] == 1 and "general.type" not in merged.metadata
    assert {t.type.name for t in merged.tensors.values()} == {"F32"}  # an f32 model's matrices stay f32
    assert np.abs(LLM(str(out), backend="numpy").logits(ids) - ref["half"]).max() < 1e-4
    # a quantized model: its adapted matrices become F16, the others are copied as they are
    out16 = tmp_path / "merged-q8.gguf"
    assert main(["export-lora", "-m", str(FIXTURES / "llama-q8_0.gguf"), "--lora", adapter("llama"),
                 "-o", str(out16), "-q"]) == 0
    src, m16 = GGUFFile(FIXTURES / "llama-q8_0.gguf"), GGUFFile(out16)
    for name, t in src.tensors.items():
        if name.endswith("attn_q.weight"):
            assert m16.tensors[name].type.name == "F16"
        elif name == "token_embd.weight":
            assert m16.tensors[name].type == t.type and np.array_equal(m16.tensors[name].data, t.data)
    at_run_time = LLM(str(FIXTURES / "llama-q8_0.gguf"), backend="numpy", lora=[adapter("llama")]).logits(ids)
    assert np.abs(LLM(str(out16), backend="numpy").logits(ids) - at_run_time).max() < 0.05
    # nothing to merge, the output is an input, a wrong adapter: one clear error, no file left
    assert main(["export-lora", "-m", str(FIXTURES / "llama-f32.gguf"), "-o", str(tmp_path / "x.gguf")]) == 2
    assert main(["export-lora", "-m", str(FIXTURES / "llama-f32.gguf"), "--lora", adapter("llama"),
                 "-o", adapter("llama")]) == 2
    assert main(["export-lora", "-m", str(FIXTURES / "gpt2-f32.gguf"), "--lora", adapter("llama"),
                 "-o", str(tmp_path / "x.gguf")]) == 1
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.tmp")) + list(tmp_path.glob("*.part"))


def test_mutated_adapters_load_or_give_one_clear_error(tmp_path):
    """300 mutants of an adapter file (tests/fuzzlib's mutators: metadata values, types, counts,
    shapes, offsets, bytes) against the model: each is applied or refused with a PurelmError."""
    import fuzzlib

    from purelm.errors import PurelmError

    base = str(FIXTURES / "llama-f32.gguf")
    ids = np.load(FIXTURES / "peft" / "llama-lora-ref.npz")["ids"].tolist()[:6]
    seed = fuzzlib.load_seed(adapter("llama"))
    loaded = refused = 0
    for case in fuzzlib.random_cases([seed], 300, seed=11):
        path = tmp_path / "m.gguf"
        path.write_bytes(fuzzlib.as_bytes(case.make()))
        try:
            llm = LLM(base, backend="numpy", lora=[str(path)])
        except PurelmError:
            refused += 1
            continue
        try:  # what loads runs, or (huge finite values: an overflow) says the logits are not finite
            assert llm.logits(ids).shape == (len(ids), llm.n_vocab)
        except PurelmError as e:
            assert "non-finite logits" in str(e)
        loaded += 1
    assert refused > 100 and loaded > 10, (loaded, refused)
