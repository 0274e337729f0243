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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import keras
import numpy as np

from pipeline.core.atomic import staged_file
from pipeline.core.errors import PipelineError
from pipeline.modeling.selection import epochs_done

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
    resume to join. A kill between a cycle end's backup and its snapshot: the resume writes the snapshot from
    the weights the backup restored (`average`: the optimizer's weight average, as the epoch's end saved it).
    """

    def __init__(self, folder: Path, cycle: int, average: bool = False) -> None:
        super().__init__()
        self.folder, self.cycle, self.average = folder, cycle, average

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        done = epochs_done(self.model)  # after BackupAndRestore restored the weights
        if done and not done % self.cycle and not snapshot_path(self.folder, done // self.cycle).is_file():
            with averaged_weights(self.model) if self.average else nullcontext():
                self._save(done)

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        if not (epoch + 1) % self.cycle:
            self._save(epoch + 1)

    def _save(self, epochs: int) -> None:
        with staged_file(snapshot_path(self.folder, epochs // self.cycle)) as tmp:
            self.model.save_weights(tmp)


@contextmanager
def averaged_weights(model: keras.Model) -> Iterator[None]:
    """The optimizer's weight averages (``use_ema``) in the model's trainable weights, the raw ones back after."""
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # under a LossScaleOptimizer
    pairs = list(zip(optimizer._trainable_variables, optimizer._model_variables_moving_average, strict=True))
    raw = [keras.ops.convert_to_numpy(var) for var, _ in pairs]
    for var, average in pairs:
        var.assign(average)
    try:
        yield
    finally:
        for (var, _), value in zip(pairs, raw, strict=True):
            var.assign(value)


def load_members(build: Callable[[], keras.Model], folder: Path, snapshots: int) -> list[keras.Model]:
    """The `snapshots` networks saved in `folder`, each a fresh model from `build` with its weights."""
    members = []
    for number in range(1, snapshots + 1):
        path = snapshot_path(folder, number)
        if not path.is_file():
            raise PipelineError(
                f"{path}: snapshot {number} of {snapshots} was not written; as a last resort delete "
                f"{folder.parent} (train.resume_dir/<key>) and train again from the start"
            )
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
