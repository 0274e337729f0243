"""The source stage: fingerprint the data read from outside the project, for the stages that read it.

The data source for ingest, ``stress.originals`` for stress, a ``model.weights`` file for train
(pipeline/data/source.py). Its outputs persist
(DVC leaves them in place while it runs): where a local data source cannot be reached (a clone that pulled
the data, an unmounted share) and the fingerprint there is of the same ``data.local_path``, it is kept, with
a warning, so the data as last ingested stays current; with none to keep, the stage stops on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text
from pipeline.core.config import Params
from pipeline.core.errors import DataError
from pipeline.data import source


def describe(found: dict[str, Any], target: str) -> str:
    size = f"{found['files']} files, {found['bytes'] / 1e6:.1f} MB"
    return f"{size}, listing {found['listing_sha256'][:12]} -> {target}"


def previous(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def data_fingerprint(params: Params) -> tuple[dict[str, Any], str]:
    """(the data source's fingerprint, what to print)."""
    target = params.data.fingerprint
    try:
        found = source.fingerprint(params.data)
    except DataError as exc:
        kept = previous(target)
        if not kept or kept.get("source") != "local" or kept.get("local_path") != params.data.local_path:
            raise
        return kept, f"source (local): warning: {exc}; kept the fingerprint of the data as last ingested ({target})"
    if found["source"] == "synthetic":
        return found, f"source (synthetic): made from params.yaml's data.synthetic -> {target}"
    if found["source"] == "kaggle":
        return found, f"source (kaggle): {found['dataset']} (downloaded once by ingest) -> {target}"
    return found, f"source (local): {params.data.local_path}: {describe(found, target)}"


def run(params: Params) -> str:
    data, line = data_fingerprint(params)
    originals = source.originals_fingerprint(params.stress)
    weights = source.weights_fingerprint(params.model)
    write_text(params.data.fingerprint, json.dumps(data, indent=2) + "\n")
    write_text(params.stress.fingerprint, json.dumps(originals, indent=2) + "\n")
    write_text(params.model.weights_fingerprint, json.dumps(weights, indent=2) + "\n")
    lines = [line]
    if "sha256" in weights:
        lines.append(f"  model.weights: {params.model.weights}: sha256 {weights['sha256'][:12]}")
    elif weights.get("kind") == source.UNREACHABLE:
        lines.append(f"  model.weights: {params.model.weights}: no such file (the train stage will stop)")
    if originals.get("kind") == source.UNREACHABLE:
        lines.append(
            f"  stress.originals: {params.stress.originals}: not a folder with NORMAL/ and PNEUMONIA/ "
            "(the stress stage will stop)"
        )
    elif originals["originals"] is not None:
        lines.append(f"  stress.originals: {params.stress.originals}: {describe(originals, params.stress.fingerprint)}")
    return "\n".join(lines)
