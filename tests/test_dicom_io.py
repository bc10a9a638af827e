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


def _as_t1(ds):
    ds.RepetitionTime, ds.EchoTime = 550, 11


def test_refuses_sagittal_t1_by_acquisition(example_copy):
    """A T1 acquisition is not a T2 series, whatever its name; the refusal says what the series are."""
    edit_all(example_copy, _as_t1)
    _expect(example_copy, r"no sagittal T2 series: the sagittal series are T2_TSE_SAG: T1 \(spin echo TR 550 TE 11\)")


def test_sequence_by_acquisition_not_by_name(example_copy):
    """A T2 acquisition named T1 is the T2 series (the description only breaks ties), recorded with why."""
    edit_all(example_copy, lambda ds: setattr(ds, "SeriesDescription", "T1_TSE_SAG"))
    vol = load_study(example_copy)
    main = vol.selection["main"]
    assert main["sequence"] == {"kind": "t2", "reason": "spin echo TR 3500 TE 100", "by_description": False}
    assert main["reason"].startswith("sagittal T2") and vol.selection["t1"] is None


def _second_series(src: Path, dst: Path, fn=None, keep: int | None = None) -> None:
    shutil.copytree(src, dst)
    uid = generate_uid()

    def edit(ds):
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if fn is not None:
            fn(ds)

    edit_all(dst, edit)
    for p in sorted(dst.glob("*.dcm"))[keep:] if keep is not None else []:
        p.unlink()


def test_t2_and_t1_of_the_study_are_chosen_and_recorded(tmp_path):
    study = tmp_path / "study"
    shutil.copytree(EXAMPLE, study / "t2")
    _second_series(EXAMPLE, study / "t1", lambda ds: (_as_t1(ds), setattr(ds, "SeriesDescription", "sag T1")))

    def stir(ds):
        ds.InversionTime, ds.ScanningSequence, ds.SeriesDescription = 150, ["SE", "IR"], "sag STIR"

    _second_series(EXAMPLE, study / "stir", stir)
    vol = load_study(study)
    sel = vol.selection
    assert vol.description == "T2_TSE_SAG" and sel["main"]["sequence"]["kind"] == "t2"
    assert sel["t1"]["series_description"] == "sag T1" and sel["t1"]["sequence"]["kind"] == "t1"
    assert sel["candidates"] == 1 and sel["failed"] == []


def test_next_candidate_when_the_chosen_series_fails(tmp_path):
    """The best-ranked T2 (more images) has unreadable pixels: the next T2 is read, and the JSON says so."""
    study = tmp_path / "study"
    shutil.copytree(EXAMPLE, study / "a")
    _second_series(EXAMPLE, study / "b", keep=12)
    for p in sorted((study / "a").glob("*.dcm"))[3:4]:
        ds = pydicom.dcmread(str(p))
        ds.PixelData = ds.PixelData[:1000]
        ds.save_as(str(p))
    vol = load_study(study)
    assert vol.pixels.shape[0] == 12
    sel = vol.selection
    assert len(sel["failed"]) == 1 and "unreadable pixel data" in sel["failed"][0]["error"]
    assert "1 better-ranked candidate could not be read" in sel["main"]["reason"]
    for p in sorted((study / "b").glob("*.dcm"))[:1]:
        p.unlink()
        (study / "b" / p.name).write_bytes(b"")
    for p in sorted((study / "b").glob("*.dcm"))[1:2]:
        ds = pydicom.dcmread(str(p))
        ds.PixelData = ds.PixelData[:1000]
        ds.save_as(str(p))
    with pytest.raises(StudyError, match="unreadable pixel data.*and the 1 other candidate series could not be read"):
        load_study(study)


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
