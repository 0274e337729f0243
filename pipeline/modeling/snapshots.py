"""Snapshot ensembles (Huang et al. 2017): several networks for the price of one training.

``train.snapshots: K`` splits the epochs into K cosine cycles, each restarting at the full learning rate
and annealing to 0; the weights at each cycle's end (a minimum the next restart leaves) are kept. After
training the K snapshots are joined into one Keras model whose output is the mean of their logits:

    image -> snapshot1 .. snapshotK (each: its preprocessing and convolutions up to its last conv layer)
          -> ensemble_conv (their feature maps side by side) -> gap -> prediction

``prediction`` holds the snapshots' output kernels stacked and divided by K, and their mean bias, so its
logit is exactly the average of theirs. The joined model keeps the single model's layout: ``gap`` gives
the pooled features drift and out-of-distribution checks use, and Grad-CAM on ``ensemble_conv`` is the
sum of each snapshot's map weighted as the ensemble weights it. Predict, serve, the pyfunc and every
evaluation use it as they use one network; a prediction costs K forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from pipeline.core.atomic import staged_file
from pipeline.core.errors import PipelineError

ENSEMBLE_CONV = "ensemble_conv"


def cycle_epochs(epochs: int, snapshots: int) -> int:
    """Epochs per cosine cycle (the config refuses a `snapshots` that does not divide `epochs`)."""
    return epochs // snapshots


def cyclic_schedule(
    learning_rate: float, epochs: int, snapshots: int, steps_per_epoch: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    """`snapshots` equal cosine cycles from `learning_rate` down to 0, each restarting at the full rate."""
    return keras.optimizers.schedules.CosineDecayRestarts(
        learning_rate,
        first_decay_steps=cycle_epochs(epochs, snapshots) * steps_per_epoch,
        t_mul=1.0,
        m_mul=1.0,
        alpha=0.0,
    )


def snapshot_path(folder: Path, number: int) -> Path:
    return folder / f"snapshot-{number}.weights.h5"


class SnapshotSaver(keras.callbacks.Callback):
    """Writes the weights at the end of every cycle (after weight averaging swapped its average in).

    Each file is staged and renamed, so an interrupted run never leaves a half-written snapshot for its
    resume to join.
    """

    def __init__(self, folder: Path, cycle: int) -> None:
        super().__init__()
        self.folder, self.cycle = folder, cycle

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        if (epoch + 1) % self.cycle:
            return
        with staged_file(snapshot_path(self.folder, (epoch + 1) // self.cycle)) as tmp:
            self.model.save_weights(tmp)


def load_members(build: Callable[[], keras.Model], folder: Path, snapshots: int) -> list[keras.Model]:
    """The `snapshots` networks saved in `folder`, each a fresh model from `build` with its weights."""
    members = []
    for number in range(1, snapshots + 1):
        path = snapshot_path(folder, number)
        if not path.is_file():
            raise PipelineError(f"{path}: snapshot {number} of {snapshots} was not written; train again")
        member = build()
        member.load_weights(path)
        members.append(member)
    return members


def join(members: Sequence[keras.Model], last_conv: str) -> keras.Model:
    """One model whose logit is the mean of the members' (same architecture, `gap -> prediction` head)."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    first = members[0]
    inputs = keras.Input(first.input.shape[1:], name="image")
    maps = [
        keras.Model(member.input, member.get_layer(last_conv).output, name=f"snapshot{i}")(inputs)
        for i, member in enumerate(members, start=1)
    ]
    x = keras.layers.Concatenate(name=ENSEMBLE_CONV)(maps)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    head = first.get_layer("prediction")
    prediction = keras.layers.Dense(head.units, activation=head.activation, dtype="float32", name="prediction")
    outputs = prediction(x)
    heads = [member.get_layer("prediction") for member in members]
    kernel = np.concatenate([np.asarray(h.kernel) for h in heads], axis=0) / len(members)
    bias = np.mean([np.asarray(h.bias) for h in heads], axis=0)
    prediction.set_weights([kernel, bias])
    return keras.Model(inputs, outputs, name=f"{first.name}_x{len(members)}")
