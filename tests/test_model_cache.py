"""The model cache: `purelm pull hf://OWNER/REPO/FILE.gguf` through huggingface_hub against a local
server standing in for the hub (HF_ENDPOINT on loopback; resolve URLs, ETag = sha256, Range requests
as the hub answers them), an interrupted download resumed, `-m hf://...`, `purelm list` and `purelm rm`."""
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from purelm import hub
from purelm.cli import main
from purelm.errors import DownloadError, PurelmError, UsageError
from purelm.formats.gguf import GGUFFile

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubHandler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD /OWNER/REPO/resolve/REVISION/PATH. site.cut[path] = n: the first GET of path sends
    its full Content-Length but only n bytes, then drops the connection; site.then[path] = status:
    the GET after that cut fails with that status. site.lie[path]: the ETag served (a wrong
    checksum)."""

    def _file(self):
        site = self.server.site
        parts = self.path.split("/", 5)  # '', owner, repo, 'resolve', revision, path
        if len(parts) < 6 or parts[3] != "resolve" or parts[4] not in ("main", COMMIT):
            return None, None
        key = f"{parts[1]}/{parts[2]}/{parts[5]}"
        return key, site.files.get(key)

    def _headers(self, key, body, status, start=0):
        site = self.server.site
        self.send_response(status)
        etag = site.lie.get(key, hashlib.sha256(body).hexdigest())
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Linked-Etag", f'"{etag}"')
        self.send_header("X-Linked-Size", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()

    def do_HEAD(self):
        key, body = self._file()
        self.server.site.requests.append(("HEAD", self.path, None))
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._headers(key, body, 200)

    def do_GET(self):
        site = self.server.site
        key, body = self._file()
        rng = self.headers.get("Range")
        site.requests.append(("GET", self.path, rng))
        if body is None or key in site.fail:
            self.send_error(site.fail.pop(key, 404))
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        self._headers(key, body, 206 if rng else 200, start)
        cut = site.cut.pop(key, None)
        if cut is not None:
            if key in site.then:  # the next request for it fails
                site.fail[key] = site.then.pop(key)
            self.wfile.write(body[start:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


class Site:
    def __init__(self):
        self.files, self.cut, self.lie, self.requests = {}, {}, {}, []
        self.then, self.fail = {}, {}  # key -> HTTP status for the request after a cut


@pytest.fixture
def site(monkeypatch, tmp_path):
    s = Site()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.site = s
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("PURELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield s
    server.shutdown()
    server.server_close()


def test_pull_into_the_hub_cache_layout_and_load(site, fixtures, tmp_path):
    data = (fixtures / "llama-q8_0.gguf").read_bytes()
    site.files["owner/tiny/llama-q8_0.gguf"] = data
    path = hub.pull("hf://owner/tiny/llama-q8_0.gguf")
    root = tmp_path / "cache" / "huggingface" / "models--owner--tiny"
    assert path == root / "snapshots" / COMMIT / "llama-q8_0.gguf"
    assert path.resolve() == root / "blobs" / hashlib.sha256(data).hexdigest()  # huggingface_hub's layout
    assert path.read_bytes() == data and (root / "refs" / "main").read_text() == COMMIT
    # -m hf://...: the cached copy, with no request to the hub
    site.requests.clear()
    import purelm

    llm = purelm.load("hf://owner/tiny/llama-q8_0.gguf", backend="numpy")
    assert site.requests == [] and llm.path == str(path)
    ref = purelm.load(str(fixtures / "llama-q8_0.gguf"), backend="numpy")
    assert np.array_equal(llm.logits([1, 2, 3]), ref.logits([1, 2, 3]))


def test_interrupted_download_is_resumed(site):
    """The connection drops after 15 MiB of 24: huggingface_hub asks for the rest from the last chunk it
    wrote (it writes in chunks of DOWNLOAD_CHUNK_SIZE, 10 MiB), and the whole file checks out."""
    from huggingface_hub import constants

    data = np.random.default_rng(0).bytes(24 << 20)
    site.files["owner/big/big.gguf"] = data
    site.cut["owner/big/big.gguf"] = 15 << 20
    path = hub.pull("hf://owner/big/big.gguf")
    assert path.read_bytes() == data
    gets = [r[2] for r in site.requests if r[0] == "GET"]
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    assert chunk <= 15 << 20 and gets == [None, f"bytes={(15 << 20) // chunk * chunk}-"]
    assert not list(path.resolve().parent.glob("*incomplete"))


def test_a_download_interrupted_in_one_run_resumes_in_the_next(site, tmp_path):
    """The connection drops after 15 MiB of 24 and the retry fails (the network is gone): the pull
    fails, keeping the 10 MiB written; the next pull asks only for the rest."""
    data = np.random.default_rng(1).bytes(24 << 20)
    key, sha = "owner/big/big.gguf", hashlib.sha256(data).hexdigest()
    site.files[key], site.cut[key], site.then[key] = data, 15 << 20, 503
    with pytest.raises(DownloadError, match="download of hf://owner/big/big.gguf failed: .*503"):
        hub.pull("hf://owner/big/big.gguf")
    blobs = tmp_path / "cache" / "huggingface" / "models--owner--big" / "blobs"
    assert [p.name for p in blobs.iterdir()] == [f"{sha}.purelm-part"]
    kept = (blobs / f"{sha}.purelm-part").stat().st_size
    assert kept == 10 << 20
    assert hub.cached_models() == []  # a partial file is not a model
    site.requests.clear()
    path = hub.pull("hf://owner/big/big.gguf")
    assert [r[2] for r in site.requests if r[0] == "GET"] == [f"bytes={kept}-"]
    assert path.read_bytes() == data and path.resolve() == blobs / sha
    assert sorted(p.name for p in blobs.iterdir()) == [sha]


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(site, fixtures, capsys):
    site.files["owner/tiny/m.gguf"] = (fixtures / "llama-q8_0.gguf").read_bytes()
    site.lie["owner/tiny/m.gguf"] = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DownloadError, match="is corrupt: expected sha256 .* got "):
        hub.pull("hf://owner/tiny/m.gguf")
    assert hub.cached_models() == []
    assert main(["list"]) == 0 and "no models in" in capsys.readouterr().out


def test_errors_are_clear(site, monkeypatch):
    with pytest.raises(DownloadError, match="no such file in the repository"):
        hub.pull("hf://owner/tiny/absent.gguf")
    for bad in ("hf://owner/x.gguf", "hf://owner/repo/notes.txt", "hf://ow ner/repo/m.gguf", "hf://o/r/../m.gguf",
                "hf://o/r@/m.gguf"):
        with pytest.raises(UsageError):
            hub.parse_hf(bad)
    assert hub.parse_hf("hf://o/r@v1.0/sub/m.gguf") == hub.HFFile("o/r", "sub/m.gguf", "v1.0")
    import types
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**vars(_http.time), "sleep": lambda s: None}))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: retried, then refused
    with pytest.raises(DownloadError, match="download of hf://owner/tiny/m.gguf failed"):
        hub.pull("hf://owner/tiny/m.gguf")
    with pytest.raises(PurelmError, match="is not in the cache"):
        hub.remove("hf://owner/tiny/m.gguf")


def test_split_model_list_and_rm(site, fixtures, tmp_path, capsys):
    from purelm.formats.split import rewrite

    shards = rewrite(fixtures / "llama-q8_0.gguf", tmp_path / "m.gguf", 40_000)
    for p in shards:
        site.files[f"owner/tiny/q8/{Path(p).name}"] = Path(p).read_bytes()
    site.files["owner/tiny/llama-f32.gguf"] = (fixtures / "llama-f32.gguf").read_bytes()
    # -m with a first shard pulls every shard
    assert main(["info", "hf://owner/tiny/q8/m-00001-of-00004.gguf", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["tensors"]) == len(GGUFFile(fixtures / "llama-q8_0.gguf").tensors)
    assert main(["pull", "hf://owner/tiny/llama-f32.gguf"]) == 0
    capsys.readouterr()
    named = tmp_path / "cache" / "models" / hub.MODELS["smollm2"].filename
    named.parent.mkdir()
    named.write_bytes((fixtures / "llama-q8_0.gguf").read_bytes())  # stands in for the pulled SmolLM2
    assert main(["list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"smollm2", "hf://owner/tiny/q8/m-00001-of-00004.gguf", "hf://owner/tiny/llama-f32.gguf"}
    split_entry = listed["hf://owner/tiny/q8/m-00001-of-00004.gguf"]
    assert split_entry["bytes"] == sum(Path(p).stat().st_size for p in shards) and len(split_entry["files"]) == 4
    assert split_entry["types"].startswith("Q8_0 ") and "F32" in split_entry["types"]
    assert listed["hf://owner/tiny/llama-f32.gguf"]["types"] == "F32 100%"
    assert main(["list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "size", "types", "path"] and len(table) == 4
    # rm: the files, then blobs no snapshot needs, then the empty repository folder
    repo = tmp_path / "cache" / "huggingface" / "models--owner--tiny"
    assert main(["rm", "hf://owner/tiny/q8/m-00001-of-00004.gguf"]) == 0
    assert "removed hf://owner/tiny/q8/m-00001-of-00004.gguf: 4 files" in capsys.readouterr().out
    assert len(list((repo / "blobs").iterdir())) == 1
    assert main(["rm", "smollm2", "hf://owner/tiny/llama-f32.gguf"]) == 0
    assert not repo.exists() and not named.exists() and hub.cached_models() == []
    assert main(["rm", "smollm2"]) == 1
    assert "is not in the cache" in capsys.readouterr().err


@pytest.mark.parametrize("honest", [True, False])
def test_files_with_a_git_sha1_etag_are_checked_too(site, fixtures, honest):
    """A file outside LFS has its git blob sha1 as ETag: huggingface_hub downloads it, purelm checks
    the sha1 (git's own: sha1 of 'blob SIZE\\0' + content)."""
    data = (fixtures / "llama-q8_0.gguf").read_bytes()
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    site.files["owner/git/m.gguf"] = data
    site.lie["owner/git/m.gguf"] = git_sha1 if honest else hashlib.sha1(b"other").hexdigest()
    if honest:
        path = hub.pull("hf://owner/git/m.gguf")
        assert path.read_bytes() == data and path.resolve().name == git_sha1
    else:
        with pytest.raises(DownloadError, match="is corrupt: expected git sha1"):
            hub.pull("hf://owner/git/m.gguf")
        assert hub.cached_models() == []
