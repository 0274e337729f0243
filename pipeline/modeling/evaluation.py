"""Evaluation: the threshold from validation, test figures at it and at 0.5, CIs, curves and pictures.

Scores are the pneumonia probability (three-class: 1 - P(NORMAL)), so sensitivity and the threshold
mean the same thing for both tasks; three-class runs add per-class and macro figures.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from sklearn import metrics as skm

from pipeline.core.atomic import write_bytes, write_text
from pipeline.core.config import EvaluateParams
from pipeline.core.errors import PipelineError
from pipeline.modeling import tta
from pipeline.modeling.inputs import SplitData, make_dataset
from pipeline.modeling.metrics import (
    BinaryMetrics,
    apply_temperature,
    binary_metrics,
    bootstrap_ci,
    calibration_at_bounds,
    choose_threshold,
    fit_calibration,
    interval,
    interval_method,
    log_loss,
    reliability,
    served_classes,
)


@dataclass(frozen=True)
class Evaluation:
    threshold: float
    target_sensitivity: float
    val: BinaryMetrics
    test: BinaryMetrics
    test_at_half: BinaryMetrics
    ci95: dict[str, tuple[float, float]]
    n: dict[str, int]
    multiclass: dict[str, Any] | None = None
    test_set: str = ""
    ci_method: str = "bootstrap over images"
    temperature: float = 1.0  # calibration (metrics.apply_temperature): T = 1 and bias 0 mean uncalibrated
    calibration_bias: float = 0.0
    calibration: dict[str, Any] | None = None
    tta: dict[str, float] | None = None  # test-time augmentation views (tta.Views), when on
    model_run_id: str = ""  # the MLflow run that trained the evaluated model (its metadata.json)

    @property
    def views(self) -> tta.Views:
        return tta.Views(**(self.tta or {}))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """A short fingerprint of everything recorded (threshold, calibration, views, figures)."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Evaluation:
        """Rebuild from ``as_dict()`` output (e.g. reports/metrics.json)."""
        metrics = {k: BinaryMetrics(**saved[k]) for k in ("val", "test", "test_at_half")}
        ci95 = {k: (v[0], v[1]) for k, v in saved.get("ci95", {}).items()}
        rest = {k: v for k, v in saved.items() if k not in (*metrics, "ci95")}
        return cls(**rest, **metrics, ci95=ci95)

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        """reports/metrics.json as the evaluate stage wrote it."""
        if not Path(path).is_file():
            raise PipelineError(f"{path}: no evaluation (run the evaluate stage first)")
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            raise PipelineError(f"{path}: not an evaluation written by the evaluate stage ({exc})") from None

    def flat(self) -> dict[str, float]:
        """Scalars for MLflow: test_* at the chosen threshold, test05_* at 0.5, val_*, *_ci_low/high."""
        out = {**self.test.flat("test_"), **self.test_at_half.flat("test05_"), **self.val.flat("val_")}
        for key, (lo, hi) in self.ci95.items():
            out[f"test_{key}_ci_low"], out[f"test_{key}_ci_high"] = lo, hi
        if self.multiclass:
            out["test_macro_f1"] = self.multiclass["macro_f1"]
            out["test_macro_roc_auc"] = self.multiclass["macro_roc_auc"]
        return out

    def calibration_warning(self) -> str:
        """What to know when the calibration fit ended on its range's edge; empty when it did not."""
        at_bounds = calibration_at_bounds(self.temperature, self.calibration_bias) if self.calibration else []
        if not at_bounds:
            return ""
        return (
            f"{' and '.join(at_bounds)} at the edge of the fitted range: val scores are far from their rates "
            "(e.g. a barely trained model), so the calibrated probabilities are rough"
        )

    def summary(self) -> str:
        t, c = self.test, self.ci95
        lines = [
            f"threshold {self.threshold:.4f} (sensitivity >= {self.target_sensitivity} at best specificity on val, "
            f"n={self.n['val']})",
            f"test (n={self.n['test']}) at the threshold: accuracy {t.accuracy:.3f}  sensitivity {t.sensitivity:.3f}"
            f"{interval(c, 'sensitivity')}  specificity {t.specificity:.3f}{interval(c, 'specificity')}  "
            f"ROC AUC {t.roc_auc:.3f}{interval(c, 'roc_auc')}  F1 {t.f1:.3f}",
            f"test at 0.5: accuracy {self.test_at_half.accuracy:.3f}  sensitivity {self.test_at_half.sensitivity:.3f}  "
            f"specificity {self.test_at_half.specificity:.3f}",
            f"95% intervals: {self.ci_method}",
        ]
        if self.calibration:
            c = self.calibration
            lines.append(
                f"calibration: temperature {self.temperature:.3f}, bias {self.calibration_bias:+.3f} (fitted on val); "
                "test Brier "
                f"{c['test_brier']['raw']:.4f} -> {c['test_brier']['calibrated']:.4f}, calibration error "
                f"{c['test_ece']['raw']:.4f} -> {c['test_ece']['calibrated']:.4f}"
            )
            if warning := self.calibration_warning():
                lines.append(f"calibration: {warning}")
        if self.views.enabled:
            lines.append(f"test-time augmentation: {self.views.describe()}, outputs averaged")
        if self.multiclass:
            lines.append(
                f"three-class: macro F1 {self.multiclass['macro_f1']:.3f}, "
                f"macro ROC AUC {self.multiclass['macro_roc_auc']:.3f}"
            )
        return "\n".join(lines)


