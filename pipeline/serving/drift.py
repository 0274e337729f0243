"""Drift of incoming images against the training data: image statistics and embedding statistics.

The register stage stores a reference sample of training images' features in the serving bundle:
intensity statistics of the model input, the original width/height/aspect, and the first principal
components of the model's pooled features. A batch is compared feature by feature with a two-sample
Kolmogorov-Smirnov test. The score is the largest KS distance; the verdict needs both significance
(Bonferroni over features, so a small batch is not flagged by noise) and a large enough distance
(so a huge batch is not flagged for a trivial shift). ``check`` runs this on image files
(``pneumo drift PATH...``): do these images look like the ones the model was trained on?
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import ks_2samp

from pipeline.core.errors import PipelineError
from pipeline.serving import ood
from pipeline.serving.classifier import Classifier
from pipeline.serving.predict import expand, prepared_batches

IMAGE_FEATURES = ("mean", "std", "p05", "p95", "width", "height", "aspect")
COMPONENTS = 5
DRIFT_P, WARN_P = 0.01, 0.05  # family-wise significance
DRIFT_DISTANCE, WARN_DISTANCE = 0.25, 0.15
MIN_BATCH = 20


def image_features(model_input: np.ndarray, width: int, height: int) -> dict[str, float]:
    x = model_input.ravel()
    p05, p95 = np.percentile(x, [5, 95])
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "p05": float(p05),
        "p95": float(p95),
        "width": float(width),
        "height": float(height),
        "aspect": float(width / height),
    }


def build_reference(features: list[dict[str, float]], embeddings: np.ndarray) -> dict[str, object]:
    """The training-side sample: feature values and the PCA of the embeddings (JSON-ready)."""
    emb = np.asarray(embeddings, np.float64)
    mean = emb.mean(axis=0)
    _, _, vt = np.linalg.svd(emb - mean, full_matrices=False)
    components = vt[: min(COMPONENTS, len(vt))]
    projected = (emb - mean) @ components.T
    samples = {name: [round(f[name], 4) for f in features] for name in IMAGE_FEATURES}
    for i in range(components.shape[0]):
        samples[f"embedding_pc{i + 1}"] = [round(float(v), 5) for v in projected[:, i]]
    return {
        "n": len(features),
        "samples": samples,
        "pca_mean": mean.round(6).tolist(),
        "pca_components": components.round(6).tolist(),
    }


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    ks_distance: float
    p_value: float
    reference_median: float
    batch_median: float


@dataclass(frozen=True)
class DriftReport:
    score: float
    verdict: str  # ok | warn | drift | too_few
    n_images: int
    n_reference: int
    features: list[FeatureDrift]

    def summary(self) -> str:
        lines = [
            f"drift: {self.verdict.upper()} (score {self.score:.3f} = largest KS distance; "
            f"{self.n_images} images vs {self.n_reference} training images)"
        ]
        if self.verdict == "too_few":
            lines.append(f"  a verdict needs at least {MIN_BATCH} images")
        for f in sorted(self.features, key=lambda f: -f.ks_distance)[:5]:
            lines.append(
                f"  {f.feature:<16} KS {f.ks_distance:.3f}  p {f.p_value:.2g}  "
                f"median {f.reference_median:.4g} (train) vs {f.batch_median:.4g} (batch)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def compare(reference: dict[str, object], features: list[dict[str, float]], embeddings: np.ndarray) -> DriftReport:
    samples: dict[str, list[float]] = reference["samples"]  # type: ignore[assignment]
    batch: dict[str, np.ndarray] = {name: np.array([f[name] for f in features]) for name in IMAGE_FEATURES}
    mean = np.asarray(reference["pca_mean"])
    components = np.asarray(reference["pca_components"])
    projected = (np.asarray(embeddings, np.float64) - mean) @ components.T
    for i in range(components.shape[0]):
        batch[f"embedding_pc{i + 1}"] = projected[:, i]
    rows = []
    for name, values in batch.items():
        ref = np.asarray(samples[name])
        result = ks_2samp(ref, values)
        rows.append(
            FeatureDrift(
                name, float(result.statistic), float(result.pvalue), float(np.median(ref)), float(np.median(values))
            )
        )
    k = len(rows)
    score = max(r.ks_distance for r in rows)
    if len(features) < MIN_BATCH:
        verdict = "too_few"
    elif any(r.p_value < DRIFT_P / k and r.ks_distance >= DRIFT_DISTANCE for r in rows):
        verdict = "drift"
    elif any(r.p_value < WARN_P / k and r.ks_distance >= WARN_DISTANCE for r in rows):
        verdict = "warn"
    else:
        verdict = "ok"
    return DriftReport(score, verdict, len(features), int(reference["n"]), rows)  # type: ignore[arg-type]


def batch_features(
    classifier: Classifier, files: list[str], batch_size: int = 32
) -> tuple[list[dict[str, float]], np.ndarray, np.ndarray, list[str]]:
    """Image features, embeddings and layouts (``ood.thumbnails``) of the readable files, and the unreadable
    ones (path: reason)."""
    features, embeddings, layouts, skipped = [], [], [], []
    for batch in prepared_batches(files, classifier.info.image_size, batch_size, workers=4):
        ok = [item for item in batch if item.x is not None and item.image is not None]
        skipped += [f"{item.file}: {item.error}" for item in batch if item.error]
        if ok:
            inputs = np.stack([item.x for item in ok])
            embeddings.append(classifier.embed(inputs))
            layouts.append(ood.thumbnails(inputs))
            features += [image_features(i.x, i.image.width, i.image.height) for i in ok]  # type: ignore[union-attr]
    if not embeddings:
        return features, np.zeros((0, 0)), np.zeros((0, 0)), skipped
    return features, np.concatenate(embeddings), np.concatenate(layouts), skipped


def check(classifier: Classifier, inputs: list[str], batch_size: int = 32) -> tuple[DriftReport, list[str]]:
    """The drift report for the readable images under `inputs`, and the unreadable ones (path: reason)."""
    if classifier.drift_reference is None:
        raise PipelineError(f"{classifier.info.uri}: the model has no drift reference (register it again)")
    files, missing = expand(inputs)
    features, embeddings, _, skipped = batch_features(classifier, files, batch_size)
    if not features:
        raise PipelineError(f"drift: no readable images in {' '.join(inputs)}")
    return compare(classifier.drift_reference, features, embeddings), [f"{i}: {why}" for i, why in missing] + skipped
