"""Deterministic synthetic sagittal T2 lumbar spine phantom, written as a DICOM MR series.

The phantom is the embedded default input of the application when no real example is available. It has
vertebral bodies (intermediate marrow signal, dark cortical rim), bright discs, a bright CSF-filled canal,
posterior elements, soft tissue and Rician-like noise, at clinical spacing (1 mm pixels, 4 mm slices).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

PHANTOM_LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")


def phantom_volume(
    n_slices: int = 19, size: int = 320, slice_mm: float = 4.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Synthesize the phantom.

    Returns:
        ``(image, labels)``: uint16 ``(n_slices, rows, cols)`` (rows S->I, cols A->P, slices R->L... as
        written: increasing patient x) and the vertebral-body label map (1..8 top-down = T11..S1).

    """
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((n_slices, size, size), np.float32)
    lab = np.zeros((n_slices, size, size), np.uint8)
    # spine axis: gentle lordosis, column position as a function of row
    spine_c = lambda r: size * 0.45 + 18 * np.sin((r / size) * np.pi * 0.9)  # noqa: E731
    body_h, disc_h, body_w = 26.0, 9.0, 36.0
    top = 22.0
    mid = (n_slices - 1) / 2
    for k in range(n_slices):
        x_mm = (k - mid) * slice_mm
        lat = max(0.0, 1 - (abs(x_mm) / 26.0) ** 2)  # body half-width ~26 mm laterally
        s = img[k]
        s[:] = 180 + 30 * np.sin(rr / 37.0) * np.cos(cc / 53.0)  # soft tissue / fat
        s[(cc < size * 0.12) | (cc > size * 0.9)] = 15  # air outside the body
        r = top
        for i, _ in enumerate(PHANTOM_LEVELS):
            h = body_h * (1.15 if i == len(PHANTOM_LEVELS) - 1 else 1.0)
            rc = r + h / 2
            c0 = spine_c(rc) - body_w / 2
            w = body_w * (0.6 + 0.4 * lat) if lat > 0 else 0
            if w > 0:
                inb = (np.abs(rr - rc) <= h / 2 * np.sqrt(lat)) & (cc >= c0) & (cc <= c0 + w)
                rim = inb & ~((np.abs(rr - rc) <= h / 2 * np.sqrt(lat) - 2) & (cc >= c0 + 2) & (cc <= c0 + w - 2))
                s[inb] = 260
                s[rim] = 60
                lab[k][inb] = i + 1
                # posterior elements (dark bone) behind the canal
                pe = (np.abs(rr - rc) <= h / 2.5) & (cc >= c0 + body_w + 14) & (cc <= c0 + body_w + 30)
                s[pe] = 90
            r += h
            if i < len(PHANTOM_LEVELS) - 1:
                dc = r + disc_h / 2
                c0 = spine_c(dc) - body_w / 2
                if lat > 0:
                    ind = (
                        (np.abs(rr - dc) <= disc_h / 2 * np.sqrt(lat))
                        & (cc >= c0 + 2)
                        & (cc <= c0 + body_w * (0.6 + 0.4 * lat) - 2)
                    )
                    s[ind] = 430
                r += disc_h
        # CSF canal (bright) behind the bodies, only near the midline
        if abs(x_mm) <= 10:
            canal = (np.abs(cc - (spine_c(rr) + body_w / 2 + 7)) <= 6) & (rr < r)
            s[canal] = 520
    noise = rng.normal(0, 12, img.shape) + 1j * rng.normal(0, 12, img.shape)
    img = np.abs(img + noise)
    return np.clip(img, 0, 4095).astype(np.uint16), lab


def write_phantom_study(out_dir: str | Path, seed: int = 0, n_slices: int = 19, size: int = 320) -> Path:
    """Write the phantom as a single-frame MR Image Storage series (sagittal, IOP 0\\1\\0\\0\\0\\-1).

    Deterministic: the same seed gives the same pixels and UIDs.

    Returns:
        The folder holding the series.

    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img, _ = phantom_volume(n_slices=n_slices, size=size, seed=seed)
    entropy = f"spinepath-phantom-{seed}"
    study_uid = generate_uid(entropy_srcs=[entropy, "study"])
    series_uid = generate_uid(entropy_srcs=[entropy, "series"])
    for_uid = generate_uid(entropy_srcs=[entropy, "for"])
    slice_mm = 4.0
    for k in range(n_slices):
        sop_uid = generate_uid(entropy_srcs=[entropy, "sop", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out / f"IM{k + 1:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality = "MR"
        ds.PatientName = "PHANTOM^SPINE"
        ds.PatientID = "PHANTOM"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = datetime.date(2026, 1, 1).strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Manufacturer = "spinepath phantom"
        ds.StudyDescription = "L-SPINE MRI PHANTOM"
        ds.SeriesDescription = "T2_TSE_SAG"
        ds.BodyPartExamined = "LSPINE"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "SK", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = 3500.0, 100.0, 1.5
        ds.SliceThickness = slice_mm
        ds.SpacingBetweenSlices = slice_mm
        ds.PatientPosition = "HFS"
        x = (k - (n_slices - 1) / 2) * slice_mm
        ds.ImagePositionPatient = [x, -size / 2, size / 2]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.SliceLocation = x
        ds.PixelSpacing = [1.0, 1.0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = img.shape[1], img.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = img[k].tobytes()
        if int(pydicom.__version__.split(".")[0]) < 3:
            ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(str(out / f"IM{k + 1:04d}.dcm"), ds, **_write_kwargs())
    return out


def _write_kwargs() -> dict:
    """``dcmwrite`` keywords that work on pydicom 2.4 and 3.x."""
    major = int(pydicom.__version__.split(".")[0])
    return {"enforce_file_format": True} if major >= 3 else {"write_like_original": False}


def add_t1_companion(study: str | Path, shift_mm: float = 2.0) -> str:
    """Write a crafted sagittal T1 series into a study folder, beside its T2; returns its SeriesInstanceUID.

    The T2's own pixels under a new series with T1 timing (TR 600 ms, TE 10 ms) and positions shifted
    ``shift_mm`` along the first patient axis: it exercises the T1 plumbing (series selection, the nearest
    slice, a second detector pass, fusion by level) in tests and benchmarks, since the shared data has no T1
    DICOM series. Its grades mean nothing clinically.
    """
    study = Path(study)
    uid = generate_uid()
    for f in sorted(study.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription, ds.SeriesNumber = "T1_TSE_SAG", 5
        ds.RepetitionTime, ds.EchoTime = 600, 10
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0] + shift_mm, ipp[1], ipp[2]]
        ds.save_as(study / f"t1_{f.name}")
    return uid
