"""Grad-CAM heat maps (Selvaraju et al. 2017) overlaid on the X-ray, for every supported architecture.

Models are built so the backbone's last convolutional layer is a layer of the model itself (see
``models.build_model``); its name is in the serving bundle. The explained score is the logit
(pre-activation) of the pneumonia class for binary models and of the predicted class otherwise,
so saturated probabilities still give gradients.
"""

from __future__ import annotations

import io
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from matplotlib import colormaps
from PIL import Image, ImageDraw

from pipeline.modeling.lung_crop import crop_to_boxes


class Explainer:
    """Grad-CAM for one model and layer; the gradient computation is compiled once."""

    def __init__(self, model: Any, layer: str) -> None:
        head = model.get_layer("prediction")
        try:
            conv = model.get_layer(layer).output
        except ValueError:
            raise ValueError(f"layer {layer!r} is not in model {model.name!r}; cannot explain") from None
        self.layer = layer
        grad_model = keras.Model(model.input, [conv, head.input])
        kernel, bias = head.kernel, head.bias

        @tf.function(reduce_retracing=True)
        def compute(x: tf.Tensor, class_index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                conv_out, features = grad_model(x, training=False)
                tape.watch(conv_out)
                logits = tf.matmul(tf.cast(features, kernel.dtype), kernel) + bias
                index = tf.where(class_index < 0, tf.argmax(logits[0], output_type=tf.int32), class_index)
                target = logits[:, index] if logits.shape[-1] > 1 else logits[:, 0]
            grads = tape.gradient(target, conv_out)
            weights = tf.reduce_mean(tf.cast(grads, tf.float32), axis=(1, 2))  # (1, channels)
            cam = tf.nn.relu(tf.reduce_sum(tf.cast(conv_out, tf.float32) * weights[:, None, None, :], axis=-1))
            return cam[0], tf.reduce_max(cam)

        self._compute = compute
        self._crops = _crop_layers(model)

    def __call__(self, image: np.ndarray, class_index: int | None = None) -> np.ndarray:
        """(size, size, 1) model input -> (h, w) heat map in [0, 1] at the conv layer's resolution; for a model
        that crops its input (``model.trim_margins``, ``lung_crop``), (size, size), the map placed where the
        crop came from and 0 outside it."""
        x = tf.constant(np.asarray(image, np.float32)[None])
        cam, top = self._compute(x, tf.constant(-1 if class_index is None else class_index, tf.int32))
        cam, top = cam.numpy(), float(top)
        heat = (cam / top if top > 0 else cam).astype(np.float32)
        if not self._crops:
            return heat
        placed = place_in_frame(heat, crop_box(self._crops, x), image.shape[:2])
        return placed / placed.max() if placed.max() > 0 else placed  # resizing into the box can shave the peak


def _crop_layers(model: Any) -> list[Any]:
    """The model's cropping layers, input side first; an ensemble's (joined sub-models) from its first member."""
    crops = [layer for layer in model.layers if hasattr(layer, "crop_boxes")]
    if crops:
        return crops
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return _crop_layers(nested[0]) if nested else []


def crop_box(crops: list[Any], x: tf.Tensor) -> tuple[float, float, float, float]:
    """The region of the input (y1, x1, y2, x2, fractions) that chained cropping layers pass on, for one image."""
    y1, x1, y2, x2 = 0.0, 0.0, 1.0, 1.0
    for layer in crops:
        boxes = layer.crop_boxes(x)
        b = boxes.numpy()[0]
        h, w = y2 - y1, x2 - x1
        y1, x1, y2, x2 = y1 + b[0] * h, x1 + b[1] * w, y1 + b[2] * h, x1 + b[3] * w
        x = crop_to_boxes(x, boxes)  # what the next layer sees, from the box already found
    return float(y1), float(x1), float(y2), float(x2)


def place_in_frame(heat: np.ndarray, box: tuple[float, float, float, float], shape: tuple[int, int]) -> np.ndarray:
    """A heat map of a crop -> one of the whole `shape` frame: resized into the box, 0 outside."""
    h, w = shape
    top, left = round(box[0] * (h - 1)), round(box[1] * (w - 1))
    bottom, right = max(round(box[2] * (h - 1)) + 1, top + 1), max(round(box[3] * (w - 1)) + 1, left + 1)
    frame = np.zeros((h, w), np.float32)
    inner = Image.fromarray(heat.astype(np.float32)).resize((right - left, bottom - top), Image.BILINEAR)
    frame[top:bottom, left:right] = np.clip(np.asarray(inner), 0.0, 1.0)
    return frame


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """(H, W) uint8 X-ray and a heat map of any size -> (H, W, 3) uint8, jet colours blended in."""
    h, w = gray.shape
    resized = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0
    colours = colormaps["jet"](resized)[..., :3]
    base = np.repeat(gray[..., None] / 255.0, 3, axis=-1)
    return np.clip(
        255 * ((1 - alpha * resized[..., None]) * base + alpha * resized[..., None] * colours), 0, 255
    ).astype(np.uint8)


def figure_png(gray: np.ndarray, heat: np.ndarray, title: str) -> bytes:
    """The X-ray and its Grad-CAM overlay side by side under a title, as PNG bytes (PIL: fast)."""
    h, w = gray.shape
    band = 28
    canvas = Image.new("RGB", (2 * w + 10, h + band), "white")
    canvas.paste(Image.fromarray(gray).convert("RGB"), (0, band))
    canvas.paste(Image.fromarray(overlay(gray, heat)), (w + 10, band))
    ImageDraw.Draw(canvas).text((6, 7), title, fill="black")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()
