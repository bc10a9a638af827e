"""Comprehensive 3D SR with a TID 1500 measurement report of the findings (highdicom).

One planar-ROI measurement group (TID 1410) per graded vertebra and per graded disc: tracking identifier,
finding site (SNOMED CT level), the region as a polyline on the source slice where the structure is centred,
the probability as a numeric measurement, qualitative evaluations (Normal/Abnormal; the disc grade; "Needs
review" Yes/No with its coded reasons) and the algorithm identification (name, version). One more group per
disc with degenerative grades (finding type: degeneration of intervertebral disc, SNOMED CT 77547008): the
Pfirrmann grade and the Modic type as coded values, each finding Present / Absent with its probability. One
group per measured body and disc, and one for the lordosis, once segmented (:func:`segmentation_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from spinepath import __version__
from spinepath.core.levels import VERTEBRA_LEVELS
from spinepath.core.results import DegenerationFinding, DetectionResult, key_slice
from spinepath.outputs.coding import (
    ABNORMAL,
    ABSENT,
    DEGENERATION_CODES,
    DEGENERATION_PROBABILITY_CODES,
    DISC_DEGENERATION,
    DISC_GRADE_CODES,
    DISC_GRADE_NAME,
    FINDING,
    LUMBAR_SPINE,
    MEASUREMENT_CODES,
    MEASUREMENT_FLAG,
    MODIC_CODES,
    MODIC_TYPE,
    NEEDS_REVIEW,
    NO,
    NO_UNITS,
    NORMAL,
    PFIRRMANN_CODES,
    PFIRRMANN_GRADE,
    PRESENT,
    PROBABILITY,
    REVIEW_REASON,
    REVIEW_REASON_CODES,
    VERTEBRA,
    YES,
    disc_code,
    flag_code,
    vertebra_code,
)
from spinepath.outputs.common import no_identifying_warnings
from spinepath.review import Flag

ALGORITHM = "spinepath"
#: The Device Observer UID of every SR: this software at this version, the same in every report it writes (a
#: registry or PACS groups the reports by the device that made them).
DEVICE_UID = generate_uid(entropy_srcs=[ALGORITHM, "device", __version__])
SR_SERIES_NUMBER = 902
#: Per kind of measurement group, the model behind it (TID 4019 "Algorithm Parameters"): a PACS reader sees
#: which of the two disc gradings a group holds and which one is the disc's finding.
ALGORITHM_MODELS = {
    "vertebra": "model: per-vertebra decision (spark score with the SPIDER endplate / marrow evidence)",
    "disc": "model: Spark-scheme disc grade (earlier model, spark_midsag); the disc's findings are in its "
            "degeneration group",
    "degeneration": "model: SPIDER degenerative grader (Pfirrmann, Modic and the disc findings)",
    "measurements": "model: segmentation network and measurements",
}


def algorithm(kind: str) -> hd.sr.AlgorithmIdentification:
    """The algorithm identification of one kind of measurement group (:data:`ALGORITHM_MODELS`)."""
    return hd.sr.AlgorithmIdentification(name=ALGORITHM, version=__version__, parameters=[ALGORITHM_MODELS[kind]])


@dataclass
class Region:
    """Where a finding is shown: a source slice and a rectangle on it (pixel edge coordinates)."""

    slice_index: int
    box: tuple[float, float, float, float]  # row_min, col_min, row_max, col_max


def central_slice(track) -> int:
    """The slice of a vertebra track nearest its score-weighted centre."""
    c = track.central_slice
    return min(track.slices, key=lambda k: abs(k - c))


def vertebra_region(track) -> Region:
    """The vertebra's box on its central slice."""
    k = central_slice(track)
    return Region(k, tuple(float(x) for x in track.box_on(k)))


