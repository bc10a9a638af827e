"""Study uncertainty of the vertebra detector, for choosing the next study to annotate.

Three signals, each in [0, 1], averaged:

- ``detection_entropy``: mean binary entropy of the per-slice detection scores of the grouped vertebrae;
- ``naming``: one minus the mean naming confidence (no named vertebra: 1);
- ``tta_disagreement``: how much a test-time-augmented run (image zoomed by 1.1, intensity gamma 1.3: both
  within the training augmentation) disagrees with the plain run: per level named by either run, one minus
  the IoU of the two runs' boxes on the plain run's best slice for that level (the TTA run's nearest slice
  where it has none there; 1 when only one run names the level).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from spinepath.core.boxes import box_iou
from spinepath.core.geometry import SeriesVolume
from spinepath.core.results import Vertebra
from spinepath.detection.grouping import group_and_name
from spinepath.detection.predictor import VertebraDetector
from spinepath.transforms import intensity_range

#: Test-time augmentation of the disagreement signal.
TTA_ZOOM = 1.1
TTA_GAMMA = 1.3


@dataclass
class Uncertainty:
    """Uncertainty of one study (all fields in [0, 1]; ``score`` is their mean)."""

    score: float
    detection_entropy: float
    naming: float
    tta_disagreement: float
    n_vertebrae: int

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def _named(tracks: list[Vertebra]) -> dict[str, Vertebra]:
    return {t.level: t for t in tracks if t.level != "?"}


def _disagreement(a: Vertebra, b: Vertebra) -> float:
    """1 - IoU of two tracks' boxes on ``a``'s best slice (``b``'s nearest slice to it)."""
    k = a.slices[int(np.argmax(a.scores))]
    j = int(np.argmin([abs(s - k) for s in b.slices]))
    return 1.0 - float(box_iou(a.boxes[a.slices.index(k)], b.boxes[j])[0, 0])


def _run(model: VertebraDetector, volume: SeriesVolume, zoom: float = 1.0, gamma: float = 1.0) -> list[Vertebra]:
    slices = list(volume.pixels)
    lo, hi = intensity_range(volume.pixels, model.cfg.percentiles)
    if gamma != 1.0:  # gamma on the normalised range, back to the original units
        slices = [lo + (hi - lo) * np.clip((s - lo) / max(hi - lo, 1e-6), 0, 1) ** gamma for s in slices]
    # a larger nominal spacing enlarges the image on the detector grid; boxes come back in source pixels
    spacing = (volume.spacing[0] * zoom, volume.spacing[1] * zoom)
    dets = model.predict(slices, spacing, lo_hi=(lo, hi))
    return group_and_name(dets, volume.pixels.shape[1:])


def study_uncertainty(volume: SeriesVolume, model: VertebraDetector) -> Uncertainty:
    """Uncertainty of the detector on one sagittal series (two detector runs)."""
    plain = _run(model, volume)
    tta = _run(model, volume, TTA_ZOOM, TTA_GAMMA)
    scores = np.concatenate([np.asarray(t.scores, dtype=np.float64) for t in plain]) if plain else np.zeros(0)
    entropy = float(_binary_entropy(scores).mean()) if scores.size else 1.0
    named = [t.name_confidence for t in plain if t.level != "?"]
    naming = 1.0 - float(np.mean(named)) if named else 1.0
    a, b = _named(plain), _named(tta)
    levels = set(a) | set(b)
    dis = [_disagreement(a[lv], b[lv]) if lv in a and lv in b else 1.0 for lv in levels]
    disagreement = float(np.mean(dis)) if dis else 1.0
    return Uncertainty(
        score=float(np.mean([entropy, naming, disagreement])),
        detection_entropy=entropy,
        naming=naming,
        tta_disagreement=disagreement,
        n_vertebrae=len(plain),
    )
