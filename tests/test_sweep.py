"""The sweep flow: grid and random expansion checked against the schema before anything runs, then three
real trials (train + evaluate as subprocesses, in parallel) through a real Prefect server, nested MLflow
runs under one parent, the winner chosen on validation AUC and registered as a candidate, never champion."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from flows.sweep_flow import (
    expand,
    own_outputs,
    pneumonia_sweep,
    prepare_data,
    store_warning,
    table_markdown,
    trial_folder,
    validate,
    winner_of,
    without_password,
)
from pipeline.core.config import load_params
from pipeline.core.errors import ConfigError, PipelineError
from tests.conftest import FAST_TRAIN, REPO, SMALL_SYNTHETIC
from tests.projects import copy_project


def test_grid_and_random_expansion() -> None:
    grid = {"train.learning_rate": [0.001, 0.0003], "model.dropout": [0.2, 0.4, 0.5]}
    combos = expand(grid)
    assert len(combos) == 6 and combos[0] == {"train.learning_rate": 0.001, "model.dropout": 0.2}
    assert len({json.dumps(c, sort_keys=True) for c in combos}) == 6
    sample = expand(grid, trials=3, seed=1)
    assert len(sample) == 3 and all(c in combos for c in sample) and sample == expand(grid, trials=3, seed=1)

    spec = {
        "train.learning_rate": {"loguniform": [1e-4, 1e-2]},
        "model.dropout": {"uniform": [0.1, 0.5]},
        "train.batch_size": [16, 32],
        "train.epochs": {"randint": [1, 3]},
    }
    drawn = expand(random=spec, trials=5, seed=3)
    assert drawn == expand(random=spec, trials=5, seed=3) and drawn != expand(random=spec, trials=5, seed=4)
    for c in drawn:
        assert 1e-4 <= c["train.learning_rate"] <= 1e-2 and 0.1 <= c["model.dropout"] <= 0.5
        assert c["train.batch_size"] in (16, 32) and c["train.epochs"] in (1, 2, 3)
    assert len(validate(drawn, {"train.epochs": 1}, REPO / "params.yaml")) == 5

    with pytest.raises(ConfigError, match="random needs trials"):
        expand(random=spec)
    with pytest.raises(ConfigError, match="not both"):
        expand(grid, spec, trials=2)
    with pytest.raises(ConfigError, match=r"^sweep: random model\.dropout: expected"):
        expand(random={"model.dropout": {"normal": [0, 1]}}, trials=1)
    for key, bad in [
        ("train.epochs", {"randint": [8, 2]}),
        ("train.batch_size", {"randint": [16.7, 32]}),
        ("model.dropout", {"uniform": ["a", 0.5]}),
        ("model.dropout", {"uniform": [True, 0.5]}),
    ]:
        with pytest.raises(ConfigError, match=rf"^sweep: random {key}: \w+ needs two (whole )?numbers, low <= high"):
            expand(random={key: bad}, trials=1)


def test_a_bad_key_or_value_fails_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = REPO / "params.yaml"
    with pytest.raises(ConfigError, match=r"^[^\n]*params\.yaml: train\.learnin_rate: unknown key$"):
        validate(expand({"train.learnin_rate": [0.1, 0.2]}), None, params)
    with pytest.raises(ConfigError, match=r"params\.yaml: model\.dropout: Input should be less than 1 \(got 1\.5\)"):
        validate(expand({"model.dropout": [0.2, 1.5]}), None, params)
    with pytest.raises(ConfigError, match=r"^sweep: data\.synthetic\.seed: trials share the data stages"):
        validate(expand({"data.synthetic.seed": [1, 2]}), None, params)
    # The flow fails the same way, before a sweep folder, an MLflow run or a data stage exists.
    with pytest.raises(ConfigError, match=r"train\.learnin_rate: unknown key"):
        monkeypatch.chdir(tmp_path)
        pneumonia_sweep.fn(grid={"train.learnin_rate": [0.1]}, params_file=str(params))
    assert list(tmp_path.iterdir()) == []


def test_another_params_file_is_refused_where_dvc_builds_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DVC's stages read params.yaml: a sweep's params_file elsewhere would build the data from other values than the
    trials name, so with data_stages it fails before anything runs."""
    other = tmp_path / "other.yaml"
    other.write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^sweep: params_file .*other\.yaml: the data stages run through DVC"):
        pneumonia_sweep.fn(grid={"train.learning_rate": [0.1]}, params_file=str(other))
    assert list(tmp_path.iterdir()) == [other]


