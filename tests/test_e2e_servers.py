"""End to end on the team stack as real processes on loopback: PostgreSQL, SeaweedFS's S3 gateway,
`mlflow server` on both (PostgreSQL backend, artifacts proxied into the bucket with --serve-artifacts),
a Prefect server, a process work pool, `prefect deploy` from prefect.yaml and a worker. Then
`prefect deployment run` (three times), checks through the MLflow client, a screenshot of the
registered model page in headless Chromium, and the DVC remote on S3: `pneumo remote`, `dvc push`, a
second clone that pulls and predicts with the champion; a sweep whose trials run on two more workers
of a trial pool. Only the tracking server holds S3 keys. Every process started here is stopped by
process id (PostgreSQL and SeaweedFS by their session fixtures).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST_TRAIN, REPO, SMALL_SYNTHETIC
from tests.projects import copy_project
from tests.servers import Postgres, SeaweedS3, Service, free_port, mlflow_server

pytestmark = pytest.mark.slow
MODEL = "pneumo-chest-xray"


@dataclass(frozen=True)
class Stack:
    root: Path
    project: Path
    env: dict[str, str]  # the clients' environment: the pipeline, the worker, the CLI; no S3 keys
    tracking_uri: str
    bucket: str
    mlflow: Service
    worker: Service

    def run(self, *args: str, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=cwd or self.project, env={**self.env, **extra}, capture_output=True, text=True)


S3_CLIENT_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres, s3: SeaweedS3) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    # A two-epoch model may miss the clinical floor: the first version must become champion here.
    project = copy_project(root / "project", *SMALL_SYNTHETIC, *FAST_TRAIN, "registry.sensitivity_floor=0.5")
    shutil.copy2(REPO / "prefect.yaml", project / "prefect.yaml")
    bin_dir = str(Path(sys.executable).parent)
    prefect_port = free_port()
    bucket = s3.create_bucket("e2e-team")
    # The clients get no S3 keys from anywhere (variables, ~/.aws, instance metadata): artifacts go
    # through the tracking server, which alone holds the keys.
    none = str(root / "no-aws-config")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in S3_CLIENT_KEYS}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PWD": str(project),
        "PREFECT_HOME": str(root / "prefect_home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "AWS_SHARED_CREDENTIALS_FILE": none,
        "AWS_CONFIG_FILE": none,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    services: list[Service] = []
    try:
        prefect = Service(
            "prefect server",
            [f"{bin_dir}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env,
            root,
            root / "prefect.log",
        )
        services.append(prefect)
        mlflow, tracking_uri = mlflow_server(
            "mlflow", root, postgres.create_database("e2e_servers"), f"s3://{bucket}/mlflow", {**env, **s3.env()}
        )
        services.append(mlflow)
        env["MLFLOW_TRACKING_URI"] = tracking_uri
        prefect.wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health")
        run = lambda *args: subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)  # noqa: E731
        created = run("prefect", "work-pool", "create", "pneumo-process", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = run("prefect", "--no-prompt", "deploy", "-n", "pipeline")  # the process-pool deployment
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        worker = Service(
            "prefect worker",
            [f"{bin_dir}/prefect", "worker", "start", "--pool", "pneumo-process"],
            env,
            project,
            root / "worker.log",
        )
        services.append(worker)
        yield Stack(root, project, env, tracking_uri, bucket, mlflow, worker)
    finally:
        for service in reversed(services):
            service.stop()
        for service in services:
            assert service.proc.poll() is not None, f"{service.name} still running"


def deployment_run(stack: Stack, params: dict[str, object]) -> None:
    proc = stack.run(
        "prefect",
        "deployment",
        "run",
        "pneumonia-pipeline/pipeline",
        "--params",
        json.dumps(params),
        "--watch",
        "--watch-timeout",
        "900",
    )
    worker_log = (stack.root / "worker.log").read_text()[-4000:]
    assert proc.returncode == 0 and "Completed" in proc.stdout, proc.stdout[-2000:] + worker_log


def test_deployment_registers_a_champion_then_applies_the_policy(stack: Stack) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(stack.tracking_uri)
    deployment_run(stack, {"ingest": True})
    v1 = client.get_model_version_by_alias(MODEL, "champion")
    assert str(v1.version) == "1" and v1.tags["decision"] == "champion"
    assert float(v1.tags["test_roc_auc"]) > 0 and "threshold" in v1.tags and v1.tags["test_set"]
    run1 = client.get_run(v1.run_id)
    assert "test_roc_auc" in run1.data.metrics and run1.data.tags["registry_decision"] == "champion"
    assert v1.description.startswith("compact_cnn (binary) trained on data version")
    assert v1.tags["model_card"] == f"runs:/{v1.run_id}/model_card/{MODEL}/v1/model_card.md"
    # The hospital side loads @champion through the tracking server: bundle, threshold and drift reference.
    from pipeline.serving import classifier

    served = classifier.load(f"models:/{MODEL}@champion", stack.tracking_uri)
    assert served.info.version == "1" and served.info.threshold == pytest.approx(float(v1.tags["threshold"]), abs=1e-6)
    assert served.drift_reference is not None and served.info.alias == "champion"

    deployment_run(stack, {"overrides": {"train.epochs": 3, "model.dropout": 0.1}})
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert set(versions) == {"1", "2"}
    v2 = versions["2"]
    floor = 0.5  # the project's registry.sensitivity_floor; promotion: manual
    wins = (
        float(v2.tags["test_roc_auc"]) > float(v1.tags["test_roc_auc"]) and float(v2.tags["test_sensitivity"]) >= floor
    )
    aliases = {a: str(v) for a, v in client.get_registered_model(MODEL).aliases.items()}
    assert v2.tags["decision"] == ("challenger" if wins else "rejected")
    assert aliases == ({"champion": "1", "challenger": "2"} if wins else {"champion": "1"})
    decision = json.loads((stack.project / "reports" / "champion.json").read_text())
    assert decision["version"] == "2" and decision["champion"]["version"] == "1"

    # Nothing changed since: the deployment run trains nothing, DVC reports every stage cached.
    lock = (stack.project / "dvc.lock").read_text()
    start = time.perf_counter()
    deployment_run(stack, {})
    print(f"\nno-change deployment run: {time.perf_counter() - start:.1f} s (prefect deployment run --watch)")
    assert (stack.project / "dvc.lock").read_text() == lock
    assert {str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")} == {"1", "2"}
    log = (stack.root / "worker.log").read_text()
    assert "ran: []" in log

    shot = stack.project / "reports" / "screenshots" / "mlflow_registered_model.png"
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (.ci/run installs it) for the MLflow UI screenshot")
        pytest.skip("chromium not installed: apt-get install chromium (the screenshot step needs it)")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "screenshot_mlflow.py"),
            "--tracking-uri",
            stack.tracking_uri,
            "--model",
            MODEL,
            "--out",
            str(shot),
            "--log-to-run",
            v2.run_id,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert shot.stat().st_size > 20_000
    assert "screenshots" in {a.path for a in client.list_artifacts(v2.run_id)}
    keep = REPO / "reports" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shot, keep / "e2e_mlflow_registered_model.png")  # for a person to look at


def environ(pid: int) -> dict[str, str]:
    """A running process's environment, as the kernel has it."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().partition("=")[::2] for e in entries if e)


