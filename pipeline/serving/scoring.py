"""External validation: score a labelled folder with a registered model, as served, before using it.

A hospital checks a model on its own images: NORMAL/ and PNEUMONIA/ subfolders (or the Kaggle layout,
one split of it) are predicted through the same path as `pneumo predict` (decoding, the registered
temperature and threshold), and scored: metrics at the registered threshold and at 0.5, 95% intervals
that resample patients when the file names carry patient ids, and calibration (Brier score, expected
calibration error, the reliability table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from pipeline.core.config import LABELS
from pipeline.core.errors import PipelineError
from pipeline.data import naming
from pipeline.data.labelled_folders import class_folders
from pipeline.modeling import prior_shift
from pipeline.modeling.metrics import (
    BinaryMetrics,
    binary_metrics,
    bootstrap_ci,
    interval,
    interval_method,
    reliability,
)
from pipeline.serving.classifier import Classifier
from pipeline.serving.predict import folder_files, prepared_batches


def labelled_files(path: str | Path, split: str = "test") -> list[tuple[str, int]]:
    """(file, 1 for PNEUMONIA / 0 for NORMAL) under NORMAL/ and PNEUMONIA/, or under `split`/ of the Kaggle layout."""
    root = Path(path)
    if not root.is_dir():
        raise PipelineError(f"{root}: no such folder")
    folders = class_folders(root, split)
    if folders is None:
        raise PipelineError(
            f"{root}: expected {'/ and '.join(LABELS)}/ subfolders (or the Kaggle layout, scored on {split}/)"
        )
    # Every file of a class folder is scored or listed as unreadable: one dropped unseen changes the figures
    items = [(str(p), label_id) for label_id, label in enumerate(LABELS) for p in folder_files(folders[label])]
    if not items:
        raise PipelineError(f"{root}: no files under {'/ or '.join(LABELS)}/")
    return items


@dataclass
class ExternalResult:
    n: int
    n_patients: int
    at_threshold: BinaryMetrics
    at_half: BinaryMetrics
    ci95: dict[str, tuple[float, float]]
    ci_method: str
    brier: float
    ece: float
    reliability: list[dict[str, float]]
    files: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    prior: dict[str, Any] | None = None  # the class-balance adjustment, when one was asked for
    refused: list[str] = field(default_factory=list)  # out of distribution: served without a label, not in the figures

    def summary(self, name: str) -> str:
        t, c = self.at_threshold, self.ci95
        (tn, fp), (fn, tp) = t.confusion

        lines = [
            f"external validation '{name}': {self.n} images ({self.n_patients} patients), threshold {t.threshold:.4f}",
            f"  ROC AUC {t.roc_auc:.3f}{interval(c, 'roc_auc')}  "
            f"sensitivity {t.sensitivity:.3f}{interval(c, 'sensitivity')}  "
            f"specificity {t.specificity:.3f}{interval(c, 'specificity')}  accuracy {t.accuracy:.3f}",
            f"  confusion: {tp} pneumonia found, {fn} missed, {tn} normal cleared, {fp} false alarms",
            f"  at 0.5: sensitivity {self.at_half.sensitivity:.3f}  specificity {self.at_half.specificity:.3f}",
            f"  calibration: Brier {self.brier:.4f}, expected calibration error {self.ece:.4f}; 95% intervals: "
            f"{self.ci_method}",
        ]
        if self.prior:
            lines.append(
                f"  probabilities adjusted to a pneumonia fraction of {self.prior['target']:.3f} "
                f"({self.prior['how']}; calibrated at {self.prior['source']:.3f})"
            )
        if self.refused:
            lines.append(
                f"  refused as out of distribution: {len(self.refused)} of {self.n + len(self.refused)} readable "
                "images (the service gives them no label; not in these figures)"
            )
        lines += [f"  refused: {r}" for r in self.refused[:10]]
        lines += [f"  ... and {len(self.refused) - 10} more (report.json)"] if len(self.refused) > 10 else []
        lines += [f"  unreadable: {u}" for u in self.unreadable]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_prior(value: str | None) -> float | str | None:
    """--prior: None, 'auto', or a fraction in (0, 1)."""
    if value is None or value == "auto":
        return value
    try:
        prior = float(value)
    except ValueError:
        raise PipelineError(f"--prior {value!r}: give a number between 0 and 1, or 'auto'") from None
    if not 0.0 < prior < 1.0:
        raise PipelineError(f"--prior {value!r}: give a number between 0 and 1, or 'auto'")
    return prior


def source_prior(classifier: Classifier) -> float:
    """The class balance the version's probabilities carry; one line where it records none (check it before the
    images are scored, not after)."""
    if classifier.info.source_prior is None:
        raise PipelineError(
            "--prior: this model version records no class balance to adjust from (it is uncalibrated, or older)"
        )
    return classifier.info.source_prior


def adjust_for_prior(
    classifier: Classifier, scores: np.ndarray, prior: float | str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores moved to `prior` (a fraction, or 'auto': estimated by EM on the scores themselves)."""
    source = source_prior(classifier)
    if prior == "auto":
        target = prior_shift.estimate_prior(scores, source)
        how = "estimated from the unlabelled predictions (EM's fixed point)"
    else:
        target, how = float(prior), "given"
    return prior_shift.adjust(scores, source, target), {"source": source, "target": target, "how": how}


