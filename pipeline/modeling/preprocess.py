"""The model-input contract, one definition for training, evaluation and serving.

Encoded image bytes -> (size, size, 1) float32 in [0, 255]: decoded as 8-bit grayscale (``decode_gray``),
stretched to a square, as in the published data set, and rounded to whole gray levels (the source's own
precision, so a decoded image fits in uint8: the training cache holds a quarter of the bytes).
The model itself repeats channels and applies a backbone's own preprocessing, so every caller
feeds exactly this.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import tensorflow as tf

Resize = Literal["auto", "area", "bilinear"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_DEPTH_AT = 24  # the IHDR bit depth: magic (8), chunk length and type (8), width and height (8)
MAX_12_BIT = 4095  # a 16-bit PNG with no sample above this holds 12-bit (or fewer) data, as PACS exports write


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


def _decode8(data: tf.Tensor) -> tf.Tensor:
    """(H, W, 1) uint8; a 16-bit PNG keeps its high byte."""
    return tf.io.decode_image(data, channels=1, expand_animations=False, dtype=tf.uint8)


def _is_png16(data: tf.Tensor) -> tf.Tensor:
    head = tf.io.decode_raw(tf.strings.substr(data, 0, PNG_DEPTH_AT + 1), tf.uint8)
    head = tf.pad(head, [[0, PNG_DEPTH_AT + 1 - tf.size(head)]])
    magic = tf.constant(list(PNG_MAGIC), tf.uint8)
    return tf.logical_and(tf.reduce_all(head[:8] == magic), head[PNG_DEPTH_AT] == 16)


def _significant_bits(data: tf.Tensor) -> tf.Tensor:
    """A PNG's sBIT value (the largest over its channels) from before the first IDAT; 16 when there is none."""
    header = tf.strings.split(data, "IDAT", maxsplit=1)[0]
    parts = tf.strings.split(header, "sBIT", maxsplit=1)
    before = tf.io.decode_raw(tf.strings.substr(parts[0], -4, 4), tf.uint8)
    after = tf.io.decode_raw(tf.strings.substr(tf.concat([parts[1:], [""]], 0)[0] + b"\0" * 4, 0, 4), tf.uint8)
    length = tf.cast(before[-1], tf.int32)  # the chunk length's low byte: 1 to 4 samples
    found = tf.logical_and(tf.size(parts) == 2, tf.logical_and(length >= 1, length <= 4))
    bits = tf.cast(tf.reduce_max(after[: tf.clip_by_value(length, 1, 4)]), tf.int32)
    return tf.where(tf.logical_and(found, tf.logical_and(bits >= 1, bits < 16)), bits, 16)


def _decode16(data: tf.Tensor) -> tf.Tensor:
    """A 16-bit PNG -> (H, W, 1) uint8. Values within its sBIT depth are scaled from that depth; without sBIT, a
    maximum of 4095 or less is stretched min-max (as DICOM is); anything else is the high byte, as ever."""
    wide = tf.io.decode_png(data, channels=1, dtype=tf.uint16)
    values, bits = tf.cast(wide, tf.float32), _significant_bits(data)
    top, full_scale = tf.reduce_max(values), tf.cast(tf.bitwise.left_shift(1, bits) - 1, tf.float32)

    def stretched(lo: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
        out = (values - lo) * (255.0 / tf.maximum(hi - lo, 1.0))
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    unshifted = tf.logical_and(bits < 16, top <= full_scale)  # raw values under an sBIT, not scaled up to 16 bits
    return tf.case(
        [
            (unshifted, lambda: stretched(tf.constant(0.0), full_scale)),
            (top <= MAX_12_BIT, lambda: stretched(tf.reduce_min(values), top)),
        ],
        default=lambda: _decode8(data),
    )


def decode_gray(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG bytes (8- or 16-bit, gray or RGB) -> (H, W, 1) uint8, by ``_decode16`` for 16-bit PNGs."""
    data = tf.convert_to_tensor(data, tf.string)
    return tf.cond(_is_png16(data), lambda: _decode16(data), lambda: _decode8(data))


def decode_image(data: tf.Tensor, image_size: int, method: Resize = "auto") -> tf.Tensor:
    """Encoded JPEG/PNG bytes (8- or 16-bit, gray or RGB) -> (size, size, 1) float32 in [0, 255]."""
    return resize_square(decode_gray(data), image_size, method)
