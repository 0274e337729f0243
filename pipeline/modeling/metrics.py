"""Evaluation figures with scikit-learn: threshold choice on validation, metrics and bootstrap CIs on test.

Missing a pneumonia is the costly error, so the decision threshold is chosen on validation to reach
a target sensitivity at the best specificity that allows; of the thresholds that do both, the one in
the middle of their interval (on the logit scale), not the edge that a single positive image sets.
Test figures are reported at that threshold and at 0.5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit
from sklearn import metrics as skm

from pipeline.core.errors import PipelineError


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, target_sensitivity: float) -> float:
    """The middle (logit scale) of the thresholds t with sensitivity(score >= t) >= target at the best
    specificity: between the k-th highest positive score (k positives reach the target) and the highest
    negative score below it, so one image more or less at the edge does not flip the choice."""
    if not 0 < target_sensitivity < 1:
        raise PipelineError(f"evaluate.target_sensitivity: must be in (0, 1), got {target_sensitivity}")
    y_true, scores = np.asarray(y_true, dtype=int), np.asarray(scores, dtype=float)
    if not np.isfinite(scores).all():  # NaN sorts first and would become the threshold
        raise PipelineError(
            f"cannot choose a threshold: {int((~np.isfinite(scores)).sum())} validation scores are not finite"
        )
    positives = np.sort(scores[y_true == 1])[::-1]
    if positives.size == 0:
        raise PipelineError("cannot choose a threshold: the validation split has no PNEUMONIA image")
    # Predicting positive for score >= positives[k-1] catches the k highest-scoring positives.
    # (less a hair: 0.7 * 10 is 7.000000000000001 in floating point, and 7 of 10 positives reach 0.7)
    k = int(np.ceil(target_sensitivity * positives.size - 1e-9))
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
        # Undefined figures (no positive image, none predicted) are NaN, as specificity is without negatives.
        precision=float(skm.precision_score(y_true, y_pred, zero_division=np.nan)),
        sensitivity=float(skm.recall_score(y_true, y_pred, zero_division=np.nan)),
        specificity=specificity(y_true, y_pred),
        f1=float(skm.f1_score(y_true, y_pred, zero_division=np.nan)),
        roc_auc=float(skm.roc_auc_score(y_true, scores)) if both else float("nan"),
        pr_auc=float(skm.average_precision_score(y_true, scores)) if both else float("nan"),
        brier=float(skm.brier_score_loss(y_true, scores)),
        confusion=skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
    )


class Intervals(dict[str, tuple[float, float]]):
    """bootstrap_ci's intervals by figure, and how many resamples they come from (`kept` of `drawn`)."""

    kept: int = 0
    drawn: int = 0
    fewest: int = 0  # patients (or images) in the smaller class: the intervals are conditional on them


FEW_PER_CLASS = 10  # fewer patients in a class than this: the stratified intervals get a caveat


def _strata(y_true: np.ndarray, clusters: list[np.ndarray]) -> list[list[int]]:
    """Cluster indices by stratum: the set of classes among a cluster's images. A patient with images of one
    class is in that class's stratum; one with images of both is in a separate "mixed" stratum (each draw of
    such a patient brings both classes, so it is never folded into either class)."""
    by_key: dict[tuple[int, ...], list[int]] = {}
    for k, c in enumerate(clusters):
        by_key.setdefault(tuple(np.unique(y_true[c]).tolist()), []).append(k)
    return [by_key[key] for key in sorted(by_key)]  # a fixed order: the draws depend on the seed only


def bootstrap_ci(
    y_true: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | list[str] | None = None,
) -> Intervals:
    """Percentile bootstrap intervals for ROC AUC, sensitivity and specificity.

    With `groups` (patient ids) whole patients are resampled, all their images together: images of
    one child are not independent, and resampling them one by one makes the intervals too narrow.
    The resampling is stratified: patients (or images, without `groups`) are drawn with replacement within
    their stratum (NORMAL only, PNEUMONIA only, both: see _strata), each stratum keeping its size, so every
    resample has both classes whenever the data do and `kept` == `drawn`. With one class only, no resample
    has an AUC: the result is empty with `kept` 0.
    """
    y_true, scores = np.asarray(y_true, dtype=int), np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    if groups is None:
        clusters = [np.array([i]) for i in range(y_true.size)]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        clusters = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    strata = [np.asarray(s) for s in _strata(y_true, clusters)]
    draws: dict[str, list[float]] = {"roc_auc": [], "sensitivity": [], "specificity": []}
    for _ in range(n):
        picked = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata]) if strata else []
        i = np.concatenate([clusters[k] for k in picked]) if len(picked) else np.array([], dtype=int)
        yt, ys = y_true[i], scores[i]
        if yt.size == 0 or yt.min() == yt.max():
            continue  # a resample with one class has no AUC (only when the data have one class)
        pred = ys >= threshold
        draws["roc_auc"].append(skm.roc_auc_score(yt, ys))
        draws["sensitivity"].append(float(np.mean(pred[yt == 1])))
        draws["specificity"].append(float(np.mean(~pred[yt == 0])))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = Intervals({k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in draws.items() if v})
    out.kept, out.drawn = len(draws["roc_auc"]), n
    out.fewest = min(sum(1 for c in clusters if (y_true[c] == k).any()) for k in (0, 1))
    return out


