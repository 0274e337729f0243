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
    estimate, steps = prior_shift.estimate_prior(posteriors(5000, prior, 0.74, seed=1), 0.74)
    assert abs(estimate - prior) < 0.02 and steps < 200


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
