"""Atomic writes: the modes of what they create, and a killed run's leftovers."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core.atomic import staged_dir, staged_file, write_text


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_modes_a_plain_write_gives_not_private_ones(tmp_path: Path, umask_022: None) -> None:
    """tempfile's 0o600 / 0o700 would leave reports, models and params.yaml unreadable to a second user or a
    service account; what an atomic write leaves is what open() / mkdir() would."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text(tmp_path / "report.json", "{}")
    with staged_file(tmp_path / "model.keras") as tmp:
        tmp.write_bytes(b"model")
    with staged_dir(tmp_path / "plots") as folder:
        (folder / "roc.png").write_bytes(b"png")
    assert mode(plain) == mode(tmp_path / "report.json") == mode(tmp_path / "model.keras") == 0o644
    assert mode(tmp_path / "plots") == 0o755
    os.umask(0o077)  # a private umask stays private
    write_text(tmp_path / "secret.json", "{}")
    assert mode(tmp_path / "secret.json") == 0o600


def test_a_killed_runs_half_deleted_old_folder_does_not_block_the_next(tmp_path: Path) -> None:
    """The replaced folder is moved aside under a unique name: a leftover of a run killed while deleting it (in a
    container the next run often has the same process id) is no obstacle."""
    target = tmp_path / "out"
    with staged_dir(target) as folder:
        (folder / "a").write_text("1")
    leftover = tmp_path / f".out.old-{os.getpid()}"  # the name the replaced folder used to get
    leftover.mkdir()
    (leftover / "half").write_text("deleted")
    with staged_dir(target) as folder:
        (folder / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p != leftover]
