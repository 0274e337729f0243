"""Training on the small synthetic set: resume after an interruption, both phases, three classes, bad input."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from pipeline.core.errors import DataError
from pipeline.modeling import inputs as dp
from pipeline.modeling import preprocess, training
from tests.conftest import FAST_TRAIN, SMALL_SYNTHETIC, rooted_params

pytestmark = pytest.mark.slow


class Crash(keras.callbacks.Callback):
    """Simulates a killed worker after `after` epochs."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 == self.after:
            raise RuntimeError("simulated crash")


class CrashAtEpoch(keras.callbacks.Callback):
    """Simulates a killed run after the `total`-th epoch counted over every fit it sees."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total, self.seen = total, 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seen += 1
        if self.seen == self.total:
            raise RuntimeError("simulated crash")


class CountEpochs(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.started: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started.append(epoch + 1)


class KernelAtEpochEdges(keras.callbacks.Callback):
    """The first conv kernel as the callbacks see it at each epoch's end, and as training resumes."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[np.ndarray] = []
        self.begins: list[np.ndarray] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.begins.append(np.array(self.model.trainable_weights[0]))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.ends.append(np.array(self.model.trainable_weights[0]))


def test_weight_average_momentum_follows_the_epochs_it_spans() -> None:
    assert training.ema_momentum(1, 118) == pytest.approx(1 - 1 / 118)  # the real 224 px set at batch 32
    assert training.ema_momentum(0.85, 118) == pytest.approx(0.99, abs=1e-4)
    assert training.ema_momentum(2, 5) == pytest.approx(0.9)
    assert training.ema_momentum(0.1, 5) == 0.0  # less than a step: no averaging


@pytest.mark.parametrize("ema", [0.0, 1.0])
def test_weight_averaging_is_what_validation_and_the_checkpoint_see(
    synthetic_index: tuple[Path, pd.DataFrame], ema: float
) -> None:
    """train.ema_epochs: at each epoch's end the averaged weights are in the model (validated, checkpointed), the
    raw ones train on at the next epoch's start, and the saved model is the best epoch's average."""
    tmp, index = synthetic_index
    params = rooted_params(
        tmp,
        *SMALL_SYNTHETIC,
        *FAST_TRAIN,
        "train.epochs=3",
        "train.early_stopping_patience=10",
        f"train.ema_epochs={ema}",
    )
    edges = KernelAtEpochEdges()
    outcome = training.train(params, index, extra_callbacks=[edges])
    best = int(np.argmax([h["val_auc"] for h in outcome.history]))
    np.testing.assert_array_equal(np.array(outcome.built.model.trainable_weights[0]), edges.ends[best])
    swapped = [not np.array_equal(end, begin) for end, begin in zip(edges.ends[:-1], edges.begins[1:], strict=True)]
    assert swapped == [bool(ema)] * 2


