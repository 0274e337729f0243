"""Registration across machines, for real: one PostgreSQL (the MLflow backend and the advisory lock) and one
`mlflow server --serve-artifacts` on loopback, shared by registrations racing from separate OS processes;
the server killed by process id mid-registration and started again on the same port and database.
Candidates are tiny pyfunc models logged through the server (no training, no TensorFlow).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from pipeline.core.config import LOCK_URL_ENV, RegisterParams
from pipeline.core.errors import PipelineError, TransientError
from pipeline.registry import champion
from pipeline.registry.champion import COMPLETE, KEY_TAG, PENDING, STATE_TAG
from pipeline.registry.registry_lock import permanent_connect_error, registry_lock
from tests.conftest import REPO
from tests.servers import Postgres, Service, mlflow_server

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    """PostgreSQL and `mlflow server` on it; the server can be killed and started again on the same port."""

    root: Path
    backend: str  # postgresql://... : the MLflow database, also the lock's
    service: Service
    url: str
    experiment_id: str = ""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        """A crash: SIGKILL to the server's process group (by id), then wait until its port refuses."""
        os.killpg(self.service.proc.pid, signal.SIGKILL)
        self.service.proc.wait(10)
        self.service.stop()  # closes its log; nothing is left to signal
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(0.05)
            except OSError:
                return
        raise TimeoutError(f"port {self.port} still answers after the kill")

    def start(self) -> None:
        self.service, _ = mlflow_server(
            "mlflow", self.root, self.backend, str(self.root / "artifacts"), server_env(), self.port
        )


def server_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", LOCK_URL_ENV)}


@pytest.fixture(scope="module")
def stack(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry_races")
    backend = postgres.create_database("registry_races")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # register's retries are the ones under test
        env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        env.delenv(LOCK_URL_ENV, raising=False)
        service, url = mlflow_server("mlflow", root, backend, str(root / "artifacts"), server_env())
        stack = Stack(root, backend, service, url)
        try:
            stack.experiment_id = MlflowClient(url).create_experiment("races")
            yield stack
        finally:
            stack.service.stop()


@contextlib.contextmanager
def tracking_at(uri: str) -> Iterator[None]:
    """mlflow's global tracking URI (and the MLFLOW_TRACKING_URI it exports) for a while, then as it was."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old)  # type: ignore[arg-type]
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def log_candidate(stack: Stack, auc: float, sensitivity: float = 0.95) -> champion.Candidate:
    """A run with a tiny logged pyfunc model (models:/m-...) and test figures, as the register stage sees it."""
    import mlflow

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context: Any, model_input: list[str], params: Any = None) -> list[str]:
            return model_input

    with tracking_at(stack.url), mlflow.start_run(experiment_id=stack.experiment_id) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=["mlflow"])
    metrics = {k: 0.8 for k in champion.SCORE_KEYS} | {"roc_auc": auc, "sensitivity": sensitivity}
    tags = {f"test_{k}": str(v) for k, v in metrics.items()} | {"threshold": "0.5", "test_set": "T1"}
    return champion.Candidate(run.info.run_id, info.model_uri, champion.Scores(metrics, 0.5, "T1"), tags, f"auc {auc}")


def never(model_uri: str, threshold: float) -> dict[str, float]:
    raise AssertionError("all candidates share one test set")


def policy(stack: Stack, tmp: Path, name: str, **changes: Any) -> RegisterParams:
    base = {"model_name": name, "lock_url": stack.backend, "lock_file": str(tmp / "unused.lock")}
    return RegisterParams(**{**base, "retry_backoff_seconds": 0.1, **changes})


def versions_of(client: Any, name: str) -> dict[str, Any]:
    return {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}


def aliases(client: Any, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def assert_consistent(client: Any, name: str) -> dict[str, Any]:
    """Every alias is on a complete version; no run has two versions; the versions, by number."""
    versions = versions_of(client, name)
    for alias, version in aliases(client, name).items():
        assert versions[version].tags.get(STATE_TAG) == COMPLETE, f"@{alias} on half-registered v{version}"
    keys = [v.tags[KEY_TAG] for v in versions.values()]
    assert len(keys) == len(set(keys)), f"a run registered twice: {sorted(keys)}"
    return versions


class CuttingProxy:
    """A TCP proxy in front of the tracking server that can lose one response: once a request for which
    `cut(request bytes)` holds has reached the server and the server answers, the answer is dropped,
    `on_cut()` runs (say, kill the server), and the client's connection is closed. While the server is
    down, connections are accepted and closed at once."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut: Callable[[bytes], bool] | None = None
        self.on_cut: Callable[[], None] = lambda: None
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_once(self, cut: Callable[[bytes], bool], on_cut: Callable[[], None] = lambda: None) -> None:
        self.cut, self.on_cut = cut, on_cut

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        request, guard = bytearray(), threading.Lock()

        def upstream() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    with guard:
                        request.extend(data)
                    server.sendall(data)

        threading.Thread(target=upstream, daemon=True).start()
        try:
            while data := server.recv(65536):
                with guard:  # the first bytes of an answer: the request it answers is complete
                    sent, request[:] = bytes(request), b""
                if sent and self.cut is not None and self.cut(sent):
                    self.cut, self.cuts = None, self.cuts + 1
                    self.on_cut()
                    return  # the answer is lost; the client sees the connection drop
                client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, server):  # shutdown first: it wakes the thread blocked in recv
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture
def proxy(stack: Stack) -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(stack.port)
    yield cutting
    cutting.close()


