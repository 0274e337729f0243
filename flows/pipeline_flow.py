"""The Prefect flow: the DVC pipeline, stage by stage, run by a worker and watched in the Prefect UI.

DVC owns caching and lineage, Prefect owns scheduling, retries, where a stage runs and the UI. The
flow runs `source` first (it fingerprints the data read from outside the project, every time), then asks
`dvc status` which stages changed; the stages before the first changed one are reported
cached without starting anything, and from there each stage is a task running
`dvc repro --single-item <stage>`, so DVC re-runs exactly what `dvc repro` would and writes the same
dvc.lock. Flow parameter overrides are written into params.yaml first (comments kept), so dvc.lock
and the MLflow run record the values that ran. Stages doing I/O that can fail for a while (ingest's
download, register's tracking server) are retried with exponential backoff, and only for transient
errors. With ``push`` (the team deployments), a successful run ends with `dvc push --run-cache` (retried
with backoff on transient errors too, in dvc_runner.push_outputs), so the next run's fresh clone pulls what
this one computed. The run ends with a markdown artifact: which stages ran or were cached with their
dvc.lock hashes, the test metrics, the champion decision and the MLflow run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.dvc_runner import StageRun, changed_stages, lock_outs, push_outputs, repro_stage, require_remote
from flows.turns import project_turn
from pipeline.core.config import Params, load_params, write_overrides
from pipeline.core.errors import ConfigError, TransientError
from pipeline.modeling.metrics import interval
from pipeline.registry import model_card
from pipeline.registry.tracking import load_run_ref
from pipeline.steps import stages as stage_list

PARAMS_FILE = "params.yaml"  # what dvc.yaml's stages read (`pneumo <stage>` and their `params:`)

IO_STAGES = {"ingest": 3, "register": 3}  # stage -> task retries
# The S3 keys for `dvc push`, as prefect.yaml's pull steps read them for `dvc pull` (environment variable -> block).
REMOTE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "pneumo-s3-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "pneumo-s3-secret-access-key",
}


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry I/O failures, never bad data, bad config or training bugs."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TransientError | ConnectionError | TimeoutError)


def run_stage(name: str) -> StageRun:
    logger = get_run_logger()
    return repro_stage(name, echo=logger.info)


def cached_stage(name: str) -> StageRun:
    return StageRun(name, ran=False, seconds=0.0, outs=lock_outs(name))


def stage_task(name: str, cached: bool) -> Any:
    retries = 0 if cached else IO_STAGES.get(name, 0)
    return task(
        cached_stage if cached else run_stage,
        name=name,
        task_run_name=f"{name} (cached)" if cached else name,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=5) if retries else 0,
        retry_condition_fn=retry_on_transient if retries else None,
        cache_policy=NO_CACHE,
    )


def flow_stage_names(params: Params, ingest: bool) -> list[str]:
    """The stages a flow run executes: the DVC stage list, without ingest when asked (`source` stays: it keeps
    the fingerprint of pulled data whose source is out of reach, and refreshes stress.originals')."""
    return [s.name for s in stage_list.stages(params) if ingest or s.name != "ingest"]


def run_changed(names: list[str], always: Collection[str], logger: Any) -> list[StageRun]:
    """`names` in order through DVC: the stages before the first changed one reported cached without starting
    anything, then each one a task. The `always` ones (`source`: how DVC learns whether the data source
    changed) run every time, and `dvc status` is asked after them."""
    runs: list[StageRun] = []
    changed: set[str] | None = None
    started = False
    for name in names:
        if name in always:
            runs.append(stage_task(name, cached=False)(name))
        else:
            changed = changed_stages() if changed is None else changed
            started = started or name in changed
            runs.append(stage_task(name, cached=not started)(name))
        logger.info("%s: %s", name, runs[-1].status)
    return runs


def _secret(name: str) -> str | None:
    """A Prefect Secret block's value, None when there is no such block."""
    try:
        return Secret.load(name).get()
    except ValueError:  # Prefect's "Unable to find block document named ..."
        return None


def remote_credentials() -> None:
    """The remote's keys from the Secret blocks into this process's environment, where it has none of them
    (a team deployment's flow run: its pull step got them for `dvc pull` only)."""
    if any(os.environ.get(var) for var in REMOTE_SECRETS):
        return
    found = {var: _secret(block) for var, block in REMOTE_SECRETS.items()}
    os.environ.update({var: value for var, value in found.items() if value})


def push_run(logger: Any) -> None:
    """What the run computed, to the DVC remote: outputs and run-cache (`dvc push --run-cache`). Transient
    failures are retried inside push_outputs (tenacity, as registry I/O), not by a Prefect task: the push runs
    in the flow, within the project's turn, after the stage tasks."""
    remote_credentials()
    push_outputs(echo=logger.info)
    logger.info("dvc push --run-cache: done")


def as_overrides(overrides: dict[str, Any] | None) -> list[str]:
    """{'train.epochs': 3} -> ['train.epochs=3'] (values as JSON, which the YAML parser reads back)."""
    return [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()]


def stages_markdown(runs: list[StageRun]) -> list[str]:
    lines = ["| stage | DVC | seconds | outputs in dvc.lock (md5) |", "|---|---|---|---|"]
    for r in runs:
        outs = "<br>".join(f"`{path}` {md5[:12]}" for path, md5 in r.outs.items()) or "-"
        lines.append(f"| {r.name} | **{r.status}** | {r.seconds:.1f} | {outs} |")
    return [*lines, ""]


def stages_that_ran(runs: list[StageRun], always: Collection[str]) -> list[str]:
    """The stages DVC re-ran because something changed: the `always` ones run every time, so they are not."""
    return [r.name for r in runs if r.ran and r.name not in always]


def summary_markdown(params: Params, runs: list[StageRun]) -> str:
    ran = stages_that_ran(runs, stage_list.always_run(params))
    lines = ["# Pneumonia pipeline run", "", f"Stages run by DVC: {', '.join(ran) or 'none (all cached)'}.", ""]
    lines += stages_markdown(runs)
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
            lines.append(
                f"| {key} | {m['test'][key]:.3f} | {interval(ci, key).strip()} | {m['test_at_half'][key]:.3f} |"
            )
        lines.append("")
    if decision_file.is_file():
        d = json.loads(decision_file.read_text())
        lines += [f"**Registry:** {d['model_name']} version {d['version']}: **{d['outcome']}** ({d['reason']}).", ""]
        card = Path(params.train.model_dir) / "model_card.md"
        if card.is_file():
            logged = f"{model_card.artifact_dir(d['model_name'], d['version'])}/model_card.md"
            lines += [f"**Model card:** `{card.resolve()}` (and the run artifact `{logged}`).", ""]
    run_file = Path(params.mlflow.run_file)
    if run_file.is_file():
        lines.append(f"**MLflow run:** {load_run_ref(run_file).ui_hint}")
    return "\n".join(lines)


@flow(name="pneumonia-pipeline", log_prints=True)
def pneumonia_pipeline(
    ingest: bool = True,
    overrides: dict[str, Any] | None = None,
    params_file: str = PARAMS_FILE,
    workdir: str | None = None,
    push: bool = False,
) -> dict[str, str]:
    """Source, ingest, index, validate, shard, train, evaluate, stress and register through DVC; returns each
    stage's status.

    `overrides` maps dotted params.yaml keys to values, e.g. {"train.epochs": 3}; they are written into
    params.yaml (the file every DVC stage reads) before DVC runs. `ingest=False` leaves the data as it is
    (pulled by `dvc pull`).
    `workdir` is the project folder to run in (default: the current one). `params_file` can only be
    params.yaml, the file DVC's stages read (pass `overrides` instead of another file).
    `push=True` (the team deployments, whose clone is gone after the run): once every stage succeeded,
    `dvc push --run-cache` to the default remote, with the S3 keys from the Secret blocks prefect.yaml's
    `dvc pull` uses when the environment has none; a ConfigError when no default remote is configured. The
    push is retried on transient errors (dvc_runner.PUSH_ATTEMPTS, exponential backoff).
    """
    if workdir:
        os.chdir(workdir)
    if Path(params_file).resolve() != Path(PARAMS_FILE).resolve():
        raise ConfigError(
            f"params_file {params_file}: every stage runs through DVC, which reads {PARAMS_FILE} (pass `overrides`)"
        )
    logger = get_run_logger()
    start = time.perf_counter()
    override_list = as_overrides(overrides)
    load_params(PARAMS_FILE, override_list)  # a bad key fails here, before any work
    if push:
        require_remote()  # and a missing remote
    with project_turn("pneumonia-pipeline", logger.info):
        params = load_params(PARAMS_FILE, override_list)  # as it is now: another flow may have changed it
        if override_list:
            write_overrides(PARAMS_FILE, override_list)
            logger.info("params.yaml: %s", ", ".join(override_list))
        always = stage_list.always_run(params)
        runs = run_changed(flow_stage_names(params, ingest), always, logger)
        summary = summary_markdown(params, runs)  # of this run's outputs, before another flow's turn
        if push:
            push_run(logger)
    create_markdown_artifact(
        summary,
        key="pneumonia-pipeline-summary",
        description="Stages run or cached by DVC, test metrics, champion decision and MLflow run",
    )
    logger.info("pipeline finished in %.1f s; ran: %s", time.perf_counter() - start, stages_that_ran(runs, always))
    return {r.name: r.status for r in runs}


if __name__ == "__main__":
    pneumonia_pipeline()
