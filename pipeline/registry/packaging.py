"""Packing an evaluated model for serving: the bundle, its drift reference, Grad-CAM examples, the pyfunc.

Called by the register stage, because only after evaluation is the threshold known.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.atomic import write_bytes
from pipeline.core.config import Params
from pipeline.core.errors import PipelineError
from pipeline.data.dataset_index import read_index
from pipeline.modeling import model_store
from pipeline.modeling.evaluation import Evaluation
from pipeline.modeling.metrics import BinaryMetrics
from pipeline.registry import tracking
from pipeline.serving import drift, image_io, ood, pyfunc_entry
from pipeline.serving.classifier import (
    BUNDLE_ARTIFACT,
    DRIFT_FILE,
    MODEL_FILE,
    OOD_CAP,
    SERVING_FILE,
    Classifier,
    ModelInfo,
)
from pipeline.serving.predict import explain, prepare, prepared_batches
from pipeline.serving.pyfunc_model import example_input, signature


def model_info(
    metadata: dict[str, Any],
    ev: Evaluation,
    run_id: str,
    name: str,
    ood_threshold: float | None = None,
    ood_warning: float | None = None,
) -> ModelInfo:
    return ModelInfo(
        threshold=float(ev.threshold),
        class_names=tuple(metadata["class_names"]),
        image_size=int(metadata["input"]["shape"][0]),
        task=metadata["task"],
        architecture=metadata["architecture"],
        last_conv_layer=metadata["last_conv_layer"],
        metrics={k: float(v) for k, v in ev.test.flat().items()},
        ci95={k: [float(lo), float(hi)] for k, (lo, hi) in ev.ci95.items()},
        target_sensitivity=float(ev.target_sensitivity),
        temperature=float(ev.temperature),
        calibration_bias=float(ev.calibration_bias),
        tta_shift=ev.views.shift,
        tta_zoom=ev.views.zoom,
        # The class balance calibrated probabilities carry; raw outputs of a class-weighted model carry none.
        source_prior=positive_fraction(ev.val) if ev.calibration else None,
        ood_threshold=ood_threshold,
        ood_warning=ood_warning,
        data_version=str(metadata.get("data_version", "unknown")),
        run_id=run_id,
        name=name,
    )


def positive_fraction(m: BinaryMetrics) -> float:
    """The pneumonia fraction of a scored set, from its confusion matrix."""
    (tn, fp), (fn, tp) = m.confusion
    return float((fn + tp) / max(tn + fp + fn + tp, 1))


def reference_sample(index: pd.DataFrame, root: str, n: int, seed: int) -> list[str]:
    train = index[(index["split"] == "train") & index["decodable"]].sort_values("path")
    if len(train) > n:
        train = train.sample(n=n, random_state=seed).sort_values("path")
    return [str(Path(root) / p) for p in train["path"]]


def drift_reference(classifier: Classifier, files: list[str], batch_size: int = 64) -> dict[str, Any]:
    features, embeddings, layouts, _ = drift.batch_features(classifier, files, batch_size)
    if len(features) < 10:
        raise PipelineError("drift reference: fewer than ten readable training images")
    return {**drift.build_reference(features, embeddings), "ood": ood.build(embeddings, layouts)}


def ood_validation(classifier: Classifier, test_files: list[str], batch_size: int = 64) -> dict[str, Any]:
    """The out-of-distribution score on the test split (every image should pass) and on synthetic probes
    that are not chest X-rays (every one should be refused), both read as served."""
    scores = []
    for batch in prepared_batches(test_files, classifier.info.image_size, batch_size, workers=4):
        ok = [item.x for item in batch if item.x is not None]
        if ok:
            scores += [float(v) for v in classifier.ood_scores(np.stack(ok))]  # type: ignore[union-attr]
    probes = {}
    for name, pixels in ood.probe_images().items():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        x = image_io.model_input(image_io.load(buffer.getvalue()), classifier.info.image_size)
        probes[name] = float(classifier.ood_scores(x[None])[0])  # type: ignore[index]
    limit, warn = classifier.info.ood_threshold, classifier.info.ood_warning
    test = np.array(scores)
    return {
        "threshold": limit,
        "warning": warn,
        "test_flagged": int((test > warn).sum()) if warn is not None else 0,
        "test_images": len(test),
        "test_max": float(test.max()) if len(test) else float("nan"),
        "test_p99": float(np.quantile(test, 0.99)) if len(test) else float("nan"),
        "test_refused": int((test > limit).sum()) if limit is not None else 0,
        "probes": {k: min(v, OOD_CAP) for k, v in probes.items()},
        "probes_refused": sum(v > limit for v in probes.values()) if limit is not None else 0,
        "probes_flagged": sum(v > warn for v in probes.values()) if warn is not None else 0,
    }


def pick_examples(predictions_csv: str | Path, threshold: float, per_kind: int = 1) -> list[tuple[str, str]]:
    """Test images worth explaining: confident hits, and the errors that matter (missed pneumonia first)."""
    df = pd.read_csv(predictions_csv)
    sick = df["label"] != "NORMAL"
    flagged = df["pneumonia_score"] >= threshold
    kinds = [
        ("missed pneumonia (false negative)", df[sick & ~flagged].sort_values("pneumonia_score")),
        ("pneumonia found (true positive)", df[sick & flagged].sort_values("pneumonia_score", ascending=False)),
        ("normal cleared (true negative)", df[~sick & ~flagged].sort_values("pneumonia_score")),
        ("false alarm (false positive)", df[~sick & flagged].sort_values("pneumonia_score", ascending=False)),
    ]
    return [(str(path), kind) for kind, rows in kinds for path in rows["path"].head(per_kind)]


def gradcam_examples(classifier: Classifier, picks: list[tuple[str, str]], out_dir: Path) -> list[tuple[str, str]]:
    """Write one Grad-CAM figure per pick into out_dir; returns (file name, caption)."""
    written = []
    for i, (path, kind) in enumerate(picks):
        item = prepare(path, classifier.info.image_size, display=True)
        if item.x is None:
            continue
        pred = classifier.predict(item.x[None])[0]
        caption = f"{kind}: {Path(path).name}, P(pneumonia) {pred.probability:.3f}"
        name = f"gradcam_{i + 1}.png"
        write_bytes(out_dir / name, explain(classifier, item, caption, pred.label))
        written.append((name, caption))
    return written


def write_bundle(dest: Path, model_file: Path, info: ModelInfo, reference: dict[str, Any] | None = None) -> None:
    """A serving bundle folder: model.keras, serving.json and (if given) drift_reference.json."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_file, dest / MODEL_FILE)
    serving = {k: v for k, v in asdict(info).items() if k not in ("version", "alias", "uri")}
    (dest / SERVING_FILE).write_text(json.dumps(serving, indent=2) + "\n")
    if reference is not None:
        (dest / DRIFT_FILE).write_text(json.dumps(reference) + "\n")


