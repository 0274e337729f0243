"""The evaluate stage: predict val and test, choose the threshold, report, and log into the train run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipeline.core.atomic import write_text
from pipeline.core.config import Params
from pipeline.core.errors import PipelineError
from pipeline.core.locks import folder_lock
from pipeline.data.dataset_index import read_index
from pipeline.data.version import index_fingerprint, split_fingerprint
from pipeline.modeling import evaluation, model_store, tta
from pipeline.modeling import inputs as dp
from pipeline.registry import tracking


def show(params: Params) -> str:
    """The latest evaluation, as the evaluate stage printed it, and where its MLflow run is."""
    path = Path(params.evaluate.metrics)
    if not path.is_file():
        raise PipelineError(f"{path}: no evaluation yet (run `dvc repro`)")
    ev = evaluation.Evaluation.load(path)  # another file's JSON: one line naming it
    ref = tracking.load_run_ref(params.mlflow.run_file)
    return f"{ev.summary()}\nMLflow run {ref.run_id}: {ref.ui_hint}"


def run(params: Params) -> str:
    with folder_lock("evaluate", outputs=params.stage_folders()):
        return _evaluate(params)


def _evaluate(params: Params) -> str:
    model, metadata = model_store.load(params.train.model_dir)
    ref = tracking.load_run_ref(params.mlflow.run_file)
    model_run = str(metadata.get("mlflow_run_id", ""))
    source = f"{params.train.model_dir}/{model_store.METADATA_FILE}"
    tracking.require_same_run(ref.run_id, model_run, source, params.mlflow.run_file)
    size = int(metadata.get("input", {}).get("shape", [params.model.image_size])[0])
    index = read_index(params.index.path)
    trained_on = metadata.get("index_fingerprint")
    if trained_on and trained_on != (now := index_fingerprint(index)):  # re-split: val may hold training patients
        raise PipelineError(
            f"{params.index.path}: not the index {source} was trained on (fingerprint {now}, trained on "
            f"{trained_on}); run the train stage again (dvc repro)"
        )
    val = dp.split_data(index, "val", params.data.root, params.task)
    test = dp.split_data(index, "test", params.data.root, params.task)
    views = tta.Views.of(params.evaluate.tta)
    p_val = evaluation.predict_split(model, val, size, params.train.batch_size, views)
    evaluation.check_task(p_val, metadata.get("task"), params.task, len(val.class_names), params.train.model_dir)
    p_test = evaluation.predict_split(model, test, size, params.train.batch_size, views)
    calibrated = evaluation.calibrate(val.labels, p_val, test.labels, p_test) if params.evaluate.calibrate else None
    ev = evaluation.evaluate(
        val.labels,
        p_val,
        test.labels,
        p_test,
        test.class_names,
        params.evaluate,
        test_patients=test.patients,
        calibrated=calibrated,
    )
    if calibrated is not None:
        p_test = calibrated.p_test  # every figure and prediction below is of calibrated probabilities
    ev = dataclasses.replace(ev, test_set=split_fingerprint(index, "test"), model_run_id=model_run)

    e = params.evaluate
    write_text(e.metrics, json.dumps(ev.as_dict(), indent=2) + "\n")
    evaluation.write_plot_data(ev, test.labels, p_test, test.class_names, e.plots_dir)
    figures = evaluation.write_figures(ev, test.labels, p_test, test.class_names, e.figures_dir)
    scores = evaluation.pneumonia_score(p_test)
    predictions = pd.DataFrame(
        {
            "path": test.paths,
            "label": [test.class_names[i] for i in test.labels],
            "pneumonia_score": scores.round(6),
            "predicted_pneumonia": scores >= ev.threshold,
        }
    )
    write_text(e.predictions, predictions.to_csv(index=False))

    tracking.configure(params.mlflow)
    with mlflow.start_run(run_id=ref.run_id):
        mlflow.log_metrics({k: v for k, v in ev.flat().items() if np.isfinite(v)})
        # Tags, not params: a re-evaluation with other settings updates them instead of failing.
        mlflow.set_tags({"threshold": f"{ev.threshold:.6f}", "evaluate.target_sensitivity": e.target_sensitivity})
        mlflow.log_artifact(e.metrics, "evaluation")
        mlflow.log_artifact(e.predictions, "evaluation")
        for f in [*figures, *Path(e.plots_dir).glob("*.csv")]:
            mlflow.log_artifact(str(f), "evaluation")
    return f"{ev.summary()}\nMLflow run {ref.run_id}: {ref.ui_hint}"
