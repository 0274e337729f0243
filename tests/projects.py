"""A project folder (the repository's code and params.yaml, with overrides) for real DVC runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.core.config import write_overrides
from tests.conftest import REPO

PROJECT_FILES = [
    "pipeline",
    "flows",
    "params.yaml",
    "dvc.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
]


def run(args: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command with the venv's tools first on PATH and MLflow's URI from params, not the environment."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=full_env)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def write_params(work: Path, *overrides: str) -> None:
    """Overrides into the project's params.yaml, comments kept (as a deployment run writes them)."""
    if overrides:
        write_overrides(work / "params.yaml", list(overrides))


def copy_project(work: Path, *overrides: str) -> Path:
    """The project's files in `work`, params.yaml with `overrides`, as a fresh git repository."""
    for name in PROJECT_FILES:
        src, dst = REPO / name, work / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    write_params(work, *overrides)
    run(["git", "init", "-q"], work)
    return work
