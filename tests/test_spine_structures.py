"""Issue 14, items 2-4: the segmentation stage on a real study (committed network), the named instances, the
measurements and their flags, and every output that carries them (JSON, SR TID 1500, SEG, PDF, key image)."""

from __future__ import annotations

import json
import re

import highdicom as hd
import numpy as np
import pytest
import torch
from conftest import EXAMPLE, dciodvfy_errors
from PIL import Image

from spinepath import stages
from spinepath.core.results import SpineSegmentation
from spinepath.io.dicom import load_study
from spinepath.outputs.coding import flag_code
from spinepath.outputs.pdf import MEASUREMENT_HEADER, lordosis_note, measurement_table
from spinepath.outputs.sr import read_findings
from spinepath.outputs.writer import write_outputs

LUMBAR = ("L1", "L2", "L3", "L4", "L5")


@pytest.fixture(scope="module")
def segmented(models):
    return stages.analyse(load_study(EXAMPLE), *models)


def test_the_stage_names_and_measures_a_real_study(segmented):
    """The committed network on a real 19-slice study: every lumbar body and the discs between them named by
    the detector's chain, the canal found, and measurements in the ranges of an adult lumbar spine."""
    seg = segmented.segmentation
    assert isinstance(seg, SpineSegmentation) and seg.key_slice in seg.slices
    inst = seg.instances[seg.key_slice]
    assert set(LUMBAR) <= set(inst["bodies"]) and inst["canal"] is not None
    assert {"L1-L2", "L2-L3", "L3-L4", "L4-L5"} <= set(inst["discs"])
    m = seg.measurements
    for lv in LUMBAR:
        e = m["vertebrae"][lv]
        assert all(18 < e[p]["mm"] < 40 for p in ("anterior", "middle", "posterior")), (lv, e)
        assert 0.7 < e["wedge_ratio"] < 1.4 and 8 < e["canal_ap_mid_body"]["mm"] < 30
    for lv in ("L1-L2", "L2-L3", "L3-L4", "L4-L5"):
        e = m["discs"][lv]
        assert 3 < e["middle"]["mm"] < 18 and 0.1 < e["disc_height_index"] < 0.8 and 8 < e["canal_ap"]["mm"] < 30
        assert 0.05 < e["t2_signal_ratio"] < 1.5
    assert 20 < m["lordosis_deg"] < 80
    assert all(abs(e["offset_mm"]) < 8 for e in m["listhesis"].values())
    # a body's three height lines lie inside that body's mask on the key slice
    body = inst["bodies"]["L3"]
    for p in ("anterior", "middle", "posterior"):
        (r0, c0), (r1, c1) = m["vertebrae"]["L3"][p]["points"]
        mid = (round((r0 + r1) / 2), round((c0 + c1) / 2))
        assert body[mid], p


def test_json_gives_every_line_in_stored_pixels_and_patient_mm(segmented):
    doc = segmented.to_dict()
    m, s = doc["measurements"], doc["segmentation"]
    assert m["slice_index"] == s["key_slice"] and m["sop_instance_uid"] == segmented.volume.sop_instance_uids[
        s["key_slice"]]
    h = m["vertebrae"]["L3"]["middle"]
    assert set(h) >= {"mm", "points_pixels", "points_patient_mm"} and "points" not in h
    a, b = (np.array(p) for p in h["points_patient_mm"])
    assert np.linalg.norm(a - b) == pytest.approx(h["mm"], abs=0.6)  # the line's length in patient space
    assert set(m["flags"]) == {"vertebrae", "discs", "listhesis"} and set(LUMBAR) <= set(s["vertebral_bodies"])
    assert s["spinal_canal"] and s["model"]["file"] == "segmentation.pt"
    json.dumps(doc)


