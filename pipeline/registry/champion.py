"""The register stage: a new model version in the MLflow registry and the champion decision.

Policy (``registry.*`` params): a candidate whose test sensitivity is below ``sensitivity_floor`` is
registered with its decision but never gets an alias, not even as the first version. Otherwise,
with no ``@champion`` the candidate becomes champion; with one, both are scored on the same test
set: the champion's recorded figures when its ``test_set`` tag matches, else the champion is
re-scored on the candidate's test set at its own registered threshold. The candidate wins when its
primary metric beats the champion's by ``min_improvement`` (a champion without a numeric
``test_<primary_metric>`` tag is re-scored too). A winner gets ``@challenger`` for a human to promote
(``promotion: manual``) or takes ``@champion`` itself (``auto``; the previous champion is recorded),
unless a person moved ``@champion`` since the pipeline last set it (the registered model's
``pipeline_champion`` tag): a person's choice is never overridden, the winner gets ``@challenger``.
``promotion: candidate`` (a sweep's winner) never takes ``@champion``, not even as the first version: a
winner gets ``@challenger`` at most, and the decision names where it came from. A winner takes
``@challenger`` only if it beats its current holder too, by the same rule on the same test set (re-scored
likewise); else it is rejected and that challenger stays.

Safety, on one machine or many. Registrations of a model take turns under the registration lock
(registry_lock: a lock file, or a PostgreSQL advisory lock shared by every machine), from reading
``@champion`` to moving the aliases, so two racing runs leave exactly one champion. Registry I/O is
retried (retrying: tenacity, transient errors only), so every step is idempotent:

- one version per evaluation of a training run: the version carries ``pneumo.registration_key`` (the
  run id and a digest of the evaluation: threshold, calibration, test-time views, figures, and of the
  packaging settings the served bundle is built with) from the call that creates it, so an evaluate-only
  or packaging-only change (e.g. ``evaluate.tta``, ``package.ood_threshold``, with DVC's run cache restoring
  the training) registers the model it now serves as a new version instead of rewriting the old one's card.
  A create whose response was lost is not repeated blindly: the retry first looks for this key's
  version and reuses it;
- the decision is computed before anything is written; the version is created ``pending`` with all its
  tags in one call, then the model card (``finalize``), then it is marked ``complete``, and only then
  are aliases set: a ``pending`` version never holds an alias;
- a failure after the version exists, once its retries are spent, rolls back (the version deleted; if this
  run made an alias call and the alias still points to its version, the alias's previous holder restored
  first), so the registry is not left half-updated; an alias another registration or a person has moved
  since is never touched, nor any alias once the lock is found lost;
- if the process died before it could roll back, the next register for the same run cleans up: a
  ``pending`` version is deleted and the registration starts over (decided afresh, under the lock);
  a ``complete`` one is kept and finished: its recorded decision's alias is set if ``@champion`` is
  still the version it was decided against (``pneumo.compared_with``), and for ``@challenger`` if that is still
  where it was (``pneumo.challenger_was``), else left alone with a warning; a recorded champion outcome
  sets ``@champion`` only under ``promotion: auto``.
  A re-run for a registered evaluation therefore never adds a second version, and reports the figures its
  decision was made against (``pneumo.comparison``), as the first run did. The register step looks for a
  ``complete`` version of the key before the lock too, so a re-run uploads no serving model it will not use.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException

from pipeline.core.config import RegisterParams
from pipeline.core.errors import PipelineError, registry_says_missing
from pipeline.registry.registry_lock import registry_lock
from pipeline.registry.retrying import with_retries  # also the steps' retry policy (champion.with_retries)

T = TypeVar("T")
CHAMPION, CHALLENGER = "champion", "challenger"
PIPELINE_CHAMPION_TAG = "pipeline_champion"  # the version this pipeline last gave @champion
KEY_TAG = "pneumo.registration_key"  # Candidate.key: one version per evaluation of a training run
STATE_TAG = "pneumo.registration"  # pending (created) -> complete (tags and card written); aliases only then
COMPARED_TAG = "pneumo.compared_with"  # the @champion version the decision was made against ("": none)
CHALLENGER_TAG = "pneumo.challenger_was"  # the @challenger version a challenger outcome replaces ("": none)
COMPARISON_TAG = "pneumo.comparison"  # the champion's / challenger's figures the decision used (JSON), for a re-run
PENDING, COMPLETE = "pending", "complete"
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
    resumed: bool = False  # this run's version was already registered (a re-run): finished, not duplicated
    challenger: Scores | None = None  # the @challenger a challenger outcome had to beat too
    challenger_rescored: bool = False
    previous_challenger: str | None = None  # the version that held @challenger before this one took it

    def summary(self) -> str:
        head = f"register: {self.model_name} version {self.version}: {self.outcome} ({self.reason})"
        return "\n".join([head, *(f"  warning: {w}" for w in self.warnings)])


def decide(candidate: Scores, champion: Scores | None, params: RegisterParams) -> tuple[str, str, list[str]]:
    """(outcome, reason, warnings) for a candidate against the champion on the same test set."""
    sens, floor = candidate.metrics["sensitivity"], params.sensitivity_floor
    if not sens >= floor:  # the clinical floor first (an undefined, NaN sensitivity fails it too)
        where = "no champion is set" if champion is None else f"champion v{champion.version} stays"
        return "rejected", f"test sensitivity {sens:.4f} is below the floor {floor}; {where}", []
    if champion is None:
        if params.promotion == "candidate":  # a sweep's winner waits for a person, even as the first version
            return CHALLENGER, "no champion yet; promotion: candidate gives @challenger at most", []
        return CHAMPION, "no champion yet", []
    if champion.test_set != candidate.test_set:
        raise PipelineError("register: champion and candidate scored on different test sets (internal error)")
    key = params.primary_metric
    cand, champ = candidate.metrics[key], champion.metrics[key]
    if cand > champ + params.min_improvement:
        outcome = CHAMPION if params.promotion == "auto" else CHALLENGER
        return outcome, f"{key} {cand:.4f} beats champion v{champion.version} {champ:.4f}", []
    return "rejected", f"{key} {cand:.4f} does not beat champion v{champion.version} {champ:.4f}", []


def version_scores(version: Any, role: str = CHAMPION) -> Scores:
    """A registered version's recorded figures (from the tags register wrote); a metric tag that is not a number
    is left out, so a missing or unreadable primary metric means re-scoring (see recorded_or_rescored)."""
    tags, v = version.tags, version.version
    metrics = {k: number(tags[f"test_{k}"]) for k in SCORE_KEYS if f"test_{k}" in tags}
    for tag in ("threshold", "test_set"):
        if tag not in tags:
            raise PipelineError(f"register: {role} version {v} lacks tag {tag!r}")
    try:
        threshold = float(tags["threshold"])
    except ValueError:
        raise PipelineError(
            f"register: {role} version {v} has a non-numeric tag 'threshold': {tags['threshold']!r}"
        ) from None
    return Scores({k: m for k, m in metrics.items() if m is not None}, threshold, tags["test_set"], str(v))


def recorded(value: float) -> float:
    """A figure at the precision a version's tags record it (``f"{v:.6f}"``), so that a candidate and a champion
    compare like with like: otherwise an identical evaluation beats its own rounded tag half the time."""
    return round(float(value), 6)


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def recorded_or_rescored(
    version: Any,
    role: str,
    candidate: Scores,
    params: RegisterParams,
    rescore: Callable[[str, float], dict[str, float]],
    log: Callable[[str], None],
) -> tuple[Scores, bool]:
    """A registered version's figures on the candidate's test set: its recorded ones when they were taken on that
    set and hold the primary metric as a number, else it is re-scored at its own registered threshold."""
    scores, tag = version_scores(version, role), f"test_{params.primary_metric}"
    if scores.test_set == candidate.test_set and params.primary_metric in scores.metrics:
        return scores, False
    why = "was scored on another test set" if scores.test_set != candidate.test_set else f"has no numeric tag {tag!r}"
    log(f"register: {role} v{scores.version} {why}; re-scoring it")
    metrics = rescore(f"models:/{params.model_name}/{scores.version}", scores.threshold)
    return Scores(metrics, scores.threshold, candidate.test_set, scores.version), True


def beats_challenger(candidate: Scores, challenger: Scores, params: RegisterParams) -> tuple[bool, str]:
    """Whether a winner also beats the current @challenger (the rule it beat the champion by), and why."""
    key = params.primary_metric
    cand, chal = candidate.metrics[key], challenger.metrics[key]
    v = challenger.version
    if cand > chal + params.min_improvement:
        return True, f"{key} {cand:.4f} beats challenger v{v} {chal:.4f}"
    return False, f"{key} {cand:.4f} does not beat challenger v{v} {chal:.4f}; challenger v{v} stays"


def champion_version(client: Any, name: str) -> Any | None:
    return alias_version(client, name, CHAMPION)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if registry_says_missing(exc):  # not a proxy's 404, which would read as "no champion" and promote
            return None
        raise


@dataclass(frozen=True)
class Candidate:
    run_id: str
    model_uri: str
    scores: Scores
    tags: dict[str, str]
    description: str
    origin: str = ""  # where the candidate came from (e.g. "from sweep <run id>"), added to the decision reason
    evaluation: str = ""  # a digest of the evaluation and packaging this candidate is scored and served with

    @property
    def key(self) -> str:
        """The registration key: the run id, and the evaluation digest when there is one."""
        return f"{self.run_id}:{self.evaluation}" if self.evaluation else self.run_id


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
    `finalize(decision)` writes the model card, after the version exists and before any alias moves;
    if it fails, the version is rolled back too. It runs again when a re-run finds the run registered."""
    name = params.model_name

    def retry(fn: Callable[[], T], what: str) -> T:
        return with_retries(fn, what, params, log)

    with registry_lock(params, log) as still_held:
        if retry(lambda: _registered_model(client, name), "reading the registered model") is None:
            retry(lambda: _create_registered_model(client, name), "creating the model")
        earlier = retry(lambda: _versions_of_key(client, name, candidate), "looking for this candidate's versions")
        for old in earlier:
            if old.tags.get(STATE_TAG) != COMPLETE:
                log(f"register: version {old.version} of run {candidate.run_id} was left half-registered; deleting it")
                retry(lambda v=old.version: _delete_version(client, name, v), "deleting a half-registered version")
        complete = [v for v in earlier if v.tags.get(STATE_TAG) == COMPLETE]
        if complete:
            decision = _finish(client, complete[0], candidate, params, retry, still_held, log)
            if finalize is not None:
                finalize(decision)
            return decision

        current = retry(lambda: champion_version(client, name), "reading @champion")
        champion, rescored = None, False
        if current is not None:
            champion, rescored = recorded_or_rescored(current, CHAMPION, candidate.scores, params, rescore, log)
        outcome, reason, warnings = decide(candidate.scores, champion, params)
        reason += f"; {candidate.origin}" if candidate.origin else ""
        if outcome == CHAMPION and current is not None:
            registered = retry(lambda: _registered_model(client, name), "reading the registered model")
            if registered.tags.get(PIPELINE_CHAMPION_TAG) != str(current.version):
                # A person moved @champion (the UI, the API): an automatic promotion never overrides that.
                outcome = CHALLENGER
                reason += f"; @champion v{current.version} was set by a person, so only @challenger moves"
        decision = Decision(outcome, reason, candidate.scores, champion, rescored, model_name=name, warnings=warnings)
        if outcome == CHALLENGER:
            holder = retry(lambda: alias_version(client, name, CHALLENGER), "reading @challenger")
            _against_challenger(decision, holder, current, params, rescore, log)
        tags = {
            **candidate.tags,
            "decision": decision.outcome,
            "decision_reason": decision.reason,
            KEY_TAG: candidate.key,
            STATE_TAG: PENDING,
            COMPARED_TAG: str(current.version) if current is not None else "",
            CHALLENGER_TAG: decision.previous_challenger or "",
            COMPARISON_TAG: comparison_json(decision),
        }
        if decision.outcome == CHAMPION and current is not None:
            decision.previous_champion = tags["previous_champion"] = str(current.version)
        create = _IdempotentCreate(client, name, candidate, tags, log)
        version = retry(create, "creating the model version")
        decision.version = str(version.version)
        moved = False  # whether an alias call was made: only then may the rollback touch an alias
        try:
            if finalize is not None:
                finalize(decision)
            retry(
                lambda: client.set_model_version_tag(name, decision.version, STATE_TAG, COMPLETE),
                "marking the version complete",
            )
            if create.tries > 1:  # an earlier try may have committed after the retry looked: a second version
                retry(lambda: _drop_strays(client, name, candidate, decision.version, log), "deleting stray versions")
            still_held()  # a lock lost with its connection: another registration may be deciding right now
            moved = True
            _set_aliases(client, decision, retry)
        except BaseException:
            _roll_back(client, decision, moved)
            raise
    return decision


