"""The REST service under hostile clients, with an API key, observed through /metrics and its log, and
following an alias whose versions may not load.

Real servers on loopback, real HTTP: `pneumo serve` as a process (key, limits, logs), and uvicorn in a
thread where a test wraps a part of the app (the loader, the model) to count what happens inside. The models
are small untrained networks packed as real serving bundles in a real MLflow registry (tests/tiny_models.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.core.config import ServeParams
from pipeline.core.errors import ConfigError
from pipeline.serving import api_key, drift, rest, service_metrics
from pipeline.serving import classifier as clf
from pipeline.serving.model_holder import ModelHolder
from tests.conftest import REPO
from tests.images import dicom_bytes, stretched
from tests.servers import Service, free_port
from tests.tiny_models import ThreadedServer, TinyRegistry, broken_bundle, tiny_bundle

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
PNEUMO = str(Path(sys.executable).with_name("pneumo"))
GENERATED_ID = re.compile(r'"request_id": "[0-9a-f]{32}"')
KEY = "test-key-" + "Zq7xW2pR9vLk4M"  # what a leak would look like: never in a log or a response
TIMEOUT = 3.0  # serve.header_timeout_seconds and serve.body_timeout_seconds of the secured service


@dataclass(frozen=True)
class Bundles:
    v1: Path
    v2: Path
    no_serving_json: Path
    corrupt_serving_json: Path
    images: list[Path]


@pytest.fixture(scope="module")
def bundles(real_224: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("bundles")
    reference = [
        str(p) for label in ("NORMAL", "PNEUMONIA") for p in sorted((real_224 / "train" / label).iterdir())[:20]
    ]
    v1, v2 = tiny_bundle(root / "v1", reference, seed=1), tiny_bundle(root / "v2", reference, seed=2)
    images = [p for label in ("NORMAL", "PNEUMONIA") for p in sorted((real_224 / "test" / label).iterdir())[:3]]
    return Bundles(
        v1,
        v2,
        broken_bundle(v1, root / "plain", "no_serving_json"),
        broken_bundle(v1, root / "corrupt", "corrupt_serving_json"),
        images,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real MLflow sqlite store, the process's tracking URI for this module's tests."""
    root = tmp_path_factory.mktemp("store")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(TinyRegistry(root).tracking_uri)
    yield root
    mlflow.set_tracking_uri(previous)  # type: ignore[arg-type] - None unsets it


@dataclass(frozen=True)
class Running:
    url: str
    log: Path