def predict_split(
    model: Any, data: SplitData, image_size: int, batch_size: int, views: tta.Views | None = None
) -> np.ndarray:
    """The model's outputs for every image of a split, in the split's order (averaged over `views`)."""
    ds = make_dataset(data, image_size, batch_size, cache=False).map(lambda x, y: x)
    if views is None or not views.enabled:
        return require_finite(model.predict(ds, verbose=0), data)
    run = tta.predictor(model, views, image_size)
    return require_finite(np.concatenate([np.asarray(run(x)) for x in ds]), data)


def require_finite(outputs: np.ndarray, data: SplitData) -> np.ndarray:
    """`outputs` (one row per image of `data`), refused by split, count and an example when any is NaN or
    infinite (a diverged model): they would pass as a NaN threshold, or fail deep in scikit-learn."""
    outputs = np.asarray(outputs)
    bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    if bad.any():
        raise PipelineError(
            f"{data.split}: the model gave non-finite outputs for {int(bad.sum())} images, "
            f"e.g. {data.paths[int(bad.argmax())]} (a diverged model? run the train stage again)"
        )
    return outputs


def check_task(outputs: np.ndarray, trained_task: object, task: str, n_classes: int, model_dir: str) -> None:
    """Refuse a model trained for another task than `task` (its metadata's "task", or its output width: 1 for
    binary, one per class otherwise), e.g. params.yaml edited and evaluate run before training again."""
    width = int(np.asarray(outputs).reshape(len(outputs), -1).shape[1])
    expected = 1 if task == "binary" else n_classes
    if trained_task not in (None, task) or width != expected:
        raise PipelineError(
            f"{model_dir}: the model was trained for task {trained_task!r} ({width} outputs), params.task is "
            f"{task!r} ({expected} outputs): run the train stage"
        )


def pneumonia_score(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=float)
    return probs.ravel() if probs.ndim == 1 or probs.shape[1] == 1 else 1.0 - probs[:, 0]


@dataclass(frozen=True)
class Calibrated:
    temperature: float
    bias: float
    p_val: np.ndarray
    p_test: np.ndarray
    report: dict[str, Any]


def calibrate(y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: np.ndarray) -> Calibrated:
    """Temperature scaling fitted on val (log loss); Brier score and calibration error before and after,
    and the test reliability table. Two classes keep their ranking; three classes can reorder the pneumonia
    score a little (``metrics.apply_temperature``), so the threshold is chosen on the calibrated val scores."""
    temperature, bias = fit_calibration(y_val, p_val)
    cal_val, cal_test = apply_temperature(p_val, temperature, bias), apply_temperature(p_test, temperature, bias)
    b_val, b_test = (np.asarray(y_val) > 0).astype(int), (np.asarray(y_test) > 0).astype(int)
    table, ece = reliability(b_test, pneumonia_score(cal_test))
    raw_table, raw_ece = reliability(b_test, pneumonia_score(p_test))
    report = {
        "method": "Platt scaling of the logit, fitted on val" if bias else "temperature scaling, fitted on val",
        "temperature": temperature,
        "bias": bias,
        # What the fit minimises: the log loss against Platt's smoothed targets (see metrics.log_loss).
        "val_log_loss": {
            "raw": log_loss(y_val, p_val, smoothed=True),
            "calibrated": log_loss(y_val, cal_val, smoothed=True),
        },
        "val_brier": {
            "raw": float(skm.brier_score_loss(b_val, pneumonia_score(p_val))),
            "calibrated": float(skm.brier_score_loss(b_val, pneumonia_score(cal_val))),
        },
        "test_brier": {
            "raw": float(skm.brier_score_loss(b_test, pneumonia_score(p_test))),
            "calibrated": float(skm.brier_score_loss(b_test, pneumonia_score(cal_test))),
        },
        "test_ece": {"raw": raw_ece, "calibrated": ece},
        "test_reliability": {"raw": raw_table, "calibrated": table},
    }
    return Calibrated(temperature, bias, cal_val, cal_test, report)