def registered_version(client: Any, name: str, candidate: Candidate) -> Any | None:
    """The complete version already registered under the candidate's key, if any. A read without the lock (to skip
    work a re-run does not need): `register` looks again under the lock before it decides anything."""
    complete = [v for v in _versions_of_key(client, name, candidate) if v.tags.get(STATE_TAG) == COMPLETE]
    return complete[0] if complete else None


def served_model_uri(version: Any) -> str:
    """The model a registered version serves (its logged model when it names one)."""
    model_id = getattr(version, "model_id", None)
    return f"models:/{model_id}" if model_id else str(version.source)


def comparison_json(decision: Decision) -> str:
    """The figures a decision was made against, recorded on the version so a re-run reports the same ones."""
    fields = ("champion", "champion_rescored", "challenger", "challenger_rescored")
    return json.dumps({k: v for k, v in asdict(decision).items() if k in fields}, sort_keys=True)


def _recorded_comparison(
    client: Any, version: Any, candidate: Scores, retry: Callable[[Callable[[], Any], str], Any]
) -> dict[str, Any]:
    """The figures a complete version was decided against (Decision fields), read back from the registry: its
    COMPARISON_TAG; for a version registered before that tag, the compared champion's recorded figures when taken
    on the candidate's test set (what the decision used unless it re-scored; nothing is re-scored on a re-run)."""
    text = version.tags.get(COMPARISON_TAG)
    if text:
        try:
            recorded = json.loads(text)
            for role in (CHAMPION, CHALLENGER):
                recorded[role] = Scores(**recorded[role]) if recorded.get(role) else None
        except (ValueError, TypeError, AttributeError) as exc:  # a tag edited by hand in the UI
            raise PipelineError(
                f"register: version {version.version}'s tag {COMPARISON_TAG!r} is not the comparison register wrote "
                f"({type(exc).__name__}); restore it or delete the version"
            ) from None
        return recorded
    compared = version.tags.get(COMPARED_TAG)
    if not compared:
        return {}
    name = version.name
    try:
        old = retry(lambda: client.get_model_version(name, compared), "reading the compared champion")
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):  # deleted since: nothing to report
            return {}
        raise
    try:
        scores = version_scores(old)
    except PipelineError:  # its tags unreadable: nothing to report
        return {}
    return {CHAMPION: scores} if scores.test_set == candidate.test_set else {}


