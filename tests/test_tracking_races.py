"""Two trainings making their first MLflow writes at once, on the sqlite store and on PostgreSQL.

MLflow looks an experiment or a data set up, then inserts it: a rival that commits the same row in between
makes the insert fail on the store's unique key (a sweep's parallel trials hit this on CI). Each race is
forced, not hoped for: a SQLAlchemy hook runs a rival OS process that makes the same write just before this
process's INSERT, and waits for it to finish.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from pipeline.core.config import MlflowParams
from pipeline.registry import tracking
from tests.conftest import REPO


def small_index() -> pd.DataFrame:
    """Six images in three splits, in the index's columns."""
    splits = ["train", "train", "val", "val", "test", "test"]
    return pd.DataFrame(
        {
            "path": [f"{s}/{i}.jpeg" for i, s in enumerate(splits)],
            "label": ["NORMAL", "PNEUMONIA"] * 3,
            "subtype": ["", "bacteria"] * 3,
            "patient_id": [f"p{i}" for i in range(6)],
            "sha256": [f"{i:064x}" for i in range(6)],
            "split": splits,
            "decodable": [True] * 6,
        }
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"tracking_race_{uuid.uuid4().hex[:8]}")
        uri = url.replace("postgresql://", "postgresql+psycopg2://", 1)  # the driver installed
    MlflowClient(uri).search_experiments()  # the store's tables exist before any race
    previous = mlflow.get_tracking_uri()
    # The rivals inherit it; mlflow.set_tracking_uri writes it too: monkeypatch puts it back as it was after.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def rival_before(table: str, args: list[str], cwd: Path) -> Iterator[list[str]]:
    """While open: just before this process's first INSERT INTO `table`, `python -m tests.tracking_rival
    *args` runs to completion. Yields the list its output (one line) is appended to."""
    outputs: list[str] = []

    def hook(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if statement.lstrip().upper().startswith(f"INSERT INTO {table.upper()} ") and not outputs:
            cmd = [sys.executable, "-m", "tests.tracking_rival", *args]
            done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr[-2000:]
            outputs.append(done.stdout.split()[-1])

    event.listen(Engine, "before_cursor_execute", hook)
    try:
        yield outputs
    finally:
        event.remove(Engine, "before_cursor_execute", hook)


def test_a_rival_that_creates_the_experiment_first_is_joined(store: str, tmp_path: Path) -> None:
    params = MlflowParams(tracking_uri=store, experiment="race", artifact_root=str(tmp_path / "artifacts"))
    with rival_before("experiments", ["experiment", store, "race", str(tmp_path / "artifacts")], REPO) as rival:
        ours = tracking.configure(params)
    assert len(rival) == 1  # the rival really created it between the lookup and the insert
    assert ours == rival[0] and [e.name for e in MlflowClient(store).search_experiments()] == ["race", "Default"]


def test_a_rival_that_logs_the_same_data_set_first_does_not_fail_the_run(store: str, tmp_path: Path) -> None:
    experiment_id = MlflowClient(store).create_experiment("race")
    mlflow.set_tracking_uri(store)
    with (
        rival_before("datasets", ["datasets", store, experiment_id, str(tmp_path)], REPO) as rival,
        mlflow.start_run(experiment_id=experiment_id) as active,
    ):
        tracking.log_datasets(small_index(), str(tmp_path), "untracked")

    assert len(rival) == 1  # the rival really logged the data set between the lookup and the insert
    client = MlflowClient(store)
    ours, theirs = (client.get_run(r).inputs.dataset_inputs for r in (active.info.run_id, rival[0]))
    assert sorted(i.dataset.name for i in ours) == ["test", "train", "val"]
    assert {(i.dataset.name, i.dataset.digest) for i in ours} == {(i.dataset.name, i.dataset.digest) for i in theirs}
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}.get("mlflow.data.context") for i in ours}
    assert contexts == {"train": "training", "val": "validation", "test": "test"}
    assert client.get_run(active.info.run_id).info.status == "FINISHED"


def test_two_trainings_opening_a_new_sqlite_store_at_once_both_start(tmp_path: Path) -> None:
    """MLflow creates a new store's tables on first use; two processes doing it at the same moment (two queued
    DVC experiments on a fresh project) failed one with `duplicate column name`. Started together, for real."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    start_at = f"{time.time() + 8:.3f}"  # both interpreters are up and waiting by then
    cmd = [sys.executable, "-m", "tests.tracking_rival", "experiment", uri, "race", str(tmp_path / "art"), start_at]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store named here, nothing else
    rivals = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in "ab"
    ]
    outputs = [rival.communicate(timeout=180) for rival in rivals]
    assert [rival.returncode for rival in rivals] == [0, 0], [err[-1500:] for _, err in outputs]
    assert len({out.split()[-1] for out, _ in outputs}) == 1  # one experiment, joined by the second
