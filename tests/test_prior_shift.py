"""Label-shift adjustment (prior_shift.py) on posteriors whose true class balance is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from pipeline.core.errors import PipelineError
from pipeline.modeling import prior_shift


def posteriors(n: int, prior: float, calibrated_at: float, seed: int) -> np.ndarray:
    """Exact P(pneumonia | x) of a two-Gaussian problem calibrated where the pneumonia fraction was
    `calibrated_at`, for a sample drawn with fraction `prior`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(np.where(rng.random(n) < prior, 1.5, -1.5), 1.2)
    sick, well = calibrated_at * norm.pdf(x, 1.5, 1.2), (1 - calibrated_at) * norm.pdf(x, -1.5, 1.2)
    return sick / (sick + well)


@pytest.mark.parametrize("prior", [0.2, 0.5, 0.625, 0.74, 0.9])
def test_em_recovers_the_class_balance_of_an_unlabelled_batch(prior: float) -> None:
    estimate = prior_shift.estimate_prior(posteriors(5000, prior, 0.74, seed=1), 0.74)
    assert abs(estimate - prior) < 0.02


@pytest.mark.parametrize("prior", [0.3, 0.625])
def test_the_estimate_is_where_em_ends_even_where_em_crawls(prior: float) -> None:
    """Barely separated classes (AUC about 0.57): EM needs thousands of steps; the estimate is its limit."""
    rng = np.random.default_rng(3)
    x = rng.normal(np.where(rng.random(3000) < prior, 0.125, -0.125), 1.0)
    sick, well = 0.74 * norm.pdf(x, 0.125, 1.0), 0.26 * norm.pdf(x, -0.125, 1.0)
    p = sick / (sick + well)
    em = 0.74
    for _ in range(20_000):
        em = float(np.mean(prior_shift.adjust(p, 0.74, em)))
    assert prior_shift.estimate_prior(p, 0.74) == pytest.approx(em, abs=1e-4)


def test_a_batch_with_no_inner_fixed_point_gets_the_end_em_reaches() -> None:
    assert prior_shift.estimate_prior(np.full(50, 0.01), 0.74) < 1e-3  # every image far likelier normal
    assert prior_shift.estimate_prior(np.full(50, 0.999), 0.74) > 1 - 1e-3


def test_adjusting_to_the_true_prior_gives_the_true_posterior() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(0, 2, 1000)
    at = lambda pr: pr * norm.pdf(x, 1.5, 1.2) / (pr * norm.pdf(x, 1.5, 1.2) + (1 - pr) * norm.pdf(x, -1.5, 1.2))  # noqa: E731
    assert np.allclose(prior_shift.adjust(at(0.74), 0.74, 0.3), at(0.3), atol=1e-6)
    assert np.allclose(prior_shift.adjust(at(0.74), 0.74, 0.74), at(0.74), atol=1e-6)


def test_priors_outside_the_open_interval_are_one_clear_error() -> None:
    with pytest.raises(PipelineError, match=r"target prior 1\.0"):
        prior_shift.adjust(np.array([0.5]), 0.7, 1.0)
    with pytest.raises(PipelineError, match="at least one"):
        prior_shift.estimate_prior(np.array([]), 0.7)