def digests(root: Path, paths: list[str]) -> dict[str, str]:
    """SHA-256 of every file under `paths` (files or folders) relative to `root`."""
    files = [f for p in paths for f in ([root / p] if (root / p).is_file() else sorted((root / p).rglob("*")))]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_team_remote_on_s3_and_artifacts_in_the_bucket(stack: Stack, s3: SeaweedS3) -> None:
    """The DVC remote on S3 from one command: push, a second clone pulls (up to date, same bytes) and
    predicts with the champion through the server; the MLflow artifacts are in the bucket, and the
    pipeline ran without S3 keys."""
    from mlflow import MlflowClient

    if not (stack.project / "dvc.lock").is_file():  # run on its own: one deployment run first
        deployment_run(stack, {"ingest": True})
    # Only the tracking server has S3 keys; the worker (and the flow runs it starts) has none.
    assert not set(S3_CLIENT_KEYS) & set(environ(stack.worker.proc.pid))
    assert environ(stack.mlflow.proc.pid)["AWS_ACCESS_KEY_ID"] == s3.access_key
    client = MlflowClient(stack.tracking_uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(champion.run_id).info
    assert run.artifact_uri == f"mlflow-artifacts:/{run.experiment_id}/{run.run_id}/artifacts"  # proxied
    keys = s3.keys(stack.bucket, "mlflow/")
    card = f"model_card/{MODEL}/v{champion.version}/model_card.md"
    assert f"mlflow/{run.experiment_id}/{run.run_id}/artifacts/{card}" in keys
    model_files = client.get_model_version_download_uri(MODEL, champion.version).removeprefix("mlflow-artifacts:/")
    assert any(k.startswith(f"mlflow/{model_files}/") and k.endswith(".keras") for k in keys), model_files

    # One command configures the remote; the keys come from the person's environment, not .dvc/config.
    remote = ("pneumo", "remote", f"s3://{stack.bucket}/dvc", "--endpoint-url", s3.endpoint, "--default")
    configured = stack.run(*remote)
    assert configured.returncode == 0 and "dvc remote add --force --default team" in configured.stdout, (
        configured.stdout + configured.stderr
    )
    config = (stack.project / ".dvc" / "config").read_text()
    assert f"url = s3://{stack.bucket}/dvc" in config and s3.secret_key not in config
    pushed = stack.run("dvc", "push", **s3.env())
    assert pushed.returncode == 0 and "files pushed" in pushed.stdout, pushed.stdout + pushed.stderr
    assert len(s3.keys(stack.bucket, "dvc/files/md5/")) >= len(list((stack.project / "data" / "raw").rglob("*.jpeg")))

    # A teammate's clone: git brings code, params, dvc.lock and the remote; `dvc pull` the rest.
    git = ("git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost")
    for args in (("git", "add", "-A"), (*git, "commit", "-qm", "pipeline outputs on the team remote")):
        done = stack.run(*args)
        assert done.returncode == 0, done.stdout + done.stderr
    clone = stack.root / "clone"
    assert stack.run("git", "clone", "-q", str(stack.project), str(clone)).returncode == 0
    again = stack.run(*remote, cwd=clone)  # the same command again: nothing changes
    assert again.returncode == 0 and (clone / ".dvc" / "config").read_text() == config, again.stderr
    pulled = stack.run("dvc", "pull", cwd=clone, **s3.env())
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    status = stack.run("dvc", "status", "--json", cwd=clone)  # only `source` (run every time) is not up to date
    assert json.loads(status.stdout[status.stdout.find("{") :]) == {"source": ["always changed"]}, status.stdout
    lock = yaml.safe_load((stack.project / "dvc.lock").read_text())
    outs = sorted({o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])})
    assert {"data/raw", "models/model.keras", "reports/mlflow_run.json"} <= set(outs)
    assert digests(clone, outs) == digests(stack.project, outs)

    # The clone predicts with @champion, loaded through the tracking server without S3 keys.
    test_images = clone / "data" / "raw" / "test"
    predicted = stack.run("pneumo", "predict", str(test_images), "-o", str(stack.root / "clone.csv"), cwd=clone)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    n = len(list(test_images.rglob("*.jpeg")))
    assert f"predicted {n} of {n} inputs with {MODEL} v{champion.version}" in predicted.stderr


