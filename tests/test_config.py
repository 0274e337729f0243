"""params.yaml schema: bad input gives one line naming the key."""

from __future__ import annotations

import os
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


def test_a_key_left_out_of_params_yaml_gets_the_value_params_yaml_documents() -> None:
    """The schema's defaults are params.yaml's values (the data source and validation limits aside, which
    must be written): a params file that omits a key trains the model the README describes."""
    import yaml

    from pipeline.core.config import Params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    written = Params.model_validate(raw).model_dump()
    defaults = Params.model_validate({k: raw[k] for k in ("data", "validation")}).model_dump()
    assert written == defaults


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.bogus=1", "params.yaml: data.bogus: unknown key"),
        ("split.seed=abc", "params.yaml: split.seed: Input should be a valid integer"),
        ("split.seed=-1", "params.yaml: split.seed: Input should be greater than or equal to 0 (got -1)"),
        ("train.seed=4294967296", "params.yaml: train.seed: Input should be less than or equal to 4294967295"),
        ("split.val_fraction=1.5", "params.yaml: split.val_fraction: Input should be less than 1 (got 1.5)"),
        ("data.source=ftp", "params.yaml: data.source: Input should be 'synthetic', 'local' or 'kaggle'"),
        ("data.source=local", "params.yaml: data.local_path: must be set when data.source is 'local'"),
        ("data.local_path=/data/x.zip", "params.yaml: data.local_path: set, but data.source is 'synthetic' (set"),
        ("index.patient_scopes.val=trian", "params.yaml: index.patient_scopes.val: Input should be 'train', 'val'"),
        ("registry.model_name=a/b", "params.yaml: registry.model_name: String should match pattern '^[^/:]+$' (got"),
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
        (
            "model.architecture=resnet50 train.fine_tune_epochs=0 train.mixup=0.2",
            "params.yaml: train.mixup: 0.2 would do nothing: the head trains on cached backbone features",
        ),
        (
            "model.architecture=resnet50 train.fine_tune_epochs=0 train.augment.class_aspect=0.3",
            "params.yaml: train.augment.class_aspect: 0.3 would do nothing",
        ),
        (
            "model.architecture=resnet50 model.lung_crop=true model.lung_crop_jitter=0.1",
            "params.yaml: model.lung_crop_jitter: 0.1 would do nothing",
        ),
        ("model.lung_crop_jitter=0.1", "params.yaml: model.lung_crop_jitter: 0.1 moves the lung-field box: set model"),
        ("train.fine_tune_epochs=3", "params.yaml: train.fine_tune_epochs: 3 would do nothing: compact_cnn trains"),
    ],
)
def test_bad_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", override.split(" "))
    assert str(err.value).removeprefix(f"{REPO}/").startswith(expected)
    assert "\n" not in str(err.value)


def test_image_levers_are_allowed_where_batches_see_them() -> None:
    for allowed in (
        ["model.architecture=resnet50", "train.fine_tune_epochs=0", "train.mixup=0.2", "train.cache_features=false"],
        ["model.architecture=resnet50", "train.fine_tune_epochs=2", "train.mixup=0.2"],
        ["train.mixup=0.2", "train.augment.class_aspect=0.3"],  # the compact CNN: always images
    ):
        load_params(REPO / "params.yaml", allowed)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_params(bad)