def test_without_data_stages_the_images_evaluate_reads_are_required_before_any_trial(
    synthetic_index: tuple[Path, Any], tmp_path: Path
) -> None:
    """A training machine that pulled only the index and shards: every trial would train, then fail to evaluate."""
    from pipeline.data.dataset_index import write_index
    from tests.conftest import rooted_params

    data, index = synthetic_index
    params = rooted_params(tmp_path, f"data.root={data / 'data' / 'raw'}")
    write_index(index, params.index.path, params.index.quarantine)
    Path(params.validation.report).write_text("{}")
    Path(params.shards.out).mkdir(parents=True)
    (Path(params.shards.out) / "manifest.json").write_text("{}")
    prepare_data(params, run_stages=False)  # everything there
    empty = rooted_params(tmp_path, f"data.root={tmp_path / 'nothing'}")
    with pytest.raises(PipelineError, match=r"^sweep: .*nothing/.* is missing \(\d+ of the \d+ val and"):
        prepare_data(empty, run_stages=False)


def test_trials_on_a_pool_are_warned_off_a_local_sqlite_store() -> None:
    warning = store_warning("sqlite:////work/mlruns/mlflow.db")
    assert warning is not None and "sqlite:////work/mlruns/mlflow.db" in warning and "MLflow server" in warning
    assert "file store" in (store_warning("file:///work/mlruns") or "")
    assert "file store" in (store_warning("/work/mlruns") or "")
    assert store_warning("http://mlflow.example.org:5000") is None
    assert store_warning("postgresql://mlflow@db.example.org/mlflow") is None  # a database server: shared


