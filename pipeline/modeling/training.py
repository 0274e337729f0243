"""Training with Keras: seeds, hardware, class weights, two-phase fine-tuning, callbacks and resume.

Phase ``head`` trains the classifier on a frozen backbone (on features computed once when
``train.cache_features``); phase ``fine_tune`` unfreezes the top ``train.fine_tune_layers`` at a
lower rate. The compact CNN trains in one phase, ``full``; with ``train.snapshots`` that phase runs
cosine cycles and the saved model joins each cycle's last weights (``pipeline.modeling.snapshots``);
with ``train.members: N`` N networks train one after another (phases ``member-1`` .. ``member-N``, seeds
``seed`` .. ``seed + N - 1``) and are joined the same way. Each phase keeps a resumable state in
``train.resume_dir/<key>``: a training interrupted mid-way continues from its last finished epoch, and
a finished phase (its final weights kept) is not trained again. The key covers the data, the settings,
the training code and the cluster size (``state_key``), and a finished training deletes its state, so
no later run can pick up another's weights.

Multi-worker (TF_CONFIG, ``pipeline.modeling.distributed``): ``train.batch_size`` is per replica, the
global batch is ``batch_size x replicas`` and, with ``train.scale_learning_rate``, the learning rates are
multiplied by the replicas. Only the chief writes the resume state, checkpoints, TensorBoard logs and
history; the other workers write to a temporary folder (removed at the end), seeded from the chief's
shared state at each phase's start so that every worker restores the same epoch and weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tenacity
import tensorflow as tf

from pipeline.core import atomic
from pipeline.core.atomic import staged_file, write_text
from pipeline.core.config import Params, TrainParams
from pipeline.core.hashing import file_sha256
from pipeline.core.imports import imported_by
from pipeline.core.project import project_path
from pipeline.modeling import distributed, records, selection, snapshots
from pipeline.modeling import inputs as dp
from pipeline.modeling.models import BuiltModel, build_from_params, set_backbone_trainable

EpochSink = Callable[[dict[str, float]], None]


@dataclass
class TrainOutcome:
    built: BuiltModel
    class_names: tuple[str, ...]
    device: str
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_trained: int = 0
    input_cache: str = ""  # how the train split was read after its first epoch (``cache_note``)
    tensorboard_logs: Path | None = None  # this training's TensorBoard folder (train.tensorboard_dir/<state key>)
    state_dir: Path | None = None  # the chief's resume state (train.resume_dir/<state key>), kept until discard_state
    images: dict[str, int] = field(default_factory=dict)  # the train and val images it used (a limit applied)

    @property
    def best_val_auc(self) -> float:
        """The saved model's val AUC where training selects one: a later phase keeps its weights only when it
        beats every earlier phase's best. Of an ensemble: its best network's; with snapshots, its best epoch,
        which may be mid-cycle though only each cycle's last weights join the saved model."""
        return max((h["val_auc"] for h in self.history if "val_auc" in h), default=float("nan"))


# How a multi-worker strategy splits the file-path datasets between workers: DATA (each worker keeps its
# share of every global batch). Sharded TFRecord inputs would use FILE.
SHARD_POLICY = tf.data.experimental.AutoShardPolicy.DATA


def configure_hardware(params: TrainParams) -> tuple[tf.distribute.Strategy, str]:
    """The strategy and device (with seeds and optional op determinism): MultiWorkerMirroredStrategy when
    TF_CONFIG names a cluster of several tasks, else every GPU (mixed precision) or the CPU."""
    cluster = distributed.cluster_from_env()
    # Created before any other TensorFlow op: the collective runtime must start first.
    multi = distributed.multi_worker_strategy() if cluster else None
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")
    keras.mixed_precision.set_global_policy("mixed_float16" if gpus else "float32")
    local = f"{len(gpus)} GPU(s), mixed precision" if gpus else f"CPU ({os.cpu_count()} cores)"
    if multi is not None and cluster is not None:
        return multi, (
            f"{local}, MultiWorkerMirroredStrategy ({cluster.size} workers, {multi.num_replicas_in_sync} "
            f"replicas; this is {cluster.name})"
        )
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(), f"{local}, MirroredStrategy"
    return tf.distribute.get_strategy(), local


