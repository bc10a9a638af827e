"""DICOM study reading: series discovery, sagittal T2 series selection and volume geometry.

Works with pydicom 2.4 and 3.x and without Holoscan (training and the MONAI Label server use it too).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)
SELECTION_RULES = Path(__file__).resolve().parent.parent / "configs" / "series_selection.json"


class StudyError(ValueError):
    """The input study cannot be processed; the message names the reason (safe to log: no identifiers)."""


@dataclass
class SeriesInfo:
    """Header summary of one series in a study folder."""

    series_uid: str
    modality: str
    description: str
    files: list[Path]
    orientation: tuple[float, ...] | None
    study_uid: str = ""

    @property
    def plane(self) -> str:
        """``sagittal``, ``coronal``, ``axial`` or ``unknown`` from ImageOrientationPatient."""
        if self.orientation is None or len(self.orientation) != 6:
            return "unknown"
        n = np.cross(np.asarray(self.orientation[:3], float), np.asarray(self.orientation[3:], float))
        axis = int(np.argmax(np.abs(n)))
        if abs(n[axis]) < 0.8:
            return "oblique"
        return ("sagittal", "coronal", "axial")[axis]


@dataclass
class SeriesVolume:
    """A sagittal series as a stack of slices with its patient-coordinate geometry.

    Attributes:
        pixels: ``(n_slices, rows, cols)`` float32, slices sorted along the slice normal.
        spacing: ``(row_spacing, col_spacing)`` in mm (PixelSpacing).
        orientation: ImageOrientationPatient (row direction cosines, column direction cosines).
        positions: ``(n_slices, 3)`` ImagePositionPatient per slice (mm, LPS).
        sop_instance_uids: Per slice.
        series_uid / study_uid / frame_of_reference_uid / description: Identifiers of the series.
        slice_thickness: mm (None if absent).
        datasets: Header datasets per slice (no pixel data), for writers that reference the source.

    """

    pixels: np.ndarray
    spacing: tuple[float, float]
    orientation: np.ndarray
    positions: np.ndarray
    sop_instance_uids: list[str]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    description: str
    slice_thickness: float | None = None
    datasets: list = field(default_factory=list, repr=False)

    @property
    def slice_spacing(self) -> float:
        """Distance between neighbouring slices along the normal (mm)."""
        if len(self.positions) < 2:
            return float(self.slice_thickness or 1.0)
        d = np.diff(self.positions @ self.normal)
        return float(np.median(np.abs(d)))

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row cosines x column cosines)."""
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)

    def pixel_to_patient(self, slice_index: int | float, row: float, col: float) -> np.ndarray:
        """Patient coordinates (mm, LPS) of a pixel position (row, col) on a slice.

        Pixel centres are at integer positions; (0, 0) is the centre of the first transmitted pixel.
        """
        i = int(round(slice_index))
        origin = self.positions[i]
        rdir, cdir = self.orientation[:3], self.orientation[3:]
        # DICOM: x = origin + col * PixelSpacing[1] * row_cosines + row * PixelSpacing[0] * col_cosines
        return origin + col * self.spacing[1] * rdir + row * self.spacing[0] * cdir

    def patient_to_pixel(self, xyz: Sequence[float]) -> tuple[float, float, float]:
        """Inverse of :meth:`pixel_to_patient`: ``(slice_index, row, col)`` (slice index continuous)."""
        xyz = np.asarray(xyz, float)
        rdir, cdir, n = self.orientation[:3], self.orientation[3:], self.normal
        d = xyz - self.positions[0]
        col = float(d @ rdir) / self.spacing[1]
        row = float(d @ cdir) / self.spacing[0]
        dist = self.positions @ n
        s = float(np.interp(xyz @ n, dist, np.arange(len(dist)))) if len(dist) > 1 else 0.0
        return s, row, col


# ----------------------------------------------------------------------------------------------- reading
def _read_header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError):
        return None


