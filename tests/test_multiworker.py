"""Multi-worker training (TF_CONFIG, MultiWorkerMirroredStrategy): real processes on loopback, no mocks.

Each worker is tests/multiworker_worker.py (the train stage or the training, as `pneumo train` runs
them) started by the launcher of flows/distributed_flow.py; the cluster is two workers on free ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.distributed_flow import failure, loopback_hosts, run_workers, tf_config
from pipeline.data.dataset_index import write_index
from pipeline.modeling.distributed import Cluster, cluster_from_env
from tests.conftest import REPO, SMALL_SYNTHETIC

WORKER = [sys.executable, "-m", "tests.multiworker_worker"]
# No randomness that differs between a 2-worker and a 1-process run: no augmentation, no dropout,
# op determinism, seeded shuffle (the same order in every process).
COMPARABLE = [
    *SMALL_SYNTHETIC,
    "train.augment={rotation: 0, zoom: 0, translation: 0, contrast: 0}",
    "train.deterministic=true",
    "train.max_images_per_split=64",
    "train.early_stopping_patience=10",
    "model.dropout=0",
    "model.image_size=48",
]


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """Params reading the session's synthetic data in `data` and writing everything under `out`."""
    return [
        f"data.root={data / 'data' / 'raw'}",
        f"index.path={data / 'index.parquet'}",
        f"shards.out={data / 'data' / 'shards'}",
        f"validation.report={out / 'reports' / 'validation.json'}",
        f"train.model_dir={out / 'models'}",
        f"train.tensorboard_dir={out / 'tensorboard'}",
        f"train.resume_dir={out / 'resume'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlruns' / 'mlflow.db'}",
        f"mlflow.artifact_root={out / 'mlruns' / 'artifacts'}",
        f"mlflow.run_file={out / 'reports' / 'mlflow_run.json'}",
        *COMPARABLE,
        *extra,
    ]


@pytest.fixture(scope="module")
def data(synthetic_index: tuple[Path, pd.DataFrame]) -> Path:
    tmp, index = synthetic_index
    write_index(index, tmp / "index.parquet", tmp / "quarantine.csv")
    return tmp


@pytest.fixture(autouse=True)
def own_tracking_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers inherit this environment: an MLFLOW_TRACKING_URI left by an earlier test in the session
    (mlflow.set_tracking_uri exports it) would beat their params and point them at a stopped server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def env(tmp: Path) -> dict[str, str]:
    (tmp / "scratch").mkdir(parents=True, exist_ok=True)
    return {"PYTHONPATH": str(REPO), "TMPDIR": str(tmp / "scratch"), "CUDA_VISIBLE_DEVICES": ""}


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def of(rows: list[dict], event: str) -> list[dict]:
    return [r for r in rows if r["event"] == event]


