"""Champion registration against a real MLflow registry (sqlite) with real logged Keras models."""

from __future__ import annotations

import importlib
import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.config import RegisterParams
from pipeline.core.errors import PipelineError, TransientError
from pipeline.registry import champion

pytestmark = pytest.mark.slow


def policy(tmp: Path, **changes: Any) -> RegisterParams:
    base = {"model_name": "pneumo-test", "lock_file": str(tmp / "champion.lock"), "retry_backoff_seconds": 0.01}
    return RegisterParams(**{**base, **changes})


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, Any]:
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-tests")
    return uri, MlflowClient(uri)


def log_candidate(auc: float, sensitivity: float, test_set: str = "T1", threshold: float = 0.5) -> champion.Candidate:
    import mlflow

    from pipeline.modeling.models import build_model

    with mlflow.start_run() as run:
        info = mlflow.keras.log_model(build_model("compact_cnn", 32).model, name="model", pip_requirements=["keras"])
    metrics = {k: 0.8 for k in champion.SCORE_KEYS} | {"roc_auc": auc, "sensitivity": sensitivity}
    scores = champion.Scores(metrics, threshold, test_set)
    tags = {f"test_{k}": str(v) for k, v in metrics.items()} | {"threshold": str(threshold), "test_set": test_set}
    return champion.Candidate(run.info.run_id, info.model_uri, scores, tags, f"auc {auc}")


def never(model_uri: str, threshold: float) -> dict[str, float]:
    raise AssertionError("the champion must not be re-scored on the same test set")


def aliases(client: Any, name: str = "pneumo-test") -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_first_better_worse_and_floor(store: tuple[str, Any], tmp_path: Path) -> None:
    _, client = store
    params = policy(tmp_path)
    first = champion.register(client, log_candidate(0.90, 0.95), params, never)
    assert (first.outcome, first.version, first.reason) == ("champion", "1", "no champion yet")
    assert aliases(client) == {"champion": "1"}
    v1 = client.get_model_version("pneumo-test", "1")
    assert v1.tags["decision"] == "champion" and v1.tags["test_roc_auc"] == "0.9" and v1.description == "auc 0.9"

    better = champion.register(client, log_candidate(0.95, 0.95), params, never)
    assert better.outcome == "challenger" and "roc_auc 0.9500 beats champion v1 0.9000" in better.reason
    assert aliases(client) == {"champion": "1", "challenger": "2"}

    worse = champion.register(client, log_candidate(0.85, 0.99), params, never)
    assert worse.outcome == "rejected" and aliases(client) == {"champion": "1", "challenger": "2"}
    assert client.get_model_version("pneumo-test", "3").tags["decision"] == "rejected"

    unsafe = champion.register(client, log_candidate(0.99, 0.80), params, never)
    assert unsafe.outcome == "rejected"
    assert unsafe.reason == "test sensitivity 0.8000 is below the floor 0.9; champion v1 stays"
    assert aliases(client) == {"champion": "1", "challenger": "2"}


def test_first_candidate_below_the_floor_is_registered_but_never_champion(
    store: tuple[str, Any], tmp_path: Path
) -> None:
    _, client = store
    for promotion in ("manual", "auto"):
        params = policy(tmp_path, promotion=promotion, model_name=f"floor-{promotion}")
        first = champion.register(client, log_candidate(0.99, 0.85), params, never)
        assert (first.outcome, first.version, first.aliases) == ("rejected", "1", [])
        assert first.reason == "test sensitivity 0.8500 is below the floor 0.9; no champion is set"
        v1 = client.get_model_version(params.model_name, "1")
        assert v1.tags["decision"] == "rejected" and v1.tags["decision_reason"] == first.reason
        assert aliases(client, params.model_name) == {}
        # The next candidate that meets the floor becomes the first champion.
        second = champion.register(client, log_candidate(0.90, 0.95), params, never)
        assert second.outcome == "champion" and aliases(client, params.model_name) == {"champion": "2"}


