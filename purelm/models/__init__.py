"""Architectures by GGUF `general.architecture` name. Each model module declares `ARCHITECTURES`
(GGUF name -> model class) and `CONVERTERS` (Hugging Face class name -> ConvertSpec)."""
from __future__ import annotations

import importlib

from ..backends.base import Backend
from ..errors import FormatError
from ..formats.gguf import GGUFFile
from .common import Model

MODULES = ["llama"]

ARCHITECTURES: dict[str, type[Model]] = {}
CONVERTERS: dict = {}
for _name in MODULES:
    _mod = importlib.import_module(f".{_name}", __name__)
    ARCHITECTURES.update(_mod.ARCHITECTURES)
    CONVERTERS.update(getattr(_mod, "CONVERTERS", {}))


def build_model(gguf: GGUFFile, backend: Backend) -> Model:
    arch = gguf.architecture
    if not arch:
        raise FormatError(gguf.path, "general.architecture", "missing: cannot tell which model this is")
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise FormatError(gguf.path, "general.architecture",
                          f"{arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})")
    return cls(gguf, backend)
