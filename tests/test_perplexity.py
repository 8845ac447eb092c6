"""`purelm perplexity` and KL divergence: llama.cpp's convention, checked against a direct computation
from Model.forward and against llama-perplexity's own figures (tests/fixtures/perplexity, made by
tools/make_perplexity_vectors.py)."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import struct

import numpy as np
import pytest

import purelm
from purelm.cli import main
from purelm.errors import FormatError, PurelmError, UsageError
from purelm.perplexity import (HEADER, BaseLogits, chunk_logits, kl_divergence, perplexity, read_text,
                               row_width, text_tokens)

from conftest import FIXTURES, rewrite_gguf

VECTORS = json.loads((FIXTURES / "perplexity" / "llama_cpp.json").read_text())["cases"]
TEXT = read_text(FIXTURES / "agreement.txt")


@pytest.fixture(scope="module")
def f32():
    return purelm.load(FIXTURES / "llama-f32.gguf", threads=1)


@pytest.fixture(scope="module")
def q8():
    return purelm.load(FIXTURES / "llama-q8_0.gguf", threads=1)


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    """The f32 fixture with add_bos_token = true (as tools/make_perplexity_vectors.py makes it)."""
    path = rewrite_gguf(FIXTURES / "llama-f32.gguf", tmp_path_factory.mktemp("bos") / "llama-bos.gguf",
                        meta={"tokenizer.ggml.add_bos_token": True})
    return purelm.load(path, threads=1)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def direct_nll(llm, tokens, n_ctx, n_chunk):
    """The convention written out: each chunk alone through Model.forward (first token BOS where the
    model adds one), -log p of the tokens after positions n_ctx//2 .. n_ctx-2, in float64."""
    first, out = n_ctx // 2, []
    for c in range(n_chunk):
        ids = np.array(tokens[c * n_ctx:(c + 1) * n_ctx])
        if llm.tokenizer.add_bos:
            ids[0] = llm.tokenizer.bos_id
        lsm = log_softmax64(llm.model.forward(ids, llm.model.new_cache(n_ctx), all_logits=True))
        out += [-lsm[j, tokens[c * n_ctx + j + 1]] for j in range(first, n_ctx - 1)]
    return np.array(out)


