"""spinepath MONAI Label app: vertebra and structure relabeling in OHIF, active learning and retraining rounds.

Start: ``monailabel start_server --app label --studies <folder or DICOMweb URL> [--conf model_dir DIR]``.
The domain logic lives in the ``spinepath`` package; this app only adapts it to MONAI Label.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fastapi import HTTPException
from lib.configs.structures import StructuresConfig
from lib.configs.vertebrae import VertebraeConfig
from lib.datastore.dicomweb import SpinePathDICOMWebDatastore
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from spinepath import DISCLAIMER, __version__
from spinepath.core.labels import load_label_map
from spinepath.labeling.structures import structure_label_map

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


class SpinePathApp(MONAILabelApp):
    """Two tasks: ``vertebrae`` and ``spine_structures``.

    ``vertebrae``: level label map, detector rounds, uncertainty strategy; ``spine_structures``: bodies, discs
    and canal by level, segmentation rounds. Both read the same final labels (local files, or DICOM SEGs in
    the PACS over DICOMweb): the bodies of a structure label are the vertebrae's reference too.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        conf = dict(conf or {})
        conf.setdefault("data_root", os.environ.get("SPINEPATH_DATA", str(REPO.parent / "shared" / "data")))
        self.model_dir = Path(conf.get("model_dir") or Path(app_dir) / "model")
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.task_configs = {"vertebrae": VertebraeConfig(), "spine_structures": StructuresConfig()}
        for name, c in self.task_configs.items():
            c.init(name, str(self.model_dir), conf, None)
        self.label_map = load_label_map()  # the vertebrae task's; spine_structures lists its own labels
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="spinepath",
            description=f"Lumbar spine vertebra detection and naming, segmentation of bodies, discs and canal. "
                        f"{DISCLAIMER}",
            version=__version__,
            # the bundled OHIF panel reads the top-level labels as a list of names (each model's own
            # labels stay a name -> value map); ordered by label value
            labels=[n for n, _ in sorted(self.label_map.items(), key=lambda kv: kv[1].value)],
        )

    def init_remote_datastore(self) -> Datastore:
        """DICOMweb (e.g. Orthanc): labels saved as spinepath DICOM SEG."""
        log.info("Using DICOMweb: %s", self.studies)
        client = DICOMwebClientX(url=self.studies, session=None, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        # MONAI Label's default filter (MONAI_LABEL_DICOMWEB_SEARCH_FILTER) is CT and is exported to the
        # environment of every task process, so it cannot tell "unset"; this app reads its own conf key
        search = json.loads(self.conf.get("dicomweb_search_filter", '{"Modality": "MR"}'))
        store = SpinePathDICOMWebDatastore(
            client=client,
            search_filter=search,
            cache_path=cache,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
        )
        # the structures' map holds the vertebrae's levels (a body is its level's value) plus discs and canal
        store.label_map = structure_label_map()
        return store

    def infer(self, request: dict, datastore: Datastore | None = None) -> dict:
        """Run an infer task on an image of this server's datastore; any other image id is refused (404).

        MONAI Label reads an id that names an existing path on the server as that path, and an id its local
        datastore does not hold as the server's working directory (read as a DICOM study); a client may only
        ask for the studies this server serves. Over DICOMweb an id is a SeriesInstanceUID, fetched on demand.
        """
        image = request.get("image")
        if isinstance(image, str):
            store = datastore or self.datastore()
            if isinstance(store, DICOMWebDatastore):
                known = bool(image) and "/" not in image and "\\" not in image  # a UID, never a path
            else:
                known = image in store.list_images()
            if not known:
                raise HTTPException(404, f"no image {image!r} in this server's datastore")
        return super().infer(request, datastore)

    def init_infers(self) -> dict[str, InferTask]:
        """Infer tasks of the task configs."""
        return {name: c.infer() for name, c in self.task_configs.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        """Train tasks of the task configs."""
        return {name: c.trainer() for name, c in self.task_configs.items()}

    def init_strategies(self) -> dict[str, Strategy]:
        """``random``, ``first`` and the task configs' strategies."""
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        for c in self.task_configs.values():
            strategies.update(c.strategy() or {})
        return strategies
