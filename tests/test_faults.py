"""Faults planted in a copy of real data are caught, quarantined or reported by name."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import Params
from pipeline.core.errors import DataError
from pipeline.data import ingest, validation
from pipeline.data.dataset_index import read_index
from pipeline.steps import stages
from tests.conftest import REPO

pytestmark = pytest.mark.realdata


def _pipeline(source: Path, params_in: Callable[..., Params], *overrides: str) -> tuple[Params, pd.DataFrame]:
    params = params_in("data.source=local", f"data.local_path={source}", *overrides)
    ingest.ingest(params.data)
    stages.run_stage("index", params)
    return params, read_index(params.index.path)


def _check(report: validation.ValidationReport, name: str) -> validation.CheckResult:
    return next(c for c in report.checks if c.check == name)


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


@pytest.mark.parametrize(
    ("plant", "error"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), "truncated"),
        (lambda f: f.write_bytes(b""), "empty file (0 bytes)"),
        (lambda f: f.write_text("this is not an X-ray\n"), "UnidentifiedImageError"),
    ],
    ids=["truncated_jpeg", "zero_bytes", "text_named_jpeg"],
)
def test_broken_file_is_quarantined_and_named(
    real_copy: Path, params_in: Callable[..., Params], plant: Callable[[Path], object], error: str
) -> None:
    victim = _first(real_copy / "train" / "PNEUMONIA")
    plant(victim)
    rel = f"train/PNEUMONIA/{victim.name}"
    params, index = _pipeline(real_copy, params_in)  # ingest and index do not crash
    row = index.set_index("path").loc[rel]
    assert not row["decodable"] and error in row["error"]
    assert rel in Path(params.index.quarantine).read_text()
    # Within the tolerance the run goes on, the file is reported and kept out (training filters decodable).
    report = validation.validate(index, params.validation)
    assert report.success and report.quarantined == [{"path": rel, "error": row["error"]}]
    assert f"quarantined: {rel}" in report.summary()
    # With no tolerance the same file fails validation, by name.
    strict = params_in("validation.max_undecodable_fraction=0")
    report = validation.validate(index, strict.validation)
    check = _check(report, "every file decodes")
    assert not report.success and not check.success and check.examples == [rel]


def test_same_image_in_train_and_test(real_copy: Path, params_in: Callable[..., Params]) -> None:
    src = _first(real_copy / "test" / "NORMAL")
    shutil.copy2(src, real_copy / "train" / "NORMAL" / "IM-9999-0001.jpeg")  # new patient, same bytes
    params, index = _pipeline(real_copy, params_in)
    report = validation.validate(index, params.validation)
    check = _check(report, "no image (sha256) in two splits")
    assert not check.success and check.unexpected == 2
    assert set(check.examples) == {"train/NORMAL/IM-9999-0001.jpeg", f"test/NORMAL/{src.name}"}


def test_empty_files_in_two_splits_are_quarantined_not_a_shared_image(
    real_copy: Path, params_in: Callable[..., Params]
) -> None:
    """Two 0-byte files share a hash; they are no image, so they are quarantined, never "one image in two splits"."""
    for split in ("train", "test"):
        (real_copy / split / "NORMAL" / "IM-9998-0001.jpeg").write_bytes(b"")
    params, index = _pipeline(real_copy, params_in, "validation.max_undecodable_fraction=0.05")
    report = validation.validate(index, params.validation)
    assert len(report.quarantined) == 2 and _check(report, "no image (sha256) in two splits").success
    assert report.success, report.summary()


def test_a_file_name_without_its_patient_is_caught(real_copy: Path, params_in: Callable[..., Params]) -> None:
    """A renamed file is its own patient, so patient grouping cannot keep it with its siblings: validation names it,
    unless the data set is declared as named otherwise (validation.min_patient_in_name)."""
    victim = _first(real_copy / "train" / "PNEUMONIA")
    victim.rename(victim.with_name("scan-0001.jpeg"))
    params, index = _pipeline(real_copy, params_in)
    check = _check(validation.validate(index, params.validation), "patient id in the file name")
    assert not check.success and check.unexpected == 1 and check.examples == ["train/PNEUMONIA/scan-0001.jpeg"]
    lenient = params_in("validation.min_patient_in_name=0")
    assert _check(validation.validate(index, lenient.validation), "patient id in the file name").success


def test_one_patient_across_train_and_kept_val_folder(real_copy: Path, params_in: Callable[..., Params]) -> None:
    """With the official val folder kept as is (split.pool: [train]), a patient in both folders is a leak:
    val continues train's patient numbering."""
    _, clean = _pipeline(real_copy, params_in, "split.pool=[train]")  # a child the carve keeps in train
    kept = clean[(clean["split"] == "train") & (clean["label"] == "PNEUMONIA")].sort_values("path")
    src = real_copy / kept["path"].iloc[0]
    patient = src.name.split("_")[0]
    buf = io.BytesIO()
    Image.open(src).rotate(3).save(buf, "JPEG")  # a different image of the same patient
    planted = real_copy / "val" / "PNEUMONIA" / f"{patient}_bacteria_99999.jpeg"
    planted.write_bytes(buf.getvalue())
    params, index = _pipeline(real_copy, params_in, "split.pool=[train]")
    report = validation.validate(index, params.validation)
    check = _check(report, "no patient in two splits")
    assert not check.success
    assert f"val/PNEUMONIA/{planted.name}" in check.examples and f"train/PNEUMONIA/{src.name}" in check.examples
    assert _check(report, "no image (sha256) in two splits").success


