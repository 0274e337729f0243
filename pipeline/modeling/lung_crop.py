"""A crop to the lung fields, found per image without segmentation labels, as a Keras layer.

The lungs are the two large dark regions inside the body: darker than most of the image, but not
joined to the image edge (the air around the body, letterbox bars and padding, which touch it). On a
64 x 64 copy of the image, pixels below a quantile of the non-black grey levels are opened (eroded, then
dilated back); dark regions reachable from the edge are removed by morphological reconstruction
(repeated 3 x 3 dilation inside the dark mask); what remains is taken as lung. The crop is the box that
holds all but ``tail`` of the lung pixels at each end, plus ``margin`` on every edge, stretched back to
the square (as every image of the data set already is). Sizes are fractions of the image's non-black
part, so a black frame or letterbox (cut off with the air) does not change the crop of what it surrounds.

Every choice errs towards keeping too much. Consolidated (white) lung is not dark, and one lung may be
missed (joined to the edge, or opaque): the box is mirrored about the middle of the non-black part, so
it holds both sides if it holds one; it is at least ``min_width`` wide and ``min_height`` tall, grown
downwards from the top found (apices show; bases hide behind the diaphragm and effusions). With less
than ``min_area`` / 2 of the image found, it is left whole.

Every choice also keeps the box still under changes that should not move it (the behaviour tests'
exposure and contrast changes, another resolution of the same image): the grey-level cuts are quantiles
and "black" is measured from the image's own darkest level, so adding to or scaling the grey levels
moves neither; the box is the mean of the boxes at seven quantiles (``dark``, 0.30-0.50), so no single cut
decides and a dark region that joins the edge at one cut and not the next moves it by a seventh;
its ends follow the mass of the lung pixels, placed inside a line by that line's share (no jump of a whole
line when a pixel changes), so a speck moves it little; and between ``min_area`` / 2
and 1.5 x ``min_area`` found it blends from the whole image to the box instead of jumping.
``benchmarks/lung_crop_stability.py`` prints how far it moves.

What moves anyway, the model learns to ignore: in training each edge of each box is moved by up to
``jitter`` of the box's side (uniform, independent per edge), so the network sees its lungs framed a
little differently every epoch, as the crop frames them between a file and its resized copy. The
augmentation before the model cannot do this: the crop is found again on the augmented image and
undoes most of its zoom and shift. Prediction uses the box as found.
"""

from __future__ import annotations

import keras
import numpy as np

GRID = 64  # the lung mask's resolution: coarse, and cheap at every input size
DARK = tuple(round(0.3 + i / 30, 4) for i in range(7))  # the grey-level quantiles cut, 0.30 to 0.50


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


REVISION = 3  # of the box-finding rule; a model saved with another one is refused at load, not silently changed