def test_sweep_trials_fan_out_to_the_workers_of_the_trial_pool(stack: Stack) -> None:
    """A sweep whose trials are flow runs of the sweep-trial deployment, two at a time, on a pool served by
    two workers that each take one run at a time: both workers run trials; three nested MLflow runs under
    one parent on the tracking server; the winner on validation AUC registered as a candidate."""
    from mlflow import MlflowClient

    from tests.test_sweep import GRID, SWEEP_PROJECT

    project = copy_project(stack.root / "sweep-project", *SWEEP_PROJECT)
    shutil.copy2(REPO / "prefect.yaml", project / "prefect.yaml")
    env = {**stack.env, "PWD": str(project), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    # Workers on one machine with two GPUs listed: trials that overlap must each get their own device.
    env |= {"CUDA_VISIBLE_DEVICES": "0,1", "PNEUMO_GPU_SLOTS_DIR": str(stack.root / "gpu-slots")}
    run = lambda *args: subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)  # noqa: E731
    created = run("prefect", "work-pool", "create", "pneumo-trials", "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = run("prefect", "--no-prompt", "deploy", "-n", "sweep-trial")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    prefect = str(Path(sys.executable).parent / "prefect")
    workers = [
        Service(
            f"trial worker {i}",
            [prefect, "worker", "start", "--pool", "pneumo-trials", "--limit", "1", "--name", f"trials-{i}"],
            env,
            project,
            stack.root / f"trials-{i}.log",
        )
        for i in (1, 2)
    ]
    try:
        start = time.perf_counter()
        sweep = run(
            sys.executable,
            "-m",
            "flows.sweep_flow",
            "--grid",
            json.dumps(GRID),
            "--parallel",
            "2",
            "--trial-deployment",
            "pneumonia-sweep-trial/sweep-trial",
        )
        print(f"\nsweep of 3 trials on two workers: {time.perf_counter() - start:.1f} s")
        logs = "".join(w.log.read_text()[-1500:] for w in workers)
        assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:] + logs
        trial_pids = {w.proc.pid for w in workers}
    finally:
        for worker in workers:
            worker.stop()

    client = MlflowClient(stack.tracking_uri)
    parents = client.search_runs(
        [client.get_experiment_by_name("pneumonia").experiment_id], "tags.`pneumo.sweep` = 'parent'"
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    found = client.search_runs([parents[0].info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    children = sorted(found, key=lambda r: r.data.tags["sweep_trial"])
    assert [r.data.tags["sweep_trial"] for r in children] == ["t01", "t02", "t03"]
    assert [float(r.data.params["train.learning_rate"]) for r in children] == GRID["train.learning_rate"]

    # Each trial ran in a flow run that one of the two workers started, and each worker ran at least one.
    rows = [json.loads((project / "sweeps" / parent / t / "trial.json").read_text()) for t in ("t01", "t02", "t03")]
    assert {row["run_id"] for row in rows} == {r.info.run_id for r in children}
    ran_by = [row["ran_on"]["parent_pid"] for row in rows]
    assert set(ran_by) == trial_pids, f"trials started by {ran_by}, workers {trial_pids}"
    assert all(row["ran_on"]["pid"] != os.getpid() for row in rows)
    # The two workers' trials are processes of their own; those that ran at the same time had different GPUs.
    overlapping = [
        (a, b)
        for i, a in enumerate(rows)
        for b in rows[i + 1 :]
        if a["ran_on"]["between"][0] < b["ran_on"]["between"][1]
        and b["ran_on"]["between"][0] < a["ran_on"]["between"][1]
    ]
    assert overlapping, [row["ran_on"]["between"] for row in rows]  # two at a time: some trials overlapped
    assert all(a["ran_on"]["gpu"] != b["ran_on"]["gpu"] for a, b in overlapping), [r["ran_on"] for r in rows]
    assert {row["ran_on"]["gpu"] for row in rows} <= {"0", "1"}

    best = max(rows, key=lambda r: r["val_roc_auc"])
    tags = client.get_run(parent).data.tags
    assert tags["winner_trial"] == best["trial"] and tags["winner_run_id"] == best["run_id"]
    version = client.get_model_version("sweep-test", tags["winner_version"])
    assert version.run_id == best["run_id"] and tags["winner_decision"] == "challenger"
    assert "champion" not in client.get_registered_model("sweep-test").aliases
