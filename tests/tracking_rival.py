"""Another training's first MLflow writes, in its own OS process, for tests/test_tracking_races.py.

``python -m tests.tracking_rival experiment URI NAME ROOT [START_AT]``: creates (or finds) the experiment as a
training does (tracking.configure), at the epoch time START_AT when given; prints its id.
``python -m tests.tracking_rival datasets URI EXPERIMENT_ID ROOT``: opens a run in the experiment and logs the
three splits of tests.test_tracking_races.small_index() as its dataset inputs; prints the run id.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow

from pipeline.core.config import MlflowParams
from pipeline.registry import tracking
from tests.test_tracking_races import small_index


def main(what: str, uri: str, target: str, root: str, start_at: str = "0") -> None:
    while time.time() < float(start_at):  # a busy wait: both rivals leave it within microseconds
        pass
    if what == "experiment":
        print(tracking.configure(MlflowParams(tracking_uri=uri, experiment=target, artifact_root=str(Path(root)))))
        return
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=target) as run:
        tracking.log_datasets(small_index(), root, "untracked")
    print(run.info.run_id)


if __name__ == "__main__":
    main(*sys.argv[1:6])
