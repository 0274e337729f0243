"""Real DVC commands on a temporary copy of the repository, with a real MLflow sqlite store.

One copy per module: repro (all stages, twice), MLflow contents, push/pull, a changed param,
`dvc metrics` / `dvc plots`, and `dvc exp run -S`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.dvc_runner import changed_stages
from pipeline.data.version import dvc_data_version
from pipeline.steps import stages
from tests.conftest import FAST_TRAIN, REPO, SMALL_SYNTHETIC
from tests.projects import copy_project, run, write_params

pytestmark = pytest.mark.slow
STAGES = ["source", "ingest", "index", "validate", "shard", "train", "evaluate", "stress", "register"]


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Small data, tiny training: this checks wiring, not accuracy.
    return copy_project(tmp_path_factory.mktemp("dvc") / "repo", *SMALL_SYNTHETIC, *FAST_TRAIN)


def test_repro_runs_every_stage_then_nothing(repo_copy: Path) -> None:
    trace = repo_copy.parent / "modules.jsonl"
    first = run(["dvc", "repro"], repo_copy, PNEUMO_TRACE_MODULES=str(trace)).stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    # Every module a stage really ran (recorded by `pneumo` itself) is among that stage's deps in dvc.yaml.
    deps = {
        name: set(spec["deps"]) for name, spec in yaml.safe_load((repo_copy / "dvc.yaml").read_text())["stages"].items()
    }
    traced = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [t["command"] for t in traced] == STAGES
    for t in traced:
        files = {stages.module_file(m) for m in t["modules"]}
        assert files <= deps[t["command"]], (
            f"{t['command']} ran code its deps miss: {sorted(files - deps[t['command']])}"
        )
        assert "pipeline/modeling/training.py" not in files or t["command"] == "train"  # the trace is specific
    assert "validation PASSED" in first and "test (n=45) at the threshold" in first
    # Nothing changed: only `source` runs (it fingerprints the data source every time), and writes the same.
    lock = (repo_copy / "dvc.lock").read_text()
    second = run(["dvc", "repro"], repo_copy).stdout
    assert re.findall(r"Running stage '(\w+)'", second) == ["source"], second
    assert "Stage 'ingest' didn't change, skipping" in second and (repo_copy / "dvc.lock").read_text() == lock
    assert status_json(repo_copy) == {"source": ["always changed"]}
    assert changed_stages(repo_copy) == set()  # what the flow reads: `source` runs anyway, nothing else


def status_json(project: Path) -> dict:
    out = run(["dvc", "status", "--json"], project).stdout
    return json.loads(out[out.find("{") :])


def test_a_changed_local_source_is_ingested_again(real_224: Path, tmp_path: Path) -> None:
    """Ingest's DVC state is keyed by the source's files, not only by the params naming them: a file added to
    the folder under the same data.local_path re-runs ingest; the same folder untouched does not."""
    source = tmp_path / "hospital"
    for split in ("train", "val", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            (source / split / label).mkdir(parents=True)
            for f in sorted((real_224 / "test" / label).iterdir())[:2]:
                shutil.copy2(f, source / split / label / f"{split}-{f.name}")
    project = copy_project(tmp_path / "project", "data.source=local", f"data.local_path={source}")
    first = run(["dvc", "repro", "ingest"], project).stdout
    assert re.findall(r"Running stage '(\w+)'", first) == ["source", "ingest"], first
    fingerprint = json.loads((project / "data" / "source.json").read_text())
    assert fingerprint["files"] == 12 and fingerprint["local_path"] == str(source)
    same = run(["dvc", "repro", "ingest"], project).stdout
    assert "Stage 'ingest' didn't change, skipping" in same, same
    extra = sorted((real_224 / "train" / "NORMAL").iterdir())[0]
    shutil.copy2(extra, source / "train" / "NORMAL" / extra.name)
    again = run(["dvc", "repro", "ingest"], project).stdout
    assert "Running stage 'ingest'" in again, again
    assert (project / "data" / "raw" / "train" / "NORMAL" / extra.name).is_file()
    assert json.loads((project / "data" / "source.json").read_text())["files"] == 13

    # The source out of reach (an unmounted share, a clone that pulled the data): its last fingerprint is kept,
    # with a warning, and the data as last ingested stays current. Another path that is not there stops it.
    source.rename(tmp_path / "unmounted")
    away = run(["dvc", "repro", "ingest"], project).stdout
    assert "warning: " in away and "kept the fingerprint of the data as last ingested" in away, away
    assert "Stage 'ingest' didn't change, skipping" in away
    write_params(project, f"data.local_path={tmp_path / 'elsewhere'}")
    stopped = run(["dvc", "repro", "ingest"], project, check=False)
    said = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and "elsewhere: no such file or folder (data.local_path)" in said, said


def test_one_mlflow_run_holds_everything(repo_copy: Path) -> None:
    from mlflow import MlflowClient

    ref = json.loads((repo_copy / "reports" / "mlflow_run.json").read_text())
    train_report = json.loads((repo_copy / "reports" / "train.json").read_text())
    assert train_report["mlflow_run_id"] == ref["run_id"]  # findable from the DVC outputs
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(ref["run_id"])
    metrics = json.loads((repo_copy / "reports" / "metrics.json").read_text())
    assert run.data.metrics["test_roc_auc"] == pytest.approx(metrics["test"]["roc_auc"])
    assert float(run.data.tags["threshold"]) == pytest.approx(metrics["threshold"], abs=1e-4)
    assert run.data.tags["data_version"] == dvc_data_version("data/raw", repo_copy / "dvc.lock")
    assert run.data.tags["git_commit"] and run.data.params["model.architecture"] == "compact_cnn"
    assert run.data.tags["train_images_read"].startswith("decoded once, kept in memory")  # a small split
    assert len(client.get_metric_history(run.info.run_id, "val_auc")) == 2  # per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation", "tensorboard", "training", "validation", "model_metadata"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/roc.png", "evaluation/confusion.png", "evaluation/metrics.json"} <= figures
    assert "evaluation/reliability.png" in figures and metrics["temperature"] > 0
    calibration = metrics["calibration"]
    assert calibration["val_log_loss"]["calibrated"] <= calibration["val_log_loss"]["raw"] + 1e-9  # fitted there
    assert metrics["ci_method"].startswith("bootstrap over") and "patients" in metrics["ci_method"]
    card = (repo_copy / "models" / "model_card.md").read_text()
    assert "## Calibration" in card and "(model_card/reliability.png)" in card
    # A demo model's card says it is one, and describes the synthetic images, not the real data set
    assert "Trained on the pipeline's synthetic demo data" in card and "synthetic demo images" in card
    assert "Guangzhou" not in card
    assert (repo_copy / "models" / "model_card" / "reliability.png").is_file()
    models = client.search_logged_models(experiment_ids=[ref["experiment_id"]])
    assert any(m.source_run_id == run.info.run_id for m in models)


def test_outputs_of_two_trainings_are_never_evaluated_or_registered_together(repo_copy: Path) -> None:
    """Another training writing the same folder (its model, or an evaluation of it) between this one's stages:
    evaluate and register each stop with one line naming the output at fault, and nothing is registered."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo_copy / 'mlruns' / 'mlflow.db'}")
    versions = {v.version for v in client.search_model_versions("name = 'pneumo-chest-xray'")}
    other = "f" * 32
    cases = [
        ("models/metadata.json", "mlflow_run_id", ["evaluate", "register"]),
        ("reports/metrics.json", "model_run_id", ["register"]),
    ]
    for output, key, refusing in cases:
        path = repo_copy / output
        original = path.read_text()
        path.write_text(json.dumps(json.loads(original) | {key: other}))
        try:
            for stage in refusing:
                done = run(["pneumo", stage], repo_copy, check=False)
                last = done.stderr.strip().splitlines()[-1]
                assert done.returncode != 0 and f"comes from MLflow run {other}" in last, done.stderr[-2000:]
                assert output in last and "another training wrote this project folder" in last
        finally:
            path.write_text(original)
    assert {v.version for v in client.search_model_versions("name = 'pneumo-chest-xray'")} == versions
    assert (
        json.loads((repo_copy / "reports" / "metrics.json").read_text())["model_run_id"]
        == json.loads((repo_copy / "reports" / "mlflow_run.json").read_text())["run_id"]
    )


