"""Test-time batch-norm adaptation (pipeline/modeling/adaptation.py) on small real Keras models."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.modeling.adaptation import adapt_batch_norm, first_batch_norms, networks
from pipeline.modeling.models import build_model
from pipeline.modeling.snapshots import join


def _images(n: int = 23, size: int = 32, seed: int = 0) -> np.ndarray:
    """Brighter, lower-contrast images than a fresh network's unit statistics expect."""
    rng = np.random.default_rng(seed)
    return (150 + 40 * rng.random((n, size, size, 1))).astype(np.float32)


def _moments(model: keras.Model, tensor: keras.KerasTensor, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(keras.Model(model.input, tensor)(x, training=False), np.float64).reshape(-1, tensor.shape[-1])
    return a.mean(0), a.var(0)


def test_first_layers_take_the_images_statistics_and_nothing_else_moves() -> None:
    model = build_model("compact_cnn", 32).model  # no standardization: the raw grey levels reach bn0's input
    x = _images()
    before = {w.path: np.asarray(w) for w in model.weights}
    bn0, bn1, bn2, bn3 = first_batch_norms(model, 4)
    done = adapt_batch_norm(model, x, 2, batch_size=7)  # batches of 7, 7, 7, 2: the moments are accumulated
    assert done.layers == [f"{model.name}/{bn0.name}", f"{model.name}/{bn1.name}"] and done.images == 23
    # The fresh network expected mean 0 and variance 1: the shift is the largest new mean in those units
    largest = max(float(np.abs(np.asarray(bn.moving_mean)).max()) for bn in (bn0, bn1)) / np.sqrt(1 + bn0.epsilon)
    assert done.largest_shift == pytest.approx(largest, rel=1e-5) and done.largest_shift > 0.1
    for bn in (bn0, bn1):  # each measured with the layers before it already adapted
        mean, var = _moments(model, bn.input, x)
        np.testing.assert_allclose(np.asarray(bn.moving_mean), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(bn.moving_variance), var, rtol=1e-3, atol=1e-5)
    # What that means: on these images the adapted layers' outputs are standardized per channel again
    # (gamma 1, beta 0 in a fresh network; variance var / (var + epsilon))
    mean, var = _moments(model, bn1.output, x)
    np.testing.assert_allclose(mean, 0.0, atol=1e-3)
    kept = np.asarray(bn1.moving_variance, np.float64)
    np.testing.assert_allclose(var, kept / (kept + bn1.epsilon), rtol=1e-3, atol=1e-6)
    adapted = {bn0.moving_mean.path, bn0.moving_variance.path, bn1.moving_mean.path, bn1.moving_variance.path}
    for w in model.weights:
        same = np.array_equal(np.asarray(w), before[w.path])
        assert same != (w.path in adapted), w.path  # the four adapted statistics changed, every other weight kept
    assert {bn2.name, bn3.name}.isdisjoint(name.split("/")[1] for name in done.layers)


def test_every_member_of_an_ensemble_is_adapted() -> None:
    members = [build_model("compact_cnn", 32).model for _ in range(2)]
    for i, member in enumerate(members):  # distinct weights, so the members' inputs to bn1 differ
        member.set_weights([w + 0.01 * i for w in member.get_weights()])
    ensemble = join(members, "relu3")
    assert len(networks(ensemble)) == 2
    x = _images(n=9)
    done = adapt_batch_norm(ensemble, x, 2)
    assert len(done.layers) == 4 and {name.split("/")[0] for name in done.layers} == {"snapshot1", "snapshot2"}
    for network in networks(ensemble):
        bn1 = first_batch_norms(network, 2)[1]
        mean, _ = _moments(network, bn1.input, x)
        np.testing.assert_allclose(np.asarray(bn1.moving_mean), mean, rtol=1e-4, atol=1e-5)


def test_nothing_to_adapt_is_refused() -> None:
    inputs = keras.Input((8, 8, 1))
    plain = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)), name="plain")
    with pytest.raises(ValueError, match="plain: no BatchNormalization layer"):
        adapt_batch_norm(plain, np.zeros((4, 8, 8, 1), np.float32), 1)
    model = build_model("compact_cnn", 32).model
    with pytest.raises(ValueError, match="at least 1"):
        adapt_batch_norm(model, _images(), 0)
    with pytest.raises(ValueError, match="at least 2 images"):
        adapt_batch_norm(model, _images(n=1), 1)