class _PhaseRecorder(keras.callbacks.Callback):
    """Keeps the phase's epoch history on disk (it survives an interruption) and forwards each epoch."""

    def __init__(self, phase: str, path: Path, sink: EpochSink | None, offset: int) -> None:
        super().__init__()
        self.phase, self.path, self.sink, self.offset = phase, path, sink, offset
        # Only the chief's copy is the shared state; a non-chief worker's is a private copy of it.
        self.rows: list[dict[str, float]] = json.loads(path.read_text()) if path.is_file() else []
        self.trained = 0  # epochs this process trained (not restored)

    def send(self, rows: list[dict[str, float]]) -> None:
        """Restored rows to the sink (MLflow logs them at their own steps), so the run's curves are complete."""
        for row in rows if self.sink else []:
            self.sink(row)

    def done(self, epochs: int) -> list[dict[str, float]]:
        """The rows of the phase's first `epochs` epochs (those the backup restored). A row written just before a
        kill ended its epoch's backup is past them; that epoch runs again and its row replaces this one."""
        return [r for r in self.rows if r["epoch"] - self.offset <= epochs]

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        lr = self.model.optimizer.learning_rate
        row = {
            "epoch": self.offset + epoch + 1,
            "phase": self.phase,
            "learning_rate": float(keras.ops.convert_to_numpy(lr)),
            **{k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"},
        }
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        write_text(self.path, json.dumps(self.rows))  # a kill mid-write leaves the previous epoch's rows
        self.trained += 1
        if self.sink:
            self.sink(row)


def learning_rate_schedule(
    params: TrainParams, learning_rate: float, epochs: int, steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """plateau: a constant rate (ReduceLROnPlateau halves it); cosine: linear warm-up, then cosine decay to 0;
    with ``snapshots``, whatever the schedule: that many cosine cycles, each restarting at the full rate."""
    if params.snapshots:
        return snapshots.cyclic_schedule(learning_rate, epochs, params.snapshots, steps_per_epoch)
    if params.schedule == "plateau":
        return learning_rate
    warmup = min(params.warmup_epochs, epochs - 1) * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        learning_rate * 0.01 if warmup else learning_rate,
        decay_steps=max(1, epochs * steps_per_epoch - warmup),
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def ema_momentum(ema_epochs: float, steps_per_epoch: int) -> float:
    """The per-step momentum of a weight average over about `ema_epochs` epochs (1 - 1 / steps averaged)."""
    return 1.0 - 1.0 / max(ema_epochs * steps_per_epoch, 1.0)


def _compile(
    model: keras.Model,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    n_classes: int,
    params: TrainParams,
    steps_per_epoch: int,
) -> None:
    smoothing = params.label_smoothing
    if n_classes == 2:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=smoothing)
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
    ema = {}
    if params.ema_epochs:
        ema = {"use_ema": True, "ema_momentum": ema_momentum(params.ema_epochs, steps_per_epoch)}
    if params.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=params.weight_decay, **ema)
    else:
        optimizer = keras.optimizers.Adam(learning_rate, **ema)
    # Class weights arrive as sample weights in the batches: they weight the loss, not the AUC and accuracy.
    model.compile(optimizer=optimizer, loss=loss, metrics=[keras.metrics.AUC(name="auc"), "accuracy"])


@dataclass(frozen=True)
class _Place:
    """Where this process writes: the shared state (chief, or single process) or a private copy of it."""

    state_dir: Path  # what this process writes its resume state to
    tensorboard_dir: Path
    shared_state_dir: Path  # the chief's; a non-chief worker copies it in at each phase's start
    strategy: tf.distribute.Strategy
    chief: bool = True

    @property
    def multi_worker(self) -> bool:
        return distributed.is_multi_worker(self.strategy)


TENSORBOARD_KEPT = "tensorboard"  # in the resume state: the events so far, for a resume DVC cleared the logs of


