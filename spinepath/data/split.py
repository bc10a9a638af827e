"""The one train / selection / validation split of the shared data (``configs/split.json``).

3D data are split by patient, spark_midsag by study. The *validation* part is only measured on: nothing is
chosen on it. Model choices made while training (the best detector epoch, the promotion of a retraining
round) are made on the *selection* part, carved out of the training patients. Everything else of the shared
data is training, and listed as such: a case the split does not list is *unseen* (a held-out folder's, or new
data), so no model learned from it or was chosen on it, and the evaluations score it by default
(:func:`evaluation_cases`).
"""

from __future__ import annotations

import json
from pathlib import Path

from spinepath.core.config import config_file
from spinepath.data.datasets import dataset_kind, load_spark, load_volume_index
from spinepath.data.spider import SpiderStudy, load_spider_midsag, load_spider_seg

SPLIT_FILE = config_file("split.json")
#: The parts of the split; ``unseen``: a case none of the others lists (with a split that lists no ``train``
#: part, everything not listed in the others is ``train``).
PARTS = ("train", "selection", "validation", "unseen")
#: The parts the evaluations score by default: what no model learned from or was chosen on.
EVALUATED_PARTS = ("validation", "unseen")


def load_split(path: str | Path = SPLIT_FILE) -> dict:
    """Return the documented split (``configs/split.json``)."""
    return json.loads(Path(path).read_text())


#: Datasets whose patients share one list in the split (the same SPIDER patient in both folders).
SPLIT_GROUPS = {"spider_midsag": "spider", "spider_seg": "spider"}


def split_part(dataset: str, case: str, patient: str | None = None, split: dict | None = None) -> str:
    """The part a case belongs to: ``"validation"``, ``"selection"``, ``"train"`` or ``"unseen"`` (see :data:`PARTS`).

    By patient except spark_midsag (by study); spider_midsag and spider_seg are looked up in the one
    ``"spider"`` patient list. A dataset the split does not name (a folder named otherwise) has only unseen
    cases.
    """
    split = split or load_split()
    key = case if dataset == "spark_midsag" else (patient or case)
    group = SPLIT_GROUPS.get(dataset, dataset)
    for part in ("validation", "selection", "train"):
        if key in split.get(part, {}).get(group, []):
            return part
    return "unseen" if "train" in split else "train"


def is_validation(dataset: str, case: str, patient: str | None = None, split: dict | None = None) -> bool:
    """True when the case belongs to the validation split (by patient for 3D data)."""
    return split_part(dataset, case, patient, split) == "validation"


def case_parts(root: str | Path, split: dict | None = None) -> list[tuple[str, str]]:
    """``(case id, part)`` for every case of a dataset folder (named as in the split, e.g. ``chu_t2``), in its order.

    Raises:
        FileNotFoundError: If the folder is not a dataset folder.

    """
    root = Path(root)
    split = split or load_split()
    kind = dataset_kind(root)
    if kind == "spark":
        return [(c.case, split_part(root.name, c.case, split=split)) for c in load_spark(root)]
    if kind in ("spider_seg", "spider_midsag"):
        cases = load_spider_seg(root, require_spacing=False) if kind == "spider_seg" else load_spider_midsag(root)
        return [(c.patient, split_part(kind, c.patient, c.patient, split)) for c in cases]
    return [(c.case, split_part(root.name, c.case, c.patient, split)) for c in load_volume_index(root)]


def split_cases(root: str | Path, part: str = "validation", split: dict | None = None) -> list[str]:
    """Case ids of a dataset folder (named as in the split, e.g. ``chu_t2``) that belong to ``part``.

    Raises:
        FileNotFoundError: If the folder is not a dataset folder.
        ValueError: If ``part`` is unknown.

    """
    if part not in PARTS:
        raise ValueError(f"unknown split part {part!r}; expected one of {PARTS}")
    return [c for c, p in case_parts(root, split) if p == part]


def evaluation_cases(root: str | Path, split: dict | None = None) -> tuple[list[str], int]:
    """The cases an evaluation scores by default: the validation and the unseen ones (:data:`EVALUATED_PARTS`).

    The split lists every case of the shared data, so a held-out folder's cases are unseen and scored, and a
    folder of the shared data gives its validation cases.

    Returns:
        ``(case ids, how many of the folder's cases were left out as training or selection cases)``.

    Raises:
        FileNotFoundError: If the folder is not a dataset folder.

    """
    parts = case_parts(root, split)
    keep = [c for c, p in parts if p in EVALUATED_PARTS]
    return keep, len(parts) - len(keep)


def spider_fitting_studies(root: str | Path, sequence: str = "t2") -> dict[str, SpiderStudy]:
    """The spider_midsag training + selection patients that have ``sequence``, by patient.

    What the out-of-fold decisions are fitted on; the validation part is never read.
    """
    return {s.patient: s for s in load_spider_midsag(root)
            if split_part("spider_midsag", s.patient, s.patient) != "validation" and sequence in s.sequences}