def disc_region(upper, lower, slices: list[int]) -> Region | None:
    """The space between two neighbouring vertebral bodies on the disc's middle slice (None if not shared)."""
    shared = [k for k in slices if upper.box_on(k) is not None and lower.box_on(k) is not None]
    if not shared:
        return None
    k = shared[len(shared) // 2]
    a, b = upper.box_on(k), lower.box_on(k)
    r0, r1 = float(min(a[2], b[0])), float(max(a[2], b[0]))
    if r1 - r0 < 4:  # touching boxes: give the region a visible height
        m = (r0 + r1) / 2
        r0, r1 = m - 2, m + 2
    return Region(k, (r0, float(min(a[1], b[1])), r1, float(max(a[3], b[3]))))


def degeneration_region(result: DetectionResult, g: DegenerationFinding) -> Region | None:
    """The graded disc on the key slice (None where its lower vertebra is not on it).

    Between its two vertebrae, or, for an edge disc whose upper vertebra is out of view, a band above the lower
    one of 40% of that body's height.
    """
    tracks = {t.level: t for t in result.vertebrae}
    k = key_slice(result)
    upper, lower = (tracks.get(lv) for lv in g.level.split("-"))
    if upper is not None and lower is not None:
        return disc_region(upper, lower, [k])
    b = lower.box_on(k) if lower is not None else None
    if b is None:
        return None
    h = float(b[2] - b[0])
    return Region(k, (float(b[0]) - 0.4 * h, float(b[1]), float(b[0]), float(b[3])))


def _polyline(region: Region, volume) -> hd.sr.ImageRegion:
    """The region as a closed polyline on its source image (the stored pixels; the frame of a multi-frame)."""
    r0, c0, r1, c1 = volume.inplane.box_to_source(region.box)
    # SCOORD pixel coordinates are (column, row) with 0\\0 the top-left corner of the first pixel: box edges
    pts = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float32)
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=pts,
                             source_image=_source(volume, region.slice_index, hd.sr.SourceImageForRegion))


def _source(volume, k: int, kind: type):
    """A highdicom source-image reference (``kind``) to slice ``k``: its instance, and its frame if multi-frame."""
    frames = [volume.frame_numbers[k]] if volume.frame_numbers else None
    return kind.from_source_image(volume.datasets[k], referenced_frame_numbers=frames)


def review_evaluations(flag) -> list[hd.sr.QualitativeEvaluation]:
    """"Needs review" Yes / No and one coded reason per kind of a :class:`spinepath.review.Flag` (none: [])."""
    if flag is None:
        return []
    out = [hd.sr.QualitativeEvaluation(NEEDS_REVIEW, YES if flag.needs_review else NO)]
    for kind in dict.fromkeys(flag.kinds):
        out.append(hd.sr.QualitativeEvaluation(REVIEW_REASON, REVIEW_REASON_CODES[kind]))
    return out


