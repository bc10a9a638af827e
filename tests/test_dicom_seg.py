"""DICOM SEG of the named vertebrae on the real example: validity (dciodvfy), round trip, geometry, identity."""

import copy
import dataclasses
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pytest
from conftest import EXAMPLE

from spinepath.core.levels import VERTEBRA_LEVELS
from spinepath.core.paths import resolve_model_path
from spinepath.detection.predictor import VertebraDetector
from spinepath.io.dicom import load_study
from spinepath.outputs.coding import vertebra_code
from spinepath.outputs.seg import SEG_SERIES_DESCRIPTION, build_vertebra_seg, seg_masks, write_seg
from spinepath.stages import detect_series


@pytest.fixture(scope="module")
def result():
    vol = load_study(EXAMPLE)
    return detect_series(vol, VertebraDetector.load(resolve_model_path()))


@pytest.fixture(scope="module")
def seg_file(result, tmp_path_factory):
    return write_seg(result, tmp_path_factory.mktemp("seg") / "out" / "vertebrae_seg.dcm")


@pytest.fixture(scope="module")
def seg(seg_file):
    return hd.seg.segread(seg_file)


def test_dciodvfy_reports_no_error(seg_file):
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found: install dicom3tools (scripts/setup_system.sh)")
    out = subprocess.run([exe, str(seg_file)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    errors = [ln for ln in lines if ln.lstrip().startswith("Error")]
    assert not errors, "dciodvfy:\n" + "\n".join(lines)
    assert not list(seg_file.parent.glob(".partial-*")), "temporary file left behind"


def test_round_trip_segments_and_masks(result, seg):
    masks, levels = seg_masks(result)
    assert levels and all(lv in VERTEBRA_LEVELS for lv in levels)
    assert levels == sorted(levels, key=VERTEBRA_LEVELS.index)  # top-down
    assert levels == [t.level for t in result.vertebrae if t.level != "?"]
    items = seg.SegmentSequence
    assert [int(s.SegmentNumber) for s in items] == list(range(1, len(levels) + 1))
    assert [s.SegmentLabel for s in items] == [f"{lv} vertebral body" for lv in levels]
    assert [s.SegmentDescription for s in items] == levels
    for s, lv in zip(items, levels):
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        assert s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "spinepath"
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # anatomical structure
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == vertebra_code(lv).value
        assert "RecommendedDisplayCIELabValue" in s
    assert seg.SegmentationType == "BINARY" and seg.ContentLabel == "VERTEBRAE"
    # empty frames are left out: one frame per (segment, slice) with a box
    assert int(seg.NumberOfFrames) == int(masks.any(axis=(2, 3)).sum())
    got = seg.get_pixels_by_source_instance(result.volume.sop_instance_uids, assert_missing_frames_are_empty=True)
    assert got.shape == (*masks.shape[1:], len(levels))
    np.testing.assert_array_equal(np.moveaxis(got, -1, 0).astype(bool), masks)


def test_l3_frame_geometry_matches_source_slice(result, seg):
    vol = result.volume
    _, levels = seg_masks(result)
    t = next(t for t in result.vertebrae if t.level == "L3")
    k = t.slices[len(t.slices) // 2]
    r0, c0, r1, c1 = (float(x) for x in t.box_on(k))
    seg_no = levels.index("L3") + 1
    frames = [
        (i, f)
        for i, f in enumerate(seg.PerFrameFunctionalGroupsSequence)
        if int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == seg_no
        and f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == vol.sop_instance_uids[k]
    ]
    assert len(frames) == 1
    i, f = frames[0]
    ipp = np.array([float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient])
    np.testing.assert_allclose(ipp, vol.positions[k], atol=1e-3)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    np.testing.assert_allclose(iop, vol.orientation, atol=1e-4)
    spacing = [float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing]
    np.testing.assert_allclose(spacing, vol.spacing)
    # the frame's filled rows/cols are the detected box (pixel centres inside it)
    frame = seg.get_frame(i + 1, dtype=np.uint8).astype(bool)
    rows, cols = np.nonzero(frame.any(axis=1))[0], np.nonzero(frame.any(axis=0))[0]
    assert frame.sum() == len(rows) * len(cols)  # one filled rectangle
    assert rows[0] + 0.5 >= r0 > rows[0] - 0.5 and rows[-1] + 0.5 < r1 <= rows[-1] + 1.5
    assert cols[0] + 0.5 >= c0 > cols[0] - 0.5 and cols[-1] + 0.5 < c1 <= cols[-1] + 1.5
    # in patient space from the SEG's own geometry: rows run superior -> inferior, cols anterior -> posterior
    rdir, cdir = iop[:3], iop[3:]

    def xyz(r, c):
        return ipp + c * spacing[1] * rdir + r * spacing[0] * cdir

    top_ant, bottom_post = xyz(rows[0], cols[0]), xyz(rows[-1], cols[-1])
    assert top_ant[2] > bottom_post[2]  # superior (LPS +z) above inferior
    assert top_ant[1] < bottom_post[1]  # anterior (LPS -y) before posterior
    np.testing.assert_allclose(top_ant, vol.pixel_to_patient(k, r0, c0), atol=max(spacing))
    np.testing.assert_allclose(bottom_post, vol.pixel_to_patient(k, r1 - 1, c1 - 1), atol=max(spacing))


def test_new_series_in_source_study(result, seg):
    src = result.volume.datasets[0]
    assert seg.StudyInstanceUID == src.StudyInstanceUID == result.volume.study_uid
    assert seg.PatientID == src.PatientID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.SOPInstanceUID not in result.volume.sop_instance_uids
    assert "NOT FOR DIAGNOSTIC USE" in seg.SeriesDescription == SEG_SERIES_DESCRIPTION
    assert seg.Modality == "SEG" and int(seg.SeriesNumber) == 901
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(
        result.volume.sop_instance_uids
    )


def test_unnamed_vertebra_left_out_and_headers_required(result):
    r = copy.copy(result)
    r.vertebrae = [copy.copy(t) for t in result.vertebrae]
    r.vertebrae[0].level = "?"
    masks, levels = seg_masks(r)
    assert levels == [t.level for t in result.vertebrae[1:] if t.level != "?"]
    ds = build_vertebra_seg(r, series_number=950, manufacturer="test")
    assert len(ds.SegmentSequence) == len(levels) and int(ds.SeriesNumber) == 950 and ds.Manufacturer == "test"
    r.volume = dataclasses.replace(result.volume, datasets=[])
    with pytest.raises(ValueError, match="header"):
        build_vertebra_seg(r)


def test_source_without_type2_study_attributes(result, tmp_path):
    heads = [ds.copy() for ds in result.volume.datasets]
    for name in ("AccessionNumber", "PatientBirthDate", "StudyID"):
        delattr(heads[0], name)
    r = copy.copy(result)
    r.volume = dataclasses.replace(result.volume, datasets=heads)
    out = hd.seg.segread(write_seg(r, tmp_path / "seg.dcm"))
    assert out.AccessionNumber == "" and out.StudyID == ""
    assert "AccessionNumber" not in heads[0]  # the caller's headers are left alone
