import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def smollm2_file() -> Path:
    """The real SmolLM2 Q4_1 file: $PURELM_SMOLLM2, else the purelm cache (pulled if absent, so these
    tests run rather than skip; `purelm pull smollm2` beforehand avoids the download inside the run)."""
    env = os.environ.get("PURELM_SMOLLM2")
    if env:
        return Path(env)
    from purelm.hub import pull

    return pull("smollm2")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_file()


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


def llama_cpp_tensor_names(arch: str) -> set[str]:
    """The tensor names gguf-py (llama.cpp's own tables) allows for an architecture, blocks as {bid}."""
    import gguf

    return {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}


def tensor_pattern(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'blk.{bid}.attn_q' (the form of gguf-py's TENSOR_NAMES)."""
    base = name.rsplit(".", 1)[0]
    return base.replace(base.split(".")[1], "{bid}", 1) if base.startswith("blk.") else base
