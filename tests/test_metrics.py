"""Threshold choice and metrics against hand-computed cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.modeling.metrics import binary_metrics, bootstrap_ci, choose_threshold

Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
S = np.array([0.1, 0.2, 0.35, 0.6, 0.4, 0.55, 0.7, 0.8, 0.9, 0.3])


def test_threshold_reaches_target_sensitivity_in_the_middle_of_the_gap() -> None:
    # Positives sorted: 0.9 0.8 0.7 0.55 0.4. Target 0.8 needs 4 of 5: the edge is 0.55, and the highest
    # negative below it is 0.35, so the threshold is their logit midpoint.
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    mid = 1 / (1 + np.exp(-(logit(0.35) + logit(0.55)) / 2))
    assert choose_threshold(Y, S, 0.8) == pytest.approx(mid) and 0.35 < mid < 0.55
    assert choose_threshold(Y, S, 0.2) == pytest.approx(1 / (1 + np.exp(-(logit(0.6) + logit(0.9)) / 2)))
    assert choose_threshold(Y, S, 0.81) == pytest.approx(1 / (1 + np.exp(-(logit(0.35) + logit(0.4)) / 2)))
    # No negative below the edge: nothing to clear, the edge itself.
    assert choose_threshold(np.array([0, 1, 1]), np.array([0.9, 0.5, 0.7]), 0.9) == 0.5
    for target in (0.2, 0.5, 0.8, 0.95):
        t = choose_threshold(Y, S, target)
        assert np.mean(S[Y == 1] >= t) >= target
        # Specificity is the best any threshold reaching the target allows.
        edge = np.sort(S[Y == 1])[::-1][int(np.ceil(target * 5)) - 1]
        assert np.mean(S[Y == 0] < t) == np.mean(S[Y == 0] < edge)


@pytest.mark.parametrize(("target", "positives"), [(0.56, 25), (0.55, 100), (0.68, 75), (0.95, 20)])
def test_a_target_reached_exactly_takes_no_extra_positive(target: float, positives: int) -> None:
    """0.56 of 25 positives is 14 (14.000000000000002 in floating point): the threshold keeps 14, not 15."""
    y = np.array([1] * positives + [0] * positives)
    ranked = np.linspace(0.9, 0.1, positives)
    scores = np.concatenate([ranked, ranked - 0.01])  # a normal image just below each pneumonia one
    threshold = choose_threshold(y, scores, target)
    reached = int((scores[:positives] >= threshold).sum())
    assert reached == round(target * positives) and reached / positives >= target - 1e-12


def test_threshold_on_separable_scores_leaves_a_margin() -> None:
    y = np.array([0] * 20 + [1] * 40)
    s = np.concatenate([np.linspace(0.01, 0.2, 20), np.linspace(0.6, 0.99, 40)])
    t = choose_threshold(y, s, 0.95)
    assert 0.2 < t < 0.6 and np.mean(s[y == 1] >= t) == 1.0  # not on the 38th positive's score


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_threshold_target_outside_unit_interval(target: float) -> None:
    with pytest.raises(PipelineError, match=r"evaluate\.target_sensitivity: must be in \(0, 1\)"):
        choose_threshold(Y, S, target)


def test_threshold_needs_positives() -> None:
    with pytest.raises(PipelineError, match="no PNEUMONIA image"):
        choose_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3]), 0.9)


def test_metrics_by_hand() -> None:
    m = binary_metrics(Y, S, 0.5)
    # Predicted positive: 0.6(neg) 0.55 0.7 0.8 0.9 -> TP=4, FP=1, FN=1 (0.4), TN=4.
    assert m.confusion == [[4, 1], [1, 4]]
    assert m.accuracy == pytest.approx(0.8)
    assert m.precision == pytest.approx(0.8)
    assert m.sensitivity == pytest.approx(0.8)
    assert m.specificity == pytest.approx(0.8)
    assert m.f1 == pytest.approx(0.8)
    # AUC by pair counting: of 25 (pos, neg) pairs, the positive scores higher in 23 (0.4 < 0.6; 0.55 < 0.6).
    assert m.roc_auc == pytest.approx(23 / 25)
    assert m.brier == pytest.approx(np.mean((S - Y) ** 2))
    assert set(m.flat("test_")) >= {"test_roc_auc", "test_sensitivity", "test_threshold"}


def test_empty_split_is_one_clear_error() -> None:
    with pytest.raises(PipelineError, match="the split is empty"):
        binary_metrics(np.array([]), np.array([]), 0.5)


def test_bootstrap_interval_brackets_the_estimate() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    s = np.clip(y * 0.3 + rng.normal(0.35, 0.2, 400), 0, 1)
    point = binary_metrics(y, s, 0.5)
    ci = bootstrap_ci(y, s, 0.5, n=300, seed=0)
    for key in ("roc_auc", "sensitivity", "specificity"):
        lo, hi = ci[key]
        assert lo < getattr(point, key) < hi and hi - lo < 0.2
    assert bootstrap_ci(y, s, 0.5, n=300, seed=0) == ci  # seeded


def test_patient_bootstrap_counts_a_child_once() -> None:
    """Five identical images per child are one observation: resampling images would narrow the intervals
    as if there were five times as many children; resampling patients gives the intervals of the children."""
    rng = np.random.default_rng(3)
    children = 60
    y = rng.integers(0, 2, children)
    s = np.clip(y * 0.3 + rng.normal(0.35, 0.2, children), 0, 1)
    y5, s5 = np.repeat(y, 5), np.repeat(s, 5)
    patients = np.repeat([f"p{i}" for i in range(children)], 5)
    by_image = bootstrap_ci(y5, s5, 0.5, n=400, seed=1)
    by_patient = bootstrap_ci(y5, s5, 0.5, n=400, seed=1, groups=patients)
    per_child = bootstrap_ci(y, s, 0.5, n=400, seed=1)
    for key in ("roc_auc", "sensitivity", "specificity"):
        widths = {name: ci[key][1] - ci[key][0] for name, ci in [("image", by_image), ("patient", by_patient)]}
        assert widths["patient"] > 1.6 * widths["image"]  # about sqrt(5) wider
        assert widths["patient"] == pytest.approx(per_child[key][1] - per_child[key][0], rel=0.25)


def test_temperature_scaling_fixes_over_confidence_without_reordering() -> None:
    from pipeline.modeling.metrics import apply_temperature, fit_temperature, log_loss, reliability

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 800)
    logit = (2 * y - 1) * 1.0 + rng.normal(0, 1.5, 800)  # well calibrated at T = 1 ...
    over = 1 / (1 + np.exp(-3 * logit))  # ... then made three times too confident
    t = fit_temperature(y, over)
    assert 2.4 < t < 3.6  # recovers the factor
    fixed = apply_temperature(over, t)
    assert log_loss(y, fixed) < log_loss(y, over) and reliability(y, fixed)[1] < reliability(y, over)[1]
    assert (np.argsort(fixed, kind="stable") == np.argsort(over, kind="stable")).all()  # same ranking
    assert apply_temperature(over.reshape(-1, 1), t).shape == (800, 1)
    three = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert np.allclose(apply_temperature(three, 1.0), three)
    assert np.allclose(apply_temperature(three, 2.0).sum(axis=1), 1.0)
    assert apply_temperature(three, 2.0)[0, 0] < 0.7  # softer
    rows, ece = reliability(np.array([0, 0, 1, 1]), np.array([0.05, 0.15, 0.85, 0.95]), bins=10)
    assert [r["count"] for r in rows] == [1, 1, 1, 1] and ece == pytest.approx(0.1)


def test_platt_scaling_also_fixes_probabilities_that_are_too_low() -> None:
    from pipeline.modeling.metrics import apply_temperature, fit_calibration, fit_temperature, reliability

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 800)
    logit = (2 * y - 1) * 1.5 + rng.normal(0, 1.2, 800)
    low = 1 / (1 + np.exp(-(logit - 2.5)))  # every probability pushed down: a shift no temperature can undo
    t, b = fit_calibration(y, low)
    assert b > 1.0  # pushed back up
    fixed = apply_temperature(low, t, b)
    assert reliability(y, fixed)[1] < 0.05 < reliability(y, apply_temperature(low, fit_temperature(y, low)))[1]
    assert (np.argsort(fixed, kind="stable") == np.argsort(low, kind="stable")).all()


def test_three_class_calibration_moves_back_the_balanced_prior_of_class_weights() -> None:
    """A class-weighted three-class model's outputs carry a balanced prior (normal, bacterial, viral): the fitted
    bias moves P(pneumonia) back to the data's balance, which a temperature alone cannot."""
    from pipeline.modeling.evaluation import pneumonia_score
    from pipeline.modeling.metrics import apply_temperature, fit_calibration, fit_temperature, reliability

    rng = np.random.default_rng(1)
    means = np.array([[0.0, 0.0], [1.5, 0.3], [0.8, 1.4]])

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:  # balanced posteriors of data that is 74% pneumonia
        y = rng.choice(3, n, p=[0.26, 0.48, 0.26])
        x = means[y] + rng.normal(0, 1, (n, 2))
        likelihood = np.exp(-0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1))
        return y, likelihood / likelihood.sum(1, keepdims=True)

    (y_val, p_val), (y_test, p_test) = draw(700), draw(3000)
    t, b = fit_calibration(y_val, p_val)
    assert b > 0.3  # towards pneumonia
    sick = (y_test > 0).astype(int)
    both = pneumonia_score(apply_temperature(p_test, t, b))
    alone = pneumonia_score(apply_temperature(p_test, fit_temperature(y_val, p_val)))
    assert abs(both.mean() - sick.mean()) < 0.02 < abs(alone.mean() - sick.mean())
    assert reliability(sick, both)[1] < reliability(sick, alone)[1] / 2