def interval_method(ci95: dict[str, tuple[float, float]], patients: int | None) -> str:
    """How `ci95` was made, for reports: over `patients` (None: over images), or why there is none; with
    bootstrap_ci's result, also how many resamples were kept when some had one class (bootstrap_ci's stratified
    resamples all have both classes when the data do: only an Intervals with `kept` < `drawn` says so)."""
    if not ci95:
        return "none (no bootstrap resamples, or none with both classes)"
    method = f"bootstrap over {patients} patients" if patients else "bootstrap over images"
    kept, drawn = getattr(ci95, "kept", 0), getattr(ci95, "drawn", 0)
    if kept < drawn:
        method += f", {kept} of {drawn} resamples kept (the rest had one class; the interval may be too narrow)"
    fewest = getattr(ci95, "fewest", 0)
    if 0 < fewest < FEW_PER_CLASS:  # stratified, each class keeps its few members: the spread is understated
        unit = ("patient" if patients else "image") + ("s" if fewest > 1 else "")
        method += f", only {fewest} {unit} in one class (its interval may be too narrow)"
    return method


def interval(ci95: dict[str, tuple[float, float]], key: str) -> str:
    """' [lo, hi]' for `key`, or '' when there is no interval."""
    return f" [{ci95[key][0]:.3f}, {ci95[key][1]:.3f}]" if key in ci95 else ""


def class_probabilities(probs: np.ndarray) -> np.ndarray:
    """(n,) or (n, 1) P(positive) -> (n, 2); (n, k) unchanged."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim == 1 or probs.shape[1] == 1:
        p = probs.reshape(-1, 1)
        return np.concatenate([1.0 - p, p], axis=1)
    return probs


def served_classes(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The class every interface gives: the first (NORMAL) below `threshold` on 1 - P(first class), else the
    most likely of the others (with two classes, the second)."""
    full = class_probabilities(probs)
    flagged = 1.0 - full[:, 0] >= threshold
    return np.where(flagged, 1 + full[:, 1:].argmax(axis=1), 0)


def apply_temperature(probs: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    """Calibrated probabilities, in the shape they came in ((n, 1) sigmoid outputs stay so).

    Two classes: sigmoid(logit / T + bias) (Platt scaling on the logit); more: softmax(log p / T + bias on every
    class but the first), so the bias moves the log-odds of pneumonia (any kind) against normal in both cases: a
    class-weighted model's outputs carry a balanced prior that a temperature alone cannot move back. With T > 0
    two classes keep the order of the scores (every ranking metric); more classes keep each image's class
    order, but 1 - P(first class) can change order between images, so thresholds are chosen on calibrated scores.
    """
    probs = np.asarray(probs, dtype=float)
    if temperature == 1.0 and bias == 0.0:
        return probs
    full = np.clip(class_probabilities(probs), 1e-12, 1.0)
    if full.shape[1] == 2:
        z = (np.log(full[:, 1]) - np.log(full[:, 0])) / temperature + bias
        positive = 1.0 / (1.0 + np.exp(-z))
        scaled = np.stack([1.0 - positive, positive], axis=1)
    else:
        logits = np.log(full) / temperature
        logits[:, 1:] += bias
        logits -= logits.max(axis=1, keepdims=True)
        scaled = np.exp(logits)
        scaled /= scaled.sum(axis=1, keepdims=True)
    return scaled[:, 1:] if probs.ndim == 2 and probs.shape[1] == 1 else (scaled[:, 1] if probs.ndim == 1 else scaled)


def log_loss(y: np.ndarray, probs: np.ndarray, smoothed: bool = False) -> float:
    """Mean negative log likelihood of class ids `y`; `smoothed` uses Platt's targets instead of 0/1
    ((n_c + 1) / (n_c + 2) for the true class of a class with n_c images), which keeps a fit on perfectly
    separated validation data from driving the probabilities to exactly 0 and 1."""
    p = np.clip(class_probabilities(probs), 1e-12, 1.0)
    y = np.asarray(y, dtype=int)
    if not smoothed:
        return float(-np.mean(np.log(p[np.arange(len(p)), y])))
    return float(-np.mean(np.sum(smoothed_targets(y, p.shape[1]) * np.log(p), axis=1)))


def smoothed_targets(y: np.ndarray, k: int) -> np.ndarray:
    """Platt's targets, (n, k): (n_c + 1) / (n_c + 2) for the true class of a class with n_c images, the rest
    shared by the other classes (log_loss and the Platt fit's gradient use the same ones)."""
    y = np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=k)
    high = (counts[y] + 1.0) / (counts[y] + 2.0)
    targets = np.repeat(((1.0 - high) / (k - 1))[:, None], k, axis=1)
    targets[np.arange(len(y)), y] = high
    return targets