def test_push_pull_and_changed_param(repo_copy: Path) -> None:
    run(["dvc", "push"], repo_copy)
    assert (repo_copy / ".dvc-storage").is_dir()
    shutil.rmtree(repo_copy / "data")
    shutil.rmtree(repo_copy / "models")
    shutil.rmtree(repo_copy / ".dvc" / "cache")
    run(["dvc", "pull"], repo_copy)
    counts = yaml.safe_load((repo_copy / "params.yaml").read_text())["data"]["synthetic"]["counts"]
    assert len(list((repo_copy / "data" / "raw").rglob("*.jpeg"))) == sum(sum(c.values()) for c in counts.values())
    assert (repo_copy / "models" / "model.keras").is_file()
    assert status_json(repo_copy) == {"source": ["always changed"]}  # everything else as pushed

    text = (repo_copy / "params.yaml").read_text().replace("target_sensitivity: 0.95", "target_sensitivity: 0.9")
    (repo_copy / "params.yaml").write_text(text)
    third = run(["dvc", "repro"], repo_copy).stdout
    for stage in ("ingest", "index", "validate", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in third
    assert "Running stage 'evaluate'" in third

    # Another evaluation of the same training is another version, with its own card: the first one's stays.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo_copy / 'mlruns' / 'mlflow.db'}")
    run_id = json.loads((repo_copy / "reports" / "mlflow_run.json").read_text())["run_id"]
    versions = sorted(
        (v for v in client.search_model_versions("name = 'pneumo-chest-xray'") if v.run_id == run_id),
        key=lambda v: int(v.version),
    )
    assert len(versions) >= 2, [v.version for v in versions]
    cards = [client.download_artifacts(run_id, v.tags["model_card"].split("/", 2)[2], str(repo_copy / f"card{i}"))
             for i, v in enumerate(versions[-2:])]  # fmt: skip
    for v, card in zip(versions[-2:], cards, strict=True):
        assert v.tags["model_card"] == f"runs:/{run_id}/model_card/pneumo-chest-xray/v{v.version}/model_card.md"
        assert f"pneumo-chest-xray version {v.version}" in Path(card).read_text()


def test_metrics_plots_and_experiments(repo_copy: Path) -> None:
    shown = run(["dvc", "metrics", "show", "--json"], repo_copy).stdout
    assert "roc_auc" in shown and "best_val_auc" in shown
    out = repo_copy / "plots_out"
    run(["dvc", "plots", "show", "-o", str(out)], repo_copy)
    assert (out / "index.html").is_file()

    run(["git", "add", "-A"], repo_copy)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], repo_copy)
    exp = run(["dvc", "exp", "run", "-S", "train.epochs=3"], repo_copy).stdout
    assert "Running stage 'train'" in exp and "Stage 'ingest' didn't change" in exp
    table = json.loads(run(["dvc", "exp", "show", "--json"], repo_copy).stdout)
    epochs_seen = json.dumps(table)
    assert '"epochs": 3' in epochs_seen
    diff = run(["dvc", "metrics", "diff", "--json"], repo_copy).stdout
    assert "epochs" in diff


