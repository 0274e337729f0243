"""A quiet console by default: TensorFlow's start-up noise off unless ``pneumo -v`` or PNEUMO_VERBOSE=1.

Runs on ``import pipeline``, before anything imports TensorFlow (its C++ logger reads the
environment once, at import). DVC runs each stage as ``pneumo <stage>`` in a child process, so
``PNEUMO_VERBOSE=1 dvc repro`` reaches every stage.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # oneDNN notice, CUDA stub and cuInit lines, absl pre-init warning
    "GRPC_VERBOSITY": "ERROR",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per model download, many per register
}


def verbose() -> bool:
    return os.environ.get("PNEUMO_VERBOSE", "").lower() in ("1", "true", "yes")


def configure(loud: bool | None = None) -> None:
    """Quiet TensorFlow and chatty library loggers, unless `loud` (default: PNEUMO_VERBOSE)."""
    if loud is None:
        loud = verbose()
    if loud:
        os.environ["PNEUMO_VERBOSE"] = "1"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowImport)]
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database..."
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)  # "Validating input example against ..."


# TensorFlow 2.21 prints these while loading its libraries, before its logger reads TF_CPP_MIN_LOG_LEVEL.
_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
    r"Could not find cuda drivers|cudart_stub|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|TensorFlow binary is optimized to use available CPU"
)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Capture file descriptor 2 (C++ writes there directly) and pass on every line that is not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [line for line in text.splitlines() if line.strip() and not _NOISE.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Wraps the first ``import tensorflow`` in `filtered_stderr`; every other import is untouched."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                with filtered_stderr():
                    load(module)

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