def _against_challenger(
    decision: Decision,
    holder: Any | None,
    current: Any | None,
    params: RegisterParams,
    rescore: Callable[[str, float], dict[str, float]],
    log: Callable[[str], None],
) -> None:
    """A winner takes @challenger only if it also beats the version holding it now (unless that is the champion,
    already beaten); else it is rejected and the challenger stays."""
    if holder is None:
        return
    decision.previous_challenger = str(holder.version)
    if current is not None and str(holder.version) == str(current.version):
        return
    challenger, rescored = recorded_or_rescored(holder, CHALLENGER, decision.candidate, params, rescore, log)
    decision.challenger, decision.challenger_rescored = challenger, rescored
    won, why = beats_challenger(decision.candidate, challenger, params)
    decision.reason += f"; {why}"
    if not won:
        decision.outcome, decision.previous_challenger = "rejected", None


def _roll_back(client: Any, decision: Decision, moved: bool) -> None:
    """Best effort after a failure: the alias this run moved put back on its previous holder, then the new version
    deleted.

    Aliases are touched only if this run made an alias call (`moved`), and then only while the alias still points
    to this version: a move can land with every reply lost, so no reply is trusted, but an alias that another
    registration or a person has moved since is theirs. If the alias cannot be read or put back, the version is
    left for a re-run (deleting it would take the alias with it)."""
    name, alias = decision.model_name, decision.outcome
    if moved and alias in (CHAMPION, CHALLENGER):
        previous = decision.previous_champion if alias == CHAMPION else decision.previous_challenger
        try:
            holder = alias_version(client, name, alias)
            if holder is not None and str(holder.version) == decision.version and previous:
                client.set_registered_model_alias(name, alias, previous)
                if alias == CHAMPION:
                    client.set_registered_model_tag(name, PIPELINE_CHAMPION_TAG, previous)
        except Exception:  # noqa: BLE001 - the registry is down: leave the version for a re-run
            return
    with contextlib.suppress(Exception):
        client.delete_model_version(name, decision.version)


