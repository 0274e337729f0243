"""The stress stage: score the evaluated model on a shift-stress set built from the test split.

Each transform of ``pipeline/data/stress.py`` (exposure, contrast, gamma, resolution, border, crop)
is applied to the first ``stress.per_class`` decodable test images of each class (from the index);
``stress.originals``, when set, adds a labelled folder scored as is (e.g. full-resolution originals).
Every set is scored as served (calibration and threshold from the evaluation), so ``dvc exp show`` and
the model card compare configurations on robustness, not only on the test split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from pipeline.core.atomic import staged_dir, write_text
from pipeline.core.config import Params
from pipeline.data import source
from pipeline.data.dataset_index import read_index
from pipeline.data.stress import build_stress_set, stress_sources
from pipeline.modeling import model_store
from pipeline.modeling.evaluation import Evaluation
from pipeline.registry import packaging, tracking
from pipeline.serving import scoring
from pipeline.serving.classifier import Classifier

SUMMARY_KEYS = ("roc_auc", "sensitivity", "specificity")


def summarize(sets: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean and worst of each figure over the sets (the worst set is what a new hospital may be)."""
    out = {}
    for key in SUMMARY_KEYS:
        values = np.array([s[key] for s in sets.values()])
        out[f"{key}_mean"], out[f"{key}_min"] = round(float(values.mean()), 4), round(float(values.min()), 4)
    return out


def run(params: Params) -> str:
    s = params.stress
    ev = Evaluation.load(params.evaluate.metrics)
    model, metadata = model_store.load(params.train.model_dir)
    ref = tracking.load_run_ref(params.mlflow.run_file)
    classifier = Classifier(model, packaging.model_info(metadata, ev, ref.run_id, ""))
    originals = source.originals_folder(s)
    with staged_dir(s.out) as tmp:
        picked = stress_sources(read_index(params.index.path), params.data.root, s.per_class)
        counts = build_stress_set(picked, tmp, originals)
    sets: dict[str, dict[str, Any]] = {}
    for name in counts:
        files = scoring.labelled_files(Path(s.out) / name)
        r = scoring.score(classifier, files, params.serve.batch_size, bootstrap=0, leave_out_refused=False)
        t = r.at_threshold
        (_, fp), (fn, _) = t.confusion
        sets[name] = {
            **{k: round(float(getattr(t, k)), 4) for k in SUMMARY_KEYS},
            "brier": round(r.brier, 4),
            "images": r.n,
            "missed": int(fn),
            "false_alarms": int(fp),
            "refused": len(r.refused),  # out of distribution: scored here, served without a label
        }
    report = {"threshold": round(ev.threshold, 6), "summary": summarize(sets), "sets": sets}
    write_text(s.report, json.dumps(report, indent=2) + "\n")
    tracking.configure(params.mlflow)
    with mlflow.start_run(run_id=ref.run_id):
        mlflow.log_metrics({f"stress_{k}": v for k, v in report["summary"].items()})
        mlflow.log_artifact(s.report, "evaluation")
    lines = [f"stress: {len(sets)} sets, scored at threshold {ev.threshold:.4f}"]
    lines += [
        f"  {name:<20} AUC {v['roc_auc']:.3f}  sens {v['sensitivity']:.3f}  spec {v['specificity']:.3f}"
        for name, v in sets.items()
    ]
    summary = report["summary"]
    lines.append(
        f"  mean / worst: AUC {summary['roc_auc_mean']:.3f} / {summary['roc_auc_min']:.3f}  "
        f"sens {summary['sensitivity_mean']:.3f} / {summary['sensitivity_min']:.3f}  "
        f"spec {summary['specificity_mean']:.3f} / {summary['specificity_min']:.3f}"
    )
    return "\n".join(lines)
