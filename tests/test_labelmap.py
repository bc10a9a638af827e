"""Label maps: volume geometry round trips, detections -> label volume -> training boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spinepath.core.errors import StudyError
from spinepath.core.labels import load_label_map
from spinepath.core.paths import resolve_model_path
from spinepath.detection.predictor import VertebraDetector
from spinepath.io.dicom import load_study
from spinepath.io.volumes import image_from_volume, labels_on_volume, read_volume, write_image, write_label_like
from spinepath.labeling.corrections import slices_from_label_file, slices_from_labels
from spinepath.labeling.labelmap import render_labels
from spinepath.stages import detect_series

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dicom_examples" / "chu_t2_02"


@pytest.fixture(scope="module")
def volume():
    return load_study(EXAMPLE)


@pytest.fixture(scope="module")
def result(volume):
    return detect_series(volume, VertebraDetector.load(resolve_model_path()))


def test_label_map_is_the_shared_config() -> None:
    lm = load_label_map()
    assert list(lm)[-6:] == ["L1", "L2", "L3", "L4", "L5", "S1"]
    assert len({lab.value for lab in lm.values()}) == len(lm)


@pytest.mark.parametrize("orientation", [None, "LPS", "RAS", "IPL"])
def test_volume_round_trip_any_orientation(volume, tmp_path: Path, orientation: str | None) -> None:
    img = image_from_volume(volume)
    if orientation:
        img = sitk.DICOMOrient(img, orientation)
    back = read_volume(write_image(img, tmp_path / "v.nii.gz"))
    assert np.array_equal(back.pixels, volume.pixels)
    for k, r, c in ((0, 0, 0), (7, 120.5, 200), (18, 380, 10)):
        assert np.allclose(back.pixel_to_patient(k, r, c), volume.pixel_to_patient(k, r, c), atol=1e-3)


def test_non_sagittal_acquisition_is_refused(tmp_path: Path) -> None:
    img = sitk.Image(64, 64, 12, sitk.sitkFloat32)
    img.SetSpacing((0.8, 0.8, 5.0))  # axial slices 5 mm apart (slice axis = superior-inferior)
    with pytest.raises(StudyError, match="not a sagittal"):
        read_volume(write_image(img, tmp_path / "axial.nii.gz"))
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(StudyError, match="cannot read"):
        read_volume(tmp_path / "junk.nii.gz")


def test_detections_to_labels_and_back(volume, result, tmp_path: Path) -> None:
    labels, drawn = render_labels(result)
    lm = load_label_map()
    assert drawn == [t.level for t in result.vertebrae if t.level in lm]
    slices, summary = slices_from_labels(volume, labels, "chu_t2_02")
    assert summary.levels == drawn and summary.slices == volume.pixels.shape[0]
    assert summary.boxes == sum(len(t.slices) for t in result.vertebrae if t.level in lm)
    for t in result.vertebrae:
        for k, b in zip(t.slices, t.boxes):
            s = slices[k]
            (i,) = [j for j, lv in enumerate(s.levels) if lv == t.level]
            # boxes overlap where neighbours touch (the lower one is drawn last): compare loosely
            assert np.abs(s.boxes[i] - b).max() <= 4, (t.level, k)
    # written on a differently oriented grid, read back the same
    ref = sitk.DICOMOrient(image_from_volume(volume), "LPS")
    write_image(ref, tmp_path / "img.nii.gz")
    write_label_like(labels, volume, ref, tmp_path / "lab.nii.gz")
    assert np.array_equal(labels_on_volume(sitk.ReadImage(str(tmp_path / "lab.nii.gz")), volume), labels)
    s2, summary2 = slices_from_label_file(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", "x")
    assert summary2.levels == drawn and summary2.boxes == summary.boxes


def test_unknown_values_and_wrong_shapes(volume) -> None:
    labels = np.zeros(volume.pixels.shape, np.int64)
    labels[3, 10:20, 10:30] = 15  # L3
    labels[4, 50:60, 10:30] = 200  # not in the label map
    slices, summary = slices_from_labels(volume, labels, "x")
    assert summary.levels == ["L3"] and summary.unknown_values == [200] and summary.boxes == 1
    assert slices[3].boxes.tolist() == [[10, 10, 20, 30]] and len(slices[4].boxes) == 0
    with pytest.raises(StudyError, match="does not match"):
        slices_from_labels(volume, labels[:, :-1], "x")


def test_seg_segments_named_as_ohif_or_spinepath_name_them(volume) -> None:
    """A structure SEG reads back by segment name: spinepath's own labels ("L3 vertebral body", "L3-L4
    intervertebral disc"), OHIF's bare names, any letter case; a name outside the label map is refused."""
    import pydicom

    from spinepath.labeling.labelmap import labels_from_seg, segment_level
    from spinepath.labeling.structures import structure_label_map
    from spinepath.outputs.seg import build_level_seg

    lab = structure_label_map()
    masks = np.zeros((3, *volume.pixels.shape), bool)
    masks[0, 5, 100:120, 100:120] = masks[1, 5, 125:135, 100:120] = masks[2, 5, 100:140, 150:160] = True
    seg = build_level_seg(volume, masks, ["L3", "L3-L4", "spinal canal"], manual=True)
    got = labels_from_seg(seg, volume, lab)
    expected = np.zeros(volume.pixels.shape, np.int64)
    for m, name in zip(masks, ["L3", "L3-L4", "spinal canal"]):
        expected[m] = lab[name].value
    np.testing.assert_array_equal(got, expected)
    for label, description, name in (("L4", "", "L4"), ("l4-l5", "", "L4-L5"), ("SPINAL CANAL", "", "spinal canal"),
                                     ("", "T12", "T12"), ("L5-S1 intervertebral disc", "x", "L5-S1")):
        item = pydicom.Dataset()
        for key, value in (("SegmentLabel", label), ("SegmentDescription", description)):
            if value:
                setattr(item, key, value)
        assert segment_level(item, lab) == name
    with pytest.raises(StudyError, match="not levels of the label map"):
        labels_from_seg(seg, volume)  # the vertebrae' map alone has no disc or canal