def test_calibration_on_perfectly_separated_val_stays_finite() -> None:
    """Separable val data would drive an unregularised fit to probabilities of exactly 0 and 1."""
    from pipeline.modeling.metrics import apply_temperature, calibration_at_bounds, fit_calibration

    y = np.array([0] * 20 + [1] * 40)
    p = np.concatenate([np.linspace(0.01, 0.2, 20), np.linspace(0.3, 0.99, 40)])
    t, b = fit_calibration(y, p)
    calibrated = apply_temperature(p, t, b)
    assert t > 0.06 and abs(b) < 19  # not at the bounds
    assert calibration_at_bounds(t, b) == []
    assert calibrated.min() > 1e-8 and calibrated.max() < 1 - 1e-8
    assert calibrated[y == 1].min() > calibrated[y == 0].max()  # still separated: the order is kept


def test_a_fit_pressed_against_its_range_is_reported() -> None:
    """A barely trained model's scores all sit near one value: the best Platt fit lies past the bias range."""
    from pipeline.modeling.metrics import BIAS_RANGE, calibration_at_bounds, fit_calibration

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    logit = 5.0 + 0.05 * y + rng.normal(0, 0.03, 200)  # every image near 0.993, pneumonia a hair higher
    p = 1 / (1 + np.exp(-logit))
    t, b = fit_calibration(y, p)
    assert "bias" in calibration_at_bounds(t, b) and b == pytest.approx(BIAS_RANGE[0], abs=0.02)
    assert calibration_at_bounds(1.0, 0.0) == [] and calibration_at_bounds(20.0, 3.0) == ["temperature"]


