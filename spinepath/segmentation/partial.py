"""Partial labels for the segmentation network (issue 14): each dataset supervises only the classes it annotates.

The network predicts :data:`CLASSES` on every pixel. A dataset's mask names *groups* of those classes: SPIDER's
``vertebra`` is a vertebral body or its posterior elements, and its background is only background; chu_t2 /
spineweb_vb annotate vertebral bodies, so their unlabelled pixels may be background, posterior elements, disc
or canal; ivd_t2 annotates discs. The loss compares the *marginal* probability of each group (the sum of its
classes' probabilities) with the mask (the marginal loss of Shi et al., MedIA 2021), as cross-entropy plus a soft
Dice over the foreground groups, so an unannotated class is never pushed towards background.

A label map names its classes (``spider_seg`` ``index.json`` ``labels``, or a 3D set's ``structure``); any
class this module knows (:data:`ANNOTATION_CLASSES`) may appear, and everything the mask leaves at 0 is the
group of the classes it does not name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Classes of the segmentation network, in output-channel order.
CLASSES = ("background", "vertebral_body", "posterior_elements", "disc", "spinal_canal")
#: Annotation names found in the shared data and the network classes each covers.
ANNOTATION_CLASSES = {
    "vertebra": ("vertebral_body", "posterior_elements"),  # SPIDER: the whole vertebra
    "vertebral_body": ("vertebral_body",),
    "posterior_elements": ("posterior_elements",),
    "disc": ("disc",),
    "spinal_canal": ("spinal_canal",),
}


def label_groups(annotated: list[str]) -> np.ndarray:
    """The ``(groups, classes)`` 0/1 matrix of a mask that annotates ``annotated`` (mask value i = ``annotated[i-1]``).

    Group 0 is the mask's 0: every class no annotation covers (background always among them).

    Raises:
        ValueError: For an unknown annotation name, or two annotations covering the same class.

    """
    m = np.zeros((len(annotated) + 1, len(CLASSES)), np.float32)
    covered: set[str] = set()
    for g, name in enumerate(annotated, start=1):
        if name not in ANNOTATION_CLASSES:
            raise ValueError(f"unknown annotation {name!r}; known: {', '.join(ANNOTATION_CLASSES)}")
        for c in ANNOTATION_CLASSES[name]:
            if c in covered:
                raise ValueError(f"class {c!r} annotated twice")
            covered.add(c)
            m[g, CLASSES.index(c)] = 1
    m[0] = [0.0 if c in covered else 1.0 for c in CLASSES]
    return m


def group_log_probs(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Log marginal probability of each group: ``log sum_{c in g} softmax(logits)_c``.

    Args:
        logits: ``(B, C, H, W)``.
        groups: ``(B, G, C)`` 0/1 matrices (rows of padding groups all zero).

    Returns:
        ``(B, G, H, W)``; a padding group is about -1e4 (probability 0, finite gradients).

    """
    logp = torch.log_softmax(logits, 1)  # (B, C, H, W)
    # a large finite offset rather than -inf: an empty (padding) group would give NaN gradients
    mask = torch.where(groups > 0, 0.0, -1e4).to(logp.dtype)  # (B, G, C)
    return torch.logsumexp(logp[:, None] + mask[..., None, None], dim=2)


def partial_label_loss(logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor,
                       dice_weight: float = 1.0, smooth: float = 1.0) -> torch.Tensor:
    """Marginal cross-entropy plus soft Dice over each sample's annotated foreground groups.

    Args:
        logits: ``(B, C, H, W)`` network outputs.
        target: ``(B, H, W)`` group index per pixel (0 = the mask's unlabelled group; -1 = ignore).
        groups: ``(B, G, C)`` from :func:`label_groups` (padded with zero rows to a common ``G``).
        dice_weight: Weight of the Dice term.
        smooth: Dice smoothing.

    """
    lg = group_log_probs(logits, groups)  # (B, G, H, W)
    valid = target >= 0
    t = target.clamp(min=0)
    ce = -torch.gather(lg, 1, t[:, None]).squeeze(1)
    ce = (ce * valid).sum() / valid.sum().clamp(min=1)
    if dice_weight <= 0:
        return ce
    p = lg.exp() * valid[:, None]
    onehot = F.one_hot(t, lg.shape[1]).permute(0, 3, 1, 2).to(p.dtype) * valid[:, None]
    inter = (p * onehot).sum((2, 3))
    denom = p.sum((2, 3)) + onehot.sum((2, 3))
    dice = (2 * inter + smooth) / (denom + smooth)  # (B, G)
    fg = groups[:, 1:].sum(2) > 0  # annotated foreground groups of each sample
    loss_dice = 1 - (dice[:, 1:] * fg).sum() / fg.sum().clamp(min=1)
    return ce + dice_weight * loss_dice
