"""Edges of the flows found in review: GPUs for the processes a flow starts, DVC's own exit status, a bad
loguniform, `dvc push --run-cache` after a team deployment's run (retried when the remote is unreachable),
and the distributed model outside DVC.
Pure logic, a tiny real DVC repository and stand-in worker processes: no training, no Prefect server."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows import distributed_flow, dvc_runner, gpus, pipeline_flow, sweep_flow
from flows.distributed_flow import WorkerRun, outside_dvc, run_workers
from flows.dvc_runner import exit_status, push_outputs, repro_stage
from flows.gpus import gpu_env, gpu_slot
from flows.sweep_flow import expand
from pipeline.core.errors import ConfigError, PipelineError, TransientError
from tests.conftest import REPO

LOG = logging.getLogger("test")


# --- GPUs for sweep trials and distributed workers ------------------------------------------------------------


def test_each_slot_gets_its_own_listed_gpu_and_grows_memory() -> None:
    assert gpu_env(0, {}) == {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}  # CPU, or devices not listed: growth only
    assert gpu_env(3, {"CUDA_VISIBLE_DEVICES": "0"}) == {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert gpu_env(1, {"CUDA_VISIBLE_DEVICES": "-1"}) == {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    listed = {"CUDA_VISIBLE_DEVICES": "2, 5,7"}
    assert [gpu_env(i, listed)["CUDA_VISIBLE_DEVICES"] for i in range(5)] == ["2", "5", "7", "2", "5"]
    assert gpu_env(0, {"TF_FORCE_GPU_ALLOW_GROWTH": "false"})["TF_FORCE_GPU_ALLOW_GROWTH"] == "false"


@pytest.fixture
def slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A slot folder of this test's own (the default one is the machine's, shared with other test processes)."""
    monkeypatch.setenv(gpus.SLOTS_DIR, str(tmp_path / "gpu-slots"))
    return tmp_path / "gpu-slots"


def test_trials_side_by_side_hold_different_slots(slots: Path) -> None:
    with gpu_slot() as first, gpu_slot() as second:
        assert (first, second) == (0, 1)
    with gpu_slot() as again:
        assert again == 0  # a finished trial's slot is free again


HOLD_SLOT = """import sys
from flows.gpus import gpu_slot
with gpu_slot() as slot:
    print(slot, flush=True)
    sys.stdin.read()
"""