def test_the_evaluation_summary_says_when_calibration_hit_its_range() -> None:
    from pipeline.core.config import EvaluateParams
    from pipeline.modeling.evaluation import calibrate, evaluate
    from pipeline.registry.model_card import _calibration

    rng = np.random.default_rng(4)
    params = EvaluateParams(bootstrap=20)

    def scores(n: int, centre: float, gap: float) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        return y, 1 / (1 + np.exp(-(centre + gap * y + rng.normal(0, 0.03, n))))

    def summary_and_card(centre: float, gap: float) -> str:
        (y_val, p_val), (y_test, p_test) = scores(200, centre, gap), scores(200, centre, gap)
        calibrated = calibrate(y_val, p_val, y_test, p_test)
        ev = evaluate(y_val, p_val, y_test, p_test, ("NORMAL", "PNEUMONIA"), params, calibrated=calibrated)
        return ev.summary() + "\n".join(_calibration(ev))

    far_off = summary_and_card(5.0, 0.05)  # every score near 0.993
    assert "calibration: bias at the edge of the fitted range" in far_off
    assert "**Note:** bias at the edge of the fitted range" in far_off  # the model card says it too
    assert "edge of the fitted range" not in summary_and_card(0.0, 3.0)  # a trained model's spread


def test_an_evaluation_without_intervals_reports_and_says_so() -> None:
    """evaluate.bootstrap: 0 is allowed: no interval, and every report says there is none (it used to fail with a
    KeyError after metrics.json and MLflow were written)."""
    from pipeline.core.config import EvaluateParams
    from pipeline.modeling.evaluation import evaluate
    from pipeline.registry.model_card import _performance_intro

    rng = np.random.default_rng(5)
    y_val, p_val, y_test, p_test = rng.integers(0, 2, 100), rng.random(100), rng.integers(0, 2, 40), rng.random(40)
    patients = [f"p{i // 2}" for i in range(40)]
    ev = evaluate(y_val, p_val, y_test, p_test, ("NORMAL", "PNEUMONIA"), EvaluateParams(bootstrap=0), patients)
    assert ev.ci95 == {} and ev.ci_method == "none (no bootstrap resamples, or none with both classes)"
    summary = ev.summary()
    assert "ROC AUC" in summary and "[" not in summary.split("\n")[1] and "95% intervals: none" in summary
    assert "without confidence intervals (none" in _performance_intro(ev)
    assert not [k for k in ev.flat() if "_ci_" in k]
    with_ci = evaluate(y_val, p_val, y_test, p_test, ("NORMAL", "PNEUMONIA"), EvaluateParams(bootstrap=50), patients)
    assert with_ci.ci_method == "bootstrap over 20 patients" and "one child count once" in _performance_intro(with_ci)


