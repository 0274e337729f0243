"""A hyperparameter sweep as a Prefect flow: one trial per combination of params.yaml overrides, in parallel.

The sweep expands a grid of dotted params.yaml keys (or draws random combinations, seeded), and checks
every combination against the typed schema before anything runs: a bad key or value fails the flow with
the schema's one-line error naming it. The data stages (source, ingest, index, validate, shard) are brought up to date
through DVC first, as the pipeline flow does (``data_stages=False``: they must already be, e.g. after
``dvc pull``). Each trial is a Prefect task, submitted to a thread pool limited to ``parallel``, that
runs the ordinary stage commands ``pneumo train`` and ``pneumo evaluate`` as subprocesses in its own
folder, ``sweeps/<sweep>/<trial>/``. With ``trial_deployment`` set, each of those tasks instead starts
the trial as a flow run of that deployment (``pneumonia-sweep-trial``, flow ``sweep_trial``) and waits
for it: the runs fan out to whichever workers serve the deployment's work pool, ``parallel`` at a time,
and the sweep folder must then be on a file system those workers share. Each trial folder holds its
own params.yaml (the project's, with the trial's overrides), its own outputs, the project's data shared
read-only through a symlink and a copy of dvc.lock (so the run records the real data version). Each
trial's MLflow run is a normal tracked run, nested under one parent run for the sweep
(``mlflow.parentRunId``, from ``PNEUMO_MLFLOW_PARENT_RUN_ID``).

The comparison table (trial, overrides, val ROC AUC of the saved model, best epoch's val AUC in
training, test ROC AUC, sensitivity, specificity, train seconds, MLflow run) is printed, published as a
Prefect markdown artifact and logged to the parent run (CSV and markdown). The winner is the trial whose
saved model has the best **validation** ROC AUC (for an ensemble the joined model's, not its best
network's); test figures are only reported. The winner is registered by ``pneumo register`` with
``registry.promotion: candidate``: a model version with its decision that gets ``@challenger`` at most,
never ``@champion``.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from random import Random
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.dvc_runner import run_pneumo
from flows.gpus import DEVICES, gpu_env, gpu_slot
from flows.pipeline_flow import PARAMS_FILE, as_overrides, flow_stage_names, retry_on_transient, run_changed
from flows.turns import project_turn
from pipeline.core import atomic
from pipeline.core.config import STAGE_OUTPUT_FILES, STAGE_OUTPUT_FOLDERS, Params, load_params, write_overrides
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.project import project_path
from pipeline.data.dataset_index import read_index
from pipeline.registry import tracking
from pipeline.registry.registry_lock import without_password
from pipeline.steps import stages as stage_list
from pipeline.steps.stages import ROOT as CODE_ROOT

DATA_STAGES = ("source", "ingest", "index", "validate", "shard")
SWEEPABLE = ("task", "model", "train", "evaluate")  # what a trial may change: the data stages are shared
SUMMARY_KEY = "pneumonia-sweep-summary"
TRIAL_ROW = "trial.json"  # a finished trial's row of the comparison, in its folder
TRIAL_POLL_SECONDS = 2


def _draw(key: str, spec: Any, rng: Random) -> Any:
    """One value of a random-search dimension: a list (a choice), or {uniform|loguniform|randint|choice: ...}."""
    if isinstance(spec, list) and spec:
        return rng.choice(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, arg),) = spec.items()
        if kind == "choice" and isinstance(arg, list) and arg:
            return rng.choice(arg)
        if kind in ("uniform", "loguniform", "randint") and isinstance(arg, list) and len(arg) == 2:
            lo, hi = arg
            number = int if kind == "randint" else (int, float)
            if not all(isinstance(v, number) and not isinstance(v, bool) for v in arg) or lo > hi:
                whole = "whole " if kind == "randint" else ""
                raise ConfigError(f"sweep: random {key}: {kind} needs two {whole}numbers, low <= high (got {arg!r})")
            if kind == "randint":
                return rng.randint(lo, hi)
            if kind == "uniform":
                return float(f"{rng.uniform(lo, hi):.6g}")
            if lo <= 0:
                raise ConfigError(f"sweep: random {key}: loguniform needs low > 0 (got {arg!r})")
            return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.6g}")
    raise ConfigError(
        f"sweep: random {key}: expected a list of values or one of {{uniform|loguniform|randint: [low, high]}}, "
        f"{{choice: [values]}} (got {spec!r})"
    )


def expand(
    grid: dict[str, list[Any]] | None = None,
    random: dict[str, Any] | None = None,
    trials: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The trials' overrides. A grid gives every combination (``trials``: a seeded sample of that many);
    ``random`` draws ``trials`` combinations from its distributions with ``seed``."""
    if grid and random:
        raise ConfigError(
            "sweep: give grid or random, not both (a run of the sweep deployment keeps its default grid unless its "
            'parameters set "grid": null)'
        )
    if trials is not None and trials < 1:
        raise ConfigError(f"sweep: trials: must be at least 1 (got {trials})")
    rng = Random(seed)
    if grid:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep: grid {key}: expected a non-empty list of values (got {values!r})")
        keys = list(grid)
        combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
        if trials is not None and trials < len(combos):
            combos = [combos[i] for i in sorted(rng.sample(range(len(combos)), trials))]
        return combos
    if random:
        if trials is None:
            raise ConfigError("sweep: random needs trials (how many combinations to draw)")
        return [{key: _draw(key, spec, rng) for key, spec in random.items()} for _ in range(trials)]
    raise ConfigError("sweep: nothing to sweep (give grid: {key: [values]} or random: {key: distribution})")