def _group(identifier: str, region: Region, volume, finding_type: hd.sr.CodedConcept, site: hd.sr.CodedConcept,
           measurements: list[tuple[hd.sr.CodedConcept, float]], evaluations: list[hd.sr.QualitativeEvaluation],
           algo: hd.sr.AlgorithmIdentification) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One TID 1410 group: a tracked region on its source image, a finding site, unitless numbers, evaluations."""
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier),
        referenced_region=_polyline(region, volume),
        finding_type=finding_type,
        algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(site)],
        measurements=[hd.sr.Measurement(name=n, value=round(float(v), 4), unit=NO_UNITS, algorithm_id=algo)
                      for n, v in measurements],
        qualitative_evaluations=evaluations,
    )


def measurement_groups(result: DetectionResult) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per graded vertebra, per graded disc and per disc with degenerative grades."""
    f = result.findings
    if f is None:
        raise ValueError("the detection result has no findings: run the grading stage first")
    algo = {kind: algorithm(kind) for kind in ("vertebra", "disc", "degeneration")}  # shared by a kind's groups
    tracks = {t.level: t for t in result.vertebrae}
    rev = result.review
    vol = result.volume
    groups = []
    for v in f.vertebrae:
        t = tracks.get(v.level)
        if t is None:
            continue
        groups.append(_group(
            f"{v.level} vertebra", vertebra_region(t), vol, VERTEBRA, vertebra_code(v.level),
            [(PROBABILITY, v.probability)],
            [hd.sr.QualitativeEvaluation(FINDING, ABNORMAL if v.label == "pathological" else NORMAL),
             *review_evaluations(rev.vertebra(t, result) if rev is not None else None)], algo["vertebra"]))
    for d in f.discs:
        a, b = d.level.split("-")
        reg = disc_region(tracks[a], tracks[b], d.slices) if a in tracks and b in tracks else None
        if reg is None:
            continue
        groups.append(_group(
            f"{d.level} disc", reg, vol, disc_code(d.level), disc_code(d.level),
            [(PROBABILITY, d.abnormal_probability)],
            [hd.sr.QualitativeEvaluation(FINDING, NORMAL if d.grade == "v1" else ABNORMAL),
             hd.sr.QualitativeEvaluation(DISC_GRADE_NAME, DISC_GRADE_CODES[d.grade]),
             *review_evaluations(rev.discs.get(d.level) if rev is not None else None)], algo["disc"]))
    for g in f.degeneration:
        reg = degeneration_region(result, g)
        if reg is None:
            continue
        probs = {**g.binary, "modic_any": g.modic_any}
        groups.append(_group(
            f"{g.level} degeneration", reg, vol, DISC_DEGENERATION, disc_code(g.level),
            [(DEGENERATION_PROBABILITY_CODES[k], p) for k, p in probs.items()],
            [hd.sr.QualitativeEvaluation(PFIRRMANN_GRADE, PFIRRMANN_CODES[g.pfirrmann]),
             hd.sr.QualitativeEvaluation(MODIC_TYPE, MODIC_CODES[g.modic_type]),
             *(hd.sr.QualitativeEvaluation(DEGENERATION_CODES[k], PRESENT if g.positive(k) else ABSENT) for k in probs),
             *review_evaluations(rev.discs.get(g.level) if rev is not None else None)], algo["degeneration"]))
    return groups


def _coordinates(line: dict, volume, k: int) -> hd.sr.CoordinatesForMeasurement:
    """A measured line (canonical pixel points ``(row, col)``) as a SCOORD POLYLINE on its source image."""
    pts = [volume.inplane.point_to_source(float(r), float(c)) for r, c in line["points"]]
    # SCOORD: (column, row), 0\\0 the top-left corner of the first pixel (pixel centres at +0.5)
    data = np.array([[c + 0.5, r + 0.5] for r, c in pts], dtype=np.float32)
    return hd.sr.CoordinatesForMeasurement(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=data,
                                           source_image=_source(volume, k, hd.sr.SourceImageForRegion))


