"""Reading the JSON files stages hand each other: one line naming the file when one is not what it should be."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError


def read_json(path: str | Path, remedy: str) -> Any:
    """The JSON in `path`; a file that is not JSON (cut short, edited by hand) is one line naming it and `remedy`."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise PipelineError(f"{path}: not valid JSON ({type(exc).__name__}: {reason}); {remedy}") from None
