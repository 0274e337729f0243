"""The embedded synthetic data set: deterministic, and learnable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupShuffleSplit

from pipeline.core.config import load_params
from pipeline.data import synthetic
from tests.conftest import REPO


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpeg"))
    }


def _params(*overrides: str) -> synthetic.SyntheticParams:
    small = [
        "data.synthetic.counts={train: {normal: 12, bacteria: 8, virus: 6}, test: {normal: 4, bacteria: 2, virus: 2}}"
    ]
    return load_params(REPO / "params.yaml", small + list(overrides)).data.synthetic


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    assert synthetic.generate(_params(), tmp_path / "a") == 34
    synthetic.generate(_params(), tmp_path / "b")
    synthetic.generate(_params("data.synthetic.seed=8"), tmp_path / "c")
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert len(a) == 34 and a == b
    assert len(c) == 34 and a != c


def test_names_carry_patients_and_subtypes() -> None:
    items = list(synthetic.plan(_params()))
    assert {i.subtype for i in items} == {"none", "bacteria", "virus"}
    assert any(i.filename.startswith("NORMAL2-IM-") for i in items)
    assert all(i.filename.startswith(f"person{i.patient}_{i.subtype}_") for i in items if i.label == "PNEUMONIA")
    by_split: dict[str, set[int]] = {}
    for i in items:
        by_split.setdefault(i.split, set()).add(i.patient)
    assert not by_split["train"] & by_split["test"]
    assert len({i.filename for i in items}) == len(items)


def test_classes_are_learnable_by_a_linear_model() -> None:
    """Logistic regression on 32x32 pixels, split by patient: far above chance for both tasks."""
    p = _params(
        "data.synthetic.counts={train: {normal: 150, bacteria: 100, virus: 100}}", "data.synthetic.image_size=64"
    )
    items = list(synthetic.plan(p))
    x = np.stack([synthetic.render(i, 64)[::2, ::2].ravel() / 255.0 for i in items])
    kind = np.array([i.subtype for i in items])
    groups = np.array([i.patient for i in items])
    train, test = next(GroupShuffleSplit(n_splits=1, test_size=0.3, random_state=0).split(x, kind, groups))
    binary = kind != "none"
    acc_binary = LogisticRegression(max_iter=2000).fit(x[train], binary[train]).score(x[test], binary[test])
    acc_three = LogisticRegression(max_iter=2000).fit(x[train], kind[train]).score(x[test], kind[test])
    majority = max(np.mean(binary[test]), 1 - np.mean(binary[test]))
    assert acc_binary >= 0.85 > majority + 0.1, (acc_binary, majority)
    assert acc_three >= 0.6, acc_three  # three classes: chance is about 0.43