def test_candidate_promotion_never_takes_champion(store: tuple[str, Any], tmp_path: Path) -> None:
    """A sweep's winner (promotion: candidate): @challenger at most, even as the first version of a model."""
    import dataclasses

    _, client = store
    params = policy(tmp_path, promotion="candidate")
    swept = dataclasses.replace(log_candidate(0.90, 0.95), origin="from sweep abc123")
    first = champion.register(client, swept, params, never)
    assert (first.outcome, first.version, first.aliases) == ("challenger", "1", ["challenger"])
    assert first.reason == "no champion yet; promotion: candidate gives @challenger at most; from sweep abc123"
    assert client.get_model_version("pneumo-test", "1").tags["decision_reason"] == first.reason
    assert aliases(client) == {"challenger": "1"}
    # A re-run for the same run finishes it without a second version and without @champion.
    again = champion.register(client, swept, params, never)
    assert again.resumed and again.version == "1" and aliases(client) == {"challenger": "1"}

    champion.register(client, log_candidate(0.92, 0.95), policy(tmp_path), never)  # v2: the first champion
    better = champion.register(client, log_candidate(0.99, 0.95), params, never)
    assert better.outcome == "challenger" and aliases(client) == {"champion": "2", "challenger": "3"}
    worse = champion.register(client, log_candidate(0.80, 0.95), params, never)
    unsafe = champion.register(client, log_candidate(0.99, 0.50), params, never)
    assert worse.outcome == unsafe.outcome == "rejected" and aliases(client) == {"champion": "2", "challenger": "3"}


def test_a_new_evaluation_of_the_same_run_is_a_new_version(store: tuple[str, Any], tmp_path: Path) -> None:
    """The registration key is the run and its evaluation: the same evaluation again finishes its version,
    another one (e.g. evaluate.tta changed, the training restored from DVC's run cache) adds a version."""
    import dataclasses

    _, client = store
    params = policy(tmp_path)
    plain = dataclasses.replace(log_candidate(0.90, 0.95), evaluation="aaaa")
    assert champion.register(client, plain, params, never).version == "1"
    again = champion.register(client, plain, params, never)
    assert again.resumed and again.version == "1"
    views = dataclasses.replace(plain, evaluation="bbbb", scores=dataclasses.replace(plain.scores, threshold=0.6))
    second = champion.register(client, views, params, never)
    assert not second.resumed and second.version == "2" and second.champion.version == "1"
    keys = {str(v.version): v.tags[champion.KEY_TAG] for v in client.search_model_versions("name = 'pneumo-test'")}
    assert keys == {"1": f"{plain.run_id}:aaaa", "2": f"{plain.run_id}:bbbb"}


def test_auto_promotion_never_overrides_a_person(store: tuple[str, Any], tmp_path: Path) -> None:
    _, client = store
    params = policy(tmp_path, promotion="auto")
    champion.register(client, log_candidate(0.90, 0.95), params, never)
    champion.register(client, log_candidate(0.85, 0.95), params, never)  # v2, rejected
    client.set_registered_model_alias("pneumo-test", "champion", "2")  # a person promotes v2 in the UI
    won = champion.register(client, log_candidate(0.99, 0.95), params, never)
    assert won.outcome == "challenger" and "@champion v2 was set by a person" in won.reason
    assert aliases(client) == {"champion": "2", "challenger": "3"}


def test_auto_promotion_records_the_previous_champion(store: tuple[str, Any], tmp_path: Path) -> None:
    _, client = store
    params = policy(tmp_path, promotion="auto", min_improvement=0.01)
    champion.register(client, log_candidate(0.90, 0.95), params, never)
    tie = champion.register(client, log_candidate(0.905, 0.95), params, never)
    assert tie.outcome == "rejected"  # within min_improvement
    won = champion.register(client, log_candidate(0.93, 0.95), params, never)
    assert won.outcome == "champion" and won.previous_champion == "1"
    assert aliases(client) == {"champion": "3"}
    assert client.get_model_version("pneumo-test", "3").tags["previous_champion"] == "1"


def test_changed_test_set_rescores_the_champion(store: tuple[str, Any], tmp_path: Path) -> None:
    _, client = store
    params = policy(tmp_path)
    champion.register(client, log_candidate(0.97, 0.95, test_set="old", threshold=0.3), params, never)
    calls: list[tuple[str, float]] = []

    def rescore(model_uri: str, threshold: float) -> dict[str, float]:
        calls.append((model_uri, threshold))
        return {k: 0.8 for k in champion.SCORE_KEYS} | {"roc_auc": 0.88, "sensitivity": 0.93}

    # 0.92 would lose against the champion's recorded 0.97, but that was another test set.
    decision = champion.register(client, log_candidate(0.92, 0.95, test_set="new"), params, rescore)
    assert calls == [("models:/pneumo-test/1", 0.3)]
    assert decision.champion_rescored and decision.champion.metrics["roc_auc"] == 0.88
    assert decision.outcome == "challenger"


