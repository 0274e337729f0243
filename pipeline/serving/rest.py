"""``pneumo serve``: the REST service. GET /health, GET /model, POST /predict, GET /metrics.

The service follows an alias (``@champion`` by default) and swaps in a new version only once it is fully
loaded (``model_holder``). POST /predict takes the image as a multipart field ``file``
(``curl -F file=@xray.jpeg``) or as the raw request body. Everything that is the client's fault gets a
4xx and one line: 401 no or wrong API key, 408 an upload slower than ``serve.body_timeout_seconds``,
411 no Content-Length or a chunked upload, 413 over ``serve.max_upload_mb`` (or too many pixels), 415 not an
image (or a DICOM the model does not take), 422 a corrupt image. A DICOM whose decoder plugin this server lacks
is the server's fault: 501, counted as ``no_decoder``. The body is counted as it arrives: no more than the limit
is ever read. At most ``serve.max_concurrent_decodes`` images are decoded and predicted at once.

With ``PNEUMO_API_KEY`` (or ``PNEUMO_API_KEY_FILE``) set, /predict and /model need the key; /health and
/metrics stay open for probes and scrapers. Nothing of an upload is logged (``request_log``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import Message, Receive

from pipeline import __version__
from pipeline.core.config import ServeParams
from pipeline.core.errors import PipelineError
from pipeline.serving import api_key, image_io, request_log
from pipeline.serving.classifier import Classifier, Prediction
from pipeline.serving.http_limits import with_header_timeout
from pipeline.serving.model_holder import ModelHolder
from pipeline.serving.service_metrics import InputDriftWindow, ServiceMetrics

MULTIPART_SLACK = 16 * 1024  # form boundaries and headers around the file
KEEP_ALIVE_SECONDS = 5  # idle connections count against serve.max_connections: let them go soon
CLOSE = {"Connection": "close"}  # the rest of an unread upload is not worth reading
IMAGE_ERRORS: tuple[tuple[type[image_io.ImageError], int, str], ...] = (  # most specific first
    (image_io.UnsupportedImage, 415, "unsupported"),
    (image_io.ImageTooLarge, 413, "too_large"),
    (image_io.DecoderMissing, 501, "no_decoder"),  # the deployment lacks a pydicom plugin, not the client's fault
    (image_io.ImageError, 422, "corrupt"),
)


class DecodeFailure(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


class DecodeSlots:
    """At most `n` uploads decoded and predicted at once (memory stays flat); the others wait their turn."""

    def __init__(self, n: int, metrics: ServiceMetrics) -> None:
        self._free, self._metrics = asyncio.Semaphore(n), metrics

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        with self._metrics.decodes_waiting.track_inprogress():
            await self._free.acquire()
        try:
            with self._metrics.decodes_running.track_inprogress():
                yield
        finally:
            self._free.release()


def predict_bytes(
    model: Classifier, data: bytes, filename: str, window: InputDriftWindow | None = None
) -> tuple[dict[str, Any], Prediction]:
    """Decode, predict, and note the image's drift features: the REST body and the prediction."""
    try:
        image = image_io.load(data)
        x = image_io.model_input(image, model.info.image_size)
    except image_io.ImageError as exc:
        status, reason = next((s, r) for kind, s, r in IMAGE_ERRORS if isinstance(exc, kind))
        raise DecodeFailure(status, reason, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a decoder failing in an unexpected way is still a bad upload
        raise DecodeFailure(422, "corrupt", f"cannot decode ({type(exc).__name__})") from None
    pred = model.predict(x[None])[0]
    if window is not None:
        window.add(model, x, image.width, image.height, pred.embedding)
    return {"file": filename, **pred.record(model.info, image.warnings)}, pred


async def read_capped(request: Request, cap: int, limit_mb: float) -> bytes:
    """The body, refused (413) as soon as more than `cap` bytes have arrived, whatever the headers said."""
    chunks: list[bytes] = []
    size = 0
    async with contextlib.aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > cap:
                raise HTTPException(413, f"upload of over {cap:,} bytes is over the limit of {limit_mb:g} MB", CLOSE)
            chunks.append(chunk)
    return b"".join(chunks)


def replay(body: bytes) -> Receive:
    """An ASGI receive that hands over `body`, already read and bounded, in one message."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def read_upload(request: Request, cap: int, limit_mb: float) -> tuple[bytes, str]:
    """(image bytes, file name); at most `cap` bytes of the body are ever read, multipart included."""
    filename = request.query_params.get("filename", "")
    body = await read_capped(request, cap, limit_mb)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):  # RFC 9110: any case
        return body, filename
    # Parsed from the bounded bytes, never from the socket: Starlette would spool any size to disk.
    async with Request(request.scope, replay(body)).form(max_files=1, max_fields=4) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, "no file: send the image as the multipart field 'file'")
        return await upload.read(), upload.filename or filename


def create_app(holder: ModelHolder, cfg: ServeParams, key: str | None = None) -> FastAPI:
    docs = {} if cfg.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="pneumo", version=__version__, description=__doc__, **docs)
    metrics = ServiceMetrics(holder, cfg.drift_window)
    guarded = [Depends(api_key.requirement(key))] if key else []
    slots = DecodeSlots(cfg.max_concurrent_decodes, metrics)
    max_bytes = int(cfg.max_upload_mb * 1e6)
    limit_mb = max_bytes / 1e6

    @app.get("/health")
    def health() -> dict[str, Any]:
        info = holder.current.info
        return {
            "status": "ok" if holder.last_error is None else "degraded",
            "model": info.name or info.uri,
            "model_version": info.version,
            "last_error": holder.last_error,
        }

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        body, media_type = metrics.render()
        return Response(body, media_type=media_type)

    @app.get("/model", dependencies=guarded)
    def model() -> dict[str, Any]:
        return {
            **holder.current.info.public(),
            "follows": holder.uri,
            "loaded_at": time_text(holder.loaded_at),
            "reloads": holder.reloads,
        }

    @app.post("/predict", dependencies=guarded)
    async def predict(request: Request) -> dict[str, Any]:
        if "transfer-encoding" in request.headers:  # h11 would frame the body by it, ignoring Content-Length
            raise HTTPException(411, "send the upload with a Content-Length header, not chunked", CLOSE)
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise HTTPException(411, "send a Content-Length header with the upload", CLOSE)
        if int(length) > max_bytes + MULTIPART_SLACK:
            raise HTTPException(413, f"upload of {int(length):,} bytes is over the limit of {limit_mb:g} MB", CLOSE)
        try:
            async with asyncio.timeout(cfg.body_timeout_seconds):
                data, filename = await read_upload(request, max_bytes + MULTIPART_SLACK, limit_mb)
        except TimeoutError:
            raise HTTPException(
                408, f"the upload did not arrive within {cfg.body_timeout_seconds:g} s", CLOSE
            ) from None
        if len(data) > max_bytes:
            raise HTTPException(413, f"image of {len(data):,} bytes is over the limit of {limit_mb:g} MB")
        try:
            async with slots.slot():
                served = holder.current  # this request's version, whatever the poller swaps in meanwhile
                request.state.model_version = served.info.version
                window = metrics.window
                body, pred = await run_in_threadpool(predict_bytes, served, data, filename, window)
        except DecodeFailure as exc:
            metrics.decode_failures.labels(exc.reason).inc()
            raise HTTPException(exc.status, f"{filename or 'upload'}: {exc}") from None
        metrics.observe_prediction(served.info.version, pred)
        return body

    paths = frozenset(getattr(route, "path", "") for route in app.routes)
    app.add_middleware(
        request_log.RequestLog, metrics=metrics, paths=paths, model_version=lambda: holder.current.info.version
    )
    return app


def time_text(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def server_config(app: FastAPI, cfg: ServeParams) -> uvicorn.Config:
    """uvicorn's own limits where they fit: connections, idle keep-alive, and (ours) a header deadline."""
    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        http=with_header_timeout(cfg.header_timeout_seconds),
        limit_concurrency=cfg.max_connections,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """The service's socket, bound before the model loads (which may be a registry download): a port in use or a
    host this machine does not have is one line at once, not uvicorn's exit 3 after the download."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port at once
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PipelineError(f"serve: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return sock


def serve(uri: str, cfg: ServeParams) -> None:
    request_log.setup()
    key = api_key.from_environment(os.environ)
    sock = listening_socket(cfg.host, cfg.port)
    try:
        holder = ModelHolder(uri, on_event=request_log.event)
    except BaseException:
        sock.close()
        raise
    info = holder.current.info
    request_log.event(
        "start",
        model=info.name or info.uri,
        model_version=info.version,
        threshold=round(info.threshold, 4),
        url=f"http://{cfg.host}:{cfg.port}",
        follows=f"@{holder.alias}" if holder.alias else None,
        poll_seconds=cfg.poll_seconds if holder.alias else None,
        api_key="required on /predict and /model" if key else "none: open service",
        docs=cfg.docs,
    )
    if key is None and not is_loopback(cfg.host):
        request_log.event(
            "warning", message=f"listening on {cfg.host} without an API key: anyone who reaches the port can use it"
        )
    if holder.alias:
        holder.poll(cfg.poll_seconds)
    app = create_app(holder, cfg, key)
    try:
        uvicorn.Server(server_config(app, cfg)).run(sockets=[sock])
    finally:
        holder.stop()
        sock.close()
