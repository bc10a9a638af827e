"""Helpers shared by the DICOM writers."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom


@contextmanager
def no_identifying_warnings() -> Iterator[None]:
    """Silence highdicom's person-name check, whose warning quotes the patient's name (never log it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*")
        yield


@contextmanager
def atomic_file(path: str | Path, suffix: str) -> Iterator[str]:
    """A temporary file in ``path``'s folder to write; it replaces ``path`` when the block succeeds.

    The file gets the usual permissions of a new file; on an error nothing is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_dataset(dataset: pydicom.Dataset, path: str | Path) -> Path:
    """Write a DICOM dataset atomically (temporary file in the same folder, then rename)."""
    with atomic_file(path, ".dcm") as tmp:
        if int(pydicom.__version__.split(".")[0]) >= 3:
            dataset.save_as(tmp, enforce_file_format=True)
        else:  # pydicom 2.4 (MONAI Label environment)
            dataset.save_as(tmp, write_like_original=False)
    return Path(path)
