"""Coded concepts of the DICOM outputs: SNOMED CT vertebra and disc levels, findings, disc grades, degenerative grades.

Codes are spelled out rather than looked up by name in ``pydicom.sr.codedict``: pydicom 2.4 (the MONAI
Label environment) lacks some names and finds several values for others (``Normal``).
"""

from __future__ import annotations

import re

import highdicom as hd
from pydicom.sr.codedict import codes


def _sct(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, "SCT", meaning)


#: SNOMED CT vertebrae (values as in DICOM PS3.16 / pydicom 3's code dictionary).
_VERTEBRAE = {
    "T1": "64864005", "T2": "53733008", "T3": "1626008", "T4": "73071006", "T5": "56401006",
    "T6": "45296009", "T7": "62487009", "T8": "11068009", "T9": "82687006", "T10": "7610001",
    "T11": "12989004", "T12": "23215003", "L1": "66794005", "L2": "14293000", "L3": "36470004",
    "L4": "11994002", "L5": "49668003",
}  # fmt: skip
#: SNOMED CT intervertebral discs.
_DISCS = {
    "T1-T2": "40908007", "T2-T3": "6004007", "T3-T4": "2620004", "T4-T5": "82965004", "T5-T6": "72692000",
    "T6-T7": "74401007", "T7-T8": "28693002", "T8-T9": "9188009", "T9-T10": "113209001",
    "T10-T11": "34959001", "T11-T12": "1537001", "T12-L1": "76206002", "L1-L2": "80064006",
    "L2-L3": "67459009", "L3-L4": "62551000", "L4-L5": "84020006", "L5-S1": "715056000",
}  # fmt: skip
S1_CODE = _sct("65985001", "Bone structure of S1")
VERTEBRA = _sct("51282000", "Vertebra")
ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")

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
NORMAL, ABNORMAL = _sct("17621005", "Normal"), _sct("263654008", "Abnormal")
PROBABILITY = codes.DCM.Probability
NO_UNITS = codes.UCUM.NoUnits


def vertebra_code(level: str) -> hd.sr.CodedConcept:
    """SNOMED CT code of a vertebral level (``"L3"`` -> L3 vertebra).

    Raises:
        ValueError: For an unknown level name.

    """
    if level == "S1":
        return S1_CODE
    if level not in _VERTEBRAE:
        raise ValueError(f"no SNOMED CT code for vertebral level {level!r}")
    return _sct(_VERTEBRAE[level], f"{level} vertebra")


def disc_code(level: str) -> hd.sr.CodedConcept:
    """SNOMED CT code of an intervertebral disc (``"L4-L5"`` -> L4/L5 disc).

    Raises:
        ValueError: For an unknown disc name.

    """
    if level not in _DISCS:
        raise ValueError(f"no SNOMED CT code for disc {level!r}")
    return _sct(_DISCS[level], level.replace("-", "/") + " disc")


#: Review status of a finding (qualitative evaluation): Yes / No (SNOMED CT), with coded reasons (private).
NEEDS_REVIEW = hd.sr.CodedConcept("REVIEW", SCHEME, "Needs review")
YES, NO = _sct("373066001", "Yes"), _sct("373067005", "No")
REVIEW_REASON = hd.sr.CodedConcept("REVIEWWHY", SCHEME, "Reason for review")
REVIEW_REASON_CODES = {
    "no_anchor": hd.sr.CodedConcept("NOANCHOR", SCHEME, "Level named without a sacral anchor"),
    "name_confidence": hd.sr.CodedConcept("NAMECONF", SCHEME, "Low level-name confidence"),
    "detection_score": hd.sr.CodedConcept("DETSCORE", SCHEME, "Low detection score"),
    "field_of_view": hd.sr.CodedConcept("FOVCUT", SCHEME, "Cut by the field of view"),
    "near_threshold": hd.sr.CodedConcept("NEARTHR", SCHEME, "Probability near its decision threshold"),
    "grade_ambiguous": hd.sr.CodedConcept("GRADEAMB", SCHEME, "Two grades nearly equally likely"),
    "low_predictive_value": hd.sr.CodedConcept("LOWPPV", SCHEME, "Positive call of low predictive value"),
    "transitional": hd.sr.CodedConcept("TRANSIT", SCHEME, "Transitional lumbosacral vertebra suspected"),
    "image_quality": hd.sr.CodedConcept("IMGQUAL", SCHEME, "Image quality outside the training range"),
    "sequence": hd.sr.CodedConcept("SEQUENCE", SCHEME, "Sequence not known from the acquisition"),
    "without_t2": hd.sr.CodedConcept("NOT2", SCHEME, "Graded without the T2 the grade is defined on"),
    "measurement_near_threshold": hd.sr.CodedConcept("MEASTHR", SCHEME, "Measurement near a grade boundary"),
    "partly_segmented": hd.sr.CodedConcept("PARTSEG", SCHEME, "Structure partly segmented, not measured"),
    "flagged_findings": hd.sr.CodedConcept("FLAGGED", SCHEME, "Findings flagged for review"),
}