@pytest.mark.parametrize("text", ['{"threshold": 0.5, "surprise": 1}', '{"threshold": 0.5', "[]"])
def test_an_evaluation_file_that_is_not_one_is_one_clear_error(tmp_path: Path, text: str) -> None:
    from pipeline.modeling.evaluation import Evaluation

    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.raises(PipelineError, match=r"metrics\.json: not an evaluation written by the evaluate stage"):
        Evaluation.load(path)


def test_an_external_section_of_the_same_name_is_replaced_not_repeated() -> None:
    from pipeline.registry.model_card import EXTERNAL_HEADING, external_sections, with_external_section

    def section(name: str, body: str) -> str:
        return f"\n{EXTERNAL_HEADING}{name}\n\n{body}\n"

    card = with_external_section("# Model card\n\nbody\n", "site-a", section("site-a", "first"))
    card = with_external_section(card, "site-b", section("site-b", "second"))
    again = with_external_section(card, "site-a", section("site-a", "again"))  # a rerun, or a retried write
    assert again.startswith("# Model card\n\nbody\n")
    assert again.count(EXTERNAL_HEADING) == 2 and "first" not in again
    assert external_sections(again) == section("site-b", "second") + section("site-a", "again")
    assert with_external_section(again, "site-a", section("site-a", "again")) == again  # idempotent
    assert with_external_section(card, "site", section("site", "x")).count(EXTERNAL_HEADING) == 3  # names match whole


def test_platt_scaling_keeps_the_ranking_and_three_class_temperature_may_not() -> None:
    """What the README says of calibration: two classes keep the order of the pneumonia score for any T and bias;
    three classes keep each image's argmax but can reorder 1 - P(NORMAL) between images."""
    from pipeline.modeling.evaluation import pneumonia_score
    from pipeline.modeling.metrics import apply_temperature

    rng = np.random.default_rng(0)
    binary = rng.random(500)
    for t, b in ((0.3, 1.0), (3.0, -2.0)):
        assert (np.argsort(apply_temperature(binary, t, b), kind="stable") == np.argsort(binary, kind="stable")).all()
    three = rng.dirichlet([0.5, 0.5, 0.5], 300)
    scaled = apply_temperature(three, 3.0)
    assert (scaled.argmax(axis=1) == three.argmax(axis=1)).all()
    before, after = pneumonia_score(three), pneumonia_score(scaled)
    i, j = np.triu_indices(len(three), 1)
    assert ((before[i] - before[j]) * (after[i] - after[j]) < 0).any()


