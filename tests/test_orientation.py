"""Canonical orientation (issue 12, item 1): a real series stored in all 8 in-plane orientations (rows and/or
columns reversed, transposed; ImageOrientationPatient and ImagePositionPatient rewritten so the patient
geometry is identical) gives the same level names, findings and patient-mm positions, and every output that
references the source (JSON boxes, SEG frames, SR regions) lands on the same anatomy in the stored pixels."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import DATA, EXAMPLE, store_as

from spinepath import stages
from spinepath.core.errors import StudyError
from spinepath.io.dicom import load_study
from spinepath.io.volumes import load_image_volume
from spinepath.outputs.sr import read_findings
from spinepath.outputs.writer import write_outputs

VARIANTS = list(itertools.product([False, True], repeat=3))  # (transpose, reverse rows, reverse columns)


def _ids(v) -> str:
    return "-".join(n for n, f in zip(("T", "R", "C"), v) if f) or "as-stored"


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    volume = load_study(EXAMPLE)
    result = stages.analyse(volume, *models)
    out = tmp_path_factory.mktemp("as-stored")
    write_outputs(result, out)
    return volume, json.loads((out / "vertebrae.json").read_text()), out


def _centres(doc: dict) -> dict[str, list]:
    return {v["level"]: [s["box_patient_mm"]["centre"] for s in v["slices"]] for v in doc["vertebrae"]}


def _findings(doc: dict) -> tuple:
    verts = [(v["level"], v["pathology"] and (v["pathology"]["label"], v["pathology"]["probability"]))
             for v in doc["vertebrae"]]
    return verts, [(d["level"], d.get("grade"), (d.get("pfirrmann") or {}).get("grade")) for d in doc["discs"]]


def _seg_centroids(seg_path: Path, series: Path) -> dict[str, np.ndarray]:
    """Patient-mm centroid of each SEG segment, from the frames and the geometry of the instances they reference."""
    seg = hd.seg.segread(str(seg_path))
    geo = {}
    for p in series.glob("*.dcm"):
        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        geo[str(ds.SOPInstanceUID)] = ds
    uids = sorted(geo)
    out = {}
    for seg_item in seg.SegmentSequence:
        number = int(seg_item.SegmentNumber)
        masks = seg.get_pixels_by_source_instance(uids, segment_numbers=[number],
                                                  assert_missing_frames_are_empty=False)[..., 0]
        pts = []
        for uid, m in zip(uids, masks):
            if not m.any():
                continue
            ds = geo[uid]
            iop = np.array([float(x) for x in ds.ImageOrientationPatient])
            ipp = np.array([float(x) for x in ds.ImagePositionPatient])
            sr, sc = (float(x) for x in ds.PixelSpacing)
            r, c = np.nonzero(m)
            pts.append(ipp + np.outer(c * sc, iop[:3]) + np.outer(r * sr, iop[3:]))
        out[str(seg_item.SegmentDescription)] = np.concatenate(pts).mean(axis=0)
    return out


def _sr_corners(sr_path: Path, series: Path) -> dict[str, np.ndarray]:
    """Patient-mm corners (sorted) of every SR region, from the polyline and the referenced instance's geometry."""
    geo = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(str(p), stop_before_pixels=True)
                                                for p in series.glob("*.dcm"))}
    out = {}

    def to_mm(ds, points) -> np.ndarray:
        iop = np.array([float(x) for x in ds.ImageOrientationPatient])
        ipp = np.array([float(x) for x in ds.ImagePositionPatient])
        sr, sc = (float(x) for x in ds.PixelSpacing)
        # SCOORD (column, row) with 0\0 the corner of the first pixel: pixel centres are at +0.5
        return np.array([ipp + (x - 0.5) * sc * iop[:3] + (y - 0.5) * sr * iop[3:] for x, y in points])

    for kind, entries in read_findings(sr_path).items():
        for level, e in entries.items():
            if kind == "measurements":  # every measured line (its two ends, sorted) on the key slice
                ds = geo[e["source_sop_instance_uid"]]
                for name, lines in e["lines"].items():
                    for i, ln in enumerate(lines):
                        pts = to_mm(ds, ln)
                        out[f"{kind}:{level}:{name}:{i}"] = pts[np.lexsort(pts.T[::-1])]
                continue
            pts = to_mm(geo[e["source_sop_instance_uid"]], e["polyline"][:4])
            out[f"{kind}:{level}"] = pts[np.lexsort(pts.T[::-1])]
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=[_ids(v) for v in VARIANTS])
def test_eight_orientations_same_findings(variant, models, reference, tmp_path):
    ref_volume, ref, ref_out = reference
    study = store_as(EXAMPLE, tmp_path / "study", *variant)
    volume = load_study(study)
    # the models see the same canonical pixels and geometry, whatever the stored order
    assert np.array_equal(volume.pixels, ref_volume.pixels)
    assert np.allclose(volume.positions, ref_volume.positions, atol=1e-3)
    assert np.allclose(volume.orientation, ref_volume.orientation, atol=1e-6)
    assert volume.inplane.identity == (not any(variant)) and volume.inplane.transpose == variant[0]
    result = stages.analyse(volume, *models)
    out = tmp_path / "out"
    write_outputs(result, out)
    doc = json.loads((out / "vertebrae.json").read_text())
    assert doc["levels"] == ref["levels"] and len(ref["levels"]) >= 5
    assert _findings(doc) == _findings(ref)
    ref_c, c = _centres(ref), _centres(doc)
    for level in ref_c:
        assert np.allclose(c[level], ref_c[level], atol=1.0), level
    # JSON boxes are in the stored pixels: through the stored geometry they give the same patient position
    by_uid = {str(pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID): p for p in study.glob("*.dcm")}
    v0 = doc["vertebrae"][len(doc["vertebrae"]) // 2]["slices"][0]
    ds = pydicom.dcmread(str(by_uid[v0["sop_instance_uid"]]), stop_before_pixels=True)
    b = v0["box_pixels"]
    iop = np.array([float(x) for x in ds.ImageOrientationPatient])
    row, col = (b["row_min"] + b["row_max"]) / 2 - 0.5, (b["col_min"] + b["col_max"]) / 2 - 0.5
    centre = (np.array([float(x) for x in ds.ImagePositionPatient]) + col * float(ds.PixelSpacing[1]) * iop[:3]
              + row * float(ds.PixelSpacing[0]) * iop[3:])
    assert np.allclose(centre, v0["box_patient_mm"]["centre"], atol=1.0)
    # SEG frames, SR regions and measured lines, read through the stored geometry, cover the same anatomy
    ref_seg = _seg_centroids(ref_out / "dicom" / "seg.dcm", EXAMPLE)
    seg = _seg_centroids(out / "dicom" / "seg.dcm", study)
    assert seg.keys() == ref_seg.keys()
    for level in seg:
        assert np.allclose(seg[level], ref_seg[level], atol=1.0), level
    ref_sr, sr = _sr_corners(ref_out / "dicom" / "sr.dcm", EXAMPLE), _sr_corners(out / "dicom" / "sr.dcm", study)
    assert sr.keys() == ref_sr.keys()
    for key in sr:
        assert np.allclose(sr[key], ref_sr[key], atol=1.0), key


@pytest.mark.parametrize("tilt", [-30.0, 20.0])
def test_oblique_sagittal_is_read_and_named(tilt, models, reference, tmp_path):
    """A series tilted about the left-right axis (pixels unchanged, geometry rotated) is a sagittal series;
    stored transposed and reversed as well, it still gives the canonical pixels and the same names."""
    ref_volume, ref, _ = reference
    volume = load_study(store_as(EXAMPLE, tmp_path / "study", True, True, False, tilt_deg=tilt))
    assert np.array_equal(volume.pixels, ref_volume.pixels)
    assert volume.selection["main"]["plane"] == "sagittal"
    result = stages.analyse(volume, models[0])
    assert [t.level for t in result.vertebrae] == ref["levels"]


def test_axial_and_coronal_are_never_sagittal(tmp_path):
    """The example turned into a coronal or axial plane, or tilted 40 or 60 degrees off sagittal, is refused, and so is
    a series whose images change plane part-way (the plane is checked on every image, not the first)."""
    for tilt, plane in ((40.0, "oblique"), (60.0, "coronal")):
        with pytest.raises(StudyError, match=f"no sagittal MR series .*{plane}"):
            load_study(store_as(EXAMPLE, tmp_path / f"tilt-{tilt:g}", False, False, False, tilt_deg=tilt))
    axial = store_as(EXAMPLE, tmp_path / "axial", False, False, False)
    coronal = store_as(EXAMPLE, tmp_path / "coronal", False, False, False)
    for folder, iop in ((axial, [1, 0, 0, 0, 1, 0]), (coronal, [1, 0, 0, 0, 0, -1])):
        for p in folder.glob("*.dcm"):
            ds = pydicom.dcmread(str(p))
            ds.ImageOrientationPatient = iop
            ds.save_as(str(p))
        with pytest.raises(StudyError, match="no sagittal MR series"):
            load_study(folder)
    mixed = store_as(EXAMPLE, tmp_path / "mixed", False, False, False)
    last = sorted(mixed.glob("*.dcm"))[-1]
    ds = pydicom.dcmread(str(last))
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(str(last))
    with pytest.raises(StudyError, match="no sagittal MR series .*mixed"):
        load_study(mixed)


def test_dicom_and_nifti_front_ends_agree(tmp_path):
    """The DICOM reader and the NIfTI reader (MONAI Label's datastores) give the same canonical volume of a
    transposed, reversed series; labels written for it line up with the stored pixels."""
    import SimpleITK as sitk

    study = store_as(DATA / "dicom_examples" / "chu_t2_04", tmp_path / "study", True, False, True)
    volume, reference = load_image_volume(study)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(study)))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "series.nii.gz"))
    nifti, _ = load_image_volume(tmp_path / "series.nii.gz")
    assert nifti.pixels.shape == volume.pixels.shape
    assert np.allclose(nifti.pixels, volume.pixels)
    assert np.allclose(nifti.positions, volume.positions, atol=1e-2)
    # the label reference is the stored grid: the stored first file's first pixel and its axes
    first = min((pydicom.dcmread(str(p), stop_before_pixels=True) for p in study.glob("*.dcm")),
                key=lambda d: float(np.cross(np.array(d.ImageOrientationPatient[:3], float),
                                             np.array(d.ImageOrientationPatient[3:], float))
                                    @ np.array(d.ImagePositionPatient, float)))
    assert reference.GetSize()[:2] == (int(first.Columns), int(first.Rows))
    assert np.allclose(reference.GetOrigin(), [float(x) for x in first.ImagePositionPatient], atol=1e-2)
    assert np.allclose(np.array(reference.GetDirection()).reshape(3, 3)[:, 0],
                       [float(x) for x in first.ImageOrientationPatient[:3]], atol=1e-6)
