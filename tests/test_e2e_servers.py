"""End to end as users run it: `mlflow server`, a Prefect server, a process work pool, `prefect deploy`
from prefect.yaml, a worker, `prefect deployment run` (twice), then checks through the MLflow client
and a screenshot of the registered model page in headless Chromium. Loopback only; every process
started here is stopped by process id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FAST_TRAIN, REPO, SMALL_SYNTHETIC
from tests.projects import copy_project
from tests.servers import Service, free_port

pytestmark = pytest.mark.slow
MODEL = "pneumo-chest-xray"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("e2e")
    # A two-epoch model may miss the clinical floor: the first version must become champion here.
    project = copy_project(root / "project", *SMALL_SYNTHETIC, *FAST_TRAIN, "registry.sensitivity_floor=0.5")
    shutil.copy2(REPO / "prefect.yaml", project / "prefect.yaml")
    bin_dir = str(Path(sys.executable).parent)
    mlflow_port, prefect_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PWD": str(project),
        "PREFECT_HOME": str(root / "prefect_home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
    }
    services: list[Service] = []
    try:
        mlflow = Service(
            "mlflow server",
            [
                f"{bin_dir}/mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "mlruns" / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
            ],
            env,
            root,
            root / "mlflow.log",
        )
        services.append(mlflow)
        (root / "mlruns").mkdir(exist_ok=True)
        prefect = Service(
            "prefect server",
            [f"{bin_dir}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env,
            root,
            root / "prefect.log",
        )
        services.append(prefect)
        prefect.wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health")
        mlflow.wait_healthy(f"http://127.0.0.1:{mlflow_port}/health")
        run = lambda *args: subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)  # noqa: E731
        created = run("prefect", "work-pool", "create", "pneumo-process", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = run("prefect", "--no-prompt", "deploy", "--all")
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        services.append(
            Service(
                "prefect worker",
                [f"{bin_dir}/prefect", "worker", "start", "--pool", "pneumo-process"],
                env,
                project,
                root / "worker.log",
            )
        )
        yield {"root": root, "project": project, "run": run, "tracking_uri": env["MLFLOW_TRACKING_URI"]}
    finally:
        for service in reversed(services):
            service.stop()
        for service in services:
            assert service.proc.poll() is not None, f"{service.name} still running"


def deployment_run(stack: dict[str, object], params: dict[str, object]) -> None:
    run = stack["run"]
    proc = run(
        "prefect",
        "deployment",
        "run",
        "pneumonia-pipeline/pipeline",
        "--params",
        json.dumps(params),  # type: ignore[operator]
        "--watch",
        "--watch-timeout",
        "900",
    )
    worker_log = (stack["root"] / "worker.log").read_text()[-4000:]  # type: ignore[operator]
    assert proc.returncode == 0 and "Completed" in proc.stdout, proc.stdout[-2000:] + worker_log


def test_deployment_registers_a_champion_then_applies_the_policy(stack: dict[str, object]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(str(stack["tracking_uri"]))
    deployment_run(stack, {"ingest": True})
    v1 = client.get_model_version_by_alias(MODEL, "champion")
    assert str(v1.version) == "1" and v1.tags["decision"] == "champion"
    assert float(v1.tags["test_roc_auc"]) > 0 and "threshold" in v1.tags and v1.tags["test_set"]
    run1 = client.get_run(v1.run_id)
    assert "test_roc_auc" in run1.data.metrics and run1.data.tags["registry_decision"] == "champion"
    assert v1.description.startswith("compact_cnn (binary) trained on data version")
    assert v1.tags["model_card"] == f"runs:/{v1.run_id}/model_card/model_card.md"
    # The hospital side loads @champion through the tracking server: bundle, threshold and drift reference.
    from pipeline.serving import classifier

    served = classifier.load(f"models:/{MODEL}@champion", str(stack["tracking_uri"]))
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
    decision = json.loads((stack["project"] / "reports" / "champion.json").read_text())  # type: ignore[operator]
    assert decision["version"] == "2" and decision["champion"]["version"] == "1"

    # Nothing changed since: the deployment run trains nothing, DVC reports every stage cached.
    lock = (stack["project"] / "dvc.lock").read_text()  # type: ignore[operator]
    start = time.perf_counter()
    deployment_run(stack, {})
    print(f"\nno-change deployment run: {time.perf_counter() - start:.1f} s (prefect deployment run --watch)")
    assert (stack["project"] / "dvc.lock").read_text() == lock  # type: ignore[operator]
    assert {str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")} == {"1", "2"}
    log = (stack["root"] / "worker.log").read_text()  # type: ignore[operator]
    assert "ran: []" in log

    shot = stack["project"] / "reports" / "screenshots" / "mlflow_registered_model.png"  # type: ignore[operator]
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (.ci/run installs it) for the MLflow UI screenshot")
        pytest.skip("chromium not installed: apt-get install chromium (the screenshot step needs it)")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "screenshot_mlflow.py"),
            "--tracking-uri",
            str(stack["tracking_uri"]),
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
