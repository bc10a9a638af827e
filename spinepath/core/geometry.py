"""A sagittal series with its patient geometry (pixel <-> patient mm) and pixel-size estimates.

Where a 2D image has no pixel spacing it is estimated from the gap between neighbouring vertebra centres
(:func:`spacing_from_gap`, used by training and grading) or from the field of view (:func:`spark_fov_spacing`,
used at inference, where no labels may be used).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class InPlane:
    """How a series' stored pixels map onto the canonical sagittal display (no interpolation).

    Canonical display: columns toward posterior, rows toward inferior (SimpleITK/DICOM ``"PIR"`` with slices
    toward the patient's right, as the NIfTI reader orients volumes). Stored -> canonical is: transpose (when
    ``transpose``), then reverse the rows (``flip_rows``), then reverse the columns (``flip_cols``).

    Attributes:
        transpose: The stored rows run anterior-posterior (the columns superior-inferior).
        flip_rows: Reverse the rows after the transpose.
        flip_cols: Reverse the columns after the transpose.
        source_shape: ``(rows, cols)`` as stored (None: same as the canonical shape).

    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    source_shape: tuple[int, int] | None = None

    @property
    def identity(self) -> bool:
        """True when the stored pixels already are in the canonical display."""
        return not (self.transpose or self.flip_rows or self.flip_cols)

    @property
    def canonical_shape(self) -> tuple[int, int] | None:
        """``(rows, cols)`` in the canonical display."""
        if self.source_shape is None:
            return None
        r, c = self.source_shape
        return (c, r) if self.transpose else (r, c)

    def describe(self) -> str:
        """E.g. ``"transposed, rows reversed"`` or ``"as stored"``."""
        parts = [name for flag, name in ((self.transpose, "transposed"), (self.flip_rows, "rows reversed"),
                                         (self.flip_cols, "columns reversed")) if flag]
        return ", ".join(parts) or "as stored"

    def to_canonical(self, a: np.ndarray) -> np.ndarray:
        """Stored -> canonical for an array whose last two axes are (rows, cols) (a view where possible)."""
        if self.transpose:
            a = np.swapaxes(a, -1, -2)
        if self.flip_rows:
            a = a[..., ::-1, :]
        if self.flip_cols:
            a = a[..., ::-1]
        return a

    def to_source(self, a: np.ndarray) -> np.ndarray:
        """Canonical -> stored for an array whose last two axes are (rows, cols) (inverse of :meth:`to_canonical`)."""
        if self.flip_cols:
            a = a[..., ::-1]
        if self.flip_rows:
            a = a[..., ::-1, :]
        if self.transpose:
            a = np.swapaxes(a, -1, -2)
        return a

    def source_orientation(self, orientation: Sequence[float]) -> np.ndarray:
        """The stored ImageOrientationPatient, from the canonical one (inverse of :func:`canonical_geometry`)."""
        iop = np.asarray(orientation, float)
        r, c = iop[:3] * (-1 if self.flip_cols else 1), iop[3:] * (-1 if self.flip_rows else 1)
        return np.concatenate([c, r] if self.transpose else [r, c])

    def source_index(self, row: float, col: float) -> tuple[float, float]:
        """The canonical pixel centre ``(row, col)`` of a stored pixel centre ``(row, col)``."""
        if self.transpose:
            row, col = col, row
        rows, cols = self.canonical_shape or (0, 0)
        return (rows - 1 - row if self.flip_rows else row), (cols - 1 - col if self.flip_cols else col)

    def point_to_source(self, row: float, col: float) -> tuple[float, float]:
        """The stored pixel position of a canonical pixel position ``(row, col)`` (inverse of :meth:`source_index`).

        Raises:
            ValueError: If the transform has no ``source_shape`` and flips an axis.

        """
        if self.flip_rows or self.flip_cols:
            if self.source_shape is None:
                raise ValueError("InPlane.point_to_source needs source_shape to undo a flip")
            rows, cols = self.canonical_shape
            row = rows - 1 - row if self.flip_rows else row
            col = cols - 1 - col if self.flip_cols else col
        return (col, row) if self.transpose else (row, col)

    def box_to_source(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A canonical box ``[r0, c0, r1, c1]`` (pixel edge coordinates) in stored pixels.

        Raises:
            ValueError: If the transform has no ``source_shape`` and flips an axis.

        """
        r0, c0, r1, c1 = (float(x) for x in box)
        if self.flip_rows or self.flip_cols:
            if self.source_shape is None:
                raise ValueError("InPlane.box_to_source needs source_shape to undo a flip")
            rows, cols = self.canonical_shape
            if self.flip_rows:
                r0, r1 = rows - r1, rows - r0
            if self.flip_cols:
                c0, c1 = cols - c1, cols - c0
        if self.transpose:
            r0, c0, r1, c1 = c0, r0, c1, r1
        return r0, c0, r1, c1


def canonical_inplane(orientation: Sequence[float], source_shape: tuple[int, int]) -> InPlane:
    """The :class:`InPlane` map of a sagittal (or oblique sagittal) series from its ImageOrientationPatient.

    The stored axis closer to the patient's anterior-posterior axis becomes the columns (toward posterior),
    the other the rows (toward inferior); the choice is by the larger direction cosine, so tilts up to 45
    degrees keep their axes.
    """
    iop = np.asarray(orientation, float)
    r, c = iop[:3], iop[3:]  # directions of increasing column and of increasing row index (LPS)
    transpose = abs(r[1]) + abs(c[2]) < abs(c[1]) + abs(r[2])
    if transpose:
        r, c = c, r
    return InPlane(bool(transpose), flip_rows=bool(c[2] > 0), flip_cols=bool(r[1] < 0),
                   source_shape=(int(source_shape[0]), int(source_shape[1])))


def canonical_geometry(inplane: InPlane, orientation: Sequence[float], position: Sequence[float],
                       spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """ImageOrientationPatient, the position of the first pixel and PixelSpacing of a slice in canonical display.

    Args:
        inplane: The slice's map (with ``source_shape``).
        orientation: Stored ImageOrientationPatient.
        position: Stored ImagePositionPatient (centre of the first stored pixel).
        spacing: Stored PixelSpacing ``(row spacing, column spacing)``.

    Returns:
        ``(orientation, position, spacing)`` for the canonical pixel grid; the patient geometry is unchanged.

    """
    iop = np.asarray(orientation, float)
    r, c = iop[:3], iop[3:]
    rows, cols = inplane.canonical_shape
    # the stored pixel at the canonical (0, 0): undo the flips, then the transpose
    cr, cc = (rows - 1 if inplane.flip_rows else 0), (cols - 1 if inplane.flip_cols else 0)
    sr, sc = (cc, cr) if inplane.transpose else (cr, cc)
    origin = np.asarray(position, float) + sc * spacing[1] * r + sr * spacing[0] * c
    new_r, new_c, new_sp = (c, r, (spacing[1], spacing[0])) if inplane.transpose else (r, c, tuple(spacing))
    if inplane.flip_cols:
        new_r = -new_r
    if inplane.flip_rows:
        new_c = -new_c
    return np.concatenate([new_r, new_c]), origin, (float(new_sp[0]), float(new_sp[1]))


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
        datasets: Header datasets per slice (no pixel data), for writers that reference the source; a
            multi-frame source repeats its one header.
        inplane: How the stored pixels map onto ``pixels`` (the canonical display); writers that reference the
            source (SEG frames, SR regions, JSON boxes, key image) map back with it.
        frame_numbers: Per slice, the frame of a multi-frame source instance (1-based); empty for single-frame.
        selection: How the series was chosen among the study's (:func:`spinepath.io.dicom.load_study`).
        companions: The study's other sagittal series the grading may use (the T1), best first, unread
            (``spinepath.io.dicom.SeriesInfo``; :func:`spinepath.io.dicom.load_companion` reads one).

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
    inplane: InPlane = field(default_factory=InPlane)
    frame_numbers: list[int] = field(default_factory=list)
    selection: dict = field(default_factory=dict)
    companions: list = field(default_factory=list, repr=False)

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


def series_from_slices(slices: list[np.ndarray], spacing: tuple[float, float], slice_mm: float):
    """A minimal SeriesVolume (sagittal, IOP 0\\1\\0\\0\\0\\-1) around stacked slices, for evaluation."""
    n = len(slices)
    return SeriesVolume(
        pixels=np.stack(slices).astype(np.float32),
        spacing=spacing,
        orientation=np.array([0.0, 1, 0, 0, 0, -1]),
        positions=np.array([[k * slice_mm, 0.0, 0.0] for k in range(n)]),
        sop_instance_uids=[f"eval.{k}" for k in range(n)],
        series_uid="eval",
        study_uid="eval",
        frame_of_reference_uid="eval",
        description="evaluation",
    )


#: Mean chu_t2 mid-sagittal body height / width divided by the centre-to-centre gap (measured, 84 bodies).
BODY_HEIGHT_PER_GAP = 0.89


BODY_WIDTH_PER_GAP = 1.03


#: Mean distance between neighbouring lumbar vertebra centres in chu_t2 (mm).
MEAN_LEVEL_GAP_MM = 37.0


#: Assumed field of view (mm, longest image side) for 2D images without spacing. Estimated as the median of
#: (longest side x level-gap spacing estimate) over the spark_midsag training split; see configs/split.json.
DEFAULT_FOV_MM = 377.0


def spark_fov_spacing(shape_hw: tuple[int, int], fov_mm: float = DEFAULT_FOV_MM) -> float:
    """Pixel spacing (mm) for an image of unknown spacing, assuming a field of view of ``fov_mm``."""
    return fov_mm / float(max(shape_hw))


def spacing_from_gap(gap_px: float) -> float:
    """Pixel size (mm) for an image of unknown spacing, from the median vertebra centre gap in pixels."""
    return MEAN_LEVEL_GAP_MM / gap_px if np.isfinite(gap_px) and gap_px > 1 else 1.0

