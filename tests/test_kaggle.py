"""The Kaggle source: credentials, clear errors offline, and the real download path against a loopback server."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.core.config import Params
from pipeline.core.errors import DataError, TransientError
from pipeline.data import ingest, kaggle


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))


def test_missing_credentials_say_what_to_set(no_credentials: None, params_in: Callable[..., Params]) -> None:
    with pytest.raises(DataError) as err:
        ingest.ingest(params_in("data.source=kaggle").data)
    assert str(err.value).startswith("kaggle: no credentials found: set KAGGLE_USERNAME and KAGGLE_KEY")


def test_kaggle_json_is_read(no_credentials: None, tmp_path: Path) -> None:
    config = tmp_path / "kaggle-config"
    config.mkdir()
    (config / "kaggle.json").write_text(json.dumps({"username": "ann", "key": "k3y"}))
    assert kaggle.credentials() == ("ann", "k3y")
    (config / "kaggle.json").write_text("{not json")
    with pytest.raises(DataError, match=r"kaggle\.json must be JSON with 'username' and 'key'"):
        kaggle.credentials()


def test_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, params_in: Callable[..., Params]) -> None:
    monkeypatch.setenv("KAGGLE_USERNAME", "ann")
    monkeypatch.setenv("KAGGLE_KEY", "k3y")
    params = params_in("data.source=kaggle", "data.kaggle.url=http://127.0.0.1:9/api/v1/datasets/download")
    with pytest.raises(TransientError) as err:
        ingest.ingest(params.data)
    message = str(err.value)
    assert message.startswith("kaggle: cannot download http://127.0.0.1:9/") and "data.source=local" in message
    assert "\n" not in message and not Path(params.data.root).exists()


SERVED = {"mode": "whole"}  # what the loopback server sends: whole, truncated, html or redirect (to storage)
STORAGE_SAW: list[str | None] = []  # the Authorization header of each request the storage server got


@pytest.fixture
def kaggle_server(tmp_path: Path) -> Iterator[str]:
    """A loopback stand-in for the Kaggle API: basic auth, then a zip in the real archive's shape."""
    archive = tmp_path / "served.zip"
    from pipeline.core.config import load_params
    from pipeline.data import synthetic
    from tests.conftest import REPO

    syn = load_params(REPO / "params.yaml", ["data.synthetic.counts={train: {normal: 3, bacteria: 2, virus: 1}}"])
    with zipfile.ZipFile(archive, "w") as z:
        for item in synthetic.plan(syn.data.synthetic):
            data = synthetic.encode_jpeg(synthetic.render(item, 64))
            z.writestr(f"chest_xray/{item.split}/{item.label}/{item.filename}", data)
            z.writestr(f"chest_xray/chest_xray/{item.split}/{item.label}/{item.filename}", data)
    good = "Basic " + base64.b64encode(b"ann:k3y").decode()

    class Storage(http.server.BaseHTTPRequestHandler):  # where Kaggle's redirect points: another host
        def do_GET(self) -> None:
            STORAGE_SAW.append(self.headers.get("Authorization"))
            body = archive.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    storage = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Storage)
    threading.Thread(target=storage.serve_forever, daemon=True).start()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != good:
                self.send_response(401)
                self.end_headers()
                return
            if self.path != "/api/v1/datasets/download/paultimothymooney/chest-xray-pneumonia":
                self.send_response(404)
                self.end_headers()
                return
            body = archive.read_bytes()
            mode = SERVED["mode"]
            if mode == "busy":
                self.send_response(503)
                self.end_headers()
                return
            if mode == "redirect":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{storage.server_address[1]}/signed/archive.zip")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) if mode != "html" else 24))
            self.end_headers()
            if mode == "truncated":  # the connection ends early, without an error
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            else:
                self.wfile.write(body if mode == "whole" else b"<html>try again</html>\n\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/v1/datasets/download"
    SERVED["mode"] = "whole"
    STORAGE_SAW.clear()
    for s in (server, storage):
        s.shutdown()
        s.server_close()


def test_download_then_import(
    kaggle_server: str, monkeypatch: pytest.MonkeyPatch, params_in: Callable[..., Params]
) -> None:
    params = params_in("data.source=kaggle", f"data.kaggle.url={kaggle_server}")
    monkeypatch.setenv("KAGGLE_USERNAME", "ann")
    monkeypatch.setenv("KAGGLE_KEY", "wrong")
    with pytest.raises(DataError, match=r"kaggle: credentials rejected \(HTTP 401\)"):
        ingest.ingest(params.data)
    assert not list(Path(params.data.kaggle.download_dir).glob("*.zip"))  # nothing half-written
    monkeypatch.setenv("KAGGLE_KEY", "k3y")
    result = ingest.ingest(params.data)
    assert result.total == 6 and result.counts[("train", "PNEUMONIA")] == 3
    assert Path(params.data.kaggle.download_dir, "paultimothymooney__chest-xray-pneumonia.zip").is_file()


def test_only_a_whole_zip_is_kept_and_a_kept_one_needs_no_credentials(
    kaggle_server: str, monkeypatch: pytest.MonkeyPatch, params_in: Callable[..., Params]
) -> None:
    params = params_in("data.source=kaggle", f"data.kaggle.url={kaggle_server}")
    monkeypatch.setenv("KAGGLE_USERNAME", "ann")
    monkeypatch.setenv("KAGGLE_KEY", "k3y")
    cached = Path(params.data.kaggle.download_dir, "paultimothymooney__chest-xray-pneumonia.zip")
    SERVED["mode"] = "truncated"
    with pytest.raises(
        TransientError, match=r"kaggle: the download of .* stopped at [\d,]+ of [\d,]+ bytes; run again"
    ):
        kaggle.download(params.data.kaggle)
    SERVED["mode"] = "html"
    with pytest.raises(TransientError, match=r"sent 24 bytes that are not a zip archive; nothing was kept"):
        kaggle.download(params.data.kaggle)
    assert not cached.exists() and not list(cached.parent.iterdir())  # no half file, no temporary left
    cached.write_bytes(b"<html>cut off</html>")  # what an older version could keep: downloaded again
    SERVED["mode"] = "whole"
    assert kaggle.download(params.data.kaggle) == cached and zipfile.is_zipfile(cached)
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(cached.parent / "no-config"))
    assert kaggle.download(params.data.kaggle) == cached  # the finished download, no credentials asked


