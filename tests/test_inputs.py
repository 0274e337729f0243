"""The training input pipeline's epochs and the resize specialisation (pure logic on tiny images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline.modeling import preprocess
from pipeline.modeling.inputs import SplitData, make_dataset, steps_per_epoch


def _distinct_images(folder: Path, n: int, side: int = 24) -> SplitData:
    """n flat gray images whose value is 10 * i, so each decoded image names itself."""
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(np.full((side, side), 10 * i, np.uint8)).save(paths[-1])
    return SplitData("train", paths, np.arange(n) % 2, ("NORMAL", "PNEUMONIA"), long_sides=[side] * n)


def _epochs(ds, steps: int, count: int) -> list[list[int]]:
    """The image ids of `count` consecutive epochs read from one iterator, as Keras's fit does."""
    it = iter(ds)
    return [[round(v) // 10 for _ in range(steps) for v in next(it)[0].numpy()[:, 0, 0, 0]] for _ in range(count)]


@pytest.mark.parametrize("cache", [True, False])
def test_training_batches_are_endless_epochs_each_a_new_permutation(tmp_path: Path, cache: bool) -> None:
    data = _distinct_images(tmp_path, 11)
    steps = steps_per_epoch(len(data), 4)
    assert steps == 3
    epochs = _epochs(make_dataset(data, 8, 4, training=True, seed=2, cache=cache), steps, 4)
    for order in epochs:
        assert sorted(order) == list(range(11)), "every image exactly once per epoch"
    assert len({tuple(o) for o in epochs}) == 4, "reshuffled every epoch, the first (decode) pass included"
    again = _epochs(make_dataset(data, 8, 4, training=True, seed=2, cache=cache), steps, 4)
    assert again == epochs, "the same seed gives the same sequence of epochs"


def test_evaluation_batches_are_one_pass_in_order(tmp_path: Path) -> None:
    data = _distinct_images(tmp_path, 7)
    ds = make_dataset(data, 8, 3)
    for _ in range(2):  # the second pass reads the cache
        ids = [round(v) // 10 for x, _ in ds for v in x.numpy()[:, 0, 0, 0]]
        assert ids == list(range(7))


def test_batches_hold_what_decode_image_gives_each_file(tmp_path: Path) -> None:
    """The batch-wise decode (one MapDefun op per batch) is the one preprocessing function, image by image:
    textured JPEGs and PNGs of several sizes, gray and RGB, a partial last batch."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (side, mode, ext) in enumerate(
        [(40, "L", "jpeg"), (23, "RGB", "png"), (64, "L", "png"), (31, "RGB", "jpeg")] * 2
    ):
        pixels = rng.integers(0, 256, (side, side + i, 3 if mode == "RGB" else 1), np.uint8).squeeze()
        paths.append(str(tmp_path / f"{i}.{ext}"))
        Image.fromarray(pixels, mode).save(paths[-1])
    data = SplitData("test", paths, np.zeros(len(paths), int), ("NORMAL", "PNEUMONIA"))
    got = np.concatenate([x.numpy() for x, _ in make_dataset(data, 16, 3)])
    assert got.shape == (8, 16, 16, 1) and got.dtype == np.float32
    for path, image in zip(paths, got, strict=True):
        expected = preprocess.decode_image(tf.io.read_file(path), 16).numpy()
        np.testing.assert_array_equal(image, expected, err_msg=path)


def test_resize_method_is_what_auto_picks_for_every_image(tmp_path: Path) -> None:
    assert preprocess.resize_method([300, 256], 128) == "area"
    assert preprocess.resize_method([255, 224, 60], 128) == "bilinear"
    assert preprocess.resize_method([224, 300], 128) == "auto"
    assert preprocess.resize_method([], 128) == "auto"
    rng = np.random.default_rng(0)
    for shape, method in (((224, 200), "bilinear"), ((300, 260), "area")):
        path = tmp_path / f"{shape[0]}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        raw = tf.io.read_file(str(path))
        auto = preprocess.decode_image(raw, 128).numpy()
        assert np.array_equal(auto, np.round(auto)), "whole gray levels: the cache holds them as uint8"
        np.testing.assert_array_equal(preprocess.decode_image(raw, 128, method).numpy(), auto)
        other = "area" if method == "bilinear" else "bilinear"
        assert not np.array_equal(preprocess.decode_image(raw, 128, other).numpy(), auto)


@pytest.mark.parametrize(("normal", "pneumonia", "limit"), [(50, 50, 1), (25, 75, 1), (25, 75, 2), (30, 70, 10)])
def test_a_small_subset_keeps_every_class(normal: int, pneumonia: int, limit: int) -> None:
    """train.max_images_per_split samples each class in proportion; rounding never drops a class (a one-class
    split would fail later, naming the class, not the limit)."""
    import pandas as pd

    from pipeline.modeling.inputs import split_data

    n = normal + pneumonia
    index = pd.DataFrame(
        {
            "path": [f"train/{'NORMAL' if i < normal else 'PNEUMONIA'}/{i:03d}.jpeg" for i in range(n)],
            "split": "train",
            "label": ["NORMAL"] * normal + ["PNEUMONIA"] * pneumonia,
            "subtype": ["none"] * normal + ["bacteria"] * pneumonia,
            "decodable": True,
            "patient_id": [f"p{i}" for i in range(n)],
        }
    )
    subset = split_data(index, "train", "/data", "binary", limit=limit, seed=0)
    assert set(subset.labels.tolist()) == {0, 1}
    assert len(subset.labels) <= limit + 1  # rounding, and one image of a class that rounded to none
