"""Training-time augmentation and schedules: intensity jitter, mixup, the cosine schedule (pure logic)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.core.config import AugmentParams, TrainParams
from pipeline.modeling.inputs import IntensityJitter, SplitData, augmenter, make_dataset, mix_batch
from pipeline.modeling.training import learning_rate_schedule


def test_intensity_jitter_stays_in_range_and_varies_per_image() -> None:
    x = tf.constant(np.tile(np.linspace(0, 255, 64, dtype=np.float32), (8, 64, 1))[..., None])
    jitter = IntensityJitter(AugmentParams(brightness=0.3, gamma=0.4, blur=1.5, noise=0.05), seed=3)
    out = jitter(x).numpy()
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
    means = out.mean(axis=(1, 2, 3))
    assert means.std() > 1.0, "each image draws its own exposure and gamma"
    assert not np.allclose(jitter(x).numpy(), out), "a new draw on every call"
    only_gamma = IntensityJitter(AugmentParams(gamma=0.4), seed=3)(x).numpy()
    # Gamma keeps black and white and the order of the grey levels.
    assert np.allclose(only_gamma[:, :, 0], 0, atol=1e-3) and np.allclose(only_gamma[:, :, -1], 255, atol=1e-2)
    assert (np.diff(only_gamma[0, 0, :, 0]) >= 0).all()


def test_random_erasing_replaces_one_patch_in_about_the_asked_share_of_images() -> None:
    """`erase` is the share of images touched (not an upper bound), each losing one rectangle of 2-33% of
    its area; with it at 0 no erasing layer is built."""
    plain = AugmentParams(rotation=0, zoom=0, translation=0, contrast=0)
    assert augmenter(plain, seed=0) is None
    erase = augmenter(plain.model_copy(update={"erase": 0.5}), seed=0)
    x = np.full((400, 64, 64, 1), 200.0, np.float32)
    changed = (erase(x, training=True).numpy() != 200.0).mean(axis=(1, 2, 3))
    touched = changed[changed > 0]
    assert 0.4 < len(touched) / len(x) < 0.6
    assert touched.min() > 0.01 and touched.max() < 0.35, "one patch of 2-33% of the area, not the whole image"
    assert (erase(x, training=False).numpy() == 200.0).all(), "inference leaves images alone"


def test_mixup_mixes_images_labels_and_weights_by_the_same_amount() -> None:
    values, weights = np.array([0.0, 100.0, 200.0, 50.0]), np.array([2.0, 0.5, 1.0, 3.0])
    x = tf.constant(np.stack([np.full((4, 4, 1), v, np.float32) for v in values]))
    y = tf.constant(np.eye(4, dtype=np.float32))  # one class per image: each mixed label names its partner
    mx, my, mw = (
        t.numpy() for t in mix_batch(x, y, tf.constant(weights, tf.float32), 0.4, tf.random.Generator.from_seed(0))
    )
    mixed = 0
    for i in range(4):
        lam = my[i, i]
        assert 0.5 <= lam <= 1.0 and np.isclose(my[i].sum(), 1.0)
        j = int(np.argmax(np.where(np.arange(4) == i, -1, my[i]))) if lam < 1 else i
        assert np.allclose(mx[i], lam * values[i] + (1 - lam) * values[j], atol=1e-3)
        assert np.isclose(mw[i], lam * weights[i] + (1 - lam) * weights[j], atol=1e-5)
        mixed += lam < 0.999
    assert mixed >= 2, "Beta(0.4, 0.4) mixes most pairs"


def test_training_batches_carry_class_weights_as_sample_weights(tmp_path: Path) -> None:
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(paths[-1])
    data = SplitData("train", paths, np.array([0, 1, 1, 1, 0, 1]), ("NORMAL", "PNEUMONIA"))
    table = {0: 1.5, 1: 0.75}
    batches = list(make_dataset(data, 16, 6, training=True, seed=1, weights=table).take(1))  # endless: one epoch
    x, y, w = (t.numpy() for t in batches[0])
    assert x.shape == (6, 16, 16, 1) and sorted(y) == sorted(data.labels)
    assert np.allclose(w, [table[int(v)] for v in y])
    plain = next(iter(make_dataset(data, 16, 6)))  # evaluation batches: images and labels only
    assert len(plain) == 2


def test_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    params = TrainParams(schedule="cosine", warmup_epochs=1)
    schedule = learning_rate_schedule(params, 1e-3, epochs=5, steps_per_epoch=10)
    lr = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert lr[0] < 1e-4 and 4e-4 < lr[1] < 6e-4 and np.isclose(lr[2], 1e-3)  # linear warm-up over epoch 1
    assert lr[2] > lr[3] > lr[4] and lr[4] < 1e-6  # cosine down to zero at the last step
    assert learning_rate_schedule(TrainParams(), 1e-3, 5, 10) == 1e-3  # plateau: a constant the callback halves
    assert isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule)