class KeptTensorBoard(keras.callbacks.TensorBoard):
    """TensorBoard whose events are also kept with the resume state at each epoch's end. ``train.tensorboard_dir``
    is a DVC output, which DVC removes before the stage runs, so a training resumed under DVC restores its earlier
    epochs' events from there first and appends to them, as one outside DVC appends in place."""

    def __init__(self, log_dir: Path, kept: Path) -> None:
        if kept.is_dir() and not log_dir.is_dir():
            shutil.copytree(kept, log_dir)
        super().__init__(str(log_dir), histogram_freq=0)
        self.kept = kept

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        for writer in self._writers.values():  # the epoch's events on disk before they are copied
            writer.flush()
        shutil.copytree(self.log_dir, self.kept, dirs_exist_ok=True)


def _selection_callbacks(
    best: Path, to_beat: float | None, rows: selection.Rows, params: TrainParams
) -> list[keras.callbacks.Callback]:
    """The best epoch on val AUC checkpointed, early stopping, and (plateau schedule) the rate halved on plateaus:
    each keeps its state over a resume (``pipeline.modeling.selection``)."""
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(selection.pending(best)),
        monitor=selection.MONITOR,
        mode="max",
        save_best_only=True,
        save_weights_only=True,
        initial_value_threshold=to_beat,
    )
    callbacks = [
        checkpoint,
        selection.BestCheckpoint(best, checkpoint, rows, rebuild=not params.ema_epochs),
        selection.ResumedEarlyStopping(
            rows, monitor=selection.MONITOR, mode="max", patience=params.early_stopping_patience
        ),
    ]
    if params.schedule == "plateau":
        callbacks.append(
            selection.ResumedReduceLROnPlateau(
                rows, monitor=selection.MONITOR, mode="max", factor=0.5, patience=params.lr_patience, min_lr=1e-7
            )
        )
    return callbacks


def _snapshot_callbacks(phase_dir: Path, epochs: int, params: TrainParams) -> list[keras.callbacks.Callback]:
    cycle = snapshots.cycle_epochs(epochs, params.snapshots)
    return [snapshots.SnapshotSaver(phase_dir, cycle, average=bool(params.ema_epochs))]


@tenacity.retry(
    retry=tenacity.retry_if_exception_type((shutil.Error, FileNotFoundError)),
    stop=tenacity.stop_after_attempt(5),
    wait=tenacity.wait_fixed(0.2),
    reraise=True,
)
def copy_shared_state(shared: Path, phase_dir: Path) -> None:
    """A non-chief worker's private copy of the chief's phase state; not the files the chief is writing right
    now (atomic writes' temporaries). The chief may still rename one the copy listed (its phase start promotes
    ``.pending.best``): the copy is then made again from the start, so it is one moment's state."""
    shutil.rmtree(phase_dir, ignore_errors=True)
    ignored = shutil.ignore_patterns(atomic.TEMPORARY)
    shutil.copytree(shared, phase_dir, ignore=ignored, copy_function=shutil.copy2)  # looked up now: a test races it