def evaluate(
    y_val: np.ndarray,
    p_val: np.ndarray,
    y_test: np.ndarray,
    p_test: np.ndarray,
    class_names: tuple[str, ...],
    params: EvaluateParams,
    test_patients: list[str] | None = None,
    calibrated: Calibrated | None = None,
) -> Evaluation:
    """All figures from class ids and model outputs (probabilities) on val and test; with
    `test_patients` the confidence intervals resample patients, not images. With `calibrated` the
    figures are of its calibrated probabilities, and its temperature and report are recorded."""
    if calibrated is not None:
        p_val, p_test = calibrated.p_val, calibrated.p_test
    s_val, s_test = pneumonia_score(p_val), pneumonia_score(p_test)
    b_val, b_test = (np.asarray(y_val) > 0).astype(int), (np.asarray(y_test) > 0).astype(int)
    if b_test.size and not b_test.any():  # sensitivity undefined (NaN): the registry's floor could not judge it
        raise PipelineError("test: the split has no PNEUMONIA image, so test sensitivity is undefined")
    threshold = choose_threshold(b_val, s_val, params.target_sensitivity)
    views = tta.Views.of(params.tta)
    multiclass = None
    if len(class_names) > 2:
        pred = served_classes(p_test, threshold)
        report = skm.classification_report(
            y_test, pred, labels=range(len(class_names)), target_names=class_names, output_dict=True, zero_division=0
        )
        multiclass = {
            "report": report,
            "macro_f1": float(report["macro avg"]["f1-score"]),
            "macro_roc_auc": float(
                skm.roc_auc_score(y_test, p_test, multi_class="ovr", average="macro", labels=range(len(class_names)))
            ),
            "confusion": skm.confusion_matrix(y_test, pred, labels=range(len(class_names))).tolist(),
        }
    ci95 = bootstrap_ci(b_test, s_test, threshold, params.bootstrap, params.seed, groups=test_patients or None)
    return Evaluation(
        threshold=threshold,
        target_sensitivity=params.target_sensitivity,
        val=binary_metrics(b_val, s_val, threshold),
        test=binary_metrics(b_test, s_test, threshold),
        test_at_half=binary_metrics(b_test, s_test, 0.5),
        ci95=ci95,
        ci_method=interval_method(ci95, len(set(test_patients)) if test_patients else None),
        n={"val": int(b_val.size), "test": int(b_test.size)},
        multiclass=multiclass,
        temperature=calibrated.temperature if calibrated else 1.0,
        calibration_bias=calibrated.bias if calibrated else 0.0,
        calibration=calibrated.report if calibrated else None,
        tta=asdict(views) if views.enabled else None,
    )


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_plot_data(
    ev: Evaluation, y_test: np.ndarray, p_test: np.ndarray, class_names: tuple[str, ...], plots_dir: str | Path
) -> None:
    """CSV files for `dvc plots`: ROC, PR and the confusion matrix (one row per test image)."""
    plots = Path(plots_dir)
    b, s = (np.asarray(y_test) > 0).astype(int), pneumonia_score(p_test)
    fpr, tpr, _ = skm.roc_curve(b, s)
    write_text(
        plots / "roc.csv",
        _csv([{"fpr": round(float(f), 5), "tpr": round(float(t), 5)} for f, t in zip(fpr, tpr, strict=True)]),
    )
    precision, recall, _ = skm.precision_recall_curve(b, s)
    write_text(
        plots / "pr.csv",
        _csv(
            [
                {"recall": round(float(r), 5), "precision": round(float(p), 5)}
                for r, p in zip(recall, precision, strict=True)
            ]
        ),
    )
    if len(class_names) > 2:
        pred = served_classes(p_test, ev.threshold)
        pairs = [(class_names[a], class_names[p]) for a, p in zip(y_test, pred, strict=True)]
    else:
        pairs = [(class_names[a], class_names[int(v >= ev.threshold)]) for a, v in zip(b, s, strict=True)]
    write_text(plots / "confusion.csv", _csv([{"actual": a, "predicted": p} for a, p in pairs]))


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def write_figures(
    ev: Evaluation, y_test: np.ndarray, p_test: np.ndarray, class_names: tuple[str, ...], figures_dir: str | Path
) -> list[Path]:
    """ROC and PR curves with the operating point, the confusion matrix and the reliability diagram, as PNG."""
    confusion = ev.multiclass["confusion"] if ev.multiclass else None
    return figures(ev.test, y_test, p_test, class_names, figures_dir, confusion, ev.calibration, ev.temperature)


