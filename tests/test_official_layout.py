"""The official Kaggle archive's layout (5,216 / 16 / 624, test numbering its own patients) runs end to end.

Built from ../shared/data by `build_official_layout`: its test images are shared images re-encoded
under the official test names, so their bytes are unique but their content is not: this checks the
pipeline's handling of the layout, not the model's accuracy on the official test split.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import Params
from pipeline.data import ingest, naming, validation
from pipeline.data.dataset_index import read_index
from pipeline.steps import stages
from tests.conftest import FAST_TRAIN, OFFICIAL_TEST_NAMES
from tests.projects import copy_project, run

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _check(report: validation.ValidationReport, name: str) -> validation.CheckResult:
    return next(c for c in report.checks if c.check == name)


def test_official_layout_runs_every_stage_with_dvc(official_layout: Path, tmp_path: Path) -> None:
    project = copy_project(
        tmp_path / "project",
        *FAST_TRAIN,
        "train.epochs=1",
        "train.max_images_per_split=400",
        "data.source=local",
        f"data.local_path={official_layout}",
        "package.reference_images=50",
        "registry.sensitivity_floor=0",  # a one-epoch model: this run checks the layout, not the model
    )
    out = run(["dvc", "repro"], project).stdout
    for stage in ("source", "ingest", "index", "validate", "shard", "train", "evaluate", "stress", "register"):
        assert f"Running stage '{stage}'" in out
    assert "validation PASSED" in out

    index = read_index(project / "data" / "index.parquet")
    assert index.groupby("official_split").size().to_dict() == {"train": 5216, "val": 16, "test": 624}
    test = index[index["split"] == "test"]
    official = {line.strip() for line in OFFICIAL_TEST_NAMES.read_text().splitlines() if line.strip()}
    assert set(test["path"]) == official and (test["official_split"] == "test").all()  # untouched
    assert test.groupby("label").size().to_dict() == {"NORMAL": 234, "PNEUMONIA": 390}
    # 170-odd ids occur in both train and test folders, as in the real archive: different children.
    raw = index.assign(raw=index["path"].map(lambda p: naming.patient_id(Path(p).name)))
    both = set(raw.loc[raw["official_split"] == "train", "raw"]) & set(raw.loc[raw["official_split"] == "test", "raw"])
    assert len(both) > 100
    assert index.groupby("patient_id")["split"].nunique().max() == 1

    report = json.loads((project / "reports" / "validation.json").read_text())
    assert report["success"] and report["counts"]["test"] == {"NORMAL": 234, "PNEUMONIA": 390}
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["n"]["test"] == 624
    assert json.loads((project / "reports" / "champion.json").read_text())["version"] == "1"


def _index(source: Path, params_in: Callable[..., Params], *overrides: str) -> tuple[Params, pd.DataFrame]:
    params = params_in("data.source=local", f"data.local_path={source}", *overrides)
    ingest.ingest(params.data)
    stages.run_stage("index", params)
    return params, read_index(params.index.path)


def test_planted_leaks_in_the_official_layout_are_caught(
    official_layout: Path, tmp_path: Path, params_in: Callable[..., Params]
) -> None:
    """The same image in train and test, and one patient split between train and a kept val folder."""
    layout = Path(shutil.copytree(official_layout, tmp_path / "planted"))
    train_image = sorted((layout / "train" / "NORMAL").iterdir())[0]
    victim = sorted((layout / "test" / "NORMAL").iterdir())[5]
    shutil.copy2(train_image, victim)  # an official test name holding a train image's bytes
    # A child the patient-grouped carve keeps in train (the carve ignores a val folder outside split.pool).
    _, clean = _index(layout, params_in, "split.pool=[train]")
    kept = clean[(clean["split"] == "train") & (clean["label"] == "PNEUMONIA")].sort_values("path")
    src = layout / kept["path"].iloc[0]
    buf = io.BytesIO()
    Image.open(src).rotate(3).save(buf, "JPEG")  # another image of the same child
    planted = layout / "val" / "PNEUMONIA" / f"{src.name.split('_')[0]}_bacteria_99999.jpeg"
    planted.write_bytes(buf.getvalue())

    params, index = _index(layout, params_in, "split.pool=[train]")  # the official val folder kept as val
    report = validation.validate(index, params.validation)
    assert not report.success
    image = _check(report, "no image (sha256) in two splits")
    assert not image.success and image.unexpected == 2
    assert set(image.examples) == {f"train/NORMAL/{train_image.name}", f"test/NORMAL/{victim.name}"}
    patient = _check(report, "no patient in two splits")
    assert not patient.success
    assert f"val/PNEUMONIA/{planted.name}" in patient.examples and f"train/PNEUMONIA/{src.name}" in patient.examples
