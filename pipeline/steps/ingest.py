"""The ingest stage: write the data set (synthetic, a local folder or zip, or Kaggle) in the Kaggle layout."""

from __future__ import annotations

from pipeline.core.config import Params
from pipeline.data import ingest


def run(params: Params) -> str:
    return ingest.ingest(params.data).summary()