def test_real_rescore_loads_the_registered_model(
    store: tuple[str, Any], tmp_path: Path, synthetic_index: tuple[Path, Any]
) -> None:
    from pipeline.core.config import load_params
    from pipeline.data.version import split_fingerprint
    from pipeline.steps.register import rescorer
    from tests.conftest import REPO, SMALL_SYNTHETIC

    _, client = store
    data_dir, index = synthetic_index
    index.to_parquet(tmp_path / "index.parquet")
    params = load_params(
        REPO / "params.yaml",
        [*SMALL_SYNTHETIC, f"data.root={data_dir / 'data' / 'raw'}", f"index.path={tmp_path / 'index.parquet'}"],
    )
    champion.register(client, log_candidate(0.9, 0.95), policy(tmp_path), never)
    figures = rescorer(params, split_fingerprint(index, "test"))("models:/pneumo-test/1", 0.5)
    assert set(figures) == set(champion.SCORE_KEYS) and 0.0 <= figures["roc_auc"] <= 1.0
    assert all(v == round(v, 6) for v in figures.values() if v == v)  # at the tags' precision (NaN aside)
    # The index rebuilt since the candidate's evaluation: the champion is not scored on other images than it
    with pytest.raises(PipelineError, match=r"index.parquet: its test split is not the one .* was scored on; run"):
        rescorer(params, "a-test-set-evaluated-before")("models:/pneumo-test/1", 0.5)


def _race(uri: str, lock: str, candidate: champion.Candidate, out: Any) -> None:
    from mlflow import MlflowClient

    params = RegisterParams(model_name="pneumo-test", lock_file=lock, retry_backoff_seconds=0.05)
    decision = champion.register(MlflowClient(uri), candidate, params, never, log=lambda _: None)
    out.put((decision.version, decision.outcome))


def test_two_racing_registrations_leave_one_champion(store: tuple[str, Any], tmp_path: Path) -> None:
    uri, client = store
    candidates = [log_candidate(0.90, 0.95), log_candidate(0.91, 0.95)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(uri, str(tmp_path / "champion.lock"), c, out)) for c in candidates]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = sorted(out.get(timeout=5) for _ in procs)
    outcomes = [o for _, o in results]
    assert outcomes.count("champion") == 1, results  # the second saw the first as champion
    assert set(aliases(client)) <= {"champion", "challenger"} and "champion" in aliases(client)
    assert len(client.search_model_versions("name='pneumo-test'")) == 2


class FailingAliases:
    """The real client, with the registry going down when aliases are set (fault injection)."""

    def __init__(self, client: Any) -> None:
        self.client, self.alias_calls = client, 0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return getattr(self.client, name)

    def set_registered_model_alias(self, *args: Any) -> None:
        self.alias_calls += 1
        raise ConnectionError("Connection refused")


def test_registry_down_mid_way_retries_then_rolls_back(store: tuple[str, Any], tmp_path: Path) -> None:
    _, client = store
    params = policy(tmp_path, retries=2)
    champion.register(client, log_candidate(0.90, 0.95), params, never)
    flaky = FailingAliases(client)
    logs: list[str] = []
    with pytest.raises(PipelineError) as err:
        champion.register(flaky, log_candidate(0.95, 0.95), params, never, log=logs.append)
    assert str(err.value).startswith("register: setting @challenger failed after 3 attempts: Connection refused")
    assert flaky.alias_calls == 3 and len(logs) == 2
    assert [str(v.version) for v in client.search_model_versions("name='pneumo-test'")] == ["1"]  # rolled back
    assert aliases(client) == {"champion": "1"}


class LostReplies(FailingAliases):
    """The real client; moving @champion reaches the registry, but every reply is lost (fault injection)."""

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)
        if alias == "champion":
            self.alias_calls += 1
            raise ConnectionError("Connection reset by peer")


def test_a_champion_move_that_landed_with_its_replies_lost_is_put_back(store: tuple[str, Any], tmp_path: Path) -> None:
    """The registry never ends without a champion: the move landed each time though no reply said so, and the
    rollback puts @champion back on v1 (and keeps v2, which the alias pointed to, for a re-run to clean up)."""
    _, client = store
    params = policy(tmp_path, retries=1, promotion="auto")
    champion.register(client, log_candidate(0.90, 0.95), params, never)
    with pytest.raises(PipelineError, match=r"^register: moving @champion failed after 2 attempts"):
        champion.register(LostReplies(client), log_candidate(0.95, 0.95), params, never, log=lambda _: None)
    assert aliases(client) == {"champion": "1"}
    assert client.get_registered_model("pneumo-test").tags[champion.PIPELINE_CHAMPION_TAG] == "1"
    rerun = champion.register(client, log_candidate(0.96, 0.95), params, never, log=lambda _: None)
    assert rerun.outcome == "champion" and aliases(client) == {"champion": rerun.version}


