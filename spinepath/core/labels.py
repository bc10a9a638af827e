"""The label map that names the vertebrae everywhere (``configs/labels.json``: level -> value, colour)."""

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


def load_label_map(path: str | Path = LABELS_FILE) -> dict[str, Label]:
    """Level name -> :class:`Label` from ``configs/labels.json`` (top-down order).

    Raises:
        ValueError: If two levels share a value or a value is outside 1..255.

    """
    raw = json.loads(Path(path).read_text())["labels"]
    labels = {k: Label(k, int(v["value"]), tuple(int(c) for c in v["color"])) for k, v in raw.items()}
    values = [lab.value for lab in labels.values()]
    if len(set(values)) != len(values) or not all(0 < x < 256 for x in values):
        raise ValueError(f"{path}: label values must be distinct and in 1..255")
    return labels


def label_colors() -> dict[str, tuple[int, int, int]]:
    """Level name -> RGB colour of the label map (key image, SEG, MONAI Label)."""
    return {k: lab.color for k, lab in load_label_map().items()}

