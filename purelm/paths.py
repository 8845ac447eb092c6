"""Where purelm keeps files: the user cache folder (models, Hugging Face files, compiled kernels,
repacked weights)."""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def cache_dir() -> Path:
    """$PURELM_CACHE, else the platform's user cache folder (~/.cache/purelm on Linux)."""
    env = os.environ.get("PURELM_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("purelm"))


def models_dir() -> Path:
    """Named models (`purelm pull smollm2`): cache_dir()/models."""
    return cache_dir() / "models"


def hf_cache_dir() -> Path:
    """hf:// files, in huggingface_hub's cache layout (models--OWNER--REPO/...): cache_dir()/huggingface.
    Inside purelm's cache rather than ~/.cache/huggingface, so that one folder (PURELM_CACHE) holds every
    model `purelm list` shows and `purelm rm` removes."""
    return cache_dir() / "huggingface"


@contextlib.contextmanager
def numba_cache(name: str, sources: Iterable[Path]) -> Iterator[None]:
    """While purelm's kernels are defined, numba caches them under cache_dir()/numba unless the user
    set NUMBA_CACHE_DIR. numba's own default is a __pycache__ beside the source: inside site-packages
    for an installed purelm, where `pip uninstall` leaves the folders behind and they shadow a later
    editable install. numba picks the folder when a cached function is defined, so the setting is
    put back afterwards and other numba code in the process keeps its own.
    numba checks only the file defining a cached function, not the files whose functions it calls, so
    the folder is named `name` plus a digest of all the kernels' `sources`: after an upgrade that
    changed any of them, the kernels compile afresh instead of loading stale code."""
    import numba

    sources = list(sources)
    if os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR:
        _FOLDERS[name] = (Path(numba.config.CACHE_DIR or os.environ["NUMBA_CACHE_DIR"]), _digest(sources))
        yield
        return
    numba.config.CACHE_DIR = str(cache_dir() / "numba" / f"{name}-{_digest(sources)}")
    _FOLDERS[name] = (Path(numba.config.CACHE_DIR), _digest(sources))
    try:
        yield
    finally:
        numba.config.CACHE_DIR = ""


# name -> (the folder numba_cache(name, ...) had numba cache in, the kernels' sources' digest)
_FOLDERS: dict[str, tuple[Path, str]] = {}


def numba_cache_folder(name: str) -> Path | None:
    """The folder numba caches the kernels defined under numba_cache(name, ...) in (None before)."""
    return _FOLDERS[name][0] if name in _FOLDERS else None


def _digest(sources: Iterable[Path]) -> str:
    return hashlib.sha256(b"".join(Path(f).read_bytes() for f in sorted(sources))).hexdigest()[:16]


def numba_notes_dir(name: str) -> Path | None:
    """A folder for purelm's own notes about the kernels numba_cache(name, ...) caches (which warm-up
    steps have filled the cache): inside the folder the kernels were defined to cache in (not where
    cache_dir() points now), named by their digest (in a shared $NUMBA_CACHE_DIR, an upgrade's
    kernels start afresh). A compile worker given that folder as NUMBA_CACHE_DIR finds the same one."""
    if name not in _FOLDERS:
        return None
    folder, digest = _FOLDERS[name]
    return folder / f"purelm-{name}-notes-{digest}"