def test_a_slot_held_by_another_process_is_skipped_until_that_process_dies(slots: Path) -> None:
    """Flow runs a work-pool worker starts are processes of their own: the slot is the machine's, not the
    process's, and a trial killed mid-run (no cleanup) frees it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SLOT], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "0"
        with gpu_slot() as slot:
            assert slot == 1
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with gpu_slot() as slot:
        assert slot == 0


def test_a_trial_runs_on_the_gpu_of_its_slot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, slots: Path) -> None:
    seen: list[dict[str, str]] = []

    def pneumo(args: list[str], cwd: str, env: dict[str, str], echo: Any = None) -> str:
        seen.append(env)
        raise PipelineError("stop here")

    monkeypatch.setattr(sweep_flow, "run_pneumo", pneumo)
    monkeypatch.setattr(sweep_flow, "get_run_logger", lambda: LOG)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with gpu_slot(), pytest.raises(PipelineError, match="stop here"):  # another trial holds slot 0
        sweep_flow.run_trial.fn("t02", str(tmp_path), {}, {"MLFLOW_TRACKING_URI": "x"})
    assert seen[0]["CUDA_VISIBLE_DEVICES"] == "1" and seen[0]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert seen[0]["MLFLOW_TRACKING_URI"] == "x"
    with gpu_slot() as slot:
        assert slot == 0  # the failed trial gave its slot back


SHOW_ENV = (
    "import json, os; i = json.loads(os.environ['TF_CONFIG'])['task']['index']; "
    "print(i, os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ.get('TF_FORCE_GPU_ALLOW_GROWTH'))"
)


def test_distributed_workers_get_their_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = distributed_flow.loopback_hosts(3)
    runs = run_workers([sys.executable, "-c", SHOW_ENV], hosts, env={"CUDA_VISIBLE_DEVICES": "4,6"}, echo=LOG.info)
    assert [r.output.split() for r in runs] == [["0", "4", "true"], ["1", "6", "true"], ["2", "4", "true"]]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # a CPU worker: nothing hidden, nothing set
    runs = run_workers([sys.executable, "-c", SHOW_ENV], hosts[:2], echo=LOG.info)
    assert [r.output.split() for r in runs] == [["0", "None", "true"], ["1", "None", "true"]]


# --- the exit status DVC reports, a bad loguniform ---------------------------------------------------------------


MISLEADING = """\
Running stage 'ingest':
> pneumo ingest
warning: the last download attempt exited with 1, trying the mirror
error: mirror: connection reset
ERROR: failed to reproduce 'ingest': failed to run: pneumo ingest, exited with 75
"""


def test_the_exit_status_is_dvcs_own_not_an_earlier_line() -> None:
    assert exit_status(MISLEADING) == 75
    assert exit_status("child exited with 1\nthen exited with 3\n") == 3  # no DVC line: the last one
    assert exit_status("ERROR: failed to reproduce 'x': killed\n") is None


def test_loguniform_needs_a_positive_low() -> None:
    with pytest.raises(ConfigError, match=r"^sweep: random train\.learning_rate: loguniform needs low > 0 \(got \[0, "):
        expand(random={"train.learning_rate": {"loguniform": [0, 0.01]}}, trials=1)


# --- a tiny real DVC repository: a stage's exit status, `dvc push --run-cache` -------------------------------------


def sh(cwd: Path, *command: str) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    return done.stdout


def dvc_repo(folder: Path, command: str) -> Path:
    """git + DVC in `folder`, one stage `make` running `command` (in.txt -> out.txt), params.yaml the project's."""
    folder.mkdir()
    sh(folder, "git", "init", "-q")
    sh(folder, sys.executable, "-m", "dvc", "init", "-q")
    shutil.copy2(REPO / "params.yaml", folder / "params.yaml")
    (folder / "in.txt").write_text("input")
    stage = {"cmd": command, "deps": ["in.txt"], "outs": ["out.txt"]}  # DVC's run-cache keeps stages with deps
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    return folder


WRITE_OUT = f"{sys.executable} -c \"open('out.txt', 'w').write('made')\""


def test_a_stage_that_printed_exited_with_1_and_failed_with_75_is_transient(tmp_path: Path) -> None:
    script = "print('a helper exited with 1'); raise SystemExit(75)"
    repo = dvc_repo(tmp_path / "repo", f'{sys.executable} -c "{script}"')
    with pytest.raises(TransientError):
        repro_stage("make", cwd=repo)


def test_push_sends_outputs_and_run_cache_to_the_default_remote(tmp_path: Path) -> None:
    repo = dvc_repo(tmp_path / "repo", WRITE_OUT)
    sh(repo, sys.executable, "-m", "dvc", "repro", "-q")
    with pytest.raises(ConfigError, match=r"^dvc push: .*/repo/\.dvc/config: no default remote \(`pneumo remote"):
        push_outputs(repo)
    # The committed kind of remote, a folder in the checkout: pushed into, it goes with a deployment's clone
    sh(repo, sys.executable, "-m", "dvc", "remote", "add", "-d", "local", ".dvc-storage")
    with pytest.raises(
        ConfigError, match=r"^dvc push: .*: the default remote 'local' is .*/repo/\.dvc-storage, inside"
    ):
        push_outputs(repo)
    assert not (repo / ".dvc-storage").exists()
    remote = tmp_path / "remote"
    sh(repo, sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(remote))
    push_outputs(repo)
    assert any((remote / "files").rglob("*")) and any((remote / "runs").rglob("*")), "outputs and run-cache"


@pytest.fixture
def flow_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """The pipeline flow's own function in a tiny DVC repository: its stages stubbed (a record of them run)."""
    repo = dvc_repo(tmp_path / "repo", WRITE_OUT)
    sh(repo, sys.executable, "-m", "dvc", "repro", "-q")
    ran: list[str] = []
    monkeypatch.setattr(pipeline_flow, "run_changed", lambda names, always, logger: ran.extend(names) or [])
    monkeypatch.setattr(pipeline_flow, "get_run_logger", lambda: LOG)
    monkeypatch.setattr(pipeline_flow, "create_markdown_artifact", lambda *a, **k: None)
    monkeypatch.setattr(pipeline_flow, "_secret", lambda name: f"from block {name}")
    for variable in pipeline_flow.REMOTE_SECRETS:
        monkeypatch.setenv(variable, "")  # none set (and whatever the flow sets is undone after the test)
    monkeypatch.chdir(repo)
    return repo, ran


