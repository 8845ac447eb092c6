"""Architectures by GGUF `general.architecture` name. Every module in this package that declares
`ARCHITECTURES` (GGUF name -> model class) and optionally `CONVERTERS` (Hugging Face class name ->
ConvertSpec) is registered; adding an architecture means adding one file."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Sequence

from ..backends.base import Backend
from ..errors import FormatError
from ..formats.gguf import GGUFFile
from .common import Model

ARCHITECTURES: dict[str, type[Model]] = {}
LOOKUPS = ("token_embd.weight", "position_embd.weight", "token_types.weight")  # tensors read row by row
CONVERTERS: dict = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name in ("common", "layers"):
        continue
    _mod = importlib.import_module(f".{_info.name}", __name__)
    ARCHITECTURES.update(getattr(_mod, "ARCHITECTURES", {}))
    CONVERTERS.update(getattr(_mod, "CONVERTERS", {}))


def build_model(gguf: GGUFFile, backend: Backend, adapters: Sequence[Any] = ()) -> Model:
    """The model in `gguf` on `backend`; `adapters` (lora.LoraAdapter, checked against `gguf`) add
    their products to the matrices they name (lora.AdaptedOps)."""
    arch = gguf.architecture
    if not arch:
        raise FormatError(gguf.path, "general.architecture", "missing: cannot tell which model this is")
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise FormatError(gguf.path, "general.architecture",
                          f"{arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})")
    embeddings = {t.type for name, t in gguf.tensors.items() if name in LOOKUPS}
    matrices = [t for t in gguf.tensors.values() if len(t.shape) >= 2]
    backend.prepare({t.type for t in matrices}, embeddings, sum(t.n_elements for t in matrices))
    if not adapters:
        return cls(gguf, backend)
    from ..lora import AdaptedOps

    ops = AdaptedOps(backend)
    model = cls(gguf, ops)
    ops.attach(list(adapters))
    return model
