"""``pneumo remote``: the team's DVC remote on S3 (AWS, or an S3-compatible store such as MinIO, SeaweedFS or
Ceph) in one command. It runs the ``dvc remote add`` / ``dvc remote modify`` calls a person would type and
prints them; credentials never go into ``.dvc/config`` (DVC reads the AWS_* variables, ``~/.aws`` or a
``--local`` config).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from urllib.parse import urlsplit

from pipeline.core.errors import PipelineError

# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, a letter or digit at each end.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def check_url(url: str) -> str:
    """`url` if it is s3://BUCKET[/PATH], else a one-line PipelineError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        hint = " (pneumo remote sets up S3 and S3-compatible stores; use `dvc remote add` for others)"
        raise PipelineError(f"remote URL must look like s3://BUCKET/PATH, got {url!r}" + (hint if parts.scheme else ""))
    if not _BUCKET.match(parts.netloc):
        raise PipelineError(f"not a valid S3 bucket name in {url!r}: 3-63 characters, a-z 0-9 . -")
    if parts.query or parts.fragment:
        raise PipelineError(f"remote URL takes no query or fragment: {url!r}")
    return url.rstrip("/")


def check_endpoint(endpoint: str) -> str:
    """An http(s)://HOST[:PORT] endpoint without credentials in it."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PipelineError(f"endpoint URL must look like http(s)://HOST[:PORT], got {endpoint!r}")
    if parts.username or parts.password:
        raise PipelineError("the endpoint URL must not hold credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise PipelineError(f"bad port in endpoint URL {endpoint!r}") from exc
    return endpoint.rstrip("/")


def dvc_commands(args: argparse.Namespace) -> list[list[str]]:
    """The `dvc ...` argument lists for `pneumo remote` (validated first; nothing runs here)."""
    url = check_url(args.url)
    if not _NAME.match(args.name):
        raise PipelineError(f"remote name must be letters, digits, '-' or '_', got {args.name!r}")
    scope = ["--local"] if args.local else []
    # --force: running it again replaces the remote (and drops options it no longer names).
    commands = [["remote", "add", *scope, "--force", *(["--default"] if args.default else []), args.name, url]]
    options = {
        "endpointurl": check_endpoint(args.endpoint_url) if args.endpoint_url else None,
        "region": args.region,
        "profile": args.profile,
    }
    for option, value in options.items():
        if value:
            commands.append(["remote", "modify", *scope, args.name, option, value])
    return commands


def dvc_error(proc: subprocess.CompletedProcess[str]) -> str:
    """DVC's reason for a failed command: its last ``ERROR:`` line (stdout may end with a notice such as "Setting
    'team' as a default remote."), else the last line of its output."""
    lines = [line for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR: ")]
    if errors:
        return errors[-1].removeprefix("ERROR: ")
    return lines[-1] if lines else f"exit status {proc.returncode}"


def run(args: argparse.Namespace) -> int:
    commands = dvc_commands(args)
    for command in commands:
        print("dvc", shlex.join(command))
        proc = subprocess.run([sys.executable, "-m", "dvc", *command], capture_output=True, text=True)
        if proc.returncode != 0:
            raise PipelineError(f"dvc {command[0]} {command[1]} failed: {dvc_error(proc)}")
    where = ".dvc/config.local (this machine only)" if args.local else ".dvc/config (commit it)"
    role = ", the default for dvc push/pull" if args.default else f"; use it with dvc push/pull -r {args.name}"
    print(f"remote {args.name!r}: {commands[0][-1]} in {where}{role}")
    if not args.profile and not all(os.environ.get(v) for v in CREDENTIAL_VARS):
        print(
            "credentials: none in the environment; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            f"or keep them out of git with: dvc remote modify --local {args.name} access_key_id ... "
            "(and secret_access_key)"
        )
    return 0
