"""Retries of tracking-server and registry I/O (tenacity): transient errors only, exponential backoff.

Only what may succeed on a later try is retried (the server unreachable, a 5xx, a timeout, a locked
database); bad input fails at once. The last failure becomes one TransientError line, which `pneumo`
turns into exit status 75 for the orchestrator to retry the whole stage. Every step retried this way
must be idempotent: see champion.register for how creating a version is made so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import requests
import tenacity
from mlflow.exceptions import MlflowException

from pipeline.core.config import RegisterParams
from pipeline.core.errors import TransientError

T = TypeVar("T")


def is_io_error(exc: BaseException) -> bool:
    """Errors worth retrying: the tracking server or the registry unreachable or failing, not bad input."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, MlflowException):
        text = str(exc)
        return any(s in text for s in ("Max retries", "Connection", "timed out", "database is locked", " 50"))
    return isinstance(exc, requests.exceptions.RequestException)


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
