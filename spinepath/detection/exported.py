"""MONAI's RetinaNet detection at inference over an exported (TorchScript) network.

:class:`ExportedRetinaNet` is the evaluation path of MONAI's ``RetinaNetDetector.forward`` with the network
loaded from ``model.ts`` (:mod:`spinepath.core.exported`): MONAI pads the images
(``detector_utils.preprocess_images``), makes the anchors (``AnchorGeneratorWithAnchorShape``), decodes the
regression (``BoxCoder``) and selects the boxes (``BoxSelector``: score threshold, top-k per level, NMS), with
the parameters of :func:`spinepath.detection.network.build_detector`. It exists because importing
``RetinaNetDetector`` imports every MONAI network and torchvision (seconds of a cold start); the outputs are the
detector's own (``tests/test_exported.py`` checks the boxes against it).
"""

from __future__ import annotations

import torch
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.apps.detection.utils.box_selector import BoxSelector
from monai.apps.detection.utils.detector_utils import preprocess_images
from monai.data.box_utils import box_iou
from monai.data.meta_obj import get_track_meta, set_track_meta
from torch import nn

from spinepath.detection.network import DetectorConfig, anchor_generator, box_selector_parameters, size_divisible

#: The keys of the RetinaNet network's outputs and of the detections (MONAI's defaults, as trained).
CLS_KEY, BOX_REG_KEY = "classification", "box_regression"


class ExportedRetinaNet(nn.Module):
    """Inference-only RetinaNet detector: an exported network with MONAI's anchors, decoding and selection.

    Args:
        network: The exported RetinaNet network: images ``(B, 1, H, W)`` -> ``{CLS_KEY, BOX_REG_KEY}`` lists of
            maps per FPN level.
        cfg: The detector's configuration.

    Called like ``RetinaNetDetector`` in eval mode: a list of ``(1, H, W)`` images -> one dict per image with
    ``boxes``, ``labels`` and ``labels_scores``.

    """

    #: The network's maps are cast to float32 before decoding, so the network may run under float16 autocast
    #: (:mod:`spinepath.core.precision`); MONAI's eager detector decodes in the maps' dtype.
    autocast_safe = True

    def __init__(self, network: nn.Module, cfg: DetectorConfig) -> None:
        super().__init__()
        self.network = network
        self.spatial_dims = 2
        self.size_divisible = size_divisible(cfg)
        self.anchor_generator = anchor_generator(cfg)
        self.num_anchors_per_loc = self.anchor_generator.num_anchors_per_location()[0]
        self.box_coder = BoxCoder(weights=(1.0,) * 2 * self.spatial_dims)
        self.box_selector = BoxSelector(box_overlap_metric=box_iou, apply_sigmoid=True,
                                        **box_selector_parameters(cfg))

    def _reshape_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Per-level maps ``(B, C*A, H, W)`` -> ``(B, sum(HWA), C)`` (MONAI's order: locations, then anchors)."""
        out = []
        for m in maps:
            b, h, w = m.shape[0], m.shape[-2], m.shape[-1]
            out.append(m.view(b, -1, m.shape[1] // self.num_anchors_per_loc, h, w).permute(0, 3, 4, 1, 2)
                       .reshape(b, -1, m.shape[1] // self.num_anchors_per_loc))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def forward(self, input_images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections per image, as ``RetinaNetDetector.forward`` returns them in eval mode."""
        # plain tensors, not MetaTensors: the same numbers without the metadata bookkeeping
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            images, image_sizes = preprocess_images(input_images, self.spatial_dims, self.size_divisible)
        finally:
            set_track_meta(tracking)
        # float32 from here on: under autocast (CUDA) the network's maps are float16
        head = {k: [t.float() for t in v] for k, v in self.network(images).items()}
        anchors = self.anchor_generator(images, head[CLS_KEY])
        per_level = [x.shape[2:].numel() * self.num_anchors_per_loc for x in head[CLS_KEY]]
        logits = list(self._reshape_maps(head[CLS_KEY]).split(per_level, dim=1))
        regression = list(self._reshape_maps(head[BOX_REG_KEY]).split(per_level, dim=1))
        detections = []
        for i, size in enumerate(image_sizes):
            level_anchors = anchors[i].split(per_level)
            boxes = [self.box_coder.decode_single(r[i].to(torch.float32), a).to(logits[0].dtype)
                     for r, a in zip(regression, level_anchors)]
            b, s, lab = self.box_selector.select_boxes_per_image(boxes, [c[i] for c in logits], size)
            detections.append({"boxes": b, "labels_scores": s, "labels": lab})
        return detections
