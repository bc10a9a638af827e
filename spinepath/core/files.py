"""Atomic file writing shared by every writer of the package, and xz-compressed array packs.

The writers: models, JSON, images, DICOM, NIfTI; the packs carry training data to a machine without the shared
data (a lent GPU).
"""

from __future__ import annotations

import io
import json
import lzma
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


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


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically, with the same bytes for the same content.

    ``torch.save`` names its zip archive's folder after the file it writes to, and :func:`atomic_file`'s
    temporary name is random: saved through a buffer the archive is always named ``archive``, so that equal
    weights give an equal file and a recorded SHA-256 can be reproduced.
    """
    import torch  # only where a model is saved

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_file(path, ".pt") as tmp:
        Path(tmp).write_bytes(buf.getbuffer())


def write_npz_xz(path: str | Path, arrays: dict[str, np.ndarray], meta: Any) -> None:
    """Write arrays and JSON-able ``meta`` as one xz-compressed ``.npz``, atomically (:func:`read_npz_xz`).

    ``meta`` is stored as the UTF-8 JSON bytes of an array named ``meta`` (a name ``arrays`` must not use).
    """
    if "meta" in arrays:
        raise ValueError("an array may not be named 'meta': that name holds the metadata")
    buf = io.BytesIO()
    np.savez(buf, **arrays, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with atomic_file(path, ".xz") as tmp:
        Path(tmp).write_bytes(lzma.compress(buf.getvalue(), preset=6))


def read_npz_xz(path: str | Path) -> tuple[dict[str, np.ndarray], Any]:
    """The arrays and metadata of a :func:`write_npz_xz` file."""
    with np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes()))) as z:
        return {k: z[k] for k in z.files if k != "meta"}, json.loads(z["meta"].tobytes())


def print_json(obj: Any, out: str | Path | None = None) -> None:
    """Print a report's JSON (indent 1) and, with ``out``, also write it there atomically (a script's ``--out``)."""
    text = json.dumps(obj, indent=1)
    print(text)
    if out:
        with atomic_file(out) as tmp:
            Path(tmp).write_text(text + "\n")
