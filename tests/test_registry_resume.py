"""A re-run of register for an evaluation already registered (a crash, a forced `dvc repro`): the same decision
file as the first run, and no second upload of the serving model. Real MLflow registry (sqlite), real models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.config import RegisterParams
from pipeline.registry import champion

pytestmark = pytest.mark.slow

NAME = "pneumo-test"


def policy(tmp: Path, **changes: Any) -> RegisterParams:
    base = {"model_name": NAME, "lock_file": str(tmp / "champion.lock"), "retry_backoff_seconds": 0.01}
    return RegisterParams(**{**base, **changes})


@pytest.fixture
def client(tmp_path: Path) -> Any:
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-resume-tests")
    return MlflowClient(uri)


def log_candidate(auc: float, test_set: str = "T1", evaluation: str = "e1") -> champion.Candidate:
    """A training run with a logged Keras model, as the train stage leaves it, and its candidate."""
    import mlflow

    from pipeline.modeling.models import build_model

    with mlflow.start_run() as run:
        info = mlflow.keras.log_model(build_model("compact_cnn", 32).model, name="model", pip_requirements=["keras"])
    metrics = {k: 0.8 for k in champion.SCORE_KEYS} | {"roc_auc": auc, "sensitivity": 0.95}
    scores = champion.Scores(metrics, 0.5, test_set)
    tags = {f"test_{k}": str(v) for k, v in metrics.items()} | {"threshold": "0.5", "test_set": test_set}
    return champion.Candidate(run.info.run_id, info.model_uri, scores, tags, f"auc {auc}", evaluation=evaluation)


def never(model_uri: str, threshold: float) -> dict[str, float]:
    raise AssertionError("nothing may be re-scored here")


def decision_file(decision: champion.Decision) -> dict[str, Any]:
    """The decision file's content, less what tells the two runs apart by design (when, and whether resumed)."""
    record = json.loads(champion.decision_json(decision))
    assert record.pop("resumed") is decision.resumed
    record.pop("decided_at")
    return record


def registry_state(client: Any) -> dict[str, Any]:
    versions = client.search_model_versions(f"name = '{NAME}'")
    return {
        "aliases": dict(client.get_registered_model(NAME).aliases),
        "versions": {str(v.version): (v.source, v.run_id, dict(v.tags)) for v in versions},
    }


def test_a_rerun_writes_the_decision_file_of_the_first_run(client: Any, tmp_path: Path) -> None:
    """The candidate on another test set than the champion and the challenger: both were re-scored for the first
    run's decision. The re-run re-scores nothing, yet reports the same figures, versions and aliases."""
    params = policy(tmp_path)
    champion.register(client, log_candidate(0.90), params, never)  # v1: @champion
    champion.register(client, log_candidate(0.93), params, never)  # v2: @challenger
    rescored = {"1": 0.91, "2": 0.94}

    def rescore(model_uri: str, threshold: float) -> dict[str, float]:
        return {k: 0.7 for k in champion.SCORE_KEYS} | {"roc_auc": rescored[model_uri.rsplit("/", 1)[1]]}

    winner = log_candidate(0.97, test_set="T2")
    first = champion.register(client, winner, params, rescore)
    assert (first.outcome, first.version, first.aliases) == ("challenger", "3", ["challenger"])
    assert first.champion is not None and first.champion.metrics["roc_auc"] == 0.91 and first.champion_rescored

    again = champion.register(client, winner, params, never, log=lambda _: None)
    assert again.resumed and again.version == "3"
    written = decision_file(again)
    assert written == decision_file(first)
    assert written["champion"]["version"] == "1" and written["champion"]["metrics"]["roc_auc"] == 0.91
    assert written["challenger"]["version"] == "2" and written["challenger"]["metrics"]["roc_auc"] == 0.94
    assert written["champion_rescored"] and written["challenger_rescored"]
    assert written["previous_challenger"] == "2" and written["aliases"] == ["challenger"]


def test_a_rerun_of_a_version_registered_before_the_comparison_tag(client: Any, tmp_path: Path) -> None:
    """A version registered without the recorded comparison: the champion's figures come from the version it was
    compared with (its tags, same test set), as the first run read them."""
    params = policy(tmp_path, promotion="auto")
    champion.register(client, log_candidate(0.90), params, never)  # v1
    winner = log_candidate(0.95)
    first = champion.register(client, winner, params, never)  # v2 takes @champion from v1
    assert (first.outcome, first.previous_champion, first.champion.version) == ("champion", "1", "1")
    client.delete_model_version_tag(NAME, "2", champion.COMPARISON_TAG)

    again = champion.register(client, winner, params, never, log=lambda _: None)
    assert again.resumed and decision_file(again) == decision_file(first)
    assert decision_file(again)["champion"]["metrics"]["roc_auc"] == 0.9


def tiny_bundle(folder: Path) -> Path:
    """A serving bundle of an untrained compact CNN (no drift reference)."""
    from pipeline.modeling.models import build_model
    from pipeline.registry.packaging import write_bundle
    from pipeline.serving.classifier import ModelInfo

    folder.mkdir(parents=True, exist_ok=True)
    built = build_model("compact_cnn", 32)
    built.model.save(folder / "model.keras")
    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), 32, "binary", "compact_cnn", built.last_conv)
    write_bundle(folder / "bundle", folder / "model.keras", info)
    return folder / "bundle"


def test_a_rerun_uploads_no_second_serving_model(client: Any, tmp_path: Path) -> None:
    """The register step's serving model: logged once for a registration key; a re-run finds the complete version
    before the lock, reuses its model (no new logged model) and ends in the same registry state."""
    from pipeline.steps.register import with_serving_model

    params = policy(tmp_path)
    candidate = log_candidate(0.90)
    bundle = tiny_bundle(tmp_path / "tiny")
    experiment = client.get_run(candidate.run_id).info.experiment_id

    def logged_models() -> set[str]:
        return {m.model_id for m in client.search_logged_models(experiment_ids=[experiment])}

    trained = logged_models()
    served = with_serving_model(client, candidate, bundle, params)
    assert len(logged_models() - trained) == 1 and served.model_uri != candidate.model_uri
    first = champion.register(client, served, params, never)
    assert (first.outcome, first.version) == ("champion", "1")
    before, uploaded = registry_state(client), logged_models()

    again = with_serving_model(client, candidate, bundle, params)
    assert logged_models() == uploaded and again.model_uri == served.model_uri
    resumed = champion.register(client, again, params, never, log=lambda _: None)
    assert resumed.resumed and resumed.version == "1"
    assert registry_state(client) == before

    # A half-registered version (its registration never completed) is no version to reuse: the upload happens.
    client.set_model_version_tag(NAME, "1", champion.STATE_TAG, champion.PENDING)
    assert with_serving_model(client, candidate, bundle, params).model_uri != served.model_uri
    assert len(logged_models() - uploaded) == 1
