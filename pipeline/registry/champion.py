"""The register stage: a new model version in the MLflow registry and the champion decision.

Policy (``registry.*`` params): a candidate whose test sensitivity is below ``sensitivity_floor`` is
registered with its decision but never gets an alias, not even as the first version. Otherwise,
with no ``@champion`` the candidate becomes champion; with one, both are scored on the same test
set: the champion's recorded figures when its ``test_set`` tag matches, else the champion is
re-scored on the candidate's test set at its own registered threshold. The candidate wins when its
primary metric beats the champion's by ``min_improvement``. A winner gets ``@challenger`` for a
human to promote (``promotion: manual``) or takes ``@champion`` itself (``auto``; the previous
champion is recorded), unless a person moved ``@champion`` since the pipeline last set it (the
registered model's ``pipeline_champion`` tag): a person's choice is never overridden, the winner
gets ``@challenger``.

The decision is computed before anything is written; the version is created with its tags in one
call; a failure after that deletes the version again, so the registry is never left half-updated.
Registry I/O is retried with exponential backoff; registrations on one machine are serialised by a
lock file so two racing runs leave exactly one champion.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
from mlflow.exceptions import MlflowException

from pipeline.core.config import RegisterParams
from pipeline.core.errors import PipelineError, TransientError

T = TypeVar("T")
CHAMPION, CHALLENGER = "champion", "challenger"
PIPELINE_CHAMPION_TAG = "pipeline_champion"  # the version this pipeline last gave @champion
SCORE_KEYS = ("roc_auc", "pr_auc", "f1", "accuracy", "sensitivity", "specificity", "precision", "brier")


@dataclass(frozen=True)
class Scores:
    """A model's test figures at its own threshold, on one test set."""

    metrics: dict[str, float]
    threshold: float
    test_set: str
    version: str | None = None


@dataclass
class Decision:
    outcome: str  # champion | challenger | rejected
    reason: str
    candidate: Scores
    champion: Scores | None = None
    champion_rescored: bool = False
    previous_champion: str | None = None
    version: str | None = None
    model_name: str = ""
    aliases: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = f"register: {self.model_name} version {self.version}: {self.outcome} ({self.reason})"
        return "\n".join([head, *(f"  warning: {w}" for w in self.warnings)])


def decide(candidate: Scores, champion: Scores | None, params: RegisterParams) -> tuple[str, str, list[str]]:
    """(outcome, reason, warnings) for a candidate against the champion on the same test set."""
    sens, floor = candidate.metrics["sensitivity"], params.sensitivity_floor
    if sens < floor:  # the clinical floor comes first: not even a first version may serve below it
        where = "no champion is set" if champion is None else f"champion v{champion.version} stays"
        return "rejected", f"test sensitivity {sens:.4f} is below the floor {floor}; {where}", []
    if champion is None:
        return CHAMPION, "no champion yet", []
    if champion.test_set != candidate.test_set:
        raise PipelineError("register: champion and candidate scored on different test sets (internal error)")
    key = params.primary_metric
    cand, champ = candidate.metrics[key], champion.metrics[key]
    if cand > champ + params.min_improvement:
        outcome = CHAMPION if params.promotion == "auto" else CHALLENGER
        return outcome, f"{key} {cand:.4f} beats champion v{champion.version} {champ:.4f}", []
    return "rejected", f"{key} {cand:.4f} does not beat champion v{champion.version} {champ:.4f}", []


def is_io_error(exc: BaseException) -> bool:
    """Errors worth retrying: the tracking server or the registry unreachable or failing, not bad input."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, MlflowException):
        text = str(exc)
        return any(s in text for s in ("Max retries", "Connection", "timed out", "database is locked", " 50"))
    return isinstance(exc, requests.exceptions.RequestException)


def with_retries(fn: Callable[[], T], what: str, params: RegisterParams, log: Callable[[str], None] = print) -> T:
    for attempt in range(params.retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_io_error(exc):
                raise
            if attempt == params.retries:
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise TransientError(f"register: {what} failed after {attempt + 1} attempts: {first}") from None
            delay = params.retry_backoff_seconds * 2**attempt
            log(
                f"register: {what} failed ({type(exc).__name__}); retry {attempt + 1}/{params.retries} in {delay:.1f} s"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def registry_lock(path: str | Path) -> Iterator[None]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def version_scores(version: Any) -> Scores:
    """A registered version's recorded figures (from the tags register wrote)."""
    tags = version.tags
    try:
        metrics = {k: float(tags[f"test_{k}"]) for k in SCORE_KEYS if f"test_{k}" in tags}
        return Scores(metrics, float(tags["threshold"]), tags["test_set"], str(version.version))
    except KeyError as exc:
        raise PipelineError(f"register: champion version {version.version} lacks tag {exc.args[0]!r}") from None


