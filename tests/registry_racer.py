"""One registration in its own OS process, for tests/test_registry_races.py (two of these race).

``python -m tests.registry_racer SPEC_JSON`` waits at a barrier (a file per racer) until its rival has
started too, then runs champion.register against the shared tracking server. Inside the critical section
(``finalize``: the version exists, no alias has moved) it leaves a mark and waits up to ``hold`` seconds
for the rival's mark: under a shared lock the rival cannot get there meanwhile, so the racer that entered
first never sees it; without one it does. Prints one JSON line: the version, the outcome, the times of its
first and last registry calls, when it entered the critical section, whether the rival's mark appeared
within ``hold``, and its log lines. The lock comes from the spec (a lock file) or from
$PNEUMO_REGISTRY_LOCK_URL.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Timed:
    """The MLflow client, noting the wall-clock time of every call (the registry work of this racer)."""

    def __init__(self, client: Any) -> None:
        self.client, self.times = client, []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.times.append(time.time())
            try:
                return method(*args, **kwargs)
            finally:
                self.times.append(time.time())

        return call


def main(spec: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from pipeline.core.config import RegisterParams
    from pipeline.registry import champion

    folder, me, rival = Path(spec["folder"]), spec["me"], spec["rival"]
    (folder / f"ready-{me}").touch()
    if not wait_for(folder / f"ready-{rival}", 120):
        raise SystemExit("the rival never started")
    logs: list[str] = []
    entered: list[float] = []
    seen: list[bool] = []

    def inside(decision: champion.Decision) -> None:  # the critical section: after the create, before aliases
        entered.append(time.time())
        (folder / f"inside-{me}").touch()
        seen.append(wait_for(folder / f"inside-{rival}", spec["hold"]))

    c = spec["candidate"]
    scores = champion.Scores(c["metrics"], c["threshold"], c["test_set"])
    candidate = champion.Candidate(c["run_id"], c["model_uri"], scores, c["tags"], c["description"])
    params = RegisterParams(**spec["params"])
    client = Timed(MlflowClient(spec["tracking_uri"]))
    never = lambda uri, t: {}  # noqa: E731 - both candidates share one test set
    decision = champion.register(client, candidate, params, never, log=logs.append, finalize=inside)
    result = {
        "me": me,
        "version": decision.version,
        "outcome": decision.outcome,
        "first": client.times[0],
        "last": client.times[-1],
        "entered": entered[0],
        "rival_seen": seen[0],
        "logs": logs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
