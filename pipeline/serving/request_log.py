"""The service's log: one JSON line per request and per service event, on standard output.

Uploads may carry patient data, so no line holds anything of an image, its file name or its DICOM header,
nor the query string or any request header (the API key travels in one). A request line holds the request id
(the client's ``X-Request-ID`` when it is a plain token of up to 128 characters, else a fresh one; echoed in
the response), the method, the route template, the status, the duration and the model version that answered.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TextIO

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.serving.service_metrics import ServiceMetrics

LOGGER = logging.getLogger("pneumo.serve")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # anything else is logged as "other"
UNMATCHED = "unmatched"  # the route label of a request no route matched (404): never the raw path


class JsonLines(logging.Formatter):
    """Dict messages as they are; other records (uvicorn's own) as event "server" with their text."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):
            fields = dict(record.msg)
        else:
            fields = {"event": "server", "level": record.levelname.lower(), "message": record.getMessage()}
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        return json.dumps({"ts": stamp, **fields}, default=str)


def setup(stream: TextIO = sys.stdout) -> None:
    """Send the service's and uvicorn's log records to `stream` as JSON lines."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    for name in (LOGGER.name, "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    LOGGER.setLevel(logging.INFO)


def event(name: str, **fields: Any) -> None:
    LOGGER.info({"event": name, **fields})


class RequestLog:
    """ASGI middleware: the request id, the request metrics and one log line per HTTP request."""

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics, paths: frozenset[str], model_version: Callable[[], str | None]
    ) -> None:
        """`paths`: the app's route paths, the only values of the route label besides "unmatched"."""
        self.app, self.metrics, self.paths, self.model_version = app, metrics, paths, model_version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        status = 500  # unless a response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or scope["path"]  # FastAPI names API routes only
            route = route if route in self.paths else UNMATCHED
            method = scope["method"] if scope["method"] in METHODS else "other"
            version = scope.get("state", {}).get("model_version") or self.model_version()
            self.metrics.observe_request(route, method, status, seconds)
            LOGGER.info(
                {
                    "event": "request",
                    "request_id": request_id,
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                    "model_version": version,
                }
            )
