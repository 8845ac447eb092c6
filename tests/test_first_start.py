"""A first start's compiles shared with worker processes (NumbaBackend.prepare, compile_worker): the
workers fill numba's on-disk cache and a later process loads from it instead of compiling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from purelm.backends import numba_backend as nb
from purelm.errors import UsageError
from purelm.quant.types import GGMLType

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path) -> dict[str, str]:
    return dict(os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))


def test_worker_fills_the_cache_that_a_new_process_loads(tmp_path):
    """A worker compiles the rope step into an empty cache, says so, leaves its note; a fresh
    process then loads the rope kernel from that cache (hits, no compile) and gets the same values
    as the reference backend."""
    worker = subprocess.run(
        [sys.executable, "-c", "import sys; from purelm.backends.numba_backend import compile_worker; "
         "compile_worker(sys.argv[1:])", "1", "1", "1", "1", "", "rope"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert worker.stdout.split("\n")[0] == "done rope"
    assert list(tmp_path.rglob("ops.rope-*.nbi")), "no cache index for ops.rope"
    notes = [p.name for p in tmp_path.glob("purelm-backend-*/*") if p.suffix != ".lock"]
    assert len(notes) == 1 and notes[0].startswith("rope-")

    check = """
import json, numpy as np
from purelm.backends.numba_backend import NumbaBackend
from purelm.backends.numpy_backend import NumpyBackend
from purelm.backends.base import Rope
from purelm.backends.numba_kernels import ops
x = np.random.default_rng(1).standard_normal((3, 4, 64)).astype(np.float32)
r = Rope(n_dims=32, base=10000.0, neox=True)
got = NumbaBackend(1).rope(x, np.arange(3), r)
want = NumpyBackend().rope(x, np.arange(3), r)
print(json.dumps({"hits": sum(ops.rope.stats.cache_hits.values()), "misses": sum(ops.rope.stats.cache_misses.values()),
                  "err": float(np.abs(got - want).max())}))
"""
    run = subprocess.run([sys.executable, "-c", check], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().split("\n")[-1])
    assert out["hits"] >= 1 and out["misses"] == 0, out
    assert out["err"] < 1e-5


def test_compile_workers_setting(monkeypatch):
    monkeypatch.setenv("PURELM_COMPILE_WORKERS", "0")
    assert nb._compile_workers(5) == 0
    monkeypatch.setenv("PURELM_COMPILE_WORKERS", "3")
    assert nb._compile_workers(5) == 3 and nb._compile_workers(2) == 2
    monkeypatch.setenv("PURELM_COMPILE_WORKERS", "two")
    with pytest.raises(UsageError, match="PURELM_COMPILE_WORKERS"):
        nb._compile_workers(5)


def test_row_lookups_are_warmed_for_the_embeddings_types_only(monkeypatch):
    """build_model names the embeddings' types (token_embd, position_embd, token_types); the warm-up
    compiles a lookup kernel for those types alone (one per type: rows.dequant_rows), not for every row
    type."""
    from purelm.formats.gguf import GGUFFile
    from purelm.models import build_model

    seen = []
    monkeypatch.setattr(nb.NumbaBackend, "prepare",
                        lambda self, types, lookups=frozenset(), n_weights=0: seen.append(lookups))
    path = next(p for p in sorted((ROOT / "tests" / "fixtures").rglob("*.gguf"))
                if "token_embd.weight" in GGUFFile(p).tensors)
    gguf = GGUFFile(path)
    build_model(gguf, nb.NumbaBackend(1))
    assert seen == [{t.type for name, t in gguf.tensors.items() if name.startswith(("token_embd.", "position_embd.",
                                                                                     "token_types."))}]
    names = [s[0] for s in nb.NumbaBackend(1)._warm_steps({GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K},
                                                           {GGMLType.Q8_0, GGMLType.Q4_K})]
    assert [n for n in names if n.endswith("-lookup")] == ["Q8_0-lookup", "Q4_K-lookup"]


def test_steps_are_shared_out(monkeypatch):
    """Every missing step goes to exactly one process; prompt-only steps only to workers."""
    started = []

    class FakeWorker:
        def __init__(self, backend, types, names):
            started.append(names)

    monkeypatch.setattr(nb, "_CompileWorker", FakeWorker)
    monkeypatch.setenv("PURELM_COMPILE_WORKERS", "2")
    be = nb.NumbaBackend(2)
    be._prepared = {GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0}
    steps = be._warm_steps(be._prepared)
    mine = [s[0] for s in be._compile_apart(steps)]
    theirs = [n for names in started for n in names]
    assert sorted(mine + theirs) == sorted(s[0] for s in steps)
    critical = {s[0] for s in steps if s[1]}
    assert set(mine) <= critical and mine
    assert set(be._pending) == set(theirs)


def _fake_worker(script: str, names: list[str], cls: type = nb._CompileWorker) -> nb._CompileWorker:
    w = cls.__new__(cls)
    w.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    w.names, w.done, w.buffer = names, set(), b""
    return w


def test_a_worker_that_exits_leaves_its_steps_here():
    """A worker that stops early (crash, killed) releases every step it had: they compile here."""
    w = _fake_worker("print('done a')", ["a", "b"])
    pending = {"a": w, "b": w, "c": object()}
    w.wait_for("a", pending)
    assert set(pending) == {"b", "c"}
    w.wait_for("b", pending)
    assert set(pending) == {"c"}
    w.proc.wait()


def test_a_step_the_worker_has_not_started_is_taken_here():
    """Waited for: the step the worker is on. Not waited for: one it has not started (this process
    compiles it), so the two never wait on each other's queue."""
    script = "import time; print('done a', flush=True); time.sleep(1); print('done b', flush=True); time.sleep(30)"
    w = _fake_worker(script, ["a", "b", "c"])
    pending = {"a": w, "b": w, "c": w}
    try:
        w.wait_for("a", pending)  # its current step: waited for
        assert set(pending) == {"b", "c"}
        w.wait_for("c", pending)  # not started (it is on b): taken here at once
        assert set(pending) == {"b"}
        w.wait_for("b", pending)  # on it: waited for
        assert pending == {} and w.done == {"a", "b"}
    finally:
        w.proc.kill()
        w.proc.wait()


