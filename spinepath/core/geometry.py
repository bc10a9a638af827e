"""A sagittal series with its patient geometry (pixel <-> patient mm) and pixel-size estimates.

Where a 2D image has no pixel spacing it is estimated from the gap between neighbouring vertebra centres
(:func:`spacing_from_gap`, used by training and grading) or from the field of view (:func:`spark_fov_spacing`,
used at inference, where no labels may be used).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


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

