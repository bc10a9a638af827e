"""Helpers shared by the DICOM writers."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom

from spinepath.core.files import atomic_file


@contextmanager
def no_identifying_warnings() -> Iterator[None]:
    """Silence highdicom's person-name check, whose warning quotes the patient's name (never log it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*")
        yield


def write_dataset(dataset: pydicom.Dataset, path: str | Path) -> Path:
    """Write a DICOM dataset atomically (temporary file in the same folder, then rename)."""
    with atomic_file(path, ".dcm") as tmp:
        if int(pydicom.__version__.split(".")[0]) >= 3:
            dataset.save_as(tmp, enforce_file_format=True)
        else:  # pydicom 2.4 (MONAI Label environment)
            dataset.save_as(tmp, write_like_original=False)
    return Path(path)
