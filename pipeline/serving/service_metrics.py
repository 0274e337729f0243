"""The service's Prometheus metrics (GET /metrics), in a registry of its own: never the process-global one.

Requests by route template, method and status, with latencies; the model in service; predicted probabilities
and out-of-distribution scores; decode failures by a fixed set of reasons; and the drift of the last
``serve.drift_window`` served images against the training sample in the serving bundle, computed at scrape
time the way ``pneumo drift`` does (``drift.image_features`` + pooled features, ``drift.compare``). The window
keeps a dozen numbers and the pooled features per image, never the image.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from pipeline.serving import drift
from pipeline.serving.classifier import OOD_CAP, Classifier, Prediction
from pipeline.serving.model_holder import ModelHolder

DECODE_FAILURES = ("unsupported", "too_large", "corrupt", "no_decoder")  # 415, 413, 422, 501: the only reasons
VERDICTS = ("ok", "warn", "drift", "too_few")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROBABILITY_BUCKETS = tuple(round(i / 20, 2) for i in range(1, 21))
OOD_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class InputDriftWindow:
    """The drift features of the last `size` images the current model answered."""

    def __init__(self, size: int, serving: Callable[[], Classifier]) -> None:
        self._rows: deque[tuple[dict[str, float], np.ndarray]] = deque(maxlen=size)
        self._serving = serving
        self._model: Classifier | None = None
        self._lock = threading.Lock()
        self.errors = 0

    def add(
        self, model: Classifier, x: np.ndarray, width: int, height: int, embedding: np.ndarray | None = None
    ) -> None:
        """`x`: the (size, size, 1) model input; width and height of the original image; `embedding`: its
        pooled features when the prediction already computed them."""
        if model is not self._serving() or model.drift_reference is None:  # a request begun before a swap
            return
        try:
            features = drift.image_features(x, width, height)
            embedding = model.embed(x[None])[0] if embedding is None else embedding
        except Exception:  # noqa: BLE001 - drift statistics must never fail a prediction; they count instead
            with self._lock:
                self.errors += 1
            return
        with self._lock:
            if model is not self._serving():  # swapped out while its features were computed: a straggler
                return
            if model is not self._model:  # another version: its pooled features live in another space
                self._rows.clear()
                self._model = model
            self._rows.append((features, embedding))

    def report(self) -> drift.DriftReport | None:
        with self._lock:
            model, rows = self._model, list(self._rows)
        if model is None or model.drift_reference is None or not rows:
            return None
        return drift.compare(model.drift_reference, [f for f, _ in rows], np.stack([e for _, e in rows]))

    def collect(self) -> Iterator[Metric]:
        report = self.report()
        n = report.n_images if report else 0
        yield CounterMetricFamily(
            "pneumo_input_drift_errors", "served images whose drift features could not be computed", value=self.errors
        )
        yield GaugeMetricFamily("pneumo_input_drift_window_images", "served images in the drift window", value=n)
        if report is None:
            return
        yield GaugeMetricFamily(
            "pneumo_input_drift_score", "largest KS distance of the window from the training sample", value=report.score
        )
        ks = GaugeMetricFamily("pneumo_input_drift_ks_distance", "KS distance per drift feature", labels=["feature"])
        for f in report.features:
            ks.add_metric([f.feature], f.ks_distance)
        yield ks
        yield StateSetMetricFamily(
            "pneumo_input_drift_verdict",
            "the verdict of pneumo drift on the window (too_few under 20 images)",
            value={v: v == report.verdict for v in VERDICTS},
        )


class _ServiceState(Collector):
    """Read at scrape time: the model in service and the drift window."""

    def __init__(self, holder: ModelHolder, window: InputDriftWindow | None) -> None:
        self.holder, self.window = holder, window

    def collect(self) -> Iterator[Metric]:
        holder = self.holder
        info = holder.current.info
        labels = {"name": info.name or info.uri, "version": info.version or "", "alias": info.alias or ""}
        yield InfoMetricFamily("pneumo_model", "the model in service", value=labels)
        yield CounterMetricFamily("pneumo_model_reloads", "alias moves followed", value=holder.reloads)
        yield GaugeMetricFamily(
            "pneumo_model_degraded", "1 while the last alias check or reload failed (/health says why)",
            value=int(holder.last_error is not None),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "pneumo_model_loaded_timestamp_seconds", "when the model in service was loaded", value=holder.loaded_at
        )
        if self.window is not None:
            yield from self.window.collect()


class ServiceMetrics:
    def __init__(self, holder: ModelHolder, drift_window: int) -> None:
        self.registry = registry = CollectorRegistry()
        route = ["route", "method", "status"]
        self.requests = Counter("pneumo_http_requests", "HTTP requests answered", route, registry=registry)
        self.latency = Histogram(
            "pneumo_http_request_duration_seconds", "time to answer", route, buckets=LATENCY_BUCKETS, registry=registry
        )
        self.predictions = Counter(
            "pneumo_predictions", "answered predictions by outcome (a label, or refused)",
            ["model_version", "outcome"], registry=registry,
        )  # fmt: skip
        self.probability = Histogram(
            "pneumo_prediction_probability", "predicted P(pneumonia)", ["model_version"],
            buckets=PROBABILITY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ood_score = Histogram(
            "pneumo_prediction_ood_score", "out-of-distribution score (1.0: the training images' 99th percentile)",
            ["model_version"], buckets=OOD_BUCKETS, registry=registry,
        )  # fmt: skip
        self.decode_failures = Counter(
            "pneumo_decode_failures", "uploads that could not be decoded, by reason", ["reason"], registry=registry
        )
        for reason in DECODE_FAILURES:
            self.decode_failures.labels(reason)
        self.decodes_running = Gauge("pneumo_decodes_running", "images being decoded and predicted", registry=registry)
        self.decodes_waiting = Gauge("pneumo_decodes_waiting", "uploads waiting for a decode slot", registry=registry)
        self.window = InputDriftWindow(drift_window, lambda: holder.current) if drift_window else None
        registry.register(_ServiceState(holder, self.window))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)

    def observe_prediction(self, version: str | None, pred: Prediction) -> None:
        version = version or ""
        self.predictions.labels(version, pred.label or "refused").inc()
        self.probability.labels(version).observe(pred.probability)
        if pred.ood_score is not None:
            # capped as the answer caps it: one blank upload (score inf) would make the sum +Inf for good
            self.ood_score.labels(version).observe(min(pred.ood_score, OOD_CAP))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
