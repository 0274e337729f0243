"""`dvc push --run-cache` retried on transient failures only: the decision from DVC's own output, then real
pushes from a tiny DVC repository to a local folder and to an S3 endpoint that is not there."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from flows import dvc_runner
from flows.dvc_runner import push_failure_is_transient, push_outputs
from pipeline.core.errors import PipelineError, TransientError
from tests.test_flow_edges import WRITE_OUT, dvc_repo, sh

DVC = [sys.executable, "-m", "dvc"]

TRANSFER = "ERROR: failed to transfer '/p/.dvc/cache/runs/2b/2b34/35b9' - "
TRANSIENT = [  # what DVC 3 printed (S3 lines as botocore words them)
    TRANSFER + 'Could not connect to the endpoint URL: "http://127.0.0.1:9/bucket/x/runs/2b"\n'
    'ERROR: unexpected error - Could not connect to the endpoint URL: "http://127.0.0.1:9/bucket/x/files/md5/4a"',
    "ERROR: unexpected error - An error occurred (503) when calling the PutObject operation (reached max retries:"
    " 4): Slow Down",
    "ERROR: unexpected error - An error occurred (InternalError) when calling the PutObject operation: We"
    " encountered an internal error. Please try again.",
    'ERROR: unexpected error - Read timeout on endpoint URL: "https://s3.amazonaws.com/b/files/md5/4a"',
    "ERROR: unexpected error - [Errno 104] Connection reset by peer",
    "ERROR: unexpected error - Cannot connect to host 127.0.0.1:9000 ssl:default [Connect call failed ('127.0.0.1',"
    " 9000)]",
    "ERROR: unexpected error - An error occurred (429) when calling the PutObject operation: Too Many Requests",
]
PERMANENT = [
    TRANSFER + "Unable to locate credentials\nERROR: unexpected error - Unable to locate credentials",
    "ERROR: unexpected error - An error occurred (AccessDenied) when calling the PutObject operation: Access Denied",
    "ERROR: unexpected error - An error occurred (NoSuchBucket) when calling the PutObject operation",
    TRANSFER + "[Errno 20] Not a directory: '/srv/afile/remote'",
    "ERROR: failed to transfer '/srv/timeout/connection/x' - [Errno 28] No space left on device",
    "ERROR: failed to transfer '/srv/connection-tests/x' - something DVC never said before",  # unknown: fail fast
    "ERROR: unexpected error - 3 files failed to upload",
    "ERROR: unexpected error - An error occurred (501) when calling the PutObject operation: Not Implemented",
]


@pytest.mark.parametrize("output", TRANSIENT)
def test_a_remote_unreachable_or_failing_is_transient(output: str) -> None:
    assert push_failure_is_transient(f"Collecting\n{output}\n\nHaving any troubles? Hit us up\n")


@pytest.mark.parametrize("output", PERMANENT)
def test_credentials_a_bad_remote_or_an_unknown_error_are_permanent(output: str) -> None:
    assert not push_failure_is_transient(output)


def pushes(monkeypatch: pytest.MonkeyPatch, fail_first: int = 0) -> list[int]:
    """Count the `dvc push` calls (the real DVC runs), the first `fail_first` of them answered as a connection
    error without running DVC."""
    real, calls = dvc_runner.dvc, []

    def dvc(*args: str, **kwargs: Any) -> tuple[int, str]:
        if args[0] == "push":
            calls.append(1)
            if len(calls) <= fail_first:
                return 1, TRANSIENT[0]
        return real(*args, **kwargs)

    monkeypatch.setattr(dvc_runner, "dvc", dvc)
    return calls


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = dvc_repo(tmp_path / "repo", WRITE_OUT)
    sh(repo, *DVC, "repro", "-q")
    return repo


def test_transient_failures_are_retried_with_backoff_then_pushed(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = tmp_path / "remote"
    sh(repo, *DVC, "remote", "add", "-d", "team", str(remote))
    calls, waits, said = pushes(monkeypatch, fail_first=2), [], []
    push_outputs(repo, echo=said.append, sleep=waits.append)
    assert len(calls) == 3 and waits == [5.0, 10.0]  # exponential backoff, no real wait
    assert any((remote / "files").rglob("*")) and any((remote / "runs").rglob("*")), "outputs and run-cache"
    notes = [line for line in said if "retry" in line]
    assert notes[0].startswith("dvc push --run-cache: unexpected error - Could not connect to the endpoint")
    assert notes[0].endswith("; retry 1/3 in 5 s") and notes[1].endswith("; retry 2/3 in 10 s")


def test_a_permanent_failure_is_not_retried_and_names_the_remote(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remote's folder cannot be made (its parent is a file): one attempt, one line naming the remote; once
    the path is free the same push succeeds."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    sh(repo, *DVC, "remote", "add", "-d", "team", str(blocker / "remote"))
    calls, waits = pushes(monkeypatch), []
    with pytest.raises(PipelineError) as failed:
        push_outputs(repo, sleep=waits.append)
    message = str(failed.value)
    assert not isinstance(failed.value, TransientError) and len(calls) == 1 and waits == []
    assert message.startswith(f"dvc push --run-cache to remote 'team' ({blocker / 'remote'}): ") and "\n" not in message
    assert "Not a directory" in message
    blocker.unlink()
    push_outputs(repo, sleep=waits.append)
    assert len(calls) == 2 and any((blocker / "remote" / "files").rglob("*"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_remote(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default remote an S3 bucket at an endpoint nobody listens on; AWS settings of this machine out of reach."""
    sh(repo, *DVC, "remote", "add", "-d", "team", "s3://bucket/x")
    sh(repo, *DVC, "remote", "modify", "team", "endpointurl", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HOME", str(tmp_path))
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: one connection try per push
    return repo


@pytest.mark.slow
def test_an_unreachable_s3_remote_is_retried_a_bounded_number_of_times(
    s3_remote: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setattr(dvc_runner, "PUSH_ATTEMPTS", 2)  # each real attempt takes about 2 s
    calls, waits = pushes(monkeypatch), []
    with pytest.raises(TransientError) as failed:
        push_outputs(s3_remote, sleep=waits.append)
    assert len(calls) == 2 and waits == [5.0]
    assert str(failed.value).startswith("dvc push --run-cache to remote 'team' (s3://bucket/x): failed 2 times: ")
    assert "Could not connect to the endpoint URL" in str(failed.value) and "\n" not in str(failed.value)


def test_missing_s3_credentials_are_not_retried(s3_remote: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls, waits = pushes(monkeypatch), []
    with pytest.raises(
        PipelineError,
        match=r"^dvc push --run-cache to remote 'team' \(s3://bucket/x\): .*Unable to locate credentials$",
    ) as failed:
        push_outputs(s3_remote, sleep=waits.append)
    assert not isinstance(failed.value, TransientError) and len(calls) == 1 and waits == []


def test_the_remote_url_in_messages_carries_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"team": "https://alice:s3cret@dav.example.org/dvc", "plain": "s3://bucket/x", "none": ""}
    monkeypatch.setattr(dvc_runner, "dvc", lambda *args, **kwargs: (0, answers[args[1].split(".")[1]] + "\n"))
    assert dvc_runner.remote_url("team") == "https://dav.example.org/dvc"
    assert dvc_runner.remote_url("plain") == "s3://bucket/x" and dvc_runner.remote_url("none") == "?"
