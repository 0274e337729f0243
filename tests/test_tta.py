"""Test-time augmentation: the views' geometry, the averaging, and the views travelling with the model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.core.config import Params
from pipeline.core.errors import ConfigError
from pipeline.data.dataset_index import read_index
from pipeline.modeling import evaluation, model_store, tta
from pipeline.modeling import inputs as dp
from pipeline.modeling.evaluation import Evaluation
from pipeline.modeling.metrics import apply_temperature, class_probabilities
from pipeline.modeling.models import build_model
from pipeline.registry import packaging
from pipeline.serving.classifier import Classifier, ModelInfo
from pipeline.serving.predict import prepared_batches
from tests.conftest import Champion

SIZE = 32


def _shifted(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`x` (n, s, s, c) with its content moved dx pixels right and dy down, the uncovered margin black."""
    out = np.zeros_like(x)
    s = x.shape[1]
    out[:, max(dy, 0) : s + min(dy, 0), max(dx, 0) : s + min(dx, 0)] = x[
        :, max(-dy, 0) : s + min(-dy, 0), max(-dx, 0) : s + min(-dx, 0)
    ]
    return out


def test_view_counts_and_descriptions() -> None:
    assert tta.Views().count == 1 and not tta.Views().enabled and tta.Views().describe() == "none"
    assert tta.Views(shift=0.05).count == 5 and tta.Views(zoom=0.1).count == 3
    both = tta.Views(0.05, 0.1)
    assert both.count == 7 and both.transforms(SIZE).shape == (6, 8)
    assert both.describe() == "7 views (shifts of 0.05, zoom of 0.1)"


def test_shift_views_move_the_content_by_whole_pixels() -> None:
    x = np.zeros((1, SIZE, SIZE, 1), np.float32)
    x[0, 10, 12, 0] = 200.0
    views = np.asarray(tta.views_of(tf.constant(x), tta.Views(shift=4 / SIZE)))
    expected = [_shifted(x, 4, 0), _shifted(x, -4, 0), _shifted(x, 0, 4), _shifted(x, 0, -4)]
    np.testing.assert_allclose(views, np.concatenate(expected), atol=1e-4)
    assert views[0, 10, 16, 0] == pytest.approx(200.0)  # right by 4 px


def test_zoom_views_enlarge_and_shrink_about_the_centre() -> None:
    x = np.zeros((1, SIZE, SIZE, 1), np.float32)
    x[0, 12:20, 12:20, 0] = 100.0  # an 8 px square in the middle
    zoom_in, zoom_out = np.asarray(tta.views_of(tf.constant(x), tta.Views(zoom=0.25)))
    lit_in, lit_out = (zoom_in[..., 0] > 50).sum(), (zoom_out[..., 0] > 50).sum()
    assert lit_in > 64 * 1.5 and lit_out < 64 / 1.3  # 1/0.75 and 1/1.25 times the side
    assert zoom_in[16, 16, 0] == pytest.approx(100.0) and zoom_out[16, 16, 0] == pytest.approx(100.0)
    flat = np.full((1, SIZE, SIZE, 1), 100.0, np.float32)
    _, flat_out = np.asarray(tta.views_of(tf.constant(flat), tta.Views(zoom=0.25)))
    assert flat_out[0, 0, 0] == 0.0 and flat_out[SIZE // 2, SIZE // 2, 0] == pytest.approx(100.0)  # black margin


@pytest.mark.parametrize("n_classes", [2, 3])
def test_predictor_averages_the_model_over_the_views(n_classes: int) -> None:
    keras.utils.set_random_seed(3)
    model = build_model("compact_cnn", SIZE, n_classes=n_classes).model
    x = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 1)).astype(np.float32)
    views = tta.Views(shift=4 / SIZE)
    shifted = [x] + [_shifted(x, dx, dy) for dx, dy in ((4, 0), (-4, 0), (0, 4), (0, -4))]
    expected = np.mean([model.predict(v, verbose=0) for v in shifted], axis=0)
    got = np.asarray(tta.predictor(model, views, SIZE)(tf.constant(x)))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, model.predict(x, verbose=0), atol=1e-6)  # the views changed something


