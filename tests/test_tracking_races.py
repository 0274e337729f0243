"""Two trainings logging the same data set at once, on the sqlite store and on PostgreSQL.

MLflow looks the data set up, then inserts it: a rival that commits the same row in between makes the insert
fail on the store's unique key (a sweep's parallel trials hit this on CI). The race is forced, not hoped for:
a SQLAlchemy hook starts a rival OS process that logs the same data set just before this process's
``INSERT INTO datasets`` and waits for it to finish.
"""

from __future__ import annotations

import subprocess
import sys
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
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"tracking_race_{uuid.uuid4().hex[:8]}")
        uri = url.replace("postgresql://", "postgresql+psycopg2://", 1)  # the driver installed
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


def test_a_rival_that_logs_the_same_data_set_first_does_not_fail_the_run(store: str, tmp_path: Path) -> None:
    experiment_id = MlflowClient(store).create_experiment("race")
    rival_runs: list[str] = []

    def rival_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS") and not rival_runs:
            cmd = [sys.executable, "-m", "tests.dataset_rival", store, experiment_id, str(tmp_path)]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr[-2000:]
            rival_runs.append(done.stdout.split()[-1])

    event.listen(Engine, "before_cursor_execute", rival_first)
    try:
        with mlflow.start_run(experiment_id=experiment_id) as active:
            tracking.log_datasets(small_index(), str(tmp_path), "untracked")
    finally:
        event.remove(Engine, "before_cursor_execute", rival_first)

    assert len(rival_runs) == 1  # the rival really logged the data set between the lookup and the insert
    client = MlflowClient(store)
    ours, theirs = (client.get_run(r).inputs.dataset_inputs for r in (active.info.run_id, rival_runs[0]))
    assert sorted(i.dataset.name for i in ours) == ["test", "train", "val"]
    assert {(i.dataset.name, i.dataset.digest) for i in ours} == {(i.dataset.name, i.dataset.digest) for i in theirs}
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}.get("mlflow.data.context") for i in ours}
    assert contexts == {"train": "training", "val": "validation", "test": "test"}
    assert client.get_run(active.info.run_id).info.status == "FINISHED"
