"""Loaders for the SPIDER sets: spider_seg (2D slices with vertebra, disc and canal masks) and spider_midsag.

spider_seg masks are semantic (0 background, 1 vertebra with its posterior elements, 2 disc, 3 spinal canal)
and do not label the sacrum. Vertebral-body boxes are derived per slice:

* the body is the part of a vertebra component anterior to the spinal canal (the canal's anterior wall,
  a smooth curve fitted per patient over its slices, separates body from posterior elements also on the
  lateral slices where the pedicles join them);
* bodies are named from the bottom: the lowest labelled disc is the lumbosacral disc, the body above it L5;
* the S1 body, unlabelled, is the L5 body mirrored through the plane of the lumbosacral disc (the disc's
  principal axis through its centre), so its tilt follows the disc; the sacrum below it holds no vertebral
  body and is background in training.

The conventions of :mod:`spinepath.data.datasets` apply: rows superior -> inferior, columns anterior ->
posterior, boxes ``[r0, c0, r1, c1]`` in pixel edge coordinates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from spinepath.core.levels import names_from_bottom
from spinepath.data.datasets import Slice2D

#: spider_seg mask values (``labels`` in index.json is the authority; these are the SPIDER ones).
VERTEBRA, DISC, CANAL = 1, 2, 3
#: The classes of a spider_seg case whose index.json names none.
DEFAULT_LABELS = {"1": "vertebra", "2": "disc", "3": "spinal_canal"}
#: A component smaller than this fraction of the slice's median body (or disc) is a fragment.
MIN_COMPONENT_FRACTION = 0.3
#: A body touching the image border and shorter than this fraction of the median body height is cut off.
CUT_BODY_FRACTION = 0.8


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L") if im.mode not in ("L", "P", "I", "I;16") else im)


@dataclass
class SpiderSegCase:
    """One spider_seg patient: its sagittal slices and masks."""

    patient: str
    root: Path
    slices: list[str]
    slice_numbers: list[int]
    spacing: tuple[float, float] | None  # None: the folder does not know it (estimated where it is read)
    labels: dict[int, str]
    thickness: float = 0.9  # slice thickness (mm); the folder keeps every 2nd slice, so slices are 2x apart
    spacing_estimated: bool = False  # the spacing was estimated from the anatomy (the folder gave none)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image float32, mask int16)`` of the ``i``-th slice.

        Raises:
            ValueError: If image and mask sizes differ.

        """
        img = _read_png(self.root / "images" / self.slices[i]).astype(np.float32)
        msk = _read_png(self.root / "masks" / self.slices[i]).astype(np.int16)
        if img.shape != msk.shape:
            raise ValueError(f"spider_seg/{self.slices[i]}: image {img.shape} and mask {msk.shape} differ")
        return img, msk

    @property
    def known_spacing(self) -> tuple[float, float]:
        """The pixel spacing, which whatever resamples the slices needs.

        Raises:
            ValueError: If the folder gives none (estimate it first: :mod:`spinepath.evaluation.spacing`).

        """
        if self.spacing is None:
            raise ValueError(f"spider_seg/{self.patient}: no pixel spacing")
        return self.spacing

    def value_of(self, name: str) -> int | None:
        """The mask value of a class name in this case (None when the case does not annotate it)."""
        return next((v for v, n in self.labels.items() if n == name), None)


def load_spider_seg(root: str | Path, require_spacing: bool = True) -> list[SpiderSegCase]:
    """Read a spider_seg-format folder's ``index.json`` (patients sorted by number).

    ``require_spacing``: a case whose ``pixel_spacing_mm`` is null (the format allows it: the spacing is
    unknown) is an error, as training needs it; the evaluations pass False and estimate it from the anatomy
    (:func:`spinepath.stages.estimate_spacing`), the case's ``spacing`` being None.

    Raises:
        FileNotFoundError: If index.json or a listed image or mask is missing.
        ValueError: If ``require_spacing`` and a case has no pixel spacing.

    """
    root = Path(root)
    index = json.loads((root / "index.json").read_text())
    out = []
    for pid, e in sorted(index.items(), key=lambda kv: (len(kv[0]), kv[0])):
        for s in e["slices"]:
            for sub in ("images", "masks"):
                if not (root / sub / s).is_file():
                    raise FileNotFoundError(f"{root.name}/{pid}: missing {sub}/{s}")
        sp = e.get("pixel_spacing_mm")
        if not sp and require_spacing:
            raise ValueError(f"{root.name}/{pid}: no pixel_spacing_mm (the spacing is unknown)")
        out.append(
            SpiderSegCase(
                patient=str(e.get("patient", pid)),
                root=root,
                slices=list(e["slices"]),
                slice_numbers=list(e.get("slice_numbers", range(len(e["slices"])))),
                spacing=(float(sp[0]), float(sp[1])) if sp else None,
                labels={int(k): v for k, v in (e.get("labels") or DEFAULT_LABELS).items()},
                thickness=float(e.get("slice_thickness_mm") or 0.9),
            )
        )
    return out


