"""A quick fuzz run for CI: hostile model files must end in a PurelmError, never a crash, hang, traceback or
runaway memory. Each file runs in a worker process (tests/fuzzlib.py), so a segfault fails a test
instead of killing pytest. Fixed seeds: a failure here reproduces with the same case id; failing inputs
are kept under pytest's tmp dir (the assertion message says where). The long run is tools/fuzz.py."""
import random
import struct
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzlib
from purelm.errors import FormatError

FIXTURES = Path(__file__).parent / "fixtures"
# Four architectures, four tensor types: the CI run covers decoder families and kernel families.
CI_SEEDS = ["llama-f32", "gemma2-q4_0", "gpt2-q8_0", "phi3-f16"]
LEGACY_SEEDS = ["llama-q4_0.ggjtv1.bin", "mpt-q4_0.ggml-qnt1.bin"]


@pytest.fixture(scope="module")
def seeds():
    return [fuzzlib.load_seed(FIXTURES / f"{n}.gguf") for n in CI_SEEDS]


def _assert_clean(report: fuzzlib.Report, out: Path) -> None:
    if report.failures:
        pytest.fail(f"fuzzing found failures (inputs saved under {out}):\n{report.summary()}", pytrace=False)


# -- the mutators themselves


def test_emitter_round_trips_every_fixture():
    for path in sorted(FIXTURES.glob("*.gguf")):
        raw = path.read_bytes()
        assert fuzzlib.parse_gguf(raw).to_bytes() == raw, path.name


def test_cases_are_deterministic(seeds):
    def blobs(seed):
        return [fuzzlib.as_bytes(c.make()) for c in fuzzlib.random_cases(seeds, 40, seed)]

    assert blobs(7) == blobs(7)
    assert blobs(7) != blobs(8)


def test_mutators_never_fail():
    """Thousands of mutants of every fixture, stacked mutations included, without an error in the
    fuzzer itself."""
    every = [fuzzlib.load_seed(p) for p in sorted(FIXTURES.glob("*.gguf"))]
    for case in fuzzlib.random_cases(every, 3000, seed=3):
        fuzzlib.as_bytes(case.make())
    rng = random.Random(5)
    for _ in range(1000):  # byte mutations piled on one another, down to an empty file
        buf = bytearray(every[0].raw[:rng.choice([0, 3, 40, 400, 5000])])
        for _ in range(6):
            fuzzlib.mutate_bytes(rng, buf, every[0].doc.fields, every[0].doc.data_start)


def test_hparam_mutants_are_well_formed(seeds, tmp_path):
    """Hyperparameter-level mutants must reach the model build: the format authors' reader (gguf-py)
    reads them, tensor data included."""
    cases = [c for c in fuzzlib.hparam_cases(seeds, 400, seed=1) if "duplicated" not in c.mutations[0]]
    for case in cases[:120]:
        path = tmp_path / "m.gguf"
        fuzzlib.write_file(path, case.make())
        reader = gguf.GGUFReader(path)
        assert len(reader.tensors) == len(fuzzlib.load_seed(case.seed).doc.tensors), case.mutations


def test_every_hyperparameter_gets_every_value(seeds):
    doc = seeds[0].doc
    keys = {kv.key for kv in fuzzlib.hparam_keys(doc)}
    assert "llama.attention.head_count" in keys and "tokenizer.ggml.tokens" in keys
    labels = {c.mutations[0] for c in fuzzlib.hparam_cases(seeds[:1])}
    for value in ("=0", "=-1", "=2147483647", "=9223372036854775808", "=f32:nan", "=f32:inf", "=str:'x'",
                  "=bool:true", "=array:i32[1,2]", " removed", " duplicated"):
        assert f"kv llama.rope.dimension_count{value}" in labels, value


# -- the runner