def test_a_busy_server_is_retried_a_wrong_name_and_an_unwritable_folder_are_not(
    kaggle_server: str, monkeypatch: pytest.MonkeyPatch, params_in: Callable[..., Params], tmp_path: Path
) -> None:
    """503 is the network's (the flow retries ingest); 404 and a folder this machine cannot write are the user's,
    each one line naming what to fix, and never blamed on the network or the credentials."""
    monkeypatch.setenv("KAGGLE_USERNAME", "ann")
    monkeypatch.setenv("KAGGLE_KEY", "k3y")
    params = params_in("data.source=kaggle", f"data.kaggle.url={kaggle_server}")
    SERVED["mode"] = "busy"
    with pytest.raises(TransientError, match=r"^kaggle: the server answered HTTP 503 for .*; run again later$"):
        kaggle.download(params.data.kaggle)
    SERVED["mode"] = "whole"
    wrong = params_in("data.source=kaggle", f"data.kaggle.url={kaggle_server}", "data.kaggle.dataset=someone/nope")
    with pytest.raises(DataError, match=r"^kaggle: no data set at .*someone/nope \(HTTP 404\); check data\.kaggle"):
        kaggle.download(wrong.data.kaggle)
    (tmp_path / "a-file").write_text("x")
    blocked = params_in(
        "data.source=kaggle",
        f"data.kaggle.url={kaggle_server}",
        f"data.kaggle.download_dir={tmp_path / 'a-file' / 'dl'}",
    )
    with pytest.raises(DataError, match=r"^data\.kaggle\.download_dir: cannot write in .*a-file/dl \("):
        kaggle.download(blocked.data.kaggle)


def test_the_credentials_never_follow_a_redirect_to_another_host(
    kaggle_server: str, monkeypatch: pytest.MonkeyPatch, params_in: Callable[..., Params]
) -> None:
    params = params_in("data.source=kaggle", f"data.kaggle.url={kaggle_server}")
    monkeypatch.setenv("KAGGLE_USERNAME", "ann")
    monkeypatch.setenv("KAGGLE_KEY", "k3y")
    SERVED["mode"] = "redirect"  # as Kaggle does: 302 to a signed storage URL
    assert zipfile.is_zipfile(kaggle.download(params.data.kaggle))
    assert STORAGE_SAW == [None]  # the download came from storage, which never saw the key
