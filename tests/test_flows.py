"""The Prefect flow under prefect_test_harness: each stage through DVC, nothing re-run that DVC has cached,
retries only on I/O, stops on bad data, and provenance that names the data that really ran."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from flows import pipeline_flow
from flows.dvc_runner import StageRun, _raise_typed, run_pneumo
from flows.pipeline_flow import as_overrides, flow_stage_names, pneumonia_pipeline, retry_on_transient
from pipeline.core.config import load_params
from pipeline.core.errors import EXIT_TRANSIENT, EXIT_VALIDATION, ConfigError, DataError, PipelineError, TransientError
from pipeline.data.version import dvc_data_version
from pipeline.steps import stages as stage_list
from tests.conftest import FAST_TRAIN, REPO, SMALL_SYNTHETIC
from tests.projects import copy_project, run

pytestmark = pytest.mark.slow
STAGES = ["source", "ingest", "index", "validate", "shard", "train", "evaluate", "stress", "register"]
# A two-epoch model on tiny data may miss the clinical floor: these runs check orchestration, not the model.
FLOW_PROJECT = [*SMALL_SYNTHETIC, *FAST_TRAIN, "registry.sensitivity_floor=0", "registry.model_name=flow-test"]


def test_flow_and_dvc_run_the_same_stages() -> None:
    """The DAG is written once: the flow's stage list is dvc.yaml's (ingest left out only when asked)."""
    dvc_stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    params = load_params(REPO / "params.yaml")
    assert flow_stage_names(params, ingest=True) == dvc_stages == STAGES
    assert flow_stage_names(params, ingest=False) == [s for s in dvc_stages if s != "ingest"]


def test_dvc_status_is_asked_after_source_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc status` cannot know whether the data source changed before `source` ran: the flow runs it first,
    asks then, and starts from the first changed stage (pure ordering logic: stages and status stubbed)."""
    events: list[str] = []
    monkeypatch.setattr(pipeline_flow, "changed_stages", lambda: events.append("status") or {"ingest"})

    def task(name: str, cached: bool) -> Callable[[str], StageRun]:
        return lambda _: events.append(f"{name} {'cached' if cached else 'ran'}") or StageRun(name, not cached, 0.0)

    monkeypatch.setattr(pipeline_flow, "stage_task", task)
    always = stage_list.always_run(load_params(REPO / "params.yaml"))
    assert always == {"source"}
    runs = pipeline_flow.run_changed(["source", "ingest", "index"], always, logging.getLogger("test"))
    assert events == ["source ran", "status", "ingest ran", "index ran"]
    assert pipeline_flow.stages_that_ran(runs, always) == ["ingest", "index"]
    events.clear()
    pipeline_flow.run_changed(["index", "validate"], always, logging.getLogger("test"))  # no source: asked at once
    assert events == ["status", "index cached", "validate cached"]


class _State:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self, raise_on_failure: bool = True) -> BaseException:
        return self.exc


def test_retries_only_transient_io() -> None:
    assert retry_on_transient(None, None, _State(TransientError("registry down")))
    assert retry_on_transient(None, None, _State(ConnectionError("refused")))
    assert not retry_on_transient(None, None, _State(DataError("validation failed")))
    assert not retry_on_transient(None, None, _State(ValueError("a training bug")))
    assert as_overrides({"train.epochs": 3, "model.weights": "none"}) == ["train.epochs=3", 'model.weights="none"']


def test_a_command_outside_dvc_streams_and_fails_with_its_own_typed_error(tmp_path: Path) -> None:
    """A sweep trial's `pneumo` runs as a real process: its lines reach `echo` as they come, and its exit
    status picks the error type (1 bad data, 75 transient I/O, anything else a pipeline error)."""
    lines: list[str] = []
    with pytest.raises(PipelineError, match=r"^pneumo validate in .+: params.yaml: no such file"):
        run_pneumo(["validate"], tmp_path, echo=lines.append)
    assert any("params.yaml: no such file" in line for line in lines)
    for status, error in ((EXIT_VALIDATION, DataError), (EXIT_TRANSIENT, TransientError), (3, PipelineError)):
        with pytest.raises(error, match=r"it went wrong$") as raised:
            _raise_typed(status, "it went wrong", "stage train")
        assert type(raised.value) is error and str(raised.value).startswith("stage train: ") == (status == 3)


def _summary() -> str:
    from prefect.client.orchestration import get_client

    async def latest() -> str:
        # The client's read_artifacts sends nulls this server version rejects (422): post the filter directly.
        body = {"artifacts": {"key": {"any_": ["pneumonia-pipeline-summary"]}}, "sort": "CREATED_DESC", "limit": 1}
        async with get_client() as client:
            response = await client._client.post("/artifacts/filter", json=body)
            response.raise_for_status()
            return response.json()[0]["data"]

    return asyncio.run(latest())


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = copy_project(tmp_path / "project", *FLOW_PROJECT)
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return work


