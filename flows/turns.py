"""Flows that work in one project folder take turns: the pipeline, a sweep and a distributed training.

They share the folder's params.yaml (the pipeline writes its overrides there, a sweep copies it into its
trials), DVC's repository lock (whose second taker fails at once) and the model folder. Each holds the folder's
flow lock file while it works; a second one waits for it (logging why), so deployments with a concurrency
limit of their own each can still be started together. A sweep's trials run in their own folders and take no
turn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.core.locks import file_lock

FLOW_LOCK = ".pneumo-flow.lock"  # in the project folder (git-ignored)
WAIT_SECONDS = 12 * 3600.0  # a flow waiting longer fails with a TransientError naming the lock (no flow retries)


@contextlib.contextmanager
def project_turn(flow: str, log: Callable[[str], None] = print, folder: str | Path = ".") -> Iterator[None]:
    """Hold `folder`'s flow lock for `flow`, waiting for another flow's turn to end."""
    lock = (Path(folder) / FLOW_LOCK).resolve()
    with file_lock(lock, WAIT_SECONDS, f"{flow}: another flow works in {lock.parent}", log):
        yield
