"""MLflow setup: a sqlite store under mlruns/ by default, any tracking URI by MLFLOW_TRACKING_URI or params.

One MLflow run per pipeline run: the train stage opens it and records its id in
``mlflow.run_file`` (a DVC output), so evaluate and register log into the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import tenacity
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.core.atomic import write_text
from pipeline.core.config import MlflowParams
from pipeline.core.errors import PipelineError, TransientError
from pipeline.core.locks import file_lock
from pipeline.core.project import project_path
from pipeline.data.version import split_fingerprint

PARENT_RUN_ENV = "PNEUMO_MLFLOW_PARENT_RUN_ID"  # set by a sweep: its trials' runs nest under the sweep's run
TRIAL_ENV = "PNEUMO_SWEEP_TRIAL"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (the UI folds child runs under the parent)


@dataclass(frozen=True)
class RunRef:
    run_id: str
    experiment_id: str
    tracking_uri: str
    model_uri: str = ""

    @property
    def ui_hint(self) -> str:
        path = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"{self.tracking_uri.rstrip('/')}/{path}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}  then open http://127.0.0.1:5000/{path}"


def tracking_uri(params: MlflowParams) -> str:
    """MLFLOW_TRACKING_URI, else params; a relative sqlite path is made absolute against the project folder
    (MLflow caches one database engine per URI string, so a relative URI would follow the first folder; and
    a DVC experiment's copy of the project is deleted after the run: see pipeline.core.project)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(project_path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def open_store(uri: str) -> None:
    """Point MLflow at `uri`. A sqlite store is opened under a lock file beside it: MLflow creates a new
    store's tables on first use, and two processes doing that at once (two queued DVC experiments on a
    fresh project) fail one of them (`duplicate column name`). MLflow keeps the opened store per process."""
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = database.with_name(f".{database.name}.init.lock")
        with file_lock(lock, 300, f"MLflow store {database.name} set-up", log=lambda _: None):
            MlflowClient(uri).search_experiments(max_results=1)


def configure(params: MlflowParams) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    uri = tracking_uri(params)
    try:
        open_store(uri)
        return experiment_id(params.experiment, params)
    except Exception as exc:  # noqa: BLE001 - the server being down surfaces as many types
        raise TransientError(
            f"mlflow: cannot use tracking URI {uri} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from None


def experiment_id(name: str, params: MlflowParams) -> str:
    """The id of experiment `name` in the current tracking store, created when missing (on a local store with
    its artifacts under params.artifact_root). MLflow looks the name up, then inserts it: when a concurrent
    process created it in between, the insert fails on the unique name and its experiment is used."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        local = not mlflow.get_tracking_uri().startswith(("http://", "https://", "databricks"))
        location = project_path(params.artifact_root).resolve().as_uri() if local else None
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:
            if (experiment := mlflow.get_experiment_by_name(name)) is None:
                raise
    return experiment.experiment_id


def parent_tags() -> dict[str, str]:
    """The nesting tags of a run started inside a sweep trial (none outside one)."""
    parent, trial = os.environ.get(PARENT_RUN_ENV, "").strip(), os.environ.get(TRIAL_ENV, "").strip()
    return {PARENT_RUN_TAG: parent, **({"sweep_trial": trial} if trial else {})} if parent else {}


def pipeline_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> set[str]:
    """dvc.lock and every path dvc.yaml's stages write (outs, metrics, plots): a run changes them, not the code."""
    found = {"dvc.lock"}
    try:
        stages = yaml.safe_load(dvc_yaml.read_text()).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return found
    for spec in stages.values():
        for key in ("outs", "metrics", "plots"):
            found |= {next(iter(item)) if isinstance(item, dict) else str(item) for item in spec.get(key) or []}
    return found


def git_commit() -> str:
    """HEAD, with ``-dirty`` when tracked files other than the pipeline's own outputs differ from it (a run of
    the committed code rewrites dvc.lock and the committed reports: that is not a change of the code). The
    outputs are those of the nearest dvc.yaml at or above the current folder (a sweep trial runs below it)."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)

    try:
        out, top = git("rev-parse", "HEAD"), git("rev-parse", "--show-toplevel")
        changed = git("diff", "HEAD", "--name-only", "-z").stdout.split("\0")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0 or top.returncode != 0:
        return "unknown"
    root, here = Path(top.stdout.strip()).resolve(), Path.cwd().resolve()
    above = [f for f in (here, *here.parents) if f.is_relative_to(root)]
    project = next((f for f in above if (f / "dvc.yaml").is_file()), root)
    prefix = project.relative_to(root).as_posix()
    outputs = {(o if prefix == "." else f"{prefix}/{o}").rstrip("/") for o in pipeline_outputs(project / "dvc.yaml")}
    own = [c for c in changed if c and not any(c == o or c.startswith(f"{o}/") for o in outputs)]
    return out.stdout.strip() + ("-dirty" if own else "")


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def save_run_ref(path: str | Path, ref: RunRef) -> None:
    write_text(path, json.dumps(asdict(ref), indent=2) + "\n")


def load_run_ref(path: str | Path) -> RunRef:
    try:
        return RunRef(**json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no MLflow run recorded (run the train stage first)") from None
    except (ValueError, TypeError):
        raise PipelineError(f"{path}: not a run reference written by the train stage") from None


def require_same_run(expected: str, run_id: str, source: str, run_file: str) -> None:
    """`source`, a stage output recording the training run `run_id`, must belong to the run `run_file` names
    (`expected`): two trainings writing one project folder at once (a pipeline and a distributed training, a
    second terminal) would otherwise pair one network with another's threshold, calibration or MLflow run."""
    if run_id and run_id != expected:
        raise PipelineError(
            f"{source} comes from MLflow run {run_id}, but {run_file} names run {expected}: another training "
            "wrote this project folder meanwhile; run train again (one training per folder at a time)"
        )


DATASET_CONTEXT = {"train": "training", "val": "validation", "test": "test"}

# MLflow looks a data set up, then inserts it: a concurrent run (a sweep's parallel trial) that commits the
# same data set in between makes the insert fail on the store's unique key. The retry finds the row.
LOST_INSERT_RACE = ("UNIQUE constraint failed: datasets", 'unique constraint "dataset_pk"', "Duplicate entry")


def lost_insert_race(exc: BaseException) -> bool:
    return any(s in str(exc) for s in LOST_INSERT_RACE)


def _log_input_retrying(dataset: Any, context: str, tags: dict[str, str]) -> None:
    def note(state: tenacity.RetryCallState) -> None:
        print(f"train: data set '{dataset.name}' was logged by a concurrent run meanwhile; logging it again")

    tenacity.Retrying(
        retry=tenacity.retry_if_exception(lost_insert_race),
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_random(0.05, 0.5),
        before_sleep=note,
        reraise=True,
    )(mlflow.log_input, dataset, context=context, tags=tags)


def log_datasets(index: pd.DataFrame, root: str, data_version: str) -> None:
    """Record each split as an MLflow dataset input (the run page's Datasets panel).

    The digest is DVC's hash of the data folder (``untracked`` data: the split's content hash);
    the input's tags carry the split's own content hash and size.
    """
    source = Path(root).resolve().as_uri()
    for split, context in DATASET_CONTEXT.items():
        rows = index[(index["split"] == split) & index["decodable"]]
        rows = rows[["path", "label", "subtype", "patient_id", "sha256"]].reset_index(drop=True)
        split_hash = split_fingerprint(index, split)
        digest = data_version.removesuffix(".dir") if data_version != "untracked" else split_hash
        with warnings.catch_warnings():  # MLflow registers its local source twice and warns that it is ambiguous
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(rows, source=source, targets="label", name=split, digest=digest[:36])
        tags = {"split_fingerprint": split_hash, "images": str(len(rows)), "dvc_data_version": data_version}
        _log_input_retrying(dataset, context, tags)
