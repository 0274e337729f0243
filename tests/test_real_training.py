"""The compact CNN really learns pneumonia on the real images (../shared/data/chest_xray_224).

The session's `real_champion` runs every stage on the real data: low resolution (64 px) and four
epochs keep training to about 80 s on 2 CPU cores. The shared test split holds patients of the
official train split (see ../shared/data/README.md), so this is not the official test set of the
published figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.modeling.evaluation import Evaluation
from tests.conftest import Champion

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_compact_cnn_reaches_auc_090_on_real_test(real_champion: Champion) -> None:
    ev = Evaluation.from_dict(json.loads(Path(real_champion.params.evaluate.metrics).read_text()))
    train = json.loads((real_champion.root / "reports" / "train.json").read_text())
    print(f"\nreal data, compact CNN 64 px, {train['epochs']} epochs, {train['train_seconds']:.0f} s:\n{ev.summary()}")
    assert ev.n["test"] == 790
    assert ev.test.roc_auc >= 0.90
    assert ev.val.sensitivity >= 0.95  # the threshold meets its target where it was chosen


def test_champion_holds_up_on_the_shift_stress_set(real_champion: Champion) -> None:
    """The stress stage: intensity, contrast, gamma, resolution, border and crop changes of the shared test
    images, and the 48 full-resolution originals, each scored as served (calibration and threshold)."""
    from mlflow import MlflowClient

    from pipeline.data.stress import AGAINST_CLASS, SETS

    report = json.loads((real_champion.root / real_champion.params.stress.report).read_text())
    sets = report["sets"]
    for name, v in sets.items():
        print(f"{name:<20} n={v['images']:<3} ROC AUC {v['roc_auc']:.3f}  sens {v['sensitivity']:.3f}  "
              f"spec {v['specificity']:.3f}")  # fmt: skip
    assert set(sets) == {*SETS, "fullres"}
    assert sets["fullres"]["images"] == 48 and all(v["images"] == 60 for k, v in sets.items() if k != "fullres")
    aucs = np.array([v["roc_auc"] for v in sets.values()])
    assert np.isclose(report["summary"]["roc_auc_min"], aucs.min(), atol=1e-4)
    # The aspect sets measure the stretch shortcut, which the default model has (docs/robustness.md: specificity
    # 0.27-0.45 on normal images framed as wider originals, ranking 0.52-0.73 with the frame's shape against the
    # class, aspect_against_class); they are reported, not guarded.
    specs = np.array([v["specificity"] for k, v in sets.items() if not k.startswith("aspect_")])
    ranked = np.array([v["roc_auc"] for k, v in sets.items() if k != AGAINST_CLASS])
    # Measured once each (64 px, 4 epochs): standardize off, AUC min 0.950 and specificity mean 0.678 (0.000
    # on the darker set); on (the default), AUC min 0.978 and specificity mean 0.974. Guards with margin:
    assert ranked.min() >= 0.85 and ranked.mean() >= 0.95, ranked
    assert specs.mean() >= 0.80, specs  # the registered threshold still clears normals
    # The figures travel with the version: its MLflow run and its model card.
    client = MlflowClient(real_champion.tracking_uri)
    version = client.get_model_version_by_alias(real_champion.name, "champion")
    run = client.get_run(version.run_id)
    assert np.isclose(run.data.metrics["stress_roc_auc_min"], aucs.min(), atol=1e-4)
    card = (real_champion.root / real_champion.params.train.model_dir / "model_card.md").read_text()
    assert "## Robustness to acquisition shift" in card and "| fullres | 48 |" in card