@pytest.fixture(scope="module")
def secured(bundles: Bundles, store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`pneumo serve` following @champion with an API key, no docs, 3-second header and body limits."""
    registry = TinyRegistry(store, "secured")
    registry.point(registry.register(bundles.v1))
    port = free_port()
    overrides = ["-S", "serve.docs=false", "-S", f"serve.body_timeout_seconds={TIMEOUT}"]
    overrides += ["-S", f"serve.header_timeout_seconds={TIMEOUT}", "-S", "serve.max_concurrent_decodes=2"]
    cmd = [PNEUMO, "--params", str(REPO / "params.yaml"), *overrides, "serve", "--model", registry.uri]
    env = {k: v for k, v in os.environ.items() if k != api_key.FILE_ENV}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PNEUMO_API_KEY=KEY)
    env.update(MLFLOW_TRACKING_URI=registry.tracking_uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    log = tmp_path_factory.mktemp("secured") / "serve.log"
    service = Service("pneumo serve", [*cmd, "--port", str(port)], env, REPO, log)
    try:
        service.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=180)
        yield Running(f"http://127.0.0.1:{port}", log)
    finally:
        service.stop()


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(values: dict, metric: str, /, **labels: str) -> float:
    return values.get((metric, frozenset(labels.items())), 0.0)


def log_lines(service: Running) -> list[dict]:
    lines = service.log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


BEARER = {"Authorization": f"Bearer {KEY}"}


def test_api_key_guards_predict_and_model_and_never_leaks(secured: Running, bundles: Bundles) -> None:
    url = secured.url
    image = bundles.images[0].read_bytes()
    attempts = {
        "none": {},
        "wrong bearer": {"Authorization": "Bearer not-the-key-000000000"},
        "wrong header": {"X-API-Key": KEY[:-1] + "X"},
        "basic scheme": {"Authorization": f"Basic {KEY}"},
        "key as a prefix": {"X-API-Key": KEY + "extra"},
    }
    responses = []
    for what, headers in attempts.items():
        for method, path in (("POST", "/predict"), ("GET", "/model")):
            r = httpx.request(
                method,
                f"{url}{path}",
                headers=headers,
                files={"file": ("a.jpeg", image)} if method == "POST" else None,
                timeout=30,
            )
            assert r.status_code == 401, (what, path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer"), what
            assert "Authorization: Bearer" in r.json()["detail"]
            responses.append(r)
    for headers in (BEARER, {"X-API-Key": KEY}):
        ok = httpx.post(f"{url}/predict", headers=headers, files={"file": ("a.jpeg", image)}, timeout=60)
        assert ok.status_code == 200, ok.text
        assert httpx.get(f"{url}/model", headers=headers, timeout=30).json()["version"] == "1"
        responses.append(ok)
    for open_path in ("/health", "/metrics"):
        responses.append(r := httpx.get(f"{url}{open_path}", timeout=30))
        assert r.status_code == 200
    for docs in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{url}{docs}", headers=BEARER, timeout=30).status_code == 404
    for r in responses:
        assert KEY not in r.text and KEY not in str(r.headers)
    log = secured.log.read_text(errors="replace")
    assert KEY not in log and KEY[:-1] not in log and "not-the-key" not in log
    assert any(line.get("event") == "start" and "required" in line["api_key"] for line in log_lines(secured))


def test_metrics_count_each_request_by_route_and_status(secured: Running, bundles: Bundles) -> None:
    url = secured.url
    image = bundles.images[1].read_bytes()
    before = samples(url)
    for f in bundles.images[:3]:
        assert (
            httpx.post(
                f"{url}/predict", headers=BEARER, files={"file": (f.name, f.read_bytes())}, timeout=60
            ).status_code
            == 200
        )
    for _ in range(2):
        r = httpx.post(f"{url}/predict", headers=BEARER, files={"file": ("notes.jpeg", b"notes " * 50)}, timeout=30)
        assert r.status_code == 415
    truncated = httpx.post(
        f"{url}/predict", headers=BEARER, files={"file": ("t.jpeg", image[: len(image) // 2])}, timeout=30
    )
    assert truncated.status_code == 422
    assert httpx.post(f"{url}/predict", files={"file": ("a.jpeg", image)}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/no/such/path/patient-name", timeout=30).status_code == 404
    assert httpx.get(f"{url}/predict", headers=BEARER, timeout=30).status_code == 405
    after = samples(url)

    def moved(metric: str, /, **labels: str) -> float:
        return sample(after, metric, **labels) - sample(before, metric, **labels)

    requests = "pneumo_http_requests_total"
    assert moved(requests, route="/predict", method="POST", status="200") == 3
    assert moved(requests, route="/predict", method="POST", status="415") == 2
    assert moved(requests, route="/predict", method="POST", status="422") == 1
    assert moved(requests, route="/predict", method="POST", status="401") == 1
    assert moved(requests, route="/predict", method="GET", status="405") == 1
    assert moved(requests, route="unmatched", method="GET", status="404") == 1
    assert moved("pneumo_http_request_duration_seconds_count", route="/predict", method="POST", status="200") == 3
    assert not any("patient-name" in str(labels) for _, labels in after)  # raw paths never become labels
    assert moved("pneumo_decode_failures_total", reason="unsupported") == 2
    assert moved("pneumo_decode_failures_total", reason="corrupt") == 1
    assert moved("pneumo_decode_failures_total", reason="too_large") == 0
    assert moved("pneumo_prediction_probability_count", model_version="1") == 3
    outcomes = sum(
        moved("pneumo_predictions_total", model_version="1", outcome=o) for o in ("NORMAL", "PNEUMONIA", "refused")
    )
    assert outcomes == 3
    assert sample(after, "pneumo_model_info", name="secured", version="1", alias="champion") == 1
    assert sample(after, "pneumo_model_degraded") == 0
    window = sample(after, "pneumo_input_drift_window_images")
    assert window == sample(before, "pneumo_input_drift_window_images") + 3
    assert 0 < sample(after, "pneumo_input_drift_score") <= 1
    assert sample(after, "pneumo_input_drift_verdict", pneumo_input_drift_verdict="too_few") == 1  # under 20 images
    features = {dict(labels)["feature"] for name, labels in after if name == "pneumo_input_drift_ks_distance"}
    assert {"mean", "p95", "aspect", "embedding_pc1"} <= features


def test_one_json_log_line_per_request_and_nothing_of_the_upload(secured: Running, real_224: Path) -> None:
    url = secured.url
    first = sorted((real_224 / "test" / "PNEUMONIA").iterdir())[0]
    dicom = dicom_bytes(stretched(first, 256), PatientName="Doe^Jane", PatientID="MRN-4711-SECRET")
    r = httpx.post(
        f"{url}/predict?filename=Doe_Jane_MRN-4711.dcm",
        headers={**BEARER, "X-Request-ID": "ward7-req-0001"},
        files={"file": ("Doe_Jane_MRN-4711.dcm", dicom)},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "ward7-req-0001"
    odd = httpx.get(f"{url}/health", headers={"X-Request-ID": "not a token; Doe^Jane"}, timeout=30)
    generated = odd.headers["x-request-id"]
    assert len(generated) == 32 and generated != "not a token; Doe^Jane"
    time.sleep(0.3)  # the line is written after the response
    lines = log_lines(secured)
    line = next(x for x in lines if x.get("request_id") == "ward7-req-0001")
    assert set(line) == {"ts", "event", "request_id", "method", "route", "status", "duration_ms", "model_version"}
    assert (line["event"], line["method"], line["route"], line["status"]) == ("request", "POST", "/predict", 200)
    assert line["model_version"] == "1" and line["duration_ms"] > 0
    assert any(x.get("request_id") == generated and x["route"] == "/health" for x in lines)
    # Request ids the service made up are random hex and may contain "4711" by chance: leave them out.
    text = GENERATED_ID.sub("<id>", secured.log.read_text(errors="replace"))
    for secret in ("Doe", "Jane", "4711", "SECRET", KEY):
        assert secret not in text, secret


def test_slow_clients_do_not_hold_the_service(secured: Running, bundles: Bundles) -> None:
    """40 connections trickle a byte every 0.2 s: a normal client is answered at once; after the limits the
    slow bodies get 408 and the slow headers are cut off."""
    url = secured.url
    port = int(url.rsplit(":", 1)[1])
    slow_body = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 200000\r\n\r\n"
    ).encode()
    slow_head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    socks: list[tuple[str, socket.socket]] = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        kind = "body" if i % 2 else "head"
        s.sendall(slow_body if kind == "body" else slow_head)
        socks.append((kind, s))
    stop = threading.Event()

    def drip() -> None:
        alive = list(socks)
        while alive and not stop.wait(0.2):
            for item in list(alive):
                try:
                    item[1].send(b"\xff" if item[0] == "body" else b"x")
                except OSError:
                    alive.remove(item)

    dripper = threading.Thread(target=drip, daemon=True)
    started = time.monotonic()
    dripper.start()
    try:
        time.sleep(0.5)
        image = bundles.images[0]
        t0 = time.monotonic()
        r = httpx.post(f"{url}/predict", headers=BEARER, files={"file": (image.name, image.read_bytes())}, timeout=30)
        answered = time.monotonic() - t0
        assert r.status_code == 200 and answered < TIMEOUT, f"{r.status_code} after {answered:.1f} s"

        outcomes: dict[str, list[str]] = {"body": [], "head": []}
        for kind, s in socks:
            s.settimeout(max(1.0, started + TIMEOUT + 10 - time.monotonic()))
            received = b""
            try:
                while chunk := s.recv(4096):
                    received += chunk
                outcomes[kind].append(received.split(b"\r\n", 1)[0].decode() or "closed")
            except ConnectionResetError:
                outcomes[kind].append(received.split(b"\r\n", 1)[0].decode() or "reset")
            except TimeoutError:
                outcomes[kind].append("still open")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        dripper.join(5)
        for _, s in socks:
            s.close()
    assert outcomes["body"] == ["HTTP/1.1 408 Request Timeout"] * 20, outcomes["body"]
    assert set(outcomes["head"]) <= {"closed", "reset"}, outcomes["head"]
    assert elapsed < TIMEOUT + 10
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


# In-process servers: the same app and uvicorn settings as `pneumo serve`, with a part wrapped to count.


def threaded(holder: ModelHolder, key: str | None = None, **params: object) -> ThreadedServer:
    cfg = ServeParams(port=free_port(), **params)  # type: ignore[arg-type]
    return ThreadedServer(rest.server_config(rest.create_app(holder, cfg, key), cfg))


def test_open_without_a_key_with_docs(bundles: Bundles) -> None:
    server = threaded(ModelHolder(str(bundles.v1)))
    try:
        image = bundles.images[0]
        r = httpx.post(f"{server.url}/predict", files={"file": (image.name, image.read_bytes())}, timeout=60)
        assert r.status_code == 200 and 0 <= r.json()["probability"] <= 1
        assert httpx.get(f"{server.url}/model", timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/docs", timeout=30).status_code == 200
        spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
        assert "/predict" in spec["paths"] and "securitySchemes" not in spec.get("components", {})
    finally:
        server.stop()


def test_decodes_are_bounded(bundles: Bundles) -> None:
    holder = ModelHolder(str(bundles.v1))
    model, lock = holder.current, threading.Lock()
    state = {"running": 0, "peak": 0}
    real_predict = model.predict

    def slow_predict(batch: object) -> list[clf.Prediction]:
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        try:
            time.sleep(0.3)
            return real_predict(batch)  # type: ignore[arg-type]
        finally:
            with lock:
                state["running"] -= 1

    model.predict = slow_predict  # type: ignore[method-assign]
    server = threaded(holder, max_concurrent_decodes=2)
    image = bundles.images[0].read_bytes()
    codes: list[int] = []

    def client() -> None:
        r = httpx.post(f"{server.url}/predict", files={"file": ("a.jpeg", image)}, timeout=60)
        codes.append(r.status_code)

    try:
        clients = [threading.Thread(target=client) for _ in range(8)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
    finally:
        server.stop()
    assert codes == [200] * 8 and state["peak"] == 2


MIB = 1 << 20


def test_a_chunked_upload_is_refused_before_its_body_is_read(bundles: Bundles) -> None:
    """h11 frames a body by Transfer-Encoding: chunked even beside a small Content-Length: such an upload is
    refused at once (411), while the client is still sending, not after 64 MiB have been read into memory."""
    server = threaded(ModelHolder(str(bundles.v1)), max_upload_mb=1)
    port = int(server.url.rsplit(":", 1)[1])
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % MIB + b"A" * MIB + b"\r\n"
    sent = {"chunks": 0}
    s = socket.create_connection(("127.0.0.1", port), timeout=30)

    def send_body() -> None:
        try:
            s.sendall(head)
            for _ in range(64):
                s.sendall(chunk)
                sent["chunks"] += 1
            s.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed the connection: what this test wants
            pass

    sender = threading.Thread(target=send_body, daemon=True)
    try:
        sender.start()
        received = b""

        def complete() -> bool:  # the headers, and as many body bytes as they announce
            head, found, body = received.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head.lower())
            return bool(found) and length is not None and len(body) >= int(length.group(1))

        try:
            while not complete() and (data := s.recv(65536)):
                received += data
        except ConnectionResetError:
            pass
        sender.join(30)
    finally:
        s.close()
        server.stop()
    assert received.startswith(b"HTTP/1.1 411 "), received[:200]  # (its body may be lost to the reset that follows;
    assert b"connection: close" in received.lower()  # the message is checked over ASGI, below)
    assert sent["chunks"] < 64, "the server read the whole chunked body"


def asgi_post(
    app: object, content_type: bytes, first: bytes, chunks: int, size: int, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[int, dict, int]:
    """POST /predict straight to the ASGI app, Content-Length: 10, then `first` and `chunks` chunks of `size`
    bytes: what a server that does not enforce Content-Length would pass on. (status, body, bytes taken)."""
    headers = [(b"host", b"x"), (b"content-length", b"10"), (b"content-type", content_type), *extra]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    parts = [first] + [b"A" * size] * chunks
    taken = {"bytes": 0, "i": 0}
    sent: list[dict] = []

    async def receive() -> dict:
        i = taken["i"]
        taken["i"] += 1
        if i >= len(parts):
            return {"type": "http.disconnect"}
        taken["bytes"] += len(parts[i])
        return {"type": "http.request", "body": parts[i], "more_body": i < len(parts) - 1}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[operator]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    return status, body, taken["bytes"]


def test_the_body_is_counted_as_it_arrives_raw_and_multipart(bundles: Bundles) -> None:
    """A body longer than its Content-Length is cut off at the limit (plus the multipart slack), raw or
    multipart: the app never reads, spools or holds the rest."""
    cfg = ServeParams(max_upload_mb=1)
    app = rest.create_app(ModelHolder(str(bundles.v1)), cfg)
    cap = 1_000_000 + rest.MULTIPART_SLACK
    size, chunks = 64 * 1024, 200  # 12.5 MiB on offer
    preamble = (
        b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    for content_type, first in ((b"application/octet-stream", b""), (b"multipart/form-data; boundary=xx", preamble)):
        status, body, taken = asgi_post(app, content_type, first, chunks, size)
        assert status == 413, (content_type, body)
        assert body["detail"] == f"upload of over {cap:,} bytes is over the limit of 1 MB", content_type
        assert taken <= cap + size, f"{content_type!r}: {taken:,} bytes read"
    chunked = ((b"transfer-encoding", b"chunked"),)
    status, body, taken = asgi_post(app, b"application/octet-stream", b"", chunks, size, chunked)
    assert (status, taken) == (411, 0) and body["detail"] == "send the upload with a Content-Length header, not chunked"


def test_a_request_of_a_swapped_out_model_leaves_the_drift_window_alone(
    bundles: Bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A v1 request passes the "still serving?" check, v2 is swapped in and answers three images, then the v1
    request adds its image: it must not clear v2's rows and point the window back at v1."""
    v1, v2 = clf.load(str(bundles.v1)), clf.load(str(bundles.v2))
    serving = {"model": v1}
    window = service_metrics.InputDriftWindow(50, lambda: serving["model"])
    x = np.full((v1.info.image_size, v1.info.image_size, 1), 128, np.float32)
    real_features = drift.image_features

    def swap_meanwhile(*args: object) -> dict[str, float]:
        monkeypatch.setattr(drift, "image_features", real_features)
        serving["model"] = v2
        for _ in range(3):
            window.add(v2, x, 64, 64)
        return real_features(*args)  # type: ignore[arg-type]

    for _ in range(2):
        window.add(v1, x, 64, 64)
    monkeypatch.setattr(drift, "image_features", swap_meanwhile)
    window.add(v1, x, 64, 64)  # the straggler
    report = window.report()
    assert report is not None and report.n_images == 3
    window.add(v2, x, 64, 64)
    assert window.report().n_images == 4  # type: ignore[union-attr]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.1)


def test_a_version_that_cannot_load_is_downloaded_once_per_alias_move(bundles: Bundles, store: Path) -> None:
    registry = TinyRegistry(store, "swaps")
    v1, corrupt, plain, v2 = (
        registry.register(b) for b in (bundles.v1, bundles.corrupt_serving_json, bundles.no_serving_json, bundles.v2)
    )
    registry.point(v1)
    downloads: list[str | None] = []

    def counting_load(uri: str, *, version: str | None = None) -> clf.Classifier:
        downloads.append(version)
        return clf.load(uri, version=version)

    holder = ModelHolder(registry.uri, counting_load)
    server = threaded(holder)
    holder.poll(0.2)
    url, image = server.url, bundles.images[0]

    def health() -> dict:
        return httpx.get(f"{url}/health", timeout=30).json()

    def answered_by() -> str:
        r = httpx.post(f"{url}/predict", files={"file": (image.name, image.read_bytes())}, timeout=60)
        return str(r.json()["model_version"])

    try:
        assert answered_by() == v1
        for broken, reason in ((corrupt, "invalid serving.json (JSONDecodeError"), (plain, "no serving.json")):
            registry.point(broken)
            wait_for(lambda b=broken: f"version {b}" in str(health()["last_error"]), f"version {broken} reported")
            time.sleep(2.0)  # ten more polls
            status = health()
            assert status["status"] == "degraded" and status["model_version"] == v1 and reason in status["last_error"]
            assert answered_by() == v1 and downloads.count(broken) == 1
            assert sample(samples(url), "pneumo_model_degraded") == 1
        registry.point(v2)
        wait_for(lambda: health()["model_version"] == v2, "v2 swapped in")
        assert health()["status"] == "ok" and answered_by() == v2 and downloads.count(v2) == 1
        registry.point(corrupt)  # the alias moved: the broken version gets one more try, and only one
        wait_for(lambda: health()["status"] == "degraded", "the broken version reported again")
        time.sleep(1.0)
        assert downloads.count(corrupt) == 2 and answered_by() == v2
        assert sample(samples(url), "pneumo_model_reloads_total") == 1
    finally:
        holder.stop()
        server.stop()


def test_the_version_loaded_is_the_version_resolved(bundles: Bundles, store: Path) -> None:
    """The alias moves again while a version downloads: the holder still loads the one it resolved."""
    registry = TinyRegistry(store, "pinned")
    v1, v2, v3 = (registry.register(b) for b in (bundles.v1, bundles.v2, bundles.v1))
    registry.point(v1)
    asked: list[str | None] = []

    def racing_load(uri: str, *, version: str | None = None) -> clf.Classifier:
        asked.append(version)
        if version == v2:
            registry.point(v3)  # moved after the holder resolved v2
        return clf.load(uri, version=version)

    holder = ModelHolder(registry.uri, racing_load)
    registry.point(v2)
    assert holder.check() and holder.current.info.version == v2 and holder.current.info.alias == "champion"
    assert holder.check() and holder.current.info.version == v3
    assert asked == [None, v2, v3]


# API key configuration: pure logic.


def test_api_key_from_environment(tmp_path: Path) -> None:
    assert api_key.from_environment({}) is None
    assert api_key.from_environment({"PNEUMO_API_KEY": KEY}) == KEY
    secret = tmp_path / "key"
    secret.write_text(KEY + "\n")
    assert api_key.from_environment({"PNEUMO_API_KEY_FILE": str(secret)}) == KEY
    failures = {
        "set PNEUMO_API_KEY or PNEUMO_API_KEY_FILE, not both": {
            "PNEUMO_API_KEY": KEY,
            "PNEUMO_API_KEY_FILE": str(secret),
        },
        "cannot read the API key (No such file or directory)": {"PNEUMO_API_KEY_FILE": str(tmp_path / "missing")},
        "the API key has 5 characters, use at least 16": {"PNEUMO_API_KEY": "short"},
        "the API key has 0 characters": {"PNEUMO_API_KEY": ""},
        "printable ASCII without spaces": {"PNEUMO_API_KEY": "with spaces in the key 123"},
    }
    for message, environ in failures.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
            api_key.from_environment(environ)
        assert KEY not in str(caught.value) and "\n" not in str(caught.value)
