"""The one train / selection / validation split of the shared data (``configs/split.json``).

3D data are split by patient, spark_midsag by study. The *validation* part is only measured on: nothing is
chosen on it. Model choices made while training (the best detector epoch, the promotion of a retraining
round) are made on the *selection* part, carved out of the training patients. Everything else is training.
"""

from __future__ import annotations

import json
from pathlib import Path

from spinepath.core.config import config_file
from spinepath.data.datasets import dataset_kind, load_spark, load_volume_index
from spinepath.data.spider import SpiderStudy, load_spider_midsag, load_spider_seg

SPLIT_FILE = config_file("split.json")
#: The parts of the split (``train`` is everything not listed in the others).
PARTS = ("train", "selection", "validation")


def load_split(path: str | Path = SPLIT_FILE) -> dict:
    """Return the documented split (``configs/split.json``)."""
    return json.loads(Path(path).read_text())


#: Datasets whose patients share one list in the split (the same SPIDER patient in both folders).
SPLIT_GROUPS = {"spider_midsag": "spider", "spider_seg": "spider"}


def split_part(dataset: str, case: str, patient: str | None = None, split: dict | None = None) -> str:
    """The part a case belongs to: ``"validation"``, ``"selection"`` or ``"train"`` (by patient except spark).

    spider_midsag and spider_seg are looked up in the one ``"spider"`` patient list.
    """
    split = split or load_split()
    key = case if dataset == "spark_midsag" else (patient or case)
    group = SPLIT_GROUPS.get(dataset, dataset)
    for part in ("validation", "selection"):
        if key in split.get(part, {}).get(group, []):
            return part
    return "train"


def is_validation(dataset: str, case: str, patient: str | None = None, split: dict | None = None) -> bool:
    """True when the case belongs to the validation split (by patient for 3D data)."""
    return split_part(dataset, case, patient, split) == "validation"


def split_cases(root: str | Path, part: str = "validation", split: dict | None = None) -> list[str]:
    """Case ids of a dataset folder (named as in the split, e.g. ``chu_t2``) that belong to ``part``.

    Raises:
        FileNotFoundError: If the folder is not a dataset folder.
        ValueError: If ``part`` is unknown.

    """
    if part not in PARTS:
        raise ValueError(f"unknown split part {part!r}; expected one of {PARTS}")
    root = Path(root)
    split = split or load_split()
    kind = dataset_kind(root)
    if kind == "spark":
        return [c.case for c in load_spark(root) if split_part(root.name, c.case, split=split) == part]
    if kind in ("spider_seg", "spider_midsag"):
        cases = load_spider_seg(root, require_spacing=False) if kind == "spider_seg" else load_spider_midsag(root)
        return [c.patient for c in cases if split_part(kind, c.patient, c.patient, split) == part]
    return [c.case for c in load_volume_index(root) if split_part(root.name, c.case, c.patient, split) == part]


def spider_fitting_studies(root: str | Path, sequence: str = "t2") -> dict[str, SpiderStudy]:
    """The spider_midsag training + selection patients that have ``sequence``, by patient.

    What the out-of-fold decisions are fitted on; the validation part is never read.
    """
    return {s.patient: s for s in load_spider_midsag(root)
            if split_part("spider_midsag", s.patient, s.patient) != "validation" and sequence in s.sequences}
