"""The segmentation network: a 2D MONAI DynUNet (nnU-Net layout) over sagittal slices on the mm grid.

Five resolution levels, instance norm, leaky ReLU; deep supervision during training (the two coarser decoder
outputs, upsampled, weighted 1/2 and 1/4 as in nnU-Net). Input: one channel in [0, 1] centred on zero;
output: :data:`spinepath.segmentation.partial.CLASSES` logits. Sizes divisible by :data:`DIVISOR` pass through.
Several such networks of one layout (``SegNetConfig.members``) form one model whose logits are their mean
(:class:`MeanLogits`: the normalised geometric mean of their probabilities), in training as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from spinepath.core.config import dataclass_from_dict
from spinepath.segmentation.partial import CLASSES

#: Format tag of a saved segmentation model file.
FORMAT = "spinepath-segmentation-1"
#: Total down-sampling of the network (height and width must be multiples of it).
DIVISOR = 16


@dataclass
class SegNetConfig:
    """Network and training hyper-parameters of the segmentation model."""

    filters: tuple[int, ...] = (16, 32, 64, 128, 192)
    deep_supr_num: int = 2
    patch: int = 192  # training patch (pixels of the grid)
    batch_size: int = 8
    epochs: int = 36
    lr: float = 2e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    seed: int = 0
    members: int = 1  # networks of this layout whose logits are averaged (:class:`MeanLogits`)
    sacrum_unknown: bool = False  # training: the sacrum of sources that leave it unlabelled is not background

    @classmethod
    def from_dict(cls, d: dict) -> SegNetConfig:
        """Build from a dict, ignoring unknown keys."""
        return dataclass_from_dict(cls, d, tuples=("filters",))


class MeanLogits(torch.nn.Module):
    """Networks of one layout as one model: the mean of their logits (deep-supervision outputs included).

    The mean of the logits is the softmax's normalised geometric mean of the members' probabilities; the same
    rule trains (a retraining round fine-tunes all members through it) and predicts.
    """

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The members' mean output."""
        return torch.stack([m(x) for m in self.members]).mean(0)


def build_segnet(cfg: SegNetConfig) -> torch.nn.Module:
    """A randomly initialised 2D DynUNet for :data:`CLASSES` (``cfg.members`` of them: :class:`MeanLogits`)."""
    if cfg.members > 1:
        return MeanLogits([build_segnet(replace(cfg, members=1)) for _ in range(cfg.members)])
    from monai.networks.nets import DynUNet  # only where a network is built: an exported one needs no MONAI network

    n = len(cfg.filters)
    return DynUNet(spatial_dims=2, in_channels=1, out_channels=len(CLASSES), kernel_size=[3] * n,
                   strides=[1] + [2] * (n - 1), upsample_kernel_size=[2] * (n - 1), filters=list(cfg.filters),
                   norm_name=("INSTANCE", {"affine": True}), deep_supervision=cfg.deep_supr_num > 0,
                   deep_supr_num=max(cfg.deep_supr_num, 1))


def to_input(image: torch.Tensor) -> torch.Tensor:
    """Network input from [0, 1] images ``(B, 1, H, W)``: centred on zero."""
    return (image - 0.5) / 0.25


def pad_to_divisor(x: torch.Tensor, divisor: int = DIVISOR) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``(B, C, H, W)`` at the bottom / right to multiples of ``divisor``; returns the original size."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    return torch.nn.functional.pad(x, (0, pw, 0, ph)), (h, w)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, C, H, W)`` of whole slices ``(B, 1, H, W)`` in [0, 1] (eval mode, no padding left)."""
    model.eval()
    x, (h, w) = pad_to_divisor(to_input(image))
    return torch.softmax(model(x), 1)[..., :h, :w]
