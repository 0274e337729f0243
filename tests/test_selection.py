"""Early stopping, plateau decay and the best checkpoint carry over a resume as an uninterrupted run has them."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from pipeline.modeling import selection

PATIENCE, LR_PATIENCE, COOLDOWN = 3, 2, 1


def _model(rate: float) -> keras.Model:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(rate), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _rate(model: keras.Model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def _plain() -> list[keras.callbacks.Callback]:
    return [
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=PATIENCE),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_auc", mode="max", factor=0.5, patience=LR_PATIENCE, cooldown=COOLDOWN, min_lr=1e-7
        ),
    ]


def _state(stop: keras.callbacks.EarlyStopping, decay: keras.callbacks.ReduceLROnPlateau) -> tuple[object, ...]:
    return (stop.best, stop.wait, decay.best, decay.wait, decay.cooldown_counter)


def _resumed(rows: list[dict[str, float]], rate: float, done: int, epochs: int) -> list[keras.callbacks.Callback]:
    """The two callbacks of a fit resumed after `done` epochs, as BackupAndRestore leaves it: the optimizer's rate
    as the backup saved it (before that epoch's halving) and the epochs done in ``model._initial_epoch``."""
    model = _model(rate)
    model._initial_epoch = done
    resumed = [
        selection.ResumedEarlyStopping(lambda n: rows[:n], monitor="val_auc", mode="max", patience=PATIENCE),
        selection.ResumedReduceLROnPlateau(
            lambda n: rows[:n],
            monitor="val_auc",
            mode="max",
            factor=0.5,
            patience=LR_PATIENCE,
            cooldown=COOLDOWN,
            min_lr=1e-7,
        ),
    ]
    for cb in resumed:
        cb.set_model(model)
        cb.set_params({"epochs": epochs})
        cb.on_train_begin()
    return resumed


@pytest.mark.parametrize("seed", range(8))
def test_resumed_callbacks_decide_as_an_uninterrupted_run(seed: int) -> None:
    """Random val AUC curves with plateaus (values drawn from a few levels): a run killed after any epoch and
    resumed stops, and halves its rate, at the same epochs as the run never killed."""
    rng = np.random.default_rng(seed)
    aucs = [float(v) for v in rng.choice([0.80, 0.85, 0.86, 0.9, 0.905], 14)]
    whole, whole_model = _plain(), _model(0.01)
    for cb in whole:
        cb.set_model(whole_model)
        cb.on_train_begin()
    rows, after = [], []  # the history rows; the state, rate and stop after each epoch
    for epoch, auc in enumerate(aucs):
        rows.append({"epoch": epoch + 1, "val_auc": auc, "learning_rate": _rate(whole_model)})
        for cb in whole:
            cb.on_epoch_end(epoch, {"val_auc": auc})
        after.append((_state(*whole), _rate(whole_model), whole_model.stop_training))
        if whole_model.stop_training:
            break
    assert any(rate < 0.01 for _, rate, _ in after), "the curves must exercise a halving"
    for done in range(1, len(rows) + 1):
        resumed = _resumed(rows, rows[done - 1]["learning_rate"], done, len(aucs))
        model = resumed[0].model
        state, rate, stopped = after[done - 1]
        assert _state(*resumed) == state and _rate(model) == rate, f"resumed after epoch {done}"
        assert model._initial_epoch == (len(aucs) if stopped else done), "a stopped run trains no further epoch"
        for epoch in range(done, len(rows)):  # carrying on, the same decisions
            for cb in resumed:
                cb.on_epoch_end(epoch, {"val_auc": rows[epoch]["val_auc"]})
            assert (_state(*resumed), _rate(model), model.stop_training) == after[epoch], f"epoch {epoch + 1}"


def test_keras_alone_forgets_the_wait_over_a_resume() -> None:
    """Why the replay exists: a plateau that began before the kill stops the resumed run no sooner than a whole
    patience after the resume."""
    aucs = [0.9, 0.8, 0.8, 0.8]  # patience 3: an uninterrupted run stops after the fourth epoch
    rows = [{"epoch": i + 1, "val_auc": v, "learning_rate": 0.01} for i, v in enumerate(aucs)]
    plain = keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=PATIENCE)
    plain.set_model(_model(0.01))
    plain.on_train_begin()
    resumed = _resumed(rows, 0.01, 2, 10)[0]
    for cb in (plain, resumed):
        for epoch in (2, 3):
            cb.on_epoch_end(epoch, {"val_auc": aucs[epoch]})
    assert resumed.model.stop_training and not plain.model.stop_training


def test_a_whole_pending_checkpoint_is_promoted_and_a_cut_one_dropped(tmp_path: Path) -> None:
    model = _model(0.01)
    best = tmp_path / "best.weights.h5"
    assert selection.settle(best) is None
    selection.save_stamped(model, best, 2, 0.8)
    model.save_weights(selection.pending(best))  # written by the checkpoint, killed before its stamp
    assert selection.settle(best) == 0.8 and not selection.pending(best).exists()
    selection.save_stamped(model, selection.pending(best), 3, 0.9)  # stamped, killed before its rename
    assert selection.settle(best) == 0.9 and not selection.pending(best).exists()
    selection.pending(best).write_bytes(b"\x89HDF\r\n")  # cut mid-write
    assert selection.settle(best) == 0.9 and not selection.pending(best).exists()
    with h5py.File(best) as f:
        assert f.attrs["pneumo_epoch"] == 3


@pytest.mark.parametrize("rebuild", [True, False])
def test_a_winning_epoch_whose_checkpoint_never_landed_is_rebuilt_from_the_restored_weights(
    tmp_path: Path, rebuild: bool
) -> None:
    model = _model(0.01)
    best = tmp_path / "best.weights.h5"
    selection.save_stamped(_model(0.01), best, 1, 0.8)  # epoch 1's, other weights
    rows = [{"epoch": 1, "val_auc": 0.8}, {"epoch": 2, "val_auc": 0.7}, {"epoch": 3, "val_auc": 0.85}]
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(selection.pending(best)), monitor="val_auc", mode="max", save_best_only=True, initial_value_threshold=0.8
    )
    callback = selection.BestCheckpoint(best, checkpoint, lambda n: rows[:n], rebuild=rebuild)
    callback.set_model(model)
    model._initial_epoch = 3  # resumed after epoch 3, the last: the backup restored its weights into `model`
    callback.on_train_begin()  # before any epoch begins (none will, when it was the last)
    assert selection.stamped_score(best) == (0.85 if rebuild else 0.8)
    assert checkpoint.best == (0.85 if rebuild else 0.8)
    restored = _model(0.01)
    restored.load_weights(best)
    same = all(np.array_equal(a, b) for a, b in zip(restored.get_weights(), model.get_weights(), strict=True))
    assert same == rebuild
