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
        ("model.clahe=-1", "params.yaml: model.clahe: Input should be greater than or equal to 0"),
        ("model.clahe=2 model.equalize=true", "params.yaml: model.clahe: use it or model.equalize, not both"),
        ("model.clahe=2 model.image_size=96", "params.yaml: model.clahe: 2.0 on 8 x 8 tiles of 12 px (image_size 96)"),
        (
            "model.width=1.5 model.architecture=resnet50",
            "params.yaml: model.width: only the from-scratch architectures",
        ),
        ("model.width=0.1", "params.yaml: model.width: Input should be greater than or equal to 0.25"),
    ],
)
def test_bad_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", override.split(" "))
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


def test_registry_lock_url_validated_and_the_environment_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.core.config import LOCK_URL_ENV

    monkeypatch.delenv(LOCK_URL_ENV, raising=False)
    assert load_params(REPO / "params.yaml").registry.effective_lock_url() is None  # the lock file
    url = "postgresql://mlflow@db.example.org:5432/mlflow"
    registry = load_params(REPO / "params.yaml", [f"registry.lock_url={url}"]).registry
    assert registry.effective_lock_url() == url
    for bad, expected in [
        ("mysql://db/x", "must be a postgresql://user@host:port/database URL (got scheme 'mysql')"),
        ("postgresql:///x", "names no host"),
        ("postgresql://u:s3cret@db/x", "holds a password; keep credentials out of params.yaml"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_params(REPO / "params.yaml", [f"registry.lock_url={bad}"])
        assert str(err.value).removeprefix(f"{REPO}/").startswith(f"params.yaml: registry.lock_url: {expected}")
        assert "s3cret" not in str(err.value)
    monkeypatch.setenv(LOCK_URL_ENV, "postgresql://mlflow:s3cret@db.example.org/mlflow")  # a password is fine here
    assert registry.effective_lock_url() == "postgresql://mlflow:s3cret@db.example.org/mlflow"
    monkeypatch.setenv(LOCK_URL_ENV, "http://db.example.org")
    with pytest.raises(ConfigError, match=f"^{LOCK_URL_ENV}: must be a postgresql://"):
        registry.effective_lock_url()