# --- the lock --------------------------------------------------------------------------------------------


def test_advisory_lock_blocks_a_second_holder_and_times_out_naming_the_lock(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_password = stack.backend.replace("postgres@", "postgres:s3cret@")  # trust auth ignores it
    monkeypatch.setenv(LOCK_URL_ENV, with_password)  # the environment variable wins over params
    params = RegisterParams(model_name="locked", lock_file=str(tmp_path / "unused"), lock_timeout_seconds=0.5)
    logs: list[str] = []
    with registry_lock(params) as still_held:
        still_held()
        started = time.monotonic()
        with pytest.raises(TransientError) as err, registry_lock(params, logs.append):
            pass
        assert 0.4 < time.monotonic() - started < 5
        with registry_lock(params.model_copy(update={"model_name": "another"})):
            pass  # the key is per model: another model's registration does not wait
    shown = with_password.replace("s3cret", "***")
    assert str(err.value) == (
        f"register: timed out after 0.5 s waiting for the registration lock on {shown} "
        "(another registration of locked holds it)"
    )
    assert "s3cret" not in str(err.value) and "s3cret" not in "".join(logs)
    assert logs == [f"register: waiting for the registration lock on {shown} (another registration of locked holds it)"]
    with registry_lock(params):
        pass  # released on leaving the block


def test_advisory_lock_is_released_when_its_holder_dies(stack: Stack, tmp_path: Path) -> None:
    holder = (
        "import sys, time\n"
        "from pipeline.core.config import RegisterParams\n"
        "from pipeline.registry.registry_lock import registry_lock\n"
        f"params = RegisterParams(model_name='orphan', lock_url={stack.backend!r})\n"
        "with registry_lock(params):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    env = {**server_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", holder], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        params = RegisterParams(model_name="orphan", lock_url=stack.backend, lock_timeout_seconds=0.3)
        with pytest.raises(TransientError, match=r"timed out after 0\.3 s"), registry_lock(params, lambda _: None):
            pass
        os.kill(proc.pid, signal.SIGKILL)  # no unlock, no goodbye: PostgreSQL ends the session
        proc.wait(10)
        started = time.monotonic()
        with registry_lock(params.model_copy(update={"lock_timeout_seconds": 10.0})):
            released_after = time.monotonic() - started
        assert released_after < 5
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_lock_file_is_the_default_and_times_out_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_URL_ENV, raising=False)
    params = RegisterParams(model_name="x", lock_file=str(tmp_path / "lock"), lock_timeout_seconds=0.3)
    logs: list[str] = []
    with registry_lock(params), pytest.raises(TransientError) as err, registry_lock(params, logs.append):
        pass
    assert str(err.value) == f"register: timed out after 0.3 s waiting for the lock file {tmp_path}/lock"
    assert logs == [f"register: waiting for the lock file {tmp_path}/lock (another process holds it)"]


