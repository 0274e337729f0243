"""Test-time augmentation: a model's outputs averaged over fixed views of each image.

``evaluate.tta`` names the views: ``shift`` adds the image moved by that fraction of its side to the
left, right, up and down; ``zoom`` adds it zoomed in and out by that fraction (out: a black margin,
as the training zoom fills). The identity view is always first. The evaluate stage fits the threshold
and calibration on the averaged outputs, and the views travel with the model (``serving.json``) so
predict, serve and the pyfunc average the same views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf


@dataclass(frozen=True)
class Views:
    shift: float = 0.0
    zoom: float = 0.0

    @classmethod
    def of(cls, settings: object) -> Views:
        """From ``evaluate.tta`` (anything with ``shift`` and ``zoom``)."""
        return cls(float(settings.shift), float(settings.zoom))  # type: ignore[attr-defined]

    @property
    def enabled(self) -> bool:
        return self.shift > 0 or self.zoom > 0

    @property
    def count(self) -> int:
        """Views per image, the identity included."""
        return 1 + 4 * (self.shift > 0) + 2 * (self.zoom > 0)

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        parts = [f"shifts of {self.shift:g}" if self.shift else "", f"zoom of {self.zoom:g}" if self.zoom else ""]
        return f"{self.count} views ({', '.join(p for p in parts if p)})"

    def transforms(self, size: int) -> np.ndarray:
        """(views - 1, 8) projective transforms (keras.ops.image.affine_transform), identity excluded.

        Each row maps an output pixel (x, y) to the input pixel it samples: (a0 x + a1 y + a2, b0 x + b1 y + b2).
        """
        rows = []
        if self.shift > 0:
            d = self.shift * size
            rows += [[1, 0, -dx, 0, 1, -dy, 0, 0] for dx, dy in ((d, 0), (-d, 0), (0, d), (0, -d))]
        if self.zoom > 0:
            centre = (size - 1) / 2
            for scale in (1 - self.zoom, 1 + self.zoom):  # sampling a smaller region zooms in
                offset = (1 - scale) * centre
                rows.append([scale, 0, offset, 0, scale, offset, 0, 0])
        return np.asarray(rows, np.float32).reshape(-1, 8)


def views_of(x: tf.Tensor, views: Views) -> tf.Tensor:
    """(n, s, s, c) -> (n * (views - 1), s, s, c): every non-identity view, one view after another."""
    size = int(x.shape[1])
    n = tf.shape(x)[0]
    batches = []
    for row in views.transforms(size):
        transform = tf.tile(tf.constant(row)[None, :], [n, 1])
        batches.append(
            keras.ops.image.affine_transform(x, transform, interpolation="bilinear", fill_mode="constant", fill_value=0)
        )
    return tf.concat(batches, axis=0)


def averaged(call: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, identity: tf.Tensor, views: Views) -> tf.Tensor:
    """The mean of `call` over the views of `x`, given `identity` = call(x) (computed once by the caller)."""
    if not views.enabled:
        return identity
    n = tf.shape(x)[0]
    others = tf.cast(call(views_of(x, views)), identity.dtype)
    stacked = tf.concat([identity[None], tf.reshape(others, [views.count - 1, n, -1])], axis=0)
    return tf.reduce_mean(stacked, axis=0)


def predictor(model: keras.Model, views: Views, size: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """A compiled function: a batch of (size, size, 1) images -> the model's outputs averaged over `views`."""
    spec = tf.TensorSpec([None, size, size, 1], tf.float32)

    @tf.function(input_signature=[spec])
    def run(x: tf.Tensor) -> tf.Tensor:
        identity = model(x, training=False)
        return averaged(lambda v: model(v, training=False), x, identity, views)

    return run
