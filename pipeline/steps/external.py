"""``pneumo external-validation PATH``: score a labelled folder with a registered version, record it.

The figures, the report and the pictures go to ``-o`` (default ``reports/external/<name>/``), to a
run in the MLflow experiment ``external-validation`` (tagged with the model name and version), to
tags on the model version (``external.<name>.roc_auc`` and so on), and to a section of the version's
model card, so whoever opens the version later sees how it did on that hospital's images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from pipeline.core.atomic import write_text
from pipeline.core.config import LABELS, Params
from pipeline.core.errors import PipelineError, TransientError
from pipeline.data.labelled_folders import class_folders
from pipeline.modeling.evaluation import figures
from pipeline.modeling.metrics import interval
from pipeline.registry import champion, model_card, tracking
from pipeline.registry.registry_lock import registry_lock
from pipeline.serving import classifier, predict, scoring
from pipeline.serving.classifier import Classifier

EXPERIMENT = "external-validation"


def card_section(name: str, path: str, result: scoring.ExternalResult, run_id: str, figure_dir: str) -> str:
    t, c = result.at_threshold, result.ci95
    (tn, fp), (fn, tp) = t.confusion
    rows = [
        f"| {key} | {getattr(t, key):.3f} | {interval(c, key).strip()} | {getattr(result.at_half, key):.3f} |"
        for key in ("roc_auc", "sensitivity", "specificity", "accuracy", "precision", "f1")
    ]
    return "\n".join(
        [
            "",
            f"{model_card.EXTERNAL_HEADING}{name}",
            "",
            f"`{path}`: {result.n} images of {result.n_patients} patients, scored as served (registered "
            f"temperature and threshold {t.threshold:.4f}); MLflow run `{run_id}` in experiment `{EXPERIMENT}`. "
            f"95% intervals: {result.ci_method}."
            + (
                f" **{len(result.refused)} more images were refused as out of distribution** (served without a "
                "label) and are not in these figures."
                if result.refused
                else ""
            )
            + (
                f" Probabilities adjusted to a pneumonia fraction of {result.prior['target']:.3f} "
                f"({result.prior['how']}; calibrated at {result.prior['source']:.3f})."
                if result.prior
                else ""
            ),
            "",
            "| metric | value | 95% CI | at threshold 0.5 |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Confusion at the threshold: {tp} pneumonia found, **{fn} missed**, {tn} normal cleared, {fp} false "
            f"alarms. Brier score {result.brier:.4f}, expected calibration error {result.ece:.4f}.",
            "",
            f"![ROC, {name}]({figure_dir}/roc.png) ![Reliability, {name}]({figure_dir}/reliability.png)",
            "",
        ]
    )


def record(
    model: Classifier, name: str, path: str, result: scoring.ExternalResult, written: list[Path], params: Params
) -> tuple[str, str]:
    """Log the validation as an MLflow run, tag the model version, extend its model card; returns the run id and
    the card extended (its ``runs:/`` URI; "" when the version has none).
    All of it under the registration lock: waiting past `registry.lock_timeout_seconds` records nothing (75).
    The run gets the files this command `written`, never the rest of their folder (-o may hold images)."""
    out = written[0].parent
    info = model.info
    client = MlflowClient()
    experiment_id = tracking.experiment_id(EXPERIMENT, params.mlflow)
    figure_dir = f"model_card/external/{name}"
    t = result.at_threshold
    scores = {k: float(getattr(t, k)) for k in ("roc_auc", "sensitivity", "specificity", "accuracy", "f1")}
    # The registration lock of the version's model: the card is read, extended and written back, as
    # `register` renders it anew; one of them at a time, so neither loses the other's change
    lock_params = params.registry.model_copy(update={"model_name": info.name or params.registry.model_name})
    extended = ""
    with contextlib.ExitStack() as held:
        try:
            still_held = held.enter_context(registry_lock(lock_params, what="external-validation"))
        except TransientError as exc:  # nothing is recorded yet; the report in `out` stands
            raise TransientError(f"{exc}; the report is in {out}/, nothing was recorded in MLflow") from None
        source = str(Path(path).resolve())
        check_name(client, info, name, source, params)  # again under the lock: another writer may have been first
        # The version's tags and card are written while the run is open: a failure there (the server gone) ends
        # the run FAILED, not FINISHED beside a version that never heard of it; the command says so and exits 75
        run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{name}-{info.name}-v{info.version}")
        status = "FAILED"
        try:
            mlflow.set_tags({"model_name": info.name, "model_version": str(info.version), "dataset": name})
            mlflow.log_params({"model_uri": info.uri, "data_path": path, "images": result.n, "threshold": t.threshold})
            mlflow.log_metrics({**scores, "brier": result.brier, "ece": result.ece, "refused": len(result.refused)})
            if result.prior:
                mlflow.log_params({"prior_source": result.prior["source"], "prior_adjustment": result.prior["how"]})
                mlflow.log_metric("prior_target", result.prior["target"])
            for made in written:
                mlflow.log_artifact(str(made), "external")
            if info.name and info.version:

                def tag_version() -> str:
                    for key, value in {**scores, "brier": result.brier}.items():
                        client.set_model_version_tag(info.name, info.version, f"external.{name}.{key}", f"{value:.4f}")
                    client.set_model_version_tag(
                        info.name, info.version, f"external.{name}.refused", str(len(result.refused))
                    )
                    client.set_model_version_tag(info.name, info.version, f"external.{name}.run_id", run.info.run_id)
                    client.set_model_version_tag(info.name, info.version, f"external.{name}.data_path", source)
                    card = client.get_model_version(info.name, info.version).tags.get(model_card.CARD_TAG, "")
                    match = re.match(r"runs:/([^/]+)/(.+)$", card)
                    if match:  # the card lives in the training run: append the section and the pictures there
                        card_run, card_path = match.groups()
                        text = mlflow.artifacts.load_text(card)
                        section = card_section(name, path, result, run.info.run_id, figure_dir)
                        text = model_card.with_external_section(text, name, section)
                        still_held()  # a lost database lock: another writer may be rendering the card
                        client.log_text(card_run, text, card_path)
                        for png in ("roc.png", "reliability.png"):
                            client.log_artifact(card_run, str(out / png), f"{Path(card_path).parent}/{figure_dir}")
                        return card
                    return ""

                what = "recording the validation on the model version"
                extended = champion.with_retries(tag_version, what, params.registry)
            status = "FINISHED"
        except TransientError as exc:
            raise TransientError(
                f"{exc}; run {run.info.run_id} is marked FAILED and the report is in {out}/: run the command "
                "again (it replaces this validation's tags and card section)"
            ) from None
        finally:
            with contextlib.suppress(Exception) if status == "FAILED" else contextlib.nullcontext():
                mlflow.end_run(status)  # a server gone for good leaves the failed run RUNNING; the error names it
    return run.info.run_id, extended


def check_name(client: MlflowClient, info: classifier.ModelInfo, name: str, source: str, params: Params) -> None:
    """One name, one data set: another folder under a name the version already holds would replace its record."""
    if not (info.name and info.version):  # not a registered version: nothing recorded to replace
        return
    tags = champion.with_retries(
        lambda: client.get_model_version(info.name, info.version).tags, "reading the version", params.registry
    )
    before = tags.get(f"external.{name}.data_path")
    if before and before != source:
        raise PipelineError(
            f"--name {name}: {info.name} version {info.version} already has a validation of that name, of "
            f"{before}; give this one of {source} another --name (nothing was recorded)"
        )


def default_name(path: str, split: str) -> str:
    """The data set's name when --name is not given: its folder's, and the split's where a Kaggle layout is scored
    on another split than test/ (so that its val/ and test/ are two validations, not one replacing the other)."""
    folder = Path(path).resolve()
    folders = class_folders(folder, split)
    kaggle = folders is not None and folders[LABELS[0]].parent != folder  # NORMAL/ under <split>/, not beside it
    return f"{folder.name}-{split}" if kaggle and split != "test" else folder.name


def run(args: argparse.Namespace, params: Params) -> int:
    mlflow.set_tracking_uri(tracking.tracking_uri(params.mlflow))
    uri = args.model or classifier.DEFAULT_URI.format(name=params.registry.model_name)
    name = args.name or default_name(args.path, args.split)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or set(name) == {"."}:
        given = "--name" if args.name else "the folder's name (give --name)"
        raise PipelineError(f"{given} {name!r}: use letters, digits, '.', '_' and '-' only, not only dots")
    prior = scoring.parse_prior(args.prior)
    out = Path(args.output or f"reports/external/{name}")
    if out.exists() and not out.is_dir():  # before the scoring, not after it
        raise PipelineError(f"-o {out}: is a file; name a folder for the report and figures")
    predict.check_writable(f"-o {out}", out.absolute())
    items = scoring.labelled_files(args.path, args.split)
    model = classifier.load(uri)
    if prior is not None:
        scoring.source_prior(model)
    check_name(MlflowClient(), model.info, name, str(Path(args.path).resolve()), params)  # before the scoring
    result = scoring.score(
        model, items, params.serve.batch_size, params.evaluate.bootstrap, params.evaluate.seed, prior=prior
    )
    calibration = {"test_reliability": {"calibrated": result.reliability}, "test_ece": {"calibrated": result.ece}}
    # Everything is made in a scratch folder first; then each file replaces its namesake in `out`, and nothing
    # else there is touched (`-o` may name a folder that holds other files, even the images scored)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out) as scratch:
        staged = Path(scratch)
        write_text(
            staged / "report.json", json.dumps({"name": name, "model": uri, **result.to_dict()}, indent=2) + "\n"
        )
        figures(
            result.at_threshold,
            result.labels,
            result.scores,
            model.info.class_names[:2],
            staged,
            calibration=calibration,
            temperature=model.info.temperature,
            where=name,
        )
        written = [out / made.name for made in sorted(staged.iterdir())]
        for made in written:
            os.replace(staged / made.name, made)
    print(result.summary(name))  # before recording, which may wait for the registration lock
    run_id, card = record(model, name, args.path, result, written, params)
    print(f"  report and figures: {out}/; MLflow run {run_id} (experiment {EXPERIMENT})")
    if card:
        version = f"{model.info.name} version {model.info.version}"
        print(f"  model card of {version}, section 'External validation: {name}': {card}")
    return 0
