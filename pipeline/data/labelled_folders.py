"""Where a labelled folder keeps its classes: NORMAL/ and PNEUMONIA/ in any letter case, directly or under
one split of the Kaggle layout (``test/``). External validation, the stress stage's originals and the
check of ``stress.originals`` all read a folder this one way; two case variants of one folder are an error."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import LABELS
from pipeline.core.errors import DataError


def child(folder: Path, name: str) -> Path | None:
    """A subfolder by name, in any letter case; two case variants (NORMAL/ and normal/) are a DataError."""
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name.lower()] if folder.is_dir() else []
    if len(found) > 1:
        shown = " and ".join(sorted(f"{p.name}/" for p in found))
        raise DataError(f"{folder}: both {shown}, which one holds the {name} images is unclear: merge them")
    return found[0] if found else None


def class_folders(root: str | Path, split: str = "test") -> dict[str, Path] | None:
    """{label: its folder} under `root`, or under `root`/`split`/ when that holds them; None if a class is missing."""
    root = Path(root)
    split_dir = child(root, split)
    base = split_dir if split_dir is not None and child(split_dir, LABELS[0]) is not None else root
    folders = {label: child(base, label) for label in LABELS}
    return None if any(f is None for f in folders.values()) else folders  # type: ignore[return-value]