def _fit_phase(
    model: keras.Model,
    phase: str,
    train: object,
    val: object,
    epochs: int,
    params: TrainParams,
    place: _Place,
    offset: int,
    sink: EpochSink | None,
    extra: list[keras.callbacks.Callback],
    floor: float | None = None,
    **fit_kwargs: object,
) -> tuple[list[dict[str, float]], int]:
    """Fit one phase with early stopping and a best checkpoint on val AUC, LR decay, TensorBoard, resume.

    `floor`: the best val AUC of the phase before (fine-tuning after the head), whose weights the model holds
    now: they stay the phase's best until an epoch beats them, so fine-tuning never ends on a worse model.
    Returns the phase's history rows (restored ones included) and the epochs this process trained."""
    phase_dir = place.state_dir / phase
    shared = place.shared_state_dir / phase
    if not place.chief and shared.is_dir():
        # Restore what the chief saved (read before the first epoch ends, so before the chief writes again):
        # every worker starts at the same epoch, weights and best-so-far, and keeps to the same step count.
        copy_shared_state(shared, phase_dir)
    phase_dir.mkdir(parents=True, exist_ok=True)
    recorder = _PhaseRecorder(phase, phase_dir / "history.json", sink, offset)
    done = phase_dir / "done.weights.h5"
    if done.is_file():  # finished before an interruption in a later phase or ensemble member
        model.load_weights(done)
        recorder.send(recorder.rows)
        return recorder.rows, 0
    best = phase_dir / "best.weights.h5"
    to_beat = selection.settle(best)
    if floor is not None and not params.snapshots and to_beat is None:
        # The earlier phase's model stays the best until an epoch of this one beats it
        selection.save_stamped(model, best, 0, floor)
        to_beat = floor
    callbacks = [
        recorder,  # first: an epoch's row is on disk before its backup says the epoch is done
        # Two states kept: a kill mid-save leaves the previous epoch's to resume from.
        keras.callbacks.BackupAndRestore(
            str(phase_dir / "backup"), save_freq="epoch", double_checkpoint=True, delete_checkpoint=True
        ),
        # The epochs the backup restored, trained by an earlier process, to the sink
        keras.callbacks.LambdaCallback(
            on_train_begin=lambda logs: recorder.send(recorder.done(selection.epochs_done(model)))
        ),
        # Weight averaging: the average is swapped in for validation and for the callbacks below it at each
        # epoch's end (the backup above keeps the raw weights, and the average with the optimizer, to resume).
        *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if params.ema_epochs else []),
        # Snapshots: every cycle runs to its end and is kept; no best epoch, no early stop, no plateau decay.
        *(
            _snapshot_callbacks(phase_dir, epochs, params)
            if params.snapshots
            else _selection_callbacks(best, to_beat, recorder.done, params)
        ),
        KeptTensorBoard(place.tensorboard_dir / phase, place.state_dir / TENSORBOARD_KEPT / phase),
        *extra,
    ]
    # Keras keeps the epoch BackupAndRestore restored on the model: a later fit of it (fine-tuning after a resumed
    # head phase) would start there
    model._initial_epoch = None
    if place.multi_worker:
        distributed.fit_ready(model)
        with place.strategy.scope():
            model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks, verbose=2, **fit_kwargs)
    else:
        model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks, verbose=2, **fit_kwargs)
    if best.is_file():
        model.load_weights(best)
    with staged_file(done) as tmp:
        model.save_weights(tmp)
    return recorder.rows, recorder.trained


