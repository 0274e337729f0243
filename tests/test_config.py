"""params.yaml schema: bad input gives one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import apply_overrides, load_params
from pipeline.core.errors import ConfigError
from tests.conftest import REPO


def test_repository_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "synthetic"
    assert 0 < params.split.val_fraction < 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.bogus=1", "params.yaml: data.bogus: unknown key"),
        ("split.seed=abc", "params.yaml: split.seed: Input should be a valid integer"),
        ("split.val_fraction=1.5", "params.yaml: split.val_fraction: Input should be less than 1 (got 1.5)"),
        ("data.source=ftp", "params.yaml: data.source: Input should be 'synthetic', 'local' or 'kaggle'"),
        ("data.source=local", "params.yaml: data.local_path: must be set when data.source is 'local'"),
        ("validation.width.min=5000", "params.yaml: validation.width.min: 5000.0 must not exceed max"),
        ("data.synthetic.counts.train.normal=-1", "params.yaml: data.synthetic.counts.train.normal: Input should be"),
    ],
)
def test_bad_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", [override])
    assert str(err.value).removeprefix(f"{REPO}/").startswith(expected)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_params(bad)


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "d.e=x"])
    assert raw == {"a": {"b": 2, "c": [1, 2]}, "d": {"e": "x"}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])


def test_cli_prints_one_line_and_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.steps.cli", "-S", "split.seed=abc", "index"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: split.seed: Input should be a valid integer, unable to parse string as an integer "
        "(got 'abc')"
    ]


@pytest.mark.parametrize("command", ["ingest", "index", "validate", "data-version", "dvc-yaml"])
def test_every_subcommand_has_help(command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.steps.cli", command, "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert f"usage: pneumo {command}" in proc.stdout