TEMPERATURE_RANGE = (0.05, 20.0)
BIAS_RANGE = (-20.0, 20.0)


def fit_temperature(y: np.ndarray, probs: np.ndarray) -> float:
    """The temperature in TEMPERATURE_RANGE that minimises the (smoothed) log loss of `probs` for class ids `y`."""
    result = minimize_scalar(
        lambda log_t: log_loss(y, apply_temperature(probs, float(np.exp(log_t))), smoothed=True),
        bounds=tuple(np.log(TEMPERATURE_RANGE)),
        method="bounded",
    )
    return float(np.exp(result.x))


def _platt_loss(y: np.ndarray, probs: np.ndarray) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """The smoothed log loss of sigmoid(logit / T + b) as a function of (log T, b), with its exact gradient: a
    numerical one is too noisy for a tight fit where val scores bunch up (T and b then trade off along a flat
    valley, and where a finite-difference fit stops depends on the CPU's floating-point paths)."""
    full = np.clip(class_probabilities(probs), 1e-12, 1.0)
    z0 = np.log(full[:, 1]) - np.log(full[:, 0])
    target = smoothed_targets(y, 2)[:, 1]  # log_loss's smoothed target, as P(pneumonia)

    def loss(v: np.ndarray) -> tuple[float, np.ndarray]:
        scale = np.exp(-v[0])
        z = z0 * scale + v[1]
        value = np.mean(np.logaddexp(0.0, z) - target * z)  # -t log sigmoid(z) - (1 - t) log sigmoid(-z)
        residual = expit(z) - target
        return float(value), np.array([np.mean(residual * -z0 * scale), np.mean(residual)])

    return loss


def fit_calibration(y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(temperature, bias) minimising the smoothed log loss on val (Platt scaling for two classes; the bias also
    corrects probabilities that are too low or too high overall, see apply_temperature for more classes)."""
    t = fit_temperature(y, probs)
    if class_probabilities(probs).shape[1] != 2:
        result = minimize(
            lambda v: log_loss(y, apply_temperature(probs, float(np.exp(v[0])), float(v[1])), smoothed=True),
            x0=[np.log(t), 0.0],
            bounds=[tuple(np.log(TEMPERATURE_RANGE)), BIAS_RANGE],
            method="L-BFGS-B",
        )
        return float(np.exp(result.x[0])), float(result.x[1])
    result = minimize(
        _platt_loss(y, probs),
        x0=[np.log(t), 0.0],
        jac=True,
        bounds=[tuple(np.log(TEMPERATURE_RANGE)), BIAS_RANGE],
        method="L-BFGS-B",
        options={"ftol": 1e-14, "gtol": 1e-10, "maxiter": 2000},
    )
    return float(np.exp(result.x[0])), float(result.x[1])


def calibration_at_bounds(temperature: float, bias: float) -> list[str]:
    """The fitted parameters that sit on their range's edge (within 0.1%): the best fit lay beyond it, so the
    calibrated probabilities are the range's best, not the data's (val scores far off, e.g. a barely trained model)."""
    log_t, log_edges = np.log(temperature), np.log(TEMPERATURE_RANGE)
    at = {
        "temperature": bool(np.min(np.abs(log_t - log_edges)) < 1e-3),
        "bias": bool(min(abs(bias - e) for e in BIAS_RANGE) < 1e-3 * max(BIAS_RANGE)),
    }
    return [name for name, hit in at.items() if hit]


def reliability(y_true: np.ndarray, scores: np.ndarray, bins: int = 10) -> tuple[list[dict[str, float]], float]:
    """Reliability table (equal-width bins of P(pneumonia): mean predicted, observed rate, count) and the
    expected calibration error (the count-weighted mean gap)."""
    y_true, scores = np.asarray(y_true, dtype=int), np.asarray(scores, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        predicted, observed = float(scores[mask].mean()), float(y_true[mask].mean())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "predicted": predicted,
                     "observed": observed, "count": int(mask.sum())})  # fmt: skip
        ece += mask.mean() * abs(predicted - observed)
    return rows, float(ece)
