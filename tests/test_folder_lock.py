"""One train, evaluate or register at a time per project folder, whoever starts them."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.core.config import Params
from pipeline.core.errors import PipelineError
from pipeline.core.locks import FOLDER_LOCK, folder_lock, lock_files
from pipeline.steps import evaluate, register, train

HOLD = "import sys, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); input()"


@contextlib.contextmanager
def held_by_another_process(lock: Path) -> Iterator[None]:
    """The lock file `lock` held by a child process (another stage) until the block ends; then it dies."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait(10)


def test_a_second_stage_in_a_busy_folder_fails_at_once_and_writes_nothing(
    params_in: Callable[..., Params], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    params = params_in()
    with held_by_another_process(tmp_path / FOLDER_LOCK):
        before = sorted(p.name for p in tmp_path.iterdir())
        for name, step in (("train", train), ("evaluate", evaluate), ("register", register)):
            with pytest.raises(PipelineError) as err:
                step.run(params)
            assert str(err.value).startswith(f"{name}: another train, evaluate or register is running in {tmp_path}")
            assert "\n" not in str(err.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no model, metrics, run or decision
    with folder_lock("train", tmp_path):  # the holder died: its lock went with it
        pass


def test_a_stage_of_another_project_writing_the_same_output_folder_is_refused(
    params_in: Callable[..., Params], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output path outside the project folder (an absolute train.model_dir) carries the lock too."""
    shared_models, project = tmp_path / "models-of-both", tmp_path / "b"
    project.mkdir()
    monkeypatch.chdir(project)
    params = params_in(f"train.model_dir={shared_models}")
    beside = tmp_path / f".models-of-both{FOLDER_LOCK}"  # beside the folder: the folder holds outputs only
    with held_by_another_process(beside):  # project a's train, writing the same model folder
        for name, step in (("train", train), ("evaluate", evaluate), ("register", register)):
            with pytest.raises(PipelineError) as err:
                step.run(params)
            assert str(err.value).startswith(
                f"{name}: another train, evaluate or register is running in {shared_models}"
            )
        assert not shared_models.exists()  # no model written
        with folder_lock("train", project):  # project b's own folder was let go when the second lock failed
            pass


def test_the_locked_folders_are_the_project_and_the_outputs_outside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)  # relative outputs are the stages' cwd's
    outputs = ["models", "reports/plots", str(tmp_path / "out" / "models"), "../out/models", str(tmp_path / "cards")]
    assert lock_files(project, outputs) == [
        (project, project / FOLDER_LOCK),
        (tmp_path / "cards", tmp_path / f".cards{FOLDER_LOCK}"),
        (tmp_path / "out" / "models", tmp_path / "out" / f".models{FOLDER_LOCK}"),
    ]


def test_every_stage_output_folder_is_named(params_in: Callable[..., Params], tmp_path: Path) -> None:
    params = params_in("registry.decision_file=/elsewhere/champion.json")
    folders = set(params.stage_folders())
    assert {str(tmp_path / "models"), str(tmp_path / "reports"), "/elsewhere"} <= folders
    assert {params.train.tensorboard_dir, params.evaluate.plots_dir, params.evaluate.figures_dir} <= folders


def test_a_distributed_trainings_other_workers_do_not_take_it(
    params_in: Callable[..., Params], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers 1..N of a TF_CONFIG cluster share the chief's folder and write nothing: no lock, no refusal."""
    monkeypatch.chdir(tmp_path)
    cluster = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    with folder_lock("train", tmp_path), pytest.raises(PipelineError) as err:
        train.run(params_in())
    assert "index.parquet" in str(err.value)  # got past the lock to reading the (missing) index


def test_the_holding_thread_may_nest_it_other_threads_may_not(tmp_path: Path) -> None:
    refused: list[str] = []

    def other_thread() -> None:
        try:
            with folder_lock("evaluate", tmp_path):
                refused.append("no")
        except PipelineError as err:
            refused.append(str(err))

    with folder_lock("train", tmp_path):
        with folder_lock("evaluate", tmp_path):  # a stage run from inside another, in the same thread
            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join(30)
        assert refused and refused[0].startswith("evaluate: another train, evaluate or register is running")
        probe = subprocess.run(  # still held after the inner block: another process is refused
            [sys.executable, "-c", "import sys, filelock; filelock.FileLock(sys.argv[1]).acquire(timeout=0)",
             str(tmp_path / FOLDER_LOCK)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert probe.returncode != 0 and "Timeout" in probe.stderr
    with folder_lock("train", tmp_path):  # released by the outer block
        pass
