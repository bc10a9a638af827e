"""DICOM study reading: series discovery, sagittal T2 series selection and volume geometry.

Works with pydicom 2.4 and 3.x and without Holoscan (training and the MONAI Label server use it too).
"""

from __future__ import annotations

import json
import logging
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from spinepath.core.config import config_file
from spinepath.core.errors import StudyError
from spinepath.core.geometry import SeriesVolume

log = logging.getLogger(__name__)
SELECTION_RULES = config_file("series_selection.json")


@dataclass
class SeriesInfo:
    """Header summary of one series in a study folder."""

    series_uid: str
    modality: str
    description: str
    files: list[Path]
    orientation: tuple[float, ...] | None
    study_uid: str = ""
    damaged: list[Path] = field(default_factory=list)  # truncated/damaged images of this series (not in files)

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


# ----------------------------------------------------------------------------------------------- reading
_READ_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Keep pydicom's warnings and decoder error logs (with tracebacks) out of the logs while reading.

    They may quote header values such as names; the reader raises :class:`StudyError` with the reason instead.
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _read_header(path: Path) -> pydicom.Dataset | None:
    try:
        with _quiet_pydicom():
            return pydicom.dcmread(str(path), stop_before_pixels=True)
    except _READ_ERRORS:
        return None


def _is_image(ds: pydicom.Dataset) -> bool:
    """Whether the SOP class is an image storage class (which must carry pixel data)."""
    try:
        return "Image Storage" in UID(str(ds.SOPClassUID)).name or "Rows" in ds
    except _READ_ERRORS:
        return "Rows" in ds


def _pixel_data_complete(fp, size: int, little_endian: bool, implicit_vr: bool) -> bool:
    """Check that the pixel data element at ``fp``'s position lies within the file (not truncated).

    Reads only element and item headers: native data by its length, encapsulated data by walking its items
    to the sequence delimiter.
    """
    e = "<" if little_endian else ">"
    head = fp.read(8)
    if len(head) < 8:
        return False
    if implicit_vr:
        length = struct.unpack(e + "I", head[4:8])[0]
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        more = fp.read(4)
        if len(more) < 4:
            return False
        length = struct.unpack(e + "I", more)[0]
    else:
        length = struct.unpack(e + "H", head[6:8])[0]
    if length != 0xFFFFFFFF:
        return fp.tell() + length <= size
    while True:  # encapsulated: items up to the sequence delimiter
        item = fp.read(8)
        if len(item) < 8:
            return False
        group, elem, n = struct.unpack(e + "HHI", item)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return True
        if (group, elem) != (0xFFFE, 0xE000) or fp.tell() + n > size:
            return False
        fp.seek(n, 1)


