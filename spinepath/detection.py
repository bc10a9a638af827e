"""2D vertebral-body detector: MONAI RetinaNet with a ResNet18-FPN backbone, pre/post-processing, I/O.

The detector works on sagittal slices resampled to a fixed isotropic grid (``DetectorConfig.spacing_mm``)
and normalised to [0, 1] by volume percentiles. Predictions are mapped back to source pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
from monai.networks.nets import resnet

from spinepath.files import atomic_file

CLASS_NAMES = ("vertebral_body", "S1")


@dataclass
class DetectorConfig:
    """Hyper-parameters that define the detector and its input grid (saved with the weights)."""

    spacing_mm: float = 2.0
    fpn_channels: int = 128
    returned_layers: tuple[int, ...] = (1, 2)
    #: Anchor shapes (rows, cols) in pixels of the working grid at the finest FPN level.
    anchor_shapes: tuple[tuple[int, int], ...] = ((12, 16), (16, 20), (20, 24))
    num_classes: int = 2
    score_thresh: float = 0.05
    nms_thresh: float = 0.2
    #: After NMS, drop a box whose intersection with a higher-scoring box exceeds this fraction of its area.
    containment_thresh: float = 0.4
    detections_per_img: int = 30
    percentiles: tuple[float, float] = (1.0, 99.5)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        """Build from a (JSON) dict, ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("returned_layers", "percentiles"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if "anchor_shapes" in kw:
            kw["anchor_shapes"] = tuple(tuple(a) for a in kw["anchor_shapes"])
        return cls(**kw)


def build_detector(cfg: DetectorConfig) -> RetinaNetDetector:
    """Create an untrained 2D RetinaNetDetector with a ResNet18-FPN backbone (one input channel)."""
    backbone = resnet.ResNet(
        block=resnet.ResNetBlock,
        layers=[2, 2, 2, 2],
        block_inplanes=resnet.get_inplanes(),
        n_input_channels=1,
        conv1_t_stride=2,
        conv1_t_size=7,
        spatial_dims=2,
    )
    in_stage2 = backbone.in_planes // 8
    returned = list(cfg.returned_layers)
    feature_extractor = BackboneWithFPN(
        backbone,
        return_layers={f"layer{k}": str(v) for v, k in enumerate(returned)},
        in_channels_list=[in_stage2 * 2 ** (i - 1) for i in returned],
        out_channels=cfg.fpn_channels,
        spatial_dims=2,
    )
    anchor_generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**i for i in range(len(returned) + 1)],
        base_anchor_shapes=[list(a) for a in cfg.anchor_shapes],
    )
    network = RetinaNet(
        spatial_dims=2,
        num_classes=cfg.num_classes,
        num_anchors=anchor_generator.num_anchors_per_location()[0],
        feature_extractor=feature_extractor,
        size_divisible=[2 * 2 * 2 ** max(returned)] * 2,
    )
    det = RetinaNetDetector(network=network, anchor_generator=anchor_generator, debug=False)
    det.set_target_keys(box_key="boxes", label_key="labels")
    det.set_atss_matcher(num_candidates=4, center_in_gt=False)
    det.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    det.set_box_selector_parameters(
        score_thresh=cfg.score_thresh,
        topk_candidates_per_level=300,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img * 3,
    )
    return det


# ------------------------------------------------------------------------------------------ preprocessing
def intensity_range(volume: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Robust intensity range of a slice or volume, ignoring the zero background."""
    v = volume[volume > 0] if np.any(volume > 0) else volume.ravel()
    if v.size > 2_000_000:
        v = v[:: v.size // 2_000_000 + 1]
    lo, hi = np.percentile(v, percentiles)
    return float(lo), float(max(hi, lo + 1e-3))


def to_grid(
    image: np.ndarray, spacing: tuple[float, float], cfg: DetectorConfig, lo_hi: tuple[float, float]
) -> tuple[torch.Tensor, tuple[float, float]]:
    """Normalise a slice and resample it to the detector grid.

    Returns:
        ``(tensor (1, H', W'), scale)`` where ``scale = (rows', cols') / (rows, cols)`` source->grid.

    """
    lo, hi = lo_hi
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    x = ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)
    h, w = image.shape
    nh = max(16, round(h * spacing[0] / cfg.spacing_mm))
    nw = max(16, round(w * spacing[1] / cfg.spacing_mm))
    x = F.interpolate(x[None, None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    return x, (nh / h, nw / w)


# -------------------------------------------------------------------------------------- post-processing
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` boxes in ``[r0, c0, r1, c1]`` edge coordinates."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    r0 = np.maximum(a[:, None, 0], b[None, :, 0])
    c0 = np.maximum(a[:, None, 1], b[None, :, 1])
    r1 = np.minimum(a[:, None, 2], b[None, :, 2])
    c1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(r1 - r0, 0, None) * np.clip(c1 - c0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def strict_suppression(
    boxes: np.ndarray, scores: np.ndarray, iou_thresh: float, containment_thresh: float
) -> np.ndarray:
    """Greedy suppression for non-overlapping objects; returns kept indices by descending score.

    A box is dropped if its IoU with a kept box exceeds ``iou_thresh`` or if more than ``containment_thresh``
    of its own area lies inside a kept box (vertebral bodies never overlap on a sagittal slice).
    """
    order = np.argsort(-scores)
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in order:
        if keep:
            k = np.array(keep)
            r0 = np.maximum(boxes[i, 0], boxes[k, 0])
            c0 = np.maximum(boxes[i, 1], boxes[k, 1])
            r1 = np.minimum(boxes[i, 2], boxes[k, 2])
            c1 = np.minimum(boxes[i, 3], boxes[k, 3])
            inter = np.clip(r1 - r0, 0, None) * np.clip(c1 - c0, 0, None)
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
        detector: The MONAI RetinaNetDetector.
        cfg: Its configuration.
        meta: Free-form metadata stored with the weights (training data, metrics, version).

    """

    def __init__(self, detector: RetinaNetDetector, cfg: DetectorConfig, meta: dict | None = None) -> None:
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
            sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
        with atomic_file(path, ".pt") as tmp:
            torch.save({"config": dataclasses.asdict(self.cfg), "state_dict": sd, "meta": self.meta}, tmp)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> VertebraDetector:
        """Load a detector saved by :meth:`save`.

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
        det = build_detector(cfg)
        det.network.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        )
        det.eval()
        return cls(det, cfg, ckpt.get("meta", {})).to(device)

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
