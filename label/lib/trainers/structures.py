"""Train task ``spine_structures``: one retraining round of the segmentation network on the saved corrections."""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore

from lib.trainers.vertebrae import VertebraeTrainer
from spinepath.core.errors import StudyError
from spinepath.io.volumes import image_id as label_image_id
from spinepath.labeling.rounds import SEGMENTATION_METRICS, RoundConfig, run_segmentation_round
from spinepath.labeling.structures import seg_slices_from_label_file

log = logging.getLogger(__name__)


class StructuresTrainer(VertebraeTrainer):
    """Fine-tune the served segmentation network on every final structure label plus the base training slices.

    Each call is one round (:func:`spinepath.labeling.rounds.run_segmentation_round`); the served network
    changes only if the new one's mean Dice on the fixed selection slices is at least the served one's.
    """

    DESCRIPTION = "Retraining round of the segmentation network on the annotators' corrected masks"

    def corrections(self, datastore: Datastore) -> tuple[list, list[dict]]:
        """Training slices and per-study summaries from the datastore's final structure labels."""
        slices, info = [], []
        for item in datastore.datalist():
            image_id = label_image_id(item["image"])
            try:
                s = seg_slices_from_label_file(item["image"], item["label"], image_id, self.label_map)
            except StudyError as exc:
                log.warning("label of %s not used: %s", image_id, exc)
                info.append({"image": image_id, "skipped": str(exc)})
                continue
            slices += s
            info.append({"image": image_id, "slices": len(s)})
        return slices, info

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        """Run one round; returns its record."""
        cfg = RoundConfig.from_request(request, SEGMENTATION_METRICS, **self.defaults)
        slices, info = self.corrections(datastore)
        log.info("segmentation round on %d corrected studies (%d slices)", len(info), len(slices))
        return run_segmentation_round(self.store, cfg, slices, info)
