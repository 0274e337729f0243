"""What a Kermany file name says: the patient it belongs to and the pneumonia subtype.

``person123_bacteria_456.jpeg`` -> (``person123``, ``bacteria``); ``IM-0115-0001.jpeg`` ->
(``IM-0115``, ``none``); ``NORMAL2-IM-0588-0001-0002.jpeg`` -> (``NORMAL2-IM-0588``, ``none``).
Ids take the archive's letter case whatever the name's (``Person123`` -> ``person123``, ``im-0115`` ->
``IM-0115``), so a renamed or lower-cased copy of a child's file stays that child.

A patient id is unique only within one numbering: the official ``val/`` folder continues ``train/``'s,
while ``test/`` numbers its own patients (``person100`` in train and in test are different children).
The index therefore keys patients by numbering scope: ``train/person100`` vs ``test/person100``.
"""

from __future__ import annotations

import re
from pathlib import PurePath

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


def named_patient(filename: str) -> str | None:
    """The patient id a Kermany file name gives, or None for a name of another pattern."""
    stem = PurePath(filename).stem
    # In the archive's own letter case, so a renamed or lower-cased copy of a child's file stays that child
    if m := _PERSON.match(stem):
        return m.group(1).lower()
    if m := _IM.match(stem):
        return m.group(1).upper()
    return None


def patient_id(filename: str) -> str:
    """The patient id in a file name; an unknown pattern falls back to the whole stem (one image, one patient)."""
    return named_patient(filename) or PurePath(filename).stem


def scoped_patient_id(filename: str, folder: str, scopes: dict[str, str]) -> str:
    """``<scope>/<patient id>``: the folder's numbering scope (``index.patient_scopes``) and the id in the name."""
    try:
        scope = scopes[folder]
    except KeyError:
        raise ValueError(f"index.patient_scopes: no numbering scope for folder {folder!r}") from None
    return f"{scope}/{patient_id(filename)}"


def subtype(filename: str, label: str) -> str:
    """``bacteria`` / ``virus`` for pneumonia images whose name says so, ``none`` for NORMAL.

    A PNEUMONIA image whose name carries no subtype is ``unknown``: validation reports it.
    """
    if label == "NORMAL":
        return "none"
    m = _PERSON.match(PurePath(filename).stem)
    return m.group(2).lower() if m else "unknown"


def is_junk(relative: PurePath) -> bool:
    """A path (relative to the folder searched) that is no X-ray whatever its suffix: under ``__MACOSX`` or
    hidden (``.DS_Store``, macOS's ``._name.jpeg`` resource forks, ``.git``)."""
    return any(part == "__MACOSX" or part.startswith(".") for part in relative.parts)
