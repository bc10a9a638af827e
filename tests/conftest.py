"""Shared fixtures: real data from ../shared/data, crafted DICOM studies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
EXAMPLE = DATA / "dicom_examples" / "chu_t2_02"
MODEL = REPO / "bundle" / "models" / "model.pt"


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture
def example_copy(tmp_path: Path) -> Path:
    """A writable copy of a real example series."""
    dst = tmp_path / "study"
    shutil.copytree(EXAMPLE, dst)
    return dst


def rician(pixels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Rician noise at ``fraction`` of the 99th intensity percentile: a low-SNR acquisition of the same anatomy."""
    sd = fraction * np.percentile(pixels, 99)
    return np.sqrt((pixels + rng.normal(0, sd, pixels.shape)) ** 2 + rng.normal(0, sd, pixels.shape) ** 2)


def edit_all(folder: Path, fn) -> None:
    """Apply ``fn(ds)`` to every DICOM file in a folder and save it back."""
    for p in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(str(p))
        fn(ds)
        ds.save_as(str(p))