def champion_version(client: Any, name: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            return None
        raise


@dataclass(frozen=True)
class Candidate:
    run_id: str
    model_uri: str
    scores: Scores
    tags: dict[str, str]
    description: str


def register(
    client: Any,
    candidate: Candidate,
    params: RegisterParams,
    rescore: Callable[[str, float], dict[str, float]],
    log: Callable[[str], None] = print,
    finalize: Callable[[Decision], None] | None = None,
) -> Decision:
    """Register `candidate` and apply the champion policy; `rescore(model_uri, threshold)` scores a
    registered model on the candidate's test set when the champion was scored on another one.
    `finalize(decision)` runs last (the model card); if it fails, the version is rolled back too."""
    name = params.model_name

    def retry(fn: Callable[[], T], what: str) -> T:
        return with_retries(fn, what, params, log)

    with registry_lock(params.lock_file):
        if retry(lambda: _registered_model(client, name), "reading the registered model") is None:
            text = DESCRIPTION.format(name=name)
            retry(lambda: client.create_registered_model(name, description=text), "creating the model")
        current = retry(lambda: champion_version(client, name), "reading @champion")
        champion, rescored = None, False
        if current is not None:
            champion = version_scores(current)
            if champion.test_set != candidate.scores.test_set:
                log(f"register: champion v{champion.version} was scored on another test set; re-scoring it")
                metrics = rescore(f"models:/{name}/{champion.version}", champion.threshold)
                champion = Scores(metrics, champion.threshold, candidate.scores.test_set, champion.version)
                rescored = True
        outcome, reason, warnings = decide(candidate.scores, champion, params)
        if outcome == CHAMPION and current is not None:
            registered = retry(lambda: _registered_model(client, name), "reading the registered model")
            if registered.tags.get(PIPELINE_CHAMPION_TAG) != str(current.version):
                # A person moved @champion (the UI, the API): an automatic promotion never overrides that.
                outcome = CHALLENGER
                reason += f"; @champion v{current.version} was set by a person, so only @challenger moves"
        decision = Decision(outcome, reason, candidate.scores, champion, rescored, model_name=name, warnings=warnings)
        tags = {**candidate.tags, "decision": outcome, "decision_reason": reason}
        version = retry(lambda: _create_version(client, name, candidate, tags), "creating the model version")
        decision.version = str(version.version)
        try:
            if outcome == CHAMPION:
                if current is not None:
                    decision.previous_champion = str(current.version)
                    retry(
                        lambda: client.set_model_version_tag(
                            name, version.version, "previous_champion", str(current.version)
                        ),
                        "tagging the version",
                    )
                retry(lambda: client.set_registered_model_alias(name, CHAMPION, version.version), "moving @champion")
                decision.aliases.append(CHAMPION)
                retry(
                    lambda: client.set_registered_model_tag(name, PIPELINE_CHAMPION_TAG, str(version.version)),
                    "recording who set @champion",
                )
            elif outcome == CHALLENGER:
                retry(
                    lambda: client.set_registered_model_alias(name, CHALLENGER, version.version), "setting @challenger"
                )
                decision.aliases.append(CHALLENGER)
            if finalize is not None:
                finalize(decision)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the version must not stay half-registered
                if decision.previous_champion and CHAMPION in decision.aliases:
                    client.set_registered_model_alias(name, CHAMPION, decision.previous_champion)
                    client.set_registered_model_tag(name, PIPELINE_CHAMPION_TAG, decision.previous_champion)
                client.delete_model_version(name, version.version)
            raise
    return decision


DESCRIPTION = (
    "Pneumonia vs normal on pediatric anterior-posterior chest X-rays (Kermany et al. 2018 data set). "
    "Decision support only. Load the current champion as models:/{name}@champion."
)


def _registered_model(client: Any, name: str) -> Any | None:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise


def _create_version(client: Any, name: str, candidate: Candidate, tags: dict[str, str]) -> Any:
    # A logged model (models:/m-<id>) must be named by id too, or a tracking server refuses it.
    model_id = candidate.model_uri.removeprefix("models:/") if candidate.model_uri.startswith("models:/m-") else None
    return client.create_model_version(
        name,
        candidate.model_uri,
        run_id=candidate.run_id,
        tags=tags,
        description=candidate.description,
        model_id=model_id,
    )


def decision_json(decision: Decision) -> str:
    return (
        json.dumps({**asdict(decision), "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2)
        + "\n"
    )


def quiet_mlflow_http_retries() -> None:
    """Let register's own retry policy be the one in charge (MLflow's default retries take minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
