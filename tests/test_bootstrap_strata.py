"""bootstrap_ci resamples within strata of the patient's class: every resample has both classes (none dropped),
each stratum keeps its patient count, a patient's images still move together, the intervals still cover the
point estimate, and the draws depend on the seed only."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.modeling import metrics
from pipeline.modeling.metrics import binary_metrics, bootstrap_ci


def test_a_rare_positive_patient_is_in_every_resample() -> None:
    """One positive patient of eight: drawn at random, (7/8)^8 = 34% of the resamples would miss it."""
    patients = np.repeat([f"p{i}" for i in range(8)], 3)
    y = (patients == "p5").astype(int)
    s = np.where(y == 1, 0.8, np.linspace(0.1, 0.6, y.size))
    ci = bootstrap_ci(y, s, 0.5, n=500, seed=2, groups=patients)
    assert ci.kept == ci.drawn == 500 and set(ci) == {"roc_auc", "sensitivity", "specificity"}
    assert bootstrap_ci(y, s, 0.5, n=500, seed=2, groups=patients) == ci  # seeded
    # Another seed draws other resamples (seen in the normal patients' specificity, which varies by resample).
    assert any(bootstrap_ci(y, s, 0.5, n=500, seed=k, groups=patients) != ci for k in (3, 4, 5))
    # One pneumonia patient: the interval is conditional on that child, and the summary says so.
    assert ci.fewest == 1 and "only 1 patient in one class" in metrics.interval_method(ci, 8)


# Ten patients: three with pneumonia only (1-3 images), five normal only, two with images of both classes.
PATIENTS = {
    "a": [1], "b": [1, 1], "c": [1, 1, 1],
    "d": [0], "e": [0, 0], "f": [0], "g": [0, 0, 0], "h": [0],
    "m1": [0, 1], "m2": [1, 0, 0],
}  # fmt: skip
STRATA = {"pneumonia": ["a", "b", "c"], "normal": ["d", "e", "f", "g", "h"], "mixed": ["m1", "m2"]}


def test_each_stratum_keeps_its_patient_count_and_a_patient_moves_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = np.array([p for p, labels in PATIENTS.items() for _ in labels])
    y = np.array([label for labels in PATIENTS.values() for label in labels])
    s = np.arange(y.size) / y.size  # each image's own score: a resample's scores say which images it holds
    resamples: list[np.ndarray] = []

    def auc(yt: np.ndarray, ys: np.ndarray) -> float:
        resamples.append(np.rint(np.asarray(ys) * y.size).astype(int))
        return 0.5

    monkeypatch.setattr(metrics, "skm", SimpleNamespace(roc_auc_score=auc))
    ci = bootstrap_ci(y, s, 0.5, n=300, seed=0, groups=groups)
    assert ci.kept == ci.drawn == 300 and len(resamples) == 300
    for images in resamples:
        counts = np.bincount(images, minlength=y.size)
        assert set(y[images]) == {0, 1}
        draws = {}
        for patient in PATIENTS:
            mine = counts[groups == patient]
            assert (mine == mine[0]).all(), f"{patient}'s images drawn apart: {mine}"  # all of them, together
            draws[patient] = int(mine[0])
        for stratum, members in STRATA.items():
            assert sum(draws[p] for p in members) == len(members), (stratum, draws)


def test_a_patient_with_both_classes_is_its_own_stratum() -> None:
    """The only pneumonia image is one of patient x's two (x has a normal one too): x is drawn in every
    resample (the mixed stratum of one), where at random (5/6)^6 = 33% of the resamples would miss x."""
    groups = np.array(["x", "x", "n1", "n2", "n3", "n4", "n5"])
    y = np.array([0, 1, 0, 0, 0, 0, 0])
    ci = bootstrap_ci(y, np.array([0.2, 0.7, 0.6, 0.4, 0.1, 0.3, 0.5]), 0.5, n=200, seed=0, groups=groups)
    assert ci.kept == ci.drawn == 200 and ci["sensitivity"] == (1.0, 1.0)


def test_intervals_cover_the_point_estimate_on_a_realistic_set() -> None:
    """150 children, 1-4 images each, about 3:1 pneumonia like the Kaggle test split, a few with images of both
    classes; scores share a per-child effect (images of one child are alike)."""
    rng = np.random.default_rng(7)
    children = 150
    label = (rng.random(children) < 0.72).astype(int)
    sizes = rng.integers(1, 5, children)
    effect = rng.normal(0, 0.8, children)
    groups = np.repeat([f"c{i}" for i in range(children)], sizes)
    y = np.repeat(label, sizes)
    mixed = rng.choice(np.flatnonzero(sizes > 1), 6, replace=False)
    for child in mixed:  # one image of the other class
        y[np.flatnonzero(groups == f"c{child}")[0]] ^= 1
    z = 1.5 * (2 * y - 1) + np.repeat(effect, sizes) + rng.normal(0, 0.5, y.size)
    s = 1 / (1 + np.exp(-z))
    point = binary_metrics(y, s, 0.5)
    ci = bootstrap_ci(y, s, 0.5, n=400, seed=0, groups=groups)
    assert ci.kept == ci.drawn == 400
    for key in ("roc_auc", "sensitivity", "specificity"):
        lo, hi = ci[key]
        assert lo < getattr(point, key) < hi and 0.01 < hi - lo < 0.3, (key, lo, hi, getattr(point, key))
