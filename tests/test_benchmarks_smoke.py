"""Smoke tests of the benchmark scripts on a tiny synthetic model: they run and report what they
promise. No timing assertions."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TINY = ["--hidden", "64", "--layers", "2", "--ffn", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "512",
        "--ctx", "256"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "tiny.gguf"
    make = load_script("make_synthetic")
    assert make.main([str(path), *TINY, "--no-verify", "--quiet"]) == 0
    return path


def test_synthetic_file_metadata(tiny_model: Path) -> None:
    from purelm.formats.gguf import GGUFFile, ValueType
    from purelm.quant.types import GGMLType

    g = GGUFFile(tiny_model)
    md = g.metadata
    assert g.architecture == "llama"
    for key, value in [("llama.embedding_length", 64), ("llama.block_count", 2), ("llama.feed_forward_length", 128),
                       ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 2),
                       ("llama.context_length", 256), ("llama.rope.dimension_count", 16),
                       ("general.file_type", 2), ("tokenizer.ggml.bos_token_id", 1),
                       ("tokenizer.ggml.eos_token_id", 2)]:
        assert md[key] == value, key
        assert md.types[key] == ValueType.UINT32, key
    assert md.types["llama.rope.freq_base"] == ValueType.FLOAT32
    assert md["tokenizer.ggml.model"] == "llama"
    tokens = md["tokenizer.ggml.tokens"]
    types = np.asarray(md["tokenizer.ggml.token_type"])
    assert len(tokens) == len(types) == len(md["tokenizer.ggml.scores"]) == 512
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and list(types[:3]) == [2, 3, 3]
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>" and set(types[3:259]) == {6}
    assert set(types[259:]) == {1} and len(set(tokens)) == len(tokens)
    assert g.tensors["blk.0.attn_q.weight"].type == GGMLType.Q4_0
    assert g.tensors["blk.1.attn_k.weight"].shape == (32, 64)
    assert g.tensors["output.weight"].type == GGMLType.Q8_0
    assert g.tensors["output_norm.weight"].type == GGMLType.F32


def test_synthetic_file_is_reproducible(tiny_model: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.gguf"
    assert load_script("make_synthetic").main([str(again), *TINY, "--no-verify", "--quiet"]) == 0
    assert again.read_bytes() == tiny_model.read_bytes()


def test_synthetic_model_runs(tiny_model: Path) -> None:
    from purelm.backends import get_backend
    from purelm.formats.gguf import GGUFFile
    from purelm.models import build_model

    model = build_model(GGUFFile(tiny_model), get_backend("numpy", 1))
    cache = model.new_cache(32)
    logits = model.forward(np.array([1, 300, 301, 302]), cache, all_logits=True)
    assert logits.shape == (4, 512) and np.isfinite(logits).all() and logits.std() > 0
    cache.truncate(0)
    one = model.forward(np.array([1]), cache)
    assert one.shape == (512,) and np.isfinite(one).all()


def test_bench_tiny_numpy(tiny_model: Path) -> None:
    r = subprocess.run([sys.executable, str(BENCH / "bench.py"), str(tiny_model), "--engines", "numpy",
                        "--threads", "1", "--pp", "8", "--tg", "4", "--reps", "1", "--bandwidth-mb", "8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert {"machine", "model", "settings", "bandwidth", "results", "ratios"} <= set(report)
    assert report["machine"]["numpy"] and report["machine"]["cpu"] is not None
    assert report["model"]["file_bytes"] == tiny_model.stat().st_size
    assert report["settings"]["pp"] == 8 and report["settings"]["tg"] == 4
    assert report["bandwidth"]["1"]["gb_s"] > 0
    (res,) = report["results"]
    assert res["engine"] == "numpy" and res["threads"] == 1 and "error" not in res
    for test, n in (("pp", 8), ("tg", 4)):
        assert res[test]["n_tokens"] == n and len(res[test]["tok_s_reps"]) == 1 and res[test]["tok_s"] > 0
    for key in ("load_s", "first_token_s", "peak_rss_mb", "tg_bandwidth_fraction"):
        assert res[key] > 0, key
    # the RSS bound: 1.2 x the file + the KV cache at n_ctx, and the peak measured against it
    kv = res["kv_cache_mb"]
    assert kv == pytest.approx(2 * 2 * report["settings"]["n_ctx"] * 2 * 16 * 4 / 2**20, abs=1e-4)  # layers, k+v, ctx, kv heads, dim, f32
    assert res["peak_rss_bound_mb"] == round(1.2 * tiny_model.stat().st_size / 2**20 + kv, 1)
    assert res["peak_rss_within_bound"] == (res["peak_rss_mb"] <= res["peak_rss_bound_mb"])
    assert 0 < res["rss_runtime_mb"] < res["peak_rss_mb"]


def bench_tg(model: Path, *options: str) -> dict:
    """bench.py's report of a short numpy decode test on `model`, with `options`."""
    r = subprocess.run([sys.executable, str(BENCH / "bench.py"), str(model), "--engines", "numpy:tg", "--threads", "1",
                        "--pp", "8", "--reps", "1", "--warmup", "0", "--no-bandwidth", *options],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_bench_cache_type_reaches_the_engine(tiny_model: Path) -> None:
    # --cache-type f16: the purelm worker's cache stores halves (its size says so), and the run works
    report = bench_tg(tiny_model, "--tg", "4", "--cache-type", "f16")
    assert report["settings"]["cache_type"] == "f16"
    (res,) = report["results"]
    assert res["kv_cache_mb"] == pytest.approx(2 * 2 * report["settings"]["n_ctx"] * 2 * 16 * 2 / 2**20, abs=1e-4)
    assert res["tg"]["tok_s"] > 0


def test_bench_neighbour_runs_beside_the_tests(tiny_model: Path) -> None:
    report = bench_tg(tiny_model, "--tg", "64", "--neighbour", "spin")
    assert any("--neighbour spin" in n for n in report["notes"])
    (res,) = report["results"]
    assert res["tg"]["tok_s"] > 0


def test_bench_twin_decodes_beside_each_run(tiny_model: Path) -> None:
    # a second worker of the timed engine decodes while each run goes (from a second before it)
    report = bench_tg(tiny_model, "--tg", "64", "--neighbour", "twin")
    assert any("--neighbour twin" in n for n in report["notes"])
    (res,) = report["results"]
    assert res["tg"]["tok_s"] > 0
    assert res["twin_runs"] >= 2, res  # several 64-token decodes in that second


def test_regress_tiny_roundtrip(tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    cmd = [sys.executable, str(BENCH / "regress.py"), "--backend", "numpy", "--types", "Q4_0,Q6_K,F16",
           "--shapes", "64x256", "--reps", "2", "--no-model", "--recheck", "0"]
    r = subprocess.run(cmd + ["--save-baseline", str(base)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads(base.read_text())
    assert {"linear/Q4_0/64x256/b1", "linear/Q6_K/64x256/b1", "linear/F16/64x256/b1",
            "sample/49152/k40"} <= set(saved["timings"])
    r = subprocess.run(cmd + ["--baseline", str(base), "--threshold", "100"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    cmp = json.loads(r.stdout)["comparison"]
    assert set(cmp["ratios"]) == set(saved["timings"]) and cmp["regressions"] == []


def test_batched_bench_reports_every_sequence_count(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(BENCH / "batched.py"), str(tiny_model), "--threads", "1", "--npl", "1,3",
                        "--npp", "8", "--ntg", "4", "--reps", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(r.stdout)
    rows = {(x["engine"], x["pl"]): x for x in report["results"]}
    assert set(rows) == {("purelm", 1), ("purelm", 3)}
    assert all(x["speed_tg"] > 0 and x["speed_pp"] > 0 for x in rows.values())
    assert rows[("purelm", 1)]["tg_vs_one_sequence"] == 1.0


def test_batched_bench_cache_type_reaches_the_engine(tiny_model: Path, tmp_path: Path) -> None:
    """--cache-type f16: the worker's cache stores f16 (its report says so), and the run still works."""
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(BENCH / "batched.py"), str(tiny_model), "--threads", "1", "--npl", "2",
                        "--npp", "8", "--ntg", "2", "--reps", "1", "--cache-type", "f16", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert "--cache-type f16" in report["command"]
    assert [x["cache_type"] for x in report["results"]] == ["f16"]


def test_attention_bench_reports_each_store_and_case(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    r = subprocess.run([sys.executable, str(BENCH / "attention_bench.py"), "--seqs", "2", "--ctx", "70",
                        "--heads", "4,2,32", "--threads", "1,2", "--reps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=BENCH)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    got = {(x["store"], x["threads"], x["case"]) for x in report["results"]}
    assert got == {(s, t, c) for s in ("f32", "f16", "q8_0") for t in (1, 2) for c in ("cached", "memory")}
    assert all(x["us_per_layer"] > 0 and x["gb_s"] > 0 for x in report["results"])


def test_ab_exports_the_base_and_alternates_the_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ab.py: the base revision's package is the commit's own files, under another name; the two
    variants run in turns whose order flips each round; medians and the base/new ratio."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: ab.py exports a revision with git")
    ab = load_script("ab")
    monkeypatch.setattr(ab.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    commit = ab.base_package("HEAD")
    base = tmp_path / f"purelm-ab-{commit[:12]}" / "purelm_base"
    shown = subprocess.run(["git", "show", f"{commit}:purelm/backends/numba_backend.py"], cwd=ROOT,
                           capture_output=True, check=True).stdout
    assert (base / "backends" / "numba_backend.py").read_bytes() == shown
    assert ab.base_package("HEAD") == commit  # exported once, then reused
    order: list[str] = []
    times = ab.alternate({"base": lambda: order.append("base") or 2.0, "new": lambda: order.append("new") or 1.0}, 4)
    assert order == ["base", "new", "new", "base", "base", "new", "new", "base"]
    assert ab.summary(times) == {"base_us": 2e6, "new_us": 1e6, "new_speedup": 2.0, "rounds_new_faster": 4, "rounds": 4}
    per_s = ab.summary(times, 8)
    assert (per_s["base_per_s"], per_s["new_per_s"]) == (4.0, 8.0)