def test_three_class_figures_are_of_the_classes_every_interface_gives() -> None:
    """NORMAL below the threshold on 1 - P(NORMAL), else the likelier pneumonia class: the per-class report and
    confusion of a three-class run count what predict and serve say, not the plain argmax (which clears
    images the threshold flags), and agree with the binary figures at that threshold."""
    from pipeline.core.config import EvaluateParams
    from pipeline.modeling.evaluation import evaluate
    from pipeline.modeling.metrics import served_classes

    rng = np.random.default_rng(8)
    y_val, y_test = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    p_val, p_test = rng.dirichlet([1, 1, 1], 300), rng.dirichlet([1, 1, 1], 300)
    names = ("NORMAL", "BACTERIAL", "VIRAL")
    ev = evaluate(y_val, p_val, y_test, p_test, names, EvaluateParams(bootstrap=0))
    pred = served_classes(p_test, ev.threshold)
    assert (pred != p_test.argmax(axis=1)).sum() > 10  # the two rules differ on these outputs
    confusion = np.array(ev.multiclass["confusion"])
    (tn, _fp), (fn, tp) = ev.test.confusion
    assert confusion[:, 0].sum() == tn + fn  # cleared: the binary figure's negatives
    assert confusion[0, 0] == tn and confusion[1:, 1:].sum() == tp
    assert np.array_equal(served_classes(np.array([[0.5, 0.2, 0.3], [0.6, 0.3, 0.1]]), 0.45), [2, 0])
    assert np.array_equal(served_classes(np.array([0.3, 0.7]), 0.5), [0, 1])  # P(positive) alone


def test_the_model_card_describes_the_calibration_the_task_used() -> None:
    from pipeline.core.config import EvaluateParams
    from pipeline.modeling.evaluation import calibrate, evaluate
    from pipeline.registry.model_card import _calibration

    rng = np.random.default_rng(9)
    y3, p3 = rng.integers(0, 3, 200), rng.dirichlet([0.5, 0.5, 0.5], 200)
    three = evaluate(y3, p3, y3, p3, ("N", "B", "V"), EvaluateParams(bootstrap=0), calibrated=calibrate(y3, p3, y3, p3))
    text = "\n".join(_calibration(three))
    assert "softmax(log p / T)" in text and "sigmoid" not in text and "can change order" in text
    y2, p2 = rng.integers(0, 2, 200), rng.random(200)
    two = evaluate(y2, p2, y2, p2, ("N", "P"), EvaluateParams(bootstrap=0), calibrated=calibrate(y2, p2, y2, p2))
    assert "sigmoid(logit / T + b)" in "\n".join(_calibration(two))


def test_external_patients_are_named_ids_or_each_file_its_own() -> None:
    """NORMAL/0001.png and PNEUMONIA/0001.png are two children; person7's images are one."""
    from pipeline.serving.scoring import patient_keys

    files = [
        "h/NORMAL/0001.png",
        "h/PNEUMONIA/0001.png",
        "h/PNEUMONIA/person7_virus_1.jpeg",
        "h/PNEUMONIA/person7_virus_2.jpeg",
        "h/NORMAL/IM-0003-0001.jpeg",
    ]
    keys = patient_keys(files)
    assert len(set(keys)) == 4 and keys[2] == keys[3] == "person7" and keys[0] != keys[1]


def test_non_finite_scores_are_refused_not_made_a_threshold() -> None:
    """NaN sorted first and became the threshold (or was skipped silently, elsewhere in the order)."""
    for scores in ([np.nan, 0.9, 0.2, 0.1], [0.9, 0.8, np.inf, 0.1]):
        with pytest.raises(PipelineError, match="1 validation scores are not finite"):
            choose_threshold(np.array([1, 1, 0, 0]), np.array(scores), 0.5)


