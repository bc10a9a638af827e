"""Review stage: which findings a radiologist must check, and why (``needs_review`` with reasons).

After detection, naming and (when graded) fusion, every vertebra and disc, and the study, get a flag and the
reasons behind it: a name without a sacral anchor or of low confidence, a low detection score, a vertebra cut
by the field of view, a probability near its threshold, a graded measurement near a grade boundary, and image
quality outside the training range (signal to noise, in-plane resolution, slice thickness, a field of view
missing part of L1-S1, a sequence not known from the acquisition). Thresholds live in ``spinepath/configs/review.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import convolve

from spinepath.core.config import config_file
from spinepath.core.results import (
    DetectionResult,
    Vertebra,
    key_slice,
    narrowing_ratios,
)
from spinepath.core.thresholds import GRADE_BOUNDARIES, NARROWING_LEVELS, POSITIVE, graded_slip
from spinepath.grading.calibration import disc_grade_margin, logit
from spinepath.measurements.spine import NOT_GRADED, PARTIAL

REVIEW_RULES = config_file("review.json")


@lru_cache(maxsize=4)
def load_review_rules(path: str | Path = REVIEW_RULES) -> dict:
    """The rules of ``review.json`` (cached)."""
    return json.loads(Path(path).read_text())


#: Reason kinds (coded in the SR; ``spinepath.outputs.coding.REVIEW_REASON_CODES``).
REASON_KINDS = ("no_anchor", "name_confidence", "detection_score", "field_of_view", "near_threshold",
                "grade_ambiguous", "low_predictive_value", "transitional", "image_quality", "sequence",
                "without_t2", "measurement_near_threshold", "partly_segmented", "flagged_findings")


@dataclass
class Flag:
    """Whether one item needs review, and why (each reason with its kind, one of :data:`REASON_KINDS`)."""

    reasons: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def add(self, kind: str, reason: str, first: bool = False) -> None:
        """Add a reason of a kind (at the front with ``first``)."""
        i = 0 if first else len(self.reasons)
        self.reasons.insert(i, reason)
        self.kinds.insert(i, kind)

    @property
    def needs_review(self) -> bool:
        """True when there is a reason."""
        return bool(self.reasons)

    def to_dict(self) -> dict:
        """``{"needs_review", "review_reasons"}``."""
        return {"needs_review": self.needs_review, "review_reasons": list(self.reasons)}


@dataclass
class Review:
    """The review of one study.

    Attributes:
        study: Study-level reasons (naming, image quality, field of view, sequence) and the flagged count.
        vertebrae: Per vertebra, aligned with ``result.vertebrae``.
        discs: Per disc level (``"L4-L5"``).
        quality: The measured image quality (signal-to-noise, pixel and slice size, levels in view).
        measurements: Per section of the measurements (``vertebrae`` / ``discs`` / ``listhesis``) and level, the
            measured findings near a grade boundary (also on the level's own vertebra or disc flag).

    """

    study: Flag
    vertebrae: list[Flag]
    discs: dict[str, Flag]
    quality: dict
    measurements: dict[str, dict[str, Flag]] = field(default_factory=dict)

    def vertebra(self, track: Vertebra, result: DetectionResult) -> Flag:
        """The flag of one of ``result``'s vertebrae."""
        return self.vertebrae[result.vertebrae.index(track)]

    def measurement_dicts(self) -> dict[str, dict[str, dict]]:
        """The measurements' own review per section and measured level (also in the level's vertebra / disc flag).

        Returns:
            ``{"vertebrae" | "discs" | "listhesis": {level: {"needs_review", "review_reasons"}}}``.

        """
        return {sec: {lv: f.to_dict() for lv, f in flags.items()} for sec, flags in self.measurements.items()}


def noise_sigma(image: np.ndarray) -> float:
    """Gaussian noise standard deviation of a 2D image (Immerkaer 1996: Laplacian-difference mask, mean |.|)."""
    img = np.asarray(image, np.float64)
    if min(img.shape) < 3:
        return 0.0
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], float)
    r = convolve(img, mask, mode="reflect")[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(r).sum() / (6.0 * r.size))


def signal_to_noise(result: DetectionResult) -> float | None:
    """Median intensity inside the vertebral bodies on the key slice over the image's noise sigma."""
    if not result.vertebrae:
        return None
    k = key_slice(result)
    sl = result.volume.pixels[k]
    inside = [sl[int(b[0]):int(np.ceil(b[2])), int(b[1]):int(np.ceil(b[3]))].ravel()
              for t in result.vertebrae if (b := t.box_on(k)) is not None]
    inside = [x for x in inside if x.size]
    sigma = noise_sigma(sl)
    if not inside or sigma <= 0:
        return None
    return float(np.median(np.concatenate(inside)) / sigma)


