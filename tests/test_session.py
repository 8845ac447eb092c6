"""Sessions (purelm/session.py): a sequence saved to a file and restored in another LLM continues exactly
as the uninterrupted one does (the same tokens, the same positions evaluated, the same cache bytes);
session files are untrusted input: each hostile field is one FormatError and the engine stays usable;
a failed save leaves no file. The command line's --save-session/--load-session in generate and chat."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

import fuzzlib
import purelm
from purelm import session
from purelm.backends.numba_backend import NumbaBackend
from purelm.backends.numpy_backend import NumpyBackend
from purelm.cli import main
from purelm.errors import FormatError, UsageError

MODEL = FIXTURES / "llama-q8_0.gguf"
MODEL_32 = FIXTURES / "gemma3-q8_0.gguf"  # heads of 32: a q8_0 cache fits them
BACKENDS = {"numba": NumbaBackend(2), "numpy": NumpyBackend()}


def ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 200, n)]


def fresh(backend="numba", kind="f32", n_ctx=64, model=None):
    model = model or (MODEL_32 if kind == "q8_0" else MODEL)
    return purelm.load(model, backend=BACKENDS[backend], n_ctx=n_ctx, cache_type_k=kind, cache_type_v=kind)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_restored_session_continues_exactly(tmp_path, backend, kind):
    """A: a prompt and a reply, saved, then a longer prompt that extends them. B (a new LLM): the
    session loaded, then the same longer prompt. The same tokens (sampled, seeded), the same positions
    evaluated, the same cache bytes and logits as A at the moment it saved. The first prompt again
    takes the saved logits, as in A."""
    path = tmp_path / "s.kv"
    first = ids(11, 1)
    sampling = dict(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    a = fresh(backend, kind)
    reply = a.complete(first, **sampling)
    a.save_session(path, messages=[{"role": "user", "content": "hi"}])
    saved_k, saved_v = a.cache.stored(0)
    saved_logits = a.cache.seqs[0].prompt_logits[1].copy()
    longer = first + reply.tokens + ids(5, 2)
    want = a.complete(longer, **sampling)

    b = fresh(backend, kind)
    assert b.load_session(path) == [{"role": "user", "content": "hi"}]
    assert b.cache.tokens == first + reply.tokens[:-1] and b.cache.n_past == len(first) + 5
    got_k, got_v = b.cache.stored(0)
    for x, y in zip(saved_k + saved_v, got_k + got_v):
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))
    assert np.array_equal(b.cache.seqs[0].prompt_logits[1], saved_logits)
    got = b.complete(longer, **sampling)
    assert got.tokens == want.tokens
    assert got.timings["prompt_eval_tokens"] == want.timings["prompt_eval_tokens"] == 6

    c = fresh(backend, kind)
    c.load_session(path)
    again = c.complete(first, **sampling)
    assert again.tokens == reply.tokens and again.timings["prompt_eval_tokens"] == 0


def test_torch_backend_round_trip(tmp_path):
    pytest.importorskip("torch", reason="the torch backend needs PyTorch")
    from purelm.backends.torch_backend import TorchBackend

    be = TorchBackend("cpu", "fp32")
    a = purelm.load(MODEL, backend=be, n_ctx=64, cache_type_k="f16", cache_type_v="f16")
    first = ids(9, 4)
    reply = a.complete(first, max_tokens=4, temperature=0, ignore_eos=True)
    a.save_session(tmp_path / "t.kv")
    longer = first + reply.tokens + ids(3, 5)
    want = a.complete(longer, max_tokens=4, temperature=0, ignore_eos=True)
    b = purelm.load(MODEL, backend=be, n_ctx=64, cache_type_k="f16", cache_type_v="f16")
    assert b.load_session(tmp_path / "t.kv") is None
    got = b.complete(longer, max_tokens=4, temperature=0, ignore_eos=True)
    assert got.tokens == want.tokens and got.timings["prompt_eval_tokens"] == want.timings["prompt_eval_tokens"]


# -- hostile files


def _session(tmp_path, kind="f32"):
    a = fresh("numba", kind)
    a.complete(ids(8, 6), max_tokens=3, temperature=0, ignore_eos=True)
    path = tmp_path / "good.kv"
    a.save_session(path, messages=[{"role": "user", "content": "x"}])
    return path.read_bytes()


def _with_header(raw: bytes, change) -> bytes:
    header, end = fuzzlib._session_header(raw)
    change(header)
    head = json.dumps(header).encode()
    return raw[:16] + struct.pack("<Q", len(head)) + head + b"\0" * (-(24 + len(head)) % 8) + raw[end + (-end % 8):]


def _set(*path_value):
    *keys, value = path_value

    def change(h):
        node = h
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return change


HOSTILE = {
    "magic": lambda raw: b"GGUF" + raw[4:],
    "empty": lambda raw: b"",
    "version": lambda raw: raw[:8] + struct.pack("<I", 2) + raw[12:],
    "header length": lambda raw: raw[:16] + struct.pack("<Q", 2**63) + raw[24:],
    "header length, past the end": lambda raw: raw[:16] + struct.pack("<Q", len(raw)) + raw[24:],
    "header length, over the limit": lambda raw: raw[:16] + struct.pack("<Q", (32 << 20) + 1) + raw[24:]
    + b" " * (32 << 20),
    "header not JSON": lambda raw: raw[:24] + b"\xff{" + raw[26:],
    "header a list": lambda raw: raw[:16] + struct.pack("<Q", 2) + b"[]" + b"\0" * 6,
    "header nesting": lambda raw: raw[:16] + struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000,
    "model": lambda raw: _with_header(raw, _set("model", "fingerprint", "0" * 64)),
    "model n_layers": lambda raw: _with_header(raw, _set("model", "n_layers", 2**63)),
    "cache": lambda raw: _with_header(raw, _set("cache", "type_k", "q8_0")),
    "cache rotation": lambda raw: _with_header(raw, _set("cache", "rotate_k", 64)),
    "n_past huge": lambda raw: _with_header(raw, _set("n_past", 10**30)),
    "n_past negative": lambda raw: _with_header(raw, _set("n_past", -1)),
    "n_past float": lambda raw: _with_header(raw, _set("n_past", 10.0)),
    "n_past bool": lambda raw: _with_header(raw, _set("n_past", True)),
    "n_past past the context": lambda raw: _with_header(raw, _set("n_past", 65)),
    "tokens short": lambda raw: _with_header(raw, lambda h: h["tokens"].pop()),
    "tokens not a list": lambda raw: _with_header(raw, _set("tokens", "abc")),
    "token out of range": lambda raw: _with_header(raw, _set("tokens", 0, 10**9)),
    "token negative": lambda raw: _with_header(raw, _set("tokens", -1, -1)),
    "token NaN": lambda raw: _with_header(raw, _set("tokens", 0, math.nan)),
    "logits_at zero": lambda raw: _with_header(raw, _set("logits_at", 0)),
    "logits_at past n_past": lambda raw: _with_header(raw, _set("logits_at", 999)),
    "logits_at a string": lambda raw: _with_header(raw, _set("logits_at", "3")),
    "logits dropped": lambda raw: _with_header(raw, _set("logits_at", None)),
    "data short": lambda raw: raw[:-1],
    "data long": lambda raw: raw + b"\0",
    "data truncated": lambda raw: raw[:len(raw) // 2],
    "logits NaN": lambda raw: raw[:-4] + struct.pack("<f", math.nan),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_session_files_are_refused(tmp_path, name):
    """Each damaged or lying file is one FormatError naming the file, and the LLM's own context is
    left as it was: the next generation is the one it would have been."""
    raw = _session(tmp_path)
    bad = tmp_path / "bad.kv"
    bad.write_bytes(HOSTILE[name](raw))
    llm = fresh()
    prompt = ids(7, 8)
    want = llm.complete(prompt, max_tokens=3, temperature=0, ignore_eos=True).tokens
    with pytest.raises(FormatError, match=str(bad)):
        llm.load_session(bad)
    assert llm.complete(prompt, max_tokens=3, temperature=0, ignore_eos=True).tokens == want


def test_cache_type_mismatch_says_which(tmp_path):
    path = tmp_path / "q.kv"
    path.write_bytes(_session(tmp_path, "q8_0"))
    with pytest.raises(FormatError, match=r"stored as q8_0/q8_0; this model's cache is f32/f32 .*-ctk q8_0 -ctv q8_0"):
        fresh(model=MODEL_32).load_session(path)
    assert fresh(kind="q8_0").load_session(path) == [{"role": "user", "content": "x"}]


def test_a_session_is_never_written_over_the_model(tmp_path, capsys):
    model = tmp_path / "m.gguf"
    shutil.copy(MODEL, model)
    llm = fresh(model=model)
    llm.complete(ids(5, 9), max_tokens=2, temperature=0)
    with pytest.raises(UsageError, match="it is the model file"):
        llm.save_session(model)
    # the command line refuses it before generating anything
    assert main(["generate", "-m", str(model), "-n", "2", "--save-session", str(model), "Hi"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--save-session" in err and "is the model file" in err
    assert model.read_bytes() == Path(MODEL).read_bytes()


def test_a_failed_save_leaves_no_file(tmp_path):
    llm = fresh()
    llm.complete(ids(5, 9), max_tokens=2, temperature=0)
    with pytest.raises(UsageError, match="messages must be JSON"):
        llm.save_session(tmp_path / "s.kv", messages=[object()])
    with pytest.raises(UsageError, match="cannot write the session"):
        llm.save_session(tmp_path / "no-such-dir" / "s.kv")
    for folder in ("/", tmp_path):
        with pytest.raises(UsageError, match="it is a directory"):
            llm.save_session(folder)
    deep: list = []
    for _ in range(100_000):  # nested deeper than Python's stack
        deep = [deep]
    with pytest.raises(UsageError, match="messages must be JSON"):
        llm.save_session(tmp_path / "s.kv", messages=deep)
    with pytest.raises(UsageError, match="cannot read the session"):
        llm.load_session(tmp_path / "missing.kv")
    with pytest.raises(UsageError, match="more than a session file holds"):
        llm.save_session(tmp_path / "s.kv", messages=["x" * session.HEADER_MAX])
    for bad in (None, 3, b"s.kv", "", 1.5):
        with pytest.raises(UsageError, match="path must be a non-empty str or os.PathLike"):
            llm.save_session(bad)
        with pytest.raises(UsageError, match="path must be a non-empty str or os.PathLike"):
            llm.load_session(bad)
    assert os.listdir(tmp_path) == []
    llm.cache.n_past = 3  # positions whose tokens nobody recorded
    with pytest.raises(UsageError, match="only a sequence run through"):
        llm.save_session(tmp_path / "s.kv")
    assert os.listdir(tmp_path) == []


def test_fuzz_session_files(tmp_path):
    """Mutants of two session files (one with the last prompt's logits and a conversation, one empty)
    through load_session and a generation in worker processes: each loads, or is one PurelmError."""
    seeds = [fuzzlib.load_seed(p, "session") for p in fuzzlib.session_seeds(tmp_path)]
    out = tmp_path / "cases"
    with fuzzlib.Runner("session-load+generate", workers=2, timeout=20) as runner:
        report = fuzzlib.run_campaign(runner, fuzzlib.random_cases(seeds, 120, seed=0, fmt="session"), str(out))
    assert report.cases == 120
    if report.failures:
        pytest.fail(f"fuzzing found failures (inputs saved under {out}):\n{report.summary()}", pytrace=False)
    assert report.counts["ok"] > 10 and report.counts["purelm_error"] > 10  # both kinds of case were made


# -- command line


def test_cli_generate_saves_and_loads(tmp_path, capsys):
    path = str(tmp_path / "g.kv")
    base = ["generate", "-m", str(MODEL), "-c", "64", "--temp", "0", "--ignore-eos", "-n", "4"]
    assert main(base + ["Hello world", "--save-session", path, "--load-session", path]) == 0  # absent: a new one
    first = capsys.readouterr().out
    assert main(base + ["Hello world", "--load-session", path, "-v"]) == 0  # the same prompt: nothing evaluated
    captured = capsys.readouterr()
    assert captured.out == first and "prompt 0 tok" in captured.err
    assert main(base + ["Hello", "--load-session", str(tmp_path / "none.kv")]) == 2  # a bad argument
    assert "cannot read the session" in capsys.readouterr().err
    assert main(base + ["Hello", "--load-session", path, "-ctk", "f16"]) == 1
    assert "this model's cache is f16/f32" in capsys.readouterr().err
    for bad in (str(tmp_path), str(tmp_path / "no-such-dir" / "s.kv"), ""):  # refused before any work
        assert main(["generate", "-m", "no-such-model.gguf", "hi", "--save-session", bad]) == 2
        assert "not a file in an existing folder" in capsys.readouterr().err
        assert main(["chat", "-m", "no-such-model.gguf", "--save-session", bad]) == 2
        assert "not a file in an existing folder" in capsys.readouterr().err


def test_cli_chat_keeps_the_conversation(tmp_path, capsys, monkeypatch):
    """Two piped chat runs over one session file: the second sees the first's messages (saved on
    leaving) and its reply is the one an uninterrupted chat of both messages gives."""
    import io

    path = str(tmp_path / "c.kv")
    base = ["chat", "-m", str(MODEL), "-c", "64", "--temp", "0", "-n", "4"]
    for line, extra in (("first message", ["--save-session", path]),
                        ("second one", ["--load-session", path, "--save-session", path])):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(line.encode() + b"\n")))
        assert main(base + extra) == 0
    restored = capsys.readouterr().out.splitlines()[-1]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"first message\nsecond one\n")))
    assert main(base) == 0
    assert capsys.readouterr().out.splitlines()[-1] == restored
    llm = fresh()
    messages = llm.load_session(path)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "second one"
