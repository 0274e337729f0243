"""The MLflow pyfunc wrapper: raw image bytes in, probability and label at the registered threshold out.

So ``mlflow models serve -m models:/pneumo-chest-xray@champion`` serves the model as the pipeline
does: the wrapper owns decoding (JPEG, PNG, DICOM), resizing and the threshold. Send a column
``image`` holding the file's bytes (base64 in JSON, which MLflow decodes for a binary column)::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of the file>"]]}}
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image

from pipeline.serving import image_io
from pipeline.serving.classifier import BUNDLE_ARTIFACT, Classifier

OUTPUT_COLUMNS = ("probability", "label", "threshold", "ood_score", "refused", "warnings")


class ChestXrayClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.classifier = Classifier.from_bundle(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "image" not in model_input.columns:
            raise MlflowException("input needs a column 'image' with the image file's bytes", INVALID_PARAMETER_VALUE)
        info = self.classifier.info
        batch: list[np.ndarray] = []
        warnings: list[list[str]] = []
        for row, value in enumerate(model_input["image"]):
            try:
                data = _as_bytes(value)
                image = image_io.load(data)
                batch.append(image_io.model_input(image, info.image_size))
                warnings.append(image.warnings)
            except (image_io.ImageError, ValueError) as exc:
                raise MlflowException(f"row {row}: {exc}", INVALID_PARAMETER_VALUE) from None
            except Exception as exc:  # noqa: BLE001 - a decoder failing in an unexpected way is still a bad image
                reason = f"cannot decode ({type(exc).__name__})"  # as REST answers it: one line, no traceback
                raise MlflowException(f"row {row}: {reason}", INVALID_PARAMETER_VALUE) from None
        predictions = self.classifier.predict(np.stack(batch)) if batch else []
        records = [p.record(info, w) for p, w in zip(predictions, warnings, strict=True)]
        for record in records:
            record["warnings"] = "; ".join(record["warnings"])
        return pd.DataFrame(records, columns=list(OUTPUT_COLUMNS))


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError("the image column holds a string that is not base64") from None
    raise ValueError(f"the image column holds {type(value).__name__}, not bytes")


def example_input() -> pd.DataFrame:
    """One request row as MLflow stores it beside the model: a small grey PNG's bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(buf, "PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def signature() -> Any:
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("double", "probability"),
                ColSpec("string", "label", required=False),
                ColSpec("double", "threshold"),
                ColSpec("double", "ood_score", required=False),
                ColSpec("string", "refused", required=False),
                ColSpec("string", "warnings"),
            ]
        ),
    )
