"""Behaviour figures of a trained model: one X-ray at two resolutions, and small exposure changes.

``tests/test_model_behaviour.py`` asserts limits on them for the session's real-data champion;
``benchmarks/behaviour.py`` prints them for the models of an ablation work folder, so that their spread
over trainings (seeds, levers) is measured rather than guessed from one run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.stress import small_changes
from pipeline.serving import image_io

# (N, S, S, 1) model inputs in [0, 255] -> (N,) calibrated probability of pneumonia
Probabilities = Callable[[np.ndarray], np.ndarray]


def model_inputs(files: list[Path], size: int) -> np.ndarray:
    """Files decoded and resized as `pneumo predict` and the service do."""
    return np.stack([image_io.model_input(image_io.load(Path(f).read_bytes()), size) for f in files])


def resolution_pairs(originals: Path, copies: Path) -> list[tuple[Path, Path]]:
    """(original, copy) for every image under `originals` with a namesake under `copies`, in name order."""
    by_name = {p.name: p for p in Path(copies).rglob("*.jpeg")}
    return [(f, by_name[f.name]) for f in sorted(Path(originals).rglob("*.jpeg")) if f.name in by_name]


@dataclass(frozen=True)
class PairAgreement:
    full: np.ndarray  # p(original), per pair
    copy: np.ndarray  # p(copy)
    median: float  # |p(original) - p(copy)|
    largest: float
    labels_agree: float  # share of pairs on the same side of the threshold

    @property
    def pairs(self) -> int:
        return len(self.full)

    def summary(self) -> str:
        return (
            f"{self.pairs} full-resolution/copy pairs: |dp| median {self.median:.4f}, max {self.largest:.4f}, "
            f"labels agree {self.labels_agree:.1%}"
        )


def pair_agreement(
    probabilities: Probabilities, pairs: list[tuple[Path, Path]], size: int, threshold: float
) -> PairAgreement:
    full = probabilities(model_inputs([f for f, _ in pairs], size))
    small = probabilities(model_inputs([c for _, c in pairs], size))
    diff = np.abs(full - small)
    agree = np.mean((full >= threshold) == (small >= threshold))
    return PairAgreement(full, small, float(np.median(diff)), float(diff.max()), float(agree))


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class Flips:
    images: int
    confident: int  # images at least `margin` in logit from the threshold
    by_change: dict[str, tuple[int, int]]  # change -> (confident labels flipped, labels flipped)

    @property
    def confident_flips(self) -> int:
        return sum(c for c, _ in self.by_change.values())

    def summary(self) -> str:
        lines = [f"{self.images} images, {self.confident} confident (|logit - logit(threshold)| >= 2)"]
        lines += [f"  {name:<16} flips: {c} confident, {a} in all" for name, (c, a) in self.by_change.items()]
        return "\n".join(lines)


def flips(probabilities: Probabilities, x: np.ndarray, threshold: float, margin: float = 2.0) -> Flips:
    """Labels that `stress.small_changes` (clipped to [0, 255]) turn over, among all and the confident ones."""
    base = probabilities(x)
    confident = np.abs(logit(base) - logit(threshold)) >= margin  # odds at least e^2 = 7.4 times the threshold's
    label = base >= threshold
    by_change = {}
    for name, changed in small_changes(x).items():
        flipped = (probabilities(np.clip(changed, 0, 255).astype(np.float32)) >= threshold) != label
        by_change[name] = (int(flipped[confident].sum()), int(flipped.sum()))
    return Flips(len(x), int(confident.sum()), by_change)
