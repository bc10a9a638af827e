"""Coded concepts of the DICOM outputs: SNOMED CT vertebra and disc levels, findings and disc grades."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

#: Private coding scheme of the disc grades (the Spark challenge's v1-v5 scheme has no standard codes).
SCHEME = "99SPINEPATH"
DISC_GRADE_CODES = {
    "v1": hd.sr.CodedConcept("v1", SCHEME, "Normal disc"),
    "v2": hd.sr.CodedConcept("v2", SCHEME, "Disc bulge"),
    "v3": hd.sr.CodedConcept("v3", SCHEME, "Disc protrusion"),
    "v4": hd.sr.CodedConcept("v4", SCHEME, "Disc extrusion"),
    "v5": hd.sr.CodedConcept("v5", SCHEME, "Schmorl's node"),
}
DISC_GRADE_NAME = hd.sr.CodedConcept("DISCGRADE", SCHEME, "Intervertebral disc grade")
#: Qualitative evaluation of a structure, values Normal / Abnormal (SNOMED CT). Not DCM 121071 "Finding":
#: TID 1501 uses that concept for the finding type.
FINDING = hd.sr.CodedConcept("ASSESSMENT", SCHEME, "Pathology assessment")
NORMAL, ABNORMAL = codes.SCT.Normal, codes.SCT.Abnormal
PROBABILITY = codes.DCM.Probability
NO_UNITS = codes.UCUM.NoUnits
S1_CODE = hd.sr.CodedConcept("65985001", "SCT", "Bone structure of S1")


def vertebra_code(level: str) -> hd.sr.CodedConcept:
    """SNOMED CT code of a vertebral level (``"L3"`` -> L3 vertebra).

    Raises:
        ValueError: For an unknown level name.

    """
    if level == "S1":
        return S1_CODE
    try:
        c = getattr(codes.SCT, f"{level}Vertebra")
    except AttributeError:
        raise ValueError(f"no SNOMED CT code for vertebral level {level!r}") from None
    return hd.sr.CodedConcept(c.value, c.scheme_designator, c.meaning)


def disc_code(level: str) -> hd.sr.CodedConcept:
    """SNOMED CT code of an intervertebral disc (``"L4-L5"`` -> L4/L5 disc).

    Raises:
        ValueError: For an unknown disc name.

    """
    try:
        c = getattr(codes.SCT, level.replace("-", "") + "Disc")
    except AttributeError:
        raise ValueError(f"no SNOMED CT code for disc {level!r}") from None
    return hd.sr.CodedConcept(c.value, c.scheme_designator, c.meaning)
