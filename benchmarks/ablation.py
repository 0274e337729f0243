"""One row of the model-quality ablation: train with params overrides on the shared 224 px images, then
score the shared test split and the shift-stress set, and print the figures with the training time.

    .venv/bin/python benchmarks/ablation.py                       # the current params.yaml
    .venv/bin/python benchmarks/ablation.py -S model.standardize=true -S model.image_size=96

Runs ingest, index, validate, train and evaluate in a temporary folder with its own MLflow store; the
stress set (pipeline/data/stress.py) is built from the shared test split and the 48 originals. The
shared test split holds patients of the official *train* folder: these are not official-test figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core.config import load_params
from pipeline.data.stress import build_stress_set
from pipeline.modeling import model_store
from pipeline.serving import scoring
from pipeline.serving.classifier import Classifier, ModelInfo
from pipeline.steps import stages

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--per-class", type=int, default=30, help="stress-set images per class and transform")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pneumo-ablation-") as tmp, contextlib.chdir(tmp):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlruns/mlflow.db"
        params = load_params(
            REPO / "params.yaml",
            ["data.source=local", f"data.local_path={SHARED / 'chest_xray_224'}", "evaluate.bootstrap=200",
             *args.overrides],
        )  # fmt: skip
        timings = {}
        for name in ("ingest", "index", "validate", "train", "evaluate"):
            start = time.perf_counter()
            stages.run_stage(name, params)
            timings[name] = time.perf_counter() - start
        ev = json.loads(Path(params.evaluate.metrics).read_text())
        model, meta = model_store.load(params.train.model_dir)
        size, names = int(meta["input"]["shape"][0]), tuple(meta["class_names"])
        calibration = {"temperature": ev.get("temperature", 1.0), "calibration_bias": ev.get("calibration_bias", 0.0)}
        info = ModelInfo(ev["threshold"], names, size, params.task, meta["architecture"], meta["last_conv_layer"],
                         **calibration)  # fmt: skip
        classifier = Classifier(model, info)
        counts = build_stress_set(SHARED / "chest_xray_224" / "test", Path(tmp) / "stress", args.per_class,
                                  SHARED / "chest_xray_fullres_sample")  # fmt: skip
        rows = {}
        for name in counts:
            r = scoring.score(classifier, scoring.labelled_files(Path(tmp) / "stress" / name), bootstrap=0)
            rows[name] = (r.at_threshold.roc_auc, r.at_threshold.sensitivity, r.at_threshold.specificity)
    t = ev["test"]
    aucs, sens, specs = (np.array([v[i] for v in rows.values()]) for i in range(3))
    label = " ".join(args.overrides) or "params.yaml"
    print("| config | train min | test AUC | test sens | test spec | stress AUC mean / min | stress sens mean | "
          "stress spec mean / min |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {label} | {timings['train'] / 60:.1f} | {t['roc_auc']:.3f} | {t['sensitivity']:.3f} | "
          f"{t['specificity']:.3f} | {aucs.mean():.3f} / {aucs.min():.3f} | {sens.mean():.3f} | "
          f"{specs.mean():.3f} / {specs.min():.3f} |")  # fmt: skip
    for name, (auc, se, sp) in rows.items():
        print(f"  {name:<16} AUC {auc:.3f}  sens {se:.3f}  spec {sp:.3f}")


if __name__ == "__main__":
    main()