def _set_aliases(client: Any, decision: Decision, retry: Callable[[Callable[[], Any], str], Any]) -> None:
    """The decision's alias on its complete version (each call idempotent, so safe to repeat)."""
    name, version = decision.model_name, decision.version
    if decision.outcome == CHAMPION:
        retry(lambda: client.set_registered_model_alias(name, CHAMPION, version), "moving @champion")
        decision.aliases.append(CHAMPION)
        retry(
            lambda: client.set_registered_model_tag(name, PIPELINE_CHAMPION_TAG, str(version)),
            "recording who set @champion",
        )
    elif decision.outcome == CHALLENGER:
        retry(lambda: client.set_registered_model_alias(name, CHALLENGER, version), "setting @challenger")
        decision.aliases.append(CHALLENGER)


def _finish(
    client: Any,
    version: Any,
    candidate: Candidate,
    params: RegisterParams,
    retry: Callable[[Callable[[], Any], str], Any],
    still_held: Callable[[], None],
    log: Callable[[str], None],
) -> Decision:
    """A re-run for a run already registered (complete): no new version; the recorded decision's alias is
    set if it is missing and the registry has not moved since the decision."""
    name, tags = params.model_name, version.tags
    decision = Decision(
        tags.get("decision", "rejected"),
        tags.get("decision_reason", ""),
        candidate.scores,
        previous_champion=tags.get("previous_champion"),
        version=str(version.version),
        model_name=name,
        resumed=True,
        previous_challenger=tags.get(CHALLENGER_TAG) or None,
        **_recorded_comparison(client, version, candidate.scores, retry),
    )
    log(f"register: run {candidate.run_id} is already version {decision.version} ({decision.outcome}); finishing it")
    alias = {CHAMPION: CHAMPION, CHALLENGER: CHALLENGER}.get(decision.outcome)
    if alias is None:
        return decision
    # Recorded under auto, a replacement of the champion may only be finished under auto; a first version became
    # champion under manual too (decide), but never under candidate.
    replaced = bool(tags.get(COMPARED_TAG))
    if alias == CHAMPION and (params.promotion == "candidate" or (replaced and params.promotion != "auto")):
        decision.warnings.append(
            f"promotion: {params.promotion} never sets @champion itself; its recorded @champion was not set"
        )
        return decision
    holder = retry(lambda: alias_version(client, name, alias), f"reading @{alias}")
    current = retry(lambda: champion_version(client, name), "reading @champion")
    held = holder is not None and str(holder.version) == decision.version
    unchanged = (str(current.version) if current is not None else "") == tags.get(COMPARED_TAG)
    if alias == CHALLENGER and not held and unchanged:  # and @challenger is still where it was decided against
        unchanged = (str(holder.version) if holder is not None else "") == tags.get(CHALLENGER_TAG, "")
        if not unchanged:
            now = f"v{holder.version}" if holder is not None else "none"
            decision.warnings.append(f"@challenger changed since this version was decided (now {now}); it was not set")
            return decision
    if held or unchanged:
        still_held()
        _set_aliases(client, decision, retry)
    else:
        now = f"v{current.version}" if current is not None else "none"
        decision.warnings.append(
            f"@champion changed since this version was decided (now {now}); its @{alias} was not set"
        )
    return decision


