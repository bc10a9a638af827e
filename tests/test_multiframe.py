"""Multi-frame input (issue 12, item 2): a real series converted to one Legacy Converted Enhanced MR object
(highdicom) gives the same findings as its single-frame original; its SEG and SR reference frames; an
Enhanced MR object is read the same way; missing functional groups are refused by name."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import EXAMPLE, store_as
from pydicom.uid import UID

from spinepath import stages
from spinepath.core.errors import StudyError
from spinepath.io.dicom import load_study
from spinepath.outputs.sr import read_findings
from spinepath.outputs.writer import write_outputs

ENHANCED_MR = UID("1.2.840.10008.5.1.4.1.1.4.1")


def convert(series: Path, dst: Path, reverse_frames: bool = True) -> Path:
    """The series as one Legacy Converted Enhanced MR Image (frames in reverse file order when asked)."""
    dss = [pydicom.dcmread(str(p)) for p in sorted(series.glob("*.dcm"))]
    if reverse_frames:
        dss = dss[::-1]
    with warnings.catch_warnings():  # highdicom quotes the placeholder patient name in a warning
        warnings.simplefilter("ignore")
        mf = hd.legacy.LegacyConvertedEnhancedMRImage(dss, series_instance_uid=hd.UID(), series_number=99,
                                                      sop_instance_uid=hd.UID(), instance_number=1)
    dst.mkdir(parents=True)
    mf.save_as(str(dst / "multiframe.dcm"))
    return dst


@pytest.fixture(scope="module")
def single(models, tmp_path_factory):
    volume = load_study(EXAMPLE)
    out = tmp_path_factory.mktemp("single")
    write_outputs(stages.analyse(volume, *models), out)
    return volume, json.loads((out / "vertebrae.json").read_text())


def _summary(doc: dict) -> tuple:
    verts = [(v["level"], v["pathology"] and v["pathology"]["label"], v["pathology"] and v["pathology"]["probability"],
              [s["box_patient_mm"]["centre"] for s in v["slices"]]) for v in doc["vertebrae"]]
    return verts, [(d["level"], d.get("grade"), d.get("probabilities"), d.get("pfirrmann")) for d in doc["discs"]]


@pytest.mark.parametrize("transposed", [False, True], ids=["as-stored", "transposed-reversed"])
def test_legacy_converted_gives_the_same_findings(transposed, models, single, tmp_path):
    volume_1, doc_1 = single
    source = store_as(EXAMPLE, tmp_path / "stored", True, True, False) if transposed else EXAMPLE
    study = convert(source, tmp_path / "study")
    volume = load_study(study)
    assert np.array_equal(volume.pixels, volume_1.pixels)
    assert np.allclose(volume.positions, volume_1.positions, atol=1e-3)
    assert volume.selection["main"]["multiframe"] and volume.selection["main"]["sequence"]["kind"] == "t2"
    assert not volume.selection["main"]["sequence"]["by_description"]  # TR/TE of the converted attributes
    assert sorted(volume.frame_numbers) == list(range(1, 20)) and volume.frame_numbers[0] == 19
    out = tmp_path / "out"
    result = stages.analyse(volume, *models)
    write_outputs(result, out)
    doc = json.loads((out / "vertebrae.json").read_text())
    assert _summary(doc) == _summary(doc_1)
    mf = pydicom.dcmread(str(study / "multiframe.dcm"))
    uid = str(mf.SOPInstanceUID)
    first = doc["vertebrae"][0]["slices"][0]
    assert first["sop_instance_uid"] == uid and first["frame_number"] == volume.frame_numbers[first["slice_index"]]
    # the SEG references the frames: the segmented key slice's frame carries each body's mask, in stored pixels
    seg = hd.seg.segread(str(out / "dicom" / "seg.dcm"))
    level = doc["vertebrae"][len(doc["vertebrae"]) // 2]["level"]
    number = next(int(s.SegmentNumber) for s in seg.SegmentSequence if s.SegmentDescription == level)
    k = doc["segmentation"]["key_slice"]
    got = seg.get_pixels_by_source_frame(uid, [volume.frame_numbers[k]], segment_numbers=[number])[0, ..., 0]
    assert got.any() and np.array_equal(got > 0, volume.inplane.to_source(
        result.segmentation.instances[k]["bodies"][level]))
    # the SR regions reference the multi-frame instance and one frame each
    sr = pydicom.dcmread(str(out / "dicom" / "sr.dcm"))
    refs = [item for item in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            .ReferencedSOPSequence]
    assert [str(r.ReferencedSOPInstanceUID) for r in refs] == [uid]
    found = read_findings(out / "dicom" / "sr.dcm")
    assert found["vertebrae"].keys() == {v["level"] for v in doc["vertebrae"] if v["pathology"]}
    frame_refs = [[int(x) for x in np.atleast_1d(c.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber)]
                  for c in _items(sr) if c.get("ValueType") == "SCOORD"]
    lines = sum(len(v) for g in found["measurements"].values() for v in g["lines"].values())
    assert found["measurements"] and lines >= 15  # the measured lines, on the key slice's frame
    assert len(frame_refs) == len(found["vertebrae"]) + len(found["discs"]) + len(found["degeneration"]) + lines
    assert found["degeneration"]  # the degenerative grades of the discs, on the key slice's frame
    assert all(len(f) == 1 and 1 <= f[0] <= 19 for f in frame_refs)


def _items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def test_enhanced_mr_timing_groups(tmp_path):
    """An Enhanced MR Image Storage object, timing in the MR functional groups only, is read as a series and
    classed by its acquisition."""
    study = convert(EXAMPLE, tmp_path / "study", reverse_frames=False)
    path = study / "multiframe.dcm"
    mf = pydicom.dcmread(str(path))
    mf.SOPClassUID = mf.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    shared = mf.SharedFunctionalGroupsSequence[0]
    del shared.UnassignedSharedConvertedAttributesSequence
    timing, echo = pydicom.Dataset(), pydicom.Dataset()
    timing.RepetitionTime, echo.EffectiveEchoTime = 3500, 100
    shared.MRTimingAndRelatedParametersSequence = [timing]
    shared.MREchoSequence = [echo]
    mf.EchoPulseSequence = "SPIN"
    mf.SeriesDescription = "sagittal"  # no hint in the name
    mf.save_as(str(path))
    volume = load_study(study)
    assert volume.pixels.shape == (19, 381, 381)
    assert volume.selection["main"]["sequence"] == {"kind": "t2", "reason": "spin echo TR 3500 TE 100",
                                                    "by_description": False}
    assert np.array_equal(volume.pixels, load_study(EXAMPLE).pixels)


@pytest.mark.parametrize("group,attr", [("PlanePositionSequence", "ImagePositionPatient"),
                                        ("PlaneOrientationSequence", "ImageOrientationPatient"),
                                        ("PixelMeasuresSequence", "PixelSpacing")])
def test_missing_functional_groups_are_named(group, attr, tmp_path):
    study = convert(EXAMPLE, tmp_path / "study")
    path = study / "multiframe.dcm"
    mf = pydicom.dcmread(str(path))
    for g in (*mf.PerFrameFunctionalGroupsSequence, *mf.SharedFunctionalGroupsSequence):
        if group in g:
            delattr(g, group)
    mf.save_as(str(path))
    with pytest.raises(StudyError, match=f"multi-frame object missing its functional groups: .*{group} > {attr} "
                                         r"\(all 19 frames\)"):
        load_study(study)


def test_multiframe_without_any_functional_groups(tmp_path):
    study = convert(EXAMPLE, tmp_path / "study")
    path = study / "multiframe.dcm"
    mf = pydicom.dcmread(str(path))
    del mf.PerFrameFunctionalGroupsSequence
    del mf.SharedFunctionalGroupsSequence
    mf.save_as(str(path))
    with pytest.raises(StudyError, match="multi-frame object missing its functional groups: "
                                         "PerFrameFunctionalGroupsSequence"):
        load_study(study)