class LateCommit:
    """The real client; the first create times out on the client and reaches the server only after the retry
    has looked for it (a slow proxy or database; fault injection)."""

    def __init__(self, client: Any) -> None:
        self.client, self.late = client, None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return getattr(self.client, name)

    def create_model_version(self, *args: Any, **kwargs: Any) -> Any:
        if self.late is None:
            self.late = (args, kwargs)
            raise TimeoutError("Read timed out")
        mine = self.client.create_model_version(*args, **kwargs)
        self.client.create_model_version(*self.late[0], **self.late[1])  # the timed-out try commits now
        return mine


def test_a_create_that_timed_out_and_committed_late_leaves_no_second_version(
    store: tuple[str, Any], tmp_path: Path
) -> None:
    _, client = store
    logs: list[str] = []
    decision = champion.register(LateCommit(client), log_candidate(0.90, 0.95), policy(tmp_path), never, logs.append)
    versions = client.search_model_versions("name='pneumo-test'")
    assert [str(v.version) for v in versions] == [decision.version] == ["1"]
    assert aliases(client) == {"champion": "1"} and versions[0].tags[champion.STATE_TAG] == champion.COMPLETE
    assert any("version 2 was committed by a create that had timed out; deleting it" in line for line in logs), logs


def test_tracking_server_unreachable_is_one_clear_error(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    champion.quiet_mlflow_http_retries()
    client = MlflowClient("http://127.0.0.1:9")
    candidate = champion.Candidate("run", "models:/m-x", champion.Scores({}, 0.5, "T"), {}, "")
    with pytest.raises(PipelineError, match=r"^register: reading the registered model failed after 2 attempts"):
        champion.register(client, candidate, policy(tmp_path, retries=1), never, log=lambda _: None)


def test_the_pyfunc_requirements_cover_every_package_the_serving_code_imports() -> None:
    """An environment built from the logged requirements.txt (`mlflow models serve` with its default virtualenv,
    `build-docker`) can load the model: every distribution a loaded pipeline module imports is required, or is
    a dependency of one that is. Checked in a fresh interpreter, by the import statements of the pipeline
    modules loading the pyfunc actually loads (libraries' own optional imports are theirs to declare)."""
    import subprocess
    import sys

    script = r"""
import ast, importlib.metadata as md, json, sys
import pipeline.serving.pyfunc_model
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
from pipeline.registry.packaging import pyfunc_requirements
tops = set()
for name, module in list(sys.modules.items()):
    if name.split(".")[0] == "pipeline" and getattr(module, "__file__", None):
        for node in ast.walk(ast.parse(open(module.__file__).read())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
owners = md.packages_distributions()
# A top-level name several distributions share (ruamel: ruamel.yaml and its C part) needs one of them.
imported = [{canon(d) for d in owners[t]} - {"pneumo"} for t in tops if t in owners]
imported = [names for names in imported if names]
seen, todo = set(), [canon(Requirement(r).name) for r in [*pyfunc_requirements(), "mlflow"]]
while todo:
    name = todo.pop()
    if name not in seen:
        seen.add(name)
        for r in map(Requirement, md.requires(name) or []):
            if not r.marker or r.marker.evaluate({"extra": ""}):
                todo.append(canon(r.name))
print(json.dumps({"imported": sorted(set().union(*imported)),
                  "missing": sorted(min(names) for names in imported if not names & seen)}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert {"tensorflow", "ruamel-yaml", "filelock"} <= set(found["imported"])  # the check sees the real imports
    assert found["missing"] == []


def test_a_changed_bundle_setting_is_a_new_registration_key_and_a_card_setting_is_not() -> None:
    """The key names what the version serves: the evaluation and the packaging that goes into the bundle. A
    changed OOD limit or drift reference is another served model (a new version, not a new card on the old
    one); a changed number of card examples is not."""
    import numpy as np

    from pipeline.core.config import EvaluateParams, load_params
    from pipeline.modeling.evaluation import evaluate
    from pipeline.steps.register import serving_digest
    from tests.conftest import REPO

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 60), rng.random(60)
    ev = evaluate(y, p, y, p, ("NORMAL", "PNEUMONIA"), EvaluateParams(bootstrap=0))
    other_ev = evaluate(y, p, y, p, ("NORMAL", "PNEUMONIA"), EvaluateParams(bootstrap=0, target_sensitivity=0.8))

    def digest(*overrides: str, evaluation: Any = ev) -> str:
        return serving_digest(evaluation, load_params(REPO / "params.yaml", list(overrides)))

    base = digest()
    assert base == digest() == digest("package.gradcam_examples=3")
    assert len({base, digest("package.ood_threshold=5.0"), digest("package.ood_warning=null"),
                digest("package.reference_images=50"), digest(evaluation=other_ev)}) == 5  # fmt: skip


def test_a_run_of_the_committed_code_is_not_dirty_a_changed_module_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The git_commit tag: a pipeline run rewrites dvc.lock and the reports committed beside the code, so a clean
    clone's first run is still the commit; a changed module (or params.yaml) makes it -dirty, and a sweep trial's
    folder below the project reads the project's dvc.yaml."""
    import subprocess

    from pipeline.registry.tracking import git_commit

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    project = tmp_path / "proj"  # a DVC project in a folder of its repository
    (project / "reports" / "figures").mkdir(parents=True)
    (project / "pipeline").mkdir()
    (project / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: x\n    outs: [reports/figures]\n    metrics: [reports/metrics.json]\n"
        "    plots:\n    - reports/plots/roc.csv:\n        x: fpr\n"
    )
    files = ["dvc.lock", "reports/metrics.json", "reports/figures/roc.png", "pipeline/train.py", "params.yaml"]
    for name in files:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("v1\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    head = git("rev-parse", "HEAD").strip()
    trial = project / "sweeps" / "s1" / "t01"
    trial.mkdir(parents=True)
    for name in files[:3]:  # what a run rewrites
        (project / name).write_text("v2\n")
    for where in (project, trial):
        monkeypatch.chdir(where)
        assert git_commit() == head
    (project / "params.yaml").write_text("v2\n")
    assert git_commit() == f"{head}-dirty"
    git("checkout", "-q", "--", "proj/params.yaml")
    (project / "pipeline" / "train.py").write_text("v2\n")
    monkeypatch.chdir(project)
    assert git_commit() == f"{head}-dirty"


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (TransientError("{uri}: cannot download the model (Connection reset by peer)"), "Connection reset by peer"),
        (PipelineError("{uri} (version 1): cannot load the model (TypeError: Unknown layer)"), "Unknown layer"),
    ],
    ids=["store-unreachable", "bundle-broken"],
)
def test_a_champion_that_cannot_be_loaded_says_why_instead_of_trying_the_keras_flavour(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, synthetic_index: tuple[Path, Any], failure: Exception, said: str
) -> None:
    """Re-scoring the champion: a dropped download is transient (exit 75, the flow retries the stage), and a
    bundle that does not load is that error; neither is a version from before serving bundles, whose Keras
    flavour would be loaded instead (and fail with 'no keras flavour', the real cause lost)."""

    from pipeline.core.config import load_params
    from pipeline.data.version import split_fingerprint
    from pipeline.steps import register
    from tests.conftest import REPO

    def failing(uri: str) -> None:
        raise type(failure)(str(failure).format(uri=uri))

    fallbacks: list[str] = []
    monkeypatch.setattr(register.classifier, "load", failing)
    # the module itself: `mlflow.keras` may still be MLflow's lazy loader, which would not forward the patch
    monkeypatch.setattr(importlib.import_module("mlflow.keras"), "load_model", lambda uri: fallbacks.append(uri))
    _, index = synthetic_index
    index.to_parquet(tmp_path / "index.parquet")
    params = load_params(
        REPO / "params.yaml", ["registry.retry_backoff_seconds=0.01", f"index.path={tmp_path / 'index.parquet'}"]
    )
    rescore = register.rescorer(params, split_fingerprint(index, "test"))
    with pytest.raises(type(failure), match=said):
        rescore("models:/pneumo-chest-xray/1", 0.5)
    assert fallbacks == []


