"""The package's shape holds: layers import downward only, and the CLI starts without the heavy libraries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's packages before the installed ones
    return subprocess.run([str(LINT_IMPORTS)], cwd=root, capture_output=True, text=True, env=env)


def test_layers_import_downward_only() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    for name in ("pipeline", "flows", "pyproject.toml"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    naming = tmp_path / "pipeline" / "data" / "naming.py"
    naming.write_text(naming.read_text() + "\nfrom pipeline.serving import classifier  # noqa: E402, F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "pipeline.data.naming -> pipeline.serving.classifier" in result.stdout


def test_cli_help_loads_no_heavy_library() -> None:
    code = (
        "import sys; from pipeline.steps import cli; cli.build_parser().format_help(); "
        "heavy = ('tensorflow', 'keras', 'mlflow', 'great_expectations', 'prefect'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