def train(
    params: Params,
    index: pd.DataFrame,
    sink: EpochSink | None = None,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    hardware: tuple[tf.distribute.Strategy, str] | None = None,
    keep_state: bool = False,
) -> TrainOutcome:
    """Train the configured model on the index's train split, selecting on its val split.

    Under TF_CONFIG every worker calls this; only the chief's outputs (resume state, checkpoints,
    TensorBoard logs, `sink`) are real, the other workers' go to a temporary folder removed at the end.
    `hardware`: ``configure_hardware``'s result where the caller made it first (once per process).
    `keep_state`: the resume state outlives the call, for the caller to ``discard_state`` once the model is saved.
    """
    extra = extra_callbacks or []
    strategy, device = hardware or configure_hardware(params.train)
    cluster = distributed.cluster_from_env()
    scratch = None if cluster is None or cluster.is_chief else Path(tempfile.mkdtemp(prefix="pneumo-worker-"))
    try:
        outcome = _train(params, index, sink if scratch is None else None, extra, strategy, device, scratch)
        if not keep_state:
            discard_state(outcome)
        return outcome
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _train(
    params: Params,
    index: pd.DataFrame,
    sink: EpochSink | None,
    extra: list[keras.callbacks.Callback],
    strategy: tf.distribute.Strategy,
    device: str,
    scratch: Path | None,
) -> TrainOutcome:
    tp, mp = params.train, params.model
    replicas = strategy.num_replicas_in_sync
    global_batch = tp.batch_size * replicas  # train.batch_size is per replica
    lr_scale = replicas if tp.scale_learning_rate else 1
    limit = tp.max_images_per_split
    train_data = dp.split_data(index, "train", params.data.root, params.task, limit, tp.seed)
    val_data = dp.split_data(index, "val", params.data.root, params.task, limit, tp.seed)
    if tp.input == "shards":
        train_data, val_data = from_shards(params, index, train_data, val_data)
    n_classes = len(train_data.class_names)
    weights = dp.class_weights(train_data.labels, n_classes) if tp.class_weights else None
    one_hot = n_classes > 2

    def build() -> BuiltModel:
        return build_from_params(mp, n_classes)

    with strategy.scope():
        built = build()
    cache_train = dp.fits_in_memory(len(train_data), mp.image_size, tp.memory_cache_mb, training=True)
    cache_val = dp.fits_in_memory(len(val_data), mp.image_size, tp.memory_cache_mb, training=False)
    outcome = TrainOutcome(
        built, train_data.class_names, device, images={"train": len(train_data), "val": len(val_data)}
    )
    outcome.input_cache = (
        "decoded once for the frozen backbone's features (train.cache_features): "
        "the head phase sees no augmentation, mixup or class reframing"
    )
    shared_state = Path(tp.resume_dir) / state_key(params, index, workers=_cluster_size(), replicas=replicas)
    # TensorBoard logs by the same key: a resumed training appends to its own (under DVC, which clears the folder,
    # after restoring the events kept with the resume state: KeptTensorBoard), another never mixes in.
    place = _Place(
        state_dir=shared_state if scratch is None else scratch / "state",
        tensorboard_dir=(Path(tp.tensorboard_dir) if scratch is None else scratch / "tensorboard") / shared_state.name,
        shared_state_dir=shared_state,
        strategy=strategy,
        chief=scratch is None,
    )
    outcome.tensorboard_logs = place.tensorboard_dir
    if place.chief and not shared_state.is_dir():  # fresh: a finished run's events of this key are not ours
        shutil.rmtree(place.tensorboard_dir, ignore_errors=True)
    start = time.perf_counter()
    trained = 0  # epochs this process trained: restored ones took none of its seconds

    def fit_on_images(
        model: keras.Model, phase: str, epochs: int, learning_rate: float, seed: int, floor: float | None = None
    ) -> None:
        """Compile at `learning_rate` and fit `epochs` on the (augmented) image batches, shuffled by `seed`;
        `floor`: see ``_fit_phase``."""
        nonlocal trained
        outcome.input_cache = cache_note(len(train_data), mp.image_size, tp.memory_cache_mb)
        steps = dp.steps_per_epoch(len(train_data), global_batch)
        with strategy.scope():
            _compile(model, learning_rate_schedule(tp, learning_rate * lr_scale, epochs, steps), n_classes, tp, steps)
        train_ds = dp.make_dataset(
            train_data,
            mp.image_size,
            global_batch,
            training=True,
            augment=tp.augment,
            seed=seed,
            one_hot=one_hot,
            weights=weights,
            mixup=tp.mixup,
            shuffle_buffer=tp.shuffle_buffer,
            cache=cache_train,
            # Images in the order they finish decoding, unless asked for determinism or several workers
            # read the same global batches (each keeps its share, so every worker must see one order).
            deterministic=tp.deterministic or place.multi_worker,
        )
        val_ds = dp.make_dataset(val_data, mp.image_size, global_batch, one_hot=one_hot, cache=cache_val)
        if place.multi_worker:  # the batches are global: the strategy gives each worker its share
            train_ds = distributed.distribute_options(train_ds, SHARD_POLICY)
            val_ds = distributed.distribute_options(val_ds, SHARD_POLICY)
        rows, epochs_trained = _fit_phase(
            model,
            phase,
            train_ds,
            val_ds,
            epochs,
            tp,
            place,
            len(outcome.history),
            sink,
            extra,
            floor,
            steps_per_epoch=steps,  # the training batches never end: an epoch is one pass
            shuffle=False,
        )
        outcome.history.extend(rows)
        trained += epochs_trained

    if not built.backbone_layers:  # from scratch: one phase, every layer, per member of an ensemble
        networks: list[keras.Model] = []
        for member in range(1, tp.members + 1):
            seed = tp.seed + member - 1
            if member > 1:  # a network of its own: other initial weights, augmentations and batch order
                keras.utils.set_random_seed(seed)
                with strategy.scope():
                    built = build()
            phase = "full" if tp.members == 1 else f"member-{member}"
            fit_on_images(built.model, phase, tp.epochs, tp.learning_rate, seed)
            if tp.snapshots:  # the cycles' snapshots stand in for the network
                networks += snapshots.load_members(lambda: build().model, place.state_dir / phase, tp.snapshots)
            else:
                networks.append(built.model)
        if len(networks) > 1:  # one model, the mean of their logits, is what is saved
            outcome.built = BuiltModel(snapshots.join(networks, built.last_conv), [], snapshots.ENSEMBLE_CONV)
    else:
        set_backbone_trainable(built, 0)
        if tp.cache_features and not place.multi_worker:  # multi-worker: the head trains on images
            rows, trained = _train_head_on_features(built, train_data, val_data, params, place, weights, sink, extra)
            outcome.history += rows
        else:
            fit_on_images(built.model, "head", tp.epochs, tp.learning_rate, tp.seed)
        if tp.fine_tune_epochs:
            if note := fine_tune_note(built, tp.fine_tune_layers, mp.architecture):
                print(f"train: {note}")
            set_backbone_trainable(built, tp.fine_tune_layers)
            head_best = outcome.best_val_auc
            floor = None if np.isnan(head_best) else head_best
            fit_on_images(built.model, "fine_tune", tp.fine_tune_epochs, tp.fine_tune_learning_rate, tp.seed, floor)
    outcome.seconds = time.perf_counter() - start
    outcome.images_trained = len(train_data) * trained
    if place.chief:
        outcome.state_dir = place.state_dir
    return outcome