def test_params_are_read_as_dvc_reads_them(tmp_path: Path) -> None:
    """YAML 1.2, as DVC's ruamel reads params.yaml: a key given twice is an error naming its line (PyYAML kept
    the last one, so `pneumo` ran with a value `dvc repro` refused), and 1e-3, yes and 010 mean the same to both."""
    from dvc.utils.serialize import parse_yaml

    text = (REPO / "params.yaml").read_text()
    doubled = tmp_path / "params.yaml"
    doubled.write_text(text.replace("split:\n", "split:\n  val_fraction: 0.3\n", 1))
    with pytest.raises(
        ConfigError, match=r'params.yaml: line \d+ is not valid YAML \(found duplicate key "val_fraction"'
    ):
        load_params(doubled)
    doubled.write_text(text.replace("split:\n", "split:\n  seed: |\n    one\n    two\n", 1))  # a block value
    with pytest.raises(ConfigError, match=r"found duplicate key \"seed\" .*\"one two \"") as caught:
        load_params(doubled)
    assert "\n" not in str(caught.value)
    same = "a: 1e-3\nb: yes\nc: 010\n"
    assert (
        apply_overrides({}, ["a=1e-3", "b=yes", "c=010"])
        == parse_yaml(same, "x.yaml")
        == {"a": 0.001, "b": "yes", "c": 10}
    )


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "d.e=x"])
    assert raw == {"a": {"b": 2, "c": [1, 2]}, "d": {"e": "x"}}
    # Text YAML cannot parse is the string it is (a path starting with @ or *), for the schema to judge
    assert apply_overrides({}, ["a.b=@x.zip", "a.c=*", "a.d=["]) == {"a": {"b": "@x.zip", "c": "*", "d": "["}}
    params = load_params(REPO / "params.yaml", ["data.source=local", "data.local_path=@scans.zip"])
    assert params.data.local_path == "@scans.zip"
    with pytest.raises(ConfigError, match=r"params.yaml: split.seed: Input should be a valid integer"):
        load_params(REPO / "params.yaml", ["split.seed=["])
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


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--params", "."], "error: .: cannot read the params file (Is a directory)"),
        (["predict", "x.png", "--batch-size", "-1"], "error: pneumo predict: batch_size: Input should be greater than"),
        (["predict", "x.png", "--batch-size", "0"], "error: pneumo predict: batch_size: Input should be greater than"),
        (["predict", "x.png", "-o", "."], "error: -o .: is a folder; name the .csv or .json file to write"),
        (["drift", "x.png", "-o", "."], "error: -o .: is a folder; name the .json file to write"),
        (["predict", "x1.png", "-o", "x2.PNG"], "error: -o x2.PNG: name a .csv or .json file (the report written"),
        (["drift", "x.png", "-o", "report.csv"], "error: -o report.csv: name a .json file (the report written there)"),
        (["external-validation", ".", "-o", "params.yaml/r"], f"error: -o params.yaml/r: {REPO}/params.yaml is a file"),
        (["predict", "x.png", "-o", "params.yaml/out.csv"], f"error: -o params.yaml/out.csv: {REPO}/params.yaml is a"),
        (["drift", "x.png", "-o", "params.yaml/d.json"], f"error: -o params.yaml/d.json: {REPO}/params.yaml is a file"),
        (
            ["predict", "x.png", "--explain", "params.yaml/h"],
            f"error: --explain params.yaml/h: {REPO}/params.yaml is a",
        ),
        (["predict", "x.png", "--model", "models:/pneumo@"], "error: models:/pneumo@: expected models:/NAME@ALIAS or"),
        (["predict", "x.png", "--model", "no model/v1"], "error: no model/v1: no such model folder"),
        (["serve", "--port", "70000"], "error: pneumo serve: port: Input should be less than or equal to 65535"),
        (["serve", "--poll-seconds", "-1"], "error: pneumo serve: poll_seconds: Input should be greater than 0"),
        (["serve", "--max-upload-mb", "0"], "error: pneumo serve: max_upload_mb: Input should be greater than 0"),
    ],
)
def test_bad_command_line_values_fail_before_any_work(args: list[str], expected: str) -> None:
    """Flags outside the schema's ranges are refused in one line before a model is loaded (none exists here:
    the model URI would fail later, and differently), and never loop or bind."""
    if args[0] == "--params":
        args = [*args, "show"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.steps.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_an_unforeseen_exception_is_one_line_and_not_a_validation_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1 means "validation failed" to the flows: a crash must not say that, with -v (traceback) or not."""
    from pipeline.steps import cli, commands

    def crash(args: object, params: object) -> int:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(commands, "run", crash)
    assert cli.main(["show"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: RuntimeError: disk on fire (run with -v for the traceback)"]
    for name in ("PNEUMO_VERBOSE", "TF_CPP_MIN_LOG_LEVEL"):  # -v sets them for the process: restored after the test
        monkeypatch.setenv(name, os.environ.get(name, "0"))
    assert cli.main(["-v", "show"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: RuntimeError")


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


def test_sigterm_ends_an_open_mlflow_run_as_failed(tmp_path: Path) -> None:
    """A stopped worker or container gets SIGTERM: pneumo takes it as Ctrl-C, so its MLflow run is not left
    RUNNING (the default action would end the process where it stands)."""
    script = f"""
import os, signal, time, mlflow
from pipeline.steps import cli
cli.stop_on_sigterm()
mlflow.set_tracking_uri("sqlite:///{tmp_path / "m.db"}")
try:
    with mlflow.start_run() as run:
        print(run.info.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
except KeyboardInterrupt:
    raise SystemExit(130)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr[-2000:]
    from mlflow import MlflowClient

    run_id = done.stdout.split()[-1]
    assert MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(run_id).info.status == "FAILED"
