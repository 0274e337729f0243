"""Lock files shared by the processes of one machine (filelock: flock on POSIX, released if the holder dies)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import filelock

from pipeline.core.errors import PipelineError, TransientError


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, what: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock file `path` (`what`: who wants it, in messages); waiting over `timeout` s is a TransientError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log(f"{what}: waiting for the lock file {path} (another process holds it)")
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise TransientError(f"{what}: timed out after {timeout:g} s waiting for the lock file {path}") from None
    try:
        yield
    finally:
        lock.release()


FOLDER_LOCK = ".pneumo-stage.lock"  # in the folder a stage writes its outputs to (git-ignored)


def lock_files(folder: Path, outputs: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """(folder, its lock file): `folder`'s own, then every folder of `outputs` (relative to the cwd) outside it,
    sorted, each locked by a file beside it (``.<name>.pneumo-stage.lock``), so the output folder holds outputs only."""
    root = folder.resolve()
    outside = sorted({Path(o).expanduser().resolve() for o in outputs} - {root})
    beside = [(o, o.parent / f".{o.name}{FOLDER_LOCK}") for o in outside if not o.is_relative_to(root)]
    return [(root, root / FOLDER_LOCK), *beside]


@contextlib.contextmanager
def folder_lock(stage: str, folder: Path = Path("."), outputs: Iterable[str | Path] = ()) -> Iterator[None]:
    """Hold the project folder's stage lock for `stage` (train, evaluate, register): the stages that write a
    folder's model, metrics and decision run one at a time, whoever starts them (a flow, `dvc repro`, a
    distributed training's chief); a second one fails at once with one line, before writing anything. Output
    folders outside the project folder (`outputs`, e.g. an absolute train.model_dir) get a lock file too, so a
    stage of another project that writes the same folder is refused too. The thread that holds it may take it
    again (nested stages in one process); other threads and processes may not."""
    with contextlib.ExitStack() as held:
        for place, path in lock_files(folder, outputs):  # one order everywhere; timeout 0 cannot deadlock anyway
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(path, is_singleton=True)  # one object per path: counts re-entries
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                raise PipelineError(
                    f"{stage}: another train, evaluate or register is running in {place} (it holds "
                    f"{path.name}); wait for it to end, or work in another folder (`dvc exp run --temp`, a sweep)"
                ) from None
            held.callback(lock.release)
        yield
