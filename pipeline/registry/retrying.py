"""Retries of tracking-server and registry I/O (tenacity): transient errors only, exponential backoff.

Only what may succeed on a later try is retried (the server unreachable, a 5xx, a timeout, a locked
database); bad input fails at once. The last failure becomes one TransientError line, which `pneumo`
turns into exit status 75 for the orchestrator to retry the whole stage. Every step retried this way
must be idempotent: see champion.register for how creating a version is made so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import requests
import tenacity
from mlflow.exceptions import MlflowException, RestException

from pipeline.core.config import RegisterParams
from pipeline.core.errors import TransientError

T = TypeVar("T")


# MLflow error codes that may succeed on a later try (the server's database busy or gone, a rate limit); every
# other code, and any 4xx status, is the request's own fault and fails at once.
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"})
PERMANENT_5XX = frozenset({"NOT_IMPLEMENTED", "INVALID_STATE"})  # 5xx by MLflow's table, yet never fixed by waiting
# What the client raises, without a server's answer, when the server or the network fails (requests, urllib3).
UNREACHABLE = ("max retries", "connection", "timed out", "timeout", "database is locked", "remotedisconnected")
HTTP_STATUS = re.compile(r"error code (\d{3})\b")  # a non-JSON reply: "... failed with error code 502 != 200"


def is_io_error(exc: BaseException) -> bool:
    """Errors worth retrying: the tracking server or the registry unreachable or failing, not bad input."""
    if isinstance(exc, ConnectionError | TimeoutError | requests.exceptions.RequestException):
        return True
    if not isinstance(exc, MlflowException):
        return False
    code = str(exc.error_code)
    if code in TRANSIENT_CODES:
        return True
    if isinstance(exc, RestException):  # the server answered with a JSON error: its code says whose fault
        return exc.get_http_status_code() >= 500 and code not in PERMANENT_5XX
    if code != "INTERNAL_ERROR":  # raised here with a specific code (bad input, not found, a local store)
        return False
    # The client's generic wrapper (error code INTERNAL_ERROR whatever happened): only its text tells.
    text = str(exc)
    status = HTTP_STATUS.search(text)
    if status:
        return int(status.group(1)) >= 500
    return any(s in text.lower() for s in UNREACHABLE)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def with_retries(fn: Callable[[], T], what: str, params: RegisterParams, log: Callable[[str], None] = print) -> T:
    """fn() retried on I/O errors: params.retries more tries, waiting retry_backoff_seconds x 1, 2, 4, ..."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        n = state.attempt_number
        log(f"register: {what} failed ({type(exc).__name__}); retry {n}/{params.retries} in {delay:.1f} s")

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_io_error),
        stop=tenacity.stop_after_attempt(params.retries + 1),
        wait=tenacity.wait_exponential(multiplier=params.retry_backoff_seconds, min=0, max=300),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(fn)
    except Exception as exc:
        if not is_io_error(exc):
            raise
        n = params.retries + 1
        raise TransientError(f"register: {what} failed after {n} attempts: {first_line(exc)}") from None