def segmentation_groups(result: DetectionResult, algo: hd.sr.AlgorithmIdentification
                        ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per measured body and disc, and one for the lordosis (issue 14, item 4).

    The group references the key slice it was measured on; every length is a NUM in mm with the line it was
    measured on as a SCOORD POLYLINE on the source image (TID 1410 groups, with their one region, allow no
    coordinates per measurement); ratios are ``{ratio}``, the angle ``deg`` with its two endplate lines; the
    derived flags are qualitative evaluations ("Measurement flag").
    """
    seg = result.segmentation
    if seg is None:
        return []
    vol, k, m = result.volume, seg.key_slice, seg.measurements
    flags = seg.flags()
    groups = []

    def nums(entry: dict, keys: dict[str, str]) -> list[hd.sr.Measurement]:
        out = []
        for key, code_key in keys.items():
            v = entry.get(key)
            if v is None:
                continue
            name, unit = MEASUREMENT_CODES[code_key]
            line = v if isinstance(v, dict) else None
            out.append(hd.sr.Measurement(
                name=name, value=round(float(line["mm"] if line else v), 3), unit=unit, algorithm_id=algo,
                referenced_coordinates=[_coordinates(line, vol, k)] if line else None))
        return out

    source = [_source(vol, k, hd.sr.SourceImageForMeasurementGroup)]

    measured = getattr(result.review, "measurements", None) or {}

    def review_of(*keys: tuple[str, str]) -> list[hd.sr.QualitativeEvaluation]:
        """"Needs review" of the group's measurements (with their reasons), once the study was reviewed."""
        if not measured:
            return []
        merged = Flag()
        for sec, lv in keys:
            f = measured.get(sec, {}).get(lv)
            if f is not None:
                for kind, reason in zip(f.kinds, f.reasons):
                    merged.add(kind, reason)
        return review_evaluations(merged)

    def group(ident: str, ftype, site, measurements: list, flag_list: list[str],
              review: list[hd.sr.QualitativeEvaluation]) -> None:
        if not measurements:
            return
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{ident} measurements"),
            finding_type=ftype, algorithm_id=algo, finding_sites=[hd.sr.FindingSite(site)],
            measurements=measurements, source_images=source,
            qualitative_evaluations=[*(hd.sr.QualitativeEvaluation(MEASUREMENT_FLAG, flag_code(f)) for f in flag_list),
                                     *review]))

    for lv, e in m["vertebrae"].items():
        below = VERTEBRA_LEVELS[VERTEBRA_LEVELS.index(lv) + 1] if lv != VERTEBRA_LEVELS[-1] else None
        slip = m["listhesis"].get(f"{lv}-{below}") if below else None
        ms = nums(e, {"anterior": "body_anterior", "middle": "body_middle", "posterior": "body_posterior",
                      "wedge_ratio": "wedge_ratio", "biconcavity_ratio": "biconcavity_ratio",
                      "height_loss": "height_loss", "canal_ap_mid_body": "canal_ap_mid_body"})
        if slip is not None:
            ms += nums({"offset": {**slip["line"], "mm": slip["offset_mm"]}, "percent": slip["percent"]},
                       {"offset": "listhesis_offset", "percent": "listhesis_percent"})
        group(lv, VERTEBRA, vertebra_code(lv), ms,
              flags["vertebrae"].get(lv, []) + (flags["listhesis"].get(f"{lv}-{below}", []) if below else []),
              review_of(("vertebrae", lv), ("listhesis", f"{lv}-{below}")))
    for lv, e in m["discs"].items():
        group(lv, disc_code(lv), disc_code(lv),
              nums(e, {"anterior": "disc_anterior", "middle": "disc_middle", "posterior": "disc_posterior",
                       "disc_height_index": "disc_height_index", "t2_signal_ratio": "t2_signal_ratio",
                       "canal_ap": "canal_ap"}), flags["discs"].get(lv, []), review_of(("discs", lv)))
    if m.get("lordosis_deg") is not None:
        name, unit = MEASUREMENT_CODES["lordosis"]
        lines = m["lordosis_lines"]
        group("L1-S1", LUMBAR_SPINE, LUMBAR_SPINE,
              [hd.sr.Measurement(name=name, value=float(m["lordosis_deg"]), unit=unit, algorithm_id=algo,
                                 referenced_coordinates=[_coordinates(ln, vol, k) for ln in lines.values()])], [], [])
    return groups


def build_sr(result: DetectionResult, series_number: int = SR_SERIES_NUMBER) -> hd.sr.Comprehensive3DSR:
    """The findings as a Comprehensive 3D SR (TID 1500) in a new series of the source study.

    Raises:
        ValueError: If the result has no findings or no source headers.

    """
    ds = result.volume.datasets
    if not ds:
        raise ValueError("the series volume carries no source DICOM headers")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name=ALGORITHM, manufacturer_name=ALGORITHM, model_name=__version__
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.MRISpineReport,
        imaging_measurements=[*measurement_groups(result),
                              *segmentation_groups(result, algorithm("measurements"))],
        title=codes.DCM.ImagingMeasurementReport,
    )
    with no_identifying_warnings():
        return _document(ds, report, series_number)


def _document(ds: list, report: hd.sr.MeasurementReport, series_number: int) -> hd.sr.Comprehensive3DSR:
    evidence = list({str(d.SOPInstanceUID): d for d in ds}.values())  # a multi-frame source once
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_number=series_number,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=ALGORITHM,
        series_description="spinepath findings - NOT FOR DIAGNOSTIC USE",
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=None,
    )


