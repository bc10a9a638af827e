"""Level naming with its evidence and the review flags (issue 12, items 4-6), on the real examples.

Robustness: noise, bias field, in-plane resolution 0.5-1.8 mm, slices of 3-6 mm (and 8 mm), intensity
scaling, a field of view cut above the sacrum. Every finding stays the same or is flagged for review (its own
flag, or the study's with an image-quality / field-of-view / naming reason), never silently different.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import DATA, EXAMPLE, dciodvfy_errors, rician
from scipy.ndimage import zoom

from spinepath import stages
from spinepath.core.geometry import InPlane, series_from_slices
from spinepath.data.datasets import iter_volume_slices, load_volume_index
from spinepath.detection.naming import UNANCHORED_CAP
from spinepath.io.dicom import load_study
from spinepath.outputs.common import write_dataset
from spinepath.outputs.pdf import findings_table, render_pdf, review_lines
from spinepath.outputs.sr import build_sr, read_findings
from spinepath.outputs.writer import write_outputs

STUDY_KINDS_THAT_EXPLAIN = ("image_quality", "field_of_view", "no_anchor", "transitional", "sequence")


@pytest.fixture(scope="module")
def example():
    return load_study(EXAMPLE)


@pytest.fixture(scope="module")
def reference(models, example):
    return stages.analyse(example, *models)


def _findings(result) -> dict[str, tuple]:
    out = {f.level: ("vertebra", f.label) for f in result.findings.vertebrae}
    out.update({d.level: ("disc", d.grade) for d in result.findings.discs})
    out.update({f"{g.level} degeneration": (g.pfirrmann, *(g.positive(k) for k in (*g.binary, "modic_any")))
                for g in result.findings.degeneration})
    return out


def _flagged(result, level: str) -> bool:
    level = level.removesuffix(" degeneration")
    rev = result.review
    if level in rev.discs:
        return rev.discs[level].needs_review
    return any(rev.vertebra(t, result).needs_review for t in result.vertebrae if t.level == level)


def assert_same_or_flagged(result, reference) -> None:
    """Every finding equals the reference's or is flagged, in this result or already in the reference (a finding
    the unperturbed study flagged as undecided may change); a study-level explanation covers them all."""
    study_explains = any(k in STUDY_KINDS_THAT_EXPLAIN for k in result.review.study.kinds)
    ref, got = _findings(reference), _findings(result)
    silent = [lv for lv, f in got.items() if ref.get(lv) != f and not (
        _flagged(result, lv) or study_explains or (lv in ref and _flagged(reference, lv)))]
    missing = [lv for lv in ref if lv not in got]
    assert not silent, f"silently different findings: {[(lv, ref.get(lv), got[lv]) for lv in silent]}"
    if missing:
        assert study_explains, f"levels lost without a study-level reason: {missing}; {result.review.study.reasons}"


def test_level_naming_record(reference, tmp_path):
    n = reference.naming
    assert n.anchor == "S1" and n.anchor_confidence >= 0.45 and not n.transitional_suspected and n.n_lumbar == 5
    assert [t.level for t in reference.vertebrae][-6:] == ["L1", "L2", "L3", "L4", "L5", "S1"]
    out = tmp_path / "out"
    write_outputs(reference, out)
    doc = json.loads((out / "vertebrae.json").read_text())
    ln = doc["level_naming"]
    assert set(ln) >= {"anchor", "anchor_confidence", "n_lumbar", "transitional_suspected", "confidence"}
    assert ln["anchor"] == "S1" and ln["note"] == ""
    assert doc["image_quality"]["levels_missing"] == [] and doc["image_quality"]["signal_to_noise"] > 50
    assert all("needs_review" in v and "review_reasons" in v for v in doc["vertebrae"])
    assert all("needs_review" in d for d in doc["discs"])
    # the study is flagged exactly when one of its findings is (the example is clean, anchored, in range)
    kinds = set(reference.review.study.kinds)
    assert kinds <= {"flagged_findings"}, reference.review.study.reasons
    assert doc["needs_review"] == any(v["needs_review"] for v in doc["vertebrae"] + doc["discs"])


def test_review_in_sr_pdf_and_key_image(reference, tmp_path):
    p = write_dataset(build_sr(reference), tmp_path / "sr.dcm")
    assert dciodvfy_errors(p) == []
    back = read_findings(p)
    for t in reference.vertebrae:
        if t.level in back["vertebrae"]:
            flag = reference.review.vertebra(t, reference)
            assert back["vertebrae"][t.level]["needs_review"] == flag.needs_review
            assert len(back["vertebrae"][t.level]["review_reasons"]) == len(set(flag.kinds))
    for lv, d in back["discs"].items():
        assert d["needs_review"] == reference.review.discs[lv].needs_review
    measured = reference.review.measurements
    assert back["measurements"] and set(measured) == {"vertebrae", "discs", "listhesis"}
    for lv, g in back["measurements"].items():  # each measurement group carries its measurements' review
        if lv == "L1-S1":  # the lordosis
            assert g["needs_review"] is None
            continue
        sec = "discs" if "-" in lv else "vertebrae"
        below = [k for k in measured["listhesis"] if k.startswith(f"{lv}-")] if sec == "vertebrae" else []
        flags = [measured[sec][lv], *(measured["listhesis"][k] for k in below)]
        assert g["needs_review"] == any(f.needs_review for f in flags), lv
    rows = findings_table(reference)
    assert all(len(r) == 7 for r in rows)
    lines = review_lines(reference)
    for r in rows:  # each flagged vertebra and disc has its reasons in the report
        if "vertebra" in r[6]:
            assert any(line.startswith(f"{r[0]} vertebra: ") for line in lines), (r, lines)
        if "disc" in r[6]:
            assert any(line.startswith(f"{r[3]} disc: ") for line in lines), (r, lines)
    assert any(r[6] for r in rows) == reference.review.study.needs_review
    assert render_pdf(reference).startswith(b"%PDF")
    # the key image carries the study's review line exactly when the study needs review (only that line is drawn
    # in (255, 220, 0))
    from PIL import Image

    from spinepath.outputs.key_image import key_image

    key_image(reference, tmp_path / "key.png")
    key = np.asarray(Image.open(tmp_path / "key.png").convert("RGB"))
    review_ink = ((key == (255, 220, 0)).all(-1)).sum()
    assert (review_ink > 20) == reference.review.study.needs_review, review_ink


def cut_above_sacrum(volume, result):
    """The volume with every row from the middle of L5 down removed (a lumbar field of view above the sacrum)."""
    l5 = next(t for t in result.vertebrae if t.level == "L5")
    stop = int(l5.centre[0])
    pixels = np.ascontiguousarray(volume.pixels[:, :stop, :])
    return dataclasses.replace(volume, pixels=pixels, inplane=InPlane(source_shape=pixels.shape[1:]))


def test_field_of_view_above_the_sacrum(models, example, reference, tmp_path):
    """No sacrum in view: anchor "none", every name confidence below 0.5, the report says so, all flagged."""
    result = stages.analyse(cut_above_sacrum(example, reference), *models)
    n = result.naming
    assert n.anchor == "none" and n.confidence < 0.5
    assert all(t.name_confidence < 0.5 for t in result.vertebrae) and UNANCHORED_CAP < 0.5
    assert "without a sacral anchor" in n.note
    rev = result.review
    assert rev.study.needs_review and rev.study.kinds[0] == "no_anchor"
    assert any("field of view misses" in r and "S1" in r for r in rev.study.reasons)
    assert all(rev.vertebra(t, result).needs_review for t in result.vertebrae)
    assert review_lines(result)[0].startswith("NEEDS REVIEW: levels were counted without a sacral anchor")
    out = tmp_path / "out"
    write_outputs(result, out, dicom=False)  # the cut pixels no longer match the source headers
    doc = json.loads((out / "vertebrae.json").read_text())
    assert doc["level_naming"]["anchor"] == "none" and doc["needs_review"]
    assert_same_or_flagged(result, reference)


def _resampled(volume, mm: float):
    """The slices resampled in-plane to ``mm`` pixels (linear), geometry scaled to match."""
    f = volume.spacing[0] / mm
    pixels = np.stack([zoom(s, f, order=1) for s in volume.pixels]).astype(np.float32)
    return dataclasses.replace(volume, pixels=pixels, spacing=(mm, mm), inplane=InPlane(source_shape=pixels.shape[1:]))


def _bias(volume, strength: float):
    r, c = np.mgrid[0:volume.pixels.shape[1], 0:volume.pixels.shape[2]]
    field = 1 + strength * (r / r.max() - 0.5) + 0.5 * strength * np.sin(np.pi * c / c.max())
    return dataclasses.replace(volume, pixels=(volume.pixels * field[None]).astype(np.float32))


def _noise(volume, fraction: float, seed: int):
    noisy = rician(volume.pixels, fraction, np.random.default_rng(seed))
    return dataclasses.replace(volume, pixels=noisy.astype(np.float32))


PERTURBATIONS = {
    "noise 5%": lambda v: _noise(v, 0.05, 0),
    "noise 20%": lambda v: _noise(v, 0.20, 1),
    "bias field 40%": lambda v: _bias(v, 0.4),
    "pixels 0.5 mm": lambda v: _resampled(v, 0.5),
    "pixels 1.2 mm": lambda v: _resampled(v, 1.2),
    "pixels 1.8 mm": lambda v: _resampled(v, 1.8),
    "intensity x 0.01": lambda v: dataclasses.replace(v, pixels=v.pixels * 0.01),
    "intensity x 50 + 1000": lambda v: dataclasses.replace(v, pixels=v.pixels * 50 + 1000),
}


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_robust_or_flagged(name, models, example, reference):
    result = stages.analyse(PERTURBATIONS[name](example), *models)
    assert_same_or_flagged(result, reference)
    rev = result.review
    if name == "pixels 1.8 mm":
        assert any("coarser than 1.5 mm" in r for r in rev.study.reasons)
    if name == "noise 20%":
        assert rev.quality["signal_to_noise"] < reference.review.quality["signal_to_noise"] / 3


@pytest.mark.parametrize("step_mm", [3, 6, 8])
def test_slice_thickness(step_mm, models):
    """The chu_t2 volume behind the example as 3, 6 and 8 mm slices: same or flagged (8 mm: thicker than 6)."""
    case = next(c for c in load_volume_index(DATA / "chu_t2") if c.case == "02")
    n = case.n_slices
    ref_slices = list(iter_volume_slices(case, list(range((n % 4) // 2, n, 4))))
    ref = stages.analyse(series_from_slices([s.image for s in ref_slices], ref_slices[0].spacing, 4.0), *models)
    slices = list(iter_volume_slices(case, list(range((n % step_mm) // 2, n, step_mm))))
    vol = series_from_slices([s.image for s in slices], slices[0].spacing, float(step_mm))
    vol.slice_thickness = float(step_mm)
    result = stages.analyse(vol, *models)
    assert_same_or_flagged(result, ref)
    assert any("thicker than 6 mm" in r for r in result.review.study.reasons) == (step_mm > 6)


def test_unknown_sequence_is_flagged(models, example_copy):
    """A series whose timing is gone and whose name says nothing is read (an unknown sequence) and flagged."""
    import pydicom

    for p in example_copy.glob("*.dcm"):
        ds = pydicom.dcmread(str(p))
        for key in ("RepetitionTime", "EchoTime", "ScanningSequence", "SequenceVariant"):
            if key in ds:
                delattr(ds, key)
        ds.SeriesDescription = "sag"
        ds.save_as(str(p))
    vol = load_study(example_copy)
    assert vol.selection["main"]["sequence"]["kind"] == "unknown"
    result = stages.analyse(vol, *models)
    assert "sequence" in result.review.study.kinds and result.review.study.needs_review


def test_degenerative_near_threshold_is_measured_in_log_odds(reference):
    """Rare findings have thresholds near 0.01: a margin in log-odds flags only the discs near them."""
    from spinepath.grading.calibration import logit
    from spinepath.review import load_review_rules, review

    margins = load_review_rules()["degeneration_logit_margin"]
    g = reference.findings.degeneration[0]
    thr = {**g.thresholds, "spondylolisthesis": 0.006}
    sig = lambda z: float(1 / (1 + np.exp(-z)))  # noqa: E731
    far = {k: sig(logit(thr[k]) + 3.0) for k in g.binary}  # clearly positive, 0.1-0.9 away in probability
    near = dict(far, spondylolisthesis=sig(logit(0.006) + margins["spondylolisthesis"] / 2))  # 0.006-0.007
    clear = [0.02, 0.9, 0.06, 0.01, 0.01]  # Pfirrmann 2, expected grade 2.1: not undecided

    def reasons(binary: dict) -> list[str]:
        deg = dataclasses.replace(g, binary=binary, thresholds=thr, modic_any=sig(logit(thr["modic_any"]) - 3.0),
                                  pfirrmann=2, pfirrmann_probabilities=clear)
        res = dataclasses.replace(reference, findings=dataclasses.replace(reference.findings, degeneration=[deg]))
        return [r for r in review(res).discs[g.level].reasons if "probability" in r and "near" in r]

    assert reasons(far) == []
    got = reasons(near)
    p = near["spondylolisthesis"]
    assert 0.006 < p < 0.0075
    assert len(got) == 1 and got[0].startswith(f"spondylolisthesis probability {p:.3f} near its threshold 0.006"), got


def test_pfirrmann_from_the_t1_alone_is_flagged(reference):
    """A disc only the T1's chain shows gets a Pfirrmann estimate from the T1: flagged (the grade is a T2 one)."""
    from spinepath.outputs.coding import REVIEW_REASON_CODES
    from spinepath.review import REASON_KINDS, review

    g = reference.findings.degeneration[0]
    assert "t2" in g.sequences
    kinds = {}
    for seqs in (["t2"], ["t1", "t2"], ["t1"]):
        deg = dataclasses.replace(g, sequences=seqs)
        res = dataclasses.replace(reference, findings=dataclasses.replace(reference.findings, degeneration=[deg]))
        kinds[tuple(seqs)] = review(res).discs[g.level].kinds
    assert "without_t2" not in kinds[("t2",)] and "without_t2" not in kinds[("t1", "t2")]
    assert "without_t2" in kinds[("t1",)]
    assert set(REASON_KINDS) == set(REVIEW_REASON_CODES)


