"""The train stage: train, save the model with its metadata, and track everything in one MLflow run.

Under a multi-worker TF_CONFIG every worker runs this stage; only the chief opens the MLflow run and
writes the model, metadata and reports, the other workers train in lockstep and write nothing.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.models import infer_signature

from pipeline import __version__
from pipeline.core.atomic import write_text
from pipeline.core.config import Params
from pipeline.core.locks import folder_lock
from pipeline.data.dataset_index import read_index
from pipeline.data.version import dvc_data_version, index_fingerprint
from pipeline.modeling import distributed, model_store, training
from pipeline.modeling.evaluation import history_figure
from pipeline.registry import tracking

TRAIN_REPORT = "reports/train.json"
HISTORY_DIR = "reports/training"


def describe_architecture(params: Params) -> str:
    """The architecture as the model card names it, with the ensemble it is, if any."""
    members, cycles = params.train.members, params.train.snapshots
    if members > 1 and cycles:
        return f"{params.model.architecture}, an ensemble of {members} networks x {cycles} snapshots"
    if members > 1:
        return f"{params.model.architecture}, an ensemble of {members} networks"
    if cycles:
        return f"{params.model.architecture}, a snapshot ensemble of {cycles}"
    return params.model.architecture


def _history_csv(history: list[dict[str, Any]]) -> str:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k not in ("epoch", "phase"), k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def _ensemble_note(params: Params) -> str:
    """What the best val AUC is of, for an ensemble: val AUC is logged per network and epoch, not for the mean."""
    if params.train.snapshots:  # a mid-cycle epoch may be the best, though only the cycles' last weights are kept
        return " (its best epoch of any cycle; evaluate scores the ensemble)"
    return " (of its best network; evaluate scores the ensemble)" if params.train.members > 1 else ""


def run(params: Params, extra_callbacks: list[keras.callbacks.Callback] | None = None) -> str:
    cluster = distributed.cluster_from_env()
    if cluster is not None and not cluster.is_chief:
        outcome = training.train(params, read_index(params.index.path), extra_callbacks=extra_callbacks)
        return (
            f"{cluster.name} of {cluster.size}: trained {len(outcome.history)} epochs in lockstep on "
            f"{outcome.device}; the chief writes the model and the MLflow run"
        )
    with folder_lock("train", outputs=params.stage_folders()):
        # The strategy first: a cluster that cannot start (a worker's port taken) stops before any MLflow run.
        hardware = training.configure_hardware(params.train)
        return _train_and_track(params, read_index(params.index.path), extra_callbacks, hardware)


def _train_and_track(
    params: Params,
    index: pd.DataFrame,
    extra_callbacks: list[keras.callbacks.Callback] | None,
    hardware: tuple[tf.distribute.Strategy, str],
) -> str:
    """The chief's (or the only process's) training: the model, its metadata and reports, one MLflow run."""
    experiment_id = tracking.configure(params.mlflow)
    data_version = dvc_data_version(params.data.root, index=params.index.path) or "untracked"
    fingerprint = index_fingerprint(index)
    run_name = f"{params.model.architecture}-{params.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = tracking.parent_tags()  # a sweep trial: nested under the sweep's run
    run_name = f"{tags['sweep_trial']}-{run_name}" if "sweep_trial" in tags else run_name
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as active:
        ref = tracking.RunRef(active.info.run_id, experiment_id, tracking.tracking_uri(params.mlflow))
        mlflow.set_tags(
            {
                "git_commit": tracking.git_commit(),
                "data_version": data_version,
                "index_fingerprint": fingerprint,
                "data_source": params.data.source,
                "pipeline_version": __version__,
            }
        )
        run_params = {
            "task": params.task,
            "model": params.model.model_dump(),
            "split": params.split.model_dump(),
            "train": params.train.model_dump(exclude={"model_dir", "tensorboard_dir", "resume_dir"}),
        }
        mlflow.log_params(tracking.flatten("", run_params))
        tracking.log_datasets(index, params.data.root, data_version)
        if Path(params.validation.report).is_file():
            mlflow.log_artifact(params.validation.report, "validation")

        def log_epoch(row: dict[str, Any]) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "phase")}, step=int(row["epoch"]))

        outcome = training.train(
            params, index, sink=log_epoch, extra_callbacks=extra_callbacks, hardware=hardware, keep_state=True
        )
        mlflow.set_tags({"device": outcome.device, "train_images_read": outcome.input_cache})
        model = outcome.built.model
        metadata = {
            "name": "pneumo-chest-xray",
            "pipeline_version": __version__,
            "task": params.task,
            "class_names": list(outcome.class_names),
            "architecture": describe_architecture(params),
            "weights_init": params.model.weights,
            "last_conv_layer": outcome.built.last_conv,
            "input": {
                "shape": [params.model.image_size, params.model.image_size, 1],
                "dtype": "float32",
                "range": [0, 255],
                "preprocessing": "decode as 8-bit grayscale, resize (stretch) to a square "
                "(area when shrinking 2x or more, else bilinear), round to whole gray levels; "
                "pipeline.modeling.preprocess.decode_image",
            },
            "output": "P(PNEUMONIA)" if params.task == "binary" else "softmax over class_names",
            "data_version": data_version,
            "index_fingerprint": fingerprint,
            # what training used (train.max_images_per_split applied); test's is what the index holds
            "split_sizes": {**outcome.images, "test": int(((index["split"] == "test") & index["decodable"]).sum())},
            "best_val_auc": outcome.best_val_auc,
            "epochs": len(outcome.history),
            "device": outcome.device,
            "mlflow_run_id": ref.run_id,
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        model_store.save(model, params.train.model_dir, metadata)
        write_text(Path(HISTORY_DIR) / "history.csv", _history_csv(outcome.history))
        history_figure(outcome.history, Path(HISTORY_DIR) / "history.png")
        images_per_s = outcome.images_trained / outcome.seconds if outcome.seconds else 0.0
        report = {
            "best_val_auc": outcome.best_val_auc,
            "epochs": len(outcome.history),
            "train_seconds": round(outcome.seconds, 2),
            "train_images_per_second": round(images_per_s, 1),
            "mlflow_run_id": ref.run_id,
        }
        write_text(TRAIN_REPORT, json.dumps(report, indent=2) + "\n")
        mlflow.log_metrics({"best_val_auc": outcome.best_val_auc, "train_images_per_second": images_per_s})
        mlflow.log_artifact(str(Path(HISTORY_DIR) / "history.png"), "training")
        mlflow.log_artifact(str(Path(params.train.model_dir) / model_store.METADATA_FILE), "model_metadata")
        if outcome.tensorboard_logs is not None and outcome.tensorboard_logs.is_dir():  # this training's only
            mlflow.log_artifacts(str(outcome.tensorboard_logs), "tensorboard")
        size = params.model.image_size
        example = np.zeros((1, size, size, 1), dtype="float32")
        # input_example= crashes mlflow.keras.log_model (mlflow/mlflow#16183): log the example beside the model.
        logged = mlflow.keras.log_model(
            model,
            name="model",
            signature=infer_signature(example, model.predict(example, verbose=0)),
            pip_requirements=model_store.pip_requirements(),
        )
        mlflow.log_dict({"inputs": example.tolist(), "shape": list(example.shape)}, "model_input_example.json")
        ref = tracking.RunRef(ref.run_id, ref.experiment_id, ref.tracking_uri, logged.model_uri)
        tracking.save_run_ref(params.mlflow.run_file, ref)
    training.discard_state(outcome)  # the model is saved and logged: a re-run has nothing left to resume
    return (
        f"trained {metadata['architecture']} ({params.task}) on {outcome.device}: best val AUC "
        f"{outcome.best_val_auc:.4f}{_ensemble_note(params)} after "
        f"{len(outcome.history)} epochs, {images_per_s:.0f} images/s; train images {outcome.input_cache}\n"
        f"model: {params.train.model_dir}/{model_store.MODEL_FILE}; MLflow run {ref.run_id}"
    )