def test_classifier_averages_its_views_and_keeps_them_in_the_bundle(tmp_path: Path) -> None:
    keras.utils.set_random_seed(5)
    built = build_model("compact_cnn", SIZE)
    built.model.save(tmp_path / "model.keras")
    info = ModelInfo(
        0.5, ("NORMAL", "PNEUMONIA"), SIZE, "binary", "compact_cnn", built.last_conv, temperature=2.0, tta_shift=0.125
    )
    packaging.write_bundle(tmp_path / "bundle", tmp_path / "model.keras", info)
    loaded = Classifier.from_bundle(tmp_path / "bundle")
    assert loaded.views == tta.Views(shift=0.125)
    x = np.random.default_rng(1).uniform(0, 255, (4, SIZE, SIZE, 1)).astype(np.float32)
    shifted = [x] + [_shifted(x, dx, dy) for dx, dy in ((4, 0), (-4, 0), (0, 4), (0, -4))]
    mean = np.mean([built.model.predict(v, verbose=0) for v in shifted], axis=0)
    expected = class_probabilities(apply_temperature(mean.astype(np.float64), 2.0, 0.0))
    np.testing.assert_allclose(loaded.probabilities(x), expected, atol=1e-5)
    plain = Classifier(built.model, ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), SIZE, "binary", "c", built.last_conv))
    np.testing.assert_allclose(loaded.embed(x), plain.embed(x), atol=1e-6)  # drift/OOD see the image as given


def test_tta_settings_are_checked(params_in: Callable[..., Params]) -> None:
    assert params_in("evaluate.tta.shift=0.05").evaluate.tta.shift == 0.05
    with pytest.raises(ConfigError, match=r"evaluate\.tta\.zoom"):
        params_in("evaluate.tta.zoom=0.7")


@pytest.mark.realdata
@pytest.mark.slow
def test_evaluation_and_serving_agree_on_the_views(real_champion: Champion) -> None:
    """The session's real model evaluated with views: the threshold and calibration are fitted on the
    averages, recorded with the evaluation, and a classifier built from it predicts the same probabilities
    for the test images as the evaluation scored."""
    params: Params = real_champion.params
    model, metadata = model_store.load(params.train.model_dir)
    index = read_index(params.index.path)
    val, test = (dp.split_data(index, split, params.data.root, params.task) for split in ("val", "test"))
    size, views = params.model.image_size, tta.Views(shift=0.05, zoom=0.1)
    p_val, p_test = (evaluation.predict_split(model, d, size, 32, views) for d in (val, test))
    calibrated = evaluation.calibrate(val.labels, p_val, test.labels, p_test)
    settings = params.evaluate.model_copy(update={"tta": params.evaluate.tta.model_copy(update=views.__dict__)})
    ev = evaluation.evaluate(val.labels, p_val, test.labels, p_test, test.class_names, settings, calibrated=calibrated)
    before = ev.digest()
    ev = Evaluation.from_dict(json.loads(json.dumps(ev.as_dict())))  # as metrics.json keeps it
    assert ev.views == views and "test-time augmentation: 7 views" in ev.summary()
    plain = Evaluation.load(params.evaluate.metrics)
    assert ev.digest() == before != plain.digest()  # the registration key: stable through the file, new here
    print(f"\nreal model, test ROC AUC without / with 7 views: {plain.test.roc_auc:.4f} / {ev.test.roc_auc:.4f}")
    assert ev.test.roc_auc >= 0.85 and ev.val.sensitivity >= params.evaluate.target_sensitivity

    classifier = Classifier(model, packaging.model_info(metadata, ev, "run", "name"))
    assert classifier.views == views
    batch = next(iter(prepared_batches(list(test.paths[:16]), size, 16, workers=2)))
    served = np.array([p.probability for p in classifier.predict(np.stack([item.x for item in batch]))])
    scored = evaluation.pneumonia_score(calibrated.p_test[:16])
    np.testing.assert_allclose(served, scored, atol=2e-3)  # JPEG decoding paths differ by a grey level at most
