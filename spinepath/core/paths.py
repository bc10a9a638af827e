"""Where the models and the example data are, and which device runs the detector.

The defaults point into a source checkout (``bundle/models``, ``../shared/data``); an installed package is
given its models explicitly (``-m``, ``$HOLOSCAN_MODEL_PATH``).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The source checkout holding the package (``bundle/`` and ``../shared`` are looked for beside it).
REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "bundle" / "models" / "model.pt"
DEFAULT_GRADER = REPO / "bundle" / "models" / "grader.pt"
DEFAULT_SPIDER_GRADER = REPO / "bundle" / "models" / "spider_grader.pt"
DEFAULT_SEGMENTATION = REPO / "bundle" / "models" / "segmentation.pt"


def _resolve(model: str | Path | None, default: Path, name: str, folder: str) -> Path:
    cand = model or os.environ.get("HOLOSCAN_MODEL_PATH") or default
    p = Path(cand)
    if p.is_dir():
        for sub in (name, f"{folder}/{name}", f"models/{name}"):
            if (p / sub).is_file():
                return p / sub
        return p / name
    return p


def resolve_model_path(model: str | Path | None = None) -> Path:
    """The detector weights: ``model`` (file or folder), else ``$HOLOSCAN_MODEL_PATH``, else the bundle's."""
    return _resolve(model, DEFAULT_MODEL, "model.pt", "detector")


def resolve_grader_path(model: str | Path | None = None) -> Path:
    """The grading model: ``model`` (file or folder), else ``$HOLOSCAN_MODEL_PATH``, else the bundle's."""
    return _resolve(model, DEFAULT_GRADER, "grader.pt", "grading")


def resolve_spider_grader_path(model: str | Path | None = None) -> Path:
    """The SPIDER disc grader: ``model`` (file or folder), else ``$HOLOSCAN_MODEL_PATH``, else the bundle's."""
    return _resolve(model, DEFAULT_SPIDER_GRADER, "spider_grader.pt", "grading")


def resolve_segmentation_path(model: str | Path | None = None) -> Path:
    """The segmentation network: ``model`` (file or folder), else ``$HOLOSCAN_MODEL_PATH``, else the bundle's."""
    return _resolve(model, DEFAULT_SEGMENTATION, "segmentation.pt", "segmentation")


def model_files(model_dir: str | Path | None = None) -> tuple[Path, Path, Path, Path]:
    """The detector, grader, SPIDER grader and segmentation files of a model folder or detector file.

    ``model_dir``: a folder (each file found in it as the resolvers find it), a detector file (the others
    beside it), or None (``$HOLOSCAN_MODEL_PATH``, else the bundle's).
    """
    model = resolve_model_path(model_dir)
    near = model.parent if model_dir and model.is_file() else model_dir
    return model, resolve_grader_path(near), resolve_spider_grader_path(near), resolve_segmentation_path(near)


#: The real example DICOM series of the shared data.
SHARED_EXAMPLES = REPO.parent / "shared" / "data" / "dicom_examples"


def default_device() -> str:
    """The device the app, the bundle and the CLI run the detector on: CUDA when present, else the CPU.

    ``app.yaml`` asks for a GPU; without one everything runs on the CPU.
    """
    import torch  # torch is heavy: only the callers that load a model pay for it

    return "cuda" if torch.cuda.is_available() else "cpu"