def _algorithm_parameters(group) -> list[str]:
    """The group's own "Algorithm Parameters" texts (TID 4019 items directly in the group)."""
    return [str(item.TextValue) for container in group for item in container.ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]


def read_findings(path: str | Path) -> dict:
    """Read an SR written by :func:`build_sr` back: ``{"vertebrae", "discs", "degeneration", "measurements"}``.

    Each by level; a measurement group gives its values (meaning -> (value, unit)), the SCOORD lines of each,
    its flags and its review (``needs_review``: None in an SR of an unreviewed result; coded reasons); every
    group the model it came from (``algorithm_parameters``, :data:`ALGORITHM_MODELS`).
    """
    sr = hd.sr.srread(path)
    report = sr.content
    out: dict = {"vertebrae": {}, "discs": {}, "degeneration": {}, "measurements": {}}
    for g in report.get_image_measurement_groups():
        level, kind = str(g.tracking_identifier).rsplit(" ", 1)
        evaluations = g.get_qualitative_evaluations()
        if kind == "measurements":
            src = g.source_images
            out["measurements"][level] = {
                "source_sop_instance_uid": src[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID if src else None,
                "values": {mm.name.meaning: (float(mm.value), mm.unit.value) for mm in g.get_measurements()},
                "lines": {mm.name.meaning: [np.asarray(c.value).reshape(-1, 2).tolist()
                                            for c in (mm.referenced_coordinates or [])]
                          for mm in g.get_measurements()},
                "flags": [q.value.meaning for q in evaluations if q.name == MEASUREMENT_FLAG],
                "needs_review": next((q.value.meaning == YES.meaning for q in evaluations if q.name == NEEDS_REVIEW),
                                     None),
                "review_reasons": [q.value.meaning for q in evaluations if q.name == REVIEW_REASON],
                "algorithm_parameters": _algorithm_parameters(g)}
    for g in report.get_planar_roi_measurement_groups():
        level, kind = str(g.tracking_identifier).rsplit(" ", 1)
        evaluations = g.get_qualitative_evaluations()
        quals = {q.name.meaning: q.value.meaning for q in evaluations if q.name != REVIEW_REASON}
        region = g.roi
        entry = {
            "finding_site": g.finding_sites[0].value.meaning,
            "needs_review": quals.get(NEEDS_REVIEW.meaning) == YES.meaning if NEEDS_REVIEW.meaning in quals else None,
            "review_reasons": [q.value.meaning for q in evaluations if q.name == REVIEW_REASON],
            "source_sop_instance_uid": region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
            "polyline": np.asarray(region.value).reshape(-1, 2).tolist(),
            "algorithm_parameters": _algorithm_parameters(g),
        }
        if kind == "degeneration":
            entry["finding_type"] = g.finding_type.meaning
            pf, modic = quals[PFIRRMANN_GRADE.meaning], quals[MODIC_TYPE.meaning]
            entry["pfirrmann"] = next(k for k, c in PFIRRMANN_CODES.items() if c.meaning == pf)
            entry["modic_type"] = next(k for k, c in MODIC_CODES.items() if c.meaning == modic)
            entry["present"] = {k: quals[c.meaning] == PRESENT.meaning for k, c in DEGENERATION_CODES.items()}
            entry["coding"] = {k: (c.scheme_designator, c.value) for k, c in DEGENERATION_CODES.items()}
            entry["probability"] = {k: float(g.get_measurements(name=c)[0].value)
                                    for k, c in DEGENERATION_PROBABILITY_CODES.items()}
            out["degeneration"][level] = entry
            continue
        entry["probability"] = float(g.get_measurements(name=PROBABILITY)[0].value)
        entry["finding"] = quals.get(FINDING.meaning)
        if kind == "disc":
            entry["grade"] = next(k for k, c in DISC_GRADE_CODES.items() if c.meaning == quals[DISC_GRADE_NAME.meaning])
        out["vertebrae" if kind == "vertebra" else "discs"][level] = entry
    return out
