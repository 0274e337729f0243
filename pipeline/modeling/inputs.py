"""The tf.data input pipeline: parallel decode and resize, cache, shuffle, batch, augment, prefetch.

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
from pipeline.modeling.preprocess import decode_image

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class SplitData:
    split: str
    paths: list[str]
    labels: np.ndarray  # int class ids
    class_names: tuple[str, ...]
    patients: list[str] = field(default_factory=list)  # scoped patient id of each image

    def __len__(self) -> int:
        return len(self.paths)


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
    if limit is not None and len(rows) > limit:  # stratified, seeded subset
        keep = (
            pd.Series(labels)
            .groupby(labels, group_keys=False)
            .apply(lambda g: g.sample(frac=limit / len(rows), random_state=seed))
            .index.sort_values()
        )
        rows, labels = rows.iloc[keep], labels[keep]
    paths = [str(Path(root) / p) for p in rows["path"]]
    return SplitData(split, paths, labels, TASKS[task], rows["patient_id"].astype(str).tolist())


def augmenter(params: AugmentParams, seed: int) -> tf.keras.Sequential | None:
    layers = []
    if params.rotation:
        layers.append(keras.layers.RandomRotation(params.rotation, fill_mode="constant", seed=seed))
    if params.zoom:
        layers.append(keras.layers.RandomZoom(params.zoom, fill_mode="constant", seed=seed + 1))
    if params.translation:
        layers.append(
            keras.layers.RandomTranslation(params.translation, params.translation, fill_mode="constant", seed=seed + 2)
        )
    if params.contrast:
        layers.append(keras.layers.RandomContrast(params.contrast, value_range=(0, 255), seed=seed + 3))
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
) -> tf.data.Dataset:
    """Batches of (images, labels); shuffled and augmented only when `training`."""
    n_classes = len(data.class_names)
    ds = tf.data.Dataset.from_tensor_slices((data.paths, data.labels))
    ds = ds.map(
        lambda p, y: (decode_image(tf.io.read_file(p), image_size), y), num_parallel_calls=AUTOTUNE, deterministic=True
    )
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, num_parallel_calls=AUTOTUNE)
    aug = augmenter(augment, seed) if training and augment else None
    if aug is not None:
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=AUTOTUNE)
    if one_hot:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, n_classes)), num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (x, tf.cast(y, tf.float32)), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Inverse-frequency weights from the training counts: n / (k * count)."""
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        missing = [i for i, c in enumerate(counts) if c == 0]
        raise DataError(f"train split has no images of class id(s) {missing}: cannot weight classes")
    return {i: float(len(labels) / (n_classes * c)) for i, c in enumerate(counts)}