@pytest.mark.parametrize("ema", [0.0, 1.0])
def test_interrupted_training_resumes_from_checkpoint(synthetic_index: tuple[Path, pd.DataFrame], ema: float) -> None:
    tmp, index = synthetic_index
    params = rooted_params(
        tmp,
        *SMALL_SYNTHETIC,
        *FAST_TRAIN,
        "train.epochs=4",
        "train.early_stopping_patience=10",
        f"train.ema_epochs={ema}",
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(params, index, extra_callbacks=[Crash(after=2)])
    saved = list(Path(params.train.resume_dir).rglob("history.json"))
    assert len(saved) == 1 and [r["epoch"] for r in json.loads(saved[0].read_text())] == [1, 2]

    counter = CountEpochs()
    outcome = training.train(params, index, extra_callbacks=[counter])
    assert counter.started == [3, 4], "the second run must continue, not start over"
    assert [h["epoch"] for h in outcome.history] == [1, 2, 3, 4]
    assert not any(Path(params.train.resume_dir).iterdir()), "a finished training leaves no state behind"


def test_a_train_stage_that_fails_after_its_last_epoch_resumes_without_training_again(
    synthetic_index: tuple[Path, pd.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tracking server down for the model upload (or a full disk at the save): the finished training's state
    stays until the model is saved and logged, so the stage's re-run loads it and trains no epoch again."""

    from pipeline.core.errors import TransientError
    from pipeline.steps import train as train_stage

    tmp, index = synthetic_index
    index.to_parquet(tmp_path / "index.parquet")
    own = [f"index.path={tmp_path / 'index.parquet'}", f"train.resume_dir={tmp_path / 'resume'}"]
    own += [f"train.model_dir={tmp_path / 'models'}", f"train.tensorboard_dir={tmp_path / 'tb'}"]
    own += [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"mlflow.artifact_root={tmp_path / 'art'}"]
    own += [f"mlflow.run_file={tmp_path / 'run.json'}"]
    limit = "train.max_images_per_split=40"  # the model's metadata counts what training used, not the index
    params = rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN, "train.early_stopping_patience=10", limit, *own)
    monkeypatch.chdir(tmp_path)  # the stage's relative reports

    def unreachable(*args: object, **kwargs: object) -> None:
        raise TransientError("MLflow: 503 Service Unavailable")

    with monkeypatch.context() as patched:
        # the module itself: `mlflow.keras` may still be MLflow's lazy loader, which would not forward the patch
        patched.setattr(importlib.import_module("mlflow.keras"), "log_model", unreachable)
        with pytest.raises(TransientError, match="503"):
            train_stage.run(params)
    kept = list((tmp_path / "resume").rglob("done.weights.h5"))
    assert len(kept) == 1, "the finished training's state is kept while its model is not logged"

    counter = CountEpochs()
    summary = train_stage.run(params, extra_callbacks=[counter])
    assert counter.started == [], "the re-run loads the finished training, it does not train again"
    assert "after 2 epochs" in summary and (tmp_path / "run.json").is_file()
    assert not any((tmp_path / "resume").iterdir()), "the model is logged: the state is gone"
    sizes = json.loads((tmp_path / "models" / "metadata.json").read_text())["split_sizes"]
    in_index = {s: int(((index["split"] == s) & index["decodable"]).sum()) for s in ("train", "val", "test")}
    assert sizes == {"train": 40, "val": min(40, in_index["val"]), "test": in_index["test"]} and in_index["train"] > 40


def test_a_kill_mid_save_still_resumes(synthetic_index: tuple[Path, pd.DataFrame]) -> None:
    """A kill while the epoch's state is written leaves a truncated file: the newest backup (the previous one
    is resumed from) or the pending best weights (never promoted). History and best weights stay whole."""
    tmp, index = synthetic_index
    params = rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN, "train.epochs=4", "train.early_stopping_patience=10")
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(params, index, extra_callbacks=[Crash(after=3)])
    phase = next(Path(params.train.resume_dir).rglob("history.json")).parent
    backups = sorted(p.name for p in (phase / "backup").iterdir() if ".weights.h5" in p.name)
    assert backups == ["latest.weights.h5", "latest.weights.h5.bkp"], "two states kept"
    (phase / "backup" / "latest.weights.h5").write_bytes(b"\x89HDF\r\n")  # cut short
    (phase / ".pending.best.weights.h5").write_bytes(b"\x89HDF\r\n")  # the run ends loading best: never this

    counter = CountEpochs()
    outcome = training.train(params, index, extra_callbacks=[counter])
    assert counter.started == [3, 4], "resumed from the state before the truncated one"
    assert [h["epoch"] for h in outcome.history] == [1, 2, 3, 4]
    assert not any(Path(params.train.resume_dir).iterdir())


def test_a_kill_between_the_backup_and_the_best_checkpoint_loses_no_row_and_no_best(
    synthetic_index: tuple[Path, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed at the first epoch after the first that beats the best, after its backup and its checkpoint's write
    but before the checkpoint is stamped and promoted: the resumed run has every epoch's row once, and ends on
    the best epoch's weights (that epoch's, which only the backup held)."""
    from pipeline.modeling import selection

    tmp, index = synthetic_index
    promote = selection.BestCheckpoint.on_epoch_end

    def killed(self: selection.BestCheckpoint, epoch: int, logs: dict | None = None) -> None:
        # epochs 2-4 of 5: a kill at the last one would leave the resumed run no epoch to train
        if 1 <= epoch <= 3 and selection.pending(self.best).is_file():
            raise RuntimeError("simulated kill")
        promote(self, epoch, logs)

    monkeypatch.setattr(selection.BestCheckpoint, "on_epoch_end", killed)
    # CPU training is not bit-reproducible: a run whose first epoch is never beaten has nothing to kill (it ends,
    # leaving no state), so the next seed is tried; one of three must get there.
    for seed in (42, 43, 44):
        params = rooted_params(
            tmp,
            *SMALL_SYNTHETIC,
            *FAST_TRAIN,
            "train.epochs=5",
            "train.early_stopping_patience=10",
            f"train.seed={seed}",
        )
        first = KernelAtEpochEdges()
        try:
            training.train(params, index, extra_callbacks=[first])
        except RuntimeError as exc:
            assert str(exc) == "simulated kill"
            break
    else:
        pytest.fail("no seed's run beat its first epoch: no kill between a backup and a best checkpoint to test")
    monkeypatch.setattr(selection.BestCheckpoint, "on_epoch_end", promote)
    killed_at = len(first.ends) + 1  # the kill came before the extra callbacks saw that epoch end
    second, counter = KernelAtEpochEdges(), CountEpochs()
    outcome = training.train(params, index, extra_callbacks=[second, counter])
    assert counter.started == list(range(killed_at + 1, 6)), "the killed epoch's backup was written: not redone"
    assert [h["epoch"] for h in outcome.history] == [1, 2, 3, 4, 5], "its history row too"
    ends = [*first.ends, second.begins[0], *second.ends]  # the killed epoch's weights: what the backup restored
    best = int(np.argmax([h["val_auc"] for h in outcome.history]))
    np.testing.assert_array_equal(np.array(outcome.built.model.trainable_weights[0]), ends[best])


def test_a_worker_copies_the_chiefs_state_but_not_the_files_being_written(tmp_path: Path) -> None:
    shared, mine = tmp_path / "chief" / "fine_tune", tmp_path / "worker" / "fine_tune"
    (shared / "backup").mkdir(parents=True)
    kept = ["best.weights.h5", "history.json", ".pending.best.weights.h5", "backup/latest.weights.h5"]
    for name in [*kept, ".best.weights.h5.x1.tmp.weights.h5", ".history.json.x2.tmp"]:
        (shared / name).write_bytes(b"state")
    (mine / "stale").mkdir(parents=True)
    training.copy_shared_state(shared, mine)
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if p.is_file()) == sorted(kept)


def test_a_worker_copies_again_when_the_chief_promotes_a_pending_checkpoint_mid_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chief's phase start renames .pending.best over best while a worker copies the folder: the worker's
    copy must not fail, and must not hold the old best beside nothing (one moment's state)."""
    shared, mine = tmp_path / "chief" / "head", tmp_path / "worker" / "head"
    shared.mkdir(parents=True)
    (shared / "best.weights.h5").write_bytes(b"old best")
    (shared / ".pending.best.weights.h5").write_bytes(b"new best")
    copy2, renamed = shutil.copy2, []

    def chief_renames_first(src: str, dst: str) -> object:
        if not renamed:  # the chief's settle() lands between the listing and this file's copy
            renamed.append(src)
            os.replace(shared / ".pending.best.weights.h5", shared / "best.weights.h5")
        return copy2(src, dst)

    monkeypatch.setattr(shutil, "copy2", chief_renames_first)
    training.copy_shared_state(shared, mine)
    assert renamed and sorted(p.name for p in mine.iterdir()) == ["best.weights.h5"]
    assert (mine / "best.weights.h5").read_bytes() == b"new best"


def test_resume_state_is_keyed_by_data_settings_and_code(
    synthetic_index: tuple[Path, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, index = synthetic_index
    params = rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN)
    key = training.state_key(params, index)
    assert training.state_key(params, index.sample(frac=1, random_state=1)) == key  # row order is no content
    changed_bytes = index.copy()
    changed_bytes.loc[changed_bytes.index[0], "sha256"] = "0" * 64
    moved = index.copy()
    moved.loc[moved["split"] == "val", "split"] = "train"
    relabelled = index.copy()
    relabelled.loc[relabelled.index[0], "label"] = "PNEUMONIA" if index["label"].iloc[0] == "NORMAL" else "NORMAL"
    others = [
        training.state_key(params, changed_bytes),
        training.state_key(params, moved),
        training.state_key(params, relabelled),
        training.state_key(rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN, "train.learning_rate=0.01"), index),
        training.state_key(rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN, "split.seed=1"), index),
        training.state_key(params, index, replicas=2),  # two local GPUs: another global batch
    ]
    # A GPU's mixed precision: the optimizer is wrapped for loss scaling, so its state would not load on a CPU
    monkeypatch.setattr(keras.mixed_precision, "global_policy", lambda: keras.mixed_precision.Policy("mixed_float16"))
    others.append(training.state_key(params, index))
    monkeypatch.undo()
    assert len({key, *others}) == 8
    # Folders are not content: moving them (the same shards elsewhere included) keeps the key.
    elsewhere = rooted_params(tmp / "elsewhere", *SMALL_SYNTHETIC, *FAST_TRAIN)
    shutil.copytree(params.shards.out, elsewhere.shards.out, dirs_exist_ok=True)
    assert training.state_key(elsewhere, index) == key
    # Another image decoding (preprocess.py) makes other inputs: a resume folder from before is not reused.
    edited = tmp / "preprocess_edited.py"
    edited.write_text(Path(preprocess.__file__).read_text() + "\n# resize changed\n")
    monkeypatch.setattr(preprocess, "__file__", str(edited))
    assert training.state_key(params, index) != key


def test_backbone_head_on_cached_features_then_fine_tune_resumed(synthetic_index: tuple[Path, pd.DataFrame]) -> None:
    tmp, index = synthetic_index
    params = rooted_params(
        tmp,
        *SMALL_SYNTHETIC,
        *FAST_TRAIN,
        "model.architecture=mobilenetv2",
        "model.image_size=64",
        "train.fine_tune_epochs=2",
        "train.fine_tune_layers=10",
    )
    with pytest.raises(RuntimeError, match="simulated crash"):  # in the first fine-tuning epoch
        training.train(params, index, extra_callbacks=[CrashAtEpoch(total=3)])
    counter = CountEpochs()
    outcome = training.train(params, index, extra_callbacks=[counter])
    assert counter.started == [2], "the finished head phase is not trained again; fine-tuning resumes"
    assert [h["phase"] for h in outcome.history] == ["head", "head", "fine_tune", "fine_tune"]
    assert [h["epoch"] for h in outcome.history] == [1, 2, 3, 4]
    fresh = keras.models.clone_model(outcome.built.model)
    trained = outcome.built.model.get_layer("prediction").get_weights()[0]
    assert not np.allclose(trained, fresh.get_layer("prediction").get_weights()[0]), "head weights must be trained"
    assert outcome.history[-1]["learning_rate"] == pytest.approx(1e-5)


def test_a_head_phase_resumed_on_images_leaves_fine_tuning_all_its_epochs(
    synthetic_index: tuple[Path, pd.DataFrame],
) -> None:
    """Keras keeps the epoch a resumed fit started from on the model; fine-tuning fits the same model next and
    must not start there (it ran only its last epoch, or none)."""
    tmp, index = synthetic_index
    params = rooted_params(
        tmp,
        *SMALL_SYNTHETIC,
        *FAST_TRAIN,
        "model.architecture=mobilenetv2",
        "model.image_size=64",
        "train.cache_features=false",
        "train.epochs=2",
        "train.fine_tune_epochs=2",
        "train.fine_tune_layers=10",
        "train.early_stopping_patience=10",
    )
    with pytest.raises(RuntimeError, match="simulated crash"):  # after the head phase's first epoch
        training.train(params, index, extra_callbacks=[CrashAtEpoch(total=1)])
    counter = CountEpochs()
    outcome = training.train(params, index, extra_callbacks=[counter])
    assert counter.started == [2, 1, 2], "the head resumes at its second epoch, fine-tuning runs both of its own"
    assert [h["phase"] for h in outcome.history] == ["head", "head", "fine_tune", "fine_tune"]


def test_fine_tuning_that_only_hurts_keeps_the_head_phase_model(synthetic_index: tuple[Path, pd.DataFrame]) -> None:
    """A fine-tuning rate far too high wrecks the network: no fine-tuning epoch beats the head phase's best, so
    the saved model is the head phase's, and best_val_auc is that model's."""
    from sklearn.metrics import roc_auc_score

    tmp, index = synthetic_index
    params = rooted_params(
        tmp,
        *SMALL_SYNTHETIC,
        *FAST_TRAIN,
        "model.architecture=resnet50",
        "model.image_size=64",
        "train.epochs=4",
        "train.learning_rate=0.01",
        "train.fine_tune_epochs=2",
        "train.fine_tune_layers=20",
        "train.fine_tune_learning_rate=50.0",
        "train.early_stopping_patience=5",
    )
    outcome = training.train(params, index)
    head = max(h["val_auc"] for h in outcome.history if h["phase"] == "head")
    tuned = [h.get("val_auc", 0.0) for h in outcome.history if h["phase"] == "fine_tune"]
    assert len(tuned) == 2 and max(tuned) < head - 0.05, "the premise: fine-tuning at this rate only hurts"
    val = dp.split_data(index, "val", params.data.root, params.task, None, 0)
    scores = outcome.built.model.predict(dp.make_dataset(val, 64, 32, cache=False), verbose=0)[:, -1]
    assert roc_auc_score(val.labels, scores) == pytest.approx(head, abs=0.05)  # Keras' AUC is binned
    assert outcome.best_val_auc == head


def test_three_class_task(synthetic_index: tuple[Path, pd.DataFrame]) -> None:
    tmp, index = synthetic_index
    params = rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN, "task=three_class", "train.epochs=1")
    outcome = training.train(params, index)
    assert outcome.class_names == ("NORMAL", "BACTERIAL", "VIRAL")
    out = outcome.built.model.predict(np.zeros((2, 48, 48, 1), "float32"), verbose=0)
    assert out.shape == (2, 3) and np.allclose(out.sum(axis=1), 1, atol=1e-5)


