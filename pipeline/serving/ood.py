"""Is this a chest X-ray like the training images? An out-of-distribution score for every prediction.

Two Gaussian models of the training reference sample, each a Mahalanobis distance (in the
principal components, with floored variances, plus the residual off them): one of the model's
pooled features (the ``gap`` layer: what the network makes of the image), one of the image's layout
(the model input shrunk to 16 x 16 and standardized: where the lungs, the mediastinum and the
shoulders are). Each distance is divided by its 99th percentile over the training sample, and the
score is the larger: 1.0 is as unusual as the 1% most unusual training images; blank images,
photographs and scanned pages land far beyond. A constant image (no structure at all) is refused
outright.

The reference is fitted by the register stage on the drift reference sample and travels in the
serving bundle; the threshold is ``package.ood_threshold`` (in the same units), checked at
registration on the test split and on synthetic probes (``probe_images``) and reported in the card.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COMPONENTS = 128
QUANTILE = 0.99
VARIANCE_FLOOR = 1e-4  # of the largest component's variance
BLANK_STD = 2.0  # grey levels of the model input: an X-ray has structure, a blank does not
BLANK_REASON = "a blank or constant image, not an X-ray"
THUMBNAIL = 16  # the appearance space: the model input shrunk to 16 x 16, standardized


def fit_space(x: np.ndarray) -> dict[str, Any]:
    """A Gaussian model of one feature space (JSON-ready): the principal components with their variances
    (floored, so a direction the sample barely spans cannot dominate), the mean squared residual off them,
    and the 99th percentile of the resulting distance over the sample."""
    x = np.asarray(x, np.float64)
    if len(x) < 10:
        raise ValueError(f"an out-of-distribution reference needs at least 10 images, got {len(x)}")
    mean = x.mean(axis=0)
    centred = x - mean
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    k = max(1, min(COMPONENTS, int((singular > singular[0] * 1e-6).sum()), len(x) // 4))
    variances = singular[:k] ** 2 / (len(x) - 1)
    space: dict[str, Any] = {
        "mean": mean.tolist(),
        "components": vt[:k].tolist(),
        "variances": np.maximum(variances, variances[0] * VARIANCE_FLOOR).tolist(),
        "residual": 1.0,
        "scale": 1.0,
    }
    projected = centred @ vt[:k].T
    residual = ((centred - projected @ vt[:k]) ** 2).sum(axis=1)
    space["residual"] = max(float(residual.mean()), 1e-12)
    space["scale"] = max(float(np.quantile(distances(space, x), QUANTILE)), 1e-12)
    return space


def distances(space: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """Mahalanobis distance in the components, with the residual off them as one more standardized term."""
    centred = np.asarray(x, np.float64) - np.asarray(space["mean"])
    components = np.asarray(space["components"])
    projected = centred @ components.T
    mahalanobis = (projected**2 / np.asarray(space["variances"])).sum(axis=1)
    residual = ((centred - projected @ components) ** 2).sum(axis=1) / space["residual"]
    return np.sqrt((mahalanobis + residual) / (len(components) + 1))


def thumbnails(model_inputs: np.ndarray) -> np.ndarray:
    """(n, s, s, 1) model inputs -> (n, 256) standardized 16 x 16 thumbnails: the layout of the image."""
    out = []
    for x in np.asarray(model_inputs, np.float32):
        small = np.asarray(Image.fromarray(x[..., 0]).resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX))
        small = small.astype(np.float64).ravel()
        out.append((small - small.mean()) / max(small.std(), 1e-6))
    return np.array(out).reshape(len(out), THUMBNAIL * THUMBNAIL)


def build(embeddings: np.ndarray, layouts: np.ndarray) -> dict[str, Any]:
    """The reference from the training sample: the model's pooled features and the images' layouts
    (``thumbnails`` of the model inputs)."""
    return {
        "n": len(embeddings),
        "quantile": QUANTILE,
        "features": fit_space(embeddings),
        "appearance": fit_space(layouts),
    }


def scores(ref: dict[str, Any], emb: np.ndarray, model_inputs: np.ndarray) -> np.ndarray:
    """One score per image, the larger of the two spaces' distances in units of their training 99th
    percentile; constant images get inf."""
    feature = distances(ref["features"], emb) / ref["features"]["scale"]
    layout = distances(ref["appearance"], thumbnails(model_inputs)) / ref["appearance"]["scale"]
    blank = np.asarray(model_inputs).reshape(len(feature), -1).std(axis=1) < BLANK_STD
    return np.where(blank, np.inf, np.maximum(feature, layout))


def reason(score: float, threshold: float) -> str:
    if np.isinf(score):
        return BLANK_REASON
    return (
        f"does not look like the chest X-rays the model was trained on (out-of-distribution score {score:.2f} "
        f"> {threshold:.2f}); no label given"
    )


def warning(score: float) -> str:
    return f"unusual for the training images (out-of-distribution score {score:.2f}): check the image"


def probe_images(size: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """Images that are not chest X-rays, (size, size) uint8 grey: what the score must catch."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    page = Image.new("L", (size, size), 245)
    draw = ImageDraw.Draw(page)
    for row in range(12, size - 12, 14):  # lines of "text": short dark words with gaps
        x = 12
        while x < size - 30:
            width = int(rng.integers(10, 34))
            draw.rectangle((x, row, x + width, row + 6), fill=int(rng.integers(10, 60)))
            x += width + int(rng.integers(4, 9))
    photo = Image.fromarray((160 + 60 * yy - 40 * xx).clip(0, 255).astype(np.uint8))  # sky
    pdraw = ImageDraw.Draw(photo)
    pdraw.ellipse((size * 0.65, size * 0.1, size * 0.85, size * 0.3), fill=250)  # sun
    pdraw.polygon([(0, size * 0.7), (size * 0.35, size * 0.35), (size * 0.7, size * 0.7)], fill=90)  # mountain
    pdraw.rectangle((0, size * 0.7, size, size), fill=120)  # field
    for _ in range(6):  # trees
        x0 = float(rng.uniform(0, size * 0.9))
        pdraw.ellipse((x0, size * 0.55, x0 + size * 0.08, size * 0.72), fill=60)
    drawing = np.asarray(photo, np.float64) + rng.normal(0, 4, (size, size))
    # A photograph: the scene with the texture of natural images (a 1/f amplitude spectrum).
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    spectrum = np.exp(2j * np.pi * rng.uniform(size=(size, size))) / np.maximum(np.hypot(fx, fy), 1 / size)
    texture = np.real(np.fft.ifft2(spectrum))
    texture = (texture - texture.mean()) / texture.std()
    return {
        "blank": np.full((size, size), 128, np.uint8),
        "black": np.zeros((size, size), np.uint8),
        "noise": rng.integers(0, 256, (size, size)).astype(np.uint8),
        "text_page": np.asarray(page, np.uint8),
        "photo": (drawing + 30 * texture).clip(0, 255).astype(np.uint8),
        "drawing": drawing.clip(0, 255).astype(np.uint8),
    }