def test_flags_follow_the_documented_thresholds():
    """Genant grade, wedge, narrowing against the neighbouring discs, stenosis and the 3 mm listhesis rule."""
    def line(mm: float, **kw) -> dict:
        return {"mm": mm, "points": [[0, 0], [mm, 0]], **kw}

    m = {"vertebrae": {"L2": {"genant_grade": 2, "wedge_ratio": 0.7, "canal_ap_mid_body": line(15, stenosis="none")},
                       "L3": {"genant_grade": 0, "wedge_ratio": 0.95}},
         "discs": {"L2-L3": {"middle": line(10.0), "canal_ap": line(11.0, stenosis="relative")},
                   "L3-L4": {"middle": line(6.0), "canal_ap": line(9.0, stenosis="absolute")},
                   "L4-L5": {"middle": line(10.0)}},
         "listhesis": {"L2-L3": {"offset_mm": 2.5, "percent": 7.0, "meyerding": 1},
                       "L3-L4": {"offset_mm": -4.0, "percent": -11.0, "meyerding": 1},
                       "L5-S1": {"offset_mm": 5.0, "percent": 20.0, "meyerding": 1, "against": "disc"}}}
    f = SpineSegmentation(key_slice=0, slices=[0], instances={}, measurements=m).flags()
    assert f["vertebrae"] == {"L2": ["height loss (Genant grade 2)", "wedge"], "L3": []}
    assert f["discs"] == {"L2-L3": ["canal stenosis (relative)"],
                          "L3-L4": ["narrowing", "canal stenosis (absolute)"], "L4-L5": []}
    # under 3 mm: not flagged; over the disc (no S1 body): evidence only, not graded
    assert f["listhesis"] == {"L2-L3": [], "L3-L4": ["listhesis Meyerding I"], "L5-S1": []}
    # narrowing is graded from L1-L2 down: above, a disc is shorter than the taller disc below it when healthy
    thor = {"discs": {"T11-T12": {"middle": line(3.0)}, "T12-L1": {"middle": line(5.0)}, "L1-L2": {"middle": line(6.5)},
                      "L2-L3": {"middle": line(4.0)}}}
    ft = SpineSegmentation(key_slice=0, slices=[0], instances={}, measurements=thor).flags()["discs"]
    assert ft == {"T11-T12": [], "T12-L1": [], "L1-L2": [], "L2-L3": ["narrowing"]}  # 3/5, 5/4.75, 6.5/4.5, 4/6.5
    assert flag_code("listhesis Meyerding II").value == "MEYERII"
    assert flag_code("canal stenosis (relative) at mid-body").value == "STENRELB"
    with pytest.raises(ValueError, match="unknown measurement flag"):
        flag_code("osteophyte")


def test_flags_and_the_review_share_one_rule_per_finding():
    """Either side of every boundary, and where the stored (rounded) value lands on it, ``flags()`` reports a
    finding exactly where ``thresholds.POSITIVE`` (the review's rule) calls the stored value one."""
    from spinepath.core.thresholds import GRADE_BOUNDARIES, POSITIVE
    from spinepath.measurements.shape import Line
    from spinepath.measurements.spine import graded_canal, graded_height_loss

    def stored(kind: str, v: float) -> tuple[dict, float]:
        """The measurements holding value ``v`` of ``kind`` as ``measure_spine`` stores it, and the stored value."""
        line = {"mm": 1.0, "points": [[0, 0], [1, 0]]}
        m: dict = {"vertebrae": {}, "discs": {}, "listhesis": {}}
        if kind == "height_loss":
            m["vertebrae"]["L3"] = e = graded_height_loss(v)
            return m, e["height_loss"]
        if kind == "canal_ap_mm":
            m["discs"]["L3-L4"] = {"canal_ap": (c := graded_canal(Line((0, 0), (0, v), v), "L3-L4"))}
            return m, c["mm"]
        if kind == "wedge_ratio":
            m["vertebrae"]["L3"] = {"wedge_ratio": round(v, 3)}
            return m, round(v, 3)
        if kind == "narrowing_ratio":  # the middle disc over its two adjacent discs of height 10
            m["discs"] = {"L2-L3": {"middle": {**line, "mm": 10.0}}, "L3-L4": {"middle": {**line, "mm": 10.0 * v}},
                          "L4-L5": {"middle": {**line, "mm": 10.0}}}
            return m, v
        m["listhesis"]["L3-L4"] = {"offset_mm": -round(v, 2), "percent": -v * 3, "meyerding": 1}  # retrolisthesis
        return m, round(v, 2)

    checked = 0
    for kind, bounds in GRADE_BOUNDARIES.items():
        for b in bounds:
            for v in (b * 0.98, b - 0.0004, b, b + 0.0004, b * 1.02):
                m, value = stored(kind, v)
                f = SpineSegmentation(key_slice=0, slices=[0], instances={}, measurements=m).flags()
                got = any(f[s].get(lv) for s, lv in (("vertebrae", "L3"), ("discs", "L3-L4"), ("listhesis", "L3-L4")))
                assert got == POSITIVE[kind](value), (kind, v, value)
                checked += got
    assert checked >= 10  # each boundary's upper or lower side is a finding
    # the boundaries are the documented ones (README, "Measurements"), on the side the issue names
    assert GRADE_BOUNDARIES == {"height_loss": (0.20, 0.25, 0.40), "wedge_ratio": (0.80,), "narrowing_ratio": (0.75,),
                                "canal_ap_mm": (10.0, 12.0), "listhesis_mm": (3.0,)}
    assert POSITIVE["wedge_ratio"](0.79) and not POSITIVE["wedge_ratio"](0.81)
    assert POSITIVE["narrowing_ratio"](0.74) and not POSITIVE["narrowing_ratio"](0.76)
    assert POSITIVE["listhesis_mm"](3.1) and not POSITIVE["listhesis_mm"](2.9)  # of the absolute offset
    assert POSITIVE["canal_ap_mm"](11.9) and not POSITIVE["canal_ap_mm"](12.1)
    assert POSITIVE["height_loss"](0.21) and not POSITIVE["height_loss"](0.19)