def test_unreachable_lock_database_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOCK_URL_ENV, "postgresql://pneumo:s3cret@127.0.0.1:9/mlflow")
    params = RegisterParams(model_name="x", lock_file=str(tmp_path / "unused"), retries=1, retry_backoff_seconds=0.01)
    with pytest.raises(TransientError) as err, registry_lock(params, lambda _: None):
        pass
    message = str(err.value)
    assert message.startswith(
        "register: connecting to the registration lock failed after 2 attempts: "
        "postgresql://pneumo:***@127.0.0.1:9/mlflow: connection to server at"
    )
    assert "s3cret" not in message and "\n" not in message


@pytest.fixture
def refusing_databases(postgres: Postgres) -> Iterator[dict[str, str]]:
    """Lock URLs the server answers and refuses, with the password s3cret: a wrong password (scram-sha-256 for
    one database), a pg_hba.conf reject (another), an unknown database and an unknown role. The pg_hba.conf
    lines name only this test's databases, so the session's trust auth stays as it was for every other test."""
    hba = postgres.dir / "data" / "pg_hba.conf"
    original = hba.read_text()
    conn = psycopg2.connect(postgres.url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for db in ("lock_pw", "lock_rejected"):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {db}")
            cur.execute("DROP ROLE IF EXISTS lock_user")
            cur.execute("CREATE ROLE lock_user LOGIN PASSWORD 'right-one'")
            hba.write_text(
                "host lock_pw all 127.0.0.1/32 scram-sha-256\nhost lock_rejected all 127.0.0.1/32 reject\n" + original
            )
            cur.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # the postmaster re-reads pg_hba.conf on SIGHUP
        base = f"127.0.0.1:{postgres.port}"
        yield {
            "wrong password": f"postgresql://lock_user:s3cret@{base}/lock_pw",
            "pg_hba.conf reject": f"postgresql://postgres:s3cret@{base}/lock_rejected",
            "no such database": f"postgresql://postgres:s3cret@{base}/no_such_db",
            "no such role": f"postgresql://nobody_here:s3cret@{base}/postgres",
        }
    finally:
        hba.write_text(original)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_reload_conf()")
        conn.close()


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("wrong password", 'password authentication failed for user "lock_user"'),
        ("pg_hba.conf reject", "pg_hba.conf rejects connection"),
        ("no such database", 'database "no_such_db" does not exist'),
        ("no such role", 'role "nobody_here" does not exist'),
    ],
)
def test_a_lock_url_the_server_refuses_fails_at_once_without_retries(
    refusing_databases: dict[str, str], case: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad credentials or a missing database are bad input: one PipelineError line at once (exit 2), not a
    TransientError after every retry (exit 75, for the orchestrator to retry a stage that cannot succeed)."""
    url = refusing_databases[case]
    monkeypatch.setenv(LOCK_URL_ENV, url)
    params = RegisterParams(model_name="x", lock_file=str(tmp_path / "unused"), retries=3, retry_backoff_seconds=2.0)
    logs: list[str] = []
    started = time.monotonic()
    with pytest.raises(PipelineError) as err, registry_lock(params, logs.append):
        pass
    assert time.monotonic() - started < 2.0 and logs == []  # no retry, no backoff
    assert not isinstance(err.value, TransientError)
    message, shown = str(err.value), url.replace(":s3cret@", ":***@")
    assert message.startswith(f"register: connecting to the registration lock on {shown} failed: ")
    assert says in message and "s3cret" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("message", "permanent"),
    [
        ('connection to server at "db", port 5432 failed: FATAL:  database "mlflow" does not exist', True),
        ('connection to server at "db", port 5432 failed: FATAL:  password authentication failed for user "p"', True),
        ('connection to server at "db" (10.0.0.5), port 5432 failed: FATAL:  no pg_hba.conf entry for host', True),
        ('invalid port number: "99999"', True),
        ('connection to server at "db", port 5432 failed: FATAL:  the database system is starting up', False),
        ('connection to server at "db", port 5432 failed: FATAL:  sorry, too many clients already', False),
        ('connection to server at "db", port 5432 failed: timeout expired', False),
        ('connection to server at "db", port 5432 failed: Connection refused', False),
        ('could not translate host name "postgres" to address: Name or service not known', False),
        ('could not translate host name "does not exist.invalid" to address: Temporary failure', False),
        ("server closed the connection unexpectedly", False),
    ],
)
def test_connect_failures_are_retried_only_while_the_server_may_yet_answer(message: str, permanent: bool) -> None:
    assert (permanent_connect_error(psycopg2.OperationalError(message + "\n")) is not None) is permanent


# --- idempotent registration -----------------------------------------------------------------------------


def test_lost_create_response_reuses_the_committed_version(stack: Stack, proxy: CuttingProxy, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    name, client = "lost-response", MlflowClient(stack.url)
    candidate = log_candidate(stack, 0.9)
    proxy.cut_once(lambda request: b"/model-versions/create" in request)  # committed, the answer lost
    logs: list[str] = []
    decision = champion.register(MlflowClient(proxy.url), candidate, policy(stack, tmp_path, name), never, logs.append)
    assert proxy.cuts == 1 and decision.outcome == "champion"
    assert any("creating the model version failed" in line for line in logs)
    assert f"register: version {decision.version} was created before the response was lost; reusing it" in logs
    versions = assert_consistent(client, name)
    assert list(versions) == [decision.version] and aliases(client, name) == {"champion": decision.version}
    # A re-run for the same run (a retried flow) adds nothing.
    again = champion.register(client, candidate, policy(stack, tmp_path, name), never, lambda _: None)
    assert again.resumed and (again.version, again.outcome) == (decision.version, "champion")
    assert list(versions_of(client, name)) == [decision.version]


class CommitThenDrop:
    """The real client, but the create's answer never arrives (the server committed it)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def create_model_version(self, *args: Any, **kwargs: Any) -> Any:
        self.client.create_model_version(*args, **kwargs)
        raise ConnectionError("Connection aborted: RemoteDisconnected")


def test_half_registered_version_left_behind_is_replaced_by_the_rerun(stack: Stack, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    name, client = "left-behind", MlflowClient(stack.url)
    champion.register(client, log_candidate(stack, 0.9), policy(stack, tmp_path, name), never, lambda _: None)
    candidate = log_candidate(stack, 0.95)
    params = policy(stack, tmp_path, name, retries=0, promotion="auto")
    with pytest.raises(TransientError, match="creating the model version failed after 1 attempts"):
        champion.register(CommitThenDrop(client), candidate, params, never, lambda _: None)
    left = versions_of(client, name)["2"]
    assert left.tags[STATE_TAG] == PENDING and left.tags[KEY_TAG] == candidate.key
    assert aliases(client, name) == {"champion": "1"}  # nothing aliased on a pending version
    logs: list[str] = []
    decision = champion.register(client, candidate, params, never, logs.append)
    assert f"register: version 2 of run {candidate.run_id} was left half-registered; deleting it" in logs
    assert (decision.version, decision.outcome, decision.previous_champion) == ("3", "champion", "1")
    assert sorted(assert_consistent(client, name)) == ["1", "3"] and aliases(client, name) == {"champion": "3"}


# --- races between machines ------------------------------------------------------------------------------


def race(stack: Stack, tmp: Path, name: str, candidates: list[champion.Candidate], shared_lock: bool) -> list[Any]:
    """Two registrations from two OS processes sharing only the servers; their reports, first entrant first.
    shared_lock: the advisory lock in PostgreSQL; else each has its own lock file (two machines)."""
    folder = tmp / "barrier"
    folder.mkdir()
    procs = []
    for me, rival, candidate in (("a", "b", candidates[0]), ("b", "a", candidates[1])):
        params = {"model_name": name, "lock_file": str(tmp / f"machine-{me}" / "registry.lock")}
        spec = {
            "folder": str(folder),
            "me": me,
            "rival": rival,
            "hold": 4.0 if shared_lock else 60.0,
            "tracking_uri": stack.url,
            "params": {**params, "retry_backoff_seconds": 0.2, "lock_timeout_seconds": 120},
            "candidate": {
                "run_id": candidate.run_id,
                "model_uri": candidate.model_uri,
                "metrics": candidate.scores.metrics,
                "threshold": candidate.scores.threshold,
                "test_set": candidate.scores.test_set,
                "tags": candidate.tags,
                "description": candidate.description,
            },
        }
        env = {**server_env(), "PYTHONPATH": str(REPO)}
        if shared_lock:
            env[LOCK_URL_ENV] = stack.backend
        cmd = [sys.executable, "-m", "tests.registry_racer", json.dumps(spec)]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(reports, key=lambda r: r["entered"])


def test_two_machines_racing_leave_one_champion(stack: Stack, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    name, client = "race-locked", MlflowClient(stack.url)
    first, second = race(stack, tmp_path, name, [log_candidate(stack, 0.90), log_candidate(stack, 0.91)], True)
    # Serialised: the first waited inside the critical section and the rival never got there meanwhile;
    # the rival waited for the lock, and their registry work did not overlap.
    assert not first["rival_seen"]
    assert any(line.startswith("register: waiting for the registration lock on") for line in second["logs"])
    assert first["last"] < second["first"]
    versions = assert_consistent(client, name)
    assert sorted(versions) == ["1", "2"] and aliases(client, name)["champion"] == first["version"]
    assert first["outcome"] == "champion" and versions[first["version"]].tags["decision_reason"] == "no champion yet"
    loser = versions[second["version"]].tags
    assert loser["decision"] == second["outcome"] in ("challenger", "rejected")
    assert f"champion v{first['version']}" in loser["decision_reason"]


# --- the tracking server dies mid-registration -----------------------------------------------------------


def test_server_dies_after_the_create_and_the_retries_ride_it_out(
    stack: Stack, proxy: CuttingProxy, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    name, client = "server-dies", MlflowClient(stack.url)
    champion.register(client, log_candidate(stack, 0.90), policy(stack, tmp_path, name), never, lambda _: None)
    candidate = log_candidate(stack, 0.95)
    restarted: list[threading.Thread] = []

    def kill_and_restart() -> None:
        stack.kill()  # the version is committed; the answer and the server are gone
        restarted.append(threading.Thread(target=stack.start))
        restarted[0].start()

    proxy.cut_once(lambda request: b"/model-versions/create" in request, kill_and_restart)
    params = policy(stack, tmp_path, name, promotion="auto", retries=8, retry_backoff_seconds=0.25)
    logs: list[str] = []
    started = time.monotonic()
    decision = champion.register(MlflowClient(proxy.url), candidate, params, never, logs.append)
    restarted[0].join()
    assert proxy.cuts == 1 and time.monotonic() - started > 2  # it did wait for the restart
    assert sum("retry" in line for line in logs) >= 2, logs
    assert (decision.outcome, decision.previous_champion) == ("champion", "1")
    assert f"register: version {decision.version} was created before the response was lost; reusing it" in logs
    versions = assert_consistent(client, name)
    assert sorted(versions) == ["1", "2"] and aliases(client, name) == {"champion": "2"}
    assert client.get_registered_model(name).tags[champion.PIPELINE_CHAMPION_TAG] == "2"


def test_server_dies_before_the_alias_and_the_rerun_finishes_the_version(
    stack: Stack, proxy: CuttingProxy, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    name, client = "server-stays-down", MlflowClient(stack.url)
    champion.register(client, log_candidate(stack, 0.90), policy(stack, tmp_path, name), never, lambda _: None)
    candidate = log_candidate(stack, 0.95)
    completing = lambda r: b"/model-versions/set-tag" in r and b'"complete"' in r  # noqa: E731
    proxy.cut_once(completing, stack.kill)  # marked complete, then the server dies before any alias
    params = policy(stack, tmp_path, name, promotion="auto", retries=1)
    with pytest.raises(TransientError, match=r"^register: marking the version complete failed after 2 attempts"):
        champion.register(MlflowClient(proxy.url), candidate, params, never, lambda _: None)
    stack.start()  # same port, same database; the rollback could not reach it
    left = versions_of(client, name)["2"]
    assert left.tags[STATE_TAG] == COMPLETE and aliases(client, name) == {"champion": "1"}
    logs: list[str] = []
    decision = champion.register(client, candidate, params, never, logs.append)  # the flow's retry
    assert decision.resumed and (decision.version, decision.outcome) == ("2", "champion")
    assert f"register: run {candidate.run_id} is already version 2 (champion); finishing it" in logs
    assert aliases(client, name) == {"champion": "2"} and sorted(assert_consistent(client, name)) == ["1", "2"]
    assert champion.register(client, candidate, params, never, lambda _: None).version == "2"  # and again: no v3
    assert sorted(versions_of(client, name)) == ["1", "2"]
