"""What a Kermany file name says: the patient it belongs to and the pneumonia subtype.

``person123_bacteria_456.jpeg`` -> (``person123``, ``bacteria``); ``IM-0115-0001.jpeg`` ->
(``IM-0115``, ``none``); ``NORMAL2-IM-0588-0001-0002.jpeg`` -> (``NORMAL2-IM-0588``, ``none``).
"""

from __future__ import annotations

import re
from pathlib import PurePath

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


def patient_id(filename: str) -> str:
    """The patient id in a file name; an unknown pattern falls back to the whole stem (one image, one patient)."""
    stem = PurePath(filename).stem
    for pattern in (_PERSON, _IM):
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return stem


def subtype(filename: str, label: str) -> str:
    """``bacteria`` / ``virus`` for pneumonia images whose name says so, ``none`` for NORMAL.

    A PNEUMONIA image whose name carries no subtype is ``unknown``: validation reports it.
    """
    if label == "NORMAL":
        return "none"
    m = _PERSON.match(PurePath(filename).stem)
    return m.group(2).lower() if m else "unknown"
