"""Atomic file and folder writes: readers see the old version or the new one, never half of one.

Temporary files and folders are created with the modes a plain ``open`` / ``mkdir`` gives (0o666 / 0o777 less
the umask), not ``tempfile``'s private 0o600 / 0o700, so what they become is readable as any other output.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

TEMPORARY = ".*.tmp*"  # a glob matching every temporary file or folder these writers make (copies skip them)


def _sibling(path: Path, suffix: str) -> Path:
    """A new name beside `path`: ``.<name>.<random><suffix>``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")


def _new_file(path: Path, suffix: str) -> tuple[int, Path]:
    """A new empty file beside `path`, mode 0o666 less the umask: (open descriptor, path)."""
    tmp = _sibling(path, suffix)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def _new_dir(path: Path, suffix: str) -> Path:
    """A new empty folder beside `path`, mode 0o777 less the umask."""
    tmp = _sibling(path, suffix)
    tmp.mkdir()
    return tmp


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_file(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`, ending as it does (``.weights.h5``, ``.keras``: writers check the
    suffix); it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_file(path, f".tmp{''.join(path.suffixes)}")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(path, ".tmp")
    try:
        yield tmp
        old = None
        if path.exists():
            old = _sibling(path, ".old")  # a unique name: a killed run's half-deleted one never blocks the next
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