def test_flow_reruns_only_what_changed_and_records_the_data_that_ran(prefect_harness: None, project: Path) -> None:
    """One project through four flow runs (a full flow run is the slow part): all stages, nothing changed,
    a params change, then a data change whose version reaches the MLflow run, the registry and the card."""
    from mlflow import MlflowClient

    first = pneumonia_pipeline()
    assert first == dict.fromkeys(STAGES, "ran")
    decision = json.loads((project / "reports" / "champion.json").read_text())
    assert decision["model_name"] == "flow-test" and decision["outcome"] == "champion"
    markdown = _summary()
    assert "| train | **ran** |" in markdown and "`models/model.keras`" in markdown
    assert "| roc_auc |" in markdown and "flow-test version 1: **champion**" in markdown
    assert "MLflow run:" in markdown and "Model card:" in markdown
    lock = (project / "dvc.lock").read_text()

    # Nothing changed: `source` fingerprints the data again (the same), every other stage is reported cached
    # without starting, and it takes about a `dvc status` and a `dvc repro source`.
    start = time.perf_counter()
    run(["dvc", "status"], project)
    status_seconds = time.perf_counter() - start
    start = time.perf_counter()
    second = pneumonia_pipeline()
    flow_seconds = time.perf_counter() - start
    print(f"\nno-change flow run {flow_seconds:.1f} s, dvc status {status_seconds:.1f} s")
    assert second == {**dict.fromkeys(STAGES, "cached"), "source": "ran"}
    assert flow_seconds < 8 * status_seconds + 5
    assert "Stages run by DVC: none (all cached)" in _summary()
    assert (project / "dvc.lock").read_text() == lock

    # A params change re-runs exactly what `dvc repro` would: evaluate and what reads its outputs.
    third = pneumonia_pipeline(overrides={"evaluate.target_sensitivity": 0.9})
    assert [s for s, status in third.items() if status == "ran"] == ["source", "evaluate", "stress", "register"]
    assert re.search(r"target_sensitivity: 0\.9\s+# ", (project / "params.yaml").read_text())  # comment kept
    # The lock the flow left is the one DVC itself considers current: `dvc repro` has nothing to do.
    lock = (project / "dvc.lock").read_text()
    assert re.findall(r"Running stage '(\w+)'", run(["dvc", "repro"], project).stdout) == ["source"]
    assert (project / "dvc.lock").read_text() == lock

    # New data: every stage runs, and the provenance names the data that really ran.
    old_version = dvc_data_version("data/raw", project / "dvc.lock")
    ran = pneumonia_pipeline(overrides={"data.synthetic.seed": 8})
    assert all(status == "ran" for status in ran.values())
    version = dvc_data_version("data/raw", project / "dvc.lock")
    assert version and version != old_version

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    run_id = json.loads((project / "reports" / "mlflow_run.json").read_text())["run_id"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.data.tags["data_version"] == version
    assert mlflow_run.data.params["split.seed"] == "42"
    inputs = {i.dataset.name: i for i in mlflow_run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    assert {i.dataset.digest for i in inputs.values()} == {version.removesuffix(".dir")}
    contexts = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for name, i in inputs.items()}
    assert contexts == {"train": "training", "val": "validation", "test": "test"}

    decision = json.loads((project / "reports" / "champion.json").read_text())
    model_version = client.get_model_version("flow-test", decision["version"])
    assert model_version.tags["data_version"] == version
    assert f"`{version}`" in (project / "models" / "model_card.md").read_text()
    assert "seed: 8" in (project / "params.yaml").read_text()


def test_failed_validation_stops_before_training(prefect_harness: None, project: Path) -> None:
    with pytest.raises(DataError, match=r"^validation failed: minimum images per class per split"):
        pneumonia_pipeline(overrides={"validation.min_images_per_class.test": 100000})
    assert (project / "reports" / "validation.json").is_file()
    assert not (project / "models").exists() and not (project / "reports" / "mlflow_run.json").exists()


def test_bad_override_fails_before_any_work(prefect_harness: None, project: Path) -> None:
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.epochs: Input should be greater than or equal to 1"):
        pneumonia_pipeline(overrides={"train.epochs": 0})
    with pytest.raises(ConfigError, match=r"^params_file other\.yaml: every stage runs through DVC, which reads"):
        pneumonia_pipeline(params_file="other.yaml")  # DVC would read params.yaml whatever the flow was given
    assert not (project / "data").exists() and (project / "params.yaml").read_text() == before


def test_flows_in_one_folder_take_turns(prefect_harness: None, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline started while another flow (a sweep, a distributed training, another pipeline deployment) works
    in the same folder waits for its turn instead of failing on DVC's lock or writing params.yaml under the
    other's feet; past the wait it is a TransientError for the orchestrator to retry, with nothing written."""
    import filelock

    from flows import turns
    from flows.sweep_flow import pneumonia_sweep

    monkeypatch.setattr(turns, "WAIT_SECONDS", 0.5)
    before = (project / "params.yaml").read_text()
    other_flow = filelock.FileLock(project / turns.FLOW_LOCK)
    waited = r"another flow works in .*: timed out after 0\.5 s"
    with other_flow, pytest.raises(TransientError, match=rf"^pneumonia-pipeline: {waited}"):
        pneumonia_pipeline(overrides={"train.epochs": 3})
    assert (project / "params.yaml").read_text() == before and not (project / "data").exists()
    with other_flow, pytest.raises(TransientError, match=rf"^pneumonia-sweep: {waited}"):
        pneumonia_sweep(grid={"train.learning_rate": [0.01]})
    assert not (project / "sweeps").exists() and not (project / "data").exists()