def validate(
    combos: list[dict[str, Any]], common: dict[str, Any] | None = None, params_file: str | Path = "params.yaml"
) -> list[Params]:
    """Every trial's params through the typed schema, before anything runs (ConfigError naming the key)."""
    checked = []
    for combo in combos:
        for key in [*(common or {}), *combo]:
            if key.split(".")[0] not in SWEEPABLE:
                raise ConfigError(
                    f"sweep: {key}: trials share the data stages; sweep keys of {', '.join(SWEEPABLE)} only"
                )
        checked.append(load_params(params_file, as_overrides({**(common or {}), **combo})))
    return checked


def trial_folder(root: Path, name: str, params_file: str | Path, overrides: dict[str, Any], uri: str) -> Path:
    """sweeps/<sweep>/<trial>/: params.yaml with the overrides, its own stage outputs, the project's data
    linked read-only, the shared MLflow store, registration lock, validation report and a starting weights
    file (``model.weights``) by absolute path."""
    folder = root / name
    folder.mkdir(parents=True)
    shutil.copy2(params_file, folder / "params.yaml")
    project = load_params(params_file)
    for path in (project.data.root, project.index.path, project.shards.out):
        top = Path(path).parts[0]
        if not Path(path).is_absolute() and not os.path.lexists(folder / top):  # one link per top folder
            (folder / top).symlink_to(Path(top).resolve(), target_is_directory=Path(top).is_dir())
    if Path("dvc.lock").is_file():  # the data version the trial's run records (checked against the index)
        shutil.copy2("dvc.lock", folder / "dvc.lock")
    shared = {
        "validation.report": str(Path(project.validation.report).resolve()),
        "mlflow.tracking_uri": without_password(uri),  # a file on a shared disk; the trial's environment wins
        "mlflow.artifact_root": str(project_path(project.mlflow.artifact_root).resolve()),
        "registry.lock_file": str(project_path(project.registry.lock_file).resolve()),
        "registry.promotion": "candidate",  # a sweep's winner never takes @champion by itself
    }
    trial = {**own_outputs(project), **overrides}
    weights = str(trial.get("model.weights", project.model.weights))
    if weights not in ("none", "imagenet") and not Path(weights).expanduser().is_absolute():
        trial["model.weights"] = str(project_path(weights).resolve())  # the trial runs in its own folder
    write_overrides(folder / "params.yaml", as_overrides({**trial, **shared}))
    return folder