def test_runner_classifies_every_outcome(tmp_path):
    words = ["fine", "segv", "fine", "hang", "oom", "raise", "purelm", "exit", "fine"]
    cases = [fuzzlib.Case(f"{i}-{w}", "", [w], make=lambda w=w: w.encode() + b" x") for i, w in enumerate(words)]
    with fuzzlib.Runner("selftest", workers=2, timeout=1.5, rss_limit_mb=300, confirm_times=3) as runner:
        got = {case.id.split("-")[1]: rec for case, rec in runner.run(cases)}
        report = fuzzlib.run_campaign(runner, [fuzzlib.Case("again", "", [], make=lambda: b"segv x")], str(tmp_path))
    assert {w: r["outcome"] for w, r in got.items()} == {
        "fine": "ok", "segv": "crash", "hang": "hang", "oom": "oom", "raise": "traceback",
        "purelm": "purelm_error", "exit": "crash"}
    assert got["segv"]["exc"] == "signal SIGSEGV" and "run_selftest" in got["segv"]["frame"]
    assert "run_selftest" in got["hang"]["frame"]  # where it hung
    assert got["hang"]["first_try"]["outcome"] == "hang"  # confirmed by a second run
    assert got["raise"]["exc"] == "KeyError" and "run_selftest" in got["raise"]["frame"]
    assert got["purelm"]["exc"] == "FormatError" and "PurelmError" in got["purelm"]["mro"]
    assert got["exit"]["exc"] == "exit code 3"
    assert report.counts["crash"] == 1 and (tmp_path / "crash" / "again.gguf").read_bytes() == b"segv x"
    assert (tmp_path / "crash" / "again.json").exists()


def test_runner_blames_an_earlier_case_for_a_crash_it_cannot_repeat(tmp_path):
    cases = [fuzzlib.Case(w, "", [w], make=lambda w=w: w.encode() + b" x") for w in ["fine", "poison", "victim"]]
    with fuzzlib.Runner("selftest", workers=1) as runner:
        report = fuzzlib.run_campaign(runner, cases, str(tmp_path))
    rec = report.signatures[next(iter(report.signatures))]["example"]
    assert report.counts == {"ok": 2, "crash": 1}
    assert rec["case"] == "victim" and rec["reproducible"] is False and rec["alone"]["outcome"] == "ok"
    assert rec["previous_cases"] == ["fine", "poison"]
    assert (tmp_path / "crash" / "victim-prev2-poison.gguf").read_bytes() == b"poison x"


# -- the quick fuzz run: a few hundred hostile files through the engine


def test_fuzz_model_build_and_generate(seeds, tmp_path):
    cases = [*fuzzlib.hparam_cases(seeds, 200, seed=0), *fuzzlib.random_cases(seeds, 150, seed=0, kind="struct"),
             *fuzzlib.random_cases(seeds, 300, seed=0)]
    with fuzzlib.Runner("model-build+generate", workers=2, warm=[s.path for s in seeds], timeout=20) as runner:
        report = fuzzlib.run_campaign(runner, cases, str(tmp_path))
    assert report.cases == 650
    _assert_clean(report, tmp_path)


def test_fuzz_embedding_model(tmp_path):
    seeds = [fuzzlib.load_seed(FIXTURES / "bert" / name) for name in ("bert-q8_0.gguf", "bert-f16.gguf",
                                                                        "reranker-q8_0.gguf")]
    cases = [*fuzzlib.hparam_cases(seeds, 100, seed=4), *fuzzlib.random_cases(seeds, 60, seed=4, kind="struct"),
             *fuzzlib.random_cases(seeds, 60, seed=4)]
    with fuzzlib.Runner("model-build+generate", workers=2, warm=[s.path for s in seeds], timeout=20) as runner:
        report = fuzzlib.run_campaign(runner, cases, str(tmp_path))
    assert report.cases == 220
    _assert_clean(report, tmp_path)


def test_fuzz_numpy_backend(seeds, tmp_path):
    cases = [*fuzzlib.hparam_cases(seeds, 100, seed=2), *fuzzlib.random_cases(seeds, 100, seed=2, kind="struct")]
    with fuzzlib.Runner("model-build+generate", workers=2, backend="numpy", timeout=20) as runner:
        report = fuzzlib.run_campaign(runner, cases, str(tmp_path))
    _assert_clean(report, tmp_path)


def test_fuzz_backend_kernels(seeds, tmp_path):
    with fuzzlib.Runner("backend-matvec", workers=2, warm=[seeds[1].path], timeout=20) as runner:
        report = fuzzlib.run_campaign(runner, fuzzlib.random_cases(seeds, 150, seed=1), str(tmp_path))
    _assert_clean(report, tmp_path)