# ------------------------------------------------------------------------- degenerative findings (SPIDER grader)
#: Finding type of a disc's degenerative grades: SNOMED CT "Degeneration of intervertebral disc" (disorder).
DISC_DEGENERATION = _sct("77547008", "Degeneration of intervertebral disc")
PRESENT, ABSENT = _sct("52101004", "Present"), _sct("272519000", "Absent")
#: The Pfirrmann grade (a five-point scale with no standard codes): private name and coded values.
PFIRRMANN_GRADE = hd.sr.CodedConcept("PFIRRMANN", SCHEME, "Pfirrmann grade")
PFIRRMANN_CODES = {g: hd.sr.CodedConcept(f"PFIRRMANN{g}", SCHEME, f"Pfirrmann grade {r}")
                   for g, r in zip(range(1, 6), ("I", "II", "III", "IV", "V"))}
#: Modic type of the endplates next to a disc (private: no verified SNOMED CT concept per type).
MODIC_TYPE = hd.sr.CodedConcept("MODIC", SCHEME, "Modic change type")
MODIC_CODES = {0: hd.sr.CodedConcept("MODIC0", SCHEME, "No Modic change"),
               **{t: hd.sr.CodedConcept(f"MODIC{t}", SCHEME, f"Modic type {t} change") for t in (1, 2, 3)}}
#: Each binary degenerative finding (``DegenerationFinding.binary`` keys and ``modic_any``) as a concept whose
#: value is Present / Absent. SNOMED CT where this project could verify the concept (spondylolisthesis
#: 274152003, herniation of intervertebral disc 73589001); private otherwise. SPIDER's endplate change includes
#: Schmorl's nodes with other endplate irregularities, so it is not coded as a Schmorl's node.
DEGENERATION_CODES = {
    "upper_endplate_change": hd.sr.CodedConcept("EPUPPER", SCHEME, "Upper endplate change (Schmorl's node included)"),
    "lower_endplate_change": hd.sr.CodedConcept("EPLOWER", SCHEME, "Lower endplate change (Schmorl's node included)"),
    "spondylolisthesis": _sct("274152003", "Spondylolisthesis"),
    "herniation": _sct("73589001", "Herniation of intervertebral disc"),
    "narrowing": hd.sr.CodedConcept("DISCNARROW", SCHEME, "Disc space narrowing"),
    "bulging": hd.sr.CodedConcept("DISCBULGE", SCHEME, "Disc bulging"),
    "modic_any": hd.sr.CodedConcept("MODICANY", SCHEME, "Modic change"),
}  # fmt: skip
#: Probability of each finding (numeric measurement names; private, one per finding).
DEGENERATION_PROBABILITY_CODES = {
    k: hd.sr.CodedConcept(code, SCHEME, f"Probability of {words}")
    for k, code, words in (("upper_endplate_change", "PEPUPPER", "upper endplate change"),
                           ("lower_endplate_change", "PEPLOWER", "lower endplate change"),
                           ("spondylolisthesis", "PLISTHESIS", "spondylolisthesis"),
                           ("herniation", "PHERNIATION", "disc herniation"),
                           ("narrowing", "PNARROWING", "disc space narrowing"),
                           ("bulging", "PBULGING", "disc bulging"), ("modic_any", "PMODIC", "a Modic change"))
}