def test_an_unknown_trial_deployment_fails_before_anything_runs(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^sweep: trial_deployment 'pneumonia-sweep-trial/nope': no such deployment"):
        pneumonia_sweep.fn(
            grid={"train.learning_rate": [0.1]},
            params_file=str(REPO / "params.yaml"),
            trial_deployment="pneumonia-sweep-trial/nope",
        )
    assert list(tmp_path.iterdir()) == []


def test_each_trial_writes_its_own_outputs_even_where_the_project_names_absolute_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = copy_project(
        tmp_path / "project",
        f"train.model_dir={tmp_path / 'models'}",
        f"evaluate.metrics={tmp_path / 'm.json'}",
        f"train.resume_dir={tmp_path / 'resume'}",  # trials differing in evaluate.* only share a state key
    )
    monkeypatch.chdir(work)
    project = load_params("params.yaml")
    assert own_outputs(project) == {
        "train.model_dir": "models",
        "train.resume_dir": ".cache/train-resume",
        "evaluate.metrics": "reports/metrics.json",
    }
    folder = trial_folder(work / "sweeps" / "s", "t00", "params.yaml", {"train.learning_rate": 0.01}, "sqlite:///x.db")
    trial = load_params(folder / "params.yaml")
    assert (trial.train.model_dir, trial.evaluate.metrics) == ("models", "reports/metrics.json")
    assert trial.train.resume_dir == ".cache/train-resume"
    assert trial.train.learning_rate == 0.01 and trial.evaluate.plots_dir == project.evaluate.plots_dir
    assert trial.mlflow.artifact_root == str((work / project.mlflow.artifact_root).resolve())  # still shared
    # A starting weights file named relative to the project is found from the trial's folder too.
    (work / "weights").mkdir()
    (work / "weights" / "start.weights.h5").write_bytes(b"w")
    folder = trial_folder(
        work / "sweeps" / "s", "t01", "params.yaml", {"model.weights": "weights/start.weights.h5"}, ""
    )
    weights = Path(load_params(folder / "params.yaml").model.weights)
    assert weights.is_absolute() and weights.read_bytes() == b"w"
    folder = trial_folder(work / "sweeps" / "s", "t02", "params.yaml", {"model.weights": "none"}, "")
    assert load_params(folder / "params.yaml").model.weights == "none"
    # A tracking URI's password stays out of the trial's file (the trial's environment carries the URI)
    folder = trial_folder(work / "sweeps" / "s", "t03", "params.yaml", {}, "postgresql://ann:s3cret@db:5432/mlflow")
    assert "s3cret" not in (folder / "params.yaml").read_text()
    assert load_params(folder / "params.yaml").mlflow.tracking_uri == "postgresql://ann@db:5432/mlflow"


def test_a_uri_loses_only_its_password() -> None:
    assert without_password("http://ann:pw@mlflow:5000/x?y=1") == "http://ann@mlflow:5000/x?y=1"
    assert without_password("postgresql://:pw@db/mlflow") == "postgresql://db/mlflow"
    assert without_password("postgresql://ann@db/mlflow?password=pw&sslmode=require") == (
        "postgresql://ann@db/mlflow?sslmode=require"
    )
    for kept in ("http://ann@mlflow:5000", "sqlite:////work/mlruns/mlflow.db", "file:///tmp/x", ""):
        assert without_password(kept) == kept


def test_the_winner_is_chosen_on_validation_never_on_test() -> None:
    rows = [
        {"trial": "t01", "overrides": {"a": 1}, "val_roc_auc": 0.80, "best_val_auc": 0.95, "test_roc_auc": 0.99},
        {"trial": "t02", "overrides": {"a": 2}, "val_roc_auc": 0.90, "best_val_auc": 0.85, "test_roc_auc": 0.70},
        {"trial": "t03", "overrides": {"a": 3}, "error": "boom"},
    ]
    assert winner_of(rows)["trial"] == "t02"  # the saved model's val AUC, not a training epoch's
    with pytest.raises(PipelineError, match="every trial failed: t03: boom"):
        winner_of(rows[2:])
    assert "failed: boom" in table_markdown([rows[2]], "t02")


# Three trials of the small synthetic set at 32 px, one epoch each: about a minute on 2 busy cores.
SWEEP_PROJECT = [
    *SMALL_SYNTHETIC,
    *FAST_TRAIN,
    "model.image_size=32",
    "train.epochs=1",
    "evaluate.bootstrap=20",
    "package.reference_images=20",
    "package.gradcam_examples=0",
    "registry.sensitivity_floor=0",
    "registry.model_name=sweep-test",
]
GRID = {"train.learning_rate": [0.003, 0.0003, 0.001]}


def _summary() -> str:
    from prefect.client.orchestration import get_client

    async def latest() -> str:
        body = {"artifacts": {"key": {"any_": ["pneumonia-sweep-summary"]}}, "sort": "CREATED_DESC", "limit": 1}
        async with get_client() as client:
            response = await client._client.post("/artifacts/filter", json=body)
            response.raise_for_status()
            return response.json()[0]["data"]

    return asyncio.run(latest())


@pytest.mark.slow
def test_sweep_runs_nested_trials_and_registers_the_val_winner_as_a_candidate(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    work = copy_project(tmp_path / "project", *SWEEP_PROJECT)
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    start = time.perf_counter()
    result = pneumonia_sweep(grid=GRID, parallel=2)
    print(f"\nsweep of 3 trials: {time.perf_counter() - start:.1f} s")

    client = MlflowClient(f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    parent = result["parent_run_id"]
    experiment = client.get_experiment_by_name("pneumonia")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 4 and len(children) == 3  # the parent and exactly three nested trials
    rows = {r["trial"]: r for r in result["rows"]}
    assert len(rows) == 3 and not any("error" in r for r in rows.values())
    by_run = {r.info.run_id: r for r in children}
    for row, lr in zip(sorted(rows.values(), key=lambda r: r["trial"]), GRID["train.learning_rate"], strict=True):
        run = by_run[row["run_id"]]
        assert row["overrides"] == {"train.learning_rate": lr}
        assert run.data.params["train.learning_rate"] == str(lr) and run.data.params["model.image_size"] == "32"
        assert run.data.params["train.epochs"] == "1" and run.data.tags["sweep_trial"] == row["trial"]
        assert run.data.metrics["best_val_auc"] == pytest.approx(row["best_val_auc"])
        assert run.data.metrics["test_roc_auc"] == pytest.approx(row["test_roc_auc"])
        assert run.data.metrics["test_sensitivity"] == pytest.approx(row["sensitivity"])
        assert run.data.tags["data_version"] != "untracked"  # the shared data, read through the trial's link

    best = max(rows.values(), key=lambda r: r["val_roc_auc"])
    assert result["winner"] == best["trial"] and result["winner_run_id"] == best["run_id"]
    table = client.download_artifacts(parent, "sweep/comparison.csv", str(tmp_path))
    assert len(Path(table).read_text().strip().splitlines()) == 1 + 3
    markdown = _summary()
    assert markdown.count("| t0") + markdown.count("| **t0") == 3 and f"| **{best['trial']}** (winner) |" in markdown

    # Registered as a candidate: a version with its decision, @challenger at most, never @champion.
    version = client.get_model_version("sweep-test", result["version"])
    assert version.run_id == best["run_id"] and result["decision"] == "challenger"
    assert f"from sweep {parent}" in version.tags["decision_reason"]
    assert "champion" not in version.aliases and "champion" not in client.get_registered_model("sweep-test").aliases
    assert client.get_run(parent).data.tags["winner_version"] == result["version"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert "sweep-test version 1: **challenger**" in markdown