def image_quality(result: DetectionResult, flag: Flag, rules: dict | None = None) -> dict:
    """Measured quality; the study-level reasons it gives are added to ``flag``."""
    rules = rules or load_review_rules()
    v = result.volume
    snr = signal_to_noise(result)
    pixel = float(max(v.spacing))
    thickness = float(v.slice_thickness or v.slice_spacing) if v.pixels.shape[0] > 1 else None
    named = {t.level for t in result.vertebrae}
    missing = [lv for lv in rules["required_levels"] if lv not in named]
    q = {"signal_to_noise": None if snr is None else round(snr, 2), "pixel_mm": round(pixel, 3),
         "slice_thickness_mm": None if thickness is None else round(thickness, 3), "levels_missing": missing}
    if snr is not None and snr < rules["min_signal_to_noise"]:
        flag.add("image_quality",
                 f"signal-to-noise {snr:.1f} below the training range (>= {rules['min_signal_to_noise']:g})")
    if pixel > rules["max_pixel_mm"]:
        flag.add("image_quality", f"in-plane resolution {pixel:.2f} mm coarser than {rules['max_pixel_mm']:g} mm")
    if thickness is not None and thickness > rules["max_slice_mm"]:
        flag.add("image_quality", f"slices {thickness:.1f} mm thicker than {rules['max_slice_mm']:g} mm")
    if missing:
        flag.add("field_of_view", f"field of view misses {', '.join(missing)} (of {rules['required_levels'][0]}-"
                                  f"{rules['required_levels'][-1]})")
    main = v.selection.get("main") if v.selection else None
    if main is not None:
        seq = main.get("sequence", {})
        if seq.get("kind") == "unknown":
            flag.add("sequence", f"unknown sequence ({seq.get('reason', 'no timing')}): the models are trained on T2")
        elif seq.get("by_description"):
            flag.add("sequence", "sequence known from the series description only (no repetition / echo time)")
    return q


_FORMATS = {"%": "{:.1%}".format, "mm": "{:.1f} mm".format, "": "{:.2f}".format}


def uncertain_call(kind: str, value: float, margin: float) -> float | None:
    """The grade boundary within ``margin`` of a reported finding's value (its grade in doubt), else None.

    Args:
        kind: A key of :data:`spinepath.core.thresholds.GRADE_BOUNDARIES`.
        value: The measured value (a slip's size: its absolute offset).
        margin: How far the value may be off (``measurement_margin`` of ``configs/review.json``).

    """
    if not POSITIVE[kind](value):
        return None
    b = min(GRADE_BOUNDARIES[kind], key=lambda x: abs(value - x))
    return b if abs(value - b) < margin else None


def measurement_reasons(measurements: dict, margins: dict[str, float]) -> dict[str, dict[str, list[str]]]:
    """Reported measurement findings whose value lies within its margin of a grade boundary, per level.

    A finding (height loss, wedge, disc narrowing, canal stenosis, listhesis) is reported from a value and a
    boundary; each kind's margin is a percentile of the difference between the value from the predicted and
    from the reference masks on the selection patients (``scripts/measurement_margin.py``): nearer its boundary
    than that, the finding may have another grade or none. Canal diameters are checked where they are graded
    (lumbar levels); a slip where it is graded (against the body below). Values without a finding are not
    flagged (the disc narrowing ratio's error would flag most discs).

    Returns:
        ``{"vertebrae" | "discs" | "listhesis": {level: [reason, ...]}}`` (the sections of the measurements).

    """
    out: dict[str, dict[str, list[str]]] = {"vertebrae": {}, "discs": {}, "listhesis": {}}

    def check(section: str, level: str, kind: str, value: float | None, what: str, unit: str) -> None:
        if value is None or kind not in margins:
            return
        b = uncertain_call(kind, value, margins[kind])
        if b is not None:
            fmt = _FORMATS[unit]
            out[section].setdefault(level, []).append(
                f"{what} {fmt(value)} near the {fmt(b)} grade boundary (the measurement's error reaches "
                f"{fmt(margins[kind])})")

    for lv, e in measurements.get("vertebrae", {}).items():
        check("vertebrae", lv, "height_loss", e.get("height_loss"), "height loss", "%")
        check("vertebrae", lv, "wedge_ratio", e.get("wedge_ratio"), "wedge ratio", "")
        c = e.get("canal_ap_mid_body") or {}
        if c.get("stenosis") not in (None, NOT_GRADED):
            check("vertebrae", lv, "canal_ap_mm", c["mm"], "canal AP at mid-body", "mm")
    discs = measurements.get("discs", {})
    for lv, r in narrowing_ratios(discs).items():
        if lv in NARROWING_LEVELS:  # graded there only
            check("discs", lv, "narrowing_ratio", r, "disc height ratio to the neighbours", "")
    for lv, e in discs.items():
        c = e.get("canal_ap") or {}
        if c.get("stenosis") not in (None, NOT_GRADED):
            check("discs", lv, "canal_ap_mm", c["mm"], "canal AP", "mm")
    for lv, e in measurements.get("listhesis", {}).items():
        if graded_slip(e):
            check("listhesis", lv, "listhesis_mm", abs(e["offset_mm"]), "slip", "mm")
    return out


