"""Active-learning strategy ``uncertainty``: the unlabeled study the served detector is least sure about."""

from __future__ import annotations

import json
import logging
import threading

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from spinepath.core.errors import StudyError
from spinepath.detection.predictor import VertebraDetector
from spinepath.io.volumes import load_image_volume
from spinepath.labeling.activelearning import study_uncertainty
from spinepath.labeling.rounds import ModelStore, write_json

log = logging.getLogger(__name__)


class VertebraeUncertainty(Strategy):
    """Pick the unlabeled study with the highest :func:`spinepath.labeling.activelearning.study_uncertainty` score.

    Scores (and failures) are cached per study and served round in ``<model dir>/uncertainty.json``, so repeated
    requests only score new studies (or all of them again after a promoted round). At most ``max_new`` studies
    are scored per request (a large PACS is covered over several requests): the choice is among the scored.
    """

    def __init__(self, store: ModelStore, max_new: int = 32) -> None:
        super().__init__("Study where the served detector is most uncertain (score entropy, naming, TTA)")
        self.store = store
        self.max_new = max_new  # studies scored per request (each costs two detector runs, ~3-7 s on CPU)
        self._lock = threading.Lock()

    def _cache(self) -> dict:
        p = self.store.dir / "uncertainty.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}

    def __call__(self, request: dict, datastore: Datastore) -> dict | None:
        """Return ``{"id": image, "uncertainty": {...}, "scores": {image: score}}`` or None when all are labeled."""
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        with self._lock:
            served = self.store.served()
            model = None
            cache = self._cache()
            scores: dict[str, dict] = {}
            key = f"round-{served['round']}"
            new = 0
            try:
                for image_id in sorted(images):
                    hit = cache.get(image_id)
                    if hit and hit.get("key") == key:  # scored (or failed) with the served model
                        if "uncertainty" in hit:
                            scores[image_id] = hit["uncertainty"]
                        continue
                    if new >= self.max_new:  # the rest are scored by the next requests
                        continue
                    new += 1
                    if model is None:
                        model = VertebraDetector.load(self.store.dir / served["model"])
                    try:
                        volume, _ = load_image_volume(datastore.get_image_uri(image_id))
                        u = study_uncertainty(volume, model).to_dict()
                    except Exception as exc:  # noqa: BLE001 (one unreadable study must not block the others)
                        reason = str(exc) if isinstance(exc, StudyError) else type(exc).__name__
                        log.warning("image %s not scored: %s", image_id, reason)
                        cache[image_id] = {"key": key, "failed": reason}
                        continue
                    cache[image_id] = {"key": key, "uncertainty": u}
                    scores[image_id] = u
            finally:
                write_json(self.store.dir / "uncertainty.json", cache)
        if not scores:
            return None
        best = max(scores, key=lambda i: (scores[i]["score"], i))
        log.info("uncertainty: selected %s (score %.4f of %d studies)", best, scores[best]["score"], len(scores))
        return {"id": best, "uncertainty": scores[best], "scores": {i: s["score"] for i, s in scores.items()}}