class _IdempotentCreate:
    """create_model_version for retrying: after a failed try the server may have committed the version and
    lost only the response, so a retry first looks for this run's version and reuses it. `tries` counts the
    calls: after more than one, a try that timed out may still commit later (`_drop_strays`)."""

    def __init__(
        self, client: Any, name: str, candidate: Candidate, tags: dict[str, str], log: Callable[[str], None]
    ) -> None:
        self.client, self.name, self.candidate, self.tags, self.log = client, name, candidate, tags, log
        self.tries = 0

    def __call__(self) -> Any:
        self.tries += 1
        if self.tries > 1:
            found = _versions_of_key(self.client, self.name, self.candidate)
            if found:
                self.log(f"register: version {found[0].version} was created before the response was lost; reusing it")
                return found[0]
        return _create_version(self.client, self.name, self.candidate, self.tags)


def _drop_strays(client: Any, name: str, candidate: Candidate, kept: str, log: Callable[[str], None]) -> None:
    """Delete the versions of the candidate's key other than `kept` that are still pending: a create that timed
    out on the client but committed on the server after the retry had looked (never aliased, never complete)."""
    for stray in _versions_of_key(client, name, candidate):
        if str(stray.version) != kept and stray.tags.get(STATE_TAG) != COMPLETE:
            log(f"register: version {stray.version} was committed by a create that had timed out; deleting it")
            _delete_version(client, name, str(stray.version))


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


def _create_registered_model(client: Any, name: str) -> None:
    try:
        client.create_registered_model(name, description=DESCRIPTION.format(name=name))
    except MlflowException as exc:  # a retry after a lost response, or a registration on another machine
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise


def _versions_of_key(client: Any, name: str, candidate: Candidate) -> list[Any]:
    """The versions of `name` this pipeline registered under the candidate's key, oldest first."""
    found = client.search_model_versions(f"run_id = '{candidate.run_id}'")
    ours = [v for v in found if v.name == name and v.tags.get(KEY_TAG) == candidate.key]
    return sorted(ours, key=lambda v: int(v.version))


def _delete_version(client: Any, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
    except MlflowException as exc:  # already gone: a retry after a lost response
        if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
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