def test_fuzz_dot_only_kernels(tmp_path):
    """Mutants of a file holding the types only the int16 kernels read (Q2_K, Q3_K, IQ4_NL, IQ4_XS:
    tools/fuzz.py's dot_only_seed, as the long run adds it) through the backend's kernels."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_tool", Path(__file__).parents[1] / "tools" / "fuzz.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    seed = fuzzlib.load_seed(tool.dot_only_seed(tmp_path))
    fuzzlib.run_matvec(seed.path, fuzzlib.WorkerContext())  # compiled here first: workers load them from the cache
    with fuzzlib.Runner("backend-matvec", workers=2, timeout=20) as runner:
        report = fuzzlib.run_campaign(runner, fuzzlib.random_cases([seed], 60, seed=3), str(tmp_path))
    assert report.cases == 60
    _assert_clean(report, tmp_path)


def test_fuzz_legacy_files(tmp_path):
    """Mutants of two legacy seeds (an old block layout converted on load; a ggml-example file) through
    purelm.load and a generation."""
    seeds = [fuzzlib.load_seed(FIXTURES / "legacy" / n, "ggml") for n in LEGACY_SEEDS]
    assert all(fuzzlib.legacy_fields(s.raw)[0] for s in seeds)  # the mutator knows their fields
    with fuzzlib.Runner("legacy-load+generate", workers=2, warm=[s.path for s in seeds], timeout=20) as runner:
        report = fuzzlib.run_campaign(runner, fuzzlib.random_cases(seeds, 150, seed=0, fmt="ggml"), str(tmp_path))
    assert report.cases == 150
    _assert_clean(report, tmp_path)


# -- property test of the reader, in process: any bytes either parse or raise FormatError

_SMALL = [fuzzlib.load_seed(FIXTURES / n) for n in ("llama-q4_0.gguf", "tok_llama_spm.gguf", "falcon-q4_0.gguf")]


@pytest.fixture(scope="module")
def case_file(tmp_path_factory):
    return tmp_path_factory.mktemp("hyp") / "case.gguf"


def _blob(data) -> bytes:
    seed = data.draw(st.sampled_from(_SMALL), "seed")
    how = data.draw(st.sampled_from(["field", "bytes", "struct", "header+noise"]), "how")
    if how == "field":  # an extreme value over one count / length / type field
        pos, size, label = data.draw(st.sampled_from(seed.doc.fields), "field")
        values = fuzzlib.U64_EXTREMES if size == 8 else fuzzlib.U32_EXTREMES
        v = data.draw(st.sampled_from(values) | st.integers(0, 2 ** (8 * size) - 1), "value")
        buf = bytearray(seed.raw)
        struct.pack_into("<Q" if size == 8 else "<I", buf, pos, v)
        return bytes(buf)
    if how == "bytes":
        rng = random.Random(data.draw(st.integers(0, 2**32), "rng"))
        buf = bytearray(seed.raw)
        for _ in range(data.draw(st.integers(1, 4), "n")):
            fuzzlib.mutate_bytes(rng, buf, seed.doc.fields, seed.doc.data_start)
        return bytes(buf)
    if how == "struct":
        rng = random.Random(data.draw(st.integers(0, 2**32), "rng"))
        doc = seed.doc.copy()
        fuzzlib.mutate_doc(rng, doc)
        return doc.to_bytes()
    head = struct.pack("<4sIQQ", b"GGUF", 3, data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4)))
    return head + data.draw(st.binary(max_size=300), "noise")


@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_reader_parses_or_raises_format_error(case_file, data):
    case_file.write_bytes(_blob(data))
    try:
        fuzzlib.touch_gguf(str(case_file))  # every value decoded, every tensor's first and last byte read
    except FormatError:
        pass


_LEGACY = [fuzzlib.load_seed(FIXTURES / "legacy" / n, "ggml") for n in LEGACY_SEEDS]


@settings(max_examples=200, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_legacy_reader_parses_or_raises_format_error(case_file, data):
    from purelm.formats.ggml_legacy import LegacyFile

    seed = data.draw(st.sampled_from(_LEGACY), "seed")
    fields, header_end = fuzzlib.legacy_fields(seed.raw)
    buf = bytearray(seed.raw)
    if data.draw(st.booleans(), "field"):  # an extreme value over one i32 field
        pos, _, _ = data.draw(st.sampled_from(fields), "field")
        v = data.draw(st.sampled_from(fuzzlib.U32_EXTREMES) | st.integers(0, 2**32 - 1), "value")
        struct.pack_into("<I", buf, pos, v)
    else:
        rng = random.Random(data.draw(st.integers(0, 2**32), "rng"))
        for _ in range(data.draw(st.integers(1, 4), "n")):
            fuzzlib.mutate_bytes(rng, buf, fields, header_end)
    case_file.write_bytes(bytes(buf))
    try:
        f = LegacyFile(case_file)
        for key in f.metadata:
            f.metadata[key]
        for t in f.tensors.values():
            int(t.data.reshape(-1)[0]) + int(t.data.reshape(-1)[-1])
    except FormatError:
        pass
