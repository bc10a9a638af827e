"""Atomic file writing shared by every writer of the package (models, JSON, images, DICOM, NIfTI)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path, suffix: str = "", durable: bool = False) -> Iterator[str]:
    """A temporary file in ``path``'s folder to write; it replaces ``path`` when the block succeeds.

    The file gets the usual permissions of a new file; on an error nothing is left behind and ``path`` is
    untouched.

    Args:
        path: The final file.
        suffix: Suffix of the temporary name (some writers choose the format from it, e.g. ``.png``).
        durable: Also fsync the file and its folder, so that the new content survives a crash.

    Yields:
        The temporary file's path.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        Path(tmp).replace(path)
        if durable:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        Path(tmp).unlink(missing_ok=True)
