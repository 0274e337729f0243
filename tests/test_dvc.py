"""Real DVC commands on a temporary copy of the repository, with a real MLflow sqlite store.

One copy per module: repro (all stages, twice), MLflow contents, push/pull, a changed param,
`dvc metrics` / `dvc plots`, and `dvc exp run -S`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.data_version import dvc_data_version
from tests.conftest import FAST_TRAIN, REPO, SMALL_SYNTHETIC

pytestmark = pytest.mark.slow
PROJECT_FILES = ["pipeline", "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore", "pyproject.toml"]
STAGES = ["ingest", "index", "validate", "train", "evaluate", "register"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _set(params: dict, dotted: str) -> None:
    key, _, value = dotted.partition("=")
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = yaml.safe_load(value)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("dvc") / "repo"
    for name in PROJECT_FILES:
        src, dst = REPO / name, work / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((work / "params.yaml").read_text())
    for item in [*SMALL_SYNTHETIC, *FAST_TRAIN]:  # small data, tiny training: this checks wiring, not accuracy
        _set(params, item)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], work)
    return work


def test_repro_runs_every_stage_then_nothing(repo_copy: Path) -> None:
    first = _run(["dvc", "repro"], repo_copy).stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    assert "validation PASSED" in first and "test (n=45) at the threshold" in first
    second = _run(["dvc", "repro"], repo_copy).stdout
    assert "Running stage" not in second and "Data and pipelines are up to date." in second


def test_one_mlflow_run_holds_everything(repo_copy: Path) -> None:
    from mlflow import MlflowClient

    ref = json.loads((repo_copy / "reports" / "mlflow_run.json").read_text())
    train_report = json.loads((repo_copy / "reports" / "train.json").read_text())
    assert train_report["mlflow_run_id"] == ref["run_id"]  # findable from the DVC outputs
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(ref["run_id"])
    metrics = json.loads((repo_copy / "reports" / "metrics.json").read_text())
    assert run.data.metrics["test_roc_auc"] == pytest.approx(metrics["test"]["roc_auc"])
    assert run.data.tags["threshold"].startswith(f"{metrics['threshold']:.4f}"[:5])
    assert run.data.tags["data_version"] == dvc_data_version("data/raw", repo_copy / "dvc.lock")
    assert run.data.tags["git_commit"] and run.data.params["model.architecture"] == "compact_cnn"
    assert len(client.get_metric_history(run.info.run_id, "val_auc")) == 2  # per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation", "tensorboard", "training", "validation", "model_metadata"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/roc.png", "evaluation/confusion.png", "evaluation/metrics.json"} <= figures
    models = client.search_logged_models(experiment_ids=[ref["experiment_id"]])
    assert any(m.source_run_id == run.info.run_id for m in models)


def test_push_pull_and_changed_param(repo_copy: Path) -> None:
    _run(["dvc", "push"], repo_copy)
    assert (repo_copy / ".dvc-storage").is_dir()
    shutil.rmtree(repo_copy / "data")
    shutil.rmtree(repo_copy / "models")
    shutil.rmtree(repo_copy / ".dvc" / "cache")
    _run(["dvc", "pull"], repo_copy)
    counts = yaml.safe_load((repo_copy / "params.yaml").read_text())["data"]["synthetic"]["counts"]
    assert len(list((repo_copy / "data" / "raw").rglob("*.jpeg"))) == sum(sum(c.values()) for c in counts.values())
    assert (repo_copy / "models" / "model.keras").is_file()
    assert "up to date" in _run(["dvc", "status"], repo_copy).stdout

    text = (repo_copy / "params.yaml").read_text().replace("target_sensitivity: 0.95", "target_sensitivity: 0.9")
    (repo_copy / "params.yaml").write_text(text)
    third = _run(["dvc", "repro"], repo_copy).stdout
    for stage in ("ingest", "index", "validate", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in third
    assert "Running stage 'evaluate'" in third


def test_metrics_plots_and_experiments(repo_copy: Path) -> None:
    shown = _run(["dvc", "metrics", "show", "--json"], repo_copy).stdout
    assert "roc_auc" in shown and "best_val_auc" in shown
    out = repo_copy / "plots_out"
    _run(["dvc", "plots", "show", "-o", str(out)], repo_copy)
    assert (out / "index.html").is_file()

    _run(["git", "add", "-A"], repo_copy)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], repo_copy)
    exp = _run(["dvc", "exp", "run", "-S", "train.epochs=3"], repo_copy).stdout
    assert "Running stage 'train'" in exp and "Stage 'ingest' didn't change" in exp
    table = json.loads(_run(["dvc", "exp", "show", "--json"], repo_copy).stdout)
    epochs_seen = json.dumps(table)
    assert '"epochs": 3' in epochs_seen
    diff = _run(["dvc", "metrics", "diff", "--json"], repo_copy).stdout
    assert "epochs" in diff


def test_dvc_yaml_is_generated_from_stage_list() -> None:
    """One DAG definition: the committed dvc.yaml must equal the one pipeline/stages.py generates."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "dvc-yaml", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES
    assert all(spec["cmd"] == f"pneumo {name}" for name, spec in stages.items())
