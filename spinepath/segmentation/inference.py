"""The segmentation stage of a study (issue 14, items 2-3): class maps, named instances and measurements.

The network runs on the key slice of the T2 (the mid-sagittal slice of the detected spine,
:func:`spinepath.core.results.key_slice`) and on :data:`NEIGHBOURS` slices either side of it: the SEG carries
those slices, the measurements are taken on the key slice alone (the mid-sagittal slice, as radiologists
measure; the README says so; structures cut by the field of view are not measured). Each slice is resampled to
the training grid (:data:`spinepath.segmentation.data.GRID_MM`), segmented, and the class probabilities
brought back to the slice's own pixels (bilinear, the same corner-aligned mapping as the resampling) before
the arg-max; instances are named by the detector's boxes on that slice
(:func:`spinepath.segmentation.instances.level_instances`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spinepath.core.config import config_file
from spinepath.core.exported import file_digest, load_export, save_export
from spinepath.core.levels import VERTEBRA_LEVELS
from spinepath.core.precision import forward_context
from spinepath.core.results import DetectionResult, SpineSegmentation, key_slice
from spinepath.core.weights import float_state
from spinepath.measurements.spine import CUT, PARTIAL, measure_spine
from spinepath.segmentation.data import GRID_MM, SegSlice, empty_slices, grid_image
from spinepath.segmentation.instances import level_instances
from spinepath.segmentation.network import FORMAT, SegNetConfig, build_segnet, predict_probabilities
from spinepath.segmentation.partial import CLASSES

#: Slices segmented either side of the key slice (for the SEG; the measurements use the key slice). 0 by
#: default: one slice keeps the stage within its time budget (README benchmark).
NEIGHBOURS = 0
#: Per-class log-probability offsets chosen for the committed weights on the selection split.
OFFSETS_CONFIG = "segmentation_offsets.json"
#: Components smaller than this many square millimetres are fragments.
MIN_AREA_MM2 = 17.0
#: A named body whose mask on the key slice is smaller than this share of the median body mask there is a part
#: of a body the network segmented only in part: not measured. On the spider_midsag training + selection T2
#: (118 patients, 725 measured bodies) the smallest whole bodies were 0.40 of their slice's median (a collapsed
#: L2), 0.42 (a T12), 0.49 (an S1); below 0.27 lay only pieces (10 bodies of 8 patients, two of them S1), whose
#: slips read up to 35 mm.
PARTIAL_BODY_SHARE = 1 / 3


def load_segmenter(path: str | Path, exported: bool = True, device: str = "cpu", offsets: bool = True) -> nn.Module:
    """The saved segmentation network (``spinepath train segmentation``), float32, eval mode, on ``device``.

    With ``exported`` (default) and a current TorchScript export beside the file (:func:`export_segmenter`),
    the exported network (no MONAI network code imported); else the DynUNet. Either has a ``meta`` dict; with
    ``offsets``, its ``class_log_offsets`` are those chosen for these weights (:func:`load_offsets`).

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If the file is not a spinepath segmentation model.

    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no segmentation model (train one with `spinepath train segmentation`)")
    d = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{path}: not a spinepath segmentation model")
    found = load_export(p, device) if exported else None
    if found is not None:
        model = found[0]["segmenter"][0]
    else:
        model = build_segnet(SegNetConfig.from_dict(d["cfg"]))
        model.load_state_dict(float_state(d["state"]))
    model = model.to(device)
    model.meta = {"file": p.name, "epoch": d.get("epoch"), "selection_dice": d.get("selection_dice"), "cfg": d["cfg"],
                  "class_log_offsets": load_offsets(p) if offsets else None}
    return model.eval()