def test_undefined_figures_are_nan_like_specificity() -> None:
    """No positive image: sensitivity, precision and F1 are undefined (NaN), as specificity is without negatives;
    0.0 read as a model that misses every pneumonia."""
    none_positive = binary_metrics(np.array([0, 0, 0]), np.array([0.9, 0.2, 0.6]), 0.5)
    assert np.isnan(none_positive.sensitivity) and np.isnan(none_positive.roc_auc)
    assert none_positive.precision == 0.0 and none_positive.f1 == 0.0  # two flagged, both wrong: defined
    nothing_flagged = binary_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]), 0.5)
    assert np.isnan(nothing_flagged.precision) and nothing_flagged.sensitivity == 0.0 and nothing_flagged.f1 == 0.0
    empty = binary_metrics(np.array([0, 0]), np.array([0.1, 0.2]), 0.5)
    assert np.isnan([empty.sensitivity, empty.precision, empty.f1]).all()
    assert np.isnan(binary_metrics(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.6]), 0.5).specificity)


def test_the_bootstrap_says_how_many_resamples_it_kept() -> None:
    """One positive in ten images: an unstratified resample lacks it about a third of the time; the stratified
    bootstrap keeps every resample, and the interval method says so by saying nothing about kept resamples."""
    import json

    from pipeline.core.config import EvaluateParams
    from pipeline.modeling.evaluation import Evaluation, evaluate
    from pipeline.modeling.metrics import Intervals, interval_method

    y, s = np.array([1] + [0] * 9), np.linspace(0.9, 0.0, 10)
    ci = bootstrap_ci(y, s, 0.5, n=1000)
    assert ci.kept == ci.drawn == 1000 and set(ci) == {"roc_auc", "sensitivity", "specificity"}
    assert ci["sensitivity"] == (1.0, 1.0)  # the one positive (0.9) is in every resample
    # stratified, the one positive is in every resample: the summary says its interval rests on it alone
    assert (
        interval_method(ci, None) == "bootstrap over images, only 1 image in one class (its interval may be too narrow)"
    )
    partial = Intervals(ci)  # an Intervals with resamples dropped (one class only, before stratification)
    partial.kept, partial.drawn = 600, 1000
    assert interval_method(partial, 40) == (
        "bootstrap over 40 patients, 600 of 1000 resamples kept"
        " (the rest had one class; the interval may be too narrow)"
    )
    one_class = bootstrap_ci(np.zeros(10, dtype=int), s, 0.5, n=50)
    assert one_class == {} and (one_class.kept, one_class.drawn) == (0, 50)
    ev = evaluate(y, s, y, s, ("NORMAL", "PNEUMONIA"), EvaluateParams(bootstrap=200))
    assert ev.ci_method.startswith("bootstrap over images, only 1 image in one class")
    assert "resamples kept" not in ev.summary()
    again = Evaluation.from_dict(json.loads(json.dumps(ev.as_dict())))  # ci95 keys and JSON as before
    assert again.ci95 == ev.ci95 and again.ci_method == ev.ci_method and again.flat().keys() == ev.flat().keys()


def test_a_test_split_without_pneumonia_is_refused_by_name() -> None:
    """Its sensitivity is undefined (NaN), which the registry's sensitivity floor cannot judge."""
    from pipeline.core.config import EvaluateParams
    from pipeline.modeling.evaluation import evaluate

    rng = np.random.default_rng(2)
    with pytest.raises(PipelineError, match=r"^test: the split has no PNEUMONIA image"):
        evaluate(rng.integers(0, 2, 50), rng.random(50), np.zeros(20), rng.random(20), ("N", "P"), EvaluateParams())


def test_non_finite_model_outputs_name_the_split_count_and_an_image() -> None:
    from pipeline.modeling.evaluation import require_finite
    from pipeline.modeling.inputs import SplitData

    data = SplitData("val", ["v/a.jpeg", "v/b.jpeg", "v/c.jpeg"], np.array([0, 1, 1]), ("NORMAL", "PNEUMONIA"))
    fine = np.array([[0.1], [0.5], [0.9]], dtype=np.float32)
    assert require_finite(fine, data) is not None
    bad = fine.copy()
    bad[1:] = np.nan
    with pytest.raises(PipelineError, match=r"^val: the model gave non-finite outputs for 2 images, e\.g\. v/b\.jpeg"):
        require_finite(bad, data)
    three = np.array([[0.2, 0.3, 0.5], [0.2, np.inf, 0.5], [0.1, 0.1, 0.8]])
    with pytest.raises(PipelineError, match=r"for 1 images, e\.g\. v/b\.jpeg"):
        require_finite(three, data)


