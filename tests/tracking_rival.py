"""Another training's first MLflow writes, in its own OS process, for tests/test_tracking_races.py.

``python -m tests.tracking_rival experiment URI NAME ROOT``: creates (or finds) the experiment as a training
does (tracking.configure); prints its id.
``python -m tests.tracking_rival datasets URI EXPERIMENT_ID ROOT``: opens a run in the experiment and logs the
three splits of tests.test_tracking_races.small_index() as its dataset inputs; prints the run id.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from pipeline.core.config import MlflowParams
from pipeline.registry import tracking
from tests.test_tracking_races import small_index


def main(what: str, uri: str, target: str, root: str) -> None:
    if what == "experiment":
        print(tracking.configure(MlflowParams(tracking_uri=uri, experiment=target, artifact_root=str(Path(root)))))
        return
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=target) as run:
        tracking.log_datasets(small_index(), root, "untracked")
    print(run.info.run_id)


if __name__ == "__main__":
    main(*sys.argv[1:5])
