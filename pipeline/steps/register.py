"""The register stage: pack the evaluated model for serving, register it, apply the champion policy,
record why, and write the version's model card (logged to the run, kept beside the model)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.core.atomic import staged_dir, write_bytes, write_text
from pipeline.core.config import Params, RegisterParams
from pipeline.core.errors import PipelineError
from pipeline.core.files import read_json
from pipeline.core.locks import folder_lock
from pipeline.data.dataset_index import read_index
from pipeline.data.version import split_fingerprint
from pipeline.modeling import inputs as dp
from pipeline.modeling import tta
from pipeline.modeling.evaluation import Evaluation, pneumonia_score, predict_split, reliability_png
from pipeline.modeling.metrics import apply_temperature, binary_metrics, interval
from pipeline.modeling.models import preprocessing_of
from pipeline.registry import champion, model_card, packaging, retrying, tracking
from pipeline.serving import classifier


def serving_digest(ev: Evaluation, params: Params) -> str:
    """What the served bundle holds beyond the training run: the evaluation (threshold, calibration, views), the
    packaging settings that go into it (drift reference, out-of-distribution limits; not the card's example
    count), the pipeline code it bundles and its pinned requirements. Part of the registration key: a change to
    any of them registers the bundle it now builds as a new version, never a new card on a version that serves
    the old one."""
    package = params.package.model_dump(exclude={"gradcam_examples"})
    served = {"code": packaging.code_digest(), "requirements": packaging.pyfunc_requirements()}
    text = json.dumps({"evaluation": ev.digest(), "package": package, **served}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def candidate_from_outputs(params: Params, client: Any, ev: Evaluation) -> champion.Candidate:
    """The candidate as the train and evaluate stages left it (run reference and evaluation)."""
    ref = tracking.load_run_ref(params.mlflow.run_file)
    tracking.require_same_run(ref.run_id, ev.model_run_id, params.evaluate.metrics, params.mlflow.run_file)
    if not ref.model_uri:
        raise PipelineError(f"{params.mlflow.run_file}: no logged model recorded; run the train stage again")
    run = champion.with_retries(lambda: client.get_run(ref.run_id), "reading the run", params.registry)
    run_tags = run.data.tags
    # At the precision the tags keep: a re-registered evaluation must not "beat" its own recorded figures
    metrics = {k: champion.recorded(getattr(ev.test, k)) for k in champion.SCORE_KEYS}
    scores = champion.Scores(metrics, ev.threshold, ev.test_set)
    tags = {
        **{f"test_{k}": f"{v:.6f}" for k, v in metrics.items()},
        **{f"test_{k}_ci95": f"[{lo:.4f}, {hi:.4f}]" for k, (lo, hi) in ev.ci95.items()},
        "threshold": f"{ev.threshold:.6f}",
        "target_sensitivity": str(ev.target_sensitivity),
        "test_set": ev.test_set,
        "test_images": str(ev.n["test"]),
        "data_version": run_tags.get("data_version", "unknown"),
        "git_commit": run_tags.get("git_commit", "unknown"),
        "index_fingerprint": run_tags.get("index_fingerprint", "unknown"),
        "architecture": run.data.params.get("model.architecture", "unknown"),
        "task": run.data.params.get("task", "unknown"),
        "mlflow_run_id": ref.run_id,
    }
    sweep = run_tags.get(tracking.PARENT_RUN_TAG, "")
    if sweep:  # a sweep trial's run: the version says which sweep chose it
        tags["sweep_parent_run_id"] = sweep
    description = (
        f"{tags['architecture']} ({tags['task']}) trained on data version {tags['data_version']} at git "
        f"{tags['git_commit'][:12]}. Test ({ev.n['test']} images): ROC AUC {ev.test.roc_auc:.3f}"
        f"{interval(ev.ci95, 'roc_auc')}, sensitivity {ev.test.sensitivity:.3f}, specificity "
        f"{ev.test.specificity:.3f} at threshold {ev.threshold:.4f}, chosen on validation to reach "
        f"sensitivity >= {ev.target_sensitivity}. Decision support only."
    )
    origin = f"from sweep {sweep}" if sweep else ""
    return champion.Candidate(ref.run_id, ref.model_uri, scores, tags, description, origin, serving_digest(ev, params))


def with_serving_model(
    client: Any, candidate: champion.Candidate, bundle: Path, registry: RegisterParams
) -> champion.Candidate:
    """The candidate with the model it serves: the bundle logged to the run as a pyfunc, unless a complete version
    already holds this registration key (a re-run), whose model it keeps, so nothing unused is uploaded. Only a
    read: register looks again under the lock, and the key ensures that model serves this very bundle."""
    done = champion.with_retries(
        lambda: champion.registered_version(client, registry.model_name, candidate),
        "looking for this candidate's version",
        registry,
    )
    if done is not None:
        return dataclasses.replace(candidate, model_uri=champion.served_model_uri(done))
    before = champion.with_retries(lambda: client.get_run(candidate.run_id).info, "reading the run", registry)
    model_uri = champion.with_retries(
        lambda: packaging.log_pyfunc(bundle, candidate.run_id, before), "logging the serving model", registry
    )
    return dataclasses.replace(candidate, model_uri=model_uri)


def rescorer(params: Params, test_set: str) -> Any:
    """Scores a registered model on the current test split at a given threshold; that split must be the one the
    candidate was evaluated on (`test_set`), or the two would be compared on different images."""

    def rescore(model_uri: str, threshold: float) -> dict[str, float]:
        index = read_index(params.index.path)
        if split_fingerprint(index, "test") != test_set:
            raise PipelineError(
                f"{params.index.path}: its test split is not the one {params.evaluate.metrics} was scored on; "
                "run the evaluate stage again (dvc repro)"
            )

        def load() -> tuple[Any, tuple[float, float], tta.Views]:
            try:
                loaded = classifier.load(model_uri)
                info = loaded.info  # the threshold is on calibrated scores of its views' average
                return loaded.model, (info.temperature, info.calibration_bias), loaded.views
            except classifier.NotABundle:  # a version registered before serving bundles: the plain Keras flavour
                try:
                    return mlflow.keras.load_model(model_uri), (1.0, 0.0), tta.Views()
                except Exception as exc:  # the store's client and Keras raise many types
                    if retrying.is_io_error(exc):  # the download dropped: with_retries tries again
                        raise
                    why = classifier.one_line(exc)
                    raise PipelineError(f"{model_uri}: neither a serving bundle nor a Keras model ({why})") from None

        model, calibration, views = champion.with_retries(load, "loading the champion", params.registry)
        size = int(model.input_shape[1])
        test = dp.split_data(index, "test", params.data.root, params.task)
        outputs = predict_split(model, test, size, params.train.batch_size, views)
        scores = pneumonia_score(apply_temperature(outputs, *calibration))
        figures = binary_metrics((test.labels > 0).astype(int), scores, threshold)
        return {k: champion.recorded(getattr(figures, k)) for k in champion.SCORE_KEYS}

    return rescore


def validations_on_card(client: Any, decision: champion.Decision) -> str:
    """The external validations already on this version's card: a re-run of register for the same evaluation
    (a retried flow, a changed registry.* param) renders the card again and must keep them."""
    version = client.get_model_version(decision.model_name, decision.version)
    card = version.tags.get(model_card.CARD_TAG, "")
    if not card:  # a new version: no card yet
        return ""
    try:
        return model_card.external_sections(mlflow.artifacts.load_text(card))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # the tag outlived its file: nothing to keep
            return ""
        raise


def card_writer(
    params: Params,
    client: Any,
    candidate: champion.Candidate,
    facts: model_card.CardFacts,
    examples_dir: Path,
) -> Any:
    """finalize(decision): the model card of the new version, to the run, the version and the model folder."""
    card_path = Path(params.train.model_dir) / "model_card.md"

    def finalize(decision: champion.Decision) -> None:
        info = dataclasses.replace(facts.info, version=decision.version)
        filled = dataclasses.replace(facts, info=info, decision=decision.outcome, decision_reason=decision.reason)
        text = model_card.render(filled)
        # The version's card in MLflow keeps its validations; the local copy is the training's (their pictures
        # live in MLflow only).
        logged = text + champion.with_retries(
            lambda: validations_on_card(client, decision), "reading the model card", params.registry
        )

        folder = model_card.artifact_dir(decision.model_name, decision.version)

        def log() -> None:
            client.log_text(candidate.run_id, logged, f"{folder}/model_card.md")
            for png in sorted(examples_dir.glob("*.png")):
                client.log_artifact(candidate.run_id, str(png), f"{folder}/model_card")
            client.set_model_version_tag(
                decision.model_name,
                decision.version,
                model_card.CARD_TAG,
                f"runs:/{candidate.run_id}/{folder}/model_card.md",
            )
            client.update_model_version(
                decision.model_name,
                decision.version,
                description=f"{candidate.description}\n\nModel card: run artifact `{folder}/model_card.md`.",
            )

        champion.with_retries(log, "logging the model card", params.registry)
        with staged_dir(card_path.with_suffix("")) as tmp:
            for png in examples_dir.glob("*.png"):
                shutil.copy2(png, tmp / png.name)
        write_text(card_path, text)

    return finalize


def predicted_files(predictions: str) -> list[str]:
    """The test images the evaluate stage predicted (its predictions CSV: path, label, score ...)."""
    try:
        frame = pd.read_csv(predictions)
    except (OSError, ValueError) as exc:  # missing, empty, not CSV
        raise PipelineError(
            f"{predictions}: cannot read the predictions ({type(exc).__name__}); run evaluate again"
        ) from None
    missing = [c for c in ("path", "label", "pneumonia_score") if c not in frame.columns]
    if missing:
        raise PipelineError(f"{predictions}: no column {', '.join(missing)}; run the evaluate stage again")
    return frame["path"].astype(str).tolist()


def run(params: Params) -> str:
    with folder_lock("register", outputs=params.stage_folders()):
        return _register(params)


def _register(params: Params) -> str:
    champion.quiet_mlflow_http_retries()
    uri = tracking.tracking_uri(params.mlflow)
    tracking.open_store(uri)
    client = MlflowClient(uri)
    ev = Evaluation.load(params.evaluate.metrics)
    candidate = candidate_from_outputs(params, client, ev)
    with tempfile.TemporaryDirectory(prefix="pneumo-register-") as tmp:
        bundle, examples_dir = Path(tmp) / "bundle", Path(tmp) / "examples"
        classifier, metadata = packaging.build_bundle(params, ev, candidate.run_id, bundle)
        test_files = predicted_files(params.evaluate.predictions)
        ood_check = packaging.ood_validation(classifier, test_files)
        picks = packaging.pick_examples(params.evaluate.predictions, ev.threshold, params.package.gradcam_examples)
        examples = packaging.gradcam_examples(classifier, picks, examples_dir)
        if ev.calibration:
            write_bytes(
                examples_dir / Path(model_card.RELIABILITY_FIGURE).name, reliability_png(ev.calibration, ev.temperature)
            )
        candidate = with_serving_model(client, candidate, bundle, params.registry)
        facts = model_card.CardFacts(
            info=classifier.info,
            evaluation=ev,
            split_sizes={**metadata.get("split_sizes", {}), **ev.n},
            data_source=params.data.source,
            git_commit=candidate.tags.get("git_commit", "unknown"),
            decision="",
            decision_reason="",
            examples=[(f"model_card/{name}", caption) for name, caption in examples],
            ood=ood_check,
            preprocessing=preprocessing_of(classifier.model),
            stress=read_json(params.stress.report, "run the stress stage again")
            if Path(params.stress.report).is_file()
            else {},
        )
        finalize = card_writer(params, client, candidate, facts, examples_dir)
        decision = champion.register(
            client, candidate, params.registry, rescorer(params, ev.test_set), finalize=finalize
        )
    record = champion.decision_json(decision)  # one text for the DVC-tracked file and the run
    write_text(params.registry.decision_file, record)

    def log_to_run() -> None:
        client.log_text(candidate.run_id, record, "registry/decision.json")
        client.set_tag(candidate.run_id, "registry_decision", decision.outcome)
        client.set_tag(candidate.run_id, "registered_version", str(decision.version))
        client.log_dict(candidate.run_id, ood_check, "registry/ood_validation.json")

    champion.with_retries(log_to_run, "logging the decision to the run", params.registry)
    hint = ""
    if decision.outcome == champion.CHALLENGER:
        hint = (
            f"\n  promote it in the MLflow UI: Models -> {decision.model_name} -> Version {decision.version} -> "
            f"Aliases: add 'champion' (or set registry.promotion: auto)"
        )
    card = Path(params.train.model_dir) / "model_card.md"
    return decision.summary() + f"\n  model card: {card}" + hint