def figures(
    test: BinaryMetrics,
    y_test: np.ndarray,
    p_test: np.ndarray,
    class_names: tuple[str, ...],
    figures_dir: str | Path,
    multiclass_confusion: list[list[int]] | None = None,
    calibration: dict[str, Any] | None = None,
    temperature: float = 1.0,
    where: str = "test",
) -> list[Path]:
    """The figures of one scored image set (`test` holds its figures at the operating threshold)."""
    matplotlib.use("Agg")
    threshold = test.threshold
    out = Path(figures_dir)
    b, s = (np.asarray(y_test) > 0).astype(int), pneumonia_score(p_test)
    written = []
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    fpr, tpr, _ = skm.roc_curve(b, s)
    ax.plot(fpr, tpr, lw=2, label=f"ROC AUC {test.roc_auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([1 - test.specificity], [test.sensitivity], c="crimson", zorder=3, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {where}")
    ax.legend(loc="lower right")
    written.append(out / "roc.png")
    write_bytes(written[-1], _png(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    precision, recall, _ = skm.precision_recall_curve(b, s)
    ax.plot(recall, precision, lw=2, label=f"PR AUC {test.pr_auc:.3f}")
    ax.scatter([test.sensitivity], [test.precision], c="crimson", zorder=3, label="operating point")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=f"Precision-recall, {where}", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    written.append(out / "pr.png")
    write_bytes(written[-1], _png(fig))
    plt.close(fig)

    matrix = np.array(multiclass_confusion if multiclass_confusion else test.confusion)
    names = class_names if multiclass_confusion else ("NORMAL", "PNEUMONIA")
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set(
        xticks=range(len(names)),
        yticks=range(len(names)),
        xticklabels=names,
        yticklabels=names,
        xlabel="predicted",
        ylabel="actual",
        title=f"Confusion, {where} (threshold {threshold:.3f})",
    )
    written.append(out / "confusion.png")
    write_bytes(written[-1], _png(fig))
    plt.close(fig)
    if calibration:
        written.append(out / "reliability.png")
        write_bytes(written[-1], reliability_png(calibration, temperature, where))
    return written


def reliability_png(calibration: dict[str, Any], temperature: float, where: str = "test") -> bytes:
    """The reliability diagram: observed pneumonia rate per bin of predicted P(pneumonia), raw and calibrated."""
    matplotlib.use("Agg")
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    tables, eces = calibration["test_reliability"], calibration["test_ece"]
    styles = {"raw": {"c": "grey", "marker": "o", "alpha": 0.6}, "calibrated": {"c": "crimson", "marker": "s"}}
    for key, style in styles.items():
        rows = tables.get(key)
        if rows:
            ax.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], lw=1.5,
                    label=f"{key} (ECE {eces[key]:.3f})", **style)  # fmt: skip
    ax.set(xlabel="predicted P(pneumonia)", ylabel="observed pneumonia rate", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability, {where} (T = {temperature:.2f})")  # fmt: skip
    ax.legend(loc="upper left")
    data = _png(fig)
    plt.close(fig)
    return data


def history_figure(history: list[dict[str, float]], path: str | Path) -> None:
    """Loss and AUC per epoch, train and validation, phases marked."""
    matplotlib.use("Agg")

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for ax, key in zip(axes, ("loss", "auc"), strict=True):
        ax.plot(epochs, [h.get(key) for h in history], marker="o", label="train")
        ax.plot(epochs, [h.get(f"val_{key}") for h in history], marker="o", label="validation")
        ax.set(xlabel="epoch", title=key.upper() if key == "auc" else key)
        phases = [h["phase"] for h in history]
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(epochs[i] - 0.5, c="grey", ls=":", lw=1)
        ax.legend()
    write_bytes(path, _png(fig))
    plt.close(fig)
