"""``pneumo drift PATH...``: do these images look like the ones the model was trained on?"""

from __future__ import annotations

import numpy as np

from pipeline import drift
from pipeline.classifier import Classifier
from pipeline.errors import PipelineError
from pipeline.predict_step import expand, prepared_batches


def batch_features(
    classifier: Classifier, files: list[str], batch_size: int = 32
) -> tuple[list[dict[str, float]], np.ndarray, list[str]]:
    """Image features and embeddings of the readable files, and the unreadable ones (path: reason)."""
    features, embeddings, skipped = [], [], []
    for batch in prepared_batches(files, classifier.info.image_size, batch_size, workers=4):
        ok = [item for item in batch if item.x is not None and item.image is not None]
        skipped += [f"{item.file}: {item.error}" for item in batch if item.error]
        if ok:
            embeddings.append(classifier.embed(np.stack([item.x for item in ok])))
            features += [drift.image_features(i.x, i.image.width, i.image.height) for i in ok]  # type: ignore[union-attr]
    return features, np.concatenate(embeddings) if embeddings else np.zeros((0, 0)), skipped


def check(classifier: Classifier, inputs: list[str], batch_size: int = 32) -> tuple[drift.DriftReport, list[str]]:
    """The drift report for the readable images under `inputs`, and the unreadable ones (path: reason)."""
    if classifier.drift_reference is None:
        raise PipelineError(f"{classifier.info.uri}: the model has no drift reference (register it again)")
    files, missing = expand(inputs)
    features, embeddings, skipped = batch_features(classifier, files, batch_size)
    if not features:
        raise PipelineError(f"drift: no readable images in {' '.join(inputs)}")
    return drift.compare(classifier.drift_reference, features, embeddings), [
        f"{i}: {why}" for i, why in missing
    ] + skipped
