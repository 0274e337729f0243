"""DVC as the flow sees it: what `dvc status` says must run, one stage at a time through `dvc repro`.

DVC owns caching and lineage (one cache, one dvc.lock for `dvc repro`, a deployment run and a
test alike); the flow only decides where and when. A stage's failure comes back as the error the
stage itself printed (``error: ...``), typed by `pneumo`'s exit status: 1 failed validation,
75 transient I/O (worth a retry), anything else a pipeline error. `dvc push` exits 1 whatever failed, so
its failures are typed by DVC's own `ERROR:` lines instead (push_failure_is_transient).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import tenacity
import yaml

from pipeline.core.errors import (
    EXIT_TRANSIENT,
    EXIT_VALIDATION,
    ConfigError,
    DataError,
    PipelineError,
    TransientError,
)

_EXITED = re.compile(r"exited with (-?\d+)")
_FAILED = "failed to reproduce"  # DVC's own last line when a stage's command fails

# `dvc push` failures, told apart by DVC's `ERROR:` lines (lower case): what no wait fixes (credentials, a
# bucket or folder that is missing or not writable, no remote), checked first, and what may pass (the remote
# unreachable, slow or failing: connection, timeout, throttling, 5xx). An error matching neither is permanent:
# retrying it would only delay its message.
PUSH_PERMANENT = (
    "unable to locate credentials", "no credentials", "invalidaccesskeyid", "signaturedoesnotmatch",
    "accessdenied", "access denied", "forbidden", "(403)", "nosuchbucket", "no such bucket",
    "permission denied", "not a directory", "read-only file system", "no space left", "no default remote",
    "certificate verify failed", "(501)", "not implemented",
)  # fmt: skip
PUSH_TRANSIENT = (
    "could not connect", "connection", "timed out", "timeout", "temporarily unavailable", "temporary failure",
    "slowdown", "slow down", "throttl", "service unavailable", "bad gateway", "internalerror",
    "internal error", "reset by peer", "broken pipe", "(429)", "too many requests", "proxy",
    "cannot connect", "connect call failed",
)  # fmt: skip
_HTTP_5XX = re.compile(r"\(5\d\d\)|\b5\d\d (?:server error|internal|bad gateway|service unavailable|gateway)")
# DVC's own file names ("failed to transfer '<path>'"): not a cause. Other quoted text may be (aiohttp's
# "Connect call failed ('127.0.0.1', 9000)"), so only these are dropped.
_QUOTED = re.compile(r"(?<=failed to transfer )'[^']*'|(?<=failed to upload )'[^']*'")
# Not in params.yaml (DVC's stage parameters, and push is not a stage): constants, as IO_STAGES' task retries.
PUSH_ATTEMPTS = 4  # the first push and 3 retries
PUSH_BACKOFF_SECONDS = 5.0  # waits 5, 10, 20 s between them (exponential, at most PUSH_MAX_WAIT_SECONDS)
PUSH_MAX_WAIT_SECONDS = 60.0


@dataclass
class StageRun:
    name: str
    ran: bool
    seconds: float
    output: str = ""
    outs: dict[str, str] = field(default_factory=dict)  # path -> md5 in dvc.lock after the stage

    @property
    def status(self) -> str:
        return "ran" if self.ran else "cached"


def _env() -> dict[str, str]:
    """The venv's `pneumo` first on PATH, whatever started the worker."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _stream(
    command: list[str], cwd: str | Path, env: dict[str, str], echo: Callable[[str], None] | None
) -> tuple[int, str]:
    """Run `command`, stderr into stdout; stream its lines to `echo`; (exit status, output)."""
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if echo and line.strip():
            echo(line.rstrip())
    return proc.wait(), "".join(lines)


def _raise_typed(status: int | None, message: str, where: str) -> NoReturn:
    """`pneumo`'s exit status as an error type: validation, transient I/O (retried), or a pipeline error
    (its message prefixed by `where`)."""
    if status == EXIT_VALIDATION:
        raise DataError(message)
    if status == EXIT_TRANSIENT:
        raise TransientError(message)
    raise PipelineError(f"{where}: {message}")


