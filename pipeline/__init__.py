"""Pneumonia detection pipeline: pure steps shared by the CLI, DVC stages and Prefect flows."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO/WARNING lines drown the progress
__version__ = "0.1.0"
