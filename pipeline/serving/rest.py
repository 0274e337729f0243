"""``pneumo serve``: the REST service. GET /health, GET /model, POST /predict.

The service follows an alias (``@champion`` by default): a background thread checks where it points
every ``serve.poll_seconds`` and swaps in the new version once it is fully loaded, so requests never
see a half-loaded model. A failed reload keeps the old model and shows up in /health.

POST /predict takes the image as a multipart field ``file`` (``curl -F file=@xray.jpeg``) or as the
raw request body. Uploads over ``serve.max_upload_mb`` get 413, non-images 415, corrupt images 422.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from mlflow import MlflowClient
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from pipeline import __version__
from pipeline.core.errors import PipelineError
from pipeline.serving import classifier as clf
from pipeline.serving import image_io

MULTIPART_SLACK = 16 * 1024  # form boundaries and headers around the file


class ModelHolder:
    """The model in service, and the reloads that follow its alias."""

    def __init__(self, uri: str, loader: Callable[[str], clf.Classifier] = clf.load) -> None:
        self.uri, self._loader = uri, loader
        parsed = clf.parse_registry_uri(uri)
        self.alias = parsed[2] if parsed else None
        self.current = loader(uri)
        self.loaded_at = time.time()
        self.reloads = 0
        self.last_error: str | None = None
        self.last_check: float | None = None
        self._failed_version: str | None = None  # not retried until the alias moves again
        self._stop = threading.Event()

    def check(self) -> bool:
        """Reload when the alias points at another version; True if the model changed."""
        if self.alias is None:
            return False

        name = self.current.info.name
        version = None
        try:
            version = str(clf.resolve_version(MlflowClient(), name, None, self.alias).version)
            if version == self.current.info.version:
                self.last_error = self._failed_version = None
                return False
            if version == self._failed_version:
                return False
            fresh = self._loader(self.uri)
        except PipelineError as exc:
            self.last_error, self._failed_version = str(exc), version
            return False
        finally:
            self.last_check = time.time()
        self.current, self.loaded_at, self.last_error = fresh, time.time(), None  # one reference swap
        self.reloads += 1
        print(f"serve: {self.uri} moved to version {fresh.info.version}; reloaded", flush=True)
        return True

    def poll(self, seconds: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(seconds):
                try:
                    self.check()
                except Exception as exc:  # noqa: BLE001 - the poller must outlive any one bad check
                    self.last_error = f"reload failed: {type(exc).__name__}: {str(exc)[:160]}"

        thread = threading.Thread(target=loop, name="alias-poller", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def predict_bytes(model: clf.Classifier, data: bytes, filename: str) -> dict[str, Any]:
    image = image_io.load(data)
    x = image_io.model_input(image, model.info.image_size)
    pred = model.predict(x[None])[0]
    return {"file": filename, **pred.record(model.info, image.warnings)}


def create_app(holder: ModelHolder, max_bytes: int) -> FastAPI:
    app = FastAPI(title="pneumo", version=__version__, description=__doc__)
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

    @app.get("/model")
    def model() -> dict[str, Any]:
        return {
            **holder.current.info.public(),
            "follows": holder.uri,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(holder.loaded_at)),
            "reloads": holder.reloads,
        }

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise HTTPException(411, "send a Content-Length header with the upload")
        if int(length) > max_bytes + MULTIPART_SLACK:
            raise HTTPException(413, f"upload of {int(length):,} bytes is over the limit of {limit_mb:g} MB")
        filename = request.query_params.get("filename", "")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "no file: send the image as the multipart field 'file'")
            data, filename = await upload.read(), upload.filename or filename
        else:
            data = await request.body()
        if len(data) > max_bytes:
            raise HTTPException(413, f"image of {len(data):,} bytes is over the limit of {limit_mb:g} MB")
        try:
            return await run_in_threadpool(predict_bytes, holder.current, data, filename)
        except image_io.UnsupportedImage as exc:
            raise HTTPException(415, f"{filename or 'upload'}: {exc}") from None
        except image_io.ImageTooLarge as exc:
            raise HTTPException(413, f"{filename or 'upload'}: {exc}") from None
        except image_io.ImageError as exc:
            raise HTTPException(422, f"{filename or 'upload'}: {exc}") from None

    return app


def serve(uri: str, host: str, port: int, max_upload_mb: float, poll_seconds: float) -> None:
    holder = ModelHolder(uri)
    info = holder.current.info
    print(
        f"serve: {uri} = {info.name or info.uri} version {info.version} (threshold {info.threshold:.4f}) "
        f"on http://{host}:{port}" + (f"; following @{holder.alias} every {poll_seconds:g} s" if holder.alias else ""),
        flush=True,
    )
    if holder.alias:
        holder.poll(poll_seconds)
    app = create_app(holder, int(max_upload_mb * 1e6))
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=64, timeout_keep_alive=30)
    finally:
        holder.stop()