def test_a_measurement_finding_near_its_grade_boundary_is_flagged(reference, tmp_path):
    """A reported stenosis, height loss or slip within its measured margin of a grade boundary is flagged, with
    the value and the boundary; a clear value, a value without a finding, an ungraded canal level and a slip
    over the disc are not; on the real study every such reason belongs to a reported measurement finding."""
    import copy

    from spinepath.measurements.spine import graded_height_loss
    from spinepath.review import load_review_rules, review

    margins = load_review_rules()["measurement_margin"]
    assert set(margins) == {"height_loss", "wedge_ratio", "narrowing_ratio", "canal_ap_mm", "listhesis_mm"}
    seg = reference.segmentation
    assert seg is not None and seg.measurements["discs"]
    flags = seg.flags()
    for lv, fl in reference.review.discs.items():
        for kind, reason in zip(fl.kinds, fl.reasons):
            if kind == "measurement_near_threshold":
                assert flags["discs"].get(lv) or flags["listhesis"].get(lv), (lv, reason)
    for t, fl in zip(reference.vertebrae, reference.review.vertebrae):
        if "measurement_near_threshold" in fl.kinds:
            assert flags["vertebrae"].get(t.level), (t.level, fl.reasons)

    def reasons(edit) -> tuple[dict, dict]:
        m = copy.deepcopy(seg.measurements)
        edit(m)
        res = dataclasses.replace(reference, segmentation=dataclasses.replace(seg, measurements=m))
        rev = review(res)
        vert = {t.level: [r for k, r in zip(f.kinds, f.reasons) if k == "measurement_near_threshold"]
                for t, f in zip(res.vertebrae, rev.vertebrae)}
        disc = {lv: [r for k, r in zip(f.kinds, f.reasons) if k == "measurement_near_threshold"]
                for lv, f in rev.discs.items()}
        return vert, disc

    def canal(mm: float, stenosis: str, level: str = "L4-L5"):
        return lambda m: m["discs"][level].update(canal_ap={"mm": mm, "stenosis": stenosis, "points": [[0, 0], [1, 1]]})

    assert "L4-L5" in seg.measurements["discs"]
    near = 10.0 + margins["canal_ap_mm"] / 2
    _, disc = reasons(canal(near, "relative"))
    assert any(r.startswith(f"canal AP {near:.1f} mm near the 10.0 mm grade boundary") for r in disc["L4-L5"])
    # the measurement group says so in the SR, and the JSON's measurements carry it
    m = copy.deepcopy(seg.measurements)
    canal(near, "relative")(m)
    res = dataclasses.replace(reference, segmentation=dataclasses.replace(seg, measurements=m))
    review(res)
    back = read_findings(write_dataset(build_sr(res), tmp_path / "sr.dcm"))["measurements"]["L4-L5"]
    assert back["needs_review"] is True and back["review_reasons"] == ["Measurement near a grade boundary"]
    js = res.to_dict()["measurements"]["review"]
    assert js["discs"]["L4-L5"]["needs_review"] and js["discs"]["L4-L5"]["review_reasons"][0].startswith("canal AP")
    _, disc = reasons(canal(14.0, "none"))
    assert not any(r.startswith("canal AP") for r in disc.get("L4-L5", []))
    thoracic = next((lv for lv in seg.measurements["discs"] if lv.startswith("T")), None)
    if thoracic is not None:
        _, disc = reasons(canal(near, "not graded", thoracic))
        assert not any(r.startswith("canal AP") for r in disc.get(thoracic, []))

    body = next(lv for lv in ("L3", "L2", "L4") if lv in seg.measurements["vertebrae"])
    lo = round(0.20 + min(margins["height_loss"], 0.05) / 3, 3)  # nearer 0.20 than 0.25
    for loss in (lo, 0.15, 0.325):  # near 0.20; no finding; between 0.25 and 0.40 (clear of both at 0.057)
        near = loss >= 0.20 and min(abs(loss - b) for b in (0.20, 0.25, 0.40)) < margins["height_loss"]
        vert, _ = reasons(lambda m, x=loss: m["vertebrae"][body].update(graded_height_loss(x)))
        assert any(r.startswith("height loss") for r in vert[body]) is near, (loss, vert[body])
        m = copy.deepcopy(seg.measurements)
        m["vertebrae"][body].update(graded_height_loss(loss))
        reported = any(x.startswith("height loss") for x in dataclasses.replace(seg, measurements=m).flags()[
            "vertebrae"][body])
        assert reported is (loss >= 0.20)  # the review flags only reported findings (near is False otherwise)
    got = reasons(lambda m: m["vertebrae"][body].update(graded_height_loss(lo)))[0][body]
    assert any(r.startswith(f"height loss {lo:.1%} near the 20.0% grade boundary") for r in got), got

    slip = {"offset_mm": 3.5, "percent": 8.0, "meyerding": 1, "line": None}
    _, disc = reasons(lambda m: m["listhesis"].update({"L4-L5": {**slip, "against": "body"}}))
    assert any(r.startswith("slip 3.5 mm near the 3.0 mm grade boundary") for r in disc["L4-L5"])
    _, disc = reasons(lambda m: m["listhesis"].update({"L4-L5": {**slip, "against": "disc"}}))
    assert not any(r.startswith("slip") for r in disc.get("L4-L5", []))
