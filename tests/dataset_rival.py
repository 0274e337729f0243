"""Another training's dataset logging, in its own OS process, for tests/test_tracking_races.py.

``python -m tests.dataset_rival TRACKING_URI EXPERIMENT_ID ROOT`` opens a run in the experiment and logs the
three splits of tests.test_tracking_races.small_index() as its dataset inputs; prints the run id.
"""

from __future__ import annotations

import sys

import mlflow

from pipeline.registry import tracking
from tests.test_tracking_races import small_index


def main(uri: str, experiment_id: str, root: str) -> None:
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_datasets(small_index(), root, "untracked")
    print(run.info.run_id)


if __name__ == "__main__":
    main(*sys.argv[1:4])
