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


def test_champion_holds_up_on_the_shift_stress_set(real_champion: Champion, real_224: Path, tmp_path: Path) -> None:
    """Intensity, contrast, gamma, resolution, border and crop changes, and the full-resolution originals:
    scored as served, each like an external data set."""
    from pipeline.data.stress import TRANSFORMS, build_stress_set
    from pipeline.serving import classifier, scoring
    from tests.conftest import REAL_FULLRES

    counts = build_stress_set(real_224 / "test", tmp_path / "stress", per_class=30, fullres=REAL_FULLRES)
    model = classifier.load(real_champion.uri, real_champion.tracking_uri)
    aucs, specs = {}, {}
    for name in counts:
        result = scoring.score(model, scoring.labelled_files(tmp_path / "stress" / name), bootstrap=0)
        t = result.at_threshold
        aucs[name], specs[name] = t.roc_auc, t.specificity
        print(f"{name:<16} n={result.n:<3} ROC AUC {t.roc_auc:.3f}  sens {t.sensitivity:.3f}  spec {t.specificity:.3f}")
    assert set(counts) == {*TRANSFORMS, "fullres"}
    # Measured once each (64 px, 4 epochs): standardize off, AUC min 0.950 and specificity mean 0.678 (0.000
    # on the darker set); on (the default), AUC min 0.978 and specificity mean 0.974. Guards with margin:
    assert min(aucs.values()) >= 0.85 and float(np.mean(list(aucs.values()))) >= 0.95, aucs
    assert float(np.mean(list(specs.values()))) >= 0.80, specs  # the registered threshold still clears normals
