import json
import subprocess
import sys


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
    code, out, _ = run(capsys, "warmup", "-m", fixtures / "llama-q8_0.gguf", "--backend", "numba", "-t", "1")
    assert code == 0 and out.startswith("warm: numba kernels")
