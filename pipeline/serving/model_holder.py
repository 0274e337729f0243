"""The model in service, and the reloads that follow its alias without ever mixing two versions.

A background thread checks where the alias points every ``serve.poll_seconds``. A new version is loaded
pinned to the number just resolved (``classifier.load(version=...)``), warmed up with one prediction, and
only then swapped in by one reference assignment: a request runs on the version it started with. A version
that fails to load, for any reason, keeps the old model in service, shows in /health, and is not tried again
(nor downloaded again) until the alias moves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
from mlflow import MlflowClient

from pipeline.core.errors import PipelineError, TransientError
from pipeline.serving import classifier as clf


class Loader(Protocol):
    def __call__(self, uri: str, *, version: str | None = None) -> clf.Classifier: ...


def ready(model: clf.Classifier) -> clf.Classifier:
    """One prediction on a blank input: traces the graph now and proves the version can answer at all."""
    size = model.info.image_size
    model.predict(np.zeros((1, size, size, 1), np.float32))
    return model


class ModelHolder:
    """The model in service, and the reloads that follow its alias."""

    def __init__(
        self, uri: str, loader: Loader = clf.load, on_event: Callable[..., None] = lambda event, **fields: None
    ) -> None:
        self.uri, self._loader, self._on_event = uri, loader, on_event
        parsed = clf.parse_registry_uri(uri)
        self.alias = parsed[2] if parsed else None
        try:
            self.current = ready(loader(uri))
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken bundle raises many types; the CLI prints one line
            raise PipelineError(f"{uri}: cannot load the model ({clf.one_line(exc)})") from None
        self.loaded_at = time.time()
        self.reloads = 0
        self.last_error: str | None = None
        self.last_check: float | None = None
        self._failed_version: str | None = None  # not retried until the alias moves again
        self._failed_error: str | None = None  # why, said again while the alias stays there
        self._stop = threading.Event()

    def check(self) -> bool:
        """Reload when the alias points at another version; True if the model changed."""
        if self.alias is None:
            return False
        self.last_check = time.time()
        name = self.current.info.name
        try:
            version = str(clf.resolve_version(MlflowClient(), name, None, self.alias).version)
        except PipelineError as exc:  # registry unreachable or alias removed: keep serving, say so
            self.last_error = str(exc)
            return False
        if version == self.current.info.version:
            self.last_error = self._failed_version = None
            return False
        if version == self._failed_version:  # not the error of a poll in between (the registry was down)
            self.last_error = self._failed_error
            return False
        try:
            fresh = ready(self._loader(self.uri, version=version))
        except TransientError as exc:  # the registry or artifact store was unreachable: try again next poll
            self.last_error = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - any failure: keep the old model, skip this version
            if isinstance(exc, PipelineError):
                self.last_error = str(exc)
            else:
                self.last_error = f"{self.uri} (version {version}): cannot load the model ({clf.one_line(exc)})"
            self._failed_version, self._failed_error = version, self.last_error
            self._on_event("model_load_failed", version=version, error=self.last_error)
            return False
        self.current, self.loaded_at = fresh, time.time()  # one reference swap
        self.last_error = self._failed_version = None
        self.reloads += 1
        self._on_event("model_swapped", follows=self.uri, version=fresh.info.version)
        return True

    def poll(self, seconds: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(seconds):
                try:
                    self.check()
                except Exception as exc:  # noqa: BLE001 - the poller must outlive any one bad check
                    self.last_error = f"reload failed: {clf.one_line(exc)}"

        thread = threading.Thread(target=loop, name="alias-poller", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
