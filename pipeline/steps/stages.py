"""The pipeline's DAG, written once.

Each stage names its step module (``pipeline.steps.<stage>``, whose ``run(params)`` does the work)
and what DVC must know about it: data deps, params sections, outputs, metrics and plots. Its code
deps are not written by hand: they are the files of every module the stage runs, found from the
import graph (grimp), with the CLI that DVC starts it through. ``dvc.yaml`` is generated from this
list (``pneumo dvc-yaml --write``); a test fails if the committed file drifts, and another runs each
stage and fails if it loaded a module its deps do not name. The Prefect flow runs these stages
through DVC.

Step modules are imported by name when a stage runs (``run_stage``), the one lazy import in the
package: ``pneumo --help`` and the flow's planning must not load TensorFlow, MLflow or GX.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import Params
from pipeline.core.imports import PACKAGE, imported_by

CLI_MODULE = "pipeline.steps.cli"
ROOT = Path(__file__).resolve().parents[2]  # the folder holding the package (the project root)


@dataclass(frozen=True)
class Stage:
    name: str
    data_deps: list[str]
    params: list[str]
    outs: list[str] = field(default_factory=list)  # all cached: `dvc pull` in a clone restores every one
    metrics: list[str] = field(default_factory=list)
    plots: list[dict[str, dict[str, str]] | str] = field(default_factory=list)
    always_changed: bool = False  # DVC runs it on every repro; what it writes decides whether the next stage runs
    persist: bool = False  # its outputs stay in place while it runs (it may keep them)

    @property
    def module(self) -> str:
        return f"{PACKAGE}.steps.{self.name}"

    @property
    def deps(self) -> list[str]:
        return self.data_deps + code_deps(self.module)

    def run(self, params: Params) -> str:
        return run_stage(self.name, params)


def run_stage(name: str, params: Params) -> str:
    """Run a stage's step module in this process (DVC does it through ``pneumo <stage>``)."""
    return importlib.import_module(f"{PACKAGE}.steps.{name}").run(params)


def module_file(module: str) -> str:
    """``pipeline.data.splits`` -> ``pipeline/data/splits.py``; a package -> its ``__init__.py``."""
    path = Path(*module.split("."))
    return (path / "__init__.py").as_posix() if (ROOT / path).is_dir() else path.with_suffix(".py").as_posix()


def modules_run_by(module: str) -> set[str]:
    """`module`, the CLI, everything they import (directly, transitively, at any depth of a function),
    and every package ``__init__`` Python runs on the way."""
    found = imported_by(module) | imported_by(CLI_MODULE)
    for name in list(found):
        parts = name.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return found


def code_deps(module: str) -> list[str]:
    return sorted(module_file(m) for m in modules_run_by(module))


def stages(params: Params) -> list[Stage]:
    p = params
    model = f"{p.train.model_dir}/model.keras"
    return [
        # A source's files can change under the same data.local_path: `source` fingerprints them every time
        # (and stress.originals', model.weights'), so that the stages reading them run again
        Stage(
            "source",
            [],
            params=["data", "stress.originals", "stress.fingerprint", "model.weights", "model.weights_fingerprint"],
            outs=[p.data.fingerprint, p.stress.fingerprint, p.model.weights_fingerprint],
            always_changed=True,
            persist=True,
        ),
        Stage("ingest", [p.data.fingerprint], params=["data"], outs=[p.data.root]),
        Stage(
            "index",
            [p.data.root],
            params=["index", "split"],
            outs=[p.index.path, p.index.quarantine],
        ),
        Stage(
            "validate",
            [p.index.path],
            params=["validation"],
            metrics=[p.validation.report],
            outs=[p.validation.data_docs],
        ),
        Stage(
            "shard",
            [p.index.path, p.validation.report, p.data.root],
            params=["shards"],
            outs=[p.shards.out],
        ),
        Stage(
            "train",
            # shards: training streams them and never opens data.root; files: it reads the images there
            [
                p.index.path,
                p.validation.report,
                p.shards.out if p.train.input == "shards" else p.data.root,
                p.model.weights_fingerprint,  # a weights file replaced under the same name
            ],
            params=["task", "model", "train"],
            outs=[model, f"{p.train.model_dir}/metadata.json", p.train.tensorboard_dir, p.mlflow.run_file],
            metrics=["reports/train.json"],
            plots=[
                {"reports/training/history.csv": {"x": "epoch", "y": "val_auc", "title": "Validation AUC"}},
                "reports/training/history.png",
            ],
        ),
        Stage(
            "evaluate",
            [model, p.index.path, p.data.root, p.mlflow.run_file],
            params=["evaluate"],
            metrics=[p.evaluate.metrics],
            outs=[p.evaluate.predictions],
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
            "stress",
            [
                model,
                p.evaluate.metrics,
                p.data.root,
                p.index.path,
                p.mlflow.run_file,
                p.stress.fingerprint,
            ],
            params=["stress"],
            outs=[p.stress.out],
            metrics=[p.stress.report],
        ),
        Stage(
            "register",
            [
                p.evaluate.metrics,
                p.evaluate.predictions,
                p.stress.report,
                p.mlflow.run_file,
                model,
                p.index.path,
                p.data.root,
            ],
            params=["registry", "package"],
            outs=[f"{p.train.model_dir}/model_card.md", f"{p.train.model_dir}/model_card"],
            metrics=[p.registry.decision_file],
        ),
    ]


def always_run(params: Params) -> frozenset[str]:
    """The stages DVC runs on every repro (``always_changed``): running them says nothing changed."""
    return frozenset(s.name for s in stages(params) if s.always_changed)


def dvc_yaml(params: Params) -> str:
    """The dvc.yaml text for `stages(params)`: each stage runs ``pneumo <name>``."""
    out: dict[str, Any] = {}
    for s in stages(params):
        spec: dict[str, Any] = {"cmd": f"pneumo {s.name}", "deps": s.deps, "params": s.params}
        if s.outs:
            spec["outs"] = [{o: {"persist": True}} for o in s.outs] if s.persist else list(s.outs)
        if s.always_changed:
            spec["always_changed"] = True
        if s.metrics:
            spec["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        if s.plots:
            spec["plots"] = [
                {p: {"cache": False}} if isinstance(p, str) else {k: {"cache": False, **v} for k, v in p.items()}
                for p in s.plots
            ]
        out[s.name] = spec
    header = (
        "# Generated from pipeline/steps/stages.py by `pneumo dvc-yaml --write` (code deps from the import graph);\n"
        "# edit that list, not this file.\n"
    )
    return header + yaml.safe_dump({"stages": out}, sort_keys=False, default_flow_style=False)