def export_segmenter(model: nn.Module, path: str | Path) -> Path:
    """Write the TorchScript export of an (eager) segmentation network beside its weights file ``path``.

    Traced (MONAI's DynUNet with deep supervision does not script) on one grid slice; it has no data-dependent
    control flow, and the parity tests run it on other sizes.
    """
    return save_export({"segmenter": [model]}, path, {"kind": "segmentation"},
                       examples={"segmenter": torch.zeros(1, 1, 256, 192)})


def segment_slices(model: nn.Module, images: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Class indices (:data:`spinepath.segmentation.partial.CLASSES`) of slices, on their own pixels.

    Args:
        model: The segmentation network.
        images: ``(n, rows, cols)`` raw intensities (one forward pass).
        spacing: Pixel spacing ``(row, col)`` in mm.

    Returns:
        ``(n, rows, cols)`` uint8 class indices.

    """
    grid = np.stack([grid_image(im, spacing) for im in images])
    dev = next(model.parameters()).device
    with forward_context(dev, "segmentation"):  # the softmax stays float32 under autocast
        probs = predict_probabilities(model, torch.from_numpy(grid)[:, None].to(dev)).float()
    return classes_on_pixels(probs, tuple(images.shape[1:]), class_offsets(model))


def probabilities_on_pixels(probs: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Grid probabilities ``(n, C, h, w)`` brought back to a slice's own ``shape``.

    Bilinear, with the corner-aligned mapping of :func:`spinepath.segmentation.data.grid_image`.
    """
    return torch.nn.functional.interpolate(probs, size=shape, mode="bilinear", align_corners=True)


def grid_slice_probabilities(model: nn.Module, s: SegSlice) -> torch.Tensor:
    """Class probabilities ``(1, C, h, w)`` of a resampled slice as the product gets them.

    A slice without signal (``s.empty``) is left empty as :func:`segment_study` leaves it: background with
    certainty, no forward pass. Used by every score of the product's masks (the contract, the selection split).
    """
    if s.empty:
        probs = torch.zeros(1, len(CLASSES), *s.image.shape)
        probs[:, 0] = 1.0
        return probs
    return predict_probabilities(model, torch.from_numpy(s.image)[None, None])


def classes_on_pixels(probs: torch.Tensor, shape: tuple[int, int], log_offsets: list[float] | None = None
                      ) -> np.ndarray:
    """Grid probabilities ``(n, C, h, w)`` on a slice's own ``shape``, arg-maxed: ``(n, *shape)`` uint8 classes.

    ``log_offsets``: per-class log-probability offsets added before the arg-max (:func:`class_offsets`).
    """
    return decide(probabilities_on_pixels(probs, shape), log_offsets).cpu().numpy().astype(np.uint8)


def decide(probs: torch.Tensor, log_offsets: list[float] | None = None) -> torch.Tensor:
    """Class indices of probabilities ``(n, C, ...)``: the arg-max of their logarithm plus ``log_offsets``."""
    if log_offsets is None:
        return probs.argmax(1)
    off = torch.tensor(log_offsets, dtype=probs.dtype, device=probs.device).view(1, -1, *[1] * (probs.ndim - 2))
    return (torch.log(probs.clamp_min(1e-6)) + off).argmax(1)


def load_offsets(path: str | Path) -> list[float] | None:
    """The class offsets chosen for the weights file ``path`` (:data:`OFFSETS_CONFIG`), None for other weights.

    The offsets are tied to the weights they were chosen for (their SHA-256): retrained weights get none until
    ``scripts/segmentation_offsets.py`` chooses theirs.
    """
    cfg = json.loads(config_file(OFFSETS_CONFIG).read_text())
    if cfg.get("weights_sha256") != file_digest(path):
        return None
    return [float(cfg["log_offsets"].get(c, 0.0)) for c in CLASSES]


def class_offsets(model: nn.Module) -> list[float] | None:
    """The model's class offsets (``meta["class_log_offsets"]``, set by :func:`load_segmenter`), else None."""
    return getattr(model, "meta", {}).get("class_log_offsets")


def slice_boxes(result: DetectionResult, k: int) -> dict[str, tuple[float, float, float, float]]:
    """Named vertebra -> its box on slice ``k`` (else on its nearest slice), top-down."""
    out = {}
    named = [t for t in result.vertebrae if t.level in VERTEBRA_LEVELS]
    for t in sorted(named, key=lambda t: VERTEBRA_LEVELS.index(t.level)):
        j = min(t.slices, key=lambda s: abs(s - k))
        out[t.level] = tuple(float(x) for x in t.box_on(j))
    return out


def touches_edge(mask: np.ndarray) -> bool:
    """Whether a structure reaches the image border (cut by the field of view: not measured)."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def partial_bodies(bodies: dict[str, np.ndarray]) -> set[str]:
    """The bodies whose masks are smaller than :data:`PARTIAL_BODY_SHARE` of the median body (three or more)."""
    areas = {lv: int(m.sum()) for lv, m in bodies.items()}
    if len(areas) < 3:
        return set()
    median = float(np.median(list(areas.values())))
    return {lv for lv, a in areas.items() if a < PARTIAL_BODY_SHARE * median}


def segment_study(result: DetectionResult, model: nn.Module, neighbours: int = NEIGHBOURS) -> SpineSegmentation:
    """Segment the key slice and its neighbours, name the instances, measure on the key slice.

    A neighbour without signal (:func:`~spinepath.segmentation.data.empty_slices`: outside the body) is not
    segmented: it has no structures.

    Named bodies cut by the field of view (the detector's ``truncated``, or touching the image border) or only
    partly segmented (:func:`partial_bodies`) are not measured: ``measurements["not_measured"]`` names them with
    the reason (:data:`CUT`, :data:`PARTIAL`); they stay in the instances (SEG, key image).

    Returns:
        The :class:`spinepath.core.results.SpineSegmentation` (also set as ``result.segmentation``).

    """
    t0 = time.perf_counter()
    vol = result.volume
    spacing = (float(vol.spacing[0]), float(vol.spacing[1]))
    min_pixels = max(int(MIN_AREA_MM2 / (spacing[0] * spacing[1])), 4)
    k = key_slice(result)
    n = vol.pixels.shape[0]
    slices = list(range(max(0, k - neighbours), min(n, k + neighbours + 1)))
    run = slices
    if len(slices) > 1:  # the key slice holds the detected spine: only its neighbours can be empty
        blank = empty_slices(vol.pixels)
        run = [j for j in slices if j == k or not blank[j]]
    classes = dict(zip(run, segment_slices(model, vol.pixels[run], spacing)))
    nothing = np.zeros(vol.pixels.shape[1:], np.uint8)
    instances = {j: level_instances(classes.get(j, nothing), slice_boxes(result, j), min_pixels) for j in slices}
    inst = instances[k]
    cut = {t.level for t in result.vertebrae if t.truncated}  # the detector saw the field of view cut them
    not_measured = {lv: CUT for lv, m in inst["bodies"].items() if lv in cut or touches_edge(m)}
    bodies = {lv: m for lv, m in inst["bodies"].items() if lv not in not_measured}
    not_measured.update(dict.fromkeys(partial_bodies(bodies), PARTIAL))
    bodies = {lv: m for lv, m in bodies.items() if lv not in not_measured}
    discs = {lv: m for lv, m in inst["discs"].items() if not touches_edge(m)}
    measurements = measure_spine(bodies, discs, inst["canal"], spacing, image=vol.pixels[k])
    measurements["not_measured"] = {**measurements.get("not_measured", {}), **not_measured}
    seg = SpineSegmentation(key_slice=k, slices=slices, instances=instances,
                            measurements=measurements,
                            model={**{k: v for k, v in getattr(model, "meta", {}).items() if k != "cfg"},
                                   "grid_mm": GRID_MM},
                            seconds=time.perf_counter() - t0)
    result.segmentation = seg
    return seg
