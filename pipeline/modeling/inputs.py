"""The tf.data input pipeline: parallel decode and resize, batch, cache, shuffle, augment, prefetch.

``preprocess.decode_image`` is the one preprocessing function: training, evaluation and prediction all feed
the model (H, W, 1) float32 in [0, 255], stretched to a square as in the published data set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline.core.config import TASKS, AugmentParams
from pipeline.core.errors import DataError
from pipeline.modeling import records
from pipeline.modeling.preprocess import decode_image, resize_method

AUTOTUNE = tf.data.AUTOTUNE

try:  # Dataset.unbatch without its identity map for dense elements (below)
    from tensorflow.python.data.ops.unbatch_op import _UnbatchDataset
except ImportError:  # pragma: no cover - a TensorFlow that moved it: the public op, one map more
    _UnbatchDataset = None


def _lean_options() -> tf.data.Options:
    """No tf.data graph rewrites. Each new iterator otherwise serialises and rewrites the whole pipeline
    first: 18-20 ms for this one, a tenth of a first pass over 1,024 images. What the default rewrites
    would add is written out instead: every map parallel, a prefetch at the end, no no-op stages."""
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    return options


def batch_map(fn: tf.types.experimental.ConcreteFunction, items: tf.Tensor, spec: tf.TensorSpec) -> tf.Tensor:
    """`fn` over every element of the batch `items` (in a tf.data function), as one ``MapDefun`` op: what
    ``tf.map_fn`` computes, without its while loop, which Grappler optimises again for every new iterator
    (iterator creation 16 against 34 ms; the same pixels; later batches faster too)."""
    fn.add_to_graph(tf.compat.v1.get_default_graph())  # the op calls `fn` by name: it joins this library
    (out,) = tf.raw_ops.MapDefun(
        arguments=[items], captured_inputs=[], output_types=[spec.dtype], output_shapes=[spec.shape], f=fn
    )
    return out


def _unbatch(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds.unbatch()`` for dense tensors. The public op first maps every batch through an identity
    (``normalize_to_dense``) that only a graph rewrite removes; without rewrites that sequential map
    doubles a cached epoch (52 against 25 ms for 1,024 images)."""
    return _UnbatchDataset(ds) if _UnbatchDataset is not None else ds.unbatch()


@dataclass(frozen=True)
class SplitData:
    split: str
    paths: list[str]
    labels: np.ndarray  # int class ids
    class_names: tuple[str, ...]
    patients: list[str] = field(default_factory=list)  # scoped patient id of each image
    keys: list[str] = field(default_factory=list)  # each image's path as the index writes it (relative to root)
    shards: tuple[str, ...] = ()  # TFRecord files holding these images (records.py): stream from them, not paths
    compression: str = "none"  # the shards' TFRecord compression
    long_sides: list[int] = field(default_factory=list)  # each image's longer side in pixels, as indexed

    def __len__(self) -> int:
        return len(self.paths)


def cache_megabytes(n_images: int, image_size: int, training: bool) -> float:
    """Memory held by ``make_dataset(cache=True)`` for `n_images` decoded images (uint8, one channel); training
    holds them twice (the cache, and the buffer that reshuffles it each epoch)."""
    return (2 if training else 1) * n_images * image_size**2 / 2**20