# --- rollback, the challenger rule and champions without figures (review findings) ----------------------


def test_a_failure_before_any_alias_call_leaves_a_persons_champion_alone(
    store: tuple[str, Any], tmp_path: Path
) -> None:
    """The card fails after a person moved @champion mid-registration: no alias call was made, so the rollback
    deletes the version and touches no alias (it used to put @champion back on v1, over the person)."""
    _, client = store
    params = policy(tmp_path, promotion="auto", retries=0)
    champion.register(client, log_candidate(0.90, 0.95), params, never)
    champion.register(client, log_candidate(0.85, 0.95), params, never)  # v2, rejected

    def finalize(decision: champion.Decision) -> None:
        assert decision.outcome == "champion" and decision.previous_champion == "1"
        client.set_registered_model_alias("pneumo-test", "champion", "2")  # a person, in the UI
        raise PipelineError("register: the model card cannot be written")

    with pytest.raises(PipelineError, match="model card"):
        champion.register(client, log_candidate(0.99, 0.95), params, never, log=lambda _: None, finalize=finalize)
    assert aliases(client) == {"champion": "2"}
    assert client.get_registered_model("pneumo-test").tags[champion.PIPELINE_CHAMPION_TAG] == "1"
    assert sorted(str(v.version) for v in client.search_model_versions("name='pneumo-test'")) == ["1", "2"]