def build_bundle(params: Params, ev: Evaluation, run_id: str, dest: Path) -> tuple[Classifier, dict[str, Any]]:
    """Write the bundle of the trained model into dest, with its drift reference; returns the classifier."""
    model, metadata = model_store.load(params.train.model_dir)
    source = f"{params.train.model_dir}/{model_store.METADATA_FILE}"
    tracking.require_same_run(run_id, str(metadata.get("mlflow_run_id", "")), source, params.mlflow.run_file)
    pp = params.package
    try:
        info = model_info(metadata, ev, run_id, params.registry.model_name, pp.ood_threshold, pp.ood_warning)
    except (KeyError, IndexError, TypeError) as exc:  # a metadata file of another pipeline version, or edited
        raise PipelineError(f"{source}: lacks {exc} or holds it in another form; run the train stage again") from None
    files = reference_sample(read_index(params.index.path), params.data.root, params.package.reference_images, 0)
    classifier = Classifier(model, info, drift_reference(Classifier(model, info), files))
    write_bundle(dest, Path(params.train.model_dir) / model_store.MODEL_FILE, info, classifier.drift_reference)
    return classifier, metadata


# What loading and serving the pyfunc imports beyond MLflow (the pipeline code reads its config with
# ruamel.yaml, locks with filelock, retries with tenacity, shows progress with tqdm), and the pylibjpeg
# plugins pydicom decodes compressed DICOM with. Pinned to this environment; tests/test_registry.py checks
# the list against the imports of the serving code.
SERVING_DISTRIBUTIONS = (
    "tensorflow",
    "keras",
    "numpy",
    "pandas",
    "scipy",
    "pillow",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "ruamel.yaml",
    "filelock",
    "tenacity",
    "tqdm",
)


PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the pipeline package: the pyfunc's code_paths


def code_digest(root: Path = PACKAGE_ROOT) -> str:
    """A digest of the code the pyfunc bundles (every file of the package by path and content, caches aside)."""
    digest = hashlib.sha256()
    for path in sorted(f for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def pyfunc_requirements() -> list[str]:
    """The logged pyfunc's pip requirements, pinned to the versions installed here."""
    return [f"{name}=={metadata.version(name)}" for name in SERVING_DISTRIBUTIONS]


def log_pyfunc(bundle: Path, run_id: str, before: Any) -> str:
    """Log the bundle as an MLflow pyfunc model in the run; returns its model URI. The training run keeps its
    status and end time as they were `before` (its RunInfo, read once before any try: start_run ends the run anew,
    FINISHED now or FAILED if the logging fails, and a retry reading it again would take that for the truth)."""
    requirements = pyfunc_requirements()
    client = mlflow.MlflowClient()
    class_names = json.loads((bundle / SERVING_FILE).read_text())["class_names"]
    try:
        with mlflow.start_run(run_id=run_id):
            logged = mlflow.pyfunc.log_model(
                name="classifier",
                python_model=pyfunc_entry.__file__,  # models-from-code: no pickled object, no pickle warning
                artifacts={BUNDLE_ARTIFACT: str(bundle)},
                code_paths=[str(PACKAGE_ROOT)],  # the whole pipeline package (code_digest)
                signature=signature(class_names),
                input_example=example_input(),
                pip_requirements=requirements,
            )
    finally:
        if before.end_time:
            client.set_terminated(run_id, before.status, before.end_time)
        else:
            client.update_run(run_id, status=before.status)
    return logged.model_uri
