"""Adjusting calibrated probabilities to another class balance (label shift).

A calibrated model's P(pneumonia | image) carries the pneumonia fraction of the data it was calibrated
on (the validation split, ~74% in the Kaggle training folder). Where the deployment population differs
(the official test folder is 62.5%), Bayes' rule moves each probability to the new prior; when that
prior is unknown, EM on a batch of unlabelled predictions estimates it (Saerens, Latinne and
Decaestecker, Neural Computation 2002). Both assume only the class balance changed, not what each
class looks like.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq

from pipeline.core.errors import PipelineError

_EPS = 1e-6


def _check(name: str, prior: float) -> None:
    if not 0.0 < prior < 1.0:
        raise PipelineError(f"{name} prior {prior!r}: must lie strictly between 0 and 1")


def adjust(probs: np.ndarray, source_prior: float, target_prior: float) -> np.ndarray:
    """P(pneumonia) under `target_prior`, from probabilities calibrated where it was `source_prior`."""
    _check("source", source_prior)
    _check("target", target_prior)
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    pos = p * target_prior / source_prior
    neg = (1 - p) * (1 - target_prior) / (1 - source_prior)
    return pos / (pos + neg)


def estimate_prior(probs: np.ndarray, source_prior: float) -> float:
    """The pneumonia fraction of an unlabelled batch: the fixed point of Saerens et al.'s EM (the prior whose
    adjusted posteriors average to itself), solved by bracketing instead of iterating, since EM crawls where the
    classes overlap (200 steps left it 0.03 short). The batch's likelihood is concave in the prior, so the fixed
    point inside (0, 1) is unique; where the posteriors hold none, the estimate is the end EM would reach."""
    p = np.asarray(probs, dtype=np.float64)
    if p.size == 0:
        raise PipelineError("prior estimation needs at least one prediction")
    _check("source", source_prior)

    def gap(prior: float) -> float:
        return float(np.mean(adjust(p, source_prior, prior))) - prior

    low, high = _EPS, 1 - _EPS
    if gap(low) <= 0:
        return low
    if gap(high) >= 0:
        return high
    return float(brentq(gap, low, high, xtol=1e-10))
