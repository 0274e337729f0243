"""A phase's best epoch on val AUC, early stopping and plateau decay, kept right across a kill at any instant.

At each epoch's end the callbacks run in this order: the history row (first), the resume backup
(``BackupAndRestore``), then these. The best checkpoint is written to a pending file, stamped with its epoch
and val AUC (HDF5 attributes) and renamed onto ``best.weights.h5``: a stamped pending file is whole, an
unstamped one was cut short. On a resume:

- a whole pending file is promoted, a cut one dropped (``settle``);
- the score to beat is the checkpoint's own stamp, not the history's best;
- where the kill fell between the backup and the checkpoint of an epoch that beat it, that epoch's weights
  (what the backup restored) become the checkpoint (``BestCheckpoint``; not with weight averaging, where the
  checkpoint is of the average);
- early stopping and plateau decay get their counters back by replaying the history's val AUC: Keras resets
  them at every fit's start, so a resumed run would otherwise wait a full patience again. A halving owed by
  the last epoch done is made (the backup was written before it), and a run that had stopped early (killed
  before it finished) trains no further epoch.

All of it happens in ``on_train_begin``, after ``BackupAndRestore`` restored the weights and recorded the
epochs done in ``model._initial_epoch`` (Keras 3.15's trainer reads it after ``on_train_begin``; setting it to
the fit's epochs ends the fit there).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import keras

from pipeline.core.atomic import staged_file

MONITOR = "val_auc"
STAMP = "pneumo_val_auc"
Rows = Callable[[int], list[dict[str, float]]]  # the phase's history rows of its first n epochs


def epochs_done(model: keras.Model) -> int:
    """The epochs a resumed fit starts after: what BackupAndRestore restored (0 for a fresh fit)."""
    return getattr(model, "_initial_epoch", None) or 0


def pending(path: Path) -> Path:
    return path.with_name(f".pending.{path.name}")


def stamped_score(path: Path) -> float | None:
    """The val AUC a checkpoint was stamped with; None when there is none (missing, cut short, not stamped)."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get(STAMP)
    except (OSError, ValueError):
        return None
    return None if value is None else float(value)


def _stamp(path: Path, epoch: int, val_auc: float) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[STAMP] = val_auc
        f.attrs["pneumo_epoch"] = epoch


def save_stamped(model: keras.Model, path: Path, epoch: int, val_auc: float) -> None:
    """The model's weights as the checkpoint of `epoch` (0: the phase before this one) scoring `val_auc`."""
    with staged_file(path) as tmp:
        model.save_weights(tmp)
        _stamp(tmp, epoch, val_auc)


def settle(best: Path) -> float | None:
    """At a phase's (re)start: promote a whole pending checkpoint, drop a cut one; return the score to beat."""
    cut = pending(best)
    if cut.is_file():
        if stamped_score(cut) is not None:
            os.replace(cut, best)
        else:
            cut.unlink()
    return stamped_score(best) if best.is_file() else None


class BestCheckpoint(keras.callbacks.Callback):
    """Stamps and promotes what `checkpoint` wrote to the pending file; rebuilds a checkpoint a kill cut short."""

    def __init__(self, best: Path, checkpoint: keras.callbacks.ModelCheckpoint, rows: Rows, rebuild: bool) -> None:
        super().__init__()
        self.best, self.checkpoint, self.rows, self.rebuild = best, checkpoint, rows, rebuild

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        done_epochs = epochs_done(self.model)
        done = self.rows(done_epochs)
        if not (self.rebuild and done_epochs and len(done) == done_epochs and MONITOR in done[-1]):
            return
        last = done[-1][MONITOR]
        to_beat = self.checkpoint.best if self.checkpoint.best is not None else -math.inf
        if last > to_beat:  # the epoch before the kill won, but its checkpoint never landed: the restored weights
            save_stamped(self.model, self.best, done_epochs, last)
            self.checkpoint.best = last

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        written = pending(self.best)
        if written.is_file():
            _stamp(written, epoch + 1, float((logs or {})[MONITOR]))
            os.replace(written, self.best)


class _ReplayOnResume:
    """At a fit's start, the history rows of the epochs done run through the callback's own counting."""

    def __init__(self, rows: Rows, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.rows = rows

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        super().on_train_begin(logs)  # Keras resets the counters here
        if self.monitor_op is None:
            self._set_monitor_op()
        self.replay([r for r in self.rows(epochs_done(self.model)) if MONITOR in r])


class ResumedEarlyStopping(_ReplayOnResume, keras.callbacks.EarlyStopping):
    """EarlyStopping whose best value and wait count carry over a resume; a run that had stopped stays stopped."""

    def replay(self, rows: list[dict[str, float]]) -> None:
        for epoch, row in enumerate(rows):  # as on_epoch_end counts (start_from_epoch 0, no baseline)
            self.wait += 1
            if self._is_improvement(row[MONITOR], self.best):
                self.best, self.wait = row[MONITOR], 0
            elif self.wait >= self.patience and epoch > 0:  # it stopped here; the kill came before the fit ended
                self.stopped_epoch = epoch
                self.model._initial_epoch = self.params["epochs"]  # no epoch more: the fit ends at once
                return


class ResumedReduceLROnPlateau(_ReplayOnResume, keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose best value, wait and cooldown carry over a resume. The rate comes back with the
    optimizer as the backup saved it: before the last epoch's halving, which is made here when it was due."""

    def replay(self, rows: list[dict[str, float]]) -> None:
        for i, row in enumerate(rows):  # as on_epoch_end counts
            if self.in_cooldown():
                self.cooldown_counter -= 1
                self.wait = 0
            if self._is_improvement(row[MONITOR], self.best):
                self.best, self.wait = row[MONITOR], 0
            elif not self.in_cooldown():
                self.wait += 1
                if self.wait >= self.patience:
                    # A halving shows as a lower rate in the next row; the last one's is owed to the optimizer
                    last = i == len(rows) - 1
                    halved = (
                        self._reduce_optimizer_lr(self.model.optimizer, i)
                        if last
                        else rows[i + 1]["learning_rate"] < row["learning_rate"]
                    )
                    if halved:
                        self.cooldown_counter, self.wait = self.cooldown, 0
