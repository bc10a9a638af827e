"""Infer task ``vertebrae``: detection + naming (+ grading) of the served model, as a level label map."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from spinepath.core.errors import StudyError
from spinepath.core.labels import Label
from spinepath.detection.predictor import VertebraDetector
from spinepath.labeling.labelmap import label_study
from spinepath.labeling.rounds import ModelStore

log = logging.getLogger(__name__)

# label file formats a client may ask for (``result_extension``): OHIF's MONAI Label panel asks for raw NRRD
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")


def result_options(request: dict) -> tuple[str, bool]:
    """The label file a request asks for: ``(suffix, compress)``.

    ``result_extension`` (one of :data:`RESULT_EXTENSIONS`, default ``.nii.gz``) and ``result_compress``
    (default true); ``result_dtype`` other than uint8 is refused.

    Raises:
        HTTPException: 400 for an unsupported extension or dtype (MONAI Label answers any other exception with
            a bare 500).

    """
    suffix = str(request.get("result_extension") or ".nii.gz")
    if suffix not in RESULT_EXTENSIONS:
        raise HTTPException(400, f"result_extension {suffix!r} not supported; use one of "
                                 f"{', '.join(RESULT_EXTENSIONS)}")
    if str(request.get("result_dtype") or "uint8") != "uint8":
        raise HTTPException(400, "result_dtype: labels are written as uint8 only")
    return suffix, str(request.get("result_compress", True)).lower() not in ("false", "0", "no")


class VertebraeInfer(InferTask):
    """Label map with one label per vertebral level (filled boxes), values from ``configs/labels.json``.

    The detector is the one the model store serves now: after a promoted retraining round the next request
    uses the new model. The grading model, when given, adds per-level pathology and disc grades to the result
    parameters, and the SPIDER grader the degenerative grades per disc (the label map itself holds levels only).
    """

    def __init__(self, store: ModelStore, label_map: dict[str, Label], grader_path: Path | None = None,
                 spider_grader_path: Path | None = None) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={name: lab.value for name, lab in label_map.items()},
            dimension=3,
            description="Vertebrae detected and named T1..S1 (filled boxes per slice); research use only",
            config={"label_colors": {name: list(lab.color) for name, lab in label_map.items()}},
        )
        self.store = store
        self.label_map = label_map
        self.grader_path = grader_path
        self.spider_grader_path = spider_grader_path
        self._lock = threading.Lock()
        self._detector: tuple[Path, float, VertebraDetector] | None = None
        self._grader = None
        self._spider_grader = None

    def is_valid(self) -> bool:
        """The served model exists."""
        return self.store.served_model_path().is_file()

    def detector(self) -> tuple[VertebraDetector, dict]:
        """The served detector (reloaded when the served round changes) and its record."""
        served = self.store.served()
        path = self.store.dir / served["model"]
        with self._lock:
            if self._detector is None or self._detector[0] != path or self._detector[1] != path.stat().st_mtime:
                self._detector = (path, path.stat().st_mtime, VertebraDetector.load(path))
                log.info("serving detector of round %s", served["round"])
            return self._detector[2], served

    def _optional(self, attr: str, path: Path | None, load):
        """A model loaded once from ``path`` (kept in ``attr``), or None when there is no such file."""
        if path is None or not path.is_file():
            return None
        with self._lock:
            if getattr(self, attr) is None:
                setattr(self, attr, load(path))
            return getattr(self, attr)

    def grader(self):
        """The grading model or None."""
        # imported here: the grading stack loads only when a grader is configured
        from spinepath.grading.grader import Grader

        return self._optional("_grader", self.grader_path, Grader.load)

    def spider_grader(self):
        """The SPIDER degenerative grader or None."""
        # imported here: the grading stack loads only when a grader is configured
        from spinepath.grading.spider import SpiderGrader

        return self._optional("_spider_grader", self.spider_grader_path, SpiderGrader.load)

    def __call__(self, request: dict) -> tuple[str, dict]:
        """Run on ``request["image"]`` (a volume file or a DICOM series folder).

        ``result_extension`` (one of :data:`RESULT_EXTENSIONS`, default ``.nii.gz``) and ``result_compress``
        (default true) choose the label file; it is always uint8 (``result_dtype`` other than uint8 is refused).
        """
        suffix, compress = result_options(request)
        detector, served = self.detector()
        grader = self.grader()
        spider = self.spider_grader()
        fd, out = tempfile.mkstemp(suffix=suffix, prefix="vertebrae-")
        os.close(fd)
        try:
            params = label_study(request["image"], detector, out, grader, self.label_map, compress, spider)
        except Exception as exc:
            os.unlink(out)
            if isinstance(exc, StudyError):
                raise HTTPException(422, f"cannot label this image: {exc}") from exc
            raise
        params["model"] = {"detector_round": served["round"], "graded": grader is not None,
                           "degeneration": spider is not None}
        return out, params
