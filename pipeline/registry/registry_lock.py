"""The registration lock: one registration of a model at a time, from one machine or from many.

Without ``registry.lock_url`` (the embedded default) a lock file (``registry.lock_file``) serialises
registrations on this machine. With a PostgreSQL URL (``registry.lock_url`` or
``$PNEUMO_REGISTRY_LOCK_URL``) it is a session-level advisory lock on a key derived from the model
name, so every machine that reaches that database takes turns. The lock belongs to the connection:
if the holder dies, PostgreSQL ends its session and the lock is free (TCP keepalives bound how long a
vanished machine keeps it). Waiting longer than ``registry.lock_timeout_seconds`` fails with one
TransientError line naming the lock (never its password). Connecting is retried only while the server may
yet answer (unreachable, a timeout, starting up, too many clients); a server that refuses the URL itself (a
wrong password, an unknown role or database, a pg_hba.conf rejection, a malformed URL) fails at once with one
PipelineError line, which no retry of the stage would fix.

The library does not import Prefect (an import-linter contract), hence a database lock rather than a
Prefect concurrency limit: it needs nothing but a database the team already runs for MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.errors

from pipeline.core.config import LOCK_URL_ENV, RegisterParams
from pipeline.core.errors import PipelineError, TransientError
from pipeline.core.locks import file_lock
from pipeline.core.project import project_path
from pipeline.registry.retrying import first_line, with_retries

Check = Callable[[], None]  # raises TransientError if the lock is no longer held


def lock_key(model_name: str) -> int:
    """The advisory lock key of a model: a signed 64-bit number from its name."""
    digest = hashlib.sha256(f"pneumo.registry:{model_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def redact(url: str) -> str:
    """`url` with its password (in the user part or the query) replaced by ***, for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = re.sub(r"(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def without_password(url: str) -> str:
    """`url` with no password at all (``postgresql://ann:pw@db/mlflow`` -> ``postgresql://ann@db/mlflow``, a
    ``password=`` query parameter dropped), for what is written down: the password then comes from the
    environment of whoever uses it (MLFLOW_TRACKING_PASSWORD, PGPASSWORD)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{parts.username}@{host}" if parts.username else host
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("password="))
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # as given: urlunsplit would rewrite sqlite:////abs/path
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@contextlib.contextmanager
def registry_lock(
    params: RegisterParams, log: Callable[[str], None] = print, what: str = "register"
) -> Iterator[Check]:
    """Hold the registration lock of `params.model_name` (`what`: who wants it, in messages); yields a check
    to call before moving aliases."""
    url = params.effective_lock_url()
    if url is None:
        with file_lock(project_path(params.lock_file), params.lock_timeout_seconds, what, log):
            yield lambda: None
    else:
        with advisory_lock(url, params, log, what) as check:
            yield check


# Connect failures that no retry fixes: the server answered and refused the URL, or libpq refused it. Checked
# on the message with its quoted names ("db", "user", "host.invalid") taken out; psycopg2 has no SQLSTATE for
# a failed connect, so a pgcode is checked too where one comes (class 28 authorization, 3D000 no database,
# 42501 no CONNECT privilege). Everything else (could not connect / translate host name, timeout expired,
# 57P03 the database system is starting up, 53300 too many clients, 08* connection failures) is retried.
PERMANENT_CONNECT = re.compile(
    r"authentication failed|does not exist|no pg_hba\.conf entry|pg_hba\.conf rejects|no password supplied"
    r"|permission denied|invalid dsn|invalid port|invalid [\w ]*(value|option)|missing \S+ after",
    re.IGNORECASE,
)


def permanent_connect_error(exc: psycopg2.Error) -> str | None:
    """The line of a failed connect that says no retry will help (see PERMANENT_CONNECT), else None."""
    code = getattr(exc, "pgcode", None) or ""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if PERMANENT_CONNECT.search(re.sub(r'"[^"]*"', '""', line)):
            return line[:200]
    if code[:2] in ("28", "3D") or code == "42501":
        return lines[0][:200] if lines else code
    return None


# Server-side keepalives: a holder whose machine vanishes (no FIN) loses the lock after about a minute.
KEEPALIVES = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"


@contextlib.contextmanager
def advisory_lock(
    url: str, params: RegisterParams, log: Callable[[str], None] = print, what: str = "register"
) -> Iterator[Check]:
    shown, name, timeout = redact(url), params.model_name, params.lock_timeout_seconds
    dsn = re.sub(r"^postgres(ql)?\+\w+://", "postgresql://", url)  # an SQLAlchemy URL (MLflow's) will do

    password = re.search(r"://[^:/@]*:([^@]*)@", url)

    def scrub(text: str) -> str:  # libpq quotes a malformed URL whole in its message
        return text.replace(password.group(1), "***") if password and password.group(1) else text

    def connect() -> Any:
        try:
            return psycopg2.connect(dsn, connect_timeout=10, application_name="pneumo-register", options=KEEPALIVES)
        except psycopg2.Error as exc:
            permanent = permanent_connect_error(exc)
            if permanent is not None:  # not retried: the same URL gets the same answer
                raise PipelineError(
                    f"{what}: connecting to the registration lock on {shown} failed: {scrub(permanent)} "
                    f"(check registry.lock_url or ${LOCK_URL_ENV})"
                ) from None
            if not isinstance(exc, psycopg2.OperationalError):
                raise PipelineError(f"{what}: registration lock {shown}: {scrub(first_line(exc))}") from None
            raise ConnectionError(f"{shown}: {scrub(first_line(exc))}") from None  # retried as an I/O error

    conn = with_retries(connect, "connecting to the registration lock", params, log)
    conn.autocommit = True
    key = lock_key(name)
    held = f"the registration lock on {shown} (another registration of {name} holds it)"
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            if not cur.fetchone()[0]:
                log(f"{what}: waiting for {held}")
                cur.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(timeout * 1000)}ms",))
                cur.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg2.errors.LockNotAvailable:
        conn.close()
        raise TransientError(f"{what}: timed out after {timeout:g} s waiting for {held}") from None
    except psycopg2.Error as exc:
        conn.close()
        raise TransientError(f"{what}: taking the registration lock on {shown} failed: {first_line(exc)}") from None

    def check() -> None:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        except psycopg2.Error as exc:
            raise TransientError(f"{what}: lost the registration lock on {shown}: {first_line(exc)}") from None

    try:
        yield check
    finally:
        with contextlib.suppress(psycopg2.Error), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
        conn.close()  # ending the session releases the lock in any case
