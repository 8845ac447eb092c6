"""Fetch llama.cpp's tokenizer test vocabularies for tests/test_llama_cpp_vocabs.py.

llama.cpp ships, in models/, vocabulary-only GGUF files (`ggml-vocab-NAME.gguf`) with the inputs and
expected ids of its tokenizer test (`.gguf.inp` / `.gguf.out`, run by tests/test-tokenizer-0). They
come in the llama-cpp-python 0.3.36 sdist, the llama.cpp the project's other references are made
with. This downloads that sdist from PyPI with pip and extracts only `models/ggml-vocab-*` (about
75 MB) into the place the tests look:

    $PURELM_LLAMA_CPP_DIR/models, by default
    ~/.cache/purelm-peers/llama_cpp_python-0.3.36/vendor/llama.cpp/models

    python tools/fetch_llama_cpp_vocabs.py [--dest DIR] [--sdist FILE.tar.gz]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
MODELS = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/"
LLAMA_CPP = Path(os.environ.get("PURELM_LLAMA_CPP_DIR",
                                Path.home() / f".cache/purelm-peers/llama_cpp_python-{VERSION}/vendor/llama.cpp"))


def download(into: Path) -> Path:
    """The sdist, downloaded by pip (no wheel, no dependencies)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", str(into)], check=True)
    path = into / SDIST
    if not path.is_file():
        raise SystemExit(f"pip did not leave {SDIST} in {into}")
    return path


def extract(sdist: Path, dest: Path) -> list[str]:
    """Write the sdist's models/ggml-vocab-* files into dest; returns their names."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = member.name[len(MODELS):] if member.name.startswith(MODELS) else ""
            # Plain files named ggml-vocab-*, directly in models/: nothing else leaves the archive.
            if not member.isfile() or not name.startswith("ggml-vocab-") or "/" in name or ".." in name:
                continue
            source = tar.extractfile(member)
            part = dest / (name + ".part")
            with open(part, "wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
            os.replace(part, dest / name)
            names.append(name)
    if not names:
        raise SystemExit(f"{sdist} holds no {MODELS}ggml-vocab-* files")
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=LLAMA_CPP / "models", help="where the files go (default: %(default)s)")
    ap.add_argument("--sdist", type=Path, help=f"an already downloaded {SDIST} (else pip downloads it)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = a.sdist or download(Path(tmp))
        names = extract(sdist, a.dest)
    pairs = sum(n.endswith(".inp") for n in names)
    print(f"{len(names)} files ({pairs} vocabularies with test cases) in {a.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