def test_a_disc_is_compared_with_its_adjacent_discs_only():
    """With L3-L4 unmeasured, L4-L5 is compared with L5-S1 alone, never with L2-L3 two levels up."""
    from spinepath.core.results import narrowing_ratios

    def disc(mm: float) -> dict:
        return {"middle": {"mm": mm, "points": [[0, 0], [mm, 0]]}}

    r = narrowing_ratios({"L2-L3": disc(12.0), "L4-L5": disc(6.0), "L5-S1": disc(8.0)})
    assert r == {"L4-L5": pytest.approx(0.75), "L5-S1": pytest.approx(8 / 6)}
    assert narrowing_ratios({"L2-L3": disc(12.0), "L4-L5": disc(6.0)}) == {}


def test_a_vertebra_cut_by_the_field_of_view_is_not_measured(models, segmented):
    result = stages.detect_series(load_study(EXAMPLE), models[0])
    top = next(t for t in result.vertebrae if t.level == "L1")
    top.truncated = True
    seg = stages.segment(result, models[3]).segmentation
    assert "L1" in seg.instances[seg.key_slice]["bodies"]  # segmented, named, in the SEG
    assert "L1" not in seg.measurements["vertebrae"] and "L2" in seg.measurements["vertebrae"]
    assert seg.measurements["not_measured"]["L1"] == "cut by the field of view"
    row = next(r for r in measurement_table(result) if r[0] == "L1 body")
    assert row[1] == "not measured" and row[-1] == "cut by the field of view"
    assert seg.measurements["lordosis_deg"] is None  # its superior endplate is the lordosis' upper line


def test_a_partly_segmented_body_is_not_measured_and_flagged(models, monkeypatch):
    """A named body whose key-slice mask is a piece (under a third of the slice's median body: the network missed
    the rest) gets no heights and no slip, says why in the JSON and the PDF row, and is flagged for review; the
    whole bodies beside it stay measured."""
    from spinepath.measurements.spine import CUT, PARTIAL
    from spinepath.segmentation import inference
    from spinepath.segmentation.inference import partial_bodies

    level_instances = inference.level_instances

    def l3_a_piece(classes, boxes, min_pixels):
        inst = level_instances(classes, boxes, min_pixels)
        if "L3" in inst["bodies"]:
            m = inst["bodies"]["L3"]
            rows, cols = np.nonzero(m)
            piece = np.zeros_like(m)
            piece[rows.min():rows.min() + 4, cols.max() - 4:cols.max() + 1] = True  # its posterior-superior corner
            inst["bodies"]["L3"] = piece & m
        return inst

    monkeypatch.setattr(inference, "level_instances", l3_a_piece)
    result = stages.analyse(load_study(EXAMPLE), *models)
    m = result.segmentation.measurements
    assert m["not_measured"]["L3"] == PARTIAL and set(m["not_measured"].values()) <= {PARTIAL, CUT}
    assert "L3" not in m["vertebrae"] and {"L2", "L4"} <= set(m["vertebrae"])
    assert not {"L2-L3", "L3-L4"} & set(m["listhesis"]) and "L4-L5" in m["listhesis"]
    assert m["vertebrae"]["L2"]["middle"]["mm"] > 20  # its neighbours measure as before
    row = next(r for r in measurement_table(result) if r[0] == "L3 body")
    assert row[1] == "not measured" and row[-1] == PARTIAL
    flag = result.review.vertebra(next(t for t in result.vertebrae if t.level == "L3"), result)
    assert flag.needs_review and "partly_segmented" in flag.kinds
    assert result.to_dict()["measurements"]["not_measured"] == m["not_measured"]
    # the rule itself: three or more bodies, a share of their median
    whole = np.ones((20, 20), bool)
    small = np.zeros((20, 20), bool)
    small[:5, :5] = True
    assert partial_bodies({"L1": whole, "L2": whole, "L3": small}) == {"L3"}
    assert partial_bodies({"L1": whole, "L3": small}) == set()  # too few to know the median body


