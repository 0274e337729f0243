"""Multi-worker training on one machine: N `pneumo train` processes joined by TF_CONFIG on loopback.

Each worker is the unchanged `pneumo train` with its own TF_CONFIG (the same cluster, its own task
index); TensorFlow's MultiWorkerMirroredStrategy keeps them in lockstep and worker 0, the chief, writes
the model, the reports and the MLflow run (pipeline/modeling/distributed.py). The flow streams each
worker's lines with a ``[worker i]`` prefix, waits for all of them, stops the others as soon as one
fails (a cluster missing a worker would wait for it forever), and returns the chief's result.

Across machines, run the same command in each pod: deploy/k8s/multiworker-job.yaml builds TF_CONFIG
from a Kubernetes Indexed Job's completion index and a headless service.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.dvc_runner import last_error
from flows.gpus import gpu_env
from flows.pipeline_flow import as_overrides
from flows.turns import project_turn


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on loopback now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(hosts: Sequence[str], index: int) -> str:
    """TF_CONFIG for worker `index` of a cluster of `hosts` (host:port each); worker 0 is the chief."""
    return json.dumps({"cluster": {"worker": list(hosts)}, "task": {"type": "worker", "index": index}})


@dataclass
class WorkerRun:
    index: int
    returncode: int
    output: str
    stopped: bool = False  # killed by the launcher (a peer failed, or the timeout), not ended by itself
    ended: float = 0.0  # when it was seen to end (time.monotonic)


STOP_GRACE_SECONDS = 10.0  # from the interrupt to the kill of a worker that is stopped


def run_workers(
    command: Sequence[str],
    hosts: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    echo: Callable[[str], None] = print,
    timeout: float | None = None,
    grace: float = STOP_GRACE_SECONDS,
) -> list[WorkerRun]:
    """Start `command` once per host with its TF_CONFIG, stream prefixed lines to `echo`, wait for all.

    When a worker fails (or `timeout` seconds pass), the others are stopped: they would otherwise wait
    in a collective for a peer that never comes. Each is terminated first (SIGTERM, so the chief ends its
    MLflow run as failed) and killed if it has not ended within `grace` seconds. Worker i grows its GPU memory
    on demand and, where CUDA_VISIBLE_DEVICES lists several devices, sees only device i mod n (flows/gpus.py).
    """
    base = {**os.environ, **(env or {})}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    procs, outputs, readers = [], [], []
    for i in range(len(hosts)):
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**base, **gpu_env(i, base), "TF_CONFIG": tf_config(hosts, i), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        lines: list[str] = []

        def read(proc: subprocess.Popen[str] = proc, lines: list[str] = lines, i: int = i) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                echo(f"[worker {i}] {line.rstrip()}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        procs.append(proc)
        outputs.append(lines)
        readers.append(reader)
    deadline = None if timeout is None else time.monotonic() + timeout
    ended: dict[int, float] = {}
    stopped: set[int] = set()
    try:
        while True:
            codes = [p.poll() for p in procs]  # every one polled (any() would stop at the first running)
            now = time.monotonic()
            for i, code in enumerate(codes):
                if code is not None:
                    ended.setdefault(i, now)
            if None not in codes or any(c not in (None, 0) for c in codes):
                break
            if deadline is not None and now > deadline:
                break
            time.sleep(0.2)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.terminate()  # SIGTERM: pneumo ends its MLflow run as failed, not left RUNNING (cli.stop_on_sigterm)
                stopped.add(i)
        stop_by = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, stop_by - time.monotonic()))
            except subprocess.TimeoutExpired:  # stuck in a collective op, where no signal handler runs
                p.kill()
                p.wait()
        for r in readers:
            r.join(timeout=10)
    now = time.monotonic()
    return [
        WorkerRun(i, p.returncode, "".join(outputs[i]), i in stopped, ended.get(i, now)) for i, p in enumerate(procs)
    ]


def failure(runs: Sequence[WorkerRun], timeout: float | None) -> str | None:
    """One line on why a cluster failed, naming the worker that failed first on its own (its error line), not
    the peers stopped because of it; None when every worker succeeded."""
    failed = [r for r in runs if r.returncode != 0]
    if not failed:
        return None
    statuses = f"exit statuses {[r.returncode for r in runs]}"
    own = sorted((r for r in failed if not r.stopped), key=lambda r: (r.ended, r.index))
    if not own:
        limit = f" after {timeout:g} s (timeout_seconds)" if timeout else ""
        return f"timed out{limit}; workers {[r.index for r in failed]} stopped; {statuses}"
    first = own[0]
    others = [r.index for r in failed if r.stopped]
    with_it = f"; stopped with it: workers {others}" if others else ""
    return (
        f"worker {first.index} exited with {first.returncode} ({last_error(first.output)[:300]}){with_it}; {statuses}"
    )


def loopback_hosts(workers: int) -> list[str]:
    return [f"127.0.0.1:{port}" for port in free_ports(workers)]


PORT_TAKEN = "Could not start gRPC server"  # TensorFlow's error when a worker's port is bound already


def run_cluster(
    command: Sequence[str],
    workers: int,
    hosts: Sequence[str] | None = None,
    *,
    cwd: str | Path | None = None,
    echo: Callable[[str], None] = print,
    timeout: float | None = None,
    attempts: int = 3,
) -> list[WorkerRun]:
    """`run_workers` on `hosts`, or on loopback ports chosen here. A chosen port is free when chosen, but
    another program may bind it before the worker does: then the cluster stops at start-up (the strategy
    is created before the chief opens its MLflow run or writes anything) and runs again on new ports, up
    to `attempts` times. Given `hosts` are not changed."""
    for attempt in range(1, attempts + 1):
        cluster = list(hosts) if hosts else loopback_hosts(workers)
        echo(f"cluster {cluster}: {' '.join(command)}")
        runs = run_workers(command, cluster, cwd=cwd, echo=echo, timeout=timeout)
        taken = any(r.returncode != 0 and PORT_TAKEN in r.output for r in runs)
        if hosts or not taken or attempt == attempts:
            return runs
        echo(f"a port of {cluster} was taken before its worker bound it; new ports ({attempt + 1} of {attempts} tries)")
    raise AssertionError("unreachable")


def outside_dvc(overrides: dict[str, Any] | None, params_file: str, workdir: str | None = None) -> str:
    """What to tell the user after a successful run: the model is not in dvc.lock, and how to record it."""
    folder = Path(workdir or ".")
    if overrides or (folder / params_file).resolve() != (folder / "params.yaml").resolve():
        return (
            "dvc: the train stage's outputs are not in dvc.lock, and the overrides / params file this run trained "
            "with are not in params.yaml (`dvc commit train` would record the wrong params): the next pipeline "
            "run retrains over this model"
        )
    return (
        f"dvc: the train stage's outputs are not in dvc.lock: run `dvc commit train` in {folder.resolve()} "
        "before the next pipeline run, or it retrains over this model"
    )


@flow(name="pneumonia-distributed-train", log_prints=True)
def distributed_train(
    workers: int = 2,
    hosts: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    params_file: str = "params.yaml",
    workdir: str | None = None,
    timeout_seconds: float | None = None,
) -> str:
    """Train with `workers` processes of `pneumo train` on this machine; returns the chief's summary lines and
    a note on recording the model in DVC.

    `hosts` (host:port each, one per worker) are the cluster's addresses; default: loopback on free
    ports. `overrides` maps dotted params.yaml keys to values (passed as `pneumo -S`, the file is not
    changed), e.g. {"train.batch_size": 16}: train.batch_size is per worker, the global batch is
    batch_size x workers.

    The workers run `pneumo train` outside DVC: the model and reports they write are not in dvc.lock, so the
    next pipeline run sees the train stage as changed and retrains (or restores the cached model) over them.
    The flow does not commit them (it cannot know they are what the pipeline wants); the summary it returns
    ends with what to run: `dvc commit train` in the project folder when no `overrides` were given (and
    `params_file` is params.yaml), else the note that the overrides are not recorded in params.yaml.
    """
    logger = get_run_logger()
    if hosts is not None and len(hosts) != workers:
        raise ValueError(f"hosts: {len(hosts)} addresses for {workers} workers")
    if workers < 1:
        raise ValueError("workers: at least 1")
    command = [str(Path(sys.executable).parent / "pneumo"), "--params", params_file]
    for item in as_overrides(overrides):
        command += ["-S", item]
    command.append("train")
    with project_turn("pneumonia-distributed-train", logger.info, workdir or "."):
        runs = run_cluster(command, workers, hosts, cwd=workdir, echo=logger.info, timeout=timeout_seconds)
    why = failure(runs, timeout_seconds)
    if why:
        raise RuntimeError(why)
    chief = runs[0].output.strip().splitlines()
    trained = "\n".join(line for line in chief if line.startswith(("trained", "model:"))) or (
        chief[-1] if chief else ""
    )
    note = outside_dvc(overrides, params_file, workdir)
    logger.warning(note)
    return f"{trained}\n{note}" if trained else note


if __name__ == "__main__":
    distributed_train()
