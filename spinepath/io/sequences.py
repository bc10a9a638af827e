"""The MR sequence of a series from its acquisition: T1, T2, fat-suppressed (STIR/TIRM/fat sat), PD or unknown.

Rules (times, flip angles, fat-saturation options, description patterns) live in
``spinepath/configs/sequence_rules.json``. The acquisition decides; the SeriesDescription is only the
tie-breaker when the timing is missing or ambiguous, and every result says which attributes decided it.
Single-frame headers and Enhanced MR objects (shared or first per-frame functional groups) are both read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom

from spinepath.core.config import config_file

SEQUENCE_RULES = config_file("sequence_rules.json")
#: The classes, in the order the product prefers them for grading (T2 first, then T1).
SEQUENCES = ("t2", "t1", "fat_suppressed", "pd", "unknown")


@dataclass(frozen=True)
class Sequence:
    """A series' sequence class and why.

    Attributes:
        kind: One of :data:`SEQUENCES`.
        reason: The attributes and values that decided, e.g. ``"spin echo TR 3500 TE 100"``.
        by_description: True when only the SeriesDescription decided.

    """

    kind: str
    reason: str
    by_description: bool = False

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"kind": self.kind, "reason": self.reason, "by_description": self.by_description}


def load_sequence_rules(path: str | Path = SEQUENCE_RULES) -> dict:
    """The rules of ``sequence_rules.json``."""
    return json.loads(Path(path).read_text())


def _values(x) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str | bytes):
        x = str(x).replace("/", "\\").split("\\")
    return [str(v).strip().upper() for v in x if str(v).strip()]


def _number(x) -> float | None:
    try:
        return float(x) if x not in (None, "") else None
    except (TypeError, ValueError):
        return None


def acquisition(ds: pydicom.Dataset) -> dict:
    """TR, TE, TI (ms), flip angle, scanning sequence, variant and options of a header.

    Legacy Converted Enhanced MR: the single-frame attributes in the unassigned converted attributes groups.
    Enhanced MR (``SharedFunctionalGroupsSequence`` / ``PerFrameFunctionalGroupsSequence``): MR Timing and
    Related Parameters (TR, flip angle), MR Echo (effective echo time), MR Modifier (inversion recovery,
    inversion times) and the image-level EchoPulseSequence / InversionRecovery / spectrally selected
    suppression attributes.
    """
    groups = [g for key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
              for g in (ds.get(key) or [])[:1]]
    # Legacy Converted Enhanced MR keeps the single-frame attributes in the "unassigned converted" groups
    legacy = [item for g in groups for key in ("UnassignedSharedConvertedAttributesSequence",
                                               "UnassignedPerFrameConvertedAttributesSequence")
              for item in (g.get(key) or [])[:1]]

    def get(keyword: str):
        for source in (ds, *legacy):
            value = source.get(keyword)
            if value not in (None, ""):
                return value
        return None

    out = {
        "tr": _number(get("RepetitionTime")), "te": _number(get("EchoTime")),
        "ti": _number(get("InversionTime")), "flip": _number(get("FlipAngle")),
        "scanning": _values(get("ScanningSequence")), "variant": _values(get("SequenceVariant")),
        "options": _values(get("ScanOptions")),
    }
    for g in groups:
        for t in g.get("MRTimingAndRelatedParametersSequence") or []:
            out["tr"] = out["tr"] if out["tr"] is not None else _number(t.get("RepetitionTime"))
            out["flip"] = out["flip"] if out["flip"] is not None else _number(t.get("FlipAngle"))
        for e in g.get("MREchoSequence") or []:
            out["te"] = out["te"] if out["te"] is not None else _number(e.get("EffectiveEchoTime"))
        for m in g.get("MRModifierSequence") or []:
            times = m.get("InversionTimes")
            if out["ti"] is None and times:
                out["ti"] = _number(times if isinstance(times, int | float | str) else list(times)[0])
            if str(m.get("InversionRecovery", "")).upper() == "YES" and "IR" not in out["scanning"]:
                out["scanning"].append("IR")
    pulse = str(ds.get("EchoPulseSequence", "")).upper()  # Enhanced MR: SPIN, GRADIENT, BOTH
    if pulse and not out["scanning"]:
        out["scanning"] = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(pulse, [])
    if str(ds.get("InversionRecovery", "")).upper() == "YES" and "IR" not in out["scanning"]:
        out["scanning"].append("IR")
    suppression = _values(ds.get("SpectrallySelectedSuppression"))  # Enhanced MR: FAT, WATER, FAT_AND_WATER
    if any(s.startswith("FAT") for s in suppression):
        out["options"].append("FAT_SAT")
    return out


def classify_sequence(ds: pydicom.Dataset, rules: dict | None = None) -> Sequence:
    """Class one MR series from one of its headers (see the module docstring)."""
    rules = rules or load_sequence_rules()
    a = acquisition(ds)
    tr, te, ti, flip = a["tr"], a["te"], a["ti"], a["flip"]
    lo, hi = rules["inversion_short_tau_ms"]
    if ti is not None and lo <= ti <= hi and ("IR" in a["scanning"] or not a["scanning"]):
        return Sequence("fat_suppressed", f"inversion recovery TI {ti:g} (short tau)")
    fat = sorted(set(a["options"]) & {o.upper() for o in rules["fat_saturation_scan_options"]})
    if fat:
        return Sequence("fat_suppressed", f"ScanOptions {'/'.join(fat)}")
    kind, reason = "unknown", "no repetition or echo time"
    if tr is not None and te is not None:
        gradient = "GR" in a["scanning"] and "SE" not in a["scanning"]
        r = rules["gradient_echo" if gradient else "spin_echo"]
        what = "gradient echo" if gradient else "spin echo"
        reason = f"{what} TR {tr:g} TE {te:g}" + (f" flip {flip:g}" if gradient and flip is not None else "")
        if gradient:
            if flip is not None and flip >= r["t1"]["min_flip"] and te <= r["t1"]["max_te"]:
                kind = "t1"
            elif flip is not None and flip <= r["t2"]["max_flip"] and te >= r["t2"]["min_te"]:
                kind = "t2"
        elif tr <= r["t1"]["max_tr"] and te <= r["t1"]["max_te"]:
            kind = "t1"
        elif tr >= r["t2"]["min_tr"] and te >= r["t2"]["min_te"]:
            kind = "t2"
        elif tr >= r["pd"]["min_tr"] and te <= r["pd"]["max_te"]:
            kind = "pd"
        if ti is not None and kind == "t1":
            reason += f" TI {ti:g}"  # T1 FLAIR / inversion-prepared T1
    if kind != "unknown":
        return Sequence(kind, reason)
    description = str(ds.get("SeriesDescription") or "")
    for name, patterns in rules["description_patterns"].items():
        if any(re.search(p, description, re.IGNORECASE) for p in patterns):
            return Sequence(name, f"{reason}; SeriesDescription", by_description=True)
    return Sequence("unknown", reason)