# ---------------------------------------------------------------------------------------- body boxes
def canal_front(masks: list[np.ndarray], canal: int = CANAL) -> np.ndarray | None:
    """The canal's anterior wall per row (column), pooled over a patient's slices; None without a canal.

    Per row, the most anterior canal column over the slices (the canal is widest at the midline); a
    cubic fit over the rows that have canal, held constant beyond them.
    """
    rows_n = masks[0].shape[0]
    front = np.full(rows_n, np.inf)
    for m in masks:
        c = m == canal
        has = c.any(axis=1)
        first = np.where(has, c.argmax(axis=1), np.inf)
        front = np.minimum(front, first)
    rows = np.nonzero(np.isfinite(front))[0]
    if rows.size < 20:
        return None
    coef = np.polyfit(rows, front[rows], 3)
    r = np.clip(np.arange(rows_n), rows.min(), rows.max())
    return np.polyval(coef, r)


def _components(binary: np.ndarray) -> list[np.ndarray]:
    """Connected components (pixel coordinates ``(n, 2)``) above the size floor, sorted top-down."""
    lab, n = ndi.label(binary)
    comps = [np.argwhere(lab == i) for i in range(1, n + 1)]
    if not comps:
        return []
    med = float(np.median([len(c) for c in comps if len(c) >= 20] or [1]))
    comps = [c for c in comps if len(c) >= MIN_COMPONENT_FRACTION * med]
    return sorted(comps, key=lambda c: float(c[:, 0].mean()))


def _bbox(pts: np.ndarray) -> list[float]:
    return [float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max() + 1), float(pts[:, 1].max() + 1)]


def mirror_through_disc(body: np.ndarray, disc: np.ndarray) -> np.ndarray:
    """Pixel coordinates of ``body`` mirrored through the plane of ``disc`` (its principal axis at its centre)."""
    c = disc.mean(axis=0)
    _, _, vt = np.linalg.svd(disc - c, full_matrices=False)
    n = vt[1]  # the disc's minor axis: its normal
    d = (body - c) @ n
    return body - 2.0 * d[:, None] * n[None, :]


@dataclass
class SpiderBodies:
    """Vertebral bodies of one spider_seg slice."""

    boxes: np.ndarray  # (N, 4) top-down, S1 last when derived
    levels: list[str]
    cut: list[bool]  # body cut by the image border (not a training target)
    s1_derived: bool = False


def body_boxes(mask: np.ndarray, front: np.ndarray | None, values: tuple[int, int] = (VERTEBRA, DISC)) -> SpiderBodies:
    """Vertebral-body boxes of one slice, named from the lumbosacral disc up, with the derived S1 box.

    Args:
        mask: ``(rows, cols)`` semantic mask.
        front: Canal anterior wall per row (:func:`canal_front`); None keeps whole vertebra components.
        values: Mask values of vertebra and disc.

    Returns:
        The bodies; empty when the slice shows no body or no disc.

    """
    vert, disc_v = values
    body = mask == vert
    if front is not None:
        body &= np.arange(mask.shape[1])[None, :] < front[:, None]
    bodies = _components(body)
    discs = _components(mask == disc_v)
    if not bodies or not discs:
        return SpiderBodies(np.zeros((0, 4), np.float32), [], [])
    low_disc = discs[-1]
    low_row = float(low_disc[:, 0].mean())
    bodies = [b for b in bodies if float(b[:, 0].mean()) < low_row]  # nothing labelled below L5 but fragments
    if not bodies:
        return SpiderBodies(np.zeros((0, 4), np.float32), [], [])
    boxes = [_bbox(b) for b in bodies]
    heights = np.array([b[2] - b[0] for b in boxes])
    med_h = float(np.median(heights))
    rows_n, cols_n = mask.shape
    cut = [bool((b[0] <= 0 or b[2] >= rows_n or b[1] <= 0 or b[3] >= cols_n) and h < CUT_BODY_FRACTION * med_h)
           for b, h in zip(boxes, heights)]
    levels = names_from_bottom(len(bodies), "L5")
    s1 = mirror_through_disc(bodies[-1], low_disc)
    derived = False
    if not cut[-1]:
        sb = _bbox(np.round(s1))
        sb = [max(0.0, sb[0]), max(0.0, sb[1]), min(float(rows_n), sb[2]), min(float(cols_n), sb[3])]
        if sb[2] - sb[0] > 0.5 * med_h:
            boxes.append(sb)
            levels.append("S1")
            cut.append(False)
            derived = True
    return SpiderBodies(np.asarray(boxes, np.float32), levels, cut, derived)


