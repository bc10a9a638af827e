"""Shared fixtures: real data from ../shared/data, crafted DICOM studies."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
EXAMPLE = DATA / "dicom_examples" / "chu_t2_02"
MODEL = REPO / "bundle" / "models" / "model.pt"


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def models():
    """The committed detector, grading model, SPIDER degenerative grader and segmentation network (loaded once)."""
    from spinepath import stages

    return (*stages.load_models(), stages.load_spider_grader(), stages.load_segmenter())


@pytest.fixture
def example_copy(tmp_path: Path) -> Path:
    """A writable copy of a real example series."""
    dst = tmp_path / "study"
    shutil.copytree(EXAMPLE, dst)
    return dst


def rician(pixels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Rician noise at ``fraction`` of the 99th intensity percentile: a low-SNR acquisition of the same anatomy."""
    sd = fraction * np.percentile(pixels, 99)
    return np.sqrt((pixels + rng.normal(0, sd, pixels.shape)) ** 2 + rng.normal(0, sd, pixels.shape) ** 2)


def edit_all(folder: Path, fn) -> None:
    """Apply ``fn(ds)`` to every DICOM file in a folder and save it back."""
    for p in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(str(p))
        fn(ds)
        ds.save_as(str(p))


def store_as(src: Path, dst: Path, transpose: bool, flip_rows: bool, flip_cols: bool, tilt_deg: float = 0.0,
             new_uids: bool = True) -> Path:
    """Rewrite a series with its pixels transposed / reversed and the geometry rewritten to match.

    The new geometry is derived independently of the product's code: from where the new first pixel and its
    row / column neighbours were in the old image. ``tilt_deg`` rotates the patient geometry about the
    superior-inferior axis: the slice normal leaves the left-right axis (an oblique sagittal acquisition).
    """
    dst.mkdir(parents=True)
    series_uid = generate_uid()
    c, s = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    for p in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(str(p))
        arr = ds.pixel_array
        rows, cols = np.indices(arr.shape)

        def t(a):
            a = a.T if transpose else a
            a = a[::-1] if flip_rows else a
            return np.ascontiguousarray(a[:, ::-1] if flip_cols else a)

        new, old_r, old_c = t(arr), t(rows), t(cols)
        iop = np.array([float(x) for x in ds.ImageOrientationPatient])
        ipp = np.array([float(x) for x in ds.ImagePositionPatient])
        sr, sc = (float(x) for x in ds.PixelSpacing)

        def where(r, c_, ipp=ipp, iop=iop, sr=sr, sc=sc):
            return ipp + c_ * sc * iop[:3] + r * sr * iop[3:]

        o = where(old_r[0, 0], old_c[0, 0])
        step_c = where(old_r[0, 1], old_c[0, 1]) - o  # one new column to the right
        step_r = where(old_r[1, 0], old_c[1, 0]) - o  # one new row down
        ds.ImageOrientationPatient = [round(float(x), 6) for x in
                                      np.concatenate([rot @ step_c / np.linalg.norm(step_c),
                                                      rot @ step_r / np.linalg.norm(step_r)])]
        ds.ImagePositionPatient = [round(float(x), 4) for x in rot @ o]
        ds.PixelSpacing = [round(float(np.linalg.norm(step_r)), 6), round(float(np.linalg.norm(step_c)), 6)]
        ds.Rows, ds.Columns = new.shape
        ds.PixelData = new.astype(arr.dtype).tobytes()
        if new_uids:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(str(dst / p.name))
    return dst


def dciodvfy_errors(path) -> list[str]:
    """Lines of dciodvfy's report that are errors (warnings are allowed)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy missing: run scripts/setup_system.sh (Debian dicom3tools)"
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


def copy_study(src: Path, dst: Path, edit=None) -> str:
    """Copy a real series with new UIDs (one study, one series, one frame of reference); returns the study UID."""
    from spinepath.io.dicom import copy_with_new_uids

    return copy_with_new_uids(src, dst, edit)


def series_counts(url: str, study: str) -> dict[str, list[int]]:
    """Modality -> instance count of each series of the study in a DICOMweb server."""
    from dicomweb_client import DICOMwebClient

    from spinepath.io.pacs import find_series

    client = DICOMwebClient(url)
    counts: dict[str, list[int]] = {}
    for s in find_series(url, study):
        n = len(client.search_for_instances(study, s["SeriesInstanceUID"], get_remaining=True))
        counts.setdefault(s["Modality"], []).append(n)
    return counts