@keras.saving.register_keras_serializable(package="pneumo")
class LungFieldCrop(keras.layers.Layer):
    """Each image cropped to the box around its lung fields and resized back (left whole where none is found)."""

    def __init__(
        self,
        dark: tuple[float, ...] | list[float] = DARK,
        black: float = 6.0,
        margin: float = 0.08,
        min_height: float = 0.65,
        min_width: float = 0.6,
        min_area: float = 0.02,
        tail: float = 0.02,
        jitter: float = 0.0,
        seed: int | None = None,
        revision: int = REVISION,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        if revision != REVISION:
            raise ValueError(
                f"layer {kwargs.get('name', 'lung_crop')!r}: saved with revision {revision} of the lung-field crop, "
                f"this code has revision {REVISION} (its boxes differ): retrain the model"
            )
        self.supports_jit = False  # no XLA kernel for CropAndResize or area resizing: Keras then skips XLA
        self.dark, self.black, self.margin, self.tail = tuple(dark), black, margin, tail
        self.min_height, self.min_width, self.min_area, self.revision = min_height, min_width, min_area, revision
        self.jitter, self.seed = jitter, seed
        self.seed_generator = keras.random.SeedGenerator(seed) if jitter else None

    def lung_mask(self, small, black=None):
        """(B, 64, 64, 1) grey levels (the image area-resized) -> (B, 64, 64, Q) float masks of the pixels taken
        as lung, one per ``dark`` quantile; `black`: `black_level(small)`, where the caller has it already."""
        import tensorflow as tf  # noqa: PLC0415 - TensorFlow ops (sort, pooling), as models.EqualizeHistogram

        flat = tf.reshape(small, [-1, GRID * GRID])
        lit = flat > (self.black_level(small) if black is None else black)[:, None]
        ranked = tf.sort(tf.where(lit, flat, 1e9), axis=1)  # the non-black levels first, in order
        count = tf.cast(tf.reduce_sum(tf.cast(lit, tf.int32), axis=1), tf.float32)
        ranks = tf.cast(count[:, None] * tf.constant(self.dark, tf.float32)[None], tf.int32)  # (B, Q)
        levels = tf.gather(ranked, tf.minimum(ranks, GRID * GRID - 1), batch_dims=1)
        dark = tf.cast(small < levels[:, None, None, :], tf.float32)  # (B, 64, 64, Q), black pixels included
        dark = -tf.nn.max_pool2d(-dark, 3, 1, "SAME")  # erosion: thin links between regions cut
        outside = tf.constant(_border(GRID)) * dark  # padding is dark and joined to the edge: it spreads from there

        def grow(step, outside, _):
            """One step of the reconstruction: the dark regions joined to the edge, grown by a pixel."""
            grown = tf.nn.max_pool2d(outside, 3, 1, "SAME") * dark
            return step + 1, grown, tf.reduce_any(grown != outside)

        # Until nothing changes, at most 48 steps. On the shared test split one image settles in 7-11 steps
        # (median), a batch of 32 in 34-44 (its slowest image): single images (serving) gain the most.
        _, outside, _ = tf.while_loop(
            lambda step, _, changed: changed & (step < GRID * 3 // 4), grow, (0, outside, tf.constant(True))
        )
        return tf.nn.max_pool2d(dark - outside, 3, 1, "SAME")  # dilation back: the opening's second half

    def black_level(self, small):
        """(B,) the grey level at or below which a pixel counts as black: ``black`` above the image's darkest
        (64 x 64) level, so adding to or scaling every level does not change which pixels are black."""
        import tensorflow as tf  # noqa: PLC0415

        return tf.reduce_min(small, axis=[1, 2, 3]) + self.black

    def crop_boxes(self, x):
        """(B, S, S, 1) -> (B, 4) boxes (y1, x1, y2, x2) as fractions of the side; (0, 0, 1, 1): left whole."""
        import tensorflow as tf  # noqa: PLC0415

        small = tf.image.resize(tf.cast(x, tf.float32), (GRID, GRID), method="area")
        black = self.black_level(small)
        masks = self.lung_mask(small, black)
        whole = tf.constant([[0.0, 0.0, 1.0, 1.0]])

        def extent(inside):
            """First and last cell of each row of `inside`, as fractions of the side (edges of the cells)."""
            first = tf.cast(tf.argmax(tf.cast(inside, tf.int32), axis=1), tf.float32) / GRID
            end = 1.0 - tf.cast(tf.argmax(tf.cast(tf.reverse(inside, [1]), tf.int32), axis=1), tf.float32) / GRID
            return first, end

        def mass_extent(profile):
            """Where each row of `profile` (lung pixels per line) passes `tail` and 1 - `tail` of its total: a
            speck far from the lungs moves the box by its share of the mass, not to where it lies. The
            crossing is placed inside its line by the line's own mass (linear), so a pixel more or less
            moves an end by a fraction of a line, never by a whole one."""
            total = tf.reduce_sum(profile, axis=1, keepdims=True) + 1e-6
            cell = profile / total  # each line's share of the mass
            before = tf.cumsum(cell, axis=1, exclusive=True)  # the share above (left of) each line

            def crossing(level: float):
                # Lines wholly before `level` count 1, the line it falls in its fraction, later lines 0
                inside = tf.math.divide_no_nan(level - before, cell)
                return (
                    tf.reduce_sum(
                        tf.where(cell > 0, tf.clip_by_value(inside, 0.0, 1.0), tf.cast(before < level, tf.float32)),
                        axis=1,
                    )
                    / GRID
                )

            return crossing(self.tail), crossing(1.0 - self.tail)

        def side(axis: int, least: float, mirrored: bool):
            """The crop along one axis, (B, Q) per end, in the frame of the non-black part of the image (padding
            adds nothing); one column per dark quantile."""
            lit = tf.reduce_mean(small, axis=[axis, 3]) > black[:, None]
            lo, hi = extent(lit | ~tf.reduce_any(lit, axis=1, keepdims=True))
            lo, hi = lo[:, None], hi[:, None]
            span = hi - lo
            first, end = mass_extent(tf.reduce_sum(masks, axis=axis))  # (B, 64, Q) lung pixels per line
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
        boxes = tf.stack([y1, x1, y2, x2], axis=2)  # (B, Q, 4): one box per dark quantile
        # Found lung from min_area / 2 to 1.5 x min_area of the image blends from the whole image to the box, so an
        # image near the limit does not jump between the two; the quantiles' boxes are averaged: no one cut decides
        area = tf.reduce_mean(masks, axis=[1, 2])
        weight = tf.clip_by_value((area - self.min_area / 2) / self.min_area, 0.0, 1.0)[..., None]
        return tf.reduce_mean(weight * boxes + (1.0 - weight) * whole, axis=1)

    def jittered(self, boxes):
        """(B, 4) boxes, each edge moved by up to ``jitter`` of its box's side, kept inside the image."""
        import tensorflow as tf  # noqa: PLC0415

        side = tf.tile(boxes[:, 2:] - boxes[:, :2], [1, 2])  # (h, w, h, w) to match (y1, x1, y2, x2)
        move = keras.random.uniform(tf.shape(boxes), -self.jitter, self.jitter, seed=self.seed_generator)
        return tf.clip_by_value(boxes + move * side, 0.0, 1.0)

    def call(self, x, training=None):
        import tensorflow as tf  # noqa: PLC0415

        boxes = tf.stop_gradient(self.crop_boxes(tf.cast(x, tf.float32)))
        boxes = self.jittered(boxes) if training and self.jitter else boxes
        return tf.cast(crop_to_boxes(x, boxes), self.compute_dtype)

    @classmethod
    def from_config(cls, config: dict) -> LungFieldCrop:
        return cls(**{"revision": 1, **config})  # saved before revisions were recorded: the first rule

    def get_config(self) -> dict[str, object]:
        return {
            **super().get_config(),
            **{k: getattr(self, k) for k in ("black", "margin", "min_height", "min_width", "min_area", "tail")},
            **{k: getattr(self, k) for k in ("jitter", "seed")},
            "dark": list(self.dark),
            "revision": self.revision,
        }
