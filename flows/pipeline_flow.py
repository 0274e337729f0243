"""The Prefect flow: the same stages as `dvc repro`, from the same list (pipeline/stages.py).

Each stage is a task calling the stage's step function. Stages doing I/O that can fail for a while
(ingest's download, register's tracking server and registry) are retried with exponential backoff,
and only for transient errors; a training or data bug fails at once. Flow parameters override
params.yaml keys. The run ends with a markdown artifact: test metrics, the champion decision and
the MLflow run link.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from pipeline.core.config import Params, load_params
from pipeline.core.errors import TransientError
from pipeline.registry.tracking import load_run_ref
from pipeline.steps import stages as stage_list

IO_STAGES = {"ingest": 3, "register": 3}  # stage -> task retries


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry I/O failures, never bad data, bad config or training bugs."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TransientError | ConnectionError | TimeoutError)


def run_stage(name: str, params_file: str, overrides: list[str]) -> str:
    params = load_params(params_file, overrides)
    stage = next(s for s in stage_list.stages(params) if s.name == name)
    return stage.run(params)


def stage_task(name: str) -> Any:
    retries = IO_STAGES.get(name, 0)
    return task(
        run_stage,
        name=name,
        task_run_name=name,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=5) if retries else 0,
        retry_condition_fn=retry_on_transient if retries else None,
        cache_policy=NO_CACHE,
    )


def flow_stage_names(params: Params, ingest: bool) -> list[str]:
    """The stages a flow run executes: the DVC stage list, without ingest unless asked."""
    return [s.name for s in stage_list.stages(params) if ingest or s.name != "ingest"]


def as_overrides(overrides: dict[str, Any] | None) -> list[str]:
    """{'train.epochs': 3} -> ['train.epochs=3'] (values as JSON, which the YAML parser reads back)."""
    return [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()]


def summary_markdown(params: Params) -> str:
    lines = ["# Pneumonia pipeline run", ""]
    metrics_file, decision_file = Path(params.evaluate.metrics), Path(params.registry.decision_file)
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        ci = m.get("ci95", {})
        lines += [
            f"Threshold **{m['threshold']:.4f}**, chosen on validation for sensitivity >= {m['target_sensitivity']}.",
            "",
            "| test metric | at threshold | 95% CI | at 0.5 |",
            "|---|---|---|---|",
        ]
        for key in ("roc_auc", "sensitivity", "specificity", "accuracy", "precision", "f1", "pr_auc", "brier"):
            lo_hi = ci.get(key)
            ci_text = f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""
            lines.append(f"| {key} | {m['test'][key]:.3f} | {ci_text} | {m['test_at_half'][key]:.3f} |")
        lines.append("")
    if decision_file.is_file():
        d = json.loads(decision_file.read_text())
        lines += [f"**Registry:** {d['model_name']} version {d['version']}: **{d['outcome']}** ({d['reason']}).", ""]
        card = Path(params.train.model_dir) / "model_card.md"
        if card.is_file():
            lines += [f"**Model card:** `{card.resolve()}` (and the run artifact `model_card/model_card.md`).", ""]
    run_file = Path(params.mlflow.run_file)
    if run_file.is_file():
        lines.append(f"**MLflow run:** {load_run_ref(run_file).ui_hint}")
    return "\n".join(lines)


@flow(name="pneumonia-pipeline", log_prints=True)
def pneumonia_pipeline(
    ingest: bool = False,
    overrides: dict[str, Any] | None = None,
    params_file: str = "params.yaml",
    workdir: str | None = None,
) -> dict[str, str]:
    """Validate, train, evaluate and register (and ingest first when `ingest` is true).

    `overrides` maps dotted params.yaml keys to values, e.g. {"train.epochs": 3}.
    `workdir` is the project folder to run in (default: the current one).
    """
    if workdir:
        os.chdir(workdir)
    logger = get_run_logger()
    override_list = as_overrides(overrides)
    params = load_params(params_file, override_list)  # a bad key fails here, before any work
    results: dict[str, str] = {}
    for name in flow_stage_names(params, ingest):
        results[name] = stage_task(name)(name, params_file, override_list)
        logger.info("%s\n%s", name, results[name])
    create_markdown_artifact(
        summary_markdown(params),
        key="pneumonia-pipeline-summary",
        description="Test metrics, champion decision and MLflow run",
    )
    return results


if __name__ == "__main__":
    pneumonia_pipeline()
