"""Keras models: two CNNs from scratch (compact, residual), and transfer learning on six ImageNet backbones.

The backbone is built on the model's own input tensor, so its layers sit in the outer model (not a
nested sub-model): Grad-CAM can reach the last conv layer by name, and fine-tuning can unfreeze the
top N backbone layers. Inputs are grayscale (H, W, 1) in [0, 255]; the model repeats the channel
and applies the backbone's own preprocessing in a serializable layer.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras

from pipeline.core.config import ARCHITECTURES, ModelParams
from pipeline.core.config import FROM_SCRATCH as SCRATCH_NAMES
from pipeline.core.errors import PipelineError
from pipeline.core.locks import file_lock
from pipeline.core.project import project_path
from pipeline.modeling.clahe import ContrastLimitedEqualization
from pipeline.modeling.lung_crop import LungFieldCrop, crop_to_boxes


@dataclass(frozen=True)
class Backbone:
    builder: str  # keras.applications attribute
    preprocess: str  # caffe | tf | torch | raw
    min_size: int
    last_conv: str  # Grad-CAM target layer


BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone("ResNet50", "caffe", 32, "conv5_block3_out"),
    "vgg16": Backbone("VGG16", "caffe", 32, "block5_conv3"),
    "inceptionv3": Backbone("InceptionV3", "tf", 75, "mixed10"),
    "densenet121": Backbone("DenseNet121", "torch", 32, "relu"),
    "efficientnetb0": Backbone("EfficientNetB0", "raw", 32, "top_activation"),
    "mobilenetv2": Backbone("MobileNetV2", "tf", 32, "out_relu"),
}


@keras.saving.register_keras_serializable(package="pneumo")
class BackbonePreprocess(keras.layers.Layer):
    """Grayscale [0, 255] -> 3 channels in the backbone's expected range (caffe, tf, torch or raw)."""

    def __init__(self, mode: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        x = keras.ops.concatenate([x, x, x], axis=-1)
        if self.mode == "caffe":  # BGR, ImageNet means subtracted (gray: the channel order is moot)
            return x - keras.ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = keras.ops.convert_to_tensor([0.485, 0.456, 0.406], dtype=x.dtype)
            std = keras.ops.convert_to_tensor([0.229, 0.224, 0.225], dtype=x.dtype)
            return (x / 255.0 - mean) / std
        return x  # raw: EfficientNet rescales inside the network

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="pneumo")
class StandardizeIntensity(keras.layers.Layer):
    """Each image to the same mean and spread: (x - mean) / std per image, mapped back to [0, 255] around 128.

    Brightness and contrast differ between X-ray machines and exports; after this layer a linear change
    of an image's grey levels no longer changes what the network sees. Part of the model, so every caller
    (training, evaluation, serving) gets it.
    """

    def call(self, x):
        # In float32 whatever the policy: under mixed_float16 (training on a GPU) the squared deviations of
        # 0-255 pixels summed over an image overflow float16, std becomes inf and every image a flat 128.
        x32 = keras.ops.cast(x, "float32")
        mean = keras.ops.mean(x32, axis=(1, 2, 3), keepdims=True)
        std = keras.ops.std(x32, axis=(1, 2, 3), keepdims=True)
        out = keras.ops.clip((x32 - mean) / keras.ops.maximum(std, 1.0) * 48.0 + 128.0, 0.0, 255.0)
        return keras.ops.cast(out, self.compute_dtype)


@keras.saving.register_keras_serializable(package="pneumo")
class EqualizeHistogram(keras.layers.Layer):
    """Per-image histogram equalization: each grey level becomes its mid-rank in the image, scaled to [0, 255].

    Exposure, gamma and any other monotone change of the grey levels that keeps them apart give the
    same output, so the network sees tissue contrast, not how a machine or an export mapped it.
    """

    def call(self, x):
        # TensorFlow ops (bincount, batched gather): imported here, so the model's other architectures
        # build on any Keras backend (benchmarks/bench_gpu_keras.py runs them on JAX where TF is missing).
        import tensorflow as tf  # noqa: PLC0415

        x32 = tf.cast(x, tf.float32)
        batch, pixels = tf.shape(x32)[0], tf.reduce_prod(tf.shape(x32)[1:])
        levels = tf.cast(tf.clip_by_value(tf.round(tf.reshape(x32, [batch, -1])), 0.0, 255.0), tf.int32)
        ids = levels + tf.range(batch)[:, None] * 256  # one histogram per image, in one bincount
        counts = tf.math.bincount(tf.reshape(ids, [-1]), minlength=batch * 256, maxlength=batch * 256)
        counts = tf.cast(tf.reshape(counts, [batch, 256]), tf.float32)
        mid_rank = (tf.cumsum(counts, axis=1) - 0.5 * counts) / tf.cast(pixels, tf.float32) * 255.0
        out = tf.gather(mid_rank, levels, batch_dims=1)
        return tf.cast(tf.reshape(out, tf.shape(x)), self.compute_dtype)


