"""The pipeline's DAG, written once.

Each stage names its step function and what DVC must know about it (code and data deps, params
sections, outputs, metrics). ``dvc.yaml`` is generated from this list (``pneumo dvc-yaml``) and a
test fails if the committed file drifts; the Prefect flow runs the same step functions in the
same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline import dataset_index, ingest, splits, validation
from pipeline.config import Params
from pipeline.errors import DataError


def run_ingest(params: Params) -> str:
    return ingest.ingest(params.data).summary()


def run_index(params: Params) -> str:
    index = dataset_index.build_index(params.data.root, params.index.workers, params.index.patient_scopes)
    index = splits.assign_splits(index, params.split)
    dataset_index.write_index(index, params.index.path, params.index.quarantine)
    usable = index[index["decodable"]]
    by_split = usable.groupby("split").agg(images=("path", "size"), patients=("patient_id", "nunique"))
    lines = [f"index: {len(index)} images, {int((~index['decodable']).sum())} quarantined -> {params.index.path}"]
    lines += [f"  {s:<5} {int(r.images)} images, {int(r.patients)} patients" for s, r in by_split.iterrows()]
    return "\n".join(lines)


def run_validate(params: Params) -> str:
    report = validation.validate(dataset_index.read_index(params.index.path), params.validation)
    if not report.success:
        print(report.summary())
        names = "; ".join(f"{c.check} ({c.unexpected} rows)" for c in report.failures)
        raise DataError(f"validation failed: {names}; see {params.validation.report}")
    return report.summary()


def run_train(params: Params) -> str:
    from pipeline import train_step

    return train_step.run(params)


def run_evaluate(params: Params) -> str:
    from pipeline import evaluate_step

    return evaluate_step.run(params)


def run_register(params: Params) -> str:
    from pipeline import register_step

    return register_step.run(params)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Params], str]
    deps: list[str]
    params: list[str]
    outs: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    uncached_outs: list[str] = field(default_factory=list)
    plots: list[dict[str, dict[str, str]] | str] = field(default_factory=list)


def stages(params: Params) -> list[Stage]:
    p = params
    return [
        Stage(
            "ingest",
            run_ingest,
            deps=["pipeline/ingest.py", "pipeline/synthetic.py", "pipeline/kaggle_download.py"],
            params=["data"],
            outs=[p.data.root],
        ),
        Stage(
            "index",
            run_index,
            deps=[p.data.root, "pipeline/dataset_index.py", "pipeline/splits.py", "pipeline/naming.py"],
            params=["index", "split"],
            outs=[p.index.path],
            uncached_outs=[p.index.quarantine],
        ),
        Stage(
            "validate",
            run_validate,
            deps=[p.index.path, "pipeline/validation.py"],
            params=["validation"],
            metrics=[p.validation.report],
            uncached_outs=[p.validation.data_docs],
        ),
        Stage(
            "train",
            run_train,
            deps=[
                p.index.path,
                p.validation.report,
                p.data.root,
                "pipeline/train_step.py",
                "pipeline/training.py",
                "pipeline/models.py",
                "pipeline/data_pipeline.py",
            ],
            params=["task", "model", "train"],
            outs=[f"{p.train.model_dir}/model.keras", f"{p.train.model_dir}/metadata.json"],
            metrics=["reports/train.json"],
            uncached_outs=[p.train.tensorboard_dir, p.mlflow.run_file],
            plots=[
                {"reports/training/history.csv": {"x": "epoch", "y": "val_auc", "title": "Validation AUC"}},
                "reports/training/history.png",
            ],
        ),
        Stage(
            "evaluate",
            run_evaluate,
            deps=[
                f"{p.train.model_dir}/model.keras",
                p.index.path,
                p.data.root,
                p.mlflow.run_file,
                "pipeline/evaluate_step.py",
                "pipeline/evaluation.py",
                "pipeline/metrics.py",
            ],
            params=["evaluate"],
            metrics=[p.evaluate.metrics],
            uncached_outs=[p.evaluate.predictions],
            plots=[
                {f"{p.evaluate.plots_dir}/roc.csv": {"x": "fpr", "y": "tpr", "title": "ROC (test)"}},
                {f"{p.evaluate.plots_dir}/pr.csv": {"x": "recall", "y": "precision", "title": "PR (test)"}},
                {
                    f"{p.evaluate.plots_dir}/confusion.csv": {
                        "x": "predicted",
                        "y": "actual",
                        "template": "confusion",
                        "title": "Confusion (test)",
                    }
                },
                p.evaluate.figures_dir,
            ],
        ),
        Stage(
            "register",
            run_register,
            deps=[
                p.evaluate.metrics,
                p.evaluate.predictions,
                p.mlflow.run_file,
                f"{p.train.model_dir}/model.keras",
                p.index.path,
                p.data.root,
                "pipeline/registry.py",
                "pipeline/register_step.py",
                "pipeline/packaging.py",
                "pipeline/model_card.py",
                "pipeline/pyfunc_model.py",
            ],
            params=["registry", "package"],
            outs=[f"{p.train.model_dir}/model_card.md", f"{p.train.model_dir}/model_card"],
            metrics=[p.registry.decision_file],
        ),
    ]


def dvc_yaml(params: Params) -> str:
    """The dvc.yaml text for `stages(params)`: each stage runs ``pneumo <name>``."""
    out: dict[str, Any] = {}
    for s in stages(params):
        spec: dict[str, Any] = {"cmd": f"pneumo {s.name}", "deps": s.deps, "params": s.params}
        outs: list[Any] = list(s.outs) + [{o: {"cache": False}} for o in s.uncached_outs]
        if outs:
            spec["outs"] = outs
        if s.metrics:
            spec["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        if s.plots:
            spec["plots"] = [
                {p: {"cache": False}} if isinstance(p, str) else {k: {"cache": False, **v} for k, v in p.items()}
                for p in s.plots
            ]
        out[s.name] = spec
    header = "# Generated from pipeline/stages.py by `pneumo dvc-yaml --write`; edit that list, not this file.\n"
    return header + yaml.safe_dump({"stages": out}, sort_keys=False, default_flow_style=False)
