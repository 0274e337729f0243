"""Pneumonia detection pipeline: pure steps shared by the CLI, DVC stages and Prefect flows."""

__version__ = "0.1.0"