def test_each_training_logs_to_its_own_tensorboard_folder(synthetic_index: tuple[Path, pd.DataFrame]) -> None:
    """Outside DVC (a distributed flow, the Kubernetes Job, a manual run) nothing clears train.tensorboard_dir:
    each training writes under its own key there, and the MLflow run uploads that folder only, never the event
    files of the trainings before it."""
    tmp, index = synthetic_index
    folders = []
    for seed in (11, 12):
        params = rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN, "train.epochs=1", f"train.seed={seed}")
        logs = training.train(params, index).tensorboard_logs
        assert logs is not None and logs.parent == Path(params.train.tensorboard_dir)
        events = sorted(str(p.parent.relative_to(logs)) for p in logs.rglob("events.out*"))
        assert events == ["full/train", "full/validation"], events  # a from-scratch model: one phase
        folders.append(logs)
    assert folders[0] != folders[1]


def test_empty_split_is_one_clear_error(synthetic_index: tuple[Path, pd.DataFrame]) -> None:
    tmp, index = synthetic_index
    params = rooted_params(tmp, *SMALL_SYNTHETIC, *FAST_TRAIN)
    with pytest.raises(DataError, match=r"^split 'val' has no usable images in the index"):
        training.train(params, index[index["split"] != "val"])
    broken = index.copy()
    broken.loc[broken["split"] == "val", "decodable"] = False  # all quarantined
    with pytest.raises(DataError, match=r"^split 'val' has no usable images"):
        training.train(params, broken)