def test_a_lost_lock_never_touches_an_alias(
    store: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock's session dropped and another registration promoted its own version meanwhile: still_held() fails
    and the rollback leaves that promotion alone."""
    import contextlib

    from pipeline.core.errors import TransientError

    _, client = store
    params = policy(tmp_path, promotion="auto", retries=0)
    champion.register(client, log_candidate(0.90, 0.95), params, never)
    champion.register(client, log_candidate(0.85, 0.95), params, never)  # v2: "the other registration's" version
    lost = {"now": False}

    def still_held() -> None:
        if lost["now"]:
            raise TransientError("register: lost the registration lock")

    @contextlib.contextmanager
    def lock(*_: Any, **__: Any) -> Any:
        yield still_held

    def other_registration_wins(decision: champion.Decision) -> None:
        client.set_registered_model_alias("pneumo-test", "champion", "2")
        client.set_registered_model_tag("pneumo-test", champion.PIPELINE_CHAMPION_TAG, "2")
        lost["now"] = True

    monkeypatch.setattr(champion, "registry_lock", lock)
    with pytest.raises(TransientError, match="lost the registration lock"):
        champion.register(client, log_candidate(0.99, 0.95), params, never, lambda _: None, other_registration_wins)
    assert aliases(client) == {"champion": "2"}
    assert client.get_registered_model("pneumo-test").tags[champion.PIPELINE_CHAMPION_TAG] == "2"
    assert sorted(str(v.version) for v in client.search_model_versions("name='pneumo-test'")) == ["1", "2"]


class LostRepliesFor(FailingAliases):
    """The real client; every alias move reaches the registry, but the replies for one version are lost."""

    def __init__(self, client: Any, version: str) -> None:
        super().__init__(client)
        self.version = version

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)
        if str(version) == self.version:
            self.alias_calls += 1
            raise ConnectionError("Connection reset by peer")


def test_a_failed_challenger_move_puts_the_previous_challenger_back(store: tuple[str, Any], tmp_path: Path) -> None:
    """v3 took @challenger from v2 with every reply lost: the rollback puts @challenger back on v2 before deleting
    v3 (deleting v3 alone would leave no challenger)."""
    _, client = store
    params = policy(tmp_path, retries=1)
    champion.register(client, log_candidate(0.90, 0.95), params, never)
    champion.register(client, log_candidate(0.95, 0.95), params, never)  # v2: @challenger
    with pytest.raises(PipelineError, match=r"^register: setting @challenger failed after 2 attempts"):
        champion.register(LostRepliesFor(client, "3"), log_candidate(0.97, 0.95), params, never, log=lambda _: None)
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    assert sorted(str(v.version) for v in client.search_model_versions("name='pneumo-test'")) == ["1", "2"]


def test_a_winner_takes_challenger_only_from_a_weaker_one(store: tuple[str, Any], tmp_path: Path) -> None:
    _, client = store
    params = policy(tmp_path)
    champion.register(client, log_candidate(0.90, 0.95), params, never)
    strong = log_candidate(0.97, 0.95)
    assert champion.register(client, strong, params, never).outcome == "challenger"  # v2
    weaker = champion.register(client, log_candidate(0.91, 0.95), params, never)
    assert weaker.outcome == "rejected" and weaker.challenger.version == "2"
    assert weaker.reason.endswith("; roc_auc 0.9100 does not beat challenger v2 0.9700; challenger v2 stays")
    assert client.get_model_version("pneumo-test", "3").tags["decision"] == "rejected"
    stronger = champion.register(client, log_candidate(0.99, 0.95), params, never)
    assert (stronger.outcome, stronger.previous_challenger) == ("challenger", "2")
    assert aliases(client) == {"champion": "1", "challenger": "4"}
    # A re-run of v2's registration finds it complete, but does not take @challenger back from v4.
    again = champion.register(client, strong, params, never, log=lambda _: None)
    assert again.resumed and again.version == "2" and "@challenger changed" in again.warnings[0]
    assert aliases(client) == {"champion": "1", "challenger": "4"}


def test_a_challenger_scored_on_another_test_set_is_rescored_too(store: tuple[str, Any], tmp_path: Path) -> None:
    _, client = store
    params = policy(tmp_path)
    champion.register(client, log_candidate(0.90, 0.95, test_set="old", threshold=0.3), params, never)
    champion.register(client, log_candidate(0.95, 0.95, test_set="old", threshold=0.4), params, never)  # v2
    rescored = {"models:/pneumo-test/1": 0.80, "models:/pneumo-test/2": 0.93}
    calls: list[tuple[str, float]] = []

    def rescore(model_uri: str, threshold: float) -> dict[str, float]:
        calls.append((model_uri, threshold))
        return {k: 0.8 for k in champion.SCORE_KEYS} | {"roc_auc": rescored[model_uri]}

    # 0.92 beats the champion's 0.80 on the new set but not the challenger's 0.93.
    decision = champion.register(client, log_candidate(0.92, 0.95, test_set="new"), params, rescore)
    assert calls == [("models:/pneumo-test/1", 0.3), ("models:/pneumo-test/2", 0.4)]
    assert decision.outcome == "rejected" and decision.challenger_rescored
    assert aliases(client) == {"champion": "1", "challenger": "2"}


@pytest.mark.parametrize("tag_value", [None, "n/a"])
def test_a_champion_without_a_numeric_primary_metric_is_rescored(
    store: tuple[str, Any], tmp_path: Path, tag_value: str | None
) -> None:
    _, client = store
    params = policy(tmp_path)
    champion.register(client, log_candidate(0.97, 0.95, threshold=0.3), params, never)
    if tag_value is None:
        client.delete_model_version_tag("pneumo-test", "1", "test_roc_auc")
    else:
        client.set_model_version_tag("pneumo-test", "1", "test_roc_auc", tag_value)
    calls: list[tuple[str, float]] = []

    def rescore(model_uri: str, threshold: float) -> dict[str, float]:
        calls.append((model_uri, threshold))
        return {k: 0.8 for k in champion.SCORE_KEYS} | {"roc_auc": 0.88}

    logs: list[str] = []
    decision = champion.register(client, log_candidate(0.92, 0.95), params, rescore, log=logs.append)
    assert calls == [("models:/pneumo-test/1", 0.3)] and decision.outcome == "challenger"
    assert "register: champion v1 has no numeric tag 'test_roc_auc'; re-scoring it" in logs


def test_a_champion_without_a_numeric_threshold_is_one_clear_error(store: tuple[str, Any], tmp_path: Path) -> None:
    _, client = store
    params = policy(tmp_path)
    champion.register(client, log_candidate(0.97, 0.95), params, never)
    client.set_model_version_tag("pneumo-test", "1", "threshold", "high")
    with pytest.raises(PipelineError, match=r"^register: champion version 1 has a non-numeric tag 'threshold'"):
        champion.register(client, log_candidate(0.92, 0.95), params, never)
    client.delete_model_version_tag("pneumo-test", "1", "threshold")
    with pytest.raises(PipelineError, match=r"^register: champion version 1 lacks tag 'threshold'$"):
        champion.register(client, log_candidate(0.92, 0.95), params, never)


def test_the_registration_key_covers_the_bundled_code_and_requirements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fix in the served code (or a new pinned requirement) is another served model: a new version, not the
    old version finished with a new card."""
    import numpy as np

    from pipeline.core.config import EvaluateParams, load_params
    from pipeline.modeling.evaluation import evaluate
    from pipeline.registry import packaging
    from pipeline.steps.register import serving_digest
    from tests.conftest import REPO

    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "predict.py").write_text("x = 1\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.pyc").write_bytes(b"1")
    code = packaging.code_digest(tmp_path)
    (tmp_path / "__pycache__" / "a.pyc").write_bytes(b"2")
    assert packaging.code_digest(tmp_path) == code  # caches are not code
    (tmp_path / "serving" / "predict.py").write_text("x = 2\n")
    assert packaging.code_digest(tmp_path) != code

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 60), rng.random(60)
    ev = evaluate(y, p, y, p, ("NORMAL", "PNEUMONIA"), EvaluateParams(bootstrap=0))
    params = load_params(REPO / "params.yaml", [])
    base = serving_digest(ev, params)
    monkeypatch.setattr(packaging, "code_digest", lambda: "another")
    changed_code = serving_digest(ev, params)
    monkeypatch.setattr(packaging, "pyfunc_requirements", lambda: ["keras==0.0.1"])
    assert len({base, changed_code, serving_digest(ev, params)}) == 3


