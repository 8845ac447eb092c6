"""The README's two set-up commands, one after the other in one fresh venv: `pip install .` and a run
(numba compiles and caches kernels), then `pip install -e .` and a run. numba once wrote its cache into
site-packages/purelm, `pip uninstall` left those folders, and they shadowed the editable install."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "llama-q8_0.gguf"


def run(args, env, timeout=600):
    # from outside the checkout, so `import purelm` does not find the source tree in the working folder
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT.parent)
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="venv layout of Linux")
def test_wheel_install_then_editable_install(tmp_path):
    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "venv", str(venv)], os.environ)
    # the dependencies come from this venv (no download); a plain path in a .pth file, so this venv's
    # own .pth files (its editable purelm) are not read
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], os.environ).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PURELM_CACHE"] = str(tmp_path / "cache")
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check"]

    run(pip + [str(ROOT)], env)
    installed = site / "purelm"
    before = {p for p in installed.rglob("*") if "__pycache__" not in p.parts}
    # a run that compiles and caches a kernel (the whole model would take a minute to compile)
    # (and an embedding lookup: its kernels are closures, one per type, rows.dequant_rows)
    code = ("import numpy as np, purelm; from purelm.backends.numba_backend import NumbaBackend, NumbaWeight; "
            "from purelm.quant import GGMLType; be = NumbaBackend(1); "
            "be.rms_norm(np.ones((1, 8), np.float32), np.ones(8, np.float32), 1e-5); "
            "be.embed(NumbaWeight(GGMLType.F32, 2, 8, np.zeros((2, 32), np.uint8)), np.zeros(1)); "
            "print(purelm.__file__)")
    assert run([str(py), "-c", code], env).strip() == str(installed / "__init__.py")
    assert list((tmp_path / "cache" / "numba").rglob("*.nbi")), "numba cached nothing in the user cache"
    written = {p for p in installed.rglob("*") if p.suffix in (".nbi", ".nbc")}
    assert not written, f"numba wrote into site-packages: {sorted(written)[:3]}"
    assert {p for p in installed.rglob("*") if "__pycache__" not in p.parts} == before

    run(pip + ["-e", str(ROOT)], env)
    out = run([str(py), "-c", "import purelm; print(purelm.__version__, purelm.__file__)"], env).split()
    assert out[1] == str(ROOT / "purelm" / "__init__.py")
    text = run([str(py), "-m", "purelm.cli", "generate", "-m", str(TINY), "hello", "-n", "2", "--temp", "0",
                "--backend", "numpy"], env)
    assert text.strip()
