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
    changed any of them, the kernels compile afresh instead of loading stale code.
    Inside the folder, numba would name each source folder's cache by its absolute path, so a new
    virtual environment or another clone of the same sources would compile everything again; the
    kernels' subfolder is named by the digest instead (_sources_locator)."""
    import numba

    sources = [Path(f) for f in sources]
    digest = _digest(sources)
    user_set = bool(os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR)
    if not user_set:
        numba.config.CACHE_DIR = str(cache_dir() / "numba" / f"{name}-{digest}")
    _FOLDERS[name] = (Path(numba.config.CACHE_DIR or os.environ["NUMBA_CACHE_DIR"]), digest)
    locators = _locator_classes()
    locator = _sources_locator(sources, digest)
    locators.insert(0, locator)
    try:
        yield
    finally:
        locators.remove(locator)
        if not user_set:
            numba.config.CACHE_DIR = ""


def _locator_classes() -> list:
    """The list of locator classes numba tries for a cached function, in order (numba >= 0.60:
    CacheImpl; older: _CacheImpl)."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    return impl._locator_classes


def _sources_locator(sources: list[Path], digest: str) -> type:
    """numba's locator for a CACHE_DIR (UserProvidedCacheLocator), for the functions of `sources` only,
    their cache in a subfolder named by the source's folder and the sources' digest rather than by its
    absolute path. numba still checks each function's own file by content (its source stamp)."""
    from numba.core.caching import UserProvidedCacheLocator

    files = {os.path.abspath(f) for f in sources}

    class SourcesLocator(UserProvidedCacheLocator):
        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.abspath(py_file) not in files:
                return None
            return super().from_function(py_func, py_file)

        @classmethod
        def get_suitable_cache_subpath(cls, py_file):
            return f"{os.path.basename(os.path.dirname(os.path.abspath(py_file)))}-{digest}"

    return SourcesLocator


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
