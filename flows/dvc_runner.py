"""DVC as the flow sees it: what `dvc status` says must run, one stage at a time through `dvc repro`.

DVC owns caching and lineage (one cache, one dvc.lock for `dvc repro`, a deployment run and a
test alike); the flow only decides where and when. A stage's failure comes back as the error the
stage itself printed (``error: ...``), typed by `pneumo`'s exit status: 1 failed validation,
75 transient I/O (worth a retry), anything else a pipeline error.
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
    """The name of the project's default DVC remote; a ConfigError naming .dvc/config when there is none."""
    code, out = dvc("remote", "default", cwd=cwd)
    if code != 0 or not out.strip():
        config = Path(cwd).resolve() / ".dvc" / "config"
        raise ConfigError(f"dvc push: {config}: no default remote (`pneumo remote URL --default` sets one)")
    return out.strip()


def push_outputs(cwd: str | Path = ".", echo: Callable[[str], None] | None = None) -> str:
    """`dvc push --run-cache`: the stage outputs and DVC's run history to the default remote, so a fresh
    clone's `dvc pull --run-cache` restores unchanged stages instead of running them again."""
    require_remote(cwd)
    code, out = dvc("push", "--run-cache", cwd=cwd, echo=echo)
    if code != 0:
        raise PipelineError(f"dvc push --run-cache: {last_error(out)}")
    return out


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