def fits_in_memory(n_images: int, image_size: int, limit_mb: float, training: bool) -> bool:
    """Whether a split's decoded images may be cached within `limit_mb` (``train.memory_cache_mb``)."""
    return cache_megabytes(n_images, image_size, training) <= limit_mb


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Batches in one pass over `n_images` (the last one partial): the epoch of a training dataset."""
    return -(-n_images // batch_size)


def class_ids(rows: pd.DataFrame, task: str) -> np.ndarray:
    if task == "binary":
        return (rows["label"] == "PNEUMONIA").to_numpy(dtype=np.int64)
    unknown = rows[(rows["label"] == "PNEUMONIA") & ~rows["subtype"].isin(["bacteria", "virus"])]
    if len(unknown):
        raise DataError(
            f"task three_class: {len(unknown)} PNEUMONIA images have no bacteria/virus in their "
            f"file name, e.g. {unknown['path'].iloc[0]}"
        )
    return rows["subtype"].map({"none": 0, "bacteria": 1, "virus": 2}).to_numpy(dtype=np.int64)


def split_data(
    index: pd.DataFrame, split: str, root: str | Path, task: str, limit: int | None = None, seed: int = 0
) -> SplitData:
    """The decodable images of one split (quarantined files never reach a model)."""
    rows = index[(index["split"] == split) & index["decodable"]].sort_values("path")
    if rows.empty:
        raise DataError(f"split {split!r} has no usable images in the index (see reports/validation.json)")
    labels = class_ids(rows, task)
    if limit is not None and len(rows) > limit:  # stratified, seeded subset; every class keeps one image at least
        keep = (
            pd.Series(labels)
            .groupby(labels, group_keys=False)
            .apply(lambda g: g.sample(n=max(1, round(limit * len(g) / len(rows))), random_state=seed))
            .index.sort_values()
        )
        rows, labels = rows.iloc[keep], labels[keep]
    paths = [str(Path(root) / p) for p in rows["path"]]
    sides = rows[["width", "height"]].max(axis=1).astype(int).tolist() if {"width", "height"} <= set(rows) else []
    return SplitData(
        split,
        paths,
        labels,
        TASKS[task],
        rows["patient_id"].astype(str).tolist(),
        rows["path"].astype(str).tolist(),
        long_sides=sides,
    )


class IntensityJitter(keras.layers.Layer):
    """What differs between X-ray machines and exports, drawn per image: exposure (brightness), gamma,
    sharpness (a blend towards a Gaussian blur) and sensor noise. Inputs and outputs are in [0, 255]."""

    def __init__(self, params: AugmentParams, seed: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.p = params
        self.seeds = keras.random.SeedGenerator(seed)
        sigma = max(params.blur, 1e-3)
        radius = max(1, round(2 * sigma))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        self.kernel = (taps / taps.sum()).astype("float32")

    def _uniform(self, batch: tf.Tensor, low: float, high: float) -> tf.Tensor:
        return keras.random.uniform((batch, 1, 1, 1), low, high, seed=self.seeds)

    def call(self, x):
        p, batch = self.p, tf.shape(x)[0]
        if p.brightness:
            x = x * self._uniform(batch, 1 - p.brightness, 1 + p.brightness)
        if p.gamma:
            log_g = float(-np.log(1 - p.gamma))
            x = 255.0 * tf.pow(tf.clip_by_value(x, 0.0, 255.0) / 255.0, tf.exp(self._uniform(batch, -log_g, log_g)))
        if p.blur:
            k = tf.constant(self.kernel)
            blurred = tf.nn.conv2d(x, tf.reshape(k, (-1, 1, 1, 1)), 1, "SAME")
            blurred = tf.nn.conv2d(blurred, tf.reshape(k, (1, -1, 1, 1)), 1, "SAME")
            amount = self._uniform(batch, 0.0, 1.0)
            x = amount * blurred + (1 - amount) * x
        if p.noise:
            sd = self._uniform(batch, 0.0, p.noise * 255.0)
            x = x + sd * keras.random.normal(tf.shape(x), seed=self.seeds)
        return tf.clip_by_value(x, 0.0, 255.0)


def augmenter(params: AugmentParams, seed: int) -> tf.keras.Sequential | None:
    layers = []
    if params.rotation:
        layers.append(keras.layers.RandomRotation(params.rotation, fill_mode="constant", seed=seed))
    if params.zoom:
        layers.append(keras.layers.RandomZoom(params.zoom, fill_mode="constant", seed=seed + 1))
    if params.aspect:  # the frame cropped along each axis on its own: originals of another aspect, stretched
        a = (-params.aspect, 0.0)
        layers.append(keras.layers.RandomZoom(a, a, fill_mode="constant", seed=seed + 7))
    if params.translation:
        layers.append(
            keras.layers.RandomTranslation(params.translation, params.translation, fill_mode="constant", seed=seed + 2)
        )
    if params.contrast:
        layers.append(keras.layers.RandomContrast(params.contrast, value_range=(0, 255), seed=seed + 3))
    if params.erase:  # random erasing: no single patch (a marker, a border, one lobe) can carry the label
        layers.append(keras.layers.RandomErasing((params.erase, params.erase), value_range=(0, 255), seed=seed + 8))
    if params.brightness or params.gamma or params.blur or params.noise:
        layers.append(IntensityJitter(params, seed + 4, name="intensity"))
    return keras.Sequential(layers, name="augment") if layers else None


def make_dataset(
    data: SplitData,
    image_size: int,
    batch_size: int,
    *,
    training: bool = False,
    augment: AugmentParams | None = None,
    seed: int = 0,
    cache: bool = True,
    one_hot: bool = False,
    weights: dict[int, float] | None = None,
    mixup: float = 0.0,
    shuffle_buffer: int = 4096,
    deterministic: bool = True,
) -> tf.data.Dataset:
    """Batches of (images, labels) or, with class `weights`, (images, labels, sample weights).

    Not `training`: one pass in ``data`` order, batches cached in memory after the first (`cache`).
    `training`: endless, reshuffled every epoch (``steps_per_epoch`` batches), augmented and (``mixup``
    > 0) mixed; fit it with ``steps_per_epoch``. Images are decoded a batch per call, batches in
    parallel. The first epoch reads the files in a shuffled order (``data.paths``) or streams the shards'
    records shuffled in a buffer of `shuffle_buffer` (``data.shards``). With `cache` the decoded images
    are kept (uint8) and later epochs reshuffle the whole cached split, never decoding again; without it
    every epoch decodes again and memory stays flat (``fits_in_memory`` decides for training).
    """
    n_classes = len(data.class_names)
    method = resize_method(data.long_sides, image_size) if len(data.long_sides) == len(data) else "auto"
    table = tf.constant([(weights or {}).get(i, 1.0) for i in range(n_classes)], tf.float32)
    carry_weights = weights is not None or (training and mixup > 0)  # mixup blends the weights too

    # Cached images are held as uint8 (exact: decode_image gives whole gray levels), a quarter of the
    # memory, and become float32 batch by batch after the cache.
    dtype = tf.uint8 if cache else tf.float32

    spec = tf.TensorSpec((image_size, image_size, 1), dtype)

    def decoder(from_paths: bool) -> tf.types.experimental.ConcreteFunction:
        def one(item: tf.Tensor) -> tf.Tensor:
            image = decode_image(tf.io.read_file(item) if from_paths else item, image_size, method)
            return tf.cast(image, dtype)

        return tf.function(one, input_signature=[tf.TensorSpec([], tf.string)], autograph=False).get_concrete_function()

    def examples(
        images: tf.Tensor, y: tf.Tensor, *, one: tf.types.experimental.ConcreteFunction
    ) -> tuple[tf.Tensor, ...]:
        """A batch of encoded images (or of their paths) -> decoded images, targets and class weights.
        One call per batch, not per image: tf.data's per-element overhead is paid once per batch."""
        x = batch_map(one, images, spec)
        target = tf.one_hot(y, n_classes) if one_hot else tf.cast(y, tf.float32)
        return (x, target, tf.gather(table, y)) if carry_weights else (x, target)

    order = deterministic or not training
    if data.shards:
        ds = records.stream(
            list(data.shards),
            data.keys,
            data.labels.tolist(),
            compression=data.compression,
            training=training,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            deterministic=deterministic,
        )
        # The record filter hides the count: state it (Keras then knows where an epoch ends), checked on
        # every pass, so shards that lack a record fail loudly instead of training on less.
        ds = ds.apply(tf.data.experimental.assert_cardinality(len(data)))
        from_bytes = decoder(from_paths=False)
        decode = lambda images, y: examples(images, y, one=from_bytes)  # noqa: E731
        ds = ds.batch(batch_size).map(decode, num_parallel_calls=AUTOTUNE, deterministic=order)
    else:
        ds = tf.data.Dataset.from_tensor_slices((data.paths, data.labels))
        if training:  # reshuffled whenever the files are read again
            ds = ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
        from_files = decoder(from_paths=True)
        read = lambda paths, y: examples(paths, y, one=from_files)  # noqa: E731
        ds = ds.batch(batch_size).map(read, num_parallel_calls=AUTOTUNE, deterministic=order)
    if cache:
        ds = ds.cache()
    if training and cache:  # later epochs: every cached image reshuffled, nothing read or decoded again
        reshuffled = _unbatch(ds).shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
        ds = ds.concatenate(reshuffled.batch(batch_size).repeat())
    elif training:
        ds = ds.repeat()
    if cache:
        ds = ds.map(lambda x, *rest: (tf.cast(x, tf.float32), *rest), num_parallel_calls=AUTOTUNE)
    aug = augmenter(augment, seed) if training and augment else None
    if aug is not None:
        ds = ds.map(lambda x, *rest: (aug(x, training=True), *rest), num_parallel_calls=AUTOTUNE)
    if training and augment and augment.class_aspect:
        frame_seed = tf.random.Generator.from_seed(seed + 6)
        reframe = lambda x, y, *rest: (reframe_batch(x, y, augment.class_aspect, frame_seed), y, *rest)  # noqa: E731
        ds = ds.map(reframe, num_parallel_calls=AUTOTUNE)
    if training and mixup:
        mix_seed = tf.random.Generator.from_seed(seed + 5)
        ds = ds.map(lambda x, y, w: mix_batch(x, y, w, mixup, mix_seed), num_parallel_calls=AUTOTUNE)
        if weights is None:
            ds = ds.map(lambda x, y, w: (x, y), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE).with_options(_lean_options())