def dvc(*args: str, cwd: str | Path = ".", echo: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run `dvc ARGS` with this interpreter; stream its lines to `echo`; (exit status, output)."""
    return _stream([sys.executable, "-m", "dvc", *args], cwd, _env(), echo)


def changed_stages(cwd: str | Path = ".") -> set[str]:
    """The stages `dvc status` reports as changed (their own deps, params, outs or definition); a stage
    marked ``always_changed`` that changed nothing else is not one of them."""
    code, out = dvc("status", "--json", cwd=cwd)
    if code != 0:
        raise PipelineError(f"dvc status failed: {last_error(out)}")
    start = out.find("{")
    status = json.loads(out[start:]) if start >= 0 else {}
    return {name for name, why in status.items() if why != ["always changed"]}


def lock_outs(stage: str, cwd: str | Path = ".") -> dict[str, str]:
    path = Path(cwd) / "dvc.lock"
    if not path.is_file():
        return {}
    entry = (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(stage, {})
    return {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}


def last_error(output: str) -> str:
    """The last `error:` line of a command's output (pneumo's and DVC's one-line errors), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for prefix in ("error: ", "ERROR: "):
        found = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
        if found:
            return found[-1]
    return lines[-1] if lines else "no output"


def exit_status(output: str) -> int | None:
    """The stage command's exit status as DVC reports it: from its `failed to reproduce` line, else the last
    "exited with N" (a stage may print such words itself, earlier)."""
    lines = [line for line in output.splitlines() if _FAILED in line] or [output]
    found = _EXITED.findall(lines[-1]) or _EXITED.findall(output)
    return int(found[-1]) if found else None


def repro_stage(name: str, cwd: str | Path = ".", echo: Callable[[str], None] | None = None) -> StageRun:
    """`dvc repro --single-item NAME`: DVC runs the stage or says it is unchanged, and updates dvc.lock."""
    start = time.perf_counter()
    code, out = dvc("repro", "--single-item", name, cwd=cwd, echo=echo)
    seconds = time.perf_counter() - start
    if code != 0:
        _raise_typed(exit_status(out), last_error(out), f"stage {name}")
    return StageRun(name, f"Running stage '{name}'" in out, seconds, out, lock_outs(name, cwd))


def require_remote(cwd: str | Path = ".") -> str:
    """The name of the project's default DVC remote; a ConfigError naming .dvc/config when there is none, or when
    it is a folder inside the project (the committed ``local`` remote): a team deployment's clone, and what was
    pushed into it, is gone after the run, and the next run would pull nothing."""
    project = Path(cwd).resolve()
    config = project / ".dvc" / "config"
    code, out = dvc("remote", "default", cwd=cwd)
    if code != 0 or not out.strip():
        raise ConfigError(f"dvc push: {config}: no default remote (`pneumo remote URL --default` sets one)")
    name = out.strip()
    code, url = dvc("config", f"remote.{name}.url", cwd=cwd)
    url = url.strip().removeprefix("file://")
    if code == 0 and url and "://" not in url:  # a folder; a relative one is relative to .dvc/
        folder = (project / ".dvc" / Path(url).expanduser()).resolve()
        if folder.is_relative_to(project):
            raise ConfigError(
                f"dvc push: {config}: the default remote {name!r} is {folder}, inside this project folder, which "
                "a deployment's clone loses after the run; set a shared one (`pneumo remote URL --default`)"
            )
    return name


def push_failure_is_transient(output: str) -> bool:
    """Whether a failed `dvc push`'s output says a later try may succeed (see PUSH_TRANSIENT)."""
    errors = [line for line in output.splitlines() if line.lstrip().startswith("ERROR")] or [output]
    text = _QUOTED.sub("", "\n".join(errors)).lower()
    if any(marker in text for marker in PUSH_PERMANENT):
        return False
    return bool(_HTTP_5XX.search(text)) or any(marker in text for marker in PUSH_TRANSIENT)


def remote_url(name: str, cwd: str | Path = ".") -> str:
    """The URL of DVC remote `name` as configured (`dvc config remote.NAME.url`) without any user:password part,
    for messages; '?' when DVC does not say."""
    code, out = dvc("config", f"remote.{name}.url", cwd=cwd)
    url = out.strip() if code == 0 else ""
    return re.sub(r"(?<=://)[^/@]*@", "", url) or "?"


def push_outputs(
    cwd: str | Path = ".", echo: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep
) -> str:
    """`dvc push --run-cache`: the stage outputs and DVC's run history to the default remote, so a fresh
    clone's `dvc pull --run-cache` restores unchanged stages instead of running them again.

    Transient failures (push_failure_is_transient) are retried, PUSH_ATTEMPTS in all with exponential backoff
    (`sleep` waits). Pushing again is safe: the remote is content-addressed (files and run-cache entries are
    named by their hash), so a retry uploads only what is missing and never changes what is there. A failure
    is one line naming the remote: a TransientError once every attempt failed so, else a PipelineError at once.
    """
    remote = require_remote(cwd)

    def attempt() -> str:
        code, out = dvc("push", "--run-cache", cwd=cwd, echo=echo)
        if code == 0:
            return out
        raise (TransientError if push_failure_is_transient(out) else PipelineError)(last_error(out))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if echo:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            n = state.attempt_number
            echo(f"dvc push --run-cache: {exc}; retry {n}/{PUSH_ATTEMPTS - 1} in {delay:.0f} s")

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientError),
        stop=tenacity.stop_after_attempt(PUSH_ATTEMPTS),
        wait=tenacity.wait_exponential(multiplier=PUSH_BACKOFF_SECONDS, min=0, max=PUSH_MAX_WAIT_SECONDS),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except TransientError as exc:
        where = f"remote '{remote}' ({remote_url(remote, cwd)})"
        raise TransientError(f"dvc push --run-cache to {where}: failed {PUSH_ATTEMPTS} times: {exc}") from None
    except PipelineError as exc:
        raise PipelineError(f"dvc push --run-cache to remote '{remote}' ({remote_url(remote, cwd)}): {exc}") from None


def run_pneumo(
    args: list[str], cwd: str | Path, env: dict[str, str] | None = None, echo: Callable[[str], None] | None = None
) -> str:
    """`pneumo ARGS` in `cwd` (a stage command outside DVC, e.g. a sweep trial); its output, or its own
    error typed by exit status as for a DVC stage."""
    script = Path(sys.executable).parent / "pneumo"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline.steps.cli"]
    code, out = _stream([*command, *args], cwd, {**_env(), **(env or {})}, echo)
    if code != 0:
        _raise_typed(code, last_error(out), f"pneumo {' '.join(args)} in {cwd}")
    return out
