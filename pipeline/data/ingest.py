"""Ingest (after the source's fingerprint): write the data set in the Kaggle layout under ``data.root``.

Sources: ``synthetic`` (embedded, offline), ``local`` (a folder or .zip in the Kaggle layout, with
the real archive's quirks: a nested ``chest_xray/chest_xray`` copy, ``__MACOSX`` and ``.DS_Store``
junk, any letter case, .jpeg/.jpg/.png) and ``kaggle`` (download, then import as ``local``).
The output folder is written whole and then moved into place, so it is never half-written. Run by hand
(``pneumo ingest``), a failed ingest leaves the previous data in place; under ``dvc repro`` DVC removes a
stage's outputs before running it, so the data then comes back from the DVC cache (``dvc checkout``).
"""

from __future__ import annotations

import errno
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
# Images in formats ingest does not import: in a class folder they are an error, not a silent change of the data
OTHER_IMAGE_SUFFIXES = {".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm", ".dicom"}
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # the copy's target, not its source, at fault


class OutputError(DataError):
    """The imported copy cannot be written (a full disk, a read-only folder): the data set is not at fault."""


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
            lines.append(f"  skipped {len(self.skipped)} non-image, duplicate or case-clashing entries: {shown}")
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


# Other names hospital exports give the split folders; the official archive uses train/, val/ and test/ only.
SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}


@dataclass(frozen=True)
class _Place:
    """Where an entry sits: the tree it belongs to, its split (None: a flat layout) and class, and any folders
    between the class folder and the file (``below``: none for an image in its place)."""

    root: tuple[str, ...]
    split: str | None
    label: str
    class_dir: tuple[str, ...]
    below: tuple[str, ...]


def _split_name(folder: str) -> str | None:
    name = folder.lower()
    return name if name in SPLITS else SPLIT_ALIASES.get(name)


def _placement(path: PurePosixPath) -> _Place | None:
    """Where `path` sits under its nearest class folder (NORMAL/ or PNEUMONIA/, any case), or None outside one."""
    folders = path.parts[:-1]
    for i in range(len(folders) - 1, -1, -1):
        if folders[i].upper() in LABELS:
            split = _split_name(folders[i - 1]) if i > 0 else None
            root = folders[: i - 1] if split else folders[:i]
            return _Place(root, split, folders[i].upper(), folders[: i + 1], folders[i + 1 :])
    return None


def _data_set_root(roots: set[tuple[str, ...]]) -> tuple[str, ...]:
    """The one tree to import: the real archive holds chest_xray/ and a nested chest_xray/chest_xray/ copy, so a
    root inside another is a copy; two trees side by side (2024-01/, 2024-02/) are two data sets, an error."""
    outer = sorted(r for r in roots if not any(r[: len(o)] == o and r != o for o in roots))
    if len(outer) > 1:
        shown = ", ".join("/".join(r) + "/" for r in outer)
        raise DataError(f"{len(outer)} data sets side by side ({shown}): point data.local_path at one of them")
    return outer[0]


def _folder(parts: tuple[str, ...]) -> str:
    return "/".join(parts) + "/" if parts else "./"


