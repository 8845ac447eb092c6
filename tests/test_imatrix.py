"""`purelm imatrix` / `compute_imatrix` against llama-imatrix's own files on the same model and text:

- tests/fixtures/llama-f16.imatrix.gguf and .dat: `llama-imatrix -m tests/fixtures/llama-f16.gguf -f
  tests/fixtures/agreement.txt -c 128` (61 chunks), and `--output-format dat`;
- tests/fixtures/qwen3moe-w256.imatrix.gguf: `llama-imatrix -m tests/fixtures/qwen3moe-w256-q4_k_m.gguf
  -f tests/fixtures/agreement.txt -c 64 --chunks 8 --no-ppl` (4 experts, 2 used), run from the repository root.

The same entries, the same counts, the sums within the two engines' rounding: llama.cpp rounds the
activations of f16 weights to f16 and of quantized ones to int8, so a Q4_K model's sums differ by ~1% and
a near-tie of the router sends a few tokens to another expert."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import purelm
from purelm.cli import main
from purelm.errors import UsageError
from purelm.formats.gguf import GGUFFile
from purelm.imatrix import compute_imatrix, load_imatrix
from purelm.perplexity import read_text
from conftest import LLAMA_CPP

FIX = Path(__file__).parent / "fixtures"
TEXT = "tests/fixtures/agreement.txt"  # as llama-imatrix was given it: the dataset name in its files


def _theirs(path: Path) -> tuple[dict, dict, dict]:
    f = GGUFFile(path)
    sums = {n[:-8]: t.dequantize() for n, t in f.tensors.items() if n.endswith(".in_sum2")}
    counts = {n: f.tensors[n + ".counts"].dequantize().reshape(-1) for n in sums}
    return sums, counts, dict(f.metadata)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_dense_model_matches_llama_imatrix(backend, tmp_path):
    llm = purelm.load(FIX / "llama-f16.gguf", backend=backend, n_ctx=128)
    run = compute_imatrix(llm, read_text(FIX / "agreement.txt"), n_ctx=128, dataset=TEXT)
    sums, counts, meta = _theirs(FIX / "llama-f16.imatrix.gguf")
    assert sorted(run.sums) == sorted(sums) and len(sums) == 14  # every layer matrix; no token_embd, no output
    assert (run.chunk_count, run.chunk_size) == (meta["imatrix.chunk_count"], meta["imatrix.chunk_size"]) == (61, 128)
    for name, s in sums.items():
        assert run.counts[name].tolist() == counts[name].tolist() == [61 * 128], name
        np.testing.assert_allclose(run.sums[name].reshape(-1), s, rtol=3e-3, err_msg=name)
    assert 500 < run.ppl < 900  # the fixture's random weights: a poor model

    run.save(tmp_path / "ours.gguf")
    ours, theirs = GGUFFile(tmp_path / "ours.gguf"), GGUFFile(FIX / "llama-f16.imatrix.gguf")
    assert dict(ours.metadata) == dict(theirs.metadata)  # general.type, datasets, chunk count and size
    assert [(n, t.shape, t.type) for n, t in ours.tensors.items()] == \
        [(n, t.shape, t.type) for n, t in theirs.tensors.items()]  # names sorted, dense ones 1-D

    run.save(tmp_path / "ours.dat", legacy=True)
    a, b = load_imatrix(tmp_path / "ours.dat"), load_imatrix(FIX / "llama-f16.imatrix.dat")
    assert (a.datasets, a.chunk_count, a.legacy) == (b.datasets, b.chunk_count, True) == ([TEXT], 61, True)
    assert sorted(a.weights) == sorted(b.weights)
    for name in b.weights:
        np.testing.assert_allclose(a.weights[name], b.weights[name], rtol=3e-3, err_msg=name)
    assert (tmp_path / "ours.dat").stat().st_size == (FIX / "llama-f16.imatrix.dat").stat().st_size


def test_experts_match_llama_imatrix():
    llm = purelm.load(FIX / "qwen3moe-w256-q4_k_m.gguf", n_ctx=64)
    run = compute_imatrix(llm, read_text(FIX / "agreement.txt"), n_ctx=64, chunks=8, dataset=TEXT, ppl=False)
    sums, counts, meta = _theirs(FIX / "qwen3moe-w256.imatrix.gguf")
    assert sorted(run.sums) == sorted(sums) and (run.chunk_count, meta["imatrix.chunk_count"]) == (8, 8)
    assert np.isnan(run.ppl)  # (ppl=False: the second halves' logits were not computed)
    for name, s in sums.items():
        ours, want = run.sums[name], s.reshape(run.sums[name].shape)
        if "_exps." in name:  # 4 experts, 2 a token: all tokens' picks counted, a few routed elsewhere
            assert ours.shape == (4, 256) and run.counts[name].sum() == counts[name].sum() == 2 * 8 * 64
            assert np.abs(run.counts[name] - counts[name]).max() <= 8, name
            tol = 0.05
        else:
            assert run.counts[name].tolist() == counts[name].tolist() == [8 * 64], name
            tol = 0.015
        assert np.abs(ours - want).max() <= tol * np.abs(want).max(), name


def test_output_matrix_and_decode_steps(tmp_path):
    """--process-output adds output.weight (every row of every chunk); a decode step (one token,
    Backend.expert_ffn) counts each picked expert's input, as a prompt's rows do."""
    llm = purelm.load(FIX / "llama-f16.gguf", n_ctx=128)
    run = compute_imatrix(llm, read_text(FIX / "agreement.txt"), n_ctx=128, chunks=3, process_output=True)
    assert run.counts["output.weight"].tolist() == [3 * 128] and run.sums["output.weight"].shape == (1, 64)
    assert "token_embd.weight" not in run.sums
    # the backend is itself again afterwards: no op left on the instance
    assert not {"linear", "linear_many", "glu", "expert_ffn"} & set(vars(llm.backend))

    from purelm.imatrix import _Collector, _Sums, _weight_names

    moe = purelm.load(FIX / "qwen3moe-w256-q4_k_m.gguf", n_ctx=64)
    sums = _Sums(_weight_names(moe.model))
    with _Collector(moe.backend, sums):
        moe.model.forward([1, 2, 3, 4], moe.model.new_cache(64))
        for token in (5, 6, 7):  # one token at a time, as decode: counts of experts only (llama-imatrix
            moe.model.forward([token], moe.model.new_cache(64))  # skips dense products under 16 rows)
    assert sums.counts["blk.0.ffn_gate_exps.weight"].sum() == 2 * (4 + 3)
    assert sums.counts["blk.0.ffn_down_exps.weight"].sum() == 2 * (4 + 3)
    assert "blk.0.attn_q.weight" not in sums.counts


def test_passes_under_16_rows_count_nothing_as_in_llama_imatrix():
    """Chunks of 128 in passes of 120: each chunk's last 8 rows are a product llama-imatrix skips, so the
    counts hold 2 x 120 rows and the chunk count is what they make whole (1). Token ids work as the text."""
    llm = purelm.load(FIX / "llama-f16.gguf", n_ctx=128)
    tokens = llm.tokenizer.encode(read_text(FIX / "agreement.txt"))
    run = compute_imatrix(llm, tokens, n_ctx=128, chunks=2, batch=120, ppl=False)
    assert run.counts["blk.0.attn_q.weight"].tolist() == [240] and run.chunk_count == 1
    whole = compute_imatrix(llm, tokens, n_ctx=128, chunks=2, ppl=False)
    assert whole.counts["blk.0.attn_q.weight"].tolist() == [256] and whole.chunk_count == 2
    for bad in ({"batch": 15}, {"n_ctx": 8}, {"chunks": 0}, {"n_ctx": "128"}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            compute_imatrix(llm, tokens, **{"n_ctx": 128, **bad})
    with pytest.raises(UsageError, match="token id"):
        compute_imatrix(llm, [1, 2, 10**9], n_ctx=128)


def test_cli(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    model = str(FIX / "llama-f16.gguf")
    assert main(["imatrix", model, "-f", str(FIX / "agreement.txt"), "-c", "128", "--chunks", "2", "-o", str(out)]) == 0
    said = capsys.readouterr()
    assert "[1]" in said.out and "[2]" in said.out and "Final estimate: PPL = " in said.out
    m = load_imatrix(out)
    assert len(m.weights) == 14 and m.chunk_count == 2 and m.datasets == [str(FIX / "agreement.txt")]
    dat = tmp_path / "m.dat"
    assert main(["imatrix", model, str(FIX / "agreement.txt"), "-c", "128", "--chunks", "1", "-o", str(dat),
                 "--output-format", "dat", "--no-ppl"]) == 0
    assert load_imatrix(dat).legacy and "PPL" not in capsys.readouterr().out
    # the matrix does what llama-imatrix's does: purelm quantize takes it
    q = tmp_path / "q.gguf"
    assert main(["quantize", model, str(q), "Q4_K_M", "--imatrix", str(out)]) == 0
    assert GGUFFile(q).metadata["quantize.imatrix.chunks_count"] == 2
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for args, says in ((["-c", "8"], "-c/--ctx-size must be at least 16"), (["-o", model], "is the model file"),
                       (["-b", "8"], "-b/--batch must be at least 16"), (["--chunks", "0"], "--chunks")):
        assert main(["imatrix", model, "-f", str(FIX / "agreement.txt"), *args]) == 2
        assert says in capsys.readouterr().err, args
    assert main(["imatrix", model, "-f", str(short), "-o", str(tmp_path / "none.gguf")]) == 2
    assert "needs at least" in capsys.readouterr().err and not (tmp_path / "none.gguf").exists()
    assert main(["imatrix", model]) == 2 and "give the text" in capsys.readouterr().err


LLAMA_BIN = LLAMA_CPP / "build" / "bin"


def test_smollm2_matches_llama_imatrix_run_now(smollm2_path, tmp_path):
    """llama-imatrix itself (built by ../shared/peers/build-llama-cpp.sh) and `purelm imatrix` on SmolLM2
    with --process-output: the same file but for the sums, which Q4_1's int8 (llama.cpp) and int16
    (purelm) activations round apart: median 0.1%, at most a few % (ffn_down's inputs)."""
    exe = LLAMA_BIN / "llama-imatrix"
    if not exe.is_file():
        pytest.skip(f"llama-imatrix is not at {exe} (set PURELM_LLAMA_CPP_DIR)")
    args = ["-f", TEXT, "-c", "128", "--chunks", "2", "--process-output"]
    done = subprocess.run([str(exe), "-m", str(smollm2_path), *args, "-o", str(tmp_path / "theirs.gguf"), "-t", "2"],
                          capture_output=True, text=True, timeout=300, cwd=FIX.parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    cwd = os.getcwd()
    try:
        os.chdir(FIX.parent.parent)  # the dataset name as given, relative
        assert main(["imatrix", str(smollm2_path), *args, "-o", str(tmp_path / "ours.gguf")]) == 0
    finally:
        os.chdir(cwd)
    a, b = GGUFFile(tmp_path / "ours.gguf"), GGUFFile(tmp_path / "theirs.gguf")
    assert dict(a.metadata) == dict(b.metadata) and list(a.tensors) == list(b.tensors)
    assert len(a.tensors) == 2 * 30 * 7  # 7 matrices a layer (the output is the tied token_embd: not counted)
    gaps = []
    for name, t in b.tensors.items():
        ours, theirs = a.tensors[name].dequantize(), t.dequantize()
        assert ours.shape == theirs.shape, name
        if name.endswith(".counts"):
            assert ours.tolist() == theirs.tolist(), name
        else:
            gaps.append(float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
    assert np.median(gaps) < 0.005 and max(gaps) < 0.06, (np.median(gaps), max(gaps))
