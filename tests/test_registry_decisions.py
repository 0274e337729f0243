"""Which registry errors are retried (pure logic: real MLflow exception objects, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException

from pipeline.registry.retrying import is_io_error


def rest(code: str, message: str) -> RestException:
    return RestException({"error_code": code, "message": message})


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        # The server's database busy or gone (MLflow answers 503 TEMPORARILY_UNAVAILABLE), any 5xx, a rate limit.
        (
            rest("TEMPORARILY_UNAVAILABLE", "(psycopg2.OperationalError) server closed the connection unexpectedly"),
            True,
        ),
        (rest("INTERNAL_ERROR", "(psycopg2.errors.DeadlockDetected) deadlock detected"), True),
        (rest("REQUEST_LIMIT_EXCEEDED", "too many requests"), True),
        (rest("DEADLINE_EXCEEDED", "gateway timeout"), True),
        (
            MlflowException("API request to /api/2.0/mlflow/x failed with error code 502 != 200. Response body: ''"),
            True,
        ),
        (MlflowException("API request to http://h/api failed with exception HTTPConnectionPool: Max retries"), True),
        (MlflowException("API request to http://h/api failed with exception ('connection aborted.')"), True),
        (MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE"), True),
        (ConnectionError("Connection refused"), True),
        (requests.exceptions.ConnectionError("connection refused"), True),
        # Bad input: never retried, whatever numbers its text holds.
        (rest("INVALID_PARAMETER_VALUE", "Model version 50 tag value too long"), False),
        (rest("RESOURCE_DOES_NOT_EXIST", "Model Version (name=pneumo, version= 501) not found"), False),
        (rest("RESOURCE_ALREADY_EXISTS", "Registered Model (name=pneumo) already exists; Connection"), False),
        (rest("BAD_REQUEST", "malformed"), False),
        (rest("PERMISSION_DENIED", "no"), False),
        (
            MlflowException("API request to /api/2.0/mlflow/x failed with error code 404 != 200. Response body: ''"),
            False,
        ),
        (MlflowException("Model version 50 is invalid", error_code="INVALID_PARAMETER_VALUE"), False),
        (MlflowException("something unexpected"), False),
        (ValueError("connection"), False),
    ],
)
def test_transient_and_permanent_registry_errors(exc: BaseException, transient: bool) -> None:
    assert is_io_error(exc) is transient


def test_an_undefined_sensitivity_fails_the_clinical_floor() -> None:
    """A test set without pneumonia gives a NaN sensitivity, which must not pass the floor (NaN < floor is False)."""
    from pipeline.core.config import RegisterParams
    from pipeline.registry.champion import Scores, decide

    undefined = Scores({"sensitivity": float("nan"), "roc_auc": float("nan")}, 0.5, "test:abc")
    outcome, reason, _ = decide(undefined, None, RegisterParams())
    assert outcome == "rejected" and "below the floor" in reason
    met = Scores({"sensitivity": 0.95, "roc_auc": 0.97}, 0.5, "test:abc")
    assert decide(met, None, RegisterParams())[0] != "rejected"


def test_an_evaluation_registered_again_does_not_beat_its_own_recorded_figures() -> None:
    """The champion's figures come back from tags written at 6 decimals; the candidate's are rounded the same way,
    so the same evaluation under a new registration key is not a coin flip between "beats" and "rejected"."""
    from pipeline.core.config import RegisterParams
    from pipeline.registry.champion import Scores, decide, recorded, version_scores

    params = RegisterParams()
    for value in (0.994413407821229, 0.9933333333333333, 0.9812345649999, 0.5000004999):
        figures = {"roc_auc": value, "sensitivity": 0.96}
        tags = {**{f"test_{k}": f"{v:.6f}" for k, v in figures.items()}, "threshold": "0.5", "test_set": "t"}
        champion = version_scores(type("Version", (), {"tags": tags, "version": "3"})())
        candidate = Scores({k: recorded(v) for k, v in figures.items()}, 0.5, "t")
        outcome, reason, _ = decide(candidate, champion, params)
        assert outcome == "rejected" and "does not beat champion v3" in reason, (value, reason)
    assert any(value > float(f"{value:.6f}") for value in (0.994413407821229, 0.9933333333333333))  # the old flip


@pytest.mark.parametrize(
    ("exc", "no_alias"),
    [
        (rest("INVALID_PARAMETER_VALUE", "Registered model alias champion not found."), True),
        (rest("RESOURCE_DOES_NOT_EXIST", "Registered Model with name=pneumo not found"), True),
        # A proxy's bare 404 mid-rollout is not "no champion": it would promote an uncompared candidate
        (MlflowException("API request to /x failed with error code 404 != 200. Response body: 'Not Found'"), False),
        (rest("ENDPOINT_NOT_FOUND", "404 Not Found"), False),
    ],
)
def test_only_the_registry_saying_so_means_no_alias(exc: MlflowException, no_alias: bool) -> None:
    from pipeline.registry.champion import alias_version

    class Client:
        def get_model_version_by_alias(self, name: str, alias: str) -> None:
            raise exc

    if no_alias:
        assert alias_version(Client(), "pneumo", "champion") is None
    else:
        with pytest.raises(MlflowException):
            alias_version(Client(), "pneumo", "champion")


def test_stage_files_that_are_not_what_they_should_be_are_one_line_naming_them(tmp_path: Path) -> None:
    from pipeline.core.errors import PipelineError
    from pipeline.core.files import read_json
    from pipeline.steps.register import predicted_files

    cut = tmp_path / "stress.json"
    cut.write_text('{"sets": {"dark')
    with pytest.raises(PipelineError, match=rf"^{cut}: not valid JSON \(JSONDecodeError: .*\); run the stress stage"):
        read_json(cut, "run the stress stage again")
    old = tmp_path / "predictions.csv"
    old.write_text("file,label,score\na.png,NORMAL,0.1\n")
    with pytest.raises(PipelineError, match=rf"^{old}: no column path, pneumonia_score; run the evaluate stage again$"):
        predicted_files(str(old))
    old.write_text("path,label,pneumonia_score\na.png,NORMAL,0.1\n")
    assert predicted_files(str(old)) == ["a.png"]


def test_a_comparison_tag_edited_by_hand_is_one_line_naming_the_version() -> None:
    from pipeline.core.errors import PipelineError
    from pipeline.registry.champion import COMPARISON_TAG, _recorded_comparison

    version = type("Version", (), {"tags": {COMPARISON_TAG: "{not json"}, "version": "4"})()
    with pytest.raises(PipelineError, match=r"^register: version 4's tag .* is not the comparison register wrote"):
        _recorded_comparison(None, version, None, lambda call, what: call())  # type: ignore[arg-type]
