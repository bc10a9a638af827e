"""Train task ``vertebrae``: one retraining round of the detector on the saved corrections (+ base data)."""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from spinepath.core.errors import StudyError
from spinepath.core.labels import Label
from spinepath.io.volumes import image_id as label_image_id
from spinepath.labeling.corrections import slices_from_label_file
from spinepath.labeling.rounds import ModelStore, RoundConfig, run_round

log = logging.getLogger(__name__)


class VertebraeTrainer(TrainTask):
    """Fine-tune the served detector on every final label in the datastore plus the base training data.

    Each call is one round (:func:`spinepath.labeling.rounds.run_round`): a versioned model with its validation metrics;
    the served model changes only if the new one measures at least as well on the fixed validation set.
    Request keys override the round defaults: ``epochs``, ``lr``, ``max_train_cases``, ``metric``, ``seed``...
    """

    DESCRIPTION = "Retraining round of the vertebra detector on the annotators' corrections"

    def __init__(self, store: ModelStore, label_map: dict[str, Label], defaults: dict) -> None:
        super().__init__(self.DESCRIPTION)
        self.store = store
        self.label_map = label_map
        self.defaults = defaults

    def config(self) -> dict:
        """Round options shown in ``/info`` (defaults)."""
        return {k: v for k, v in vars(RoundConfig(**self.defaults)).items() if k not in ("data_root", "quiet")}

    def stats(self) -> dict:
        """The served round and the round history (``/info`` and ``/train`` status)."""
        history = self.store.history()
        return {"served": self.store.served(), "rounds": len(history),
                "promoted": [h["round"] for h in history if h.get("promoted")], "history": history[-10:]}

    def corrections(self, datastore: Datastore) -> tuple[list, list[dict]]:
        """Training slices and per-study summaries from the datastore's final labels."""
        slices, info = [], []
        for item in datastore.datalist():
            image_id = label_image_id(item["image"])
            try:
                s, summary = slices_from_label_file(item["image"], item["label"], image_id, self.label_map)
            except StudyError as exc:
                log.warning("label of %s not used: %s", image_id, exc)
                info.append({"image": image_id, "skipped": str(exc)})
                continue
            slices += s
            info.append(summary.to_dict())
        return slices, info

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        """Run one round; returns its record."""
        cfg = RoundConfig.from_request(request, **self.defaults)
        slices, info = self.corrections(datastore)
        log.info("round on %d corrected studies (%d slices)", len(info), len(slices))
        return run_round(self.store, cfg, slices, info)