def test_a_queued_experiment_logs_and_registers_in_the_projects_store(repo_copy: Path) -> None:
    """DVC runs a queued (or --temp) experiment in a throwaway copy under .dvc/tmp/exps/: the MLflow store,
    its artifacts and the registration lock, relative paths in params.yaml, stay the project's."""
    from mlflow import MlflowClient

    run(["git", "add", "-A"], repo_copy)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "before the temp run"], repo_copy)
    run(["dvc", "exp", "run", "--temp", "-n", "in-temp", "-S", "train.epochs=1"], repo_copy)
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pneumonia")
    runs = client.search_runs([experiment.experiment_id], "params.`train.epochs` = '1'")
    assert len(runs) == 1, "the temp experiment's run is not in the project's MLflow store"
    assert runs[0].info.artifact_uri.startswith((repo_copy / "mlruns" / "artifacts").resolve().as_uri())
    versions = client.search_model_versions("name = 'pneumo-chest-xray'")
    assert runs[0].info.run_id in {v.run_id for v in versions}  # registered there too
    assert not list((repo_copy / ".dvc" / "tmp").glob("exps/**/mlruns/mlflow.db"))


def test_dvc_yaml_is_generated_from_stage_list() -> None:
    """One DAG definition: the committed dvc.yaml must equal the one pipeline/stages.py generates."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.steps.cli", "dvc-yaml", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES
    assert all(spec["cmd"] == f"pneumo {name}" for name, spec in stages.items())


def _weights(model_file: Path) -> list:
    import keras

    return keras.models.load_model(model_file, compile=False).get_weights()


@pytest.mark.realdata
def test_new_data_with_same_params_trains_afresh(repo_copy: Path, real_subset: Path) -> None:
    """After the synthetic run, a real data set with the same params: a new model, trained on that data."""
    import csv

    import numpy as np
    from mlflow import MlflowClient
    from sklearn.metrics import roc_auc_score

    from pipeline.data.dataset_index import read_index
    from pipeline.modeling import evaluation, inputs, model_store

    resume = repo_copy / ".cache" / "train-resume"
    assert not resume.exists() or not any(resume.iterdir()), "a finished training leaves no resume state"
    before = _weights(repo_copy / "models" / "model.keras")
    old_version = dvc_data_version("data/raw", repo_copy / "dvc.lock")
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    write_params(repo_copy, "data.source=local", f"data.local_path={real_subset}")
    out = run(["dvc", "repro"], repo_copy).stdout
    assert "Running stage 'train'" in out and "Running stage 'register'" in out
    after = _weights(repo_copy / "models" / "model.keras")
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True)), "weights of the old model"

    report = json.loads((repo_copy / "reports" / "train.json").read_text())
    with open(repo_copy / "reports" / "training" / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    assert len(history) == report["epochs"] == params["train"]["epochs"]  # every epoch its own, none resumed
    assert report["best_val_auc"] == pytest.approx(max(float(r["val_auc"]) for r in history))
    metrics = json.loads((repo_copy / "reports" / "metrics.json").read_text())
    # The evaluation is of the new model: its val predictions, made here afresh, give the reported AUC.
    model, metadata = model_store.load(repo_copy / "models")
    index = read_index(repo_copy / "data" / "index.parquet")
    val = inputs.split_data(index, "val", repo_copy / "data" / "raw", "binary")
    scores = evaluation.pneumonia_score(evaluation.predict_split(model, val, metadata["input"]["shape"][0], 32))
    assert roc_auc_score(val.labels, scores) == pytest.approx(metrics["val"]["roc_auc"], abs=1e-6)
    assert metrics["n"]["test"] == 50  # the real subset's test split, not the synthetic one

    new_version = dvc_data_version("data/raw", repo_copy / "dvc.lock")
    assert new_version and new_version != old_version
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlruns' / 'mlflow.db'}")
    run_tags = client.get_run(report["mlflow_run_id"]).data.tags
    assert run_tags["data_version"] == new_version and run_tags["data_source"] == "local"
    assert not any(resume.iterdir())


def test_project_root_of_a_dvc_experiment_copy(tmp_path: Path) -> None:
    from pipeline.core.project import project_path, project_root

    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    assert project_root(copy) == project_root(copy / "sub") == (tmp_path / "proj").resolve()
    assert project_root(tmp_path / "proj") == (tmp_path / "proj").resolve()
    assert project_root(tmp_path / "proj" / ".dvc" / "tmp" / "exps") == (tmp_path / "proj" / ".dvc" / "tmp" / "exps")
    assert project_path("mlruns/x.db", copy) == (tmp_path / "proj" / "mlruns" / "x.db").resolve()
    assert project_path("/abs/x.db", copy) == Path("/abs/x.db")
