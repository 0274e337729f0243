"""Patient-grouped splits: validation is carved from the pooled folders by patient, never by image.

The official ``val/`` folder holds 16 images, too few to pick a threshold or stop early, so the
folders in ``split.pool`` are pooled and a ``val_fraction`` of their patients, drawn per label
(stratified) with ``split.seed``, becomes ``val``; the rest is ``train``. ``test`` stays the
official test folder. A patient is never in two of the carved splits; a patient in both the pool
and the official test is left where the folders put it, so validation reports it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.config import SplitParams


def assign_splits(index: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """Return a copy of `index` with ``split`` set by patient; deterministic for a given seed."""
    out = index.copy()
    pooled = out["official_split"].isin(params.pool)
    out.loc[pooled, "split"] = "train"
    pool = out[pooled]
    if pool.empty:
        return out
    # One label per patient (its majority label) so the carve is stratified by label.
    patient_label = pool.groupby("patient_id")["label"].agg(lambda s: s.value_counts().sort_index().idxmax())
    rng = np.random.default_rng(params.seed)
    val_patients: list[str] = []
    for label in sorted(patient_label.unique()):
        patients = np.array(sorted(patient_label.index[patient_label == label]))
        n_val = round(params.val_fraction * len(patients))
        val_patients += list(rng.permutation(patients)[:n_val])
    out.loc[pooled & out["patient_id"].isin(val_patients), "split"] = "val"
    return out
