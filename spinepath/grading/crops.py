"""Structures to grade (vertebrae and discs on a 2D slice) and their crops in the spine-aligned frame.

A crop is sampled around a structure's centre in a frame aligned with the local spine axis (rows run
superior -> inferior along the spine, columns anterior -> posterior), at a fixed physical scale. Geometric and
intensity augmentation of the crops for training lives here too.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import map_coordinates

from spinepath.core.geometry import spacing_from_gap
from spinepath.core.levels import DISC_GRADES, VERTEBRA_GRADES, VERTEBRA_LEVELS

if TYPE_CHECKING:  # the data readers (nibabel) are not imported by an inference process
    from spinepath.data.datasets import SparkCase

#: Levels the classifiers were trained on (the graded levels of spark_midsag); others are not graded.
GRADED_VERTEBRAE = ("L1", "L2", "L3", "L4", "L5")
GRADED_DISCS = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")


@dataclass
class Structure:
    """A vertebra or disc to grade on one 2D slice.

    Attributes:
        image_key: Key of the (normalised) slice in an image dictionary.
        kind: ``"vertebra"`` or ``"disc"``.
        level: Anatomical level name (``"L3"``, ``"L3-L4"``).
        centre: ``(row, col)`` in pixels.
        axis: Unit vector ``(drow, dcol)`` of the local spine axis, pointing inferior.
        spacing_mm: Pixel size in mm (estimated where unknown).
        grade: 0-based grade index, or -1 when unknown.
        case: Study / case identifier.

    """

    image_key: str
    kind: str
    level: str
    centre: tuple[float, float]
    axis: tuple[float, float]
    spacing_mm: float
    grade: int = -1
    case: str = ""


def local_axes(centres: np.ndarray) -> np.ndarray:
    """Unit spine-axis vector at each of a top-down ordered chain of centres ``(N, 2)``.

    The axis at a point is the direction from its upper to its lower neighbour (one-sided at the ends);
    a single point gets the image vertical.
    """
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    out = np.tile([1.0, 0.0], (len(c), 1))
    if len(c) < 2:
        return out
    for i in range(len(c)):
        a, b = c[max(i - 1, 0)], c[min(i + 1, len(c) - 1)]
        d = b - a
        n = np.linalg.norm(d)
        if n > 0:
            out[i] = d / n if d[0] >= 0 else -d / n
    return out


def spark_structures(case: SparkCase) -> list[Structure]:
    """All graded vertebrae and discs of a spark_midsag study, at their labelled centres."""
    pts = sorted(case.points, key=lambda p: p["xy"][1])
    centres = np.array([[p["xy"][1], p["xy"][0]] for p in pts], dtype=np.float64)
    axes = local_axes(centres)
    sp = spacing_from_gap(case.level_gap_px())
    out = []
    for p, c, a in zip(pts, centres, axes):
        grades = VERTEBRA_GRADES if p["kind"] == "vertebra" else DISC_GRADES
        out.append(
            Structure(
                image_key=case.case,
                kind=p["kind"],
                level=p["level"],
                centre=(float(c[0]), float(c[1])),
                axis=(float(a[0]), float(a[1])),
                spacing_mm=sp,
                grade=grades.index(p["grade"]) if p.get("grade") in grades else -1,
                case=case.case,
            )
        )
    return out


def chain_structures(
    image_key: str, centres: np.ndarray, levels: list[str], spacing_mm: float, case: str = ""
) -> list[Structure]:
    """Vertebrae at the given top-down centres, plus a disc midway between each pair of neighbouring levels.

    Used at inference, where the structures come from the detector rather than from labels. Only the
    levels the classifiers were trained on are returned (:data:`GRADED_VERTEBRAE`, :data:`GRADED_DISCS`);
    the others only serve as neighbours (the spine axis, the T12-L1 and L5-S1 disc positions).
    """
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    axes = local_axes(c)
    out = [
        Structure(image_key, "vertebra", lv, (float(p[0]), float(p[1])), (float(a[0]), float(a[1])), spacing_mm,
                  case=case)
        for p, a, lv in zip(c, axes, levels)
        if lv in GRADED_VERTEBRAE
    ]
    for i in range(len(c) - 1):
        a, b = levels[i], levels[i + 1]
        if f"{a}-{b}" in GRADED_DISCS and VERTEBRA_LEVELS.index(b) == VERTEBRA_LEVELS.index(a) + 1:
            m = (c[i] + c[i + 1]) / 2
            ax = (axes[i] + axes[i + 1]) / 2
            ax = ax / max(np.linalg.norm(ax), 1e-6)
            out.append(Structure(image_key, "disc", f"{a}-{b}", (float(m[0]), float(m[1])),
                                 (float(ax[0]), float(ax[1])), spacing_mm, case=case))
    return out


@dataclass
class CropJitter:
    """A geometric perturbation of a crop (identity by default)."""

    rot_deg: float = 0.0
    scale: float = 1.0
    shift_mm: tuple[float, float] = (0.0, 0.0)
    flip_vertical: bool = False


def sample_crop(
    image: np.ndarray,
    s: Structure,
    crop_mm: float,
    crop_px: int,
    jitter: CropJitter | None = None,
    aspect: float = 1.0,
) -> np.ndarray:
    """Resample a crop around a structure in the spine-aligned frame.

    Args:
        image: Normalised slice ``(rows, cols)``.
        s: The structure.
        crop_mm: Width of the crop (anterior-posterior) in mm.
        crop_px: Side of the output in pixels.
        jitter: Optional rotation / scale / shift / superior-inferior flip.
        aspect: Height (along the spine) over width of the crop in mm; the output stays square.

    Returns:
        ``(crop_px, crop_px)`` float32; outside the image is 0.

    """
    j = jitter or CropJitter()
    a = np.asarray(s.axis, dtype=np.float64)
    t = math.radians(j.rot_deg)
    a = np.array([a[0] * math.cos(t) - a[1] * math.sin(t), a[0] * math.sin(t) + a[1] * math.cos(t)])
    p = np.array([-a[1], a[0]])  # anterior -> posterior for an upright spine displayed anterior-left
    step_v = crop_mm * j.scale / crop_px / s.spacing_mm
    step_u = step_v * aspect
    f = max(1, int(math.ceil(max(step_u, step_v) - 0.25)))  # supersampling: box-average when shrinking
    n = crop_px * f
    grid = np.arange(n) - (n - 1) / 2
    u, v = grid * (step_u / f), grid * (step_v / f)
    if j.flip_vertical:
        u = -u
    c = np.asarray(s.centre, dtype=np.float64) + (j.shift_mm[0] * a + j.shift_mm[1] * p) / s.spacing_mm
    rows = c[0] + u[:, None] * a[0] + v[None, :] * p[0]
    cols = c[1] + u[:, None] * a[1] + v[None, :] * p[1]
    out = map_coordinates(image, [rows, cols], order=1, mode="constant", cval=0.0)
    if f > 1:
        out = out.reshape(crop_px, f, crop_px, f).mean(axis=(1, 3))
    return out.astype(np.float32)


#: Bounds of :func:`random_jitter` at strength 1: log-scale and shift per axis (mm).
JITTER_LOG_SCALE = 0.15
JITTER_SHIFT_MM = 3.0


def random_jitter(rng: random.Random, strength: float) -> CropJitter:
    """Geometric augmentation: small rotation, scale, shift and a superior-inferior flip.

    No anterior-posterior flip: the canal is posterior, a flipped crop is not anatomy.
    """
    return CropJitter(
        rot_deg=rng.uniform(-10, 10) * strength,
        scale=math.exp(rng.uniform(-JITTER_LOG_SCALE, JITTER_LOG_SCALE) * strength),
        shift_mm=(rng.uniform(-JITTER_SHIFT_MM, JITTER_SHIFT_MM) * strength,
                  rng.uniform(-JITTER_SHIFT_MM, JITTER_SHIFT_MM) * strength),
        flip_vertical=rng.random() < 0.5,
    )


def augment_intensity(x: np.ndarray, rng: random.Random, strength: float) -> np.ndarray:
    """MRI intensity augmentation: gamma, contrast/brightness, smooth bias field and Rician-like noise.

    Hand-written rather than MONAI's ``RandAdjustContrast`` / ``RandBiasField`` / ``RandRicianNoise``: one
    ``random.Random`` drives every draw here (and the crop jitter), which keeps the searched and committed
    classifiers' training reproducible; MONAI's transforms draw from their own states with other
    parameterisations.
    """
    if strength <= 0:
        return x
    n = x.shape[0]
    g = math.exp(rng.uniform(-0.35, 0.35) * strength)
    x = np.power(np.clip(x, 0, None), g)
    x = x * (1 + rng.uniform(-0.2, 0.2) * strength) + rng.uniform(-0.08, 0.08) * strength
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    coef = [rng.uniform(-0.15, 0.15) * strength for _ in range(5)]
    bias = np.exp(coef[0] * yy + coef[1] * xx + coef[2] * yy * xx + coef[3] * yy**2 + coef[4] * xx**2)
    x = x * bias
    sd = rng.uniform(0, 0.04) * strength
    if sd > 0:
        nr = np.random.default_rng(rng.randrange(2**31))
        x = np.sqrt((x + nr.normal(0, sd, x.shape)) ** 2 + nr.normal(0, sd, x.shape) ** 2)
    return x.astype(np.float32)

