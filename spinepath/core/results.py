"""The study result types, which import no stage.

Vertebrae (detected and named), the detection result, the findings per vertebra and disc, the classifier
scores, and the series' mid-sagittal slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spinepath import DISCLAIMER, __version__
from spinepath.core.geometry import SeriesVolume
from spinepath.core.levels import DISC_GRADE_NAMES, DISC_GRADES, DISC_LEVELS
from spinepath.core.thresholds import NARROWING_LEVELS, POSITIVE, STENOSIS_GRADES, graded_slip


@dataclass(eq=False)
class Vertebra:
    """A vertebral body followed across sagittal slices.

    Attributes:
        slices: Slice indices where it is detected (sorted).
        boxes: Box per slice ``[r0, c0, r1, c1]`` (source pixels).
        scores: Detection score per slice.
        s1_scores: S1-class score per slice.
        level: Assigned level name (``"?"`` when it cannot be named).
        name_confidence: Confidence of the name in [0, 1].
        truncated: True when the body touches the top or bottom edge of the field of view.

    """

    slices: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    s1_scores: list[float] = field(default_factory=list)
    level: str = "?"
    name_confidence: float = 0.0
    truncated: bool = False

    @property
    def score(self) -> float:
        """Vertebra score: mean of the best three slice scores."""
        return float(np.mean(sorted(self.scores)[-3:]))

    @property
    def centre(self) -> np.ndarray:
        """Score-weighted mean box centre ``(row, col)`` over the slices."""
        b = np.array(self.boxes)
        w = np.array(self.scores)
        return np.array(
            [np.average((b[:, 0] + b[:, 2]) / 2, weights=w), np.average((b[:, 1] + b[:, 3]) / 2, weights=w)]
        )

    @property
    def central_slice(self) -> float:
        """Its central slice: the score-weighted mean of the slices where it is detected (continuous)."""
        return float(np.average(self.slices, weights=self.scores))

    def add(self, k: int, box: np.ndarray, score: float, s1_score: float) -> None:
        """Append the detection on slice ``k`` (slices must stay sorted; see :func:`_merge_same_level`)."""
        self.slices.append(k)
        self.boxes.append(box)
        self.scores.append(float(score))
        self.s1_scores.append(float(s1_score))

    def box_on(self, k: int) -> np.ndarray | None:
        """The box on slice ``k`` or None."""
        return self.boxes[self.slices.index(k)] if k in self.slices else None


@dataclass
class LevelNaming:
    """How the vertebrae were named, and how far to trust it (``level_naming`` in the JSON).

    Attributes:
        anchor: ``"S1"`` when the sacrum was identified and the names count up from it, ``"none"`` when the
            levels were counted from the lowest vertebra in view (assumed L5) without a sacral anchor.
        anchor_confidence: S1-class probability of the anchor (of the best S1 candidate when ``"none"``).
        n_lumbar: Lumbar-type vertebrae above the anchor as far as the evidence goes: those in view (at most
            5); 4 when the vertebra above S1 is S1-like, 6 when the vertebra named T12 is lumbar-shaped;
            without anchor, the vertebrae named L1-L5.
        transitional_suspected: The vertebra above the anchor scores S1-like too (a sacralised L5, or S1
            taken for S2), or the junction named T12-L1 is shaped like a lumbar one (a sixth lumbar-type
            vertebra): reported, the names are not changed.
        confidence: Confidence of the naming as a whole (the anchor's name confidence).
        evidence: Per candidate (the lowest vertebrae), its S1-class probability; the rule that decided.

    """

    anchor: str
    anchor_confidence: float
    n_lumbar: int
    transitional_suspected: bool
    confidence: float
    evidence: dict = field(default_factory=dict)

    @property
    def note(self) -> str:
        """What a reader of the report must know about the names ('' when anchored and unremarkable)."""
        if self.anchor == "none":
            return ("levels were counted without a sacral anchor (S1 not identified): every name may be shifted "
                    "by one or more levels")
        if self.transitional_suspected and self.n_lumbar == 6:
            return ("transitional anatomy suspected (6 lumbar-type vertebrae: the junction named T12-L1 is shaped "
                    "like a lumbar one; weak evidence, confirm the count on a whole-spine localiser): names "
                    "counted from the vertebra identified as S1")
        if self.transitional_suspected:
            return (f"transitional lumbosacral vertebra suspected ({self.n_lumbar} lumbar-type vertebrae): "
                    "names counted from the vertebra identified as S1")
        return ""

    def to_dict(self) -> dict:
        """JSON-ready form (the names of the contract plus ``note`` and ``evidence``)."""
        return {"anchor": self.anchor, "anchor_confidence": round(self.anchor_confidence, 4),
                "n_lumbar": self.n_lumbar, "transitional_suspected": self.transitional_suspected,
                "confidence": round(self.confidence, 4), "note": self.note, "evidence": self.evidence}


@dataclass
class DetectionResult:
    """Vertebrae found in one series, with timings."""

    vertebrae: list[Vertebra]
    volume: SeriesVolume
    timings: dict[str, float]
    input_kind: str = "dicom"
    findings: Findings | None = None  # once graded
    naming: LevelNaming | None = None
    review: object | None = None  # a spinepath.review.Review, once reviewed
    segmentation: SpineSegmentation | None = None  # once segmented

    def to_dict(self) -> dict:
        """Return the JSON-ready result.

        Per vertebra: level, name confidence, ``needs_review`` / ``review_reasons`` (once reviewed), slice
        range, per-slice boxes (in the stored image's pixels, with the frame of a multi-frame source, and in
        patient mm) and scores,
        and, once graded, ``pathology`` (fused probability, label, threshold, per-slice probabilities). Per
        disc (graded only): grade, grade name and class probabilities.
        """
        v = self.volume
        out = []
        graded = {f.level: f for f in self.findings.vertebrae} if self.findings is not None else {}
        rev = self.review
        for i, t in enumerate(self.vertebrae):
            per_slice = []
            for k, b, s, s1 in zip(t.slices, t.boxes, t.scores, t.s1_scores):
                r0, c0, r1, c1 = (float(x) for x in b)
                corners = [v.pixel_to_patient(k, r0 - 0.5, c0 - 0.5), v.pixel_to_patient(k, r1 - 0.5, c1 - 0.5)]
                centre = v.pixel_to_patient(k, (r0 + r1) / 2 - 0.5, (c0 + c1) / 2 - 0.5)
                sr0, sc0, sr1, sc1 = v.inplane.box_to_source(b)  # in the stored image's pixels
                frame = {"frame_number": v.frame_numbers[k]} if v.frame_numbers else {}
                per_slice.append(
                    {
                        "slice_index": int(k),
                        "sop_instance_uid": v.sop_instance_uids[k],
                        **frame,
                        "box_pixels": {"row_min": sr0, "col_min": sc0, "row_max": sr1, "col_max": sc1},
                        "box_patient_mm": {
                            "corner_top_anterior": [round(float(x), 2) for x in corners[0]],
                            "corner_bottom_posterior": [round(float(x), 2) for x in corners[1]],
                            "centre": [round(float(x), 2) for x in centre],
                        },
                        "score": round(float(s), 4),
                        "s1_score": round(float(s1), 4),
                    }
                )
            out.append(
                {
                    "level": t.level,
                    "name_confidence": round(t.name_confidence, 4),
                    "score": round(t.score, 4),
                    "slice_range": [int(min(t.slices)), int(max(t.slices))],
                    "n_slices": len(t.slices),
                    "truncated_by_field_of_view": t.truncated,
                    "pathology": graded[t.level].to_dict() if t.level in graded else None,
                    **(rev.vertebrae[i].to_dict() if rev is not None else {}),
                    "slices": per_slice,
                }
            )
        extra = {}
        if self.findings is not None:
            discs = [{**d, **(rev.discs[d["level"]].to_dict() if rev is not None and d["level"] in rev.discs
                                else {})} for d in self.findings.disc_dicts()]
            extra = {"discs": discs, "grading_model": self.findings.model}
            if self.findings.degeneration_model:
                extra["degeneration_model"] = self.findings.degeneration_model
            self.timings.update(self.findings.timings)
        if self.segmentation is not None:
            extra["measurements"] = self.segmentation.measurements_dict(v)
            if rev is not None and getattr(rev, "measurements", None):
                extra["measurements"]["review"] = rev.measurement_dicts()
            extra["segmentation"] = self.segmentation.to_dict(v)
        return {
            "disclaimer": DISCLAIMER,
            "software": {"name": "spinepath", "version": __version__},
            "input": {
                "kind": self.input_kind,
                "study_instance_uid": v.study_uid,
                "series_instance_uid": v.series_uid,
                "series_description": v.description,
                "n_slices": int(v.pixels.shape[0]),
                "matrix": [int(x) for x in (v.inplane.source_shape or v.pixels.shape[1:])],  # as stored
                "pixel_spacing_mm": [float(x) for x in (v.spacing[::-1] if v.inplane.transpose else v.spacing)],
                "slice_spacing_mm": round(v.slice_spacing, 3),
                "pixels_as_stored": v.inplane.describe(),
                **({"series_selection": v.selection} if v.selection else {}),
            },
            **({"needs_review": rev.study.needs_review, "review_reasons": list(rev.study.reasons),
                "image_quality": rev.quality} if rev is not None else {}),
            "n_vertebrae": len(out),
            "levels": [t.level for t in self.vertebrae],
            "level_naming": self.naming.to_dict() if self.naming is not None else None,
            "vertebrae": out,
            **extra,
            "timings_s": {k: round(x, 3) for k, x in self.timings.items()},
        }


#: The spinal canal's name in the structure masks, the label map and the SEG.
CANAL = "spinal canal"


def narrowing_ratios(discs: dict[str, dict]) -> dict[str, float]:
    """Each disc's middle height over the mean middle height of its measured adjacent discs (above and below).

    Args:
        discs: ``measurements["discs"]`` (level -> entry with a ``middle`` line).

    Returns:
        ``{level: ratio}`` for the discs with a middle height and at least one adjacent disc measured (the
        ``narrowing`` flag fires below ``spinepath.core.thresholds.NARROWING_FRACTION``); a disc is not compared
        with one two levels away.

    """
    mid = {lv: discs[lv]["middle"]["mm"] for lv in DISC_LEVELS if lv in discs and discs[lv].get("middle")}
    out = {}
    for i, lv in enumerate(DISC_LEVELS):
        nb = [mid[n] for n in DISC_LEVELS[max(i - 1, 0):i + 2] if n != lv and n in mid]
        if lv in mid and nb:
            out[lv] = mid[lv] / float(np.mean(nb))
    return out


@dataclass
class SpineSegmentation:
    """The segmentation stage's result: named instances and the key slice's measurements.

    Attributes:
        key_slice: The slice measured (the mid-sagittal slice of the detected spine).
        slices: The slices segmented (the key slice and its neighbours), in volume order.
        instances: Slice -> ``{"bodies": {level: mask}, "discs": {level: mask}, "canal": mask | None}``.
        measurements: :func:`spinepath.measurements.spine.measure_spine` on the key slice (points in the
            volume's canonical pixels, ``(row, col)``), with :meth:`flags` added by :meth:`measurements_dict`.
        model: The segmentation model's summary.
        seconds: Time taken.

    """

    key_slice: int
    slices: list[int]
    instances: dict[int, dict]
    measurements: dict
    model: dict = field(default_factory=dict)
    seconds: float = 0.0

    def structures(self, k: int) -> dict[str, np.ndarray]:
        """The named structures of segmented slice ``k``: bodies by level, discs by level, :data:`CANAL`."""
        inst = self.instances[k]
        return {**inst["bodies"], **inst["discs"], **({CANAL: inst["canal"]} if inst["canal"] is not None else {})}

    def flags(self) -> dict[str, dict[str, str]]:
        """Derived flags per level: ``{"vertebrae": {level: ...}, "discs": ..., "listhesis": ...}``.

        Vertebrae: ``height_loss`` (Genant grade 1-3 against the neighbours) and ``wedge``; discs: ``narrowing``
        (middle height below ``NARROWING_FRACTION`` of the measured adjacent discs' mean; graded at
        ``NARROWING_LEVELS``, L1-L2 to L5-S1) and
        ``stenosis`` (canal AP at the disc, ``absolute`` / ``relative``; graded at the lumbar levels only);
        listhesis: ``Meyerding I`` ... once the offset reaches ``LISTHESIS_MM``, against the body below (a
        slip over the L5-S1 disc, where the sacrum was not segmented, is not graded). The boundaries:
        :mod:`spinepath.core.thresholds`.
        """
        m = self.measurements
        out: dict[str, dict[str, list[str]]] = {"vertebrae": {}, "discs": {}, "listhesis": {}}
        for lv, e in m.get("vertebrae", {}).items():
            f = []
            if e.get("genant_grade"):
                f.append(f"height loss (Genant grade {e['genant_grade']})")
            if e.get("wedge_ratio") is not None and POSITIVE["wedge_ratio"](e["wedge_ratio"]):
                f.append("wedge")
            if (e.get("canal_ap_mid_body") or {}).get("stenosis") in STENOSIS_GRADES:
                f.append(f"canal stenosis ({e['canal_ap_mid_body']['stenosis']}) at mid-body")
            out["vertebrae"][lv] = f
        discs = m.get("discs", {})
        ratios = narrowing_ratios(discs)
        for lv in [lv for lv in DISC_LEVELS if lv in discs]:
            f = []
            if lv in ratios and lv in NARROWING_LEVELS and POSITIVE["narrowing_ratio"](ratios[lv]):
                f.append("narrowing")
            if (discs[lv].get("canal_ap") or {}).get("stenosis") in STENOSIS_GRADES:
                f.append(f"canal stenosis ({discs[lv]['canal_ap']['stenosis']})")
            out["discs"][lv] = f
        roman = ["", "I", "II", "III", "IV", "V"]
        for lv, e in m.get("listhesis", {}).items():
            big = POSITIVE["listhesis_mm"](abs(e["offset_mm"])) and graded_slip(e)
            out["listhesis"][lv] = [f"listhesis Meyerding {roman[e['meyerding']]}"] if big else []
        return out

    def measurements_dict(self, volume: SeriesVolume) -> dict:
        """The measurements for the JSON: every line's points in the stored image's pixels and in patient mm."""
        k = self.key_slice

        def conv(x: object) -> object:
            if isinstance(x, dict) and "points" in x and "mm" in x:
                pix = [list(volume.inplane.point_to_source(float(r), float(c))) for r, c in x["points"]]
                mm = [[round(float(q), 2) for q in volume.pixel_to_patient(k, float(r), float(c))]
                      for r, c in x["points"]]
                rest = {a: conv(b) for a, b in x.items() if a != "points"}
                return {**rest, "points_pixels": [[round(float(q), 2) for q in p] for p in pix],
                        "points_patient_mm": mm}
            if isinstance(x, dict):
                return {a: conv(b) for a, b in x.items()}
            return x

        return {"slice_index": k, "sop_instance_uid": volume.sop_instance_uids[k],
                **({"frame_number": volume.frame_numbers[k]} if volume.frame_numbers else {}),
                "pixel_spacing_mm": [float(x) for x in volume.spacing], **conv(self.measurements),
                "flags": self.flags()}

    def to_dict(self, volume: SeriesVolume) -> dict:
        """Which slices were segmented and which named structures were found on the key slice."""
        inst = self.instances[self.key_slice]
        return {"key_slice": self.key_slice, "slices": list(self.slices),
                "sop_instance_uids": [volume.sop_instance_uids[j] for j in self.slices],
                "vertebral_bodies": list(inst["bodies"]), "discs": list(inst["discs"]),
                "spinal_canal": inst["canal"] is not None, "model": self.model,
                "seconds": round(self.seconds, 3)}


def key_slice(result: DetectionResult) -> int:
    """The mid-sagittal slice of the detected spine: the median of the vertebrae's score-weighted slice centres."""
    if not result.vertebrae:
        return result.volume.pixels.shape[0] // 2
    centres = [t.central_slice for t in result.vertebrae]
    k = int(round(float(np.median(centres))))
    # prefer a nearby slice where most vertebrae have a box
    cands = range(max(0, k - 1), min(result.volume.pixels.shape[0], k + 2))
    return max(cands, key=lambda j: (sum(t.box_on(j) is not None for t in result.vertebrae), -abs(j - k)))


@dataclass
class VertebraFinding:
    """Fused decision for one vertebra."""

    level: str
    probability: float
    label: str
    threshold: float
    per_slice: dict[int, float]
    features: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form; ``evidence`` names each part behind the decision (once the degeneration stage ran)."""
        out = {
            "level": self.level,
            "probability": round(self.probability, 4),
            "label": self.label,
            "threshold": round(self.threshold, 4),
            "per_slice_probability": {str(k): round(v, 4) for k, v in sorted(self.per_slice.items())},
        }
        if self.evidence:
            out["evidence"] = self.evidence
        return out


@dataclass
class DiscFinding:
    """Grade of one disc (probabilities averaged over the slices where it is seen)."""

    level: str
    grade: str
    probabilities: np.ndarray
    slices: list[int]
    features: np.ndarray | None = None

    @property
    def grade_name(self) -> str:
        """Human-readable grade (normal, bulge, ...)."""
        return DISC_GRADE_NAMES[DISC_GRADES.index(self.grade)]

    @property
    def abnormal_probability(self) -> float:
        """P(grade other than v1 normal)."""
        return float(1.0 - self.probabilities[0])

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "level": self.level,
            "grade": self.grade,
            "grade_name": self.grade_name,
            "probabilities": {g: round(float(p), 4) for g, p in zip(DISC_GRADES, self.probabilities)},
            "abnormal_probability": round(self.abnormal_probability, 4),
            "slices": self.slices,
        }


#: JSON names of the SPIDER binary findings (the label columns' names differ for the endplates).
DEGENERATION_JSON_NAMES = {"upper_endplate_change": "endplate_change_upper",
                           "lower_endplate_change": "endplate_change_lower", "spondylolisthesis": "spondylolisthesis",
                           "herniation": "herniation", "narrowing": "narrowing", "bulging": "bulging"}
PFIRRMANN_WORDS = ("homogeneous bright disc (Pfirrmann 1)", "inhomogeneous disc, bright (Pfirrmann 2)",
                   "inhomogeneous grey disc (Pfirrmann 3)", "dark grey disc, height reduced (Pfirrmann 4)",
                   "black disc, collapsed (Pfirrmann 5)")


@dataclass
class DegenerationFinding:
    """Degenerative grades of one disc from the SPIDER-trained grader (T2 and, when used, T1 fused by level).

    Attributes:
        level: Disc level name.
        index_from_bottom: 1 = L5-S1, as the names are counted from S1.
        pfirrmann: Grade 1-5 and its five probabilities.
        modic_type: 0 when no Modic change is decided (``modic_any`` below its threshold), else the likeliest of
            types 1-3; and the four probabilities.
        modic_any: P(any Modic change) with its threshold.
        binary: P(finding) per :data:`DEGENERATION_JSON_NAMES` key.
        thresholds: Decision threshold per binary finding and ``modic_any`` (chosen out of fold).
        sequences: The sequences whose crops were graded (``"t2"``, ``"t1"``).
        evidence: Per binary finding decided from more than the grader's image probability, its named parts
            (``spondylolisthesis``: the image probability and the measured slip; see
            :func:`spinepath.grading.spider_inference.attach_listhesis_evidence`).

    """

    level: str
    index_from_bottom: int
    pfirrmann: int
    pfirrmann_probabilities: list[float]
    modic_type: int
    modic_probabilities: list[float]
    modic_any: float
    binary: dict[str, float]
    thresholds: dict[str, float]
    sequences: list[str]
    evidence: dict[str, dict] = field(default_factory=dict)

    def positive(self, name: str) -> bool:
        """The decision for a binary finding (label key) or ``"modic_any"``."""
        p = self.modic_any if name == "modic_any" else self.binary[name]
        return p >= self.thresholds.get(name, 0.5)

    def to_dict(self) -> dict:
        """The per-disc JSON keys of the contract (issue 13, item 5)."""
        out = {"pfirrmann": {"grade": self.pfirrmann, "words": PFIRRMANN_WORDS[self.pfirrmann - 1],
                             "probabilities": [round(p, 4) for p in self.pfirrmann_probabilities]},
               "modic": {"type": self.modic_type, "probability_any": round(self.modic_any, 4),
                         "label": "present" if self.positive("modic_any") else "absent",
                         "threshold": round(self.thresholds.get("modic_any", 0.5), 4),
                         "probabilities": [round(p, 4) for p in self.modic_probabilities]}}
        for k, name in DEGENERATION_JSON_NAMES.items():
            out[name] = {"probability": round(self.binary[k], 4),
                         "label": "present" if self.positive(k) else "absent",
                         "threshold": round(self.thresholds.get(k, 0.5), 4)}
            if k in self.evidence:
                out[name]["evidence"] = self.evidence[k]
        out["sequences"] = list(self.sequences)
        return out


@dataclass
class Findings:
    """All findings of one series."""

    vertebrae: list[VertebraFinding]
    discs: list[DiscFinding]
    timings: dict[str, float]
    model: dict = field(default_factory=dict)
    degeneration: list[DegenerationFinding] = field(default_factory=list)
    degeneration_model: dict = field(default_factory=dict)

    def disc_dicts(self) -> list[dict]:
        """Per disc level, top-down: its spark grade and its degenerative grades (SPIDER grader) side by side."""
        deg = {d.level: d for d in self.degeneration}
        discs = []
        for d in self.discs:
            e = d.to_dict()
            if d.level in deg:
                e.update(deg.pop(d.level).to_dict())
            discs.append(e)
        discs += [{"level": lv, **g.to_dict()} for lv, g in deg.items()]  # levels the spark heads do not grade
        order = {lv: i for i, lv in enumerate(DISC_LEVELS)}
        return sorted(discs, key=lambda e: order.get(e["level"], -1))

    def to_dict(self) -> dict:
        """JSON-ready form (see :meth:`disc_dicts`)."""
        out = {"vertebrae": [v.to_dict() for v in self.vertebrae], "discs": self.disc_dicts(),
               "grading_model": self.model}
        if self.degeneration_model:
            out["degeneration_model"] = self.degeneration_model
        return out


@dataclass
class SliceScores:
    """Classifier outputs on every slice of a series (the classification stage's result)."""

    vertebra: dict[tuple[int, str], list[float]]
    disc: dict[tuple[int, str], np.ndarray]
    seconds: float = 0.0

