"""Ingest (after the source's fingerprint): write the data set in the Kaggle layout under ``data.root``.

Sources: ``synthetic`` (embedded, offline), ``local`` (a folder or .zip in the Kaggle layout, with
the real archive's quirks: a nested ``chest_xray/chest_xray`` copy, ``__MACOSX`` and ``.DS_Store``
junk, any letter case, .jpeg/.jpg/.png) and ``kaggle`` (download, then import as ``local``).
The output folder is written whole and then moved into place, so it is never half-written. Run by hand
(``pneumo ingest``), a failed ingest leaves the previous data in place; under ``dvc repro`` DVC removes a
stage's outputs before running it, so the data then comes back from the DVC cache (``dvc checkout``).
"""

from __future__ import annotations

import lzma
import shutil
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from pipeline.core.atomic import staged_dir
from pipeline.core.config import LABELS, SPLITS, DataParams
from pipeline.core.errors import DataError
from pipeline.data import kaggle, naming, synthetic
from pipeline.data.source import local_path, walk_files

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


@dataclass
class IngestResult:
    source: str
    root: Path
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)
    nested: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [f"ingest ({self.source}): {self.total} images -> {self.root}"]
        for split in SPLITS:
            per = ", ".join(f"{label} {self.counts[(split, label)]}" for label in LABELS)
            lines.append(f"  {split:<5} {per}")
        if self.skipped:
            shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            lines.append(f"  skipped {len(self.skipped)} non-image or duplicate entries: {shown}")
        for root, n in sorted(self.nested.items()):
            lines.append(f"  ignored a nested copy of the data set: {root}/ ({n} files)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Entry:
    """One file of a source tree, by its path inside the source and a way to open it."""

    path: PurePosixPath
    open: Callable[[], BinaryIO]


def _folder_entries(root: Path) -> Iterator[_Entry]:
    for p, _ in walk_files(root):  # linked split or class folders are followed
        yield _Entry(PurePosixPath(p.relative_to(root).as_posix()), partial(p.open, "rb"))


def _zip_entries(archive: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        if not (info.is_dir() or info.filename.endswith("\\")):
            # Zips written on Windows by some tools separate folders with backslashes
            yield _Entry(PurePosixPath(info.filename.replace("\\", "/")), lambda info=info: archive.open(info))


def _placement(path: PurePosixPath) -> tuple[tuple[str, ...], str | None, str] | None:
    """(source root, split or None for a flat layout, label) when `path` sits in a class folder."""
    parts = path.parts
    if len(parts) < 2 or parts[-2].upper() not in LABELS:
        return None
    label = parts[-2].upper()
    if len(parts) >= 3 and parts[-3].lower() in SPLITS:
        return parts[:-3], parts[-3].lower(), label
    return parts[:-2], None, label


def _data_set_root(roots: set[tuple[str, ...]]) -> tuple[str, ...]:
    """The one tree to import: the real archive holds chest_xray/ and a nested chest_xray/chest_xray/ copy, so a
    root inside another is a copy; two trees side by side (2024-01/, 2024-02/) are two data sets, an error."""
    outer = sorted(r for r in roots if not any(r[: len(o)] == o and r != o for o in roots))
    if len(outer) > 1:
        shown = ", ".join("/".join(r) + "/" for r in outer)
        raise DataError(f"{len(outer)} data sets side by side ({shown}): point data.local_path at one of them")
    return outer[0]


def import_entries(entries: list[_Entry], out_dir: Path, flat_split: str, result: IngestResult) -> None:
    """Copy the images of the shallowest Kaggle-layout tree in `entries` into `out_dir`."""
    placed = []
    for entry in entries:
        if naming.is_junk(entry.path):
            continue
        where = _placement(entry.path)
        if where is None:
            result.skipped.append(str(entry.path))
        else:
            placed.append((entry, *where))
    if not placed:
        raise DataError("no images in a {train,val,test}/{NORMAL,PNEUMONIA}/ or {NORMAL,PNEUMONIA}/ layout")
    split_layout = [p for p in placed if p[2] is not None]
    candidates = split_layout or placed
    chosen = _data_set_root({p[1] for p in candidates})
    seen: set[Path] = set()
    for entry, root, split, label in tqdm(candidates, desc="import", unit="file", mininterval=1.0):
        if root != chosen:  # a nested copy, as the real archive's chest_xray/chest_xray/
            result.nested["/".join(root)] += 1
            continue
        if entry.path.suffix.lower() not in IMAGE_SUFFIXES:
            result.skipped.append(str(entry.path))
            continue
        target = out_dir / (split or flat_split) / label / entry.path.name
        if target in seen:  # e.g. NORMAL/ and normal/ both present
            result.skipped.append(str(entry.path))
            continue
        seen.add(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as dst:
            try:
                with entry.open() as src:
                    shutil.copyfileobj(src, dst)
            # A damaged entry (any compression), one compressed in a way zipfile cannot read, or encrypted
            except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, NotImplementedError,
                    RuntimeError) as exc:  # fmt: skip
                raise DataError(f"{entry.path}: cannot be read ({type(exc).__name__}: {exc})") from None
        result.counts[(split or flat_split, label)] += 1


def import_local(source: Path, out_dir: Path, flat_split: str, result: IngestResult) -> None:
    if source.is_dir():
        import_entries(list(_folder_entries(source)), out_dir, flat_split, result)
    elif source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            import_entries(list(_zip_entries(archive)), out_dir, flat_split, result)
    elif source.exists():
        raise DataError(f"{source}: neither a folder nor a .zip archive")
    else:
        raise DataError(f"{source}: no such file or folder (data.local_path)")


def ingest(params: DataParams) -> IngestResult:
    """Run the configured source into ``params.root``, replacing what was there only on success."""
    root = Path(params.root)
    result = IngestResult(params.source, root)
    source = None
    if params.source == "kaggle":
        source = kaggle.download(params.kaggle)
    elif params.source == "local":
        source = local_path(params)
    with staged_dir(root) as tmp:
        if source is None:
            synthetic.generate(params.synthetic, tmp)
            for p in tmp.glob("*/*/*"):
                result.counts[(p.parent.parent.name, p.parent.name)] += 1
        else:
            try:
                import_local(source, tmp, params.flat_layout_split, result)
            except DataError as exc:
                raise DataError(f"{source}: {exc}" if not str(exc).startswith(str(source)) else str(exc)) from None
        for split in SPLITS:  # the layout is always complete, empty folders included
            for label in LABELS:
                (tmp / split / label).mkdir(parents=True, exist_ok=True)
    return result
