"""Patient ids and subtypes from Kermany file names."""

from __future__ import annotations

import pytest

from pipeline.data.naming import patient_id, subtype


@pytest.mark.parametrize(
    ("name", "patient", "label", "kind"),
    [
        ("person123_bacteria_456.jpeg", "person123", "PNEUMONIA", "bacteria"),
        ("person123_virus_789.jpeg", "person123", "PNEUMONIA", "virus"),
        ("person447_virus_921_1.jpeg", "person447", "PNEUMONIA", "virus"),
        ("IM-0115-0001.jpeg", "IM-0115", "NORMAL", "none"),
        ("NORMAL2-IM-0588-0001.jpeg", "NORMAL2-IM-0588", "NORMAL", "none"),
        ("NORMAL2-IM-1294-0001-0002.jpeg", "NORMAL2-IM-1294", "NORMAL", "none"),
        ("IM-0523-0001-0003.jpeg", "IM-0523", "NORMAL", "none"),
        ("scan_0001.png", "scan_0001", "PNEUMONIA", "unknown"),
        # Renamed or lower-cased copies keep the archive's id, so one child stays one patient
        ("Person7_Bacteria_2.jpeg", "person7", "PNEUMONIA", "bacteria"),
        ("PERSON7_VIRUS_3.JPEG", "person7", "PNEUMONIA", "virus"),
        ("im-0115-0001.jpeg", "IM-0115", "NORMAL", "none"),
        ("normal2-im-0588-0001.jpg", "NORMAL2-IM-0588", "NORMAL", "none"),
    ],
)
def test_names(name: str, patient: str, label: str, kind: str) -> None:
    assert patient_id(name) == patient
    assert subtype(name, label) == kind
