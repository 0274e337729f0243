"""The data read from outside the project as it is now, fingerprinted.

The `source` stage runs on every `dvc repro` (DVC's ``always_changed``) and writes these fingerprints;
`ingest` depends on the data source's, `stress` on its originals' (``stress.originals``), `train` on its
starting weights file's (``model.weights``: its bytes, as the resume key hashes them). So a local
folder or zip whose files change under the same ``data.local_path`` is ingested again: a stage's DVC
state is keyed by what it reads, not only by the params that name it. A folder's fingerprint is each
file's path inside it, size and modification time (what DVC itself trusts before re-hashing: a directory
walk, no image read), a zip's is its table of contents (names, sizes, CRCs: the same for a copy), and the
Kaggle archive's is the data set's name (a download is kept, never replaced). Where the project sits is
not part of it, so a clone that pulled the data sees the same fingerprint for the same source.
"""

from __future__ import annotations

import hashlib
import os
import stat as stat_module
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.config import DataParams, ModelParams, StressParams
from pipeline.core.errors import DataError
from pipeline.core.hashing import file_sha256
from pipeline.core.project import project_path
from pipeline.data.labelled_folders import class_folders

UNREACHABLE = "unreachable"


def shown(given: str, path: Path) -> str:
    """A path as the user wrote it, with where it was looked for when that differs."""
    return given if Path(given).expanduser() == path else f"{given} ({path})"


def local_path(params: DataParams) -> Path:
    """data.local_path (relative to the project), checked: a folder or a file."""
    given = params.local_path or ""
    path = project_path(given)
    if not path.exists():
        raise DataError(f"{shown(given, path)}: no such file or folder (data.local_path)")
    if not (path.is_dir() or path.is_file()):
        raise DataError(f"{shown(given, path)}: neither a folder nor a file (data.local_path)")
    return path


def walk_files(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """(file, its stat) for every regular file under `root`, following linked folders (a split or class folder
    may be a link to where the images are) but never into a folder it is already inside (a link loop); broken
    links and files or folders gone mid-walk are left out; a folder that cannot be listed is a DataError."""
    for folder, dirs, files in os.walk(root, onerror=_unlisted, followlinks=True):
        here = Path(folder)
        ancestors = {_key(p) for p in (here, *here.parents) if p.is_relative_to(root)}
        dirs[:] = sorted(d for d in dirs if _key(here / d) not in ancestors)
        for name in sorted(files):
            path = here / name
            try:
                stat = path.stat()
            except OSError:
                continue
            if stat_module.S_ISREG(stat.st_mode):
                yield path, stat


def _unlisted(error: OSError) -> None:
    """os.walk's onerror: an unreadable folder (permissions, a failing share) would drop its files unseen."""
    if not isinstance(error, FileNotFoundError):  # gone mid-walk, as a file can be
        raise DataError(f"{error.filename}: cannot be listed ({error.strerror or error})")


def _key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _listing(root: Path) -> list[str]:
    """Every regular file under `root` as 'relative path, size, mtime' (sorted), as ingest reads them."""
    return sorted(
        f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}" for path, stat in walk_files(root)
    )


def _zip_listing(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return sorted(f"{i.filename}\t{i.file_size}\t{i.CRC:08x}" for i in archive.infolist())
    except (zipfile.BadZipFile, OSError):  # not a zip: ingest says so; its size and time stand in
        stat = path.stat()
        return [f"{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}"]


def folder_or_file(path: Path) -> dict[str, Any]:
    """A folder's files (or a zip's entries) as a fingerprint: how many, their bytes, a hash of the listing."""
    lines = _listing(path) if path.is_dir() else _zip_listing(path)
    total = sum(int(line.split("\t")[1]) for line in lines)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    kind = "folder" if path.is_dir() else "file"
    return {"kind": kind, "files": len(lines), "bytes": total, "listing_sha256": digest}


def fingerprint(params: DataParams) -> dict[str, Any]:
    """What determines ingest's output beyond the `data` params. Synthetic data is made from the params alone."""
    if params.source == "synthetic":
        return {"source": "synthetic"}
    if params.source == "kaggle":
        return {"source": "kaggle", "dataset": params.kaggle.dataset}
    path = local_path(params)
    found = folder_or_file(path)
    if found["files"] == 0:  # an empty mount point is a share not mounted, never a data set with no images
        raise DataError(f"{shown(params.local_path or '', path)}: empty, no files in it (data.local_path)")
    return {"source": "local", "local_path": params.local_path, **found}


def originals_folder(params: StressParams) -> Path | None:
    """The folder of stress.originals (relative to the project) that holds the class folders, or None; a path that
    is no folder, or no labelled folder (see ``labelled_folders``), is a DataError."""
    if not params.originals:
        return None
    path = project_path(params.originals)
    if not path.is_dir():
        raise DataError(f"stress.originals: {shown(params.originals, path)}: no such folder")
    folders = class_folders(path)  # as external validation reads a folder: any letter case, or under test/
    if folders is None:
        raise DataError(
            f"stress.originals: {shown(params.originals, path)}: no NORMAL/ and PNEUMONIA/ folders in it (or in test/)"
        )
    return next(iter(folders.values())).parent  # the Kaggle layout's test/: only what the stress stage scores


def originals_fingerprint(params: StressParams) -> dict[str, Any]:
    """The same for the stress stage's labelled folder of originals; a missing one is recorded as such (the
    stress stage stops on it, not the stages before it)."""
    if not params.originals:
        return {"originals": None}
    try:
        folder = originals_folder(params)
    except DataError:
        return {"originals": params.originals, "kind": UNREACHABLE}
    assert folder is not None
    return {"originals": params.originals, **folder_or_file(folder)}


def weights_fingerprint(params: ModelParams) -> dict[str, Any]:
    """``model.weights`` as train reads it: ``none`` / ``imagenet`` as such, a file by its bytes (sha256), so a
    file replaced under the same name trains again; a missing file is recorded (train stops on it)."""
    if params.weights in ("none", "imagenet"):
        return {"weights": params.weights}
    path = project_path(params.weights)
    if not path.is_file():
        return {"weights": params.weights, "kind": UNREACHABLE}
    return {"weights": params.weights, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