def discard_state(outcome: TrainOutcome) -> None:
    """The finished training's resume state, removed once its model is safe: until then a run that fails (the
    tracking server down for the model upload, a full disk) is resumed, its finished phases loaded, not retrained."""
    if outcome.state_dir is not None:
        shutil.rmtree(outcome.state_dir, ignore_errors=True)


def _train_head_on_features(
    built: BuiltModel,
    train_data: dp.SplitData,
    val_data: dp.SplitData,
    params: Params,
    place: _Place,
    weights: dict[int, float] | None,
    sink: EpochSink | None,
    extra: list[keras.callbacks.Callback],
) -> tuple[list[dict[str, float]], int]:
    """Frozen backbone: run it once over train and val, then fit the head (dropout + dense) on the features.

    The head layers are the full model's own, so its weights land in the full model. Augmentation
    does not apply to cached features (the features are computed on the un-augmented images).
    """
    tp, size = params.train, params.model.image_size
    replicas = place.strategy.num_replicas_in_sync
    batch = tp.batch_size * replicas  # per replica -> global
    learning_rate = tp.learning_rate * (replicas if tp.scale_learning_rate else 1)
    model = built.model
    extractor = keras.Model(model.input, model.get_layer("gap").output)
    n_classes = len(train_data.class_names)

    def features(data: dp.SplitData) -> tuple[np.ndarray, np.ndarray]:
        x = extractor.predict(dp.make_dataset(data, size, batch, cache=False), verbose=0)
        y = keras.utils.to_categorical(data.labels, n_classes) if n_classes > 2 else data.labels.astype("float32")
        return x, y

    (xt, yt), (xv, yv) = features(train_data), features(val_data)
    with place.strategy.scope():
        inputs = keras.Input(xt.shape[1:], name="features")
        head = keras.Model(inputs, model.get_layer("prediction")(model.get_layer("head_dropout")(inputs)), name="head")
        steps = dp.steps_per_epoch(len(xt), batch)
        _compile(head, learning_rate_schedule(tp, learning_rate, tp.epochs, steps), n_classes, tp, steps)
    return _fit_phase(
        head,
        "head",
        xt,
        (xv, yv),
        tp.epochs,
        tp,
        place,
        0,
        sink,
        extra,
        y=yt,
        batch_size=batch,
        class_weight=weights,
        shuffle=True,
    )


