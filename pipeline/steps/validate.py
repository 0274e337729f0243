"""The validate stage: Great Expectations on the index; unmet expectations stop the pipeline."""

from __future__ import annotations

from pipeline.core.config import Params
from pipeline.core.errors import DataError
from pipeline.data import dataset_index, validation


def run(params: Params) -> str:
    report = validation.validate(dataset_index.read_index(params.index.path), params.validation)
    if not report.success:
        print(report.summary())
        names = "; ".join(f"{c.check} ({c.unexpected} rows)" for c in report.failures)
        raise DataError(f"validation failed: {names}; see {params.validation.report}")
    return report.summary()
