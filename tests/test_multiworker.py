"""Multi-worker training (TF_CONFIG, MultiWorkerMirroredStrategy): real processes on loopback, no mocks.

Each worker is tests/multiworker_worker.py (the train stage or the training, as `pneumo train` runs
them) started by the launcher of flows/distributed_flow.py; the cluster is two workers on free ports.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.distributed_flow import loopback_hosts, run_workers, tf_config
from pipeline.data.dataset_index import write_index
from tests.conftest import REPO, SMALL_SYNTHETIC

pytestmark = pytest.mark.slow

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


def env(tmp: Path) -> dict[str, str]:
    (tmp / "scratch").mkdir(parents=True, exist_ok=True)
    return {"PYTHONPATH": str(REPO), "TMPDIR": str(tmp / "scratch"), "CUDA_VISIBLE_DEVICES": ""}


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def of(rows: list[dict], event: str) -> list[dict]:
    return [r for r in rows if r["event"] == event]


def test_two_workers_train_in_lockstep_like_one_process_and_only_the_chief_writes(data: Path, tmp_path: Path) -> None:
    """mobilenetv2's head on a frozen backbone (inference-mode BatchNorm: the batch split changes nothing):
    2 workers x 16 per replica against 1 process x 32, the same global batch and learning rate."""
    head = ["model.architecture=mobilenetv2", "train.cache_features=false", "train.epochs=2"]
    multi, single = tmp_path / "multi", tmp_path / "single"
    for folder in (multi / "cwd", single / "cwd"):
        folder.mkdir(parents=True)
    started = time.monotonic()
    single_proc = subprocess.Popen(
        [*WORKER, str(single / "log"), "stage", *overrides(data, single, *head, "train.batch_size=32")],
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
        timeout=240,
    )
    single_out, _ = single_proc.communicate(timeout=240)
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
    assert sorted(p.name for p in (multi / "models").iterdir()) == sorted(p.name for p in (single / "models").iterdir())
    tb = sorted(str(p.parent.relative_to(multi / "tensorboard")) for p in (multi / "tensorboard").rglob("events.out*"))
    assert tb == ["head/train", "head/validation"], "one set of TensorBoard logs: the chief's"
    assert not list((multi / "scratch").iterdir()), "the non-chief worker's temporary folder is removed"
    assert not any((multi / "resume").iterdir()), "a finished training leaves no resume state"
    print(f"2 workers + 1 process: {seconds:.0f} s; fixed-batch loss {loss}")


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
        deadline = time.monotonic() + 180
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
        timeout=180,
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
