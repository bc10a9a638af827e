"""Intensity normalisation and resampling shared by training and inference.

The scaling of a slice to [0, 1] by a range is MONAI's ``ScaleIntensityRange`` formula, written out here:
importing it imports ``monai.transforms.intensity`` and, with it, SciPy's signal and statistics packages (half a
second of an inference process's cold start, issue 15); ``tests/test_exported.py`` checks it bit for bit against
MONAI's transform on the real examples. The range itself is hand-written, because MONAI gives
other numbers: the range itself (:func:`intensity_range`) ignores the zero background and subsamples large
volumes, which ``ScaleIntensityRangePercentiles`` does not; the resampling to the detector grid is torch's
antialiased bilinear ``interpolate``, where MONAI's ``Resize(anti_aliasing=True)`` smooths with a Gaussian.
The trained models depend on both.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


class GridSpec(Protocol):
    """What :func:`to_grid` needs of a detector configuration: the working grid's pixel size."""

    spacing_mm: float


def intensity_range(volume: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Robust intensity range of a slice or volume, ignoring the zero background."""
    v = volume[volume > 0] if np.any(volume > 0) else volume.ravel()
    if v.size > 2_000_000:
        v = v[:: v.size // 2_000_000 + 1]
    lo, hi = np.percentile(v, percentiles)
    return float(lo), float(max(hi, lo + 1e-3))


def to_grid(
    image: np.ndarray, spacing: tuple[float, float], cfg: GridSpec, lo_hi: tuple[float, float]
) -> tuple[torch.Tensor, tuple[float, float]]:
    """Normalise a slice and resample it to the detector grid.

    Returns:
        ``(tensor (1, H', W'), scale)`` where ``scale = (rows', cols') / (rows, cols)`` source->grid.

    """
    x = torch.from_numpy(np.ascontiguousarray(scale_to_unit(image, lo_hi)))
    h, w = image.shape
    nh = max(16, round(h * spacing[0] / cfg.spacing_mm))
    nw = max(16, round(w * spacing[1] / cfg.spacing_mm))
    x = F.interpolate(x[None, None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    return x, (nh / h, nw / w)


def normalise_image(image: np.ndarray, lo_hi: tuple[float, float] | None = None) -> np.ndarray:
    """Scale intensities to [0, 1] by the robust range (1st-99.5th percentile of the non-zero pixels)."""
    return scale_to_unit(image, lo_hi or intensity_range(image, (1.0, 99.5)))


def scale_to_unit(image: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    """``(image - lo) / (hi - lo)`` clipped to [0, 1], float32: MONAI ``ScaleIntensityRange(lo, hi, 0, 1, clip=True)``.

    Its operations in its order (the module docstring says why it is not imported).
    """
    lo, hi = lo_hi
    img = np.asarray(image, dtype=np.float32)
    if hi - lo == 0.0:  # MONAI: a divide by zero is avoided by shifting only
        return (img - lo).astype(np.float32)
    img = (img - lo) / (hi - lo)
    return np.clip(img, 0.0, 1.0).astype(np.float32)

