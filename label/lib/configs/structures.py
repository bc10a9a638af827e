"""Task ``spine_structures``: infer and train of the segmentation network (bodies, discs, canal by level)."""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.config import TaskConfig

from lib.infers.structures import StructuresInfer
from lib.trainers.structures import StructuresTrainer
from spinepath.core.paths import resolve_model_path, resolve_segmentation_path
from spinepath.labeling.rounds import ModelStore
from spinepath.labeling.structures import structure_label_map

log = logging.getLogger(__name__)


class StructuresConfig(TaskConfig):
    """Served network in ``<model_dir>/spine_structures`` (round 0 = the bundle's segmentation network).

    ``--conf`` keys: ``data_root``, ``seg_round_epochs``, ``seg_round_lr``, ``round_max_train_cases``,
    ``round_val_max_cases`` (0: the whole fixed selection and validation parts), ``num_threads``.
    """

    def init(self, name: str, model_dir: str, conf: dict, planner: object, **kwargs: object) -> None:
        """Read the structure label map and options; the model store is ``<model_dir>/<name>``."""
        super().init(name, model_dir, conf, planner, **kwargs)
        self.label_map = structure_label_map()
        self.labels = {n: lab.value for n, lab in self.label_map.items()}
        self.store = ModelStore(Path(model_dir) / name, resolve_segmentation_path())
        self.round_defaults = {
            "data_root": conf["data_root"],
            "epochs": int(conf.get("seg_round_epochs", 2)),
            "lr": float(conf.get("seg_round_lr", 5e-4)),
            "max_train_cases": int(conf.get("round_max_train_cases", 0)),
            "val_max_cases": int(conf.get("round_val_max_cases", 0)),
            "num_threads": int(conf.get("num_threads", 0)),
            "metric": "mean_dice",
        }

    def infer(self) -> StructuresInfer:
        """The infer task."""
        return StructuresInfer(self.store, self.label_map, resolve_model_path())

    def trainer(self) -> StructuresTrainer:
        """The train task."""
        return StructuresTrainer(self.store, self.label_map, self.round_defaults)

    def strategy(self) -> dict:
        """No strategy of its own (the ``vertebrae`` task's uncertainty picks the next study)."""
        return {}