def fine_tune_note(built: BuiltModel, layers: int, architecture: str) -> str | None:
    """What fine-tuning unfreezes where train.fine_tune_layers is past the backbone's size (None otherwise)."""
    size = len(built.backbone_layers)
    if layers <= size:
        return None
    return (
        f"train.fine_tune_layers {layers} is more than {architecture}'s {size} backbone layers: "
        "fine-tuning unfreezes the whole backbone"
    )


def _cluster_size() -> int:
    cluster = distributed.cluster_from_env()
    return cluster.size if cluster else 1


def cache_note(n_images: int, image_size: int, limit_mb: float) -> str:
    """How the train split is read after its first epoch, for the log and the MLflow run."""
    size = dp.cache_megabytes(n_images, image_size, training=True)
    if dp.fits_in_memory(n_images, image_size, limit_mb, training=True):
        return f"decoded once, kept in memory ({size:,.0f} MB)"
    return f"decoded every epoch ({size:,.0f} MB cached would exceed train.memory_cache_mb {limit_mb:g})"


def from_shards(params: Params, index: pd.DataFrame, *data: dp.SplitData) -> list[dp.SplitData]:
    """`data` read from the shards in ``shards.out`` (refused when they were written from another index)."""
    out = params.shards.out
    manifest = records.load_manifest(out)
    records.check_manifest(manifest, index, out)
    return [
        replace(d, shards=tuple(records.shard_files(out, manifest, d.split)), compression=manifest["compression"])
        for d in data
    ]


def training_code() -> list[str]:
    """The source files of this module and of every package module it imports, at any depth (the import
    graph, function-level imports included): a list written by hand missed the lung-field crop once."""
    return [
        str(getattr(sys.modules.get(name), "__file__", None) or importlib.util.find_spec(name).origin)
        for name in sorted(imported_by(__name__))
    ]


def state_key(params: Params, index: pd.DataFrame, workers: int = 1, replicas: int = 1) -> str:
    """Everything that determines a training's result: a resume matches only the same run.

    The data (path, label, split and bytes of every usable train/val image), the task, model, train
    and split params (output folders aside), a weights file's bytes (``model.weights``), where the images are
    read from (``train.input``; for shards, their manifest: the shard files' hashes), the source of every
    module training runs (``training_code``), the number of workers and of replicas (a cluster of another
    size, or another number of local GPUs, splits the batches differently: the global batch is per replica), the
    dtype policy (mixed precision on a GPU wraps the optimizer for loss scaling: a GPU run resumed on a CPU, or the
    reverse, would load the weights but drop the optimizer's state and restart the schedule) and the Keras and
    TensorFlow versions that wrote the state.
    """
    used = index[index["split"].isin(["train", "val"]) & index["decodable"]]
    data = used.sort_values("path")[["path", "split", "label", "subtype", "sha256"]].to_numpy().tolist()
    tp = params.train
    train = dp.split_data(index, "train", params.data.root, params.task, tp.max_images_per_split, tp.seed)
    settings = [
        params.task,
        params.model.model_dump(),
        params.train.model_dump(exclude={"model_dir", "tensorboard_dir", "resume_dir", "memory_cache_mb"}),
        # Whether the train split is cached changes the batches after the first epoch; the limit itself does not
        dp.fits_in_memory(len(train), params.model.image_size, params.train.memory_cache_mb, training=True),
        params.split.model_dump(),
        workers,
        replicas,
        keras.mixed_precision.global_policy().name,
        keras.__version__,
        tf.__version__,
    ]
    if params.train.input == "shards":
        settings.append(records.manifest_digest(params.shards.out))
    weights = project_path(params.model.weights)  # as the model loads it
    if params.model.weights not in ("none", "imagenet") and weights.is_file():  # the file's bytes, not its name
        settings.append(file_sha256(weights))
    code = [Path(origin).read_bytes().decode() for origin in training_code()]
    blob = json.dumps([data, settings, code], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
