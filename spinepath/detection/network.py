"""The detector's definition: MONAI RetinaNet with a ResNet18-FPN backbone (2D), and its configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

from spinepath.core.config import dataclass_from_dict

if TYPE_CHECKING:
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

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
        if "anchor_shapes" in d:
            d = {**d, "anchor_shapes": tuple(tuple(a) for a in d["anchor_shapes"])}
        return dataclass_from_dict(cls, d, tuples=("returned_layers", "percentiles"))


def anchor_generator(cfg: DetectorConfig) -> AnchorGeneratorWithAnchorShape:
    """The detector's anchors: :attr:`DetectorConfig.anchor_shapes` at every returned FPN level."""
    return AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**i for i in range(len(cfg.returned_layers) + 1)],
        base_anchor_shapes=[list(a) for a in cfg.anchor_shapes],
    )


def box_selector_parameters(cfg: DetectorConfig) -> dict:
    """Keyword arguments of MONAI's box selection at inference (``set_box_selector_parameters``)."""
    return {"score_thresh": cfg.score_thresh, "topk_candidates_per_level": 300, "nms_thresh": cfg.nms_thresh,
            "detections_per_img": cfg.detections_per_img * 3}


def size_divisible(cfg: DetectorConfig) -> list[int]:
    """Input sizes are padded to multiples of this (the coarsest FPN level)."""
    return [2 * 2 * 2 ** max(cfg.returned_layers)] * 2


def build_detector(cfg: DetectorConfig) -> RetinaNetDetector:
    """Create an untrained 2D RetinaNetDetector with a ResNet18-FPN backbone (one input channel)."""
    # the network classes only where a network is built: an exported detector never imports them
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
    from monai.networks.nets import resnet

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
    anchors = anchor_generator(cfg)
    network = RetinaNet(
        spatial_dims=2,
        num_classes=cfg.num_classes,
        num_anchors=anchors.num_anchors_per_location()[0],
        feature_extractor=feature_extractor,
        size_divisible=size_divisible(cfg),
    )
    det = RetinaNetDetector(network=network, anchor_generator=anchors, debug=False)
    det.set_target_keys(box_key="boxes", label_key="labels")
    det.set_atss_matcher(num_candidates=4, center_in_gt=False)
    det.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    det.set_box_selector_parameters(**box_selector_parameters(cfg))
    return det

