import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import EXAMPLE, edit_all
from pydicom.uid import generate_uid

from spinepath.core.errors import StudyError
from spinepath.io.dicom import load_series, load_study, scan_study, select_series


def test_real_example_volume_geometry():
    vol = load_study(EXAMPLE)
    assert vol.pixels.shape == (19, 381, 381)
    assert vol.spacing == (1.0, 1.0)
    assert vol.slice_spacing == pytest.approx(4.0)
    assert vol.description == "T2_TSE_SAG"
    # slices sorted along the normal, UIDs aligned with slices
    d = vol.positions @ vol.normal
    assert np.all(np.diff(d) > 0)
    assert len(set(vol.sop_instance_uids)) == 19


def test_pixel_patient_round_trip():
    vol = load_study(EXAMPLE)
    rng = np.random.default_rng(0)
    for _ in range(20):
        k, r, c = int(rng.integers(0, 19)), float(rng.uniform(0, 380)), float(rng.uniform(0, 380))
        xyz = vol.pixel_to_patient(k, r, c)
        k2, r2, c2 = vol.patient_to_pixel(xyz)
        assert (k2, r2, c2) == pytest.approx((k, r, c), abs=1e-6)
    # rows run inferior (patient z decreases), columns posterior (y increases)
    a, b, c = vol.pixel_to_patient(0, 0, 0), vol.pixel_to_patient(0, 10, 0), vol.pixel_to_patient(0, 0, 10)
    assert b[2] < a[2] and c[1] > a[1]


def test_nested_study_with_several_series_and_stray_files(tmp_path):
    study = tmp_path / "study"
    shutil.copytree(EXAMPLE, study / "a" / "sag")
    ax = study / "b" / "ax"
    shutil.copytree(EXAMPLE, ax)
    uid = generate_uid()

    def to_axial(ds):
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SeriesDescription = "T2_TSE_AX"

    edit_all(ax, to_axial)
    (study / "notes.txt").write_text("not dicom")
    (study / "a" / "DICOMDIR.bak").write_bytes(b"\0" * 300)
    series = scan_study(study)
    assert len(series) == 2
    chosen = select_series(series)
    assert chosen.plane == "sagittal" and chosen.description == "T2_TSE_SAG"
    assert load_series(chosen).pixels.shape[0] == 19


def _expect(folder: Path, words: str):
    with pytest.raises(StudyError, match=words):
        load_study(folder)


def test_refuses_empty_folder(tmp_path):
    _expect(tmp_path, "empty")


def test_refuses_non_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    _expect(tmp_path, "no readable DICOM")


def test_refuses_ct(example_copy):
    edit_all(example_copy, lambda ds: setattr(ds, "Modality", "CT"))
    _expect(example_copy, "no MR series.*CT")


def test_refuses_axial_only(example_copy):
    edit_all(example_copy, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]))
    _expect(example_copy, "no sagittal MR series.*axial")


def test_refuses_sagittal_t1_by_rule(example_copy):
    edit_all(example_copy, lambda ds: setattr(ds, "SeriesDescription", "T1_TSE_SAG"))
    _expect(example_copy, "excluded by the rules")


def test_refuses_single_image(example_copy):
    for p in sorted(example_copy.glob("*.dcm"))[1:]:
        p.unlink()
    _expect(example_copy, "single image")


def test_refuses_missing_spacing(example_copy):
    edit_all(example_copy, lambda ds: delattr(ds, "PixelSpacing"))
    _expect(example_copy, "missing PixelSpacing")


def test_refuses_missing_orientation(example_copy):
    edit_all(example_copy, lambda ds: delattr(ds, "ImageOrientationPatient"))
    _expect(example_copy, "missing ImageOrientationPatient")


def test_refuses_unreadable_pixels(example_copy):
    p = sorted(example_copy.glob("*.dcm"))[3]
    ds = pydicom.dcmread(str(p))
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(str(p))
    _expect(example_copy, "unreadable pixel data")


def test_refuses_mixed_matrix(example_copy):
    p = sorted(example_copy.glob("*.dcm"))[2]
    ds = pydicom.dcmread(str(p))
    ds.Rows, ds.Columns = 100, 100
    ds.PixelData = np.zeros((100, 100), np.uint16).tobytes()
    ds.save_as(str(p))
    _expect(example_copy, "mixed matrix sizes")
