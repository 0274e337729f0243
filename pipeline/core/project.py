"""The project folder, for state that outlives a DVC experiment's workspace (the MLflow store, its
artifacts, the registration lock) and for data read from outside DVC (data.local_path, the Kaggle
download, stress.originals).

DVC runs a queued or ``--temp`` experiment in a throwaway copy of the project, ``<root>/.dvc/tmp/exps/tmpXXXX/``,
and brings back only its outputs: relative paths in params.yaml for anything else must still mean
``<root>``, or the experiment's MLflow runs and registered versions are deleted with the copy.
"""

from __future__ import annotations

from pathlib import Path

DVC_EXPERIMENT_COPIES = (".dvc", "tmp", "exps")


def project_root(cwd: Path | None = None) -> Path:
    """The current folder, or the project whose DVC experiment copy it is in."""
    here = (cwd or Path.cwd()).resolve()
    for folder in here.parents:
        if folder.parts[-len(DVC_EXPERIMENT_COPIES) :] == DVC_EXPERIMENT_COPIES:
            return folder.parents[len(DVC_EXPERIMENT_COPIES) - 1]
    return here


def project_path(path: str | Path, cwd: Path | None = None) -> Path:
    """`path` made absolute against project_root() (an absolute path as it is)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root(cwd) / path