def test_test_folder_numbers_its_own_patients(real_copy: Path, params_in: Callable[..., Params]) -> None:
    """The same patient id in train and test names two children (Kaggle's test/ numbers its own patients);
    a folder set to share train's numbering (index.patient_scopes) turns the same names into a leak."""
    src = _first(real_copy / "train" / "PNEUMONIA")
    patient = src.name.split("_")[0]
    buf = io.BytesIO()
    Image.open(src).rotate(3).save(buf, "JPEG")
    planted = real_copy / "test" / "PNEUMONIA" / f"{patient}_bacteria_99999.jpeg"
    planted.write_bytes(buf.getvalue())
    params, index = _pipeline(real_copy, params_in)
    assert index.loc[index["path"] == f"test/PNEUMONIA/{planted.name}", "patient_id"].item() == f"test/{patient}"
    assert _check(validation.validate(index, params.validation), "no patient in two splits").success
    params, index = _pipeline(real_copy, params_in, "index.patient_scopes={train: train, val: train, test: train}")
    check = _check(validation.validate(index, params.validation), "no patient in two splits")
    assert not check.success and f"test/PNEUMONIA/{planted.name}" in check.examples


def test_empty_class_folder(real_copy: Path, params_in: Callable[..., Params]) -> None:
    shutil.rmtree(real_copy / "test" / "NORMAL")
    (real_copy / "test" / "NORMAL").mkdir()
    params, index = _pipeline(real_copy, params_in)
    report = validation.validate(index, params.validation)
    check = _check(report, "minimum images per class per split")
    assert not report.success and check.examples == ["test/NORMAL"]
    assert not _check(report, "class ratio within bounds").success  # test is now 100% pneumonia
    with pytest.raises(DataError, match=r"^validation failed: minimum images per class per split \(1 rows\)"):
        stages.run_stage("validate", params)
    saved = json.loads(Path(params.validation.report).read_text())
    assert saved["success"] is False and saved["counts"]["test"]["NORMAL"] == 0


def test_cli_stops_on_failed_validation(real_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(real_copy / "test" / "PNEUMONIA")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO / "params.yaml", work)
    cli = [sys.executable, "-m", "pipeline.steps.cli", "-S", "data.source=local", "-S", f"data.local_path={real_copy}"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    for stage in ("ingest", "index"):
        subprocess.run([*cli, stage], cwd=work, check=True, capture_output=True, env=env)
    proc = subprocess.run([*cli, "validate"], cwd=work, capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: validation failed: ") and "class ratio within bounds" in last
    assert "x minimum images per class per split: 1 rows, e.g. test/PNEUMONIA" in proc.stdout
    assert last.endswith("see reports/validation.json") and (work / "reports" / "data_docs" / "index.html").is_file()