@pytest.mark.parametrize("n_ctx,batch", [(16, 2048), (15, 15), (16, 5), (21, 50)])
def test_nll_equals_direct_forward(f32, n_ctx, batch):
    tokens = text_tokens(f32.tokenizer, TEXT[:600])
    n_chunk = len(tokens) // n_ctx
    v = direct_nll(f32, tokens, n_ctx, n_chunk)
    r = perplexity(f32, tokens, n_ctx=n_ctx, batch=batch)
    assert (r.n_chunks, r.n_scored) == (n_chunk, n_chunk * (n_ctx - 1 - n_ctx // 2))
    assert r.ppl == pytest.approx(math.exp(v.mean()), rel=1e-5)
    err = math.exp(v.mean()) * math.sqrt(((v * v).mean() - v.mean() ** 2) / (len(v) - 1))
    assert r.ppl_error == pytest.approx(err, rel=1e-4)
    k = n_ctx - 1 - n_ctx // 2
    for c, row in enumerate(r.chunks):  # running and per-chunk figures
        assert row["ppl"] == pytest.approx(math.exp(v[:(c + 1) * k].mean()), rel=1e-5)
        assert row["chunk_ppl"] == pytest.approx(math.exp(v[c * k:(c + 1) * k].mean()), rel=1e-5)


def test_chunking_and_second_half(f32):
    """Which logits are scored against which tokens, on a tiny text: chunks of n_ctx, rows n_ctx//2 ..
    n_ctx-2 of each, predicting the token after each; the text's tail past whole chunks is unused."""
    tokens = text_tokens(f32.tokenizer, TEXT[:120])
    n_ctx = 10
    n_chunk = len(tokens) // n_ctx
    assert n_chunk >= 2 and len(tokens) % n_ctx  # a tail that is left out
    got = list(chunk_logits(f32.model, tokens, n_ctx, n_chunk, None, batch=25))
    assert [c for c, _, _ in got] == list(range(n_chunk))
    for c, logits, targets in got:
        assert targets.tolist() == tokens[c * n_ctx + 6:(c + 1) * n_ctx]  # first = 5: targets 6..9
        full = f32.model.forward(np.array(tokens[c * n_ctx:(c + 1) * n_ctx]), f32.model.new_cache(n_ctx),
                                 all_logits=True)
        np.testing.assert_allclose(logits, full[5:9], rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="at least 20"):
        perplexity(f32, tokens[:19], n_ctx=n_ctx)
    assert perplexity(f32, tokens, n_ctx=n_ctx, chunks=1).n_chunks == 1


def test_bos_replaces_each_chunks_first_token(bos_model):
    tokens = text_tokens(bos_model.tokenizer, TEXT[:800])
    assert tokens[0] == bos_model.tokenizer.bos_id and tokens[1] != tokens[0]
    v = direct_nll(bos_model, tokens, 24, 4)
    r = perplexity(bos_model, TEXT[:800], n_ctx=24, chunks=4)
    assert r.ppl == pytest.approx(math.exp(v.mean()), rel=1e-5)
    # and it matters: without BOS the chunks after the first give another figure
    plain = [math.exp(v.mean()) for v in [np.concatenate([
        -log_softmax64(bos_model.model.forward(np.array(tokens[c * 24:(c + 1) * 24]), bos_model.model.new_cache(24),
                                               all_logits=True))[np.arange(12, 23), tokens[c * 24 + 13:(c + 1) * 24]]
        for c in range(4)])]]
    assert abs(plain[0] / r.ppl - 1) > 1e-3


@pytest.mark.parametrize("case", [k for k in VECTORS if k != "base-file"])
def test_matches_llama_perplexity(case, f32, q8, bos_model):
    """llama-perplexity's own figures (running and final). The f32 models agree to 1e-4 (llama.cpp keeps
    its KV cache in f16); on q8_0 llama.cpp also rounds activations to 8 bits, which moves its figure by
    ~0.4%, so that case is held to 1%."""
    v = VECTORS[case]
    llm = {"llama-f32.gguf": f32, "llama-q8_0.gguf": q8, "bos": bos_model}[v["model"]]
    r = perplexity(llm, TEXT, n_ctx=v["ctx"], chunks=v["chunks"])
    tol = 1e-2 if "q8_0" in case else 2e-4
    assert r.n_chunks == v["chunks"] == len(v["running"])
    assert r.ppl == pytest.approx(v["ppl"], rel=tol)
    assert r.ppl_error == pytest.approx(v["ppl_error"], rel=2 * tol)
    assert [row["ppl"] for row in r.chunks] == pytest.approx(v["running"], rel=5 * tol)


def test_reads_llama_cpp_base_file(f32):
    """llama-perplexity's --kl-divergence-base file: its tokens are the text's, its PPL(base) is the one
    llama.cpp printed, and the same model scored against it diverges by almost nothing."""
    v = VECTORS["base-file"]
    path = FIXTURES / "perplexity" / v["file"]
    base = BaseLogits(path, f32.n_vocab)
    assert (base.n_ctx, base.n_chunk) == (v["ctx"], v["chunks"])
    assert base.tokens.tolist() == text_tokens(f32.tokenizer, TEXT)[:v["ctx"] * v["chunks"]]
    base.close()
    s = kl_divergence(f32, path).stats()
    assert s["ppl_base"] == pytest.approx(v["ppl"], rel=1e-4)
    assert s["ppl"] == pytest.approx(v["ppl"], rel=2e-4)
    assert 0 <= s["kld"] < 1e-4


def test_saved_base_is_llama_cpp_format(f32, tmp_path):
    """purelm's base file has llama.cpp's layout: the same header and tokens as llama-perplexity's file
    for the same run, and rows that decode to the model's log-probabilities."""
    path = tmp_path / "base.kld"
    perplexity(f32, TEXT, n_ctx=32, chunks=2, save_base=path)
    ours, theirs = path.read_bytes(), (FIXTURES / "perplexity" / "llama-f32-c32.kld").read_bytes()
    n_head = HEADER.size + 4 * 64
    assert len(ours) == len(theirs) and ours[:n_head] == theirs[:n_head]
    w = row_width(f32.n_vocab)
    rows = np.frombuffer(ours[n_head:], np.uint16).reshape(-1, w)
    head = rows[:, :4].copy().view(np.float32)
    decoded = head[:, :1] * rows[:, 4:4 + f32.n_vocab] + head[:, 1:2]
    tokens = text_tokens(f32.tokenizer, TEXT)
    want = np.concatenate([log_softmax64(f32.model.forward(np.array(tokens[c * 32:(c + 1) * 32]),
                                                           f32.model.new_cache(32), all_logits=True))[16:31]
                           for c in range(2)])
    live = want > want.max(axis=1, keepdims=True) - 16  # below max - 16 the format keeps nothing
    assert np.abs(decoded - want)[live].max() < 2 * 16 / 65535


def test_kl_divergence_of_a_model_with_itself(f32, tmp_path):
    path = tmp_path / "self.kld"
    r = perplexity(f32, TEXT, n_ctx=64, chunks=4, save_base=path)
    k = kl_divergence(f32, path)
    s = k.stats()
    assert (k.n_chunks, k.n_scored) == (4, r.n_scored)
    assert abs(s["kld"]) < 1e-6 and s["kld_percentiles"]["max"] < 1e-5
    assert s["same_top"] == 1.0
    assert s["ppl"] == pytest.approx(r.ppl, rel=1e-6) and s["ppl_base"] == pytest.approx(r.ppl, rel=1e-4)
    assert s["p_diff_rms"] < 1e-4
    assert kl_divergence(f32, path, chunks=2).n_scored == r.n_scored // 2


def test_kl_divergence_q8_against_f32_matches_numpy(f32, q8, tmp_path):
    path = tmp_path / "f32.kld"
    n_ctx, n_chunk = 48, 5
    perplexity(f32, TEXT, n_ctx=n_ctx, chunks=n_chunk, save_base=path)
    k = kl_divergence(q8, path)
    s = k.stats()
    # direct: both models' log-softmax in float64, KL(f32 || q8) per scored token
    tokens = text_tokens(f32.tokenizer, TEXT)
    kl, same, dp = [], [], []
    for c in range(n_chunk):
        ids = np.array(tokens[c * n_ctx:(c + 1) * n_ctx])
        lp = log_softmax64(f32.model.forward(ids, f32.model.new_cache(n_ctx), all_logits=True))[24:47]
        lq = log_softmax64(q8.model.forward(ids, q8.model.new_cache(n_ctx), all_logits=True))[24:47]
        kl += list((np.exp(lp) * (lp - lq)).sum(axis=1))
        same += list(lp.argmax(1) == lq.argmax(1))
        t = ids[25:48]
        dp += list(np.exp(lq[np.arange(23), t]) - np.exp(lp[np.arange(23), t]))
    kl, dp = np.array(kl), np.array(dp)
    assert kl.mean() > 1e-5 and s["kld"] > 0
    assert s["kld"] == pytest.approx(kl.mean(), rel=0.02, abs=2e-6)
    assert np.sort(kl)[-1] == pytest.approx(s["kld_percentiles"]["max"], rel=0.05, abs=1e-5)
    assert s["same_top"] == pytest.approx(np.mean(same), abs=1.5 / len(kl))
    assert s["p_diff"] == pytest.approx(dp.mean(), abs=1e-5)
    assert s["p_diff_rms"] == pytest.approx(math.sqrt((dp * dp).mean()), rel=0.02)
    assert s["ppl_base"] != pytest.approx(s["ppl"], rel=1e-6)


def _base_file(tmp_path, f32) -> bytes:
    path = tmp_path / "good.kld"
    perplexity(f32, TEXT, n_ctx=16, chunks=2, save_base=path)
    return path.read_bytes()


def _hostile(good: bytes, n_vocab: int) -> dict[str, bytes]:
    w = row_width(n_vocab)
    rows_at = HEADER.size + 4 * 32
    bad_scale = bytearray(good)
    bad_scale[rows_at:rows_at + 4] = struct.pack("<f", float("nan"))
    big_scale = bytearray(good)
    big_scale[rows_at + 2 * w:rows_at + 2 * w + 4] = struct.pack("<f", 1.0)
    pos_min = bytearray(good)
    pos_min[rows_at + 4:rows_at + 8] = struct.pack("<f", 3.0)
    bad_token = bytearray(good)
    bad_token[HEADER.size + 8:HEADER.size + 12] = struct.pack("<i", n_vocab)
    neg_token = bytearray(good)
    neg_token[HEADER.size:HEADER.size + 4] = struct.pack("<i", -1)

    def header(n_ctx, vocab, n_chunk):
        return HEADER.pack(b"_logits_", n_ctx, vocab, n_chunk) + good[HEADER.size:]
    return {"empty": b"", "short": good[:12], "magic": b"_LOGITS_" + good[8:], "truncated": good[:-2],
            "longer": good + b"\0\0", "vocab": header(16, n_vocab + 1, 2), "n_ctx 2": header(2, n_vocab, 2),
            "n_ctx negative": header(-16, n_vocab, 2), "n_chunk 0": header(16, n_vocab, 0),
            "n_chunk huge": header(16, n_vocab, 2**31 - 1), "n_ctx huge": header(2**31 - 1, n_vocab, 2),
            "token past vocab": bytes(bad_token), "token negative": bytes(neg_token),
            "nan scale": bytes(bad_scale), "scale too big": bytes(big_scale), "positive min": bytes(pos_min)}


@pytest.mark.parametrize("case", list(_hostile(b"\0" * 4096, 320)))
def test_hostile_base_files(case, f32, tmp_path):
    data = _hostile(_base_file(tmp_path, f32), f32.n_vocab)[case]
    path = tmp_path / "hostile.kld"
    path.write_bytes(data)
    with pytest.raises(FormatError):
        kl_divergence(f32, path)


def test_cli_end_to_end(tmp_path, capsys):
    model, q8 = str(FIXTURES / "llama-f32.gguf"), str(FIXTURES / "llama-q8_0.gguf")
    text, base, table = str(FIXTURES / "agreement.txt"), tmp_path / "f32.kld", tmp_path / "chunks.json"
    v = VECTORS["f32-c64"]
    assert main(["perplexity", model, text, "-c", "64", "--chunks", "8", "-t", "1", "--kl-divergence-base",
                 str(base), "-o", str(table)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1]") and "[8]" in out
    ppl = float(out.split("Final estimate: PPL = ")[1].split()[0])
    assert ppl == pytest.approx(v["ppl"], rel=2e-4)
    data = json.loads(table.read_text())
    assert len(data["chunks"]) == 8 and data["ppl"] == pytest.approx(ppl, abs=1e-4)
    assert base.stat().st_size == BaseLogits(base, 320).n_chunk * 31 * row_width(320) * 2 + HEADER.size + 4 * 512

    csv = tmp_path / "kld.csv"
    assert main(["perplexity", q8, "--kl-divergence-base", str(base), "--kl-divergence", "-o", str(csv)]) == 0
    out = capsys.readouterr().out
    for line in ("KL Divergence", "Mean PPL(base)", "Mean    KLD:", "99.9%   KLD:", " 0.1%   KLD:", "Median  Δp:",
                 "RMS Δp    :", "Same top p:"):
        assert line in out
    assert float(out.split("Mean PPL(base)                : ")[1].split()[0]) == pytest.approx(ppl, rel=1e-4)
    # benchmarks/perplexity_check.py reads both tools' reports with one parser
    spec = importlib.util.spec_from_file_location("perplexity_check", FIXTURES.parent.parent / "benchmarks" /
                                                  "perplexity_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    stats = check.statistics(out)
    assert stats["Mean PPL(base)"][0] == pytest.approx(ppl, rel=1e-4) and 0 < stats["Mean KLD"][0] < 0.01
    assert len(stats) == 34 and stats["Same top p"][0] > 50  # as many figures as llama.cpp prints
    lines = csv.read_text().splitlines()
    assert {"chunk", "ppl", "kld", "same_top", "chunk_kld"} <= set(lines[0].split(",")) and len(lines) == 9


@pytest.mark.parametrize("args,code,message", [
    (["--kl-divergence"], 2, "--kl-divergence-base"),
    (["-c", "2"], 2, "at least 3"),
    (["-c", "4096"], 2, "needs at least 8192"),
    (["--chunks", "0"], 2, "--chunks"),
    (["-o", "x.txt"], 2, ".json or .csv"),
])
def test_cli_errors(args, code, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "out.kld"
    argv = ["perplexity", str(FIXTURES / "llama-f32.gguf"), str(FIXTURES / "agreement.txt"), *args]
    if args[0] == "-c" and args[1] == "4096":
        argv += ["--kl-divergence-base", str(base)]
    assert main(argv) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("purelm: warning")]
    assert len(errors) == 1 and errors[0].startswith("purelm: error") and message in errors[0]
    assert list(tmp_path.iterdir()) == []  # no partial output


def test_cli_never_writes_over_the_model_or_the_text(tmp_path, capsys):
    model, text = tmp_path / "m.gguf", tmp_path / "t.csv"
    shutil.copy(FIXTURES / "llama-f32.gguf", model)
    shutil.copy(FIXTURES / "agreement.txt", text)
    before = model.read_bytes(), text.read_bytes()
    for out, what in ((model, "model file"), (text, "text file")):
        assert main(["perplexity", str(model), str(text), "-c", "64", "--kl-divergence-base", str(out)]) == 2
        assert f"{out} is the {what}: writing there would overwrite it" in capsys.readouterr().err
    assert main(["perplexity", str(model), str(text), "-c", "64", "-o", str(text)]) == 2
    assert "-o/--output" in capsys.readouterr().err
    assert (model.read_bytes(), text.read_bytes()) == before


def test_cli_hostile_base_and_context_mismatch(tmp_path, capsys, f32):
    good = _base_file(tmp_path, f32)
    bad = tmp_path / "bad.kld"
    bad.write_bytes(good[:-2])
    model = str(FIXTURES / "llama-f32.gguf")
    assert main(["perplexity", model, "--kl-divergence-base", str(bad), "--kl-divergence"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("purelm:")]
    assert len(err) == 1 and "size: is 9218 bytes" in err[0]
    assert main(["perplexity", model, "--kl-divergence-base", str(tmp_path / "good.kld"), "--kl-divergence",
                 "-c", "32"]) == 2
    assert "saved with a context of 16" in capsys.readouterr().err


def test_failed_run_leaves_no_base_file(f32, tmp_path):
    def stop(c, n, row):
        if c == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        perplexity(f32, TEXT, n_ctx=16, chunks=3, batch=16, save_base=tmp_path / "base.kld", on_chunk=stop)
    assert list(tmp_path.iterdir()) == []


def test_api_checks_arguments(f32):
    for kwargs in ({"n_ctx": 2}, {"n_ctx": 1.5}, {"chunks": 0}, {"batch": 0}, {"n_ctx": True}):
        with pytest.raises(UsageError):
            perplexity(f32, TEXT, **kwargs)
    with pytest.raises(UsageError):
        perplexity(f32, [0, 1, 320] * 100, n_ctx=16)
    assert issubclass(FormatError, PurelmError)