def _scan_file(path: Path) -> tuple[pydicom.Dataset | None, bool]:
    """Header of one file and whether it is a truncated or damaged DICOM image.

    Returns:
        ``(header, False)`` for a complete DICOM file, ``(header_or_None, True)`` for a DICOM image whose
        header or pixel data is cut short, ``(None, False)`` for anything else (not DICOM, unreadable).

    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fp, _quiet_pydicom():
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            meta = getattr(ds, "file_meta", None)
            if "SOPClassUID" not in ds:  # not DICOM, or an image whose header is cut short
                sop = getattr(meta, "MediaStorageSOPClassUID", None)
                return None, sop is not None and "Image Storage" in UID(str(sop)).name
            ts = getattr(meta, "TransferSyntaxUID", None)
            if not _is_image(ds) or ts == DeflatedExplicitVRLittleEndian:  # deflated: positions not in the file
                return ds, False
            implicit, little = _encoding(ds)
            return ds, not _pixel_data_complete(fp, size, little, implicit)
    except InvalidDicomError:
        return None, False
    except _READ_ERRORS:
        return None, _has_dicom_preamble(path)


def _encoding(ds: pydicom.Dataset) -> tuple[bool, bool]:
    """``(implicit_vr, little_endian)`` of the dataset as read (pydicom 3 and 2.4)."""
    enc = getattr(ds, "original_encoding", None)
    if enc is not None and enc[0] is not None:
        return bool(enc[0]), bool(enc[1])
    return bool(getattr(ds, "is_implicit_VR", False)), bool(getattr(ds, "is_little_endian", True))


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fp:
            return fp.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def scan_study(folder: str | Path) -> list[SeriesInfo]:
    """Find every DICOM image series under a folder (recursively; non-DICOM files are skipped).

    Files that are not regular files (FIFOs, sockets, broken links) and unreadable files are skipped. DICOM
    images cut short (truncated header or pixel data) are kept out of the series' ``files`` and listed in
    their ``damaged``; :func:`load_series` refuses a series that lacks one of its images because of them.

    Raises:
        StudyError: If the folder does not exist or holds no readable DICOM file.

    """
    folder = Path(folder)
    if not folder.exists():
        raise StudyError(f"input folder does not exist: {folder}")
    if not folder.is_dir():
        raise StudyError(f"input is not a folder: {folder}")
    groups: dict[str, SeriesInfo] = {}
    damaged: dict[str, list[Path]] = {}
    n_files = n_skipped = n_damaged = n_special = 0
    for p in sorted(folder.rglob("*")):
        try:
            if not p.is_file():  # FIFOs, sockets, devices and broken links are never opened
                n_special += 0 if p.is_dir() else 1
                continue
        except OSError:
            n_special += 1
            continue
        n_files += 1
        ds, bad = _scan_file(p)
        if bad:
            n_damaged += 1
            uid = str(getattr(ds, "SeriesInstanceUID", "") or "") if ds is not None else ""
            damaged.setdefault(uid, []).append(p)
            continue
        if ds is None:
            n_skipped += 1
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "no-series-uid")
        if uid not in groups:
            iop = getattr(ds, "ImageOrientationPatient", None)
            try:
                orientation = tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None
            except (TypeError, ValueError):
                orientation = None
            groups[uid] = SeriesInfo(
                series_uid=uid,
                modality=str(getattr(ds, "Modality", "") or ""),
                description=str(getattr(ds, "SeriesDescription", "") or ""),
                files=[],
                orientation=orientation,
                study_uid=str(getattr(ds, "StudyInstanceUID", "") or ""),
            )
        groups[uid].files.append(p)
    for uid, paths in damaged.items():
        if uid in groups:
            groups[uid].damaged.extend(paths)
    if not groups:
        if n_files == 0 and n_special == 0:
            raise StudyError("input folder is empty")
        parts = []
        if n_special:
            parts.append(f"{n_special} unreadable entr{'ies' if n_special > 1 else 'y'} (broken links, pipes, devices)")
        if n_damaged:
            parts.append(f"{n_damaged} truncated or damaged DICOM file{'s' * (n_damaged > 1)}")
        if n_skipped:
            parts.append(f"{n_skipped} non-DICOM or unreadable file{'s' * (n_skipped > 1)}")
        raise StudyError(f"input folder has no readable DICOM file ({', '.join(parts)})")
    if n_skipped or n_special:
        log.info("skipped %d non-DICOM or unreadable files and %d other entries", n_skipped, n_special)
    if n_damaged:
        log.warning("found %d truncated or damaged DICOM files", n_damaged)
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


def _scrub(text: str, ds: pydicom.Dataset) -> str:
    """Remove the patient's name and ID from a message (pydicom/plugin messages may quote header values)."""
    for key in ("PatientName", "PatientID"):
        try:
            value = str(ds.get(key, "") or "")
        except _READ_ERRORS:
            continue
        if len(value) >= 2:
            text = text.replace(value, "[removed]")
    return text


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(ts, "name", None) or str(ts or "unknown")
    try:
        with _quiet_pydicom():
            arr = ds.pixel_array
    except NotImplementedError:
        raise StudyError(f"unsupported transfer syntax {ts_name}: no pixel data decoder exists for it") from None
    except RuntimeError as exc:
        if "missing" in str(exc) and "dependencies" in str(exc):
            raise StudyError(
                f"cannot decode {ts_name} pixel data: no decoder plugin installed "
                "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls)"
            ) from None
        raise StudyError(_scrub(f"unreadable pixel data ({ts_name}): {_reason(exc)}", ds)) from None
    except Exception as exc:  # noqa: BLE001 - pydicom and its plugins raise many types for bad pixel data
        raise StudyError(_scrub(f"unreadable pixel data ({ts_name}): {_reason(exc)}", ds)) from None
    if arr.ndim != 2:
        raise StudyError(f"unsupported pixel data shape {arr.shape}: expected single-frame grayscale images")
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        raise StudyError(f"decoded image shape {arr.shape} differs from the header's matrix")
    arr = arr.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return arr * slope + inter


def _reason(exc: BaseException) -> str:
    """Exception type and its message on one line, shortened."""
    text = " ".join(str(exc).split())
    if len(text) > 240:
        text = text[:237] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _number(ds: pydicom.Dataset, key: str) -> int | None:
    try:
        v = ds.get(key)
        return None if v in (None, "") else int(v)
    except _READ_ERRORS:
        return None