def _copy_of(place: _Place, copies: set[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The innermost nested copy of the data set that `place` lies in, if any."""
    return max((c for c in copies if place.root[: len(c)] == c), key=len, default=None)


def _misplaced(place: _Place, split_layout: bool) -> str | None:
    """Why an image in the chosen tree would be ignored (a one-line error), or None if it is in its place."""
    if place.below:
        return (
            f"{_folder(place.class_dir + place.below)}: images below the class folder {_folder(place.class_dir)} "
            "would be ignored: move them up into it"
        )
    if split_layout and place.split is None:
        return (
            f"{_folder(place.class_dir)}: a class folder outside the train/ val/ test/ folders would be ignored: "
            "move it into one of them"
        )
    return None


def _check_split_folders(chosen: list[tuple[_Entry, _Place]]) -> None:
    """val/ and validation/ (or test/ and testing/) side by side: which one is the split is not known."""
    names: dict[str, set[str]] = {}
    for _, place in chosen:
        if place.split is not None:
            names.setdefault(place.split, set()).add(_folder(place.class_dir[:-1]).lower())
    for split, found in names.items():
        if len(found) > 1:
            raise DataError(f"{' and '.join(sorted(found))}: two folders for the {split} split, keep one")


def _select(entries: list[_Entry], result: IngestResult) -> list[tuple[_Entry, _Place]]:
    """The images of the shallowest Kaggle-layout tree in `entries`; nested copies are counted, anything else
    that would be left out silently (class folders beside the split folders, images in subfolders) is an error."""
    placed: list[tuple[_Entry, _Place]] = []
    for entry in entries:
        if naming.is_junk(entry.path):
            continue
        place = _placement(entry.path)
        suffix = entry.path.suffix.lower()
        image = suffix in IMAGE_SUFFIXES
        if place is not None and suffix in OTHER_IMAGE_SUFFIXES:
            raise DataError(f"{entry.path}: {suffix} images are not imported (convert to PNG or JPEG)")
        if place is None or (place.below and not image):
            result.skipped.append(str(entry.path))
        else:
            placed.append((entry, place))
    in_place = [p for e, p in placed if not p.below and e.path.suffix.lower() in IMAGE_SUFFIXES]
    if not in_place:
        raise DataError("no images in a {train,val,test}/{NORMAL,PNEUMONIA}/ or {NORMAL,PNEUMONIA}/ layout")
    split_layout = any(p.split is not None for p in in_place)
    roots = {p.root for p in in_place if (p.split is not None) == split_layout}
    chosen_root = _data_set_root(roots)
    copies = roots - {chosen_root}
    chosen = []
    for entry, place in placed:
        copy = _copy_of(place, copies)
        if copy is not None:  # a nested copy, as the real archive's chest_xray/chest_xray/
            result.nested["/".join(copy)] += 1
        elif (why := _misplaced(place, split_layout)) is not None:
            raise DataError(why)
        else:  # every other root in place is the chosen one or a copy (see _data_set_root)
            chosen.append((entry, place))
    _check_split_folders(chosen)
    return chosen


def import_entries(entries: list[_Entry], out_dir: Path, flat_split: str, result: IngestResult) -> None:
    """Copy the images of the shallowest Kaggle-layout tree in `entries` into `out_dir`."""
    seen: set[str] = set()
    for entry, place in tqdm(_select(entries, result), desc="import", unit="file", mininterval=1.0):
        if entry.path.suffix.lower() not in IMAGE_SUFFIXES:
            result.skipped.append(str(entry.path))
            continue
        split = place.split or flat_split
        target = out_dir / split / place.label / entry.path.name
        # NORMAL/ and normal/ both present, or names differing in case only (one file on macOS and Windows)
        if target.as_posix().lower() in seen:
            result.skipped.append(str(entry.path))
            continue
        seen.add(target.as_posix().lower())
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with entry.open() as src, open(target, "wb") as dst:  # the close, which writes the last bytes, inside
                shutil.copyfileobj(src, dst)
        except OSError as exc:
            if exc.errno in DISK_FULL or exc.filename == str(target):  # the target's fault, not the source's
                raise OutputError(f"{out_dir.parent}: cannot write the images ({exc.strerror})") from None
            raise DataError(f"{entry.path}: cannot be read ({type(exc).__name__}: {exc})") from None
        # A damaged entry (any compression), one compressed in a way zipfile cannot read, or encrypted
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError,
                RuntimeError) as exc:  # fmt: skip
            raise DataError(f"{entry.path}: cannot be read ({type(exc).__name__}: {exc})") from None
        result.counts[(split, place.label)] += 1


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
            except OutputError:  # names the folder written to, not the source
                raise
            except DataError as exc:
                raise DataError(f"{source}: {exc}" if not str(exc).startswith(str(source)) else str(exc)) from None
        for split in SPLITS:  # the layout is always complete, empty folders included
            for label in LABELS:
                (tmp / split / label).mkdir(parents=True, exist_ok=True)
    return result
