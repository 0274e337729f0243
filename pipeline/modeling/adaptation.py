"""Test-time adaptation: a network's first batch-norm statistics re-estimated on unlabelled target images.

Batch normalization scales each channel by the mean and variance it saw in training. Where a hospital's
images differ in framing or exposure, the first layers' statistics are the ones that shift most, and the
ones that carry least about the class (Li et al. 2016, "Revisiting batch normalization for practical domain
adaptation"; Schneider et al. 2020). ``adapt_batch_norm`` replaces the moving mean and variance of the
first `layers` BatchNormalization layers of each network (each member of an ensemble) with those of
their inputs over the given images, layer after layer (each measured with the ones before it already
adapted), and changes nothing else. No labels are used, but the images are the ones then scored, so
the figures are transductive: they say how the model does after seeing that folder, not before.

Measured, not offered: ``benchmarks/adaptation.py`` scores the stress sets with it. It raised the ranking
of the set framed against the class for every model tried, but moved each model's operating point its
own way (four of six lost much of their sensitivity at the registered threshold), and a threshold for
adapted scores would need labels from the hospital (docs/robustness.md, thirteenth round).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np


@dataclass(frozen=True)
class Adapted:
    layers: list[str]  # the adapted layers, "network/layer"
    images: int
    largest_shift: float  # max over channels of |new mean - old mean| / old standard deviation

    def describe(self) -> str:
        return (
            f"batch-norm statistics of {len(self.layers)} layers re-estimated on the {self.images} scored images "
            f"(largest mean shift {self.largest_shift:.2f} standard deviations)"
        )


def networks(model: keras.Model) -> list[keras.Model]:
    """The networks whose layers are adapted: an ensemble's members, or the model itself."""
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return members or [model]


def first_batch_norms(network: keras.Model, layers: int) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization)][:layers]


def _input_moments(features: keras.Model, images: np.ndarray, axis: int, batch_size: int) -> tuple[np.ndarray, ...]:
    """Per-channel mean and (population) variance of `features` over all `images`, accumulated in float64."""
    total = total_sq = None
    count = 0
    for start in range(0, len(images), batch_size):
        a = np.asarray(features(images[start : start + batch_size], training=False), np.float64)
        a = np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])
        total = a.sum(0) if total is None else total + a.sum(0)
        total_sq = (a * a).sum(0) if total_sq is None else total_sq + (a * a).sum(0)
        count += len(a)
    mean = total / count
    return mean, np.maximum(total_sq / count - mean * mean, 0.0)


def adapt_batch_norm(model: keras.Model, images: np.ndarray, layers: int, batch_size: int = 64) -> Adapted:
    """Re-estimate, in place, the first `layers` batch-norm layers of each network of `model` on `images`
    ((n, size, size, 1) model inputs); raises ValueError where there is nothing to adapt."""
    if layers < 1:
        raise ValueError(f"layers: at least 1, got {layers}")
    if len(images) < 2:
        raise ValueError(f"adapting batch-norm statistics needs at least 2 images, got {len(images)}")
    x = np.asarray(images, np.float32)
    names, shift = [], 0.0
    for network in networks(model):
        found = first_batch_norms(network, layers)
        if not found:
            raise ValueError(f"{network.name}: no BatchNormalization layer to adapt")
        for bn in found:
            axis = bn.axis[0] if isinstance(bn.axis, list | tuple) else bn.axis
            mean, var = _input_moments(keras.Model(network.input, bn.input), x, axis, batch_size)
            old_mean, old_var = np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)
            shift = max(shift, float(np.max(np.abs(mean - old_mean) / np.sqrt(old_var + bn.epsilon))))
            bn.moving_mean.assign(mean.astype(old_mean.dtype))
            bn.moving_variance.assign(var.astype(old_var.dtype))
            names.append(f"{network.name}/{bn.name}")
    return Adapted(names, len(x), shift)