def scan_study(folder: str | Path) -> list[SeriesInfo]:
    """Find every DICOM image series under a folder (recursively; non-DICOM files are skipped).

    Raises:
        StudyError: If the folder does not exist or holds no readable DICOM file.

    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyError(f"input folder does not exist: {folder}")
    groups: dict[str, SeriesInfo] = {}
    n_files = n_skipped = 0
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        n_files += 1
        ds = _read_header(p)
        if ds is None or "SOPClassUID" not in ds:
            n_skipped += 1
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "no-series-uid")
        if uid not in groups:
            iop = getattr(ds, "ImageOrientationPatient", None)
            groups[uid] = SeriesInfo(
                series_uid=uid,
                modality=str(getattr(ds, "Modality", "") or ""),
                description=str(getattr(ds, "SeriesDescription", "") or ""),
                files=[],
                orientation=tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None,
                study_uid=str(getattr(ds, "StudyInstanceUID", "") or ""),
            )
        groups[uid].files.append(p)
    if not groups:
        what = "is empty" if n_files == 0 else f"has no readable DICOM file ({n_skipped} other files skipped)"
        raise StudyError(f"input folder {what}")
    if n_skipped:
        log.info("skipped %d non-DICOM or unreadable files", n_skipped)
    return list(groups.values())


def load_rules(path: str | Path = SELECTION_RULES) -> dict:
    """Series selection rules (``configs/series_selection.json``)."""
    return json.loads(Path(path).read_text())


def select_series(series: list[SeriesInfo], rules: dict | None = None) -> SeriesInfo:
    """Pick the sagittal T2 series of a study by the configured rules.

    Rules: modality must be in ``modalities``; the plane (from ImageOrientationPatient) must be sagittal;
    at least ``min_images`` images; series whose description matches an ``exclude_patterns`` entry are refused
    (e.g. T1 when ``allow_t1`` is false); among the rest, a description matching ``prefer_patterns`` wins, then
    the series with the most images.

    Raises:
        StudyError: Naming why no series qualifies.

    """
    rules = rules or load_rules()
    mods = set(rules.get("modalities", ["MR"]))
    mr = [s for s in series if s.modality in mods]
    if not mr:
        found = sorted({s.modality or "unknown" for s in series})
        raise StudyError(f"no MR series in the study (modalities found: {', '.join(found)})")
    with_iop = [s for s in mr if s.orientation is not None]
    if not with_iop:
        raise StudyError("missing ImageOrientationPatient: cannot tell the plane of any MR series")
    sag = [s for s in with_iop if s.plane == "sagittal"]
    if not sag:
        planes = sorted({s.plane for s in with_iop})
        raise StudyError(f"no sagittal MR series (planes found: {', '.join(planes)})")
    exclude = [re.compile(p, re.I) for p in rules.get("exclude_patterns", [])]
    ok = [s for s in sag if not any(e.search(s.description) for e in exclude)]
    if not ok:
        descs = ", ".join(sorted({s.description or "(none)" for s in sag}))
        raise StudyError(f"no sagittal T2 series: the sagittal series are excluded by the rules ({descs})")
    min_images = int(rules.get("min_images", 2))
    big = [s for s in ok if len(s.files) >= min_images]
    if not big:
        raise StudyError(f"the sagittal series has a single image; at least {min_images} slices are needed")
    prefer = [re.compile(p, re.I) for p in rules.get("prefer_patterns", [])]

    def rank(s: SeriesInfo) -> tuple[int, int]:
        return (int(any(p.search(s.description) for p in prefer)), len(s.files))

    return max(big, key=rank)


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad/undecodable pixel data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise StudyError(f"unreadable pixel data (transfer syntax {ts}): {type(exc).__name__}") from None
    if arr.ndim != 2:
        raise StudyError(f"unsupported pixel data shape {arr.shape}: expected single-frame grayscale images")
    arr = arr.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return arr * slope + inter


def load_series(info: SeriesInfo, max_pixels: int = 2048 * 2048) -> SeriesVolume:
    """Read a series into a :class:`SeriesVolume` (sorted along the slice normal, duplicates removed).

    Raises:
        StudyError: Missing PixelSpacing / ImageOrientationPatient / ImagePositionPatient, mixed matrix
            sizes or orientations, too few slices, or unreadable pixel data.

    """
    dss = []
    for p in info.files:
        try:
            dss.append(pydicom.dcmread(str(p)))
        except Exception as exc:  # noqa: BLE001
            raise StudyError(f"unreadable DICOM file in the selected series: {type(exc).__name__}") from None
    seen: dict[str, pydicom.Dataset] = {}
    for ds in dss:
        seen.setdefault(str(getattr(ds, "SOPInstanceUID", id(ds))), ds)
    if len(seen) < len(dss):
        log.warning("dropped %d duplicate instances", len(dss) - len(seen))
    dss = list(seen.values())
    for key, label in (
        ("PixelSpacing", "PixelSpacing"),
        ("ImageOrientationPatient", "ImageOrientationPatient"),
        ("ImagePositionPatient", "ImagePositionPatient"),
    ):
        if any(getattr(ds, key, None) in (None, "") for ds in dss):
            raise StudyError(f"missing {label} in the selected series")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in dss}
    if len(shapes) > 1:
        raise StudyError(f"mixed matrix sizes in one series: {sorted(shapes)}")
    rows, cols = shapes.pop()
    if rows * cols > max_pixels:
        raise StudyError(f"image matrix {rows}x{cols} exceeds the supported maximum of {max_pixels} pixels")
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in dss])
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise StudyError("mixed orientations in one series")
    spacings = {tuple(round(float(v), 4) for v in ds.PixelSpacing) for ds in dss}
    if len(spacings) > 1:
        raise StudyError("mixed PixelSpacing in one series")
    spacing = spacings.pop()
    if min(spacing) <= 0:
        raise StudyError(f"invalid PixelSpacing {spacing}")
    iop = iops[0]
    n = np.cross(iop[:3], iop[3:])
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in dss])
    order = np.argsort(pos @ n, kind="stable")
    dss = [dss[i] for i in order]
    pos = pos[order]
    if len(dss) < 2:
        raise StudyError("the sagittal series has a single image; at least 2 slices are needed")
    if np.min(np.abs(np.diff(pos @ n))) < 1e-3:
        raise StudyError("several images share one slice position (duplicate slices with different UIDs)")
    pixels = np.stack([_pixels(ds) for ds in dss])
    first = dss[0]
    headers = []
    for ds in dss:
        h = ds.copy()
        if "PixelData" in h:
            del h.PixelData
        headers.append(h)
    return SeriesVolume(
        pixels=pixels,
        spacing=(float(spacing[0]), float(spacing[1])),
        orientation=iop,
        positions=pos,
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in dss],
        series_uid=info.series_uid,
        study_uid=str(getattr(first, "StudyInstanceUID", "")),
        frame_of_reference_uid=str(getattr(first, "FrameOfReferenceUID", "")),
        description=info.description,
        slice_thickness=float(first.SliceThickness) if getattr(first, "SliceThickness", None) else None,
        datasets=headers,
    )


def load_study(folder: str | Path, rules: dict | None = None) -> SeriesVolume:
    """Scan a study folder, select the sagittal T2 series and read it.

    Raises:
        StudyError: With the reason when the study cannot be used.

    """
    info = select_series(scan_study(folder), rules)
    log.info("selected series '%s' (%d images)", info.description, len(info.files))
    return load_series(info)