def review(result: DetectionResult, rules: dict | None = None) -> Review:
    """Flag the study and each of its findings; sets and returns ``result.review``."""
    rules = rules or load_review_rules()
    naming = result.naming
    unanchored = naming is not None and naming.anchor == "none"
    graded = {f.level: f for f in result.findings.vertebrae} if result.findings is not None else {}
    flags: list[Flag] = []
    for t in result.vertebrae:
        fl = Flag()
        if unanchored:
            fl.add("no_anchor", "named without a sacral anchor")
        elif t.name_confidence < rules["min_name_confidence"]:
            fl.add("name_confidence", f"name confidence {t.name_confidence:.2f} < {rules['min_name_confidence']:g}")
        if t.score < rules["min_detection_score"]:
            fl.add("detection_score", f"detection score {t.score:.2f} < {rules['min_detection_score']:g}")
        if t.truncated:
            fl.add("field_of_view", "cut by the field of view")
        f = graded.get(t.level)
        if f is not None and abs(f.probability - f.threshold) < rules["probability_margin"]:
            fl.add("near_threshold", f"pathology probability {f.probability:.2f} near its threshold {f.threshold:.2f}")
        flags.append(fl)
    by_level = {t.level: fl for t, fl in zip(result.vertebrae, flags)}
    discs: dict[str, Flag] = {}
    decision = (result.findings.model or {}).get("disc_decision", "argmax") if result.findings is not None else ""
    for d in result.findings.discs if result.findings is not None else []:
        fl = Flag()
        for lv in d.level.split("-"):
            own = by_level.get(lv, Flag())
            for kind, reason in zip(own.kinds, own.reasons):
                if kind in ("no_anchor", "name_confidence"):
                    fl.add(kind, f"{lv} {reason}")
                    break
        margin = disc_grade_margin(d.probabilities, decision)
        limit = rules["disc_grade_margin"][decision]
        if margin < limit:
            what = "the two likeliest grades" if decision == "argmax" else "the expected grade"
            fl.add("grade_ambiguous", f"Spark grade {d.grade} undecided: {what} {margin:.2f} from the next grade "
                                      f"(< {limit:g})")
        discs[d.level] = fl
    for g in result.findings.degeneration if result.findings is not None else []:
        fl = discs.setdefault(g.level, Flag())
        for name, p in [*g.binary.items(), ("modic_any", g.modic_any)]:
            thr = g.thresholds.get(name, 0.5)
            if abs(float(logit(p) - logit(thr))) < rules["degeneration_logit_margin"].get(name, 0.0):
                fl.add("near_threshold", f"{name.replace('_', ' ')} probability {p:.3f} near its threshold {thr:.3f}")
            ppv = rules.get("degeneration_oof_ppv", {}).get(name)
            if g.evidence.get(name, {}).get("rule") == "combined":  # decided with a measurement: its own PPV
                ppv = g.evidence[name].get("oof_ppv", ppv)
            if ppv is not None and ppv < rules.get("degeneration_min_ppv", 0.0) and g.positive(name):
                # a rare finding's positive call: most such calls were not confirmed out of fold
                fl.add("low_predictive_value", f"{name.replace('_', ' ')} suspected: out of fold {ppv:.0%} of such "
                                               "calls were confirmed")
        if "t2" not in g.sequences:  # a disc of the T1's chain beyond the T2's: Pfirrmann is defined on a T2
            fl.add("without_t2", f"Pfirrmann {g.pfirrmann} estimated from the T1 alone: the grade is defined on the "
                                 "T2 signal, and the T2 did not show this disc")
        exp = float(np.dot(g.pfirrmann_probabilities, np.arange(1, 6)))
        if abs(abs(exp - np.floor(exp)) - 0.5) < rules["disc_grade_margin"]["ordinal"]:
            fl.add("grade_ambiguous", f"Pfirrmann {g.pfirrmann} undecided: expected grade {exp:.2f}")
    seg = result.segmentation
    measured: dict[str, dict[str, Flag]] = {}
    if seg is not None:
        found = measurement_reasons(seg.measurements, rules.get("measurement_margin", {}))
        for sec in ("vertebrae", "discs", "listhesis"):
            measured[sec] = {lv: Flag() for lv in seg.measurements.get(sec, {})}
            for lv, reasons in found[sec].items():
                # also on the level's own flag: the vertebra, or the disc (a slip is between two bodies)
                own = by_level.get(lv) if sec == "vertebrae" else discs.setdefault(lv, Flag())
                for reason in reasons:
                    measured[sec][lv].add("measurement_near_threshold", reason)
                    if own is not None:
                        own.add("measurement_near_threshold", reason)
        for lv, why in seg.measurements.get("not_measured", {}).items():
            if why == PARTIAL and lv in by_level:  # a missed body: no measurement where one was expected
                by_level[lv].add("partly_segmented", "body partly segmented on the key slice: not measured")
    study = Flag()
    if not result.vertebrae:
        study.add("detection_score", "no vertebra found")
    if naming is not None and naming.note:
        study.add("no_anchor" if naming.anchor == "none" else "transitional", naming.note)
    quality = image_quality(result, study, rules)
    n = sum(f.needs_review for f in flags) + sum(f.needs_review for f in discs.values())
    if n:
        study.add("flagged_findings", f"{n} finding{'s' * (n > 1)} flagged for review")
    result.review = Review(study, flags, discs, quality, measured)
    return result.review
