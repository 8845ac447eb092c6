"""Architectures by GGUF `general.architecture` name."""
from __future__ import annotations

from ..backends.base import Backend
from ..errors import FormatError
from ..formats.gguf import GGUFFile
from .common import Model
from .llama import Llama, Qwen2

ARCHITECTURES: dict[str, type[Model]] = {
    "llama": Llama,
    "mistral": Llama,
    "qwen2": Qwen2,
}


def build_model(gguf: GGUFFile, backend: Backend) -> Model:
    arch = gguf.architecture
    if not arch:
        raise FormatError(gguf.path, "general.architecture", "missing: cannot tell which model this is")
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise FormatError(gguf.path, "general.architecture",
                          f"{arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})")
    return cls(gguf, backend)