def test_class_weights_and_three_class_labels(synthetic_index: tuple[Path, pd.DataFrame]) -> None:
    assert dp.class_weights(np.array([0, 1, 1, 1]), 2) == {0: 2.0, 1: 4 / 6}
    with pytest.raises(DataError, match="no images of class id"):
        dp.class_weights(np.array([1, 1]), 2)
    _, index = synthetic_index
    rows = index[index["split"] == "train"]
    ids = dp.class_ids(rows, "three_class")
    assert set(ids) == {0, 1, 2} and (ids[rows["subtype"].to_numpy() == "virus"] == 2).all()
    odd = rows.copy()
    odd.loc[odd.index[odd["label"] == "PNEUMONIA"][0], "subtype"] = "unknown"
    with pytest.raises(DataError, match="three_class: 1 PNEUMONIA images have no bacteria/virus"):
        dp.class_ids(odd, "three_class")


def test_decode_any_image_to_gray_square(tmp_path: Path) -> None:
    import tensorflow as tf
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = (rng.uniform(0, 255, (60, 90))).astype(np.uint8)
    files = {
        "gray.jpeg": Image.fromarray(gray),
        "rgb.png": Image.fromarray(np.stack([gray] * 3, -1)),
        "gray16.png": Image.fromarray(gray.astype(np.uint16) * 257),
    }
    for name, img in files.items():
        img.save(tmp_path / name)
    out = {n: preprocess.decode_image(tf.io.read_file(str(tmp_path / n)), 32).numpy() for n in files}
    for arr in out.values():
        assert arr.shape == (32, 32, 1) and arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 255
    assert np.abs(out["rgb.png"] - out["gray16.png"]).max() <= 1.0  # 16-bit scaled to 8-bit like the 8-bit file