def test_sr_seg_pdf_and_key_image_carry_the_measurements(segmented, tmp_path):
    doc = write_outputs(segmented, tmp_path)
    sr_path, seg_path = tmp_path / "dicom" / "sr.dcm", tmp_path / "dicom" / "seg.dcm"
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(seg_path) == []
    # SR: one group per measured body and disc and the lordosis; lengths in mm with their lines on the key slice
    meas = read_findings(sr_path)["measurements"]
    key_uid = segmented.volume.sop_instance_uids[segmented.segmentation.key_slice]
    assert set(LUMBAR) <= set(meas) and "L4-L5" in meas and "L1-S1" in meas
    mm = [(g, n) for g in meas.values() for n, (_, unit) in g["values"].items() if unit == "mm"]
    assert len(mm) >= 15
    for g, name in mm:
        assert g["source_sop_instance_uid"] == key_uid and len(g["lines"][name]) == 1
    l3 = meas["L3"]["values"]
    want = doc["measurements"]["vertebrae"]["L3"]
    assert l3["Middle vertebral body height"] == (pytest.approx(want["middle"]["mm"], abs=1e-3), "mm")
    assert l3["Vertebral body wedge ratio"][1] == "{ratio}" and meas["L1-S1"]["values"][
        "Lumbar lordosis angle L1-S1"][1] == "deg"
    assert len(meas["L1-S1"]["lines"]["Lumbar lordosis angle L1-S1"]) == 2
    for kind, flagged in doc["measurements"]["flags"].items():
        for lv, fl in flagged.items():
            if fl:  # a listhesis flag sits with its upper body
                group = meas[lv.split("-")[0]] if kind == "listhesis" else meas[lv]
                assert {f[0].upper() + f[1:] for f in fl} <= set(group["flags"]), (kind, lv)
    # SEG: one segment per body level, per disc level and the canal, each the network's mask
    seg = hd.seg.segread(str(seg_path))
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    kinds = {("disc" if "disc" in x else "canal" if "canal" in x else "body") for x in labels}
    assert kinds == {"body", "disc", "canal"} and "L3 vertebral body" in labels and "spinal canal" in labels
    assert {str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence
            if s.SegmentLabel == "spinal canal"} == {"61853006"}
    number = labels.index("L3-L4 intervertebral disc") + 1
    k = segmented.segmentation.key_slice
    got = seg.get_pixels_by_source_instance([key_uid], segment_numbers=[number])[0, ..., 0]
    ref = segmented.volume.inplane.to_source(segmented.segmentation.instances[k]["discs"]["L3-L4"])
    assert np.array_equal(got > 0, ref)
    # PDF: a measurement page with the table rows; the key image draws the lines in their colours
    rows = measurement_table(segmented)
    assert all(len(r) == len(MEASUREMENT_HEADER) for r in rows)
    names = [r[0] for r in rows]
    assert names.index("L3 body") + 1 == names.index("L3-L4 disc") == names.index("L4 body") - 1  # top-down
    # the L5 slip says what it was measured against (S1's body, or the L5-S1 disc where S1 was not segmented)
    l5_slip = segmented.segmentation.measurements["listhesis"]["L5-S1"]
    assert ("over disc" if l5_slip["against"] == "disc" else "over S1") in rows[names.index("L5 body")][4]
    pdf = (tmp_path / "dicom" / "report.dcm").read_bytes()
    assert len(re.findall(rb"/Type /Page[^s]", pdf)) == 3
    with Image.open(tmp_path / "key_image.png") as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert (np.all(px == (0, 230, 255), axis=1)).sum() > 100  # the cyan body-height lines


