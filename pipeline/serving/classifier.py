"""A registered model, ready to predict: the Keras model plus what it needs to be used right.

The register stage packs a *serving bundle* into the MLflow model: ``model.keras``, ``serving.json``
(threshold, classes, input size, Grad-CAM layer, test figures) and ``drift_reference.json``. Batch
prediction, the REST service and the MLflow pyfunc wrapper all load that bundle through here, so
they share one preprocessing path and one threshold.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.core.errors import PipelineError, TransientError, registry_says_missing
from pipeline.modeling import (
    models,  # noqa: F401 - registers the custom layer for loading
    tta,
)
from pipeline.modeling.metrics import apply_temperature, class_probabilities, served_classes
from pipeline.serving import ood
from pipeline.serving.gradcam import Explainer

SERVING_FILE = "serving.json"
DRIFT_FILE = "drift_reference.json"
MODEL_FILE = "model.keras"
BUNDLE_ARTIFACT = "bundle"  # the pyfunc artifact key (and folder name under artifacts/)
DEFAULT_URI = "models:/{name}@champion"


class NotABundle(PipelineError):
    """The folder or model holds no serving bundle (a model registered before bundles, or another flavour)."""


@dataclass(frozen=True)
class ModelInfo:
    threshold: float
    class_names: tuple[str, ...]
    image_size: int
    task: str
    architecture: str
    last_conv_layer: str
    metrics: dict[str, float] = field(default_factory=dict)
    ci95: dict[str, list[float]] = field(default_factory=dict)
    target_sensitivity: float | None = None
    temperature: float = 1.0  # calibration fitted on val (metrics.apply_temperature), applied to every prediction
    calibration_bias: float = 0.0
    tta_shift: float = 0.0  # test-time augmentation views (tta.Views), averaged for every prediction
    tta_zoom: float = 0.0
    source_prior: float | None = None  # the pneumonia fraction the calibration was fitted on (prior_shift.py)
    ood_threshold: float | None = None  # out-of-distribution score above which no label is given (ood.py)
    ood_warning: float | None = None  # ... above which the label comes with a warning
    data_version: str = "unknown"
    run_id: str = ""
    name: str = ""
    version: str | None = None
    alias: str | None = None
    uri: str = ""

    def public(self) -> dict[str, Any]:
        """As JSON can carry it: an undefined figure (NaN, e.g. specificity of a test set without NORMAL) is null."""
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


OOD_CAP = 999.0  # the score reported for a constant image (JSON has no infinity)


@dataclass(frozen=True)
class Prediction:
    probability: float  # P(pneumonia)
    label: str | None  # None when refused
    class_probabilities: dict[str, float]
    ood_score: float | None = None  # None: the bundle has no out-of-distribution reference
    refused: str | None = None  # why no label was given
    flagged: str | None = None  # a label given, but the image is unusual for the training data
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)  # pooled features, for drift

    def record(self, info: ModelInfo, warnings: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """The one output format of a prediction: CLI rows, the REST body and the pyfunc frame all start here."""
        return {
            "probability": round(self.probability, 6),
            "label": self.label,
            "refused": self.refused,
            "ood_score": None if self.ood_score is None else round(min(self.ood_score, OOD_CAP), 3),
            "threshold": round(info.threshold, 6),
            "class_probabilities": {k: round(v, 6) for k, v in self.class_probabilities.items()},
            "model": info.name or info.uri,
            "model_version": info.version or "",
            "warnings": [*warnings, *([self.flagged] if self.flagged else [])],
        }

    @property
    def status(self) -> str:
        """A row's status: ``ok`` (labelled) or ``refused`` (out of distribution); ``error_record`` has the third."""
        return "refused" if self.refused else "ok"

    def row(self, info: ModelInfo, warnings: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """The record as one flat row (`pneumo predict`'s CSV, the pyfunc's frame): warnings joined, a probability
        column per class where there are more than two, the status and an empty error."""
        record = self.record(info, warnings)
        probabilities = record.pop("class_probabilities")
        per_class = dict(
            zip(class_columns(info.class_names), (probabilities[n] for n in info.class_names), strict=False)
        )
        return {**record, "warnings": "; ".join(record["warnings"]), **per_class, "status": self.status, "error": ""}


def class_columns(class_names: tuple[str, ...] | list[str]) -> list[str]:
    """A flat row's per-class probability columns (``p_<class>``): only for a model of more than two classes."""
    return [f"p_{name}" for name in class_names] if len(class_names) > 2 else []


def error_record(info: ModelInfo, error: str) -> dict[str, Any]:
    """The record of an input that could not be predicted: the model's fields, no label, the reason."""
    return {
        "probability": None,
        "label": None,
        "refused": None,
        "ood_score": None,
        "threshold": round(info.threshold, 6),
        "model": info.name or info.uri,
        "model_version": info.version or "",
        "warnings": "",
        "status": "error",
        "error": error,
    }


class Classifier:
    """The Keras model with its threshold; inference is one compiled function, safe across threads."""

    def __init__(self, model: Any, info: ModelInfo, drift_reference: dict[str, Any] | None = None) -> None:
        self.model, self.info, self.drift_reference = model, info, drift_reference
        self.ood_reference = (drift_reference or {}).get("ood")
        size = info.image_size
        spec = tf.TensorSpec([None, size, size, 1], tf.float32)
        both = keras.Model(model.input, [model.output, model.get_layer("gap").output])  # one pass, two outputs
        views = self.views

        def infer(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            """Outputs averaged over the views; features (drift, OOD) of the image as given."""
            out, features = both(x, training=False)
            return tta.averaged(lambda v: model(v, training=False), x, out, views), features

        self._infer = tf.function(infer, input_signature=[spec])
        self._explainer: Any = None

    @property
    def views(self) -> tta.Views:
        return tta.Views(self.info.tta_shift, self.info.tta_zoom)

    @classmethod
    def from_bundle(cls, folder: str | Path, **registry: Any) -> Classifier:
        folder = Path(folder)
        if (folder / "artifacts" / BUNDLE_ARTIFACT).is_dir():  # an MLflow pyfunc model folder
            folder = folder / "artifacts" / BUNDLE_ARTIFACT
        serving = folder / SERVING_FILE
        if not serving.is_file():
            raise NotABundle(f"{folder}: no {SERVING_FILE}: not a serving bundle written by `pneumo register`")

        info = read_info(serving, registry)
        try:
            model = keras.saving.load_model(folder / MODEL_FILE, compile=False)
        except Exception as exc:  # noqa: BLE001
            raise PipelineError(f"{folder / MODEL_FILE}: cannot load the model ({one_line(exc)})") from None
        return cls(model, info, read_reference(folder, info))

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, size, size, 1) float32 in [0, 255] -> calibrated probabilities (n, classes), features (n, d)."""
        if len(batch) == 0:
            return np.zeros((0, len(self.info.class_names))), np.zeros((0, 0))
        out, features = self._infer(np.asarray(batch, np.float32))
        probs = apply_temperature(np.asarray(out, np.float64), self.info.temperature, self.info.calibration_bias)
        return class_probabilities(probs), np.asarray(features)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(batch)[0]

    def ood_scores(self, batch: np.ndarray, features: np.ndarray | None = None) -> np.ndarray | None:
        """Out-of-distribution scores (ood.py), or None when the bundle has no reference."""
        if self.ood_reference is None:
            return None
        if features is None:
            features = self.embed(batch)
        return ood.scores(self.ood_reference, features, batch)

    def label(self, probs: np.ndarray) -> str:
        return self.info.class_names[int(served_classes(np.asarray(probs)[None, :], self.info.threshold)[0])]

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        """A label per image at the threshold, or a refusal when the image is out of distribution."""
        probs, features = self._forward(batch)
        names, limit, warn = self.info.class_names, self.info.ood_threshold, self.info.ood_warning
        scores = self.ood_scores(batch, features)
        out = []
        for i, p in enumerate(probs):
            score = None if scores is None else float(scores[i])
            refused = ood.reason(score, limit) if score is not None and limit is not None and score > limit else None
            flagged = ood.warning(score) if score is not None and warn is not None and score > warn else None
            by_class = {n: float(v) for n, v in zip(names, p, strict=True)}
            label = None if refused else self.label(p)
            flagged = None if refused else flagged
            out.append(Prediction(1.0 - float(p[0]), label, by_class, score, refused, flagged, features[i]))
        return out

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Pooled features (the `gap` layer), for drift and out-of-distribution statistics."""
        return self._forward(batch)[1]

    def heatmap(self, image: np.ndarray, label: str | None = None) -> np.ndarray:
        """Grad-CAM of one (size, size, 1) input for the class `label` (the one served for it; None: the most
        likely), with the explainer built once per model. A one-output model explains its pneumonia logit."""
        if self._explainer is None:
            self._explainer = Explainer(self.model, self.info.last_conv_layer)
        names = self.info.class_names
        return self._explainer(image, names.index(label) if len(names) > 2 and label in names else None)


def one_line(exc: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, for an error raised from inside a library."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit]}" if text else type(exc).__name__


def read_info(serving: Path, registry: dict[str, Any]) -> ModelInfo:
    """The bundle's serving.json as ModelInfo (registry facts over it); one line naming the file if it is not
    JSON or does not fit this pipeline's ModelInfo (a bundle from a newer pipeline, a key missing)."""
    try:
        raw = json.loads(serving.read_text())
        raw["class_names"] = tuple(raw["class_names"])
        return ModelInfo(**{**raw, **{k: v for k, v in registry.items() if v is not None}})
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
        raise PipelineError(f"{serving}: invalid {SERVING_FILE} ({one_line(exc)})") from None


def read_reference(folder: Path, info: ModelInfo) -> dict[str, Any] | None:
    """The bundle's drift and out-of-distribution reference; one line naming the file if it is not JSON, or if
    serving.json sets an OOD threshold it lacks (else every blank page or photo would get a label, unsaid)."""
    drift = folder / DRIFT_FILE
    try:
        reference = json.loads(drift.read_text()) if drift.is_file() else None
    except ValueError as exc:  # JSONDecodeError, or text that is not UTF-8
        raise PipelineError(f"{drift}: invalid {DRIFT_FILE} ({one_line(exc)})") from None
    if reference is not None and not isinstance(reference, dict):
        raise PipelineError(f"{drift}: invalid {DRIFT_FILE} (not a JSON object)")
    if info.ood_threshold is not None and not (reference or {}).get("ood"):
        raise PipelineError(
            f"{drift}: {SERVING_FILE} sets ood_threshold {info.ood_threshold} but there is no 'ood' reference here"
        )
    return reference


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """models:/name@alias or models:/name/version -> (name, version, alias); None for anything else."""
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return None
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if not name or not alias:
            raise PipelineError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return name, None, alias
    name, _, version = rest.rpartition("/")
    return (name, version, None) if name and version.isdigit() else None


def resolve_version(client: Any, name: str, version: str | None, alias: str | None) -> Any:
    """The model version object an alias or number names; one-line errors."""
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        text, uri = str(exc), f"models:/{name}{'@' + alias if alias else '/' + str(version)}"
        if registry_says_missing(exc):
            what = f"@{alias}" if alias else f"version {version}"
            raise PipelineError(
                f"{uri}: no {what} in the registry "
                "(register one with `dvc repro` or promote a version in the MLflow UI)"
            ) from None
        if exc.error_code == "INVALID_PARAMETER_VALUE":  # a name or alias the registry cannot take: no retry helps
            raise PipelineError(f"{uri}: {text.splitlines()[0][:160]}") from None
        raise TransientError(f"MLflow registry unreachable: {text.splitlines()[0][:160]}") from None
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        raise TransientError(f"MLflow registry unreachable ({type(exc).__name__}: {str(exc)[:160]})") from None


def download_error(uri: str, exc: Exception) -> PipelineError:
    """A failed download as the caller should take it: an artifact that is not there is permanent, anything else
    (a connection dropped, the store timing out or failing) transient, so a flow retries it and a service tries
    again at its next poll instead of giving up on the version."""
    text = f"{uri}: cannot download the model ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
    missing = isinstance(exc, MlflowException) and exc.error_code in (
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_PARAMETER_VALUE",
    )
    if missing or isinstance(exc, FileNotFoundError | NotADirectoryError | PermissionError):
        return PipelineError(text)
    return TransientError(text)


def load(uri: str, tracking_uri: str | None = None, *, version: str | None = None) -> Classifier:
    """Load a registered model (models:/name@alias, models:/name/N), any MLflow model URI, or a folder.

    `version` pins models:/name@alias to the version the caller already resolved (the alias may have moved since).
    """
    if Path(uri).is_dir():
        return Classifier.from_bundle(uri, uri=uri)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    registry: dict[str, Any] = {"uri": uri}
    source = uri
    parsed = parse_registry_uri(uri)
    if parsed:
        name, number, alias = parsed
        mv = resolve_version(MlflowClient(), name, version or number, None if version else alias)
        registry.update(name=name, version=str(mv.version), alias=alias)
        source = f"models:/{name}/{mv.version}"  # pinned: an alias moving mid-download cannot mix versions
    elif len(urlparse(uri).scheme) <= 1:  # a path (or a Windows drive letter), not a URI: no download to try
        raise PipelineError(f"{uri}: no such model folder")
    tmp = Path(tempfile.mkdtemp(prefix="pneumo-model-"))
    try:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp))
        except Exception as exc:  # noqa: BLE001 - the store's client raises many types
            raise download_error(uri, exc) from None
        try:
            return Classifier.from_bundle(local, **registry)
        except PipelineError as exc:  # the same kind, named by the URI rather than the temporary folder
            at = f" (version {registry['version']})" if registry.get("version") else ""
            raise type(exc)(f"{uri}{at}: {str(exc).split(': ', 1)[-1]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
