"""The saved grading model: the classifier ensembles of both tasks plus the fusion models (``grader.pt``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spinepath.core.exported import load_export, save_export
from spinepath.core.files import save_torch
from spinepath.core.weights import float_state, half_state
from spinepath.grading.calibration import Calibration
from spinepath.grading.classifier import GradingConfig, build_classifier, predict_structures
from spinepath.grading.crops import CropJitter, Structure
from spinepath.grading.fusion import FusionModel


@dataclass
class Grader:
    """The trained grading models: an ensemble (e.g. one per cross-validation fold) per task, plus fusion.

    Attributes:
        configs: Hyper-parameters per task.
        models: Networks per task.
        fusion: Per-vertebra fusion model (:class:`spinepath.grading.fusion.FusionModel`) or None.
        disc_decision: How a disc grade is chosen from its probabilities (``"argmax"`` or ``"ordinal"``)
            when there is no disc fusion model.
        disc_fusion: Per-disc fusion model (``kind="disc"``, with its own decision rule) or None.
        meta: Free-form training information.
        calibration: Out-of-fold calibration of the reported probabilities
            (:class:`spinepath.grading.calibration.Calibration`) or None (reported as they come).

    """

    configs: dict[str, GradingConfig]
    models: dict[str, list[nn.Module]]
    fusion: FusionModel | None = None
    disc_decision: str = "argmax"
    meta: dict = field(default_factory=dict)
    disc_fusion: FusionModel | None = None
    calibration: Calibration | None = None

    @property
    def vertebra_threshold(self) -> float:
        """The vertebra decision threshold on the reported (calibrated) probability scale."""
        raw = self.fusion.threshold if self.fusion is not None else 0.5
        if self.calibration is None:
            return float(raw)
        return float(self.calibration.vertebra_probability(np.array([raw]))[0])

    @property
    def disc_rule(self) -> str:
        """The disc decision rule in use: the disc fusion model's when there is one."""
        return self.disc_fusion.decision if self.disc_fusion is not None else self.disc_decision

    def predict(self, task: str, images: dict[str, np.ndarray], structures: list[Structure],
                jitter: CropJitter | None = None) -> np.ndarray:
        """Probabilities for structures of one task."""
        return predict_structures(self.models[task], self.configs[task], images, structures, jitter)

    def save(self, path: str | Path, half: bool = True) -> None:
        """Write one file with all networks (fp16 by default), configs and the fusion model."""
        def sd(m: nn.Module) -> dict:
            return half_state(m.state_dict()) if half else m.state_dict()

        ckpt = {
            "format": "spinepath-grader-1",
            "configs": {t: asdict(c) for t, c in self.configs.items()},
            "state_dicts": {t: [sd(m) for m in ms] for t, ms in self.models.items()},
            "fusion": self.fusion.to_dict() if self.fusion is not None else None,
            "disc_decision": self.disc_decision,
            "disc_fusion": self.disc_fusion.to_dict() if self.disc_fusion is not None else None,
            "meta": self.meta,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
        }
        save_torch(ckpt, path)

    def export(self, path: str | Path) -> Path:
        """Write the TorchScript export of the classifier networks beside this grader's file ``path``."""
        return save_export(self.models, path, {"kind": "grader"})

    @classmethod
    def load(cls, path: str | Path, exported: bool = True, device: str = "cpu") -> Grader:
        """Read a file written by :meth:`save` (networks in float32, eval mode, on ``device``).

        With ``exported`` (default) and a current export beside the file (:meth:`export`), the exported
        networks (no timm imported); else the networks are built and loaded.

        Raises:
            FileNotFoundError: If the file is missing.
            ValueError: If it is not a grader file.

        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"grading model not found: {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or ckpt.get("format") != "spinepath-grader-1":
            raise ValueError(f"{path} is not a spinepath grading model")
        configs = {t: GradingConfig.from_dict(c) for t, c in ckpt["configs"].items()}
        found = load_export(path, device) if exported else None
        models = found[0] if found is not None else {}
        for t, sds in ckpt["state_dicts"].items() if found is None else ():
            ms = []
            for sdict in sds:
                m = build_classifier(configs[t])
                m.load_state_dict(float_state(sdict))
                ms.append(m.eval().to(device))
            models[t] = ms
        fusion = FusionModel.from_dict(ckpt["fusion"]) if ckpt.get("fusion") else None
        dfusion = FusionModel.from_dict(ckpt["disc_fusion"]) if ckpt.get("disc_fusion") else None
        return cls(configs, models, fusion, ckpt.get("disc_decision", "argmax"), ckpt.get("meta", {}), dfusion,
                   Calibration.from_dict(ckpt.get("calibration")))

