"""Real DVC commands on a temporary copy of the repository: repro, no-op repro, push, pull, dvc.yaml drift."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.data_version import dvc_data_version
from tests.conftest import REPO, SMALL_SYNTHETIC

pytestmark = pytest.mark.slow
PROJECT_FILES = ["pipeline", "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore", "pyproject.toml"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    work = tmp_path / "repo"
    for name in PROJECT_FILES:
        src = REPO / name
        dst = work / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    _run(["git", "init", "-q"], work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    for item in SMALL_SYNTHETIC:  # a smaller synthetic set keeps this test quick
        key, _, value = item.partition("=")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def test_repro_twice_push_pull(repo_copy: Path) -> None:
    first = _run(["dvc", "repro"], repo_copy).stdout
    for stage in ("ingest", "index", "validate"):
        assert f"Running stage '{stage}'" in first
    assert "validation PASSED" in first
    second = _run(["dvc", "repro"], repo_copy).stdout
    assert "Running stage" not in second and "Data and pipelines are up to date." in second

    version = dvc_data_version("data/raw", repo_copy / "dvc.lock")
    assert version and version.endswith(".dir")
    assert _run(["pneumo", "data-version"], repo_copy).stdout.strip() == version

    _run(["dvc", "push"], repo_copy)
    assert (repo_copy / ".dvc-storage").is_dir()
    shutil.rmtree(repo_copy / "data")
    shutil.rmtree(repo_copy / ".dvc" / "cache")
    _run(["dvc", "pull"], repo_copy)
    counts = yaml.safe_load((repo_copy / "params.yaml").read_text())["data"]["synthetic"]["counts"]
    assert len(list((repo_copy / "data" / "raw").rglob("*.jpeg"))) == sum(sum(c.values()) for c in counts.values())
    assert "up to date" in _run(["dvc", "status"], repo_copy).stdout

    # A changed param reruns only what depends on it.
    _run(["dvc", "repro", "-q"], repo_copy)
    text = (repo_copy / "params.yaml").read_text().replace("val_fraction: 0.15", "val_fraction: 0.2")
    (repo_copy / "params.yaml").write_text(text)
    third = _run(["dvc", "repro"], repo_copy).stdout
    assert "Stage 'ingest' didn't change, skipping" in third
    assert "Running stage 'index'" in third and "Running stage 'validate'" in third


def test_dvc_yaml_is_generated_from_stage_list() -> None:
    """One DAG definition: the committed dvc.yaml must equal the one pipeline/stages.py generates."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "dvc-yaml", "--check"], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["ingest", "index", "validate"]
    assert all(spec["cmd"] == f"pneumo {name}" for name, spec in stages.items())