@pytest.mark.slow
def test_two_workers_train_in_lockstep_like_one_process_and_only_the_chief_writes(data: Path, tmp_path: Path) -> None:
    """mobilenetv2's head on a frozen backbone (inference-mode BatchNorm: the batch split changes nothing):
    2 workers x 16 per replica against 1 process x 32, the same global batch and learning rate."""
    head = ["model.architecture=mobilenetv2", "train.cache_features=false", "train.epochs=2"]
    multi, single = tmp_path / "multi", tmp_path / "single"
    for folder in (multi / "cwd", single / "cwd"):
        folder.mkdir(parents=True)
    started = time.monotonic()
    single_proc = subprocess.Popen(
        [*WORKER, str(single / "log"), "train", *overrides(data, single, *head, "train.batch_size=32")],
        cwd=single / "cwd",
        env={**os.environ, **env(single)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    runs = run_workers(
        [*WORKER, str(multi / "log"), "stage", *overrides(data, multi, *head, "train.batch_size=16")],
        loopback_hosts(2),
        cwd=multi / "cwd",
        env=env(multi),
        echo=lambda line: None,
        timeout=900,
    )
    single_out, _ = single_proc.communicate(timeout=900)
    seconds = time.monotonic() - started
    assert [r.returncode for r in runs] == [0, 0], runs[0].output[-3000:] + runs[1].output[-3000:]
    assert single_proc.returncode == 0, single_out[-3000:]
    chief, other = events(multi / "log-worker0.jsonl"), events(multi / "log-worker1.jsonl")
    alone = events(single / "log.jsonl")

    # Lockstep: the same weights on both workers after every batch, and as many batches as one process.
    digests = [(r["sha256"], r["non_trainable"]) for r in of(chief, "batch")]
    assert digests and digests == [(r["sha256"], r["non_trainable"]) for r in of(other, "batch")]
    assert len(digests) == len(of(alone, "batch"))
    # Validation metrics (what early stopping and the best checkpoint decide on) agree as well.
    val_auc = [[r["logs"]["val_auc"] for r in of(rows, "epoch_end")] for rows in (chief, other)]
    assert val_auc[0] == val_auc[1]
    # The same training as one process with the global batch: the loss of the final weights on a fixed
    # batch agrees to float32 summation order (all-reduced halves vs one sum).
    loss = {name: of(rows, "fixed_batch_loss")[0]["loss"] for name, rows in (("0", chief), ("1", other), ("s", alone))}
    assert loss["0"] == loss["1"]
    assert loss["0"] == pytest.approx(loss["s"], rel=1e-4, abs=1e-5), loss

    # Only the chief wrote the model, reports and the one MLflow run.
    with sqlite3.connect(multi / "mlruns" / "mlflow.db") as db:
        run_ids = [row[0] for row in db.execute("select run_uuid from runs")]
    assert len(run_ids) == 1
    metadata = json.loads((multi / "models" / "metadata.json").read_text())
    assert metadata["mlflow_run_id"] == run_ids[0] and "MultiWorkerMirroredStrategy" in metadata["device"]
    assert "worker 1 of 2: trained 2 epochs in lockstep" in runs[1].output
    assert sorted(p.name for p in (multi / "models").iterdir()) == ["metadata.json", "model.keras"]
    tb = sorted(p.parent.relative_to(multi / "tensorboard") for p in (multi / "tensorboard").rglob("events.out*"))
    assert len({p.parts[0] for p in tb}) == 1, "one training's logs (under its state key)"
    assert [Path(*p.parts[1:]).as_posix() for p in tb] == ["head/train", "head/validation"], "the chief's only"
    assert not list((multi / "scratch").iterdir()), "the non-chief worker's temporary folder is removed"
    assert not any((multi / "resume").iterdir()), "a finished training leaves no resume state"
    print(f"2 workers + 1 process: {seconds:.0f} s; fixed-batch loss {loss}")


@pytest.mark.slow
def test_killed_cluster_resumes_from_the_shared_checkpoint(data: Path, tmp_path: Path) -> None:
    """The compact CNN, 3 epochs: both workers are killed (SIGKILL) after epoch 1's state is saved and the
    cluster is started again, as a Job restarts its pods; training continues at epoch 2."""
    args = overrides(data, tmp_path, "train.epochs=3", "train.batch_size=16")
    log = tmp_path / "log"
    hosts = loopback_hosts(2)
    procs = [
        subprocess.Popen(
            [*WORKER, str(log), "train", "--pause-after", "1", *args],
            cwd=tmp_path,
            env={**os.environ, **env(tmp_path), "TF_CONFIG": tf_config(hosts, i)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 600
        while not all(of(events(Path(f"{log}-worker{i}.jsonl")), "paused") for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not reach epoch 1"
            time.sleep(0.5)
        saved = list((tmp_path / "resume").rglob("training_metadata.json"))
        assert len(saved) == 1 and json.loads(saved[0].read_text())["epoch"] == 1
    finally:
        for p in reversed(procs):  # the non-chief worker first, then the chief
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert [r["epoch"] for r in of(events(Path(f"{log}-worker0.jsonl")), "epoch_begin")] == [1]

    restarted = tmp_path / "again"
    runs = run_workers(
        [*WORKER, str(restarted), "train", *args],
        loopback_hosts(2),
        cwd=tmp_path,
        env=env(tmp_path),
        echo=lambda line: None,
        timeout=900,
    )
    assert [r.returncode for r in runs] == [0, 0], runs[0].output[-3000:] + runs[1].output[-3000:]
    for i in range(2):
        rows = events(Path(f"{restarted}-worker{i}.jsonl"))
        assert [r["epoch"] for r in of(rows, "epoch_begin")] == [2, 3], f"worker {i} must continue, not start over"
    chief, other = (events(Path(f"{restarted}-worker{i}.jsonl")) for i in range(2))
    # The trainable weights agree; BatchNorm's moving statistics are each worker's own (README).
    assert [r["sha256"] for r in of(chief, "batch")] == [r["sha256"] for r in of(other, "batch")]
    assert of(chief, "history")[0]["epochs"] == [1, 2, 3], "the chief's history keeps the epoch before the kill"
    assert not any((tmp_path / "resume").iterdir())


# --- the cluster spec, the launcher and the Kubernetes manifest (no training) ------------------------------


def test_tf_config_names_the_chief() -> None:
    hosts = ["127.0.0.1:1", "127.0.0.1:2"]
    assert cluster_from_env({}) is None
    assert cluster_from_env({"TF_CONFIG": tf_config(hosts[:1], 0)}) is None, "one task: plain training"
    assert cluster_from_env({"TF_CONFIG": tf_config(hosts, 0)}) == Cluster(2, "worker", 0)
    assert cluster_from_env({"TF_CONFIG": tf_config(hosts, 0)}).is_chief
    assert not cluster_from_env({"TF_CONFIG": tf_config(hosts, 1)}).is_chief
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}
    worker0 = cluster_from_env({"TF_CONFIG": json.dumps(with_chief)})
    assert worker0 is not None and worker0.size == 2 and not worker0.is_chief
    chief = cluster_from_env({"TF_CONFIG": json.dumps({**with_chief, "task": {"type": "chief", "index": 0}})})
    assert chief is not None and chief.is_chief
    with pytest.raises(ValueError, match="task worker 2 is not in the cluster"):
        cluster_from_env({"TF_CONFIG": tf_config(hosts, 2)})
    with pytest.raises(ValueError, match="TF_CONFIG: not a cluster spec"):
        cluster_from_env({"TF_CONFIG": "{}"})


def test_launcher_stops_the_cluster_when_a_worker_fails() -> None:
    script = (
        "import json, os, sys, time; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
        "print('hello from', i, flush=True); i == 1 and print('error: model.weights: x.h5: no such file'); "
        "sys.exit(3) if i == 1 else time.sleep(120)"
    )
    lines: list[str] = []
    started = time.monotonic()
    runs = run_workers([sys.executable, "-c", script], loopback_hosts(2), echo=lines.append)
    assert time.monotonic() - started < 60, "the waiting worker is stopped, not waited for"
    assert [r.returncode for r in runs] == [-signal.SIGTERM, 3]  # terminated: pneumo would end its MLflow run
    assert sorted(lines) == [
        "[worker 0] hello from 0",
        "[worker 1] error: model.weights: x.h5: no such file",
        "[worker 1] hello from 1",
    ]
    # The flow's error names the worker that failed by itself, with its error line, not the chief it took down.
    assert failure(runs, None) == (
        "worker 1 exited with 3 (model.weights: x.h5: no such file); stopped with it: workers [0]; "
        "exit statuses [-15, 3]"
    )
    # A cluster stopped by the deadline says so; a worker deaf to the interrupt is killed after the grace.
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    runs = run_workers([sys.executable, "-c", deaf], loopback_hosts(2), echo=lines.append, timeout=1, grace=1)
    assert failure(runs, 1) == "timed out after 1 s (timeout_seconds); workers [0, 1] stopped; exit statuses [-9, -9]"


TF_SERVER = (
    "import tensorflow as tf; r = tf.distribute.cluster_resolver.TFConfigClusterResolver(); "
    "tf.distribute.Server(r.cluster_spec(), job_name=r.task_type, task_index=r.task_id, start=True); print('bound')"
)


def test_a_port_taken_between_choosing_and_binding_it_gets_the_cluster_new_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race a loopback cluster has: a free port is taken before TensorFlow binds it. Forced here by
    handing the first try a port this test holds; the workers are real TensorFlow gRPC servers."""
    from flows import distributed_flow

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    picks = [[port, *distributed_flow.free_ports(1)]]
    real = distributed_flow.free_ports
    monkeypatch.setattr(distributed_flow, "free_ports", lambda n: picks.pop() if picks else real(n))
    lines: list[str] = []
    try:
        runs = distributed_flow.run_cluster([sys.executable, "-c", TF_SERVER], 2, echo=lines.append, timeout=120)
    finally:
        held.close()
    assert [r.returncode for r in runs] == [0, 0] and all("bound" in r.output for r in runs)
    retried = [line for line in lines if "was taken before its worker bound it" in line]
    assert len(retried) == 1 and f"127.0.0.1:{port}" in retried[0]


def test_a_chief_whose_port_is_taken_stops_before_opening_an_mlflow_run(data: Path, tmp_path: Path) -> None:
    """The strategy comes first: a retried cluster leaves no RUNNING run (nor a store) behind."""
    from flows.distributed_flow import PORT_TAKEN

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        hosts = [f"127.0.0.1:{held.getsockname()[1]}", *loopback_hosts(1)]
        command = [str(Path(sys.executable).parent / "pneumo"), "--params", str(REPO / "params.yaml")]
        for item in overrides(data, tmp_path):
            command += ["-S", item]
        chief = subprocess.run(
            [*command, "train"],
            cwd=tmp_path,
            env={**os.environ, **env(tmp_path), "TF_CONFIG": tf_config(hosts, 0)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        held.close()
    assert chief.returncode != 0 and PORT_TAKEN in chief.stdout + chief.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists(), "an MLflow store (and run) was opened first"
    assert not (tmp_path / "models").exists()


def test_kubernetes_indexed_job_builds_tf_config_from_its_completion_index() -> None:
    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "multiworker-job.yaml").read_text()))
    service, job = docs
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    container = pod["containers"][0]
    variables = {e["name"]: e["value"] for e in container["env"]}
    workers = int(variables["WORKERS"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == workers
    assert container["args"][:3] == ["python", "-m", "pipeline.steps.cli"] and container["args"][-1] == "train"
    assert variables["PYTHONPATH"] == "/shared/project"  # the CLI's code, from the volume (the image lacks it)
    # The pod's shell prologue, run for index 1, with a command that prints what it got instead of pneumo.
    shown = subprocess.run(
        [*container["command"], sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])"],
        env={**os.environ, **variables, "JOB_COMPLETION_INDEX": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    config = json.loads(shown.stdout)
    name, port = job["metadata"]["name"], variables["PORT"]
    assert config["cluster"]["worker"] == [f"{name}-{i}.{name}:{port}" for i in range(workers)]
    assert cluster_from_env({"TF_CONFIG": shown.stdout}) == Cluster(workers, "worker", 1)


def test_prefect_yaml_deploys_the_launcher() -> None:
    from flows.distributed_flow import distributed_train

    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    entry = deployments["distributed-train"]
    assert entry["entrypoint"] == "flows/distributed_flow.py:distributed_train"
    assert set(entry["parameters"]) <= set(distributed_train.parameters.properties)