def own_outputs(project: Params) -> dict[str, str]:
    """The stage outputs the project names by absolute path, put back to their (relative) defaults: each
    trial writes its own model and reports, not one shared folder (whose stage lock would refuse the others), and
    its own resume state: trials whose settings differ only outside the state key (``evaluate.*``) would otherwise
    train at once in one ``train.resume_dir/<key>`` folder, each overwriting the other's best weights."""
    keys = (*STAGE_OUTPUT_FOLDERS, "train.resume_dir", *STAGE_OUTPUT_FILES)
    return {k: project.default_of(k) for k in keys if Path(project.setting(k)).expanduser().is_absolute()}


def trial_env(uri: str, parent_run_id: str, trial: str) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": uri,
        tracking.PARENT_RUN_ENV: parent_run_id,
        tracking.TRIAL_ENV: trial,
        "PYTHONPATH": os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }


@task(cache_policy=NO_CACHE)
def run_trial(trial: str, folder: str, overrides: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """`pneumo train` and `pneumo evaluate` in the trial's folder; the trial's row of the comparison, also
    written to the folder's trial.json (where a sweep reads the rows of trials other workers ran)."""
    logger = get_run_logger()
    start, started = time.perf_counter(), time.time()
    with gpu_slot() as slot:  # trials running side by side on this machine get their own GPU where it has several
        env = {**env, **gpu_env(slot, {**os.environ, **env})}
        for stage in ("train", "evaluate"):
            run_pneumo([stage], folder, env, echo=lambda line: logger.info("%s: %s", trial, line))
    ended = time.time()
    params = load_params(Path(folder) / "params.yaml")
    trained = json.loads((Path(folder) / "reports" / "train.json").read_text())
    metrics = json.loads((Path(folder) / params.evaluate.metrics).read_text())
    test = metrics["test"]
    row = {
        "trial": trial,
        "overrides": overrides,
        "val_roc_auc": float(metrics["val"]["roc_auc"]),  # the saved model's own (an ensemble's, with TTA if on)
        "best_val_auc": float(trained["best_val_auc"]),
        "test_roc_auc": float(test["roc_auc"]),
        "sensitivity": float(test["sensitivity"]),
        "specificity": float(test["specificity"]),
        "train_seconds": float(trained["train_seconds"]),
        "run_id": trained["mlflow_run_id"],
        "folder": folder,
        "seconds": round(time.perf_counter() - start, 1),
        "ran_on": {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "parent_pid": os.getppid(),
            "gpu_slot": slot,
            "gpu": env.get(DEVICES),  # the one device its slot gave it, or all of them (or none) as given
            "between": [round(started, 3), round(ended, 3)],  # epoch seconds, to tell which trials overlapped
        },
    }
    atomic.write_text(Path(folder) / TRIAL_ROW, json.dumps(row, indent=2))
    return row


@flow(name="pneumonia-sweep-trial", log_prints=True)
def sweep_trial(trial: str, folder: str, overrides: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """One sweep trial as a flow run of its own: what a worker of the trial deployment's pool runs."""
    return run_trial.with_options(task_run_name=f"trial {trial}")(trial, folder, overrides, env)


@task(cache_policy=NO_CACHE)
def run_trial_on_pool(deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Start one trial as a run of `deployment` (a sub-flow run of this task) and wait for it to end;
    its row is the trial.json it wrote to the shared trial folder."""
    trial, folder = parameters["trial"], Path(parameters["folder"])
    run = run_deployment(
        deployment,
        parameters=parameters,
        flow_run_name=f"trial {trial}",
        idempotency_key=str(folder),  # one flow run per trial folder, even if this task is run again
        timeout=None,
        poll_interval=TRIAL_POLL_SECONDS,
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        message = (run.state.message or "") if run.state else ""
        raise PipelineError(f"trial {trial}: flow run {run.name} of {deployment} ended {state}: {message}".strip())
    if not (folder / TRIAL_ROW).is_file():
        raise PipelineError(f"trial {trial}: {folder / TRIAL_ROW} is missing: does the worker share {folder}?")
    return json.loads((folder / TRIAL_ROW).read_text())


def run_register(folder: str, env: dict[str, str]) -> dict[str, Any]:
    logger = get_run_logger()
    run_pneumo(["register"], folder, {**env, **gpu_env(0, {**os.environ, **env})}, echo=logger.info)
    params = load_params(Path(folder) / "params.yaml")
    return json.loads((Path(folder) / params.registry.decision_file).read_text())


register_task = task(
    run_register,
    name="register winner",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=retry_on_transient,
    cache_policy=NO_CACHE,
)


def winner_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best validation ROC AUC of the saved model as evaluated (the first such trial on a tie): for an
    ensemble the joined model's, not its best network's epoch. Test figures never choose."""
    done = [r for r in rows if "error" not in r]
    if not done:
        raise PipelineError("sweep: every trial failed: " + "; ".join(f"{r['trial']}: {r['error']}" for r in rows))
    return max(done, key=lambda r: r["val_roc_auc"])


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


TABLE_KEYS = ("val_roc_auc", "best_val_auc", "test_roc_auc", "sensitivity", "specificity", "train_seconds", "run_id")
HEADERS = ("val ROC AUC", "best epoch val AUC", "test ROC AUC", "sensitivity", "specificity", "train s", "MLflow run")


def table_markdown(rows: list[dict[str, Any]], winner: str) -> str:
    lines = ["| trial | overrides | " + " | ".join(HEADERS) + " |", "|---|---|" + "---|" * len(HEADERS)]
    for r in rows:
        name = f"**{r['trial']}** (winner)" if r["trial"] == winner else r["trial"]
        overrides = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in r["overrides"].items())
        if "error" in r:
            lines.append(f"| {name} | {overrides} | failed: {r['error']} |" + " |" * (len(HEADERS) - 1))
        else:
            cells = [f"{r['train_seconds']:.1f}" if k == "train_seconds" else _fmt(r[k]) for k in TABLE_KEYS]
            lines.append(f"| {name} | {overrides} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", "overrides", *TABLE_KEYS, "error"])
    for r in rows:
        writer.writerow(
            [r["trial"], json.dumps(r["overrides"]), *(r.get(k, "") for k in TABLE_KEYS), r.get("error", "")]
        )
    return buf.getvalue()


def store_warning(uri: str) -> str | None:
    """Why a local MLflow store is risky for trials run by a pool's workers (None for a tracking server or a
    database server): SQLite files and file stores (``file:`` URIs, plain paths) live on one machine."""
    scheme = urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        why = "SQLite does not lock reliably over a network file system"
    elif scheme in ("", "file") or len(scheme) == 1:  # a path, or a Windows drive letter
        why = "MLflow's file store is deprecated and not made for concurrent writers"
    else:
        return None
    return (
        f"sweep: the trials' workers write their runs to {uri}: every worker must see it (a shared file system), "
        f"and {why}; where workers run on other machines, set MLFLOW_TRACKING_URI to an MLflow server"
    )


def check_deployment(name: str) -> None:
    """The trial deployment exists on the Prefect server (before any folder, run or data stage)."""
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ConfigError(
            f"sweep: trial_deployment {name!r}: no such deployment (`prefect deploy -n sweep-trial` creates "
            "pneumonia-sweep-trial/sweep-trial)"
        ) from None


def prepare_data(params: Params, run_stages: bool) -> None:
    """The data stages up to date through DVC (as the pipeline flow runs them), or required as they are: the index,
    the validation report, the shards when training reads them, and the val and test images evaluate reads."""
    if run_stages:
        names = [s for s in flow_stage_names(params, ingest=True) if s in DATA_STAGES]
        run_changed(names, stage_list.always_run(params), get_run_logger())
        return
    needed = [params.index.path, params.validation.report]
    if params.train.input == "shards":
        needed.append(str(Path(params.shards.out) / "manifest.json"))
    for path in needed:
        if not Path(path).is_file():
            raise PipelineError(f"sweep: {path} is missing: run `dvc repro shard` (or `dvc pull`) first")
    index = read_index(params.index.path)
    scored = index.loc[index["split"].isin(["val", "test"]) & index["decodable"], "path"]
    missing = [p for p in scored if not (Path(params.data.root) / p).is_file()]
    if missing:  # every trial would train, then fail in evaluate
        raise PipelineError(
            f"sweep: {Path(params.data.root) / missing[0]} is missing ({len(missing)} of the {len(scored)} val and "
            f"test images evaluate reads): `dvc pull {params.data.root}` first"
        )


@flow(name="pneumonia-sweep", log_prints=True)
def pneumonia_sweep(
    grid: dict[str, list[Any]] | None = None,
    random: dict[str, Any] | None = None,
    trials: int | None = None,
    parallel: int = 2,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    data_stages: bool = True,
    register_winner: bool = True,
    params_file: str = "params.yaml",
    workdir: str | None = None,
    sweep_dir: str = "sweeps",
    trial_deployment: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate one trial per combination, `parallel` at a time; register the winner on val AUC.

    `grid` maps dotted params.yaml keys to lists of values ({"train.learning_rate": [0.001, 0.0003]});
    `random` maps them to distributions ({"model.dropout": {"uniform": [0.1, 0.5]}}) drawn `trials`
    times with `seed`. `overrides` apply to every trial. `trial_deployment` ("pneumonia-sweep-trial/
    sweep-trial"): run each trial as a flow run of that deployment, on its pool's workers, instead of in
    this flow run's process. Returns the parent run, the winner and the table.
    """
    if workdir:
        os.chdir(workdir)
    combos = expand(grid, random, trials, seed)
    validate(combos, overrides, params_file)  # a bad key or value fails here, before any work
    if trial_deployment:
        check_deployment(trial_deployment)
    if data_stages and Path(params_file).resolve() != Path(PARAMS_FILE).resolve():
        raise ConfigError(
            f"sweep: params_file {params_file}: the data stages run through DVC, which reads {PARAMS_FILE} "
            "(pass `overrides`, or data_stages=False with the data already built)"
        )
    logger = get_run_logger()
    with project_turn("pneumonia-sweep", logger.info):  # its trials read the project's data to the end
        params = load_params(params_file)
        prepare_data(params, data_stages)

        uri = tracking.tracking_uri(params.mlflow)
        if trial_deployment and (warning := store_warning(uri)):
            logger.warning(warning)
        if trial_deployment and without_password(uri) != uri:
            logger.warning(
                "sweep: the trials on %s get the tracking URI without its password (their parameters are kept in "
                "Prefect's database): give their workers MLFLOW_TRACKING_PASSWORD (an MLflow server) or PGPASSWORD",
                trial_deployment,
            )
        experiment_id = tracking.configure(params.mlflow)
        client = MlflowClient(uri)
        spec = {"grid": grid, "random": random, "trials": len(combos), "seed": seed, "overrides": overrides or {}}
        parent = client.create_run(
            experiment_id,
            run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"pneumo.sweep": "parent", "git_commit": tracking.git_commit()},
        ).info.run_id
        try:
            client.log_dict(parent, spec, "sweep/spec.json")
            logged = {"sweep.trials": len(combos), "sweep.parallel": parallel, "sweep.seed": seed}
            logged["sweep.trials_on"] = trial_deployment or "this flow run"
            for key, value in logged.items():
                client.log_param(parent, key, value)
            root = Path(sweep_dir).resolve() / parent
            names = [f"t{i + 1:02d}" for i in range(len(combos))]
            logger.info("sweep %s: %d trials, %d at a time, in %s", parent, len(combos), parallel, root)
            rows = []
            with ThreadPoolTaskRunner(max_workers=max(1, parallel)) as runner:
                futures = []
                for name, combo in zip(names, combos, strict=True):
                    trial_overrides = {**(overrides or {}), **combo}
                    folder = trial_folder(root, name, params_file, trial_overrides, uri)
                    parameters = {
                        "trial": name,
                        "folder": str(folder),
                        "overrides": combo,
                        # A pool trial's parameters are kept in Prefect's database: no password in them, the
                        # trial workers' own environment gives it (MLFLOW_TRACKING_PASSWORD, PGPASSWORD)
                        "env": trial_env(without_password(uri) if trial_deployment else uri, parent, name),
                    }
                    if trial_deployment:
                        on_pool = run_trial_on_pool.with_options(task_run_name=f"trial {name} on the pool")
                        futures.append(
                            runner.submit(on_pool, {"deployment": trial_deployment, "parameters": parameters})
                        )
                    else:
                        futures.append(runner.submit(run_trial.with_options(task_run_name=f"trial {name}"), parameters))
                for name, combo, future in zip(names, combos, futures, strict=True):
                    future.wait()
                    state = future.state
                    if state.is_completed():
                        rows.append(future.result())
                    else:
                        error = state.result(raise_on_failure=False)
                        rows.append({"trial": name, "overrides": combo, "error": str(error).splitlines()[0][:300]})
            best = winner_of(rows)
            table = table_markdown(rows, best["trial"])
            client.log_text(parent, table, "sweep/comparison.md")
            client.log_text(parent, table_csv(rows), "sweep/comparison.csv")
            client.log_metric(parent, "winner_val_roc_auc", best["val_roc_auc"])
            client.set_tag(parent, "winner_trial", best["trial"])
            client.set_tag(parent, "winner_run_id", best["run_id"])
            decision: dict[str, Any] = {}
            if register_winner:
                decision = register_task(best["folder"], trial_env(uri, parent, best["trial"]))
                client.set_tag(parent, "winner_version", str(decision["version"]))
                client.set_tag(parent, "winner_decision", decision["outcome"])
            print(table)
            registered = (
                f"{decision['model_name']} version {decision['version']}: "
                f"**{decision['outcome']}** ({decision['reason']})"
                if decision
                else "not registered (register_winner=False)"
            )
            summary = (
                f"# Pneumonia sweep {parent}\n\n{len(rows)} trials, {parallel} at a time. The winner is chosen on "
                f"**validation AUC**; test figures are reported only.\n\n{table}\n"
                f"**Winner:** {best['trial']} (MLflow run {best['run_id']}), val ROC AUC {best['val_roc_auc']:.4f}.\n\n"
                f"**Registry:** {registered}.\n"
            )
            create_markdown_artifact(
                summary, key=SUMMARY_KEY, description="Sweep trials compared; the winner on val AUC"
            )
            client.set_terminated(parent, "FINISHED")
        except BaseException:
            client.set_terminated(parent, "FAILED")
            raise
        logger.info("sweep %s: winner %s (%s)", parent, best["trial"], best["run_id"])
        return {
            "parent_run_id": parent,
            "winner": best["trial"],
            "winner_run_id": best["run_id"],
            "version": decision.get("version"),
            "decision": decision.get("outcome"),
            "rows": rows,
        }


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="Run a sweep: python -m flows.sweep_flow --grid '{...}'")
    cli.add_argument("--grid", type=json.loads, help='JSON, e.g. {"train.learning_rate": [0.001, 0.0003]}')
    cli.add_argument("--random", type=json.loads, help='JSON, e.g. {"model.dropout": {"uniform": [0.1, 0.5]}}')
    cli.add_argument("--trials", type=int)
    cli.add_argument("--parallel", type=int, default=2)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--overrides", type=json.loads, help='JSON, for every trial, e.g. {"train.epochs": 5}')
    cli.add_argument("--no-register", dest="register_winner", action="store_false")
    cli.add_argument("--trial-deployment", help="run the trials as flow runs of this deployment, on its workers")
    args = cli.parse_args()
    pneumonia_sweep(
        args.grid,
        args.random,
        args.trials,
        args.parallel,
        args.seed,
        args.overrides,
        True,
        args.register_winner,
        trial_deployment=args.trial_deployment,
    )
