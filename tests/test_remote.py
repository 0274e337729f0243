"""`pneumo remote`: its arguments and the dvc calls they become, then for real against SeaweedFS's S3 gateway:
the remote in .dvc/config without credentials, `dvc push` into the bucket, `dvc pull` back."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from pipeline.steps import cli, remote
from tests.projects import run
from tests.servers import SeaweedS3


def commands(*argv: str) -> list[list[str]]:
    return remote.dvc_commands(cli.build_parser().parse_args(["remote", *argv]))


def test_arguments_become_dvc_remote_calls() -> None:
    assert commands("s3://team-data/pneumo/") == [["remote", "add", "--force", "team", "s3://team-data/pneumo"]]
    assert commands("s3://b.example-1/x", "--endpoint-url", "http://127.0.0.1:8333/", "-d", "--name", "lab") == [
        ["remote", "add", "--force", "--default", "lab", "s3://b.example-1/x"],
        ["remote", "modify", "lab", "endpointurl", "http://127.0.0.1:8333"],
    ]
    assert commands("s3://bucket", "--region", "eu-west-1", "--profile", "hospital", "--local") == [
        ["remote", "add", "--local", "--force", "team", "s3://bucket"],
        ["remote", "modify", "--local", "team", "region", "eu-west-1"],
        ["remote", "modify", "--local", "team", "profile", "hospital"],
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gs://bucket/x"], "must look like s3://BUCKET/PATH, got 'gs://bucket/x' (pneumo remote sets up S3"),
        (["bucket/x"], "must look like s3://BUCKET/PATH, got 'bucket/x'"),
        (["s3://Bucket_1/x"], "not a valid S3 bucket name"),
        (["s3://ab"], "not a valid S3 bucket name"),
        (["s3://bucket/x?versionId=1"], "no query or fragment"),
        (["s3://bucket", "--endpoint-url", "localhost:9000"], "must look like http(s)://HOST[:PORT]"),
        (["s3://bucket", "--endpoint-url", "http://key:secret@host:9000"], "must not hold credentials"),
        (["s3://bucket", "--endpoint-url", "http://host:99999"], "bad port"),
        (["s3://bucket", "--name", "team data"], "remote name must be"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PipelineError, match=re.escape(message)):
        commands(*argv)
    assert cli.main(["remote", *argv]) == 2  # nothing ran: the error comes before any dvc call
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("default", [[], ["--default"]])
def test_outside_a_dvc_project_says_so(tmp_path: Path, default: list[str]) -> None:
    """With --default DVC prints a notice on stdout after its error: the error is the reason given."""
    proc = run(["pneumo", "remote", "s3://bucket/x", *default], tmp_path, check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: dvc remote add failed: configuration error - config file error: Not inside a DVC repo"
    )


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_push_and_pull_through_seaweedfs(s3: SeaweedS3, tmp_path: Path) -> None:
    bucket = s3.create_bucket("remote-test")
    project = tmp_path / "project"
    data = project / "data"
    data.mkdir(parents=True)
    for i in range(20):
        (data / f"image_{i:02d}.jpeg").write_bytes(i.to_bytes(2, "big") * 500)
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    run(["dvc", "add", "data"], project)
    before = digests(data)

    out = run(["pneumo", "remote", f"s3://{bucket}/dvc", "--endpoint-url", s3.endpoint, "--default"], project).stdout
    assert f"dvc remote add --force --default team s3://{bucket}/dvc" in out
    assert f"dvc remote modify team endpointurl {s3.endpoint}" in out
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        assert "credentials: none in the environment; set AWS_ACCESS_KEY_ID" in out
    config = (project / ".dvc" / "config").read_text()
    assert f"url = s3://{bucket}/dvc" in config and f"endpointurl = {s3.endpoint}" in config
    assert "remote = team" in config and s3.secret_key not in config and s3.access_key not in config
    assert not (project / ".dvc" / "config.local").exists()

    # Credentials come from the environment only: without them the push is refused.
    no_keys = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    denied = run(["dvc", "push"], project, check=False, **no_keys)
    assert denied.returncode != 0 and not s3.keys(bucket)

    pushed = run(["dvc", "push"], project, **s3.env()).stdout
    assert "21 files pushed" in pushed  # 20 files and the directory's listing
    keys = s3.keys(bucket, "dvc/files/md5/")
    assert len(keys) == 21

    shutil.rmtree(data)
    shutil.rmtree(project / ".dvc" / "cache")
    run(["dvc", "pull"], project, **s3.env())
    assert digests(data) == before
    assert "are in sync" in run(["dvc", "status", "--cloud"], project, **s3.env()).stdout
