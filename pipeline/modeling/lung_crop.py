"""A crop to the lung fields, found per image without segmentation labels, as a Keras layer.

The lungs are the two large dark regions inside the body: darker than most of the image, but not
joined to the image edge or to black padding (the air around the body, letterbox bars). On a 64 x 64
copy of the image, pixels below the ``dark`` quantile of the non-black grey levels are opened (eroded,
then dilated back); dark regions reachable from the edge or from black pixels are removed by
morphological reconstruction (repeated 3 x 3 dilation inside the dark mask); what remains is taken as
lung. The crop is the lungs' bounding box plus ``margin`` on every edge, stretched back to the square
(as every image of the data set already is). Sizes are fractions of the image's non-black part, so a
black frame or letterbox (cut off with the air) does not change the crop of what it surrounds.

Every choice errs towards keeping too much. Consolidated (white) lung is not dark, and one lung may be
missed (joined to the edge, or opaque): the box is mirrored about the middle of the non-black part, so
it holds both sides if it holds one; it is at least ``min_width`` wide and ``min_height`` tall, grown
downwards from the top found (apices show; bases hide behind the diaphragm and effusions). Stray dark regions (bowel
gas, a gap under the arm) only widen it. With less than ``min_area`` of the image found, it is left
whole. The grey-level cut is a quantile, so exposure and contrast do not move it.
"""

from __future__ import annotations

import keras
import numpy as np

GRID = 64  # the lung mask's resolution: coarse, and cheap at every input size


def crop_to_boxes(x, boxes):
    """(B, S, S, C) images and (B, 4) boxes (y1, x1, y2, x2, fractions) -> each box resized back to (S, S)."""
    import tensorflow as tf  # noqa: PLC0415 - TensorFlow ops, as the layers below

    x32 = tf.cast(x, tf.float32)
    out = tf.image.crop_and_resize(x32, boxes, tf.range(tf.shape(x32)[0]), tf.shape(x32)[1:3], method="bilinear")
    return tf.ensure_shape(out, x.shape)


def _border(grid: int) -> np.ndarray:
    edge = np.zeros((1, grid, grid, 1), np.float32)
    edge[:, [0, -1], :, :] = 1.0
    edge[:, :, [0, -1], :] = 1.0
    return edge


@keras.saving.register_keras_serializable(package="pneumo")
class LungFieldCrop(keras.layers.Layer):
    """Each image cropped to the box around its lung fields and resized back (left whole where none is found)."""

    def __init__(
        self,
        dark: float = 0.35,
        black: float = 12.0,
        margin: float = 0.08,
        min_height: float = 0.65,
        min_width: float = 0.6,
        min_area: float = 0.02,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.supports_jit = False  # no XLA kernel for CropAndResize or area resizing: Keras then skips XLA
        self.dark, self.black, self.margin = dark, black, margin
        self.min_height, self.min_width, self.min_area = min_height, min_width, min_area

    def lung_mask(self, small):
        """(B, 64, 64, 1) grey levels (the image area-resized) -> a float mask of the pixels taken as lung."""
        import tensorflow as tf  # noqa: PLC0415 - TensorFlow ops (sort, pooling), as models.EqualizeHistogram

        flat = tf.reshape(small, [-1, GRID * GRID])
        lit = flat > self.black
        ranked = tf.sort(tf.where(lit, flat, 1e9), axis=1)  # the non-black levels first, in order
        rank = tf.cast(tf.cast(tf.reduce_sum(tf.cast(lit, tf.int32), axis=1), tf.float32) * self.dark, tf.int32)
        level = tf.gather(ranked, tf.minimum(rank, GRID * GRID - 1), batch_dims=1)
        dark = tf.cast(small < level[:, None, None, None], tf.float32)  # black pixels included
        dark = -tf.nn.max_pool2d(-dark, 3, 1, "SAME")  # erosion: thin links between regions cut
        outside = tf.maximum(tf.constant(_border(GRID)), tf.cast(small <= self.black, tf.float32)) * dark

        def grow(step, outside, _):
            """One step of the reconstruction: the dark regions joined to the edge or to black, grown by a pixel."""
            grown = tf.nn.max_pool2d(outside, 3, 1, "SAME") * dark
            return step + 1, grown, tf.reduce_any(grown != outside)

        # Until nothing changes, at most 48 steps. On the shared test split one image settles in 7-11 steps
        # (median), a batch of 32 in 34-44 (its slowest image): single images (serving) gain the most.
        _, outside, _ = tf.while_loop(
            lambda step, _, changed: changed & (step < GRID * 3 // 4), grow, (0, outside, tf.constant(True))
        )
        return tf.nn.max_pool2d(dark - outside, 3, 1, "SAME")  # dilation back: the opening's second half

    def crop_boxes(self, x):
        """(B, S, S, 1) -> (B, 4) boxes (y1, x1, y2, x2) as fractions of the side; (0, 0, 1, 1): left whole."""
        import tensorflow as tf  # noqa: PLC0415

        small = tf.image.resize(tf.cast(x, tf.float32), (GRID, GRID), method="area")
        lungs = self.lung_mask(small)
        found = tf.reduce_mean(lungs, axis=[1, 2, 3]) >= self.min_area

        def extent(inside):
            """First and last cell of each row of `inside`, as fractions of the side (edges of the cells)."""
            first = tf.cast(tf.argmax(tf.cast(inside, tf.int32), axis=1), tf.float32) / GRID
            end = 1.0 - tf.cast(tf.argmax(tf.cast(tf.reverse(inside, [1]), tf.int32), axis=1), tf.float32) / GRID
            return first, end

        def side(axis: int, least: float, mirrored: bool):
            """The crop along one axis, in the frame of the non-black part of the image (padding adds nothing)."""
            lit = tf.reduce_mean(small, axis=[axis, 3]) > self.black
            lo, hi = extent(lit | ~tf.reduce_any(lit, axis=1, keepdims=True))
            span = hi - lo
            first, end = extent(tf.reduce_sum(lungs, axis=[axis, 3]) >= 1.0)
            first, end = first - self.margin * span, end + self.margin * span
            if mirrored:  # about the middle: both lungs kept when one is found
                middle = (lo + hi) / 2
                half = tf.minimum(tf.maximum(tf.maximum(middle - first, end - middle), least * span / 2), span / 2)
                return middle - half, middle + half
            length = tf.minimum(tf.maximum(end - first, least * span), span)
            start = tf.clip_by_value(first, lo, hi - length)  # grown downwards: the bases hide behind the diaphragm
            return start, start + length

        y1, y2 = side(2, self.min_height, mirrored=False)
        x1, x2 = side(1, self.min_width, mirrored=True)
        box = tf.stack([y1, x1, y2, x2], axis=1)
        return tf.where(found[:, None], box, tf.constant([[0.0, 0.0, 1.0, 1.0]]))

    def call(self, x):
        import tensorflow as tf  # noqa: PLC0415

        boxes = tf.stop_gradient(self.crop_boxes(tf.cast(x, tf.float32)))
        return tf.cast(crop_to_boxes(x, boxes), self.compute_dtype)

    def get_config(self) -> dict[str, object]:
        return {
            **super().get_config(),
            **{k: getattr(self, k) for k in ("dark", "black", "margin", "min_height", "min_width", "min_area")},
        }
