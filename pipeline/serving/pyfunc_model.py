"""The MLflow pyfunc wrapper: raw image bytes in, probability and label at the registered threshold out.

So ``mlflow models serve -m models:/pneumo-chest-xray@champion`` serves the model as the pipeline
does: the wrapper owns decoding (JPEG, PNG, DICOM), resizing and the threshold. Send a column
``image`` holding the file's bytes (base64 in JSON, which MLflow decodes for a binary column)::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of the file>"]]}}

An unreadable row fails the whole request (400, naming the row) unless the request asks for
``"params": {"on_error": "row"}``: then that row comes back with ``status=error`` and its reason, and the
others are predicted, as ``pneumo predict`` does for files.
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
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from pipeline.serving import image_io
from pipeline.serving.classifier import BUNDLE_ARTIFACT, Classifier, class_columns, error_record

OUTPUT_COLUMNS = ("probability", "label", "threshold", "ood_score", "refused", "warnings", "status", "error")
MAX_ROWS = 64  # rows decoded and predicted at once: memory stays bounded whatever the frame's length
ON_ERROR = ("raise", "row")  # the `on_error` param: fail the request, or answer the row with its reason


class ChestXrayClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.classifier = Classifier.from_bundle(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "image" not in model_input.columns:
            raise MlflowException("input needs a column 'image' with the image file's bytes", INVALID_PARAMETER_VALUE)
        on_error = (params or {}).get("on_error", "raise")
        if on_error not in ON_ERROR:
            raise MlflowException(
                f"params: on_error: {on_error!r} is not one of {list(ON_ERROR)}", INVALID_PARAMETER_VALUE
            )
        values = list(model_input["image"])
        records: list[dict[str, Any]] = []
        for start in range(0, len(values), MAX_ROWS):  # bounded chunks: a Spark batch has 10,000 rows
            records += self._chunk(values[start : start + MAX_ROWS], start, on_error)
        frame = pd.DataFrame(records, columns=output_columns(self.classifier.info.class_names))
        for column in frame.columns:  # an empty field (an error row's, a label refused) is null in JSON, not NaN
            if frame[column].isna().any():
                frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
        return frame

    def _chunk(self, values: list[Any], first_row: int, on_error: str) -> list[dict[str, Any]]:
        """The answer rows of `values` (rows `first_row`...): decoded, then predicted in one call."""
        info = self.classifier.info
        rows: list[tuple[np.ndarray, list[str]] | str] = []  # (model input, warnings), or why not predicted
        for row, value in enumerate(values, first_row):
            rows.append(prepared := _prepare(value, info.image_size))
            if isinstance(prepared, str) and on_error == "raise":
                raise MlflowException(f"row {row}: {prepared}", INVALID_PARAMETER_VALUE)
        batch = [item[0] for item in rows if not isinstance(item, str)]
        predictions = iter(self.classifier.predict(np.stack(batch)) if batch else [])
        records = []
        for item in rows:
            if isinstance(item, str):
                records.append(error_record(info, item))
                continue
            records.append(next(predictions).row(info, item[1]))  # as `pneumo predict` writes it
        return records


def _prepare(value: Any, image_size: int) -> tuple[np.ndarray, list[str]] | str:
    """The row's model input and decoding warnings (full-size pixels not kept), or its one-line reason (as
    REST answers it: no traceback)."""
    try:
        image = image_io.load(_as_bytes(value))
        return image_io.model_input(image, image_size), list(image.warnings)
    except (image_io.ImageError, ValueError) as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a decoder failing in an unexpected way is still a bad image
        return f"cannot decode ({type(exc).__name__})"


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


def output_columns(class_names: tuple[str, ...] | list[str]) -> list[str]:
    """The answer's columns: a model of more than two classes adds each class's probability (``p_<class>``)."""
    return [*OUTPUT_COLUMNS, *class_columns(class_names)]


def signature(class_names: tuple[str, ...] | list[str] = ("NORMAL", "PNEUMONIA")) -> Any:
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
                ColSpec("string", "status"),  # ok, refused (out of distribution) or error
                ColSpec("string", "error"),
                *(ColSpec("double", column, required=False) for column in class_columns(class_names)),
            ]
        ),
        params=ParamSchema([ParamSpec("on_error", "string", "raise")]),
    )