def load_series(info: SeriesInfo, max_pixels: int = 2048 * 2048) -> SeriesVolume:
    """Read a series into a :class:`SeriesVolume` (sorted along the slice normal, duplicates removed).

    The headers are checked first (geometry, matrix size against ``max_pixels``, single-frame grayscale);
    pixel data is read and decoded only then, so an absurd matrix is refused without allocating it.

    Raises:
        StudyError: Missing PixelSpacing / ImageOrientationPatient / ImagePositionPatient, mixed matrix
            sizes or orientations, too large a matrix, too few slices, truncated or damaged images, or
            unreadable / undecodable pixel data.

    """
    headers: list[tuple[Path, pydicom.Dataset]] = []
    for p in info.files:
        try:
            with _quiet_pydicom():
                headers.append((p, pydicom.dcmread(str(p), stop_before_pixels=True)))
        except Exception as exc:  # noqa: BLE001
            raise StudyError(f"unreadable DICOM file in the selected series: {type(exc).__name__}") from None
    seen: dict[str, tuple[Path, pydicom.Dataset]] = {}
    for p, ds in headers:
        seen.setdefault(str(getattr(ds, "SOPInstanceUID", "") or p), (p, ds))
    if len(seen) < len(headers):
        log.warning("dropped %d duplicate instances", len(headers) - len(seen))
    if info.damaged:
        lost = set()
        for p in info.damaged:
            ds = _read_header(p)
            uid = str(getattr(ds, "SOPInstanceUID", "") or "") if ds is not None else ""
            if uid not in seen:
                lost.add(uid or str(p))
        if lost:
            n = len(lost)
            raise StudyError(
                f"{n} truncated or damaged image{'s' * (n > 1)} in the selected series "
                f"({len(seen)} intact images): the series is incomplete"
            )
        log.warning("ignored %d truncated copies of intact images", len(info.damaged))
    files = [p for p, _ in seen.values()]
    dss = [ds for _, ds in seen.values()]
    for key in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"):
        if any(getattr(ds, key, None) in (None, "") for ds in dss):
            raise StudyError(f"missing {key} in the selected series")
    if any(_number(ds, "Rows") is None or _number(ds, "Columns") is None for ds in dss):
        raise StudyError("missing Rows/Columns (image matrix) in the selected series")
    shapes = {(_number(ds, "Rows"), _number(ds, "Columns")) for ds in dss}
    if len(shapes) > 1:
        raise StudyError(f"mixed matrix sizes in one series: {sorted(shapes)}")
    rows, cols = shapes.pop()
    if rows <= 0 or cols <= 0:
        raise StudyError(f"invalid image matrix {rows}x{cols}")
    if rows * cols > max_pixels:
        raise StudyError(f"image matrix {rows}x{cols} exceeds the supported maximum of {max_pixels} pixels")
    frames = {_number(ds, "NumberOfFrames") or 1 for ds in dss}
    if frames != {1}:
        raise StudyError("multi-frame images are not supported: expected one image per file")
    if {_number(ds, "SamplesPerPixel") or 1 for ds in dss} != {1}:
        raise StudyError("colour images are not supported: expected grayscale MR images")
    try:
        iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in dss])
        spacings = {tuple(round(float(v), 4) for v in ds.PixelSpacing) for ds in dss}
        pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in dss])
    except (TypeError, ValueError):
        raise StudyError("invalid geometry attributes (PixelSpacing / ImageOrientationPatient / "
                         "ImagePositionPatient) in the selected series") from None
    if iops.shape[1:] != (6,) or pos.shape[1:] != (3,) or any(len(s) != 2 for s in spacings):
        raise StudyError("invalid geometry attributes (PixelSpacing / ImageOrientationPatient / "
                         "ImagePositionPatient) in the selected series")
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise StudyError("mixed orientations in one series")
    if len(spacings) > 1:
        raise StudyError("mixed PixelSpacing in one series")
    spacing = spacings.pop()
    if min(spacing) <= 0:
        raise StudyError(f"invalid PixelSpacing {spacing}")
    iop = iops[0]
    n = np.cross(iop[:3], iop[3:])
    order = np.argsort(pos @ n, kind="stable")
    dss = [dss[i] for i in order]
    files = [files[i] for i in order]
    pos = pos[order]
    if len(dss) < 2:
        raise StudyError("the sagittal series has a single image; at least 2 slices are needed")
    if np.min(np.abs(np.diff(pos @ n))) < 1e-3:
        raise StudyError("several images share one slice position (duplicate slices with different UIDs)")
    slices = []
    for p in files:
        try:
            with _quiet_pydicom():
                full = pydicom.dcmread(str(p))
        except Exception as exc:  # noqa: BLE001
            raise StudyError(f"unreadable DICOM file in the selected series: {type(exc).__name__}") from None
        slices.append(_pixels(full))
    pixels = np.stack(slices)
    first = dss[0]
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
        datasets=dss,
    )


def load_study(folder: str | Path, rules: dict | None = None) -> SeriesVolume:
    """Scan a study folder, select the sagittal T2 series and read it.

    Raises:
        StudyError: With the reason when the study cannot be used.

    """
    info = select_series(scan_study(folder), rules)
    log.info("selected series '%s' (%d images)", info.description, len(info.files))
    return load_series(info)