def test_a_step_another_process_compiles_is_waited_for_not_repeated(tmp_path):
    """While one process compiles a step (holding its lock file), a worker given the same step waits,
    then finds it done and skips it; the starting process loads it (runs it) all the same. Two
    opens of the lock file hold separate flocks, as two processes would."""
    import threading
    import time

    notes = object.__new__(nb._WarmNotes)
    notes.dir, notes.key = tmp_path, "k"
    ran, started = [], threading.Event()

    def first() -> None:
        def step() -> None:
            started.set()
            time.sleep(0.5)
            ran.append("first")
        notes.run("rope", step, load=False)

    holder = threading.Thread(target=first)
    holder.start()
    assert started.wait(10)
    assert not notes.run("rope", lambda: ran.append("never"), load=False, wait=False)  # held: not run
    t0 = time.perf_counter()
    notes.run("rope", lambda: ran.append("second"), load=False)
    waited = time.perf_counter() - t0
    assert notes.run("rope", lambda: ran.append("never"), load=False, wait=False)  # done by now: no wait
    holder.join()
    notes.run("rope", lambda: ran.append("third"), load=True)
    assert ran == ["first", "third"] and waited > 0.3
    assert notes.done("rope") and (tmp_path / "rope-k.lock").exists()
    notes.dir = None  # no folder: no lock, the step runs
    notes.run("norms", lambda: ran.append("norms"), load=False)
    assert ran[-1] == "norms"


def _line(proc: subprocess.Popen, timeout: float) -> str:
    """The process's next stdout line, or a failure (not a hang) after `timeout` seconds."""
    import select

    assert select.select([proc.stdout], [], [], timeout)[0], "no line from the worker"
    return proc.stdout.readline().strip()


