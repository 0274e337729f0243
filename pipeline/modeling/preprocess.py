"""The model-input contract, one definition for training, evaluation and serving.

Encoded image bytes -> (size, size, 1) float32 in [0, 255]: decoded as 8-bit grayscale, stretched
to a square, as in the published data set, and rounded to whole gray levels (the source's own
precision, so a decoded image fits in uint8: the training cache holds a quarter of the bytes).
The model itself repeats channels and applies a backbone's own preprocessing, so every caller
feeds exactly this.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import tensorflow as tf

Resize = Literal["auto", "area", "bilinear"]


def resize_method(long_sides: Iterable[int], image_size: int) -> Resize:
    """The method ``auto`` would pick for every image whose longer side is in `long_sides`, or ``auto``
    where it would pick both (or the sides are unknown). A data set of one kind then skips the per-image
    branch, with the same result."""
    big = {int(side) >= 2 * image_size for side in long_sides}
    return "area" if big == {True} else "bilinear" if big == {False} else "auto"


def resize_square(image: tf.Tensor, image_size: int, method: Resize = "auto") -> tf.Tensor:
    """(H, W, 1) uint8 -> (size, size, 1) float32 in [0, 255], stretched to a square, whole gray levels.

    ``auto``: shrinking by 2x or more (full-resolution X-rays), area averaging, antialiased (2.6x faster
    than antialiased bilinear); anything milder, or enlarging, bilinear, whose 2x2 taps miss no source
    pixel below a 2x reduction (what image_dataset_from_directory does everywhere, at about half area's
    cost). Both average source pixels, so the result stays in [0, 255] without clipping. ``area`` and
    ``bilinear`` force one branch, for callers that know which applies (``resize_method``).
    """

    def resize(how: str) -> tf.Tensor:
        return tf.image.resize(image, (image_size, image_size), method=how)

    if method == "auto":
        shape = tf.shape(image)
        resized = tf.cond(
            tf.maximum(shape[0], shape[1]) >= 2 * image_size, lambda: resize("area"), lambda: resize("bilinear")
        )
    else:
        resized = resize(method)
    return tf.round(resized)


def decode_image(data: tf.Tensor, image_size: int, method: Resize = "auto") -> tf.Tensor:
    """Encoded JPEG/PNG bytes (8- or 16-bit, gray or RGB) -> (size, size, 1) float32 in [0, 255]."""
    image = tf.io.decode_image(data, channels=1, expand_animations=False, dtype=tf.uint8)
    return resize_square(image, image_size, method)
