"""Saving and loading the trained model: atomic writes, clear errors, and metadata.json beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from pipeline.core.atomic import staged_file, write_text
from pipeline.core.errors import PipelineError
from pipeline.core.files import read_json
from pipeline.core.hashing import file_sha256
from pipeline.modeling import models  # noqa: F401 - registers the custom preprocessing layer for loading

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
HASH_KEY = "model_sha256"  # the model file's hash, in its metadata


def pip_requirements() -> list[str]:
    """What serving the logged model needs, pinned to this environment (faster than MLflow's inference)."""
    return [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", "pillow", "numpy"]


def save(model: keras.Model, model_dir: str | Path, metadata: dict[str, Any]) -> Path:
    """Write model.keras and metadata.json, bound by the model file's hash in the metadata: a crash between the
    two renames leaves a pair `load` refuses by name, never a model served with another one's threshold."""
    target = Path(model_dir) / MODEL_FILE
    with staged_file(target) as tmp:
        model.save(tmp)
        bound = {**metadata, HASH_KEY: file_sha256(tmp)}
        write_text(Path(model_dir) / METADATA_FILE, json.dumps(bound, indent=2, default=str) + "\n")
    return target


def load(model_dir: str | Path) -> tuple[keras.Model, dict[str, Any]]:
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: no trained model (run the train stage first)")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt zip or config fails in many ways
        raise PipelineError(f"{path}: cannot load the model ({type(exc).__name__}: {str(exc)[:120]})") from None
    meta_path = Path(model_dir) / METADATA_FILE
    metadata = read_json(meta_path, "run the train stage again") if meta_path.is_file() else {}
    if HASH_KEY in metadata and metadata[HASH_KEY] != file_sha256(path):
        raise PipelineError(
            f"{meta_path}: describes another model than {path} (a save was interrupted): run the train stage again"
        )
    return model, metadata
