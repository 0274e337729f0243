"""Training edge cases: kills at awkward instants, restored epochs in the run, what a resumed run reports."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from pipeline.core.config import TrainParams
from pipeline.modeling import snapshots, training
from pipeline.modeling.models import build_model
from tests.conftest import SMALL_SYNTHETIC, rooted_params
from tests.test_training import Crash

X = np.random.default_rng(0).random((8, 4)).astype("float32")
Y = np.array([0, 1] * 4, "float32")


def _place(root: Path) -> training._Place:
    return training._Place(root, root / "tb", root, tf.distribute.get_strategy())


def _net() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="prediction")(inputs))


def _toy(params: TrainParams) -> keras.Model:
    """A 4-input logistic model compiled as training compiles (2 steps per epoch at batch 4)."""
    model = _net()
    training._compile(model, training.learning_rate_schedule(params, 0.01, params.epochs, 2), 2, params, 2)
    return model


def _fit(params: TrainParams, root: Path, sink: list | None = None, extra: list | None = None) -> tuple[list, int]:
    return training._fit_phase(
        _toy(params),
        "full",
        X,
        (X, Y),
        params.epochs,
        params,
        _place(root),
        0,
        None if sink is None else sink.append,
        extra or [],
        y=Y,
        batch_size=4,
        shuffle=False,
    )


@pytest.mark.parametrize("ema", [0.0, 1.0])
def test_a_kill_between_a_cycle_ends_backup_and_its_snapshot_still_joins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ema: float
) -> None:
    """The resume writes the missing snapshot from the restored weights (the average, with EMA), the same as an
    uninterrupted run's."""
    params = TrainParams(epochs=4, snapshots=2, class_weights=False, ema_epochs=ema)
    _fit(params, tmp_path / "clean")
    saver_end = snapshots.SnapshotSaver.on_epoch_end

    def killed(self: snapshots.SnapshotSaver, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 == 2:
            raise KeyboardInterrupt("killed after the backup of epoch 2, before snapshot 1")
        saver_end(self, epoch, logs)

    monkeypatch.setattr(snapshots.SnapshotSaver, "on_epoch_end", killed)
    with pytest.raises(KeyboardInterrupt):
        _fit(params, tmp_path / "killed")
    monkeypatch.setattr(snapshots.SnapshotSaver, "on_epoch_end", saver_end)
    _, trained = _fit(params, tmp_path / "killed")
    assert trained == 2, "the resume starts after the cycle's end"
    clean, resumed = (snapshots.load_members(_net, tmp_path / r / "full", 2) for r in ("clean", "killed"))
    for a, b in zip(clean, resumed, strict=True):
        np.testing.assert_allclose(a.get_weights()[0], b.get_weights()[0], atol=1e-6)


def test_restored_epochs_reach_the_sink_and_count_as_not_trained(tmp_path: Path) -> None:
    """A resumed phase sends the epochs an earlier process trained (MLflow logs them at their steps); a finished
    phase sends all its epochs. Neither counts them as trained by this process."""
    params = TrainParams(epochs=4, class_weights=False, early_stopping_patience=10)
    first: list[dict] = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(params, tmp_path, first, [Crash(after=2)])
    assert [r["epoch"] for r in first] == [1, 2]
    resumed: list[dict] = []
    rows, trained = _fit(params, tmp_path, resumed)
    assert sorted(r["epoch"] for r in resumed) == [1, 2, 3, 4] and trained == 2
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    finished: list[dict] = []
    _, trained = _fit(params, tmp_path, finished)  # done.weights.h5: not trained again
    assert finished == rows and trained == 0


def test_fine_tune_layers_past_the_backbone_are_named_in_the_log() -> None:
    built = build_model("vgg16", 32, 2, "none")
    assert training.fine_tune_note(built, 18, "vgg16") is None
    note = training.fine_tune_note(built, 30, "vgg16")
    assert note == (
        "train.fine_tune_layers 30 is more than vgg16's 18 backbone layers: fine-tuning unfreezes the whole backbone"
    )


def _event_files(logs: Path) -> int:
    return len(list((logs / "full" / "train").glob("events.out*")))


@pytest.mark.slow
def test_a_fresh_run_clears_its_tensorboard_folder_and_a_resumed_one_counts_its_own_images(
    synthetic_index: tuple[Path, pd.DataFrame],
) -> None:
    """Same config three times: killed after epoch 1, resumed (appends to its events; images/s counts epoch 2
    only), then fresh again (the finished run's events are cleared, so the MLflow upload is this run's only)."""
    tmp, index = synthetic_index
    own = tmp / "tb-edges"  # not another test's state or logs
    params = rooted_params(
        tmp,
        *SMALL_SYNTHETIC,
        "model.image_size=32",
        "train.epochs=2",
        "train.max_images_per_split=16",
        f"train.tensorboard_dir={own / 'tensorboard'}",
        f"train.resume_dir={own / 'resume'}",
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(params, index, extra_callbacks=[Crash(after=1)])
    resumed = training.train(params, index)
    n_train = len(training.dp.split_data(index, "train", params.data.root, params.task, 16, params.train.seed))
    assert resumed.images_trained == n_train, "epoch 1 was trained by the killed process"
    assert resumed.tensorboard_logs is not None and _event_files(resumed.tensorboard_logs) == 2
    fresh = training.train(params, index)
    assert fresh.images_trained == 2 * n_train
    assert fresh.tensorboard_logs == resumed.tensorboard_logs and _event_files(fresh.tensorboard_logs) == 1
    # Under DVC the logs folder (a stage output) is removed before the stage runs again: the resumed training
    # restores the killed one's events from its resume state, and appends to them.
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(params, index, extra_callbacks=[Crash(after=1)])
    shutil.rmtree(params.train.tensorboard_dir)
    again = training.train(params, index)
    assert again.tensorboard_logs is not None and _event_files(again.tensorboard_logs) == 2
