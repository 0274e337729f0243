"""The data version later steps log: DVC's hash of the ingested folder, read from dvc.lock.

A lock file can describe other data than the index at hand (a run outside DVC, an edited folder):
the version is only reported when dvc.lock's recorded hash of the index file equals the file's own
hash, so a model's provenance names the data it was really trained on, or says ``untracked``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import yaml


def _lock_outs(lock: str | Path) -> dict[str, str]:
    try:
        stages = (yaml.safe_load(Path(lock).read_text()) or {}).get("stages", {})
    except FileNotFoundError:
        return {}
    return {out["path"]: out.get("md5", "") for stage in stages.values() for out in stage.get("outs", [])}


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_data_version(
    root: str = "data/raw", lock: str | Path = "dvc.lock", index: str | Path | None = None
) -> str | None:
    """The md5 DVC recorded for `root` (e.g. ``3f2a...dir``), or None outside a DVC run.

    With `index` (the index file path as dvc.lock names it), None also when the lock's hash of that
    file differs from the file on disk: the lock then describes other data.
    """
    outs = _lock_outs(lock)
    version = outs.get(root)
    if version is None or index is None:
        return version
    recorded = outs.get(str(index))
    if not recorded or not Path(index).is_file() or file_md5(index) != recorded:
        return None
    return version


def split_fingerprint(index: pd.DataFrame, split: str) -> str:
    """The identity of one split's usable images: models are compared only on equal test sets."""
    return index_fingerprint(index[(index["split"] == split) & index["decodable"]])


def index_fingerprint(index: pd.DataFrame) -> str:
    """A content hash of the index (path, split, sha256), stable across machines and without DVC."""
    rows = index.sort_values("path")[["path", "split", "sha256"]].itertuples(index=False)
    return hashlib.sha256("\n".join(",".join(r) for r in rows).encode()).hexdigest()[:16]