def test_segment_slices_keeps_the_native_pixels(data_root):
    """Grid round trip: the committed network's class map on a spider_seg slice's own pixels matches the
    reference vertebra and disc masks there (the resampling back is aligned, not shifted)."""
    from scipy import ndimage as ndi

    from spinepath.data.spider import load_spider_seg
    from spinepath.data.split import split_part
    from spinepath.segmentation.inference import segment_slices
    from spinepath.segmentation.partial import CLASSES

    model = stages.load_segmenter()
    case = next(c for c in load_spider_seg(data_root / "spider_seg")
                if split_part("spider_seg", c.patient, c.patient) == "validation")
    img, msk = case.load(len(case.slices) // 2)
    with torch.no_grad():
        cls = segment_slices(model, img[None], case.spacing)[0]
    assert cls.shape == img.shape
    names = {v: k for k, v in case.labels.items()}
    vert = np.isin(cls, [CLASSES.index("vertebral_body"), CLASSES.index("posterior_elements")])
    ref = msk == names["vertebra"]
    dice = 2 * (vert & ref).sum() / (vert.sum() + ref.sum())
    assert dice > 0.8
    # shifting the prediction by two pixels lowers the overlap: the alignment is what is measured
    shifted = ndi.shift(vert.astype(float), (2, 2), order=0) > 0.5
    assert 2 * (shifted & ref).sum() / (shifted.sum() + ref.sum()) < dice


def test_a_slice_without_signal_is_not_segmented(models, data_root, monkeypatch):
    """A slice outside the body (no signal) gets no structures: normalised to its own range it would stretch
    noise to full contrast and the network would draw structures there. The rule separates the real volumes'
    empty edge slices from every slice with an annotated structure, and the contract scores such a slice as
    the product leaves it."""
    from dataclasses import replace

    from spinepath.data.datasets import load_volume_index
    from spinepath.segmentation import data as seg_data
    from spinepath.segmentation.inference import grid_slice_probabilities, segment_study

    case = next(c for c in load_volume_index(data_root / "chu_t2") if c.case == "05")  # a training volume
    image, mask, _ = case.load()
    empty = seg_data.empty_slices(np.moveaxis(image, 2, 0))
    assert empty[76] and not empty[[k for k in range(image.shape[2]) if mask[:, :, k].any()]].any()
    flagged = [s for s in seg_data.volume_seg_slices(case) if s.empty]
    assert [s.index for s in flagged] == [76]
    # every score of the product's masks (contract, selection split) gets that slice empty, as the product does;
    # the network itself draws structures on it
    assert (grid_slice_probabilities(models[3], flagged[0]).argmax(1) == 0).all()
    assert (grid_slice_probabilities(models[3], replace(flagged[0], empty=False)).argmax(1) > 0).sum() > 500
    volume = load_study(EXAMPLE)
    blank = replace(volume, pixels=volume.pixels.copy())
    blank.pixels[-1] = 0
    result = stages.detect_series(blank, models[0])
    n = blank.pixels.shape[0]

    def structures(seg):
        inst = seg.instances[n - 1]
        return len(inst["bodies"]) + len(inst["discs"]) + (inst["canal"] is not None)

    seg = segment_study(result, models[3], neighbours=n)
    assert structures(seg) == 0 and structures(seg) < len(seg.instances[seg.key_slice]["bodies"])
    monkeypatch.setattr(seg_data, "EMPTY_SIGNAL_SHARE", 0.0)  # without the rule the network draws on the noise
    assert structures(segment_study(result, models[3], neighbours=n)) > 0


def test_an_s1_whose_endplate_cannot_be_told_from_a_wall_is_not_measured(models, data_root):
    """A real steep sacrum (SPIDER training patient 19's T2): the spine's direction from L5 turns S1's axes, and
    S1's superior endplate would be fitted on its anterior wall (lordosis 63.7 degrees where the endplate gives 11).
    S1 takes no part in the lordosis, the L5-S1 slip or the canal at its mid-body, and the JSON and the PDF say
    why."""
    from spinepath.data.split import spider_fitting_studies
    from spinepath.evaluation.spider import anchored_t2
    from spinepath.measurements.spine import UNCLEAR_ENDPLATE

    result = anchored_t2(spider_fitting_studies(data_root / "spider_midsag")["19"], models[0])
    stages.segment(result, models[3])
    m = result.segmentation.measurements
    assert "S1" in result.segmentation.instances[result.segmentation.key_slice]["bodies"]  # segmented, in the SEG
    assert m["not_measured"]["S1"] == UNCLEAR_ENDPLATE
    assert m["lordosis_deg"] is None and "L5-S1" not in m["listhesis"] and "L4-L5" in m["listhesis"]
    assert "S1" not in m["vertebrae"]  # nor its canal "AP" diameter, across the same axes
    assert UNCLEAR_ENDPLATE in lordosis_note(m)
    row = next(r for r in measurement_table(result) if r[0] == "S1 body")
    assert row[1] == "not measured" and row[-1] == UNCLEAR_ENDPLATE
