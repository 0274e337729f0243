"""CLAHE (contrast-limited adaptive histogram equalization) as a Keras layer, OpenCV's algorithm in TF ops.

Each image is cut into a grid of tiles; each tile's histogram is clipped at ``clip`` times its mean bin
(the excess spread over all bins) and equalized; every pixel then takes the bilinear blend of its four
nearest tiles' mappings. Local contrast is evened out as plain equalization does globally, but a black
border changes only the tiles it lies in, and the clip keeps noise in flat regions from being blown up.

It follows ``cv2.createCLAHE(clip, (tiles, tiles)).apply`` on 8-bit images step for step (integer clip
limit, remainder spread every ``256 // r`` bins, reflect-101 padding to a whole number of tiles), so a
test can hold it to OpenCV's output exactly. As in OpenCV the clip limit is a whole number of counts,
``int(clip * tile pixels / 256)``, at least 1: with small tiles (an 8 x 8 grid on 96 px: 144 pixels) it
rounds down to 1, which flattens every tile's histogram and leaves the image almost as it was;
params.yaml's ``model.clahe`` refuses such a setting (keep tiles at 256 pixels or more for a clip of 2).
"""

from __future__ import annotations

import keras
import numpy as np

LEVELS = 256


def _blend_indices(size: int, tiles: int, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel along one axis: the lower and upper tile whose mappings are blended, and the upper's weight."""
    position = np.arange(size, dtype=np.float32) * np.float32(1 / tile) - np.float32(0.5)  # float32, as OpenCV
    low = np.floor(position)
    weight = position - low
    return np.clip(low, 0, tiles - 1).astype(np.int32), np.clip(low + 1, 0, tiles - 1).astype(np.int32), weight


@keras.saving.register_keras_serializable(package="pneumo")
class ContrastLimitedEqualization(keras.layers.Layer):
    """Per-image CLAHE on grey levels in [0, 255]: ``clip`` (> 0) and a ``tiles`` x ``tiles`` grid."""

    def __init__(self, clip: float = 2.0, tiles: int = 8, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if clip <= 0 or tiles < 1:
            raise ValueError(f"CLAHE needs clip > 0 and tiles >= 1, got clip={clip}, tiles={tiles}")
        self.clip, self.tiles = float(clip), int(tiles)

    def call(self, x):
        import tensorflow as tf  # noqa: PLC0415 - TensorFlow ops, as models.EqualizeHistogram

        height, width = int(x.shape[1]), int(x.shape[2])
        tiles = self.tiles
        # As OpenCV: unless both sides are whole numbers of tiles, both are padded (bottom, right)
        # by tiles - side % tiles.
        whole = height % tiles == 0 and width % tiles == 0
        pad_h, pad_w = (0, 0) if whole else (tiles - height % tiles, tiles - width % tiles)
        tile_h, tile_w = (height + pad_h) // tiles, (width + pad_w) // tiles
        area = tile_h * tile_w
        limit = max(int(self.clip * area / LEVELS), 1)  # config.ModelParams refuses a limit of 1

        levels = tf.cast(tf.clip_by_value(tf.round(tf.cast(x[..., 0], tf.float32)), 0.0, 255.0), tf.int32)
        batch = tf.shape(levels)[0]
        padded = levels if whole else tf.pad(levels, [[0, 0], [0, pad_h], [0, pad_w]], mode="REFLECT")

        # One histogram per (image, tile row, tile column), all in one bincount.
        rows = np.repeat(np.arange(tiles), tile_h).astype(np.int32)
        cols = np.repeat(np.arange(tiles), tile_w).astype(np.int32)
        tile_of = tf.constant((rows[:, None] * tiles + cols[None, :]) * LEVELS)
        ids = padded + tile_of + tf.range(batch)[:, None, None] * (tiles * tiles * LEVELS)
        n_bins = batch * tiles * tiles * LEVELS
        hist = tf.math.bincount(tf.reshape(ids, [-1]), minlength=n_bins, maxlength=n_bins)
        hist = tf.reshape(hist, [batch, tiles, tiles, LEVELS])

        # Clip; the excess goes to every bin evenly, its remainder r to every (256 // r)-th bin from 0.
        excess = tf.reduce_sum(tf.maximum(hist - limit, 0), axis=-1, keepdims=True)
        hist = tf.minimum(hist, limit) + excess // LEVELS
        residual = excess % LEVELS
        step = tf.maximum(LEVELS // tf.maximum(residual, 1), 1)
        bins = tf.range(LEVELS)
        hist += tf.cast((bins % step == 0) & (bins // step < residual), tf.int32)
        lut = tf.round(tf.cast(tf.cumsum(hist, axis=-1), tf.float32) * (255.0 / area))
        lut = tf.reshape(lut, [-1])

        # Each pixel: the four nearest tiles' mappings of its level, blended bilinearly.
        top, bottom, wy = _blend_indices(height, tiles, tile_h)
        left, right, wx = _blend_indices(width, tiles, tile_w)
        base = tf.range(batch)[:, None, None] * (tiles * tiles * LEVELS) + levels

        def mapped(tile_rows: np.ndarray, tile_cols: np.ndarray) -> tf.Tensor:
            offset = tf.constant((tile_rows[:, None] * tiles + tile_cols[None, :]) * LEVELS)
            return tf.gather(lut, base + offset)

        wx_, wy_ = tf.constant(wx[None, None, :]), tf.constant(wy[None, :, None])
        upper = mapped(top, left) * (1 - wx_) + mapped(top, right) * wx_
        lower = mapped(bottom, left) * (1 - wx_) + mapped(bottom, right) * wx_
        out = tf.round(upper * (1 - wy_) + lower * wy_)
        return tf.cast(out[..., None], self.compute_dtype)

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "clip": self.clip, "tiles": self.tiles}
