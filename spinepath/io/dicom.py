"""DICOM study reading: series discovery, sequence-based series selection and volume geometry.

Single-frame series and multi-frame objects (Enhanced MR and Legacy Converted Enhanced MR Image Storage: the
shared and per-frame functional groups) are read into one :class:`SeriesVolume` in the canonical sagittal
display (:class:`spinepath.core.geometry.InPlane`), whatever order the scanner stored the pixels in. The
sequence (T1, T2, ...) comes from the acquisition (:mod:`spinepath.io.sequences`); the selection is recorded.

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
from spinepath.core.geometry import SeriesVolume, canonical_geometry, canonical_inplane
from spinepath.io.sequences import Sequence, classify_sequence

log = logging.getLogger(__name__)
SELECTION_RULES = config_file("series_selection.json")


def plane_of(orientation) -> str:
    """``sagittal``, ``coronal``, ``axial``, ``oblique`` (normal over 37 degrees off every axis) or ``unknown``."""
    if orientation is None or len(orientation) != 6:
        return "unknown"
    n = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    axis = int(np.argmax(np.abs(n)))
    if abs(n[axis]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass
class SeriesInfo:
    """Header summary of one series in a study folder.

    Attributes:
        orientation: ImageOrientationPatient of the first image (None when absent).
        planes: The plane of every image (every frame of a multi-frame object), as a set.
        n_images: Images of the series: single-frame files plus the frames of multi-frame objects.
        header: The first file's header (no pixel data), for the sequence class.

    """

    series_uid: str
    modality: str
    description: str
    files: list[Path]
    orientation: tuple[float, ...] | None
    study_uid: str = ""
    damaged: list[Path] = field(default_factory=list)  # truncated/damaged images of this series (not in files)
    planes: set[str] = field(default_factory=set)
    n_images: int = 0
    header: pydicom.Dataset | None = field(default=None, repr=False)
    _sequence: Sequence | None = field(default=None, repr=False)

    @property
    def image_planes(self) -> set[str]:
        """The planes of its images (from the first image's orientation when they were not scanned)."""
        return set(self.planes) or {plane_of(self.orientation)}

    @property
    def image_count(self) -> int:
        """Its images (frames of multi-frame objects counted), or its files when not scanned."""
        return self.n_images or len(self.files)

    @property
    def plane(self) -> str:
        """The plane of all its images; ``mixed`` when they differ, ``unknown`` without orientation."""
        planes = self.image_planes
        return planes.pop() if len(planes) == 1 else "mixed"

    @property
    def sequence(self) -> Sequence:
        """The sequence class from the acquisition (:func:`spinepath.io.sequences.classify_sequence`)."""
        if self._sequence is None:
            hdr = self.header
            if hdr is None:  # not scanned: only the description is known
                hdr = pydicom.Dataset()
                hdr.SeriesDescription = self.description
            self._sequence = classify_sequence(hdr)
        return self._sequence

    def summary(self) -> dict:
        """JSON-ready identification (no patient data)."""
        return {"series_instance_uid": self.series_uid, "series_description": self.description,
                "n_images": self.image_count, "plane": self.plane,
                "sequence": self.sequence.to_dict()}


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


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def is_multiframe(ds: pydicom.Dataset) -> bool:
    """Whether a header is a multi-frame image with functional groups (Enhanced / Legacy Converted MR, ...)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds or (
        (_number(ds, "NumberOfFrames") or 1) > 1)


def _group_item(ds: pydicom.Dataset, frame: int, name: str) -> pydicom.Dataset | None:
    """The first item of functional group ``name`` for a frame (0-based): per-frame, else shared."""
    for key, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(key)
        if seq is not None and len(seq) > index:
            inner = seq[index].get(name)
            if inner:
                return inner[0]
    return None


def _orientations(ds: pydicom.Dataset) -> list[tuple[float, ...] | None]:
    """ImageOrientationPatient of every image in a file: one for single-frame, one per frame for multi-frame."""
    if not is_multiframe(ds):
        return [_floats(ds.get("ImageOrientationPatient"), 6)]
    n = _number(ds, "NumberOfFrames") or 1
    out = []
    for i in range(n):
        item = _group_item(ds, i, "PlaneOrientationSequence")
        out.append(_floats(item.get("ImageOrientationPatient"), 6) if item is not None else None)
    return out


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
        orientations = _orientations(ds)
        if uid not in groups:
            groups[uid] = SeriesInfo(
                series_uid=uid,
                modality=str(getattr(ds, "Modality", "") or ""),
                description=str(getattr(ds, "SeriesDescription", "") or ""),
                files=[],
                orientation=orientations[0],
                study_uid=str(getattr(ds, "StudyInstanceUID", "") or ""),
                header=ds,
            )
        info = groups[uid]
        info.files.append(p)
        info.n_images += len(orientations)
        info.planes.update(plane_of(o) for o in orientations)
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


def _kinds_text(series: list[SeriesInfo]) -> str:
    return ", ".join(f"{s.description or '(no description)'}: {s.sequence.kind.upper()} ({s.sequence.reason})"
                     for s in series)


def rank_series(series: list[SeriesInfo], rules: dict | None = None) -> list[SeriesInfo]:
    """The sagittal series that can be the study's main (T2) series, best first.

    Rules (``configs/series_selection.json``): modality in ``modalities``; every image sagittal (oblique
    sagittal up to about 37 degrees) by its ImageOrientationPatient; at least ``min_images`` images; not a
    localizer (``exclude_patterns`` on the description); a sequence class (from the acquisition,
    :mod:`spinepath.io.sequences`) in ``main_sequences``. Ranked by that list's order, then sequences decided
    by the acquisition before those decided by the description, then ``prefer_patterns``, then image count.

    Raises:
        StudyError: Naming why no series qualifies.

    """
    rules = rules or load_rules()
    mods = set(rules.get("modalities", ["MR"]))
    mr = [s for s in series if s.modality in mods]
    if not mr:
        found = sorted({s.modality or "unknown" for s in series})
        raise StudyError(f"no MR series in the study (modalities found: {', '.join(found)})")
    with_iop = [s for s in mr if "unknown" not in s.image_planes]
    if not with_iop:
        for s in mr:
            if s.header is not None and is_multiframe(s.header):
                raise StudyError(f"multi-frame object missing its functional groups: "
                                 f"{'; '.join(missing_functional_groups(s.header))}")
        raise StudyError("missing ImageOrientationPatient: cannot tell the plane of any MR series")
    sag = [s for s in with_iop if s.plane == "sagittal"]
    if not sag:
        planes = sorted({p for s in with_iop for p in s.image_planes} | {s.plane for s in with_iop})
        raise StudyError(f"no sagittal MR series (planes found: {', '.join(planes)})")
    exclude = [re.compile(p, re.I) for p in rules.get("exclude_patterns", [])]
    ok = [s for s in sag if not any(e.search(s.description) for e in exclude)]
    if not ok:
        descs = ", ".join(sorted({s.description or "(none)" for s in sag}))
        raise StudyError(f"no sagittal T2 series: the sagittal series are excluded by the rules ({descs})")
    min_images = int(rules.get("min_images", 2))
    big = [s for s in ok if s.image_count >= min_images]
    if not big:
        raise StudyError(f"the sagittal series has a single image; at least {min_images} slices are needed")
    main = list(rules.get("main_sequences", ["t2", "unknown"]))
    usable = [s for s in big if s.sequence.kind in main]
    if not usable:
        raise StudyError(f"no sagittal T2 series: the sagittal series are {_kinds_text(big)}")
    prefer = [re.compile(p, re.I) for p in rules.get("prefer_patterns", [])]

    def rank(s: SeriesInfo) -> tuple:
        return (-main.index(s.sequence.kind), not s.sequence.by_description,
                any(p.search(s.description) for p in prefer), s.image_count)

    return sorted(usable, key=rank, reverse=True)


def select_series(series: list[SeriesInfo], rules: dict | None = None) -> SeriesInfo:
    """The best main series of :func:`rank_series`.

    Raises:
        StudyError: Naming why no series qualifies.

    """
    return rank_series(series, rules)[0]


def select_companions(series: list[SeriesInfo], main: SeriesInfo, rules: dict | None = None) -> list[SeriesInfo]:
    """The sagittal series of ``main``'s study in a ``companion_sequences`` class (the T1), best first."""
    rules = rules or load_rules()
    kinds = list(rules.get("companion_sequences", ["t1"]))
    exclude = [re.compile(p, re.I) for p in rules.get("exclude_patterns", [])]
    min_images = int(rules.get("min_images", 2))
    out = [s for s in series if s is not main and s.study_uid == main.study_uid and s.plane == "sagittal"
           and s.modality == main.modality and s.sequence.kind in kinds
           and s.image_count >= min_images and not any(e.search(s.description) for e in exclude)]
    return sorted(out, key=lambda s: (-kinds.index(s.sequence.kind), not s.sequence.by_description,
                                      s.image_count), reverse=True)


def missing_functional_groups(ds: pydicom.Dataset) -> list[str]:
    """What a multi-frame header lacks to be read as a series (empty when complete)."""
    n = _number(ds, "NumberOfFrames")
    if not n:
        return ["NumberOfFrames"]
    missing = []
    if "PerFrameFunctionalGroupsSequence" not in ds:
        missing.append("PerFrameFunctionalGroupsSequence")
    elif len(ds.PerFrameFunctionalGroupsSequence) != n:
        missing.append(f"PerFrameFunctionalGroupsSequence has {len(ds.PerFrameFunctionalGroupsSequence)} items "
                       f"for {n} frames")
    for group, attr in (("PlaneOrientationSequence", "ImageOrientationPatient"),
                        ("PlanePositionSequence", "ImagePositionPatient"), ("PixelMeasuresSequence", "PixelSpacing")):
        lacking = [i for i in range(n) if (item := _group_item(ds, i, group)) is None or attr not in item]
        if lacking:
            where = f"all {n} frames" if len(lacking) == n else f"{len(lacking)} of {n} frames"
            missing.append(f"{group} > {attr} ({where})")
    return missing


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


def _pixels(ds: pydicom.Dataset, frames: int | None = None) -> np.ndarray:
    """Decoded stored values as float32: ``(rows, cols)``, or ``(frames, rows, cols)`` for a multi-frame object.

    The rescale (per image or per frame) is applied by the caller (:class:`_Image`).
    """
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
    if frames is not None:
        if arr.size != frames * int(ds.Rows) * int(ds.Columns):
            raise StudyError(f"decoded pixel data {arr.shape} differs from the header's {frames} frames of "
                             f"{int(ds.Rows)}x{int(ds.Columns)}")
        return arr.reshape(frames, int(ds.Rows), int(ds.Columns)).astype(np.float32)
    if arr.ndim != 2:
        raise StudyError(f"unsupported pixel data shape {arr.shape}: expected single-frame grayscale images")
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        raise StudyError(f"decoded image shape {arr.shape} differs from the header's matrix")
    return arr.astype(np.float32)


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


@dataclass
class _Image:
    """One image of a series: a single-frame file or one frame of a multi-frame object."""

    path: Path
    ds: pydicom.Dataset
    frame: int | None  # 0-based frame of a multi-frame object
    iop: tuple[float, ...]
    ipp: tuple[float, ...]
    spacing: tuple[float, ...]
    thickness: float | None
    rescale: tuple[float, float]


def _float_or(value, default: float | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


_BAD_GEOMETRY = ("invalid geometry attributes (PixelSpacing / ImageOrientationPatient / "
                 "ImagePositionPatient) in the selected series")


def _single_image(p: Path, ds: pydicom.Dataset) -> _Image:
    iop, ipp, sp = (_floats(ds.ImageOrientationPatient, 6), _floats(ds.ImagePositionPatient, 3),
                    _floats(ds.PixelSpacing, 2))
    if iop is None or ipp is None or sp is None:
        raise StudyError(_BAD_GEOMETRY)
    rescale = (_float_or(ds.get("RescaleSlope"), 1.0) or 1.0, _float_or(ds.get("RescaleIntercept"), 0.0))
    return _Image(p, ds, None, iop, ipp, sp, _float_or(ds.get("SliceThickness"), None), rescale)


def _frame_images(p: Path, ds: pydicom.Dataset) -> list[_Image]:
    """The frames of a multi-frame object with their functional-group geometry.

    Raises:
        StudyError: Naming the functional groups it lacks.

    """
    missing = missing_functional_groups(ds)
    if missing:
        raise StudyError(f"multi-frame object missing its functional groups: {'; '.join(missing)}")
    out = []
    for i in range(int(ds.NumberOfFrames)):
        iop = _floats(_group_item(ds, i, "PlaneOrientationSequence").ImageOrientationPatient, 6)
        ipp = _floats(_group_item(ds, i, "PlanePositionSequence").ImagePositionPatient, 3)
        measures = _group_item(ds, i, "PixelMeasuresSequence")
        sp = _floats(measures.PixelSpacing, 2)
        if iop is None or ipp is None or sp is None:
            raise StudyError(_BAD_GEOMETRY)
        value = _group_item(ds, i, "PixelValueTransformationSequence") or ds
        rescale = (_float_or(value.get("RescaleSlope"), 1.0) or 1.0, _float_or(value.get("RescaleIntercept"), 0.0))
        thickness = _float_or(measures.get("SliceThickness"), _float_or(ds.get("SliceThickness"), None))
        out.append(_Image(p, ds, i, iop, ipp, sp, thickness, rescale))
    return out


def load_series(info: SeriesInfo, max_pixels: int = 2048 * 2048) -> SeriesVolume:
    """Read a series into a :class:`SeriesVolume` in the canonical sagittal display.

    Single-frame files and multi-frame objects (their frames by the functional groups) are read alike. The
    pixels are transposed and flipped (never interpolated) into the canonical display
    (:func:`spinepath.core.geometry.canonical_inplane`, recorded in ``inplane``) and the slices sorted toward
    the patient's right; duplicates are removed. The headers are checked first (geometry, matrix size against
    ``max_pixels``, grayscale); pixel data is read and decoded only then, so an absurd matrix is refused
    without allocating it.

    Raises:
        StudyError: Missing PixelSpacing / ImageOrientationPatient / ImagePositionPatient (or a multi-frame
            object's functional groups), mixed matrix sizes or orientations, too large a matrix, too few
            slices, truncated or damaged images, or unreadable / undecodable pixel data.

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
    dss = [ds for _, ds in seen.values()]
    single = [ds for ds in dss if not is_multiframe(ds)]
    for key in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"):
        if any(getattr(ds, key, None) in (None, "") for ds in single):
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
    if {_number(ds, "SamplesPerPixel") or 1 for ds in dss} != {1}:
        raise StudyError("colour images are not supported: expected grayscale MR images")
    images: list[_Image] = []
    for p, ds in seen.values():
        images.extend(_frame_images(p, ds) if is_multiframe(ds) else [_single_image(p, ds)])
    iops = np.array([im.iop for im in images])
    spacings = {tuple(round(v, 4) for v in im.spacing) for im in images}
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise StudyError("mixed orientations in one series")
    if len(spacings) > 1:
        raise StudyError("mixed PixelSpacing in one series")
    spacing = spacings.pop()
    if min(spacing) <= 0:
        raise StudyError(f"invalid PixelSpacing {spacing}")
    inplane = canonical_inplane(iops[0], (rows, cols))
    geometry = [canonical_geometry(inplane, im.iop, im.ipp, spacing) for im in images]
    iop, c_spacing = geometry[0][0], geometry[0][2]
    pos = np.array([g[1] for g in geometry])
    n = np.cross(iop[:3], iop[3:])
    order = np.argsort(pos @ n, kind="stable")
    images = [images[i] for i in order]
    pos = pos[order]
    if len(images) < 2:
        raise StudyError("the sagittal series has a single image; at least 2 slices are needed")
    if np.min(np.abs(np.diff(pos @ n))) < 1e-3:
        raise StudyError("several images share one slice position (duplicate slices with different UIDs)")
    decoded: dict[Path, np.ndarray] = {}
    slices = []
    for im in images:
        if im.path not in decoded:
            try:
                with _quiet_pydicom():
                    full = pydicom.dcmread(str(im.path))
            except Exception as exc:  # noqa: BLE001
                raise StudyError(f"unreadable DICOM file in the selected series: {type(exc).__name__}") from None
            decoded[im.path] = _pixels(full, int(full.NumberOfFrames) if im.frame is not None else None)
        stored = decoded[im.path] if im.frame is None else decoded[im.path][im.frame]
        slices.append(stored * im.rescale[0] + im.rescale[1])
    pixels = np.ascontiguousarray(inplane.to_canonical(np.stack(slices)))
    first = images[0]
    return SeriesVolume(
        pixels=pixels,
        spacing=c_spacing,
        orientation=iop,
        positions=pos,
        sop_instance_uids=[str(im.ds.SOPInstanceUID) for im in images],
        series_uid=info.series_uid,
        study_uid=str(getattr(first.ds, "StudyInstanceUID", "")),
        frame_of_reference_uid=str(getattr(first.ds, "FrameOfReferenceUID", "")),
        description=info.description,
        slice_thickness=first.thickness,
        datasets=[im.ds for im in images],
        inplane=inplane,
        frame_numbers=[im.frame + 1 for im in images] if first.frame is not None else [],
    )


def load_companion(volume: SeriesVolume) -> SeriesVolume | None:
    """Read the study's sagittal T1 (the first of ``volume.companions`` that loads); None without one.

    A companion that cannot be read is logged and recorded in ``volume.selection["t1"]["error"]``; the next
    is tried. The one read is recorded as ``volume.selection["t1"]["loaded"]``.
    """
    for info in volume.companions:
        try:
            t1 = load_series(info)
        except StudyError as exc:
            log.warning("the sagittal T1 could not be read (%s)", exc)
            volume.selection.setdefault("t1_failed", []).append({**info.summary(), "error": str(exc)})
            continue
        volume.selection["t1"] = {**info.summary(), "loaded": True}
        return t1
    return None


def load_study(folder: str | Path, rules: dict | None = None) -> SeriesVolume:
    """Scan a study folder, select its main sagittal T2 series and read it; the choice is recorded.

    When the best candidate cannot be read, the next one is tried (and logged). ``volume.selection`` records
    the series used and why, the candidates that failed, and the study's sagittal T1 (the companion series
    of :func:`select_companions`) when there is one.

    Raises:
        StudyError: With the reason when the study cannot be used (the first candidate's when none loads).

    """
    rules = rules or load_rules()
    series = scan_study(folder)
    ranked = rank_series(series, rules)
    failed: list[dict] = []
    first_error: StudyError | None = None
    for info in ranked:
        try:
            volume = load_series(info)
        except StudyError as exc:
            first_error = first_error or exc
            failed.append({**info.summary(), "error": str(exc)})
            log.warning("series %d of %d could not be read (%s); trying the next candidate",
                        len(failed), len(ranked), exc)
            continue
        why = f"sagittal {info.sequence.kind.upper()} ({info.sequence.reason})"
        if failed:
            why += f"; {len(failed)} better-ranked candidate{'s' * (len(failed) > 1)} could not be read"
        companions = select_companions(series, info, rules)
        volume.selection = {
            "main": {**info.summary(), "reason": why, "orientation_as_stored": volume.inplane.describe(),
                     "multiframe": bool(volume.frame_numbers)},
            "t1": companions[0].summary() if companions else None,
            "failed": failed,
            "candidates": len(ranked),
        }
        volume.companions = companions
        log.info("selected series '%s' (%d images): %s", info.description, len(info.files), why)
        return volume
    if len(ranked) > 1:
        raise StudyError(f"{first_error} (and the {len(ranked) - 1} other candidate series could not be "
                         "read)") from None
    raise first_error


def copy_with_new_uids(src: str | Path, dst: str | Path, edit=None) -> str:
    """Copy a DICOM series as a new study: new Study, Series, Frame of Reference and SOP Instance UIDs.

    For load tests and benchmarks over many studies made from one (every copy is a distinct study to a PACS).

    Args:
        src: Folder of one series (``*.dcm``).
        dst: New folder (created).
        edit: Called with each dataset before it is written (e.g. to change the modality).

    Returns:
        The new Study Instance UID.

    """
    from pydicom.uid import generate_uid  # only where copies are made

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    Path(dst).mkdir(parents=True)
    for p in sorted(Path(src).glob("*.dcm")):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if edit is not None:
            edit(ds)
        ds.save_as(Path(dst) / p.name, enforce_file_format=int(pydicom.__version__.split(".")[0]) >= 3)
    return study
