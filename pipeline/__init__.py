"""Pneumonia detection pipeline: pure steps shared by the CLI, DVC stages and Prefect flows."""

from pipeline.core import console, tf_defaults

tf_defaults.apply()  # before anything imports TensorFlow: it reads them once, at load
console.configure()  # before anything imports TensorFlow: its start-up noise stays off unless PNEUMO_VERBOSE=1
__version__ = "0.1.0"
