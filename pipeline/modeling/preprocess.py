"""The model-input contract, one definition for training, evaluation and serving.

Encoded image bytes -> (size, size, 1) float32 in [0, 255]: decoded as 8-bit grayscale and
stretched to a square, as in the published data set. The model itself repeats channels and applies
a backbone's own preprocessing, so every caller feeds exactly this.
"""

from __future__ import annotations

import tensorflow as tf


def resize_square(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """(H, W, 1) uint8 -> (size, size, 1) float32 in [0, 255], stretched to a square.

    Shrinking by 2x or more (full-resolution X-rays): area averaging, antialiased (2.6x faster than
    antialiased bilinear). Anything milder, or enlarging: bilinear, whose 2x2 taps miss no source pixel
    below a 2x reduction (what image_dataset_from_directory does everywhere, at about half area's cost).
    Both average source pixels, so the result stays in [0, 255] without clipping.
    """
    shape = tf.shape(image)
    return tf.cond(
        tf.maximum(shape[0], shape[1]) >= 2 * image_size,
        lambda: tf.image.resize(image, (image_size, image_size), method="area"),
        lambda: tf.image.resize(image, (image_size, image_size), method="bilinear"),
    )


def decode_image(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG bytes (8- or 16-bit, gray or RGB) -> (size, size, 1) float32 in [0, 255]."""
    image = tf.io.decode_image(data, channels=1, expand_animations=False, dtype=tf.uint8)
    return resize_square(image, image_size)
