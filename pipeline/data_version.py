"""The data version later steps log: DVC's hash of the ingested folder, read from dvc.lock."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml


def dvc_data_version(root: str = "data/raw", lock: str | Path = "dvc.lock") -> str | None:
    """The md5 DVC recorded for `root` (e.g. ``3f2a...dir``), or None outside a DVC run."""
    try:
        stages = (yaml.safe_load(Path(lock).read_text()) or {}).get("stages", {})
    except FileNotFoundError:
        return None
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == root:
                return out.get("md5")
    return None


def split_fingerprint(index: pd.DataFrame, split: str) -> str:
    """The identity of one split's usable images: models are compared only on equal test sets."""
    return index_fingerprint(index[(index["split"] == split) & index["decodable"]])


def index_fingerprint(index: pd.DataFrame) -> str:
    """A content hash of the index (path, split, sha256), stable across machines and without DVC."""
    import hashlib

    rows = index.sort_values("path")[["path", "split", "sha256"]].itertuples(index=False)
    return hashlib.sha256("\n".join(",".join(r) for r in rows).encode()).hexdigest()[:16]
