"""The label map that names the vertebrae and structures everywhere (``configs/labels.json``: name -> value, colour)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spinepath.core.config import config_file

LABELS_FILE = config_file("labels.json")


@dataclass(frozen=True)
class Label:
    """One entry of the label map."""

    name: str
    value: int
    color: tuple[int, int, int]


def load_label_map(path: str | Path = LABELS_FILE, structures: bool = False) -> dict[str, Label]:
    """Level name -> :class:`Label` from ``configs/labels.json`` (top-down order).

    Args:
        path: The label map file.
        structures: Add the other structures of the segmentation (``structures``: discs by level
            ``"L4-L5"``, ``"spinal canal"``) after the vertebral levels (there: the vertebral bodies).

    Raises:
        ValueError: If two labels share a value or a value is outside 1..255.

    """
    doc = json.loads(Path(path).read_text())
    raw = {**doc["labels"], **(doc.get("structures", {}) if structures else {})}
    labels = {k: Label(k, int(v["value"]), tuple(int(c) for c in v["color"])) for k, v in raw.items()}
    values = [lab.value for lab in labels.values()]
    if len(set(values)) != len(values) or not all(0 < x < 256 for x in values):
        raise ValueError(f"{path}: label values must be distinct and in 1..255")
    return labels


def label_colors() -> dict[str, tuple[int, int, int]]:
    """Level, disc or structure name -> RGB colour of the label map (key image, SEG, MONAI Label)."""
    return {k: lab.color for k, lab in load_label_map(structures=True).items()}