MAX_REFRAME = 1.5  # pneumonia originals: median width/height 1.50; normal ones 1.20 (48 full-size files)


def reframe_batch(x: tf.Tensor, y: tf.Tensor, share: float, rng: tf.random.Generator) -> tf.Tensor:
    """Against the stretch shortcut: pneumonia originals are wider than normal ones, so once stretched to
    a square the chest's proportions tell the classes apart. A `share` of the images is reframed as the
    other class's would be: a normal one as if its original were up to `MAX_REFRAME` times wider (the
    height cropped, stretched back), a pneumonia one as if taller (the width cropped), the factor drawn
    log-uniform per image. Then the proportions carry no label. Labels: 0/1, or one-hot with NORMAL first."""
    batch = tf.shape(x)[0]
    normal = tf.equal(y[:, 0], 1.0) if len(y.shape) > 1 else tf.equal(y, 0.0)
    draws = tf.random.stateless_uniform((2, batch), rng.make_seeds(1)[:, 0])
    keep = tf.exp(-draws[1] * float(np.log(MAX_REFRAME)))  # the kept fraction of the cropped axis
    keep = tf.where(draws[0] < share, keep, 1.0)
    keep_h, keep_w = tf.where(normal, keep, 1.0), tf.where(normal, 1.0, keep)
    boxes = tf.stack([(1 - keep_h) / 2, (1 - keep_w) / 2, (1 + keep_h) / 2, (1 + keep_w) / 2], axis=1)
    size = tf.shape(x)[1:3]
    return tf.image.crop_and_resize(x, boxes, tf.range(batch), size)