@pytest.mark.parametrize(
    ("outputs", "trained", "task", "n_classes"),
    [
        (np.full((4, 3), 1 / 3), "three_class", "binary", 2),  # task changed, model not retrained
        (np.full((4, 1), 0.5), "binary", "three_class", 3),
        (np.full((4, 3), 1 / 3), None, "binary", 2),  # no task in the metadata: the width tells
        (np.full((4, 1), 0.5), "three_class", "binary", 2),  # metadata says another task
    ],
)
def test_a_model_of_another_task_is_refused_naming_its_folder(outputs, trained, task, n_classes) -> None:
    from pipeline.modeling.evaluation import check_task

    with pytest.raises(PipelineError, match=r"^models/model: the model was trained for task .* run the train stage$"):
        check_task(outputs, trained, task, n_classes, "models/model")


def test_a_model_of_the_task_passes() -> None:
    from pipeline.modeling.evaluation import check_task

    check_task(np.full((4, 1), 0.5), "binary", "binary", 2, "m")
    check_task(np.full((4,), 0.5), None, "binary", 2, "m")
    check_task(np.full((4, 3), 1 / 3), "three_class", "three_class", 3, "m")


def test_the_evaluate_stage_refuses_a_model_of_another_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """params.task edited to binary, a three-class model still in models/: refused by the stage before any
    calibration is fitted on P(bacteria) as if it were P(pneumonia)."""
    from pipeline.modeling import evaluation, model_store
    from pipeline.modeling.inputs import SplitData
    from pipeline.registry import tracking
    from pipeline.steps import evaluate as stage
    from tests.conftest import rooted_params

    params = rooted_params(tmp_path, "task=binary")
    val = SplitData("val", ["v/a.jpeg", "v/b.jpeg"], np.array([0, 1]), ("NORMAL", "PNEUMONIA"))
    monkeypatch.setattr(model_store, "load", lambda d: (object(), {"task": "three_class", "mlflow_run_id": "r"}))
    monkeypatch.setattr(tracking, "load_run_ref", lambda f: tracking.RunRef("r", "0", "file:x"))
    monkeypatch.setattr(stage, "read_index", lambda p: None)
    monkeypatch.setattr(stage.dp, "split_data", lambda *a, **k: val)
    monkeypatch.setattr(evaluation, "predict_split", lambda *a, **k: np.full((2, 3), 1 / 3))
    monkeypatch.setattr(evaluation, "calibrate", lambda *a: pytest.fail("calibrated a model of another task"))
    with pytest.raises(PipelineError, match=rf"^{tmp_path / 'models'}: the model was trained for task 'three_class'"):
        stage._evaluate(params)


def test_the_evaluate_stage_refuses_an_index_the_model_was_not_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pneumo index` run again with another split.seed, then evaluate alone: the new val split holds patients the
    model trained on, so a threshold and calibration fitted there would be too sure. Refused before predicting."""
    import pandas as pd

    from pipeline.modeling import evaluation, model_store
    from pipeline.registry import tracking
    from pipeline.steps import evaluate as stage
    from tests.conftest import rooted_params

    params = rooted_params(tmp_path)
    index = pd.DataFrame({"path": ["a.jpeg", "b.jpeg"], "split": ["train", "val"], "sha256": ["1", "2"]})
    monkeypatch.setattr(
        model_store, "load", lambda d: (object(), {"task": "binary", "mlflow_run_id": "r", "index_fingerprint": "x"})
    )
    monkeypatch.setattr(tracking, "load_run_ref", lambda f: tracking.RunRef("r", "0", "file:x"))
    monkeypatch.setattr(stage, "read_index", lambda p: index)
    monkeypatch.setattr(evaluation, "predict_split", lambda *a, **k: pytest.fail("predicted with another index"))
    with pytest.raises(PipelineError, match=r"index\.parquet: not the index .*metadata\.json was trained on \(fing"):
        stage._evaluate(params)
