"""The index: one row per image file under the data root, the table every later step reads.

Columns: path (relative to the data root), official_split (its folder), split (after the
patient-grouped carve, see splits.py), label, subtype, patient_id (scoped by the folder's patient
numbering: ``train/person12``, ``test/person12``), width, height, mode, bytes, sha256, decodable,
error. A file that does not decode is kept in the index with its error and ``decodable=False``:
training never sees it (it is quarantined), and validation reports it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.core.atomic import staged_file, write_text
from pipeline.core.config import LABELS, SPLITS
from pipeline.core.errors import DataError
from pipeline.data import naming

COLUMNS = [
    "path",
    "official_split",
    "split",
    "label",
    "subtype",
    "patient_id",
    "width",
    "height",
    "mode",
    "bytes",
    "sha256",
    "decodable",
    "error",
]


@dataclass(frozen=True)
class ImageFacts:
    width: int
    height: int
    mode: str
    bytes: int
    sha256: str
    decodable: bool
    error: str


def inspect_image(path: Path) -> ImageFacts:
    """Hash the file and fully decode it; never raises for a bad image, it says why instead."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    width = height = 0
    mode, error = "", ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height, mode = img.width, img.height, img.mode
                img.load()  # a truncated JPEG fails here, not at open
    except Exception as exc:  # noqa: BLE001 - any decoder failure quarantines the file
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    if not data:
        error = "empty file (0 bytes)"
    return ImageFacts(width, height, mode, len(data), digest, not error, error)


def list_images(root: Path) -> list[tuple[str, str, Path]]:
    """(split, label, file) for every file in root/{split}/{label}/, in a stable order."""
    found = []
    for split in SPLITS:
        for label in LABELS:
            folder = root / split / label
            if folder.is_dir():
                found += [(split, label, p) for p in sorted(folder.iterdir()) if p.is_file()]
    return found


DEFAULT_SCOPES = {"train": "train", "val": "train", "test": "test"}


def build_index(root: str | Path, workers: int = 0, patient_scopes: dict[str, str] | None = None) -> pd.DataFrame:
    """Scan `root` in the Kaggle layout into the index table (split = official_split for now).

    ``patient_id`` is scoped by the folder's patient numbering (see ``naming.scoped_patient_id``)."""
    scopes = patient_scopes or DEFAULT_SCOPES
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder missing (run `pneumo ingest` or `dvc repro ingest` first)")
    files = list_images(root)
    if not files:
        raise DataError(f"{root}: no files in {{train,val,test}}/{{NORMAL,PNEUMONIA}}/")
    workers = workers or 2 * (os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        facts = list(
            tqdm(
                pool.map(inspect_image, (f for _, _, f in files)),
                total=len(files),
                desc="index",
                unit="img",
                mininterval=1.0,
            )
        )
    rows = []
    for (split, label, path), f in zip(files, facts, strict=True):
        rows.append(
            {
                "path": path.relative_to(root).as_posix(),
                "official_split": split,
                "split": split,
                "label": label,
                "subtype": naming.subtype(path.name, label),
                "patient_id": naming.scoped_patient_id(path.name, split, scopes),
                "width": f.width,
                "height": f.height,
                "mode": f.mode,
                "bytes": f.bytes,
                "sha256": f.sha256,
                "decodable": f.decodable,
                "error": f.error,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def write_index(index: pd.DataFrame, path: str | Path, quarantine_path: str | Path) -> None:
    """Write the index (parquet) and the quarantine list (CSV of undecodable files) atomically."""
    with staged_file(path) as tmp:
        index.to_parquet(tmp, index=False)
    bad = index.loc[~index["decodable"], ["path", "split", "label", "bytes", "error"]]
    write_text(quarantine_path, bad.to_csv(index=False))


def read_index(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: index missing (run `pneumo index` or `dvc repro index` first)")
    index = pd.read_parquet(path)
    missing = set(COLUMNS) - set(index.columns)
    if missing:
        raise DataError(f"{path}: not an index of this version (missing columns: {sorted(missing)})")
    return index