#: The spinal canal (SNOMED CT 61853006, as in pydicom's DICOM code tables: "Spinal canal structure").
SPINAL_CANAL = _sct("61853006", "Spinal canal")
#: Units of the measurements (UCUM).
MM, RATIO, DEGREE, PERCENT = codes.UCUM.Millimeter, codes.UCUM.Ratio, codes.UCUM.Degree, codes.UCUM.Percent
#: Measurement names (private: no SNOMED CT / DCM concept names these spine measurements) with their units,
#: keyed like the JSON (``measurements`` of :mod:`spinepath.measurements.spine`).
MEASUREMENT_CODES: dict[str, tuple[hd.sr.CodedConcept, object]] = {
    "body_anterior": (hd.sr.CodedConcept("BHANT", SCHEME, "Anterior vertebral body height"), MM),
    "body_middle": (hd.sr.CodedConcept("BHMID", SCHEME, "Middle vertebral body height"), MM),
    "body_posterior": (hd.sr.CodedConcept("BHPOST", SCHEME, "Posterior vertebral body height"), MM),
    "wedge_ratio": (hd.sr.CodedConcept("WEDGE", SCHEME, "Vertebral body wedge ratio"), RATIO),
    "biconcavity_ratio": (hd.sr.CodedConcept("BICONC", SCHEME, "Vertebral body biconcavity ratio"), RATIO),
    "height_loss": (hd.sr.CodedConcept("HLOSS", SCHEME, "Vertebral body height loss"), RATIO),
    "canal_ap_mid_body": (hd.sr.CodedConcept("CANALAPB", SCHEME, "Spinal canal AP diameter at mid-body"), MM),
    "disc_anterior": (hd.sr.CodedConcept("DHANT", SCHEME, "Anterior disc height"), MM),
    "disc_middle": (hd.sr.CodedConcept("DHMID", SCHEME, "Middle disc height"), MM),
    "disc_posterior": (hd.sr.CodedConcept("DHPOST", SCHEME, "Posterior disc height"), MM),
    "disc_height_index": (hd.sr.CodedConcept("DHI", SCHEME, "Disc height index"), RATIO),
    "t2_signal_ratio": (hd.sr.CodedConcept("T2CSF", SCHEME, "Disc to CSF T2 signal ratio"), RATIO),
    "canal_ap": (hd.sr.CodedConcept("CANALAPD", SCHEME, "Spinal canal AP diameter at the disc"), MM),
    "listhesis_offset": (hd.sr.CodedConcept("SLIPMM", SCHEME, "Listhesis offset"), MM),
    "listhesis_percent": (hd.sr.CodedConcept("SLIPPCT", SCHEME, "Listhesis offset of the endplate length"),
                          PERCENT),
    "lordosis": (hd.sr.CodedConcept("LORDOSIS", SCHEME, "Lumbar lordosis angle L1-S1"), DEGREE),
}
#: The derived flags of the measurements (qualitative evaluation "Measurement flag"; private values).
MEASUREMENT_FLAG = hd.sr.CodedConcept("MEASFLAG", SCHEME, "Measurement flag")
LUMBAR_SPINE = _sct("122496007", "Lumbar spine")


def flag_code(flag: str) -> hd.sr.CodedConcept:
    """The coded value of a measurement flag of :meth:`spinepath.core.results.SpineSegmentation.flags`.

    Raises:
        ValueError: For a flag this version does not write.

    """
    patterns = ((r"height loss \(Genant grade (\d)\)", "GENANT{}"), (r"wedge", "WEDGE"), (r"narrowing", "NARROW"),
                (r"canal stenosis \((absolute|relative)\) at mid-body", "STEN{}B"),
                (r"canal stenosis \((absolute|relative)\)", "STEN{}D"), (r"listhesis Meyerding ([IV]+)", "MEYER{}"))
    for pat, value in patterns:
        m = re.fullmatch(pat, flag)
        if m:
            code = value.format(*(g[:3].upper() for g in m.groups()))
            return hd.sr.CodedConcept(code, SCHEME, flag[0].upper() + flag[1:])
    raise ValueError(f"unknown measurement flag {flag!r}")
