"""Evaluation figures with scikit-learn: threshold choice on validation, metrics and bootstrap CIs on test.

Missing a pneumonia is the costly error, so the decision threshold is chosen on validation to reach
a target sensitivity at the best specificity that allows; of the thresholds that do both, the one in
the middle of their interval (on the logit scale), not the edge that a single positive image sets.
Test figures are reported at that threshold and at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from pipeline.core.errors import PipelineError


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, target_sensitivity: float) -> float:
    """The middle (logit scale) of the thresholds t with sensitivity(score >= t) >= target at the best
    specificity: between the k-th highest positive score (k positives reach the target) and the highest
    negative score below it, so one image more or less at the edge does not flip the choice."""
    if not 0 < target_sensitivity < 1:
        raise PipelineError(f"evaluate.target_sensitivity: must be in (0, 1), got {target_sensitivity}")
    y_true, scores = np.asarray(y_true, dtype=int), np.asarray(scores, dtype=float)
    positives = np.sort(scores[y_true == 1])[::-1]
    if positives.size == 0:
        raise PipelineError("cannot choose a threshold: the validation split has no PNEUMONIA image")
    # Predicting positive for score >= positives[k-1] catches the k highest-scoring positives.
    k = int(np.ceil(target_sensitivity * positives.size))
    upper = float(positives[k - 1])
    below = scores[(y_true == 0) & (scores < upper)]
    if below.size == 0:  # no negative can be cleared at this sensitivity: any lower threshold is as good
        return upper
    lower = float(below.max())
    eps = 1e-7
    logit = lambda p: np.log(np.clip(p, eps, 1 - eps) / (1 - np.clip(p, eps, 1 - eps)))  # noqa: E731
    middle = float(1 / (1 + np.exp(-(logit(lower) + logit(upper)) / 2)))
    return min(max(middle, np.nextafter(lower, 1.0)), upper)  # strictly above the negative, at most the edge


def specificity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    negatives = np.asarray(y_true) == 0
    return float(np.mean(np.asarray(y_pred)[negatives] == 0)) if negatives.any() else float("nan")


@dataclass(frozen=True)
class BinaryMetrics:
    threshold: float
    accuracy: float
    precision: float
    sensitivity: float
    specificity: float
    f1: float
    roc_auc: float
    pr_auc: float
    brier: float
    confusion: list[list[int]]  # [[TN, FP], [FN, TP]]

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Scalar figures for MLflow / DVC metrics."""
        keys = ("threshold", "accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc", "brier")
        return {f"{prefix}{k}": float(getattr(self, k)) for k in keys}


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> BinaryMetrics:
    y_true, scores = np.asarray(y_true, dtype=int), np.asarray(scores, dtype=float)
    if y_true.size == 0:
        raise PipelineError("cannot evaluate: the split is empty")
    y_pred = (scores >= threshold).astype(int)
    both = len(np.unique(y_true)) == 2
    return BinaryMetrics(
        threshold=float(threshold),
        accuracy=float(skm.accuracy_score(y_true, y_pred)),
        precision=float(skm.precision_score(y_true, y_pred, zero_division=0)),
        sensitivity=float(skm.recall_score(y_true, y_pred, zero_division=0)),
        specificity=specificity(y_true, y_pred),
        f1=float(skm.f1_score(y_true, y_pred, zero_division=0)),
        roc_auc=float(skm.roc_auc_score(y_true, scores)) if both else float("nan"),
        pr_auc=float(skm.average_precision_score(y_true, scores)) if both else float("nan"),
        brier=float(skm.brier_score_loss(y_true, scores)),
        confusion=skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
    )


def bootstrap_ci(
    y_true: np.ndarray, scores: np.ndarray, threshold: float, n: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for ROC AUC, sensitivity and specificity (resampling images)."""
    y_true, scores = np.asarray(y_true, dtype=int), np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"roc_auc": [], "sensitivity": [], "specificity": []}
    for _ in range(n):
        i = rng.integers(0, y_true.size, y_true.size)
        yt, ys = y_true[i], scores[i]
        if yt.min() == yt.max():
            continue  # a resample with one class has no AUC
        pred = ys >= threshold
        draws["roc_auc"].append(skm.roc_auc_score(yt, ys))
        draws["sensitivity"].append(float(np.mean(pred[yt == 1])))
        draws["specificity"].append(float(np.mean(~pred[yt == 0])))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in draws.items() if v}