def test_the_flow_pushes_after_a_successful_run(flow_in: tuple[Path, list[str]], tmp_path: Path) -> None:
    repo, ran = flow_in
    remote = tmp_path / "remote"
    sh(repo, sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(remote))
    pipeline_flow.pneumonia_pipeline.fn(ingest=False)
    assert ran and not remote.exists(), "push is off by default"
    pipeline_flow.pneumonia_pipeline.fn(ingest=False, push=True)
    assert any((remote / "files").rglob("*")) and any((remote / "runs").rglob("*"))
    assert os.environ["AWS_ACCESS_KEY_ID"] == "from block pneumo-s3-access-key-id"  # the pull step's keys


def test_the_flows_push_outlasts_a_transient_failure(
    flow_in: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The remote unreachable for the first push: the flow's push is tried again (and logs so), then succeeds."""
    repo, _ = flow_in
    remote = tmp_path / "remote"
    sh(repo, sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(remote))
    real, pushes = dvc_runner.dvc, []

    def dvc(*args: str, **kwargs: Any) -> tuple[int, str]:
        if args[0] == "push":
            pushes.append(1)
            if len(pushes) == 1:
                return 1, 'ERROR: unexpected error - Could not connect to the endpoint URL: "http://s3:9000/b"'
        return real(*args, **kwargs)

    monkeypatch.setattr(dvc_runner, "dvc", dvc)
    monkeypatch.setattr(dvc_runner, "PUSH_BACKOFF_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="test"):
        pipeline_flow.pneumonia_pipeline.fn(ingest=False, push=True)
    assert len(pushes) == 2 and any((remote / "runs").rglob("*"))
    assert "Could not connect to the endpoint URL" in caplog.text and "retry 1/3 in 0 s" in caplog.text


def test_the_flow_without_a_remote_fails_before_any_stage(flow_in: tuple[Path, list[str]]) -> None:
    _, ran = flow_in
    with pytest.raises(ConfigError, match=r"^dvc push: .*\.dvc/config: no default remote"):
        pipeline_flow.pneumonia_pipeline.fn(ingest=False, push=True)
    assert ran == []


def test_remote_keys_in_the_environment_win_over_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mine")
    monkeypatch.setattr(pipeline_flow, "_secret", lambda name: pytest.fail("a block was read"))
    pipeline_flow.remote_credentials()


def test_team_deployments_push_and_pull_the_run_cache() -> None:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    accepted = set(pipeline_flow.pneumonia_pipeline.parameters.properties)
    for name in ("pipeline-docker", "pipeline-k8s-gpu"):
        assert deployments[name]["parameters"]["push"] is True and set(deployments[name]["parameters"]) <= accepted
        scripts = [s.get("script", "") for step in deployments[name]["pull"] for s in step.values()]
        assert "dvc pull --allow-missing --run-cache" in scripts
    assert "push" not in deployments["pipeline"]["parameters"]


# --- the distributed model is outside DVC ------------------------------------------------------------------------


def test_distributed_run_says_its_model_is_not_in_dvc_lock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    chief = WorkerRun(0, 0, "trained 2 epochs\nmodel: models/model.keras\n")
    monkeypatch.setattr(distributed_flow, "run_cluster", lambda *a, **k: [chief, WorkerRun(1, 0, "")])
    monkeypatch.setattr(distributed_flow, "get_run_logger", lambda: LOG)
    summary = distributed_flow.distributed_train.fn(workers=2, workdir=str(tmp_path))
    assert summary.startswith("trained 2 epochs\nmodel: models/model.keras\n")
    assert f"run `dvc commit train` in {tmp_path.resolve()}" in summary
    for note in (outside_dvc({"train.epochs": 1}, "params.yaml"), outside_dvc(None, "other.yaml")):
        assert "not in params.yaml" in note and "would record the wrong params" in note
    assert "run `dvc commit train`" in outside_dvc(None, "./params.yaml")
