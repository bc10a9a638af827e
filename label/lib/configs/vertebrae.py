"""Task ``vertebrae``: infer, train and active-learning of the vertebra detector."""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.config import TaskConfig

from lib.activelearning.uncertainty import VertebraeUncertainty
from lib.infers.vertebrae import VertebraeInfer
from lib.trainers.vertebrae import VertebraeTrainer
from spinepath.core.labels import load_label_map
from spinepath.core.paths import resolve_grader_path, resolve_model_path, resolve_spider_grader_path
from spinepath.labeling.rounds import ModelStore

log = logging.getLogger(__name__)


def _flag(value: str | bool | None, default: bool) -> bool:
    return default if value is None else str(value).lower() in ("1", "true", "yes")


class VertebraeConfig(TaskConfig):
    """Served detector in ``<model_dir>/vertebrae`` (round 0 = the bundle's detector), optional grading.

    ``--conf`` keys: ``data_root`` (base data + fixed selection / validation sets), ``grading`` (true/false),
    ``degeneration`` (true/false: the SPIDER degenerative grades per disc in the infer result),
    ``round_epochs``, ``round_lr``, ``round_max_train_cases``, ``round_val_max_cases`` (0: the whole fixed
    selection and validation parts of the split), ``num_threads``, ``al_max_new`` (studies the
    uncertainty strategy scores per request).
    """

    def init(self, name: str, model_dir: str, conf: dict, planner: object, **kwargs: object) -> None:
        """Read the label map and options; the model store is ``<model_dir>/<name>``."""
        super().init(name, model_dir, conf, planner, **kwargs)
        self.label_map = load_label_map()
        self.labels = {n: lab.value for n, lab in self.label_map.items()}
        self.store = ModelStore(Path(model_dir) / name, resolve_model_path())
        self.grader_path = resolve_grader_path() if _flag(conf.get("grading"), True) else None
        self.spider_grader_path = resolve_spider_grader_path() if _flag(conf.get("degeneration"), True) else None
        self.round_defaults = {
            "data_root": conf["data_root"],
            "epochs": int(conf.get("round_epochs", 4)),
            "lr": float(conf.get("round_lr", 3e-4)),
            "max_train_cases": int(conf.get("round_max_train_cases", 0)),
            "val_max_cases": int(conf.get("round_val_max_cases", 0)),
            "num_threads": int(conf.get("num_threads", 0)),
        }

    def infer(self) -> VertebraeInfer:
        """The infer task."""
        return VertebraeInfer(self.store, self.label_map, self.grader_path, self.spider_grader_path)

    def trainer(self) -> VertebraeTrainer:
        """The train task."""
        return VertebraeTrainer(self.store, self.label_map, self.round_defaults)

    def strategy(self) -> dict:
        """The ``uncertainty`` strategy."""
        return {"uncertainty": VertebraeUncertainty(self.store, int(self.conf.get("al_max_new", 32)))}
