"""Small registered models for serving tests and the serve benchmark, in seconds instead of a training run.

An untrained network packed as a real serving bundle (``write_bundle``, with a drift reference from real
images), registered in a real MLflow registry (sqlite) as run artifacts. Speed and swaps do not depend on
the weights; each seed gives a different network, so two versions give different probabilities.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import mlflow
import uvicorn
from mlflow import MlflowClient

from pipeline.modeling.models import build_model
from pipeline.registry.packaging import drift_reference, write_bundle
from pipeline.serving.classifier import SERVING_FILE, Classifier, ModelInfo
from tests.servers import free_port


def tiny_bundle(folder: Path, reference_files: list[str], size: int = 32, seed: int = 0) -> Path:
    """A serving bundle of an untrained compact CNN, its drift reference from `reference_files`."""
    import keras

    keras.utils.set_random_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    built = build_model("compact_cnn", size)
    built.model.save(folder / "model.keras")
    info = ModelInfo(0.5, ("NORMAL", "PNEUMONIA"), size, "binary", "compact_cnn", built.last_conv)
    reference = drift_reference(Classifier(built.model, info), reference_files)
    write_bundle(folder / "bundle", folder / "model.keras", info, reference)
    return folder / "bundle"


def broken_bundle(good: Path, dest: Path, kind: str) -> Path:
    """A copy of `good` that cannot load: "no_serving_json" (not a bundle) or "corrupt_serving_json" (not JSON)."""
    shutil.copytree(good, dest)
    if kind == "no_serving_json":
        (dest / SERVING_FILE).unlink()
    elif kind == "corrupt_serving_json":
        (dest / SERVING_FILE).write_text(json.dumps({"threshold": 0.5})[:-3])
    else:
        raise ValueError(kind)
    return dest


@dataclass(frozen=True)
class TinyRegistry:
    """A real MLflow sqlite store whose model versions are bundle folders logged as run artifacts."""

    root: Path
    name: str = "tiny"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@champion"

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def register(self, bundle: Path) -> str:
        mlflow.set_tracking_uri(self.tracking_uri)
        experiment = mlflow.get_experiment_by_name("serving") or mlflow.get_experiment(
            mlflow.create_experiment("serving", artifact_location=str(self.root / "artifacts"))
        )
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            mlflow.log_artifacts(str(bundle), "bundle")
        client = self.client()
        if not client.search_registered_models(f"name = '{self.name}'"):
            client.create_registered_model(self.name)
        return str(client.create_model_version(self.name, f"runs:/{run.info.run_id}/bundle", run.info.run_id).version)

    def point(self, version: str, alias: str = "champion") -> None:
        self.client().set_registered_model_alias(self.name, alias, version)


class ThreadedServer:
    """A uvicorn server for `config` in a thread of this process (for tests that wrap the app's parts)."""

    def __init__(self, config: uvicorn.Config) -> None:
        config.port = config.port or free_port()
        self.server = uvicorn.Server(config)
        self.url = f"http://{config.host}:{config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            threading.Event().wait(0.05)
        raise TimeoutError("uvicorn did not start within 30 s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