def test_a_worker_compiles_other_steps_while_another_process_holds_one(tmp_path):
    """A worker whose first step another process is compiling (its lock held) compiles the next step
    meanwhile, then waits for the first and, the cache still lacking it, compiles it."""
    import fcntl

    cmd = [sys.executable, "-c", "import sys; from purelm.backends.numba_backend import compile_worker; "
           "compile_worker(sys.argv[1:])", "1", "1", "1", "1", ""]
    first = subprocess.run(cmd + ["rope"], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    [lock] = tmp_path.glob("purelm-backend-*/rope-*.lock")
    Path(str(lock)[:-len(".lock")]).unlink()  # its note gone: the step counts as not compiled
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = subprocess.Popen(cmd + ["rope,norms"], env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
        try:
            assert _line(worker, 300) == "done norms"
            fcntl.flock(held, fcntl.LOCK_UN)
            assert _line(worker, 300) == "done rope"
            assert worker.wait(300) == 0
        finally:
            worker.kill()
            worker.wait()
    assert Path(str(lock)[:-len(".lock")]).exists()


def test_share_out_balances_and_keeps_each_step_once():
    names = ["Q4_1-decode", "Q8_0-decode", "attention-decode", "norms", "rope"]
    for n_workers in (1, 2, 3):
        shares = nb._share_out(names, n_workers)
        assert len(shares) == n_workers + 1
        assert sorted(n for share in shares for n in share) == sorted(names)
        finish = max(nb._share_cost(share, i > 0) for i, share in enumerate(shares))
        alone = nb._share_cost(names, False)
        assert finish < alone  # sharing finishes sooner than one process alone
    # two cores: the product steps together (their shared kernels compile once), the rest beside them
    main, worker = nb._share_out(names, 1)
    assert {"Q4_1-decode", "Q8_0-decode"} <= set(main) or {"Q4_1-decode", "Q8_0-decode"} <= set(worker)
    many = [f"T{i}-decode" for i in range(12)]  # too many to try every way: longest first
    shares = nb._share_out(many, 1)
    assert sorted(n for share in shares for n in share) == sorted(many) and all(shares)


def test_finish_compiling_waits_for_every_worker_to_end():
    """`purelm warmup`: even steps this process took over are left to run to their end."""
    w = _fake_worker("import time; print('done a', flush=True); time.sleep(0.5); print('done b', flush=True)",
                     ["a", "b"])
    be = nb.NumbaBackend(1)
    be._pending, be._compilers = {"b": w}, [w]
    be.finish_compiling()
    assert be._pending == {} and w.done == {"a", "b"} and w.proc.returncode == 0


def test_a_short_prompt_goes_row_by_row_while_a_worker_compiles_the_batch_kernel(monkeypatch):
    """A first start's short prompt is not held up by the batch kernel a worker is still compiling: its
    rows go one by one through the decode kernel (the same bits as the batch kernel gives them), and
    nothing is waited for; a longer run waits (or takes the step over) as before."""
    import numpy as np

    from purelm.backends.numba_kernels.packing import pack
    from purelm.quant.types import BLOCK_INFO

    be = nb.NumbaBackend(1)
    if not be.int16_dot:
        pytest.skip("no int16 kernels on this CPU")
    rng = np.random.default_rng(0)
    block, size = BLOCK_INFO[GGMLType.Q8_0]
    rows = rng.integers(0, 256, (64, 256 // block * size), dtype=np.uint8)
    rows.reshape(64, -1, size)[:, :, 0:2] = rng.uniform(-0.02, 0.02, (64, 256 // block)).astype(np.float16)[..., None].view(np.uint8)
    w = nb.NumbaWeight(GGMLType.Q8_0, 64, 256, rows)
    w.set_packed(pack(GGMLType.Q8_0, rows, 256, dot=True), 1)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    want = be.linear(x, w)  # the batch kernel
    w_busy = _fake_worker("import time; time.sleep(30)", ["Q8_0-decode", "Q8_0-batch"])
    waited = []
    monkeypatch.setattr(be, "_ready", lambda name: waited.append(name))
    try:
        be._pending = {"Q8_0-batch": w_busy}
        got = be.linear(x, w)
        assert np.array_equal(got, want) and waited == [] and "Q8_0-batch" in be._pending
        be.linear(rng.standard_normal((nb.MATVEC_MAX_TOKENS + 1, 256)).astype(np.float32), w)
        assert waited == ["Q8_0-batch"]  # a prompt longer than the short runs: waited for
    finally:
        w_busy.proc.kill()
        w_busy.proc.wait()
        be._pending = {}


def test_a_first_start_answers_through_the_numpy_ops_until_the_workers_have_the_kernels(monkeypatch, tmp_path):
    """With every step missing from the cache, prepare() compiles nothing here: the ops run as the
    numpy backend's (interim.py), the same logits as a NumpyBackend model, until the workers say
    they are done; the next pass then switches to the kernels, the same bits as a warm NumbaBackend
    model, and the ops are the class's again. With PURELM_COMPILE_WAIT=1, or for a model of more than
    INTERIM_MAX_WEIGHTS weights, there is no interim."""
    import numpy as np

    import purelm
    from purelm.backends.numpy_backend import NumpyBackend

    path = ROOT / "tests/fixtures/llama-q4_0.gguf"
    ids = list(range(3, 20))
    want_numpy = purelm.load(path, backend=NumpyBackend()).logits(ids)
    want_numba = purelm.load(path, backend=nb.NumbaBackend(1)).logits(ids)

    flag = tmp_path / "go"
    started = []

    def fake_worker(backend, types, names):  # says it compiled its steps once `flag` exists (gives up in 120 s)
        script = (f"import os, time\nend = time.time() + 120\n"
                  f"while not os.path.exists({str(flag)!r}):\n    time.sleep(0.02)\n"
                  f"    if time.time() > end: raise SystemExit(1)\n"
                  f"for n in {names!r}: print('done', n, flush=True)")
        started.append(_fake_worker(script, names, real_worker))
        return started[-1]

    real_worker = nb._CompileWorker
    monkeypatch.setattr(nb, "_CompileWorker", fake_worker)
    monkeypatch.setattr(nb._WarmNotes, "done", lambda self, name: False)  # a first start: nothing cached
    monkeypatch.setenv("PURELM_COMPILE_WORKERS", "1")
    monkeypatch.setenv("PURELM_COMPILE_WAIT", "1")
    flag.touch()
    assert purelm.load(path, backend=nb.NumbaBackend(1)).model.ops._interim is None
    monkeypatch.delenv("PURELM_COMPILE_WAIT")
    monkeypatch.setattr(nb, "INTERIM_MAX_WEIGHTS", 1000)  # a model larger than that waits too
    assert purelm.load(path, backend=nb.NumbaBackend(1)).model.ops._interim is None
    monkeypatch.undo()  # (everything above: set again below)
    monkeypatch.setattr(nb, "_CompileWorker", fake_worker)
    monkeypatch.setattr(nb._WarmNotes, "done", lambda self, name: False)
    monkeypatch.setenv("PURELM_COMPILE_WORKERS", "1")
    monkeypatch.delenv("PURELM_COMPILE_WAIT", raising=False)
    for w in started:
        w.proc.kill(), w.proc.wait()
    started.clear()
    flag.unlink()

    be = nb.NumbaBackend(1)
    llm = purelm.load(path, backend=be)
    try:
        assert be._interim is not None and "linear" in vars(be) and len(started) == 1
        assert {name for name, _ in be._interim_steps} <= set(started[0].names)
        got = llm.logits(ids)
        np.testing.assert_allclose(got, want_numpy, rtol=0, atol=1e-5)
        assert be._interim is not None  # the worker has not said done: still the numpy ops
        flag.touch()
        started[0].proc.wait(timeout=60)
        got = llm.logits(ids)
        assert be._interim is None and "linear" not in vars(be)
        assert np.array_equal(got, want_numba)
    finally:
        for w in started:
            w.proc.kill(), w.proc.wait()


@pytest.mark.parametrize("path", sorted((ROOT / "tests/fixtures").glob("*-q4_0.gguf")), ids=lambda p: p.stem)
def test_the_interim_ops_run_every_architecture(path, monkeypatch):
    """Every architecture's fixture through a NumbaBackend held in its interim (the numpy ops on its
    weights' tensors): the logits of a NumpyBackend model, within 1e-5."""
    import numpy as np

    import purelm
    from purelm.backends.numpy_backend import NumpyBackend

    ids = list(range(3, 14))
    want = purelm.load(path, backend=NumpyBackend()).logits(ids)
    be = nb.NumbaBackend(1)
    be._begin_interim(nb._WarmNotes(be), [])
    monkeypatch.setattr(be, "_leave_interim", lambda: None)  # stays interim: no worker will say done
    llm = purelm.load(path, backend=be)
    got = llm.logits(ids)
    assert be._interim is not None
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_past_its_time_the_interim_ends_with_this_process_joining_the_compiles(monkeypatch, tmp_path):
    """After INTERIM_SECONDS the next pass stops waiting for the workers alone: it waits for the step
    the worker is on (here the worker finishes it and exits), takes the others (here they load from
    the test process's cache), and runs on the kernels: a warm NumbaBackend model's bits."""
    import threading

    import numpy as np

    import purelm

    path = ROOT / "tests/fixtures/llama-q4_0.gguf"
    ids = list(range(3, 20))
    want = purelm.load(path, backend=nb.NumbaBackend(1)).logits(ids)
    flag, started, real_worker = tmp_path / "go", [], nb._CompileWorker

    def fake_worker(backend, types, names):  # finishes its first step once `flag` exists, exits 1.5 s later
        script = (f"import os, time\nend = time.time() + 120\n"
                  f"while not os.path.exists({str(flag)!r}) and time.time() < end:\n    time.sleep(0.02)\n"
                  f"print('done', {names[0]!r}, flush=True)\ntime.sleep(1.5)")
        started.append(_fake_worker(script, names, real_worker))
        return started[-1]

    monkeypatch.setattr(nb, "_CompileWorker", fake_worker)
    monkeypatch.setattr(nb._WarmNotes, "done", lambda self, name: False)
    monkeypatch.setenv("PURELM_COMPILE_WORKERS", "1")
    monkeypatch.delenv("PURELM_COMPILE_WAIT", raising=False)
    be = nb.NumbaBackend(1)
    llm = purelm.load(path, backend=be)
    try:
        assert be._interim is not None and len(started) == 1 and len(started[0].names) > 1
        be._interim_until = 0.0  # its time is up
        threading.Timer(0.3, flag.touch).start()
        got = llm.logits(ids)
        assert be._interim is None and "linear" not in vars(be)
        assert np.array_equal(got, want)
    finally:
        for w in started:
            w.proc.kill(), w.proc.wait()