def patient_keys(files: list[str]) -> list[str]:
    """The patient of each file: the id its name gives, or the file itself for a name of no known pattern
    (hospital exports number each class folder from 0001: NORMAL/0001.png and PNEUMONIA/0001.png are two
    children)."""
    return [naming.named_patient(Path(f).name) or f for f in files]


def score(
    classifier: Classifier,
    items: list[tuple[str, int]],
    batch_size: int = 32,
    bootstrap: int = 1000,
    seed: int = 0,
    prior: float | str | None = None,
    leave_out_refused: bool = True,
) -> ExternalResult:
    """Predict every labelled file as served and compute the figures; unreadable files are listed, not scored,
    and so are images refused as out of distribution (served without a label), unless `leave_out_refused` is
    False (the stress sets: how the model ranks images unlike its training ones is what they measure).
    With `prior`, the probabilities are first moved to that class balance (see prior_shift.py)."""
    label_of = dict(items)
    files, labels, scores, unreadable, refused = [], [], [], [], []
    for batch in prepared_batches([f for f, _ in items], classifier.info.image_size, batch_size, workers=4):
        ok = [item for item in batch if item.x is not None]
        unreadable += [f"{item.file}: {item.error}" for item in batch if item.error]
        if ok:
            for item, pred in zip(ok, classifier.predict(np.stack([i.x for i in ok])), strict=True):
                if pred.refused:  # served without a label: a figure at the threshold would count one it never gave
                    refused.append(f"{item.file}: {pred.refused}")
                    if leave_out_refused:
                        continue
                files.append(item.file)
                labels.append(label_of[item.file])
                scores.append(pred.probability)
    if len(set(labels)) < 2:
        why = (
            f" ({len(refused)} of {len(refused) + len(files)} readable images were refused as out of distribution "
            "by this version: the images are unlike its training images)"
            if refused
            else ""
        )
        raise PipelineError(f"external validation needs labelled images of both NORMAL and PNEUMONIA{why}")
    y, s = np.array(labels), np.array(scores)
    adjusted = None
    if prior is not None:
        s, adjusted = adjust_for_prior(classifier, s, prior)
    patients = patient_keys(files)
    grouped = len(set(patients)) < len(patients)
    table, ece = reliability(y, s)
    ci95 = bootstrap_ci(y, s, classifier.info.threshold, bootstrap, seed, groups=patients if grouped else None)
    return ExternalResult(
        n=len(files),
        n_patients=len(set(patients)),
        at_threshold=binary_metrics(y, s, classifier.info.threshold),
        at_half=binary_metrics(y, s, 0.5),
        ci95=ci95,
        ci_method=interval_method(ci95, len(set(patients)) if grouped else None),
        brier=float(skm.brier_score_loss(y, s)),
        ece=ece,
        reliability=table,
        files=files,
        labels=labels,
        scores=[round(float(v), 6) for v in s],
        unreadable=unreadable,
        prior=adjusted,
        refused=refused,
    )