def test_logging_the_pyfunc_keeps_the_training_runs_status_and_end_time(
    store: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import mlflow

    from pipeline.registry import packaging

    _, client = store
    with mlflow.start_run() as run:
        pass
    ended = client.get_run(run.info.run_id).info
    assert ended.status == "FINISHED"

    def fail(**_: Any) -> Any:
        raise ConnectionError("Connection reset by peer")

    (tmp_path / "serving.json").write_text(json.dumps({"class_names": ["NORMAL", "PNEUMONIA"]}))
    monkeypatch.setattr(mlflow.pyfunc, "log_model", fail)
    with pytest.raises(ConnectionError):
        packaging.log_pyfunc(tmp_path, run.info.run_id, ended)
    after = client.get_run(run.info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", ended.end_time)  # not FAILED, not re-ended
    # An attempt whose own restore failed left the run RUNNING: the retry restores what it was before the first
    client.update_run(run.info.run_id, status="RUNNING")
    logged: dict[str, Any] = {}
    monkeypatch.setattr(
        mlflow.pyfunc, "log_model", lambda **kw: logged.update(kw) or types.SimpleNamespace(model_uri="models:/m-1")
    )
    assert packaging.log_pyfunc(tmp_path, run.info.run_id, ended) == "models:/m-1"
    after = client.get_run(run.info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", ended.end_time)
    assert [c.name for c in logged["signature"].outputs.inputs][-1] == "error"  # two classes: no p_ columns


def test_a_rerun_under_manual_promotion_finishes_a_first_version_as_champion(
    store: tuple[str, Any], tmp_path: Path
) -> None:
    """Under manual promotion the first version becomes champion (nothing to compare with); a re-run after its
    alias never landed must still set it, or the model would have no champion at all."""
    _, client = store
    first = log_candidate(0.90, 0.95)
    assert champion.register(client, first, policy(tmp_path), never).outcome == "champion"
    client.delete_registered_model_alias("pneumo-test", "champion")  # as if the alias never landed
    again = champion.register(client, first, policy(tmp_path), never, log=lambda _: None)
    assert again.resumed and not again.warnings
    assert aliases(client) == {"champion": "1"}


def test_a_rerun_under_manual_promotion_does_not_apply_a_recorded_champion_outcome(
    store: tuple[str, Any], tmp_path: Path
) -> None:
    _, client = store
    champion.register(client, log_candidate(0.90, 0.95), policy(tmp_path), never)
    won = log_candidate(0.95, 0.95)
    assert champion.register(client, won, policy(tmp_path, promotion="auto"), never).outcome == "champion"  # v2
    client.set_registered_model_alias("pneumo-test", "champion", "1")  # as if v2's alias never landed
    client.set_registered_model_tag("pneumo-test", champion.PIPELINE_CHAMPION_TAG, "1")
    again = champion.register(client, won, policy(tmp_path, promotion="manual"), never, log=lambda _: None)
    assert again.resumed and again.warnings[0].startswith("promotion: manual never sets @champion itself")
    assert aliases(client) == {"champion": "1"}


def test_one_training_registered_under_two_names_keeps_two_cards(
    store: tuple[str, Any], tmp_path: Path, params_in: Callable[..., Any]
) -> None:
    """The same run is version 1 of two registered models (a renamed registry.model_name): each version's card
    is its own file, so the second registration does not overwrite the first one's card."""
    import mlflow
    import numpy as np

    from pipeline.core.config import EvaluateParams
    from pipeline.modeling.evaluation import evaluate
    from pipeline.registry import model_card
    from pipeline.serving.classifier import ModelInfo
    from pipeline.steps import register

    _, client = store
    candidate = log_candidate(0.90, 0.95)
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    p = np.clip(y * 0.6 + rng.random(40) * 0.4, 0, 1)
    ev = evaluate(y, np.stack([1 - p, p], 1), y, np.stack([1 - p, p], 1), ("NORMAL", "PNEUMONIA"), EvaluateParams())
    examples = tmp_path / "examples"
    examples.mkdir()
    for name in ("pneumo-first", "pneumo-second"):
        params = params_in(f"registry.model_name={name}", f"registry.lock_file={tmp_path / 'registry.lock'}")
        info = ModelInfo(ev.threshold, ("NORMAL", "PNEUMONIA"), 32, "binary", "compact_cnn", "last_conv", name=name)
        facts = model_card.CardFacts(info, ev, {"train": 1, **ev.n}, "local", "abc", "", "")
        finalize = register.card_writer(params, client, candidate, facts, examples)
        assert champion.register(client, candidate, params.registry, never, finalize=finalize).version == "1"
    for name in ("pneumo-first", "pneumo-second"):
        tag = client.get_model_version(name, "1").tags[model_card.CARD_TAG]
        assert f"{name} version 1" in mlflow.artifacts.load_text(tag)  # not overwritten by the other name's card
        assert tag == f"runs:/{candidate.run_id}/model_card/{name}/v1/model_card.md"