@keras.saving.register_keras_serializable(package="pneumo")
class TrimDarkMargins(keras.layers.Layer):
    """Each image cropped to the rows and columns inside its dark margins, then resized back to the square.

    A margin is the run of outer rows (columns) whose mean grey level is below `level`: black letterbox
    bars, padding to a square, air beside the body. Normal images in the training folder carry such
    margins more often than pneumonia ones, so a model can learn "dark sides, normal"; trimming them
    gives every image the same framing whatever the export added. A crop that would keep less than
    `min_keep` of a side is not made (an almost black image stays as it is).
    """

    def __init__(self, level: float = 10.0, min_keep: float = 0.5, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.supports_jit = False  # no XLA kernel for CropAndResize or area resizing: Keras then skips XLA
        self.level, self.min_keep = level, min_keep

    def crop_boxes(self, x):
        """(B, S, S, 1) -> (B, 4) boxes (y1, x1, y2, x2) as fractions of the side; (0, 0, 1, 1): left whole."""
        import tensorflow as tf  # noqa: PLC0415 - TensorFlow ops, as EqualizeHistogram

        x32 = tf.cast(x, tf.float32)
        last = tf.cast(tf.shape(x32)[1] - 1, tf.float32)

        def span(profile: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            """(first, last) index above the level per image, as fractions of the side; the whole side if none."""
            inside = profile >= self.level
            found = tf.reduce_any(inside, axis=1)
            first = tf.cast(tf.argmax(tf.cast(inside, tf.int32), axis=1), tf.float32)
            end = last - tf.cast(tf.argmax(tf.cast(tf.reverse(inside, [1]), tf.int32), axis=1), tf.float32)
            keep = found & ((end - first + 1.0) >= self.min_keep * (last + 1.0))
            return tf.where(keep, first / last, 0.0), tf.where(keep, end / last, 1.0)

        y1, y2 = span(tf.reduce_mean(x32, axis=[2, 3]))
        x1, x2 = span(tf.reduce_mean(x32, axis=[1, 3]))
        return tf.stack([y1, x1, y2, x2], axis=1)

    def call(self, x):
        import tensorflow as tf  # noqa: PLC0415

        return tf.cast(crop_to_boxes(x, self.crop_boxes(x)), self.compute_dtype)

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "level": self.level, "min_keep": self.min_keep}


PREPROCESSING = ("trim", "lung_crop", "equalize", "clahe", "standardize")  # the layers build_model may put first


def preprocessing_of(model: keras.Model) -> list[str]:
    """The preprocessing layers a built model applies, input side first (an ensemble's: its first member's), e.g.
    ``["lung_crop (rule 3)", "standardize"]``; for the model card."""
    names = [
        f"{layer.name} (rule {layer.revision})" if hasattr(layer, "revision") else layer.name
        for layer in model.layers
        if layer.name in PREPROCESSING
    ]
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return names or (preprocessing_of(members[0]) if members else [])


@dataclass(frozen=True)
class BuiltModel:
    model: keras.Model
    backbone_layers: list[str]  # names, bottom to top; empty for the from-scratch models
    last_conv: str


def _scaled(filters: int, width: float) -> int:
    return max(8, round(filters * width))


def _compact_cnn(
    inputs: keras.KerasTensor, pixels: keras.KerasTensor, n_out: int, dropout: float, width: float = 1.0
) -> BuiltModel:
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(pixels)
    for i, filters in enumerate((32, 64, 128, 128)):
        x = keras.layers.Conv2D(_scaled(filters, width), 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)  # small data: settle fast
        x = keras.layers.Activation("relu", name=f"relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x) if i < 3 else x
    last = "relu3"
    return BuiltModel(_head(inputs, x, n_out, dropout, "compact_cnn"), [], last)


def _residual_block(x: keras.KerasTensor, filters: int, stride: int, name: str) -> keras.KerasTensor:
    """Two 3x3 convs with batch norm, channels re-weighted by squeeze-excitation, added to the shortcut."""
    shortcut = x
    if stride > 1 or x.shape[-1] != filters:  # a 1x1 projection where the shape changes
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(y)
    y = keras.layers.Activation("relu", name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(y)
    squeeze = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(y)
    squeeze = keras.layers.Dense(max(filters // 8, 4), activation="relu", name=f"{name}_se_reduce")(squeeze)
    squeeze = keras.layers.Dense(filters, activation="sigmoid", name=f"{name}_se_expand")(squeeze)
    y = keras.layers.Multiply(name=f"{name}_se")([y, squeeze])
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.Activation("relu", name=f"{name}_out")(y)


def _residual_cnn(
    inputs: keras.KerasTensor, pixels: keras.KerasTensor, n_out: int, dropout: float, width: float = 1.0
) -> BuiltModel:
    """From scratch, CPU-sized: a stride-2 stem, then four residual SE stages (32-256 channels, /16 overall).

    Every output unit sees the whole image at 128 px (the compact CNN's last layer sees about 38 px), so
    the score can rest on the lung fields' extent and not only on local texture.
    """
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(pixels)
    x = keras.layers.Conv2D(_scaled(32, width), 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_relu")(x)
    for i, (filters, stride) in enumerate(((32, 1), (64, 2), (128, 2), (256, 2)), start=1):
        x = _residual_block(x, _scaled(filters, width), stride, f"stage{i}")
    return BuiltModel(_head(inputs, x, n_out, dropout, "residual_cnn"), [], "stage4_out")


def _head(inputs: keras.KerasTensor, features: keras.KerasTensor, n_out: int, dropout: float, name: str) -> keras.Model:
    x = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    activation = "sigmoid" if n_out == 1 else "softmax"
    # float32 output even under mixed precision, for numerically sane losses and probabilities.
    outputs = keras.layers.Dense(n_out, activation=activation, dtype="float32", name="prediction")(x)
    return keras.Model(inputs, outputs, name=name)


FROM_SCRATCH = {"compact_cnn": _compact_cnn, "residual_cnn": _residual_cnn}
assert set(ARCHITECTURES) == {*FROM_SCRATCH, *BACKBONES} and set(SCRATCH_NAMES) == set(FROM_SCRATCH)


DOWNLOAD_LOCK_TIMEOUT = 1800.0  # seconds another process may spend downloading the same weights


def keras_cache() -> Path:
    """The folder ``keras.utils.get_file`` downloads weights to, by its own rule: Keras' home (``KERAS_HOME``
    as read when Keras was imported, else ``~/.keras``), or ``/tmp/.keras`` where that is not writable."""
    from keras.src.backend.config import keras_home  # noqa: PLC0415 - Keras' private accessor, as get_file uses

    base = Path(keras_home()).expanduser()
    if not os.access(base, os.W_OK):
        base = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / ".keras"
    return base / "models"


def imagenet_download_lock(architecture: str) -> contextlib.AbstractContextManager[None]:
    """Keras writes a download straight into its cache file: two trainings starting at once (a sweep, a DVC
    queue) would read each other's half-written weights. One downloads; the others wait, then find it cached.
    Where the cache folder cannot be written at all, no lock (Keras falls back to a temporary folder)."""
    lock = keras_cache() / f".{architecture}.download.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return contextlib.nullcontext()
    return file_lock(lock, DOWNLOAD_LOCK_TIMEOUT, f"ImageNet weights of {architecture}")


def _load_weights_file(built: BuiltModel, path: Path, architecture: str) -> None:
    if not path.is_file():
        raise PipelineError(f"model.weights: {path}: no such file")
    try:
        built.model.load_weights(path, skip_mismatch=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a wrong file
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"model.weights: {path} does not fit architecture {architecture!r} ({first})") from None


def build_model(
    architecture: str,
    image_size: int,
    n_classes: int = 2,
    weights: str = "none",
    dropout: float = 0.3,
    standardize: bool = False,
    equalize: bool = False,
    trim: bool = False,
    clahe: float = 0.0,
    lung_crop: bool = False,
    clahe_tiles: int = 8,
    lung_crop_jitter: float = 0.0,
    width: float = 1.0,
) -> BuiltModel:
    """An uncompiled model; ``weights``: ``none``, ``imagenet`` (backbone only) or a full-model weights file;
    ``trim``, ``lung_crop`` (its box moved by up to ``lung_crop_jitter`` in training), ``equalize`` or
    ``clahe`` (a clip limit; 0: off), ``standardize``: dark margins trimmed, a crop to the lung fields,
    per-image histogram equalization (global or contrast-limited adaptive), then intensity standardization,
    as the model's first layers (so every caller gets them); ``width``: the from-scratch models' channels x this."""
    if architecture not in ARCHITECTURES:
        raise PipelineError(f"model.architecture: unknown {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    n_out = 1 if n_classes == 2 else n_classes
    inputs = keras.Input((image_size, image_size, 1), name="image")
    pixels = TrimDarkMargins(name="trim")(inputs) if trim else inputs
    crop = LungFieldCrop(jitter=lung_crop_jitter, name="lung_crop") if lung_crop else None
    pixels = crop(pixels) if crop else pixels
    pixels = EqualizeHistogram(name="equalize")(pixels) if equalize else pixels
    pixels = ContrastLimitedEqualization(clahe, clahe_tiles, name="clahe")(pixels) if clahe else pixels
    pixels = StandardizeIntensity(name="standardize")(pixels) if standardize else pixels
    if architecture in FROM_SCRATCH:
        if weights == "imagenet":
            raise PipelineError(f"model.weights: {architecture} has no ImageNet weights; use none or a weights file")
        built = FROM_SCRATCH[architecture](inputs, pixels, n_out, dropout, width)
    else:
        if width != 1.0:
            raise PipelineError(f"model.width: only the from-scratch models are widened, not {architecture}")
        spec = BACKBONES[architecture]
        if image_size < spec.min_size:
            raise PipelineError(f"model.image_size: {architecture} needs at least {spec.min_size}, got {image_size}")
        x = BackbonePreprocess(spec.preprocess, name="preprocess")(pixels)
        builder = getattr(keras.applications, spec.builder)
        try:
            with imagenet_download_lock(architecture) if weights == "imagenet" else contextlib.nullcontext():
                base = builder(include_top=False, weights="imagenet" if weights == "imagenet" else None, input_tensor=x)
        except Exception as exc:
            if weights == "imagenet" and ("URL fetch failure" in str(exc) or "urlopen" in str(exc).lower()):
                raise PipelineError(
                    f"model.weights: cannot download ImageNet weights for {architecture} (offline?); "
                    f"put the Keras .h5 file in ~/.keras/models/ or set model.weights to none or a weights file"
                ) from None
            raise
        ours = {layer.name for layer in keras.Model(inputs, x).layers}  # the input and preprocessing layers
        names = [layer.name for layer in base.layers if layer.name not in ours]
        built = BuiltModel(_head(inputs, base.output, n_out, dropout, architecture), names, spec.last_conv)
    if weights not in ("none", "imagenet"):  # relative to the project, as the source stage fingerprints it
        _load_weights_file(built, project_path(weights), architecture)
    return built


def build_from_params(
    mp: ModelParams, n_classes: int = 2, image_size: int | None = None, weights: str | None = None
) -> BuiltModel:
    """``build_model`` with params.yaml's ``model`` section (``image_size``, ``weights``: overrides)."""
    return build_model(
        mp.architecture,
        image_size or mp.image_size,
        n_classes,
        mp.weights if weights is None else weights,
        mp.dropout,
        mp.standardize,
        mp.equalize,
        trim=mp.trim_margins,
        clahe=mp.clahe,
        clahe_tiles=mp.clahe_tiles,
        lung_crop=mp.lung_crop,
        lung_crop_jitter=mp.lung_crop_jitter,
        width=mp.width,
    )


def set_backbone_trainable(built: BuiltModel, top_n: int | None) -> None:
    """Freeze the whole backbone (top_n=0), or unfreeze its top N layers (None, or N past its size: all).
    BatchNorm stays frozen."""
    names = built.backbone_layers
    # max(0, ...): an N past the backbone's size would make a negative start, counted from the end
    unfrozen = set(names if top_n is None else names[max(0, len(names) - top_n) :] if top_n else [])
    for name in names:
        layer = built.model.get_layer(name)
        layer.trainable = name in unfrozen and not isinstance(layer, keras.layers.BatchNormalization)
