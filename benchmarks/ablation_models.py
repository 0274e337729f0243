"""The trained models of a ``benchmarks/ablation.py`` work folder, restored one at a time for re-scoring
(``benchmarks/against_class.py``, ``benchmarks/behaviour.py``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np

import pipeline.modeling.models  # noqa: F401 - registers the custom layers for loading
from pipeline.modeling.metrics import apply_temperature, class_probabilities
from pipeline.serving.behaviour import Probabilities


def arguments(doc: str) -> argparse.Namespace:
    """--workdir (the ablation's), --shared (the shared data) and the experiment names."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("experiments", nargs="+")
    return parser.parse_args()


def restored(args: argparse.Namespace) -> Iterator[tuple[str, keras.Model, dict]]:
    """Each experiment of ``args.experiments`` applied to ``args.workdir`` (``dvc exp apply``), then its model and
    metrics; an unknown name gets a table row saying so. The register stage's model card is not cached, so apply
    warns (and exits non-zero) for every experiment: that is not a failure."""
    dvc = str(Path(sys.executable).parent / "dvc")
    for name in args.experiments:
        done = subprocess.run([dvc, "exp", "apply", name], cwd=args.workdir, capture_output=True, text=True)
        if "unknown git revision" in done.stderr.lower():
            print(f"| {name} | (no such experiment in {args.workdir}) |", flush=True)
            continue
        metrics = json.loads((args.workdir / "reports" / "metrics.json").read_text())
        yield name, keras.saving.load_model(args.workdir / "models" / "model.keras", compile=False), metrics


def calibrated(model: keras.Model, metrics: dict) -> Probabilities:
    """Model inputs -> P(pneumonia) with the experiment's own temperature and bias, as serving applies them."""

    def probabilities(x: np.ndarray) -> np.ndarray:
        out = np.asarray(model.predict(x, batch_size=128, verbose=0), np.float64)
        return class_probabilities(apply_temperature(out, metrics["temperature"], metrics["calibration_bias"]))[:, -1]

    return probabilities
