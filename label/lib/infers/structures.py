"""Infer task ``spine_structures``: vertebral bodies, discs and canal segmented and named, as a label map."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.infers.vertebrae import result_options
from spinepath.core.errors import StudyError
from spinepath.core.labels import Label
from spinepath.detection.predictor import VertebraDetector
from spinepath.labeling.rounds import ModelStore
from spinepath.labeling.structures import label_structures
from spinepath.segmentation.inference import load_segmenter

log = logging.getLogger(__name__)


class StructuresInfer(InferTask):
    """Label map with one label per vertebral body level, per disc level and the canal (``configs/labels.json``).

    The segmentation network is the one its model store serves now (a promoted round is used by the next
    request); the detector that names the levels is the bundle's. The result parameters carry the key slice's
    measurements.
    """

    def __init__(self, store: ModelStore, label_map: dict[str, Label], detector_path: Path) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={name: lab.value for name, lab in label_map.items()},
            dimension=3,
            description="Vertebral bodies, discs and spinal canal, named by level; research use only",
            config={"label_colors": {name: list(lab.color) for name, lab in label_map.items()}},
        )
        self.store = store
        self.label_map = label_map
        self.detector_path = detector_path
        self._lock = threading.Lock()
        self._detector: VertebraDetector | None = None
        self._segmenter: tuple[Path, float, object] | None = None

    def is_valid(self) -> bool:
        """The served network exists."""
        return self.store.served_model_path().is_file()

    def models(self) -> tuple[VertebraDetector, object, dict]:
        """The detector, the served segmentation network (reloaded when the served round changes), its record."""
        served = self.store.served()
        path = self.store.dir / served["model"]
        with self._lock:
            if self._detector is None:
                self._detector = VertebraDetector.load(self.detector_path)
            if self._segmenter is None or self._segmenter[:2] != (path, path.stat().st_mtime):
                self._segmenter = (path, path.stat().st_mtime, load_segmenter(path))
                log.info("serving segmentation network of round %s", served["round"])
            return self._detector, self._segmenter[2], served

    def __call__(self, request: dict) -> tuple[str, dict]:
        """Run on ``request["image"]`` (a volume file or a DICOM series folder); options as ``vertebrae``."""
        suffix, compress = result_options(request)
        detector, segmenter, served = self.models()
        fd, out = tempfile.mkstemp(suffix=suffix, prefix="structures-")
        os.close(fd)
        try:
            params = label_structures(request["image"], detector, segmenter, out, self.label_map, compress)
        except Exception as exc:
            os.unlink(out)
            if isinstance(exc, StudyError):
                raise HTTPException(422, f"cannot segment this image: {exc}") from exc
            raise
        params["model"] = {"segmentation_round": served["round"]}
        return out, params