def mix_batch(
    x: tf.Tensor, y: tf.Tensor, w: tf.Tensor, alpha: float, rng: tf.random.Generator
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Mixup (Zhang et al. 2018): each image blended with another of the batch by lam ~ Beta(a, a); its
    label and class weight mixed by the same lam (lam >= 0.5, so the image keeps its own identity)."""
    batch = tf.shape(x)[0]
    a, b = (tf.random.stateless_gamma((batch,), rng.make_seeds(1)[:, 0], alpha) for _ in range(2))
    lam = a / tf.maximum(a + b, 1e-12)  # Beta(a, a) from two Gamma(a) draws
    lam = tf.maximum(lam, 1.0 - lam)
    order = tf.random.experimental.stateless_shuffle(tf.range(batch), rng.make_seeds(1)[:, 0])
    mix_y = tf.reshape(lam, [-1] + [1] * (len(y.shape) - 1))
    x = tf.reshape(lam, (-1, 1, 1, 1)) * x + tf.reshape(1 - lam, (-1, 1, 1, 1)) * tf.gather(x, order)
    y = mix_y * y + (1 - mix_y) * tf.gather(y, order)
    w = lam * w + (1 - lam) * tf.gather(w, order)
    return x, y, w


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Inverse-frequency weights from the training counts: n / (k * count)."""
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        missing = [i for i, c in enumerate(counts) if c == 0]
        raise DataError(f"train split has no images of class id(s) {missing}: cannot weight classes")
    return {i: float(len(labels) / (n_classes * c)) for i, c in enumerate(counts)}