def spider_seg_slices(case: SpiderSegCase, indices: list[int] | None = None) -> list[Slice2D]:
    """The case's slices with their body boxes (cut bodies dropped, the span above them blanked in training).

    ``span`` runs from the top of the highest whole body to the bottom of the image: anatomy above (cut or
    unlabelled) is not taught as background; the sacrum and pelvis below the derived S1 are. The bodies are
    the ``vertebra`` label's part in front of the canal, or a ``vertebral_body`` label as it is.

    Raises:
        ValueError: If the case labels no disc and neither vertebra nor vertebral body, or has no spacing.

    """
    vert, disc, canal = (case.value_of(n) for n in ("vertebra", "disc", "spinal_canal"))
    body = case.value_of("vertebral_body") if vert is None else None
    if (vert is None and body is None) or disc is None:
        raise ValueError(f"spider_seg/{case.patient}: needs vertebra (or vertebral_body) and disc labels, has "
                         f"{case.labels}")
    spacing = case.known_spacing
    idx = list(range(len(case.slices))) if indices is None else indices
    loaded = [case.load(i) for i in idx]
    front = canal_front([m for _, m in loaded], canal) if canal is not None and body is None else None
    out = []
    for i, (img, m) in zip(idx, loaded):
        b = body_boxes(m, front, (vert if body is None else body, disc))
        keep = [not c for c in b.cut]
        boxes = b.boxes[keep] if len(b.boxes) else b.boxes
        levels = [lv for lv, k in zip(b.levels, keep) if k]
        # above the highest whole body: cut or unlabelled bodies (blanked in training); below the derived S1:
        # the sacrum and pelvis, which hold no vertebral body and are taught as background
        span = (float(boxes[:, 0].min()), float(img.shape[0])) if len(boxes) else None
        derived = np.array([b.s1_derived and lv == "S1" for lv in levels], bool)
        out.append(
            Slice2D(
                image=img,
                spacing=spacing,
                boxes=boxes.reshape(-1, 4),
                levels=list(levels),
                area_fraction=np.ones(len(boxes), np.float32),
                case=case.patient,
                dataset="spider_seg",
                index=case.slice_numbers[i],
                span=span,
                derived=derived,
            )
        )
    return out


# ------------------------------------------------------------------------------------------- spider_midsag
@dataclass
class SpiderStudy:
    """One spider_midsag patient: mid-sagittal T1 and/or T2 (not registered) and the grades of every disc."""

    patient: str
    root: Path
    images: dict[str, str]
    spacing: dict[str, tuple[float, float]]
    discs: list[dict]
    num_vertebrae: int | None = None
    scanner: dict = field(default_factory=dict)

    @property
    def discs_by_index(self) -> dict[int, dict]:
        """The disc rows keyed by ``index_from_bottom``."""
        return {int(d["index_from_bottom"]): d for d in self.discs}

    @property
    def sequences(self) -> list[str]:
        """The sequences present (``"t1"``, ``"t2"``)."""
        return sorted(self.images)

    def load_image(self, sequence: str) -> np.ndarray:
        """Return one sequence's slice as float32 ``(rows, cols)``.

        Raises:
            KeyError: If the patient has no such sequence.

        """
        if sequence not in self.images:
            raise KeyError(f"spider_midsag/{self.patient}: no {sequence} image (has {self.sequences})")
        return _read_png(self.root / self.images[sequence]).astype(np.float32)


#: The sequences a finding is graded on. Where a patient lacks one, spider_midsag's row holds a placeholder, not
#: a grade: all 37 discs of the 5 patients without a T2 are Pfirrmann 1 although 14 of them are narrowed (3% of
#: the Pfirrmann-1 discs of the patients with a T2 are), and Modic changes are 0 on every one of them and on
#: 112 of the 114 discs of the 17 patients without a T1 (39% of the discs of the patients with both have one).
GRADED_ON: dict[str, tuple[str, ...]] = {"pfirrmann": ("t2",), "modic": ("t1", "t2")}


def graded_rows(discs: list[dict], sequences: list[str] | tuple[str, ...]) -> list[dict]:
    """Copies of a patient's disc rows with ``None`` for the findings its sequences cannot grade (:data:`GRADED_ON`).

    A ``None`` is an unknown label: training skips it, the evaluation leaves the disc out of that finding.
    """
    missing = [k for k, need in GRADED_ON.items() if not set(need) <= set(sequences)]
    return [{**d, **dict.fromkeys(missing)} for d in discs]


def load_spider_midsag(root: str | Path) -> list[SpiderStudy]:
    """Read a spider_midsag-format folder's ``labels.json`` (patients sorted by number).

    A finding graded on a sequence the patient lacks is ``None`` in its disc rows (:func:`graded_rows`).

    Raises:
        FileNotFoundError: If labels.json or a listed image is missing.

    """
    root = Path(root)
    labels = json.loads((root / "labels.json").read_text())
    out = []
    for pid, e in sorted(labels.items(), key=lambda kv: (len(kv[0]), kv[0])):
        for img in e["images"].values():
            if not (root / img).is_file():
                raise FileNotFoundError(f"{root.name}/{pid}: missing image {img}")
        out.append(
            SpiderStudy(
                patient=str(e.get("patient", pid)),
                root=root,
                images=dict(e["images"]),
                spacing={k: (float(v[0]), float(v[1])) for k, v in (e.get("pixel_spacing_mm") or {}).items()
                         if v},  # a null spacing is unknown (the evaluation estimates it)
                discs=graded_rows(sorted(e.get("discs", []), key=lambda d: d["index_from_bottom"]), list(e["images"])),
                num_vertebrae=e.get("num_vertebrae"),
                scanner=e.get("scanner") or {},
            )
        )
    return out
