"""The saved model and its metadata: a pair, or a clear refusal."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.core import atomic
from pipeline.core.errors import PipelineError
from pipeline.modeling import model_store


def _model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])


def test_a_save_cut_between_its_two_renames_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_store.save(_model(0), tmp_path, {"threshold_of": "first"})
    loaded, metadata = model_store.load(tmp_path)
    assert metadata["threshold_of"] == "first" and len(metadata[model_store.HASH_KEY]) == 64
    first_weights = loaded.get_weights()
    replace = os.replace

    def killed(src: str, dst: str) -> None:  # the metadata lands, the model's rename never happens
        if str(dst).endswith(model_store.MODEL_FILE):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        model_store.save(_model(1), tmp_path, {"threshold_of": "second"})
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(PipelineError, match=r"metadata\.json: describes another model than .*model\.keras"):
        model_store.load(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json", "model.keras"]  # no temporary left
    model_store.save(_model(1), tmp_path, {"threshold_of": "second"})  # trained again: a pair again
    loaded, metadata = model_store.load(tmp_path)
    assert metadata["threshold_of"] == "second"
    assert not all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), first_weights, strict=True))
