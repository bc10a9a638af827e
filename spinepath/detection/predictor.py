"""2D vertebral-body detector: MONAI RetinaNet with a ResNet18-FPN backbone, pre/post-processing, I/O.

The detector works on sagittal slices resampled to a fixed isotropic grid (``DetectorConfig.spacing_mm``)
and normalised to [0, 1] by volume percentiles. Predictions are mapped back to source pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from spinepath.core.boxes import box_area, box_intersection, box_iou
from spinepath.core.exported import load_export, save_export
from spinepath.core.files import save_torch
from spinepath.core.precision import forward_context
from spinepath.core.weights import float_state, half_state
from spinepath.detection.network import DetectorConfig, build_detector
from spinepath.transforms import intensity_range, to_grid

if TYPE_CHECKING:
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

    from spinepath.detection.exported import ExportedRetinaNet

# -------------------------------------------------------------------------------------- post-processing


def strict_suppression(
    boxes: np.ndarray, scores: np.ndarray, iou_thresh: float, containment_thresh: float
) -> np.ndarray:
    """Greedy suppression for non-overlapping objects; returns kept indices by descending score.

    A box is dropped if its IoU with a kept box exceeds ``iou_thresh`` or if more than ``containment_thresh``
    of its own area lies inside a kept box (vertebral bodies never overlap on a sagittal slice).
    """
    order = np.argsort(-scores)
    keep: list[int] = []
    area = box_area(boxes)
    for i in order:
        if keep:
            k = np.array(keep)
            inter = box_intersection(boxes[i : i + 1], boxes[k])[0]  # in the network's float32, as trained
            iou = inter / (area[i] + area[k] - inter + 1e-9)
            if np.any(iou > iou_thresh) or np.any(inter / (np.minimum(area[i], area[k]) + 1e-9) > containment_thresh):
                continue
        keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


@dataclass
class SliceDetections:
    """Detections on one slice, in source pixel coordinates."""

    boxes: np.ndarray  # (N, 4) [r0, c0, r1, c1]
    scores: np.ndarray  # (N,) max class score
    s1_scores: np.ndarray  # (N,) score of the S1 class (0 where not predicted)
    labels: np.ndarray  # (N,) argmax class


class VertebraDetector:
    """A trained detector with its configuration; predicts vertebral bodies on sagittal slices.

    Args:
        detector: The MONAI RetinaNetDetector, or an :class:`~spinepath.detection.exported.ExportedRetinaNet`
            (inference only).
        cfg: Its configuration.
        meta: Free-form metadata stored with the weights (training data, metrics, version).

    """

    def __init__(self, detector: RetinaNetDetector | ExportedRetinaNet, cfg: DetectorConfig,
                 meta: dict | None = None) -> None:
        self.detector = detector
        self.cfg = cfg
        self.meta = meta or {}
        self.device = torch.device("cpu")

    @classmethod
    def new(cls, cfg: DetectorConfig | None = None) -> VertebraDetector:
        """An untrained detector."""
        cfg = cfg or DetectorConfig()
        return cls(build_detector(cfg), cfg)

    def to(self, device: str | torch.device) -> VertebraDetector:
        """Move to a device."""
        self.device = torch.device(device)
        self.detector.to(self.device)
        return self

    def save(self, path: str | Path, half: bool = True) -> None:
        """Save weights (fp16 by default) with config and metadata, atomically."""
        sd = self.detector.network.state_dict()
        if half:
            sd = half_state(sd)
        save_torch({"config": dataclasses.asdict(self.cfg), "state_dict": sd, "meta": self.meta}, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", exported: bool = True) -> VertebraDetector:
        """Load a detector saved by :meth:`save`.

        With ``exported`` (default) and a current export beside the file (:meth:`export`), the network is the
        exported one (:class:`~spinepath.detection.exported.ExportedRetinaNet`: inference only, no MONAI network
        code imported); else MONAI's ``RetinaNetDetector`` is built.

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If the file is not a spinepath detector checkpoint.

        """
        path = Path(path)
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"detector weights not found: {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
            raise ValueError(f"{path} is not a spinepath detector checkpoint")
        cfg = DetectorConfig.from_dict(ckpt["config"])
        found = load_export(path, device) if exported else None
        if found is not None:
            from spinepath.detection.exported import ExportedRetinaNet  # MONAI's box code only where it runs

            det = ExportedRetinaNet(found[0]["network"][0], cfg).eval()
        else:
            det = build_detector(cfg)
            det.network.load_state_dict(float_state(ckpt["state_dict"]))
            det.eval()
        model = cls(det, cfg, ckpt.get("meta", {})).to(device)
        if torch.device(device).type == "cpu":
            # oneDNN's CPU convolutions run faster on channels-last weights (the maps follow them): on the 19-slice
            # example, 2 cores, detection 0.90 -> 0.67 s in a cold process, 0.52 -> 0.47 s warm; the same boxes
            model.detector.network.to(memory_format=torch.channels_last)
        return model

    def export(self, path: str | Path) -> Path:
        """Write the TorchScript export of this detector's network beside its weights file ``path``."""
        return save_export({"network": [self.detector.network.cpu()]}, path, {"kind": "vertebra detector"})

    @torch.no_grad()
    def predict(
        self,
        slices: list[np.ndarray],
        spacing: tuple[float, float],
        lo_hi: tuple[float, float] | None = None,
        batch_size: int = 8,
    ) -> list[SliceDetections]:
        """Detect vertebral bodies on sagittal slices of one series.

        Args:
            slices: 2D arrays ``(rows, cols)`` of equal shape (rows superior->inferior).
            spacing: Pixel spacing (row, col) in mm.
            lo_hi: Intensity range for normalisation; computed over all slices when None.
            batch_size: Slices per forward pass.

        Returns:
            One :class:`SliceDetections` per slice, boxes in source pixels.

        """
        if not slices:
            return []
        self.detector.eval()
        if lo_hi is None:
            lo_hi = intensity_range(np.stack(slices), self.cfg.percentiles)
        out: list[SliceDetections] = []
        for start in range(0, len(slices), batch_size):
            chunk = [to_grid(s, spacing, self.cfg, lo_hi) for s in slices[start : start + batch_size]]
            images = [c[0].to(self.device) for c in chunk]
            # the exported detector decodes in float32 whatever the network ran in; MONAI's eager one would decode
            # float16 maps in float16 (boxes 0.12 px off on a GPU, a review reason changed): it stays float32
            safe = getattr(self.detector, "autocast_safe", False)
            with forward_context(self.device, "detection", amp=safe):
                results = self.detector(images)
            for (_, scale), res in zip(chunk, results):
                out.append(self._postprocess(res, scale))
        return out

    def _postprocess(self, res: dict, scale: tuple[float, float]) -> SliceDetections:
        boxes = res["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        scores = res["labels_scores"].detach().float().cpu().numpy().reshape(-1)
        labels = res["labels"].detach().cpu().numpy().reshape(-1)
        # merge the class-wise detections of the same body: one box per body, S1 score kept aside
        keep = strict_suppression(boxes, scores, self.cfg.nms_thresh, self.cfg.containment_thresh)
        keep = keep[: self.cfg.detections_per_img]
        s1 = np.zeros(len(keep), dtype=np.float32)
        if len(keep):
            iou = box_iou(boxes[keep], boxes)
            for j in range(len(keep)):
                same = (iou[j] > 0.5) & (labels == 1)
                s1[j] = scores[same].max() if np.any(same) else 0.0
        boxes = boxes[keep] / np.array([scale[0], scale[1], scale[0], scale[1]], dtype=np.float32)
        return SliceDetections(boxes=boxes, scores=scores[keep], s1_scores=s1, labels=labels[keep])
