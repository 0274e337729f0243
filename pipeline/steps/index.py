"""The index stage: scan the images into the index table and carve the patient-grouped splits."""

from __future__ import annotations

from pipeline.core.config import Params
from pipeline.data import dataset_index, splits


def run(params: Params) -> str:
    index = dataset_index.build_index(params.data.root, params.index.workers, params.index.patient_scopes)
    index = splits.assign_splits(index, params.split)
    dataset_index.write_index(index, params.index.path, params.index.quarantine)
    usable = index[index["decodable"]]
    by_split = usable.groupby("split").agg(images=("path", "size"), patients=("patient_id", "nunique"))
    lines = [f"index: {len(index)} images, {int((~index['decodable']).sum())} quarantined -> {params.index.path}"]
    lines += [f"  {s:<5} {int(r.images)} images, {int(r.patients)} patients" for s, r in by_split.iterrows()]
    return "\n".join(lines)
