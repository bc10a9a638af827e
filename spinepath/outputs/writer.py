"""The one writer of a study's outputs: JSON, key image, DICOM SR / SEG / PDF, then ``status.json``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from pydicom.uid import generate_uid

from spinepath import __version__
from spinepath.core.results import DetectionResult
from spinepath.outputs.common import write_dataset
from spinepath.outputs.key_image import key_image
from spinepath.outputs.pdf import build_pdf_dataset
from spinepath.outputs.seg import build_vertebra_seg
from spinepath.outputs.sr import build_sr
from spinepath.outputs.status import write_status

#: Build the SEG and the PDF report in a forked child while this process builds the SR (:func:`write_dicom_outputs`).
#: Set by the processes that run one study and exit (``app.py``, ``spinepath run``; :func:`enable_parallel`):
#: on 2 cores the two halves of the outputs' pure-Python work overlap. Off in long-running processes
#: (the PACS worker, Dask workers, MONAI Label), whose other threads make a fork unsafe.
PARALLEL = False
#: What the forked child writes: on the 19-slice example, a cold process builds the SR in 1.1-1.3 s, the PDF in
#: 0.75 s and the SEG in 0.1-0.3 s.
FORKED = ("seg", "pdf_report")


def enable_parallel(on: bool = True) -> None:
    """Let :func:`write_dicom_outputs` build the SEG and PDF in a forked child (a one-study process; POSIX only)."""
    global PARALLEL
    PARALLEL = on and hasattr(os, "fork")


def write_dicom_outputs(
    result: DetectionResult, folder: str | Path, key_png: str | Path | None = None, uid_seed: str | None = None
) -> dict[str, str]:
    """Write the DICOM outputs of a graded result into ``folder``.

    ``sr.dcm`` (Comprehensive 3D SR, TID 1500), ``seg.dcm`` (vertebra segmentation) and ``report.dcm``
    (Encapsulated PDF), each a new series of the source study. ``key_png``: the key image already written, for
    the PDF (drawn again when None). ``uid_seed``: derive each object's Series and SOP Instance UIDs from it
    (:func:`seeded_uid`) instead of new random ones, so that the same run stored twice is one set of objects in
    the PACS (the PACS worker's exactly-once delivery). With :data:`PARALLEL` the SEG and the PDF are built in a
    forked child meanwhile (:data:`FORKED`); the same files either way.

    Returns:
        ``{kind: file name}`` for the JSON.

    Raises:
        RuntimeError: If the forked child could not write its objects (its error in the message).

    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"sr": "sr.dcm", "seg": "seg.dcm", "pdf_report": "report.dcm"}
    builders = {"sr": lambda: build_sr(result), "seg": lambda: build_vertebra_seg(result),
                "pdf_report": lambda: build_pdf_dataset(result, key_png=key_png)}

    def write(kind: str) -> None:
        ds = builders[kind]()
        if uid_seed is not None:
            ds.SeriesInstanceUID = seeded_uid(uid_seed, kind, "series")
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = seeded_uid(uid_seed, kind, "instance")
        write_dataset(ds, folder / files[kind])

    forked = FORKED if PARALLEL else ()
    child = _fork_writer(write, forked, folder) if forked else None
    for kind in files:
        if kind not in forked:
            write(kind)
    if child is not None:
        _join_writer(child, folder)
    return files


_CHILD_ERROR = ".child-error"


def _fork_writer(write, kinds: tuple[str, ...], folder: Path) -> int:
    """Fork a child that runs ``write`` for each of ``kinds`` and exits (its traceback in ``folder`` on failure)."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        for kind in kinds:
            write(kind)
    except BaseException:  # noqa: BLE001  (everything goes to the parent, which raises it)
        (folder / _CHILD_ERROR).write_text(traceback.format_exc())
        code = 1
    os._exit(code)  # no teardown, no flush of the parent's buffers a second time


def _join_writer(pid: int, folder: Path) -> None:
    _, status = os.waitpid(pid, 0)
    err = folder / _CHILD_ERROR
    if os.waitstatus_to_exitcode(status) != 0 or err.exists():
        detail = err.read_text().strip().splitlines()[-1] if err.exists() else f"exit status {status}"
        err.unlink(missing_ok=True)
        raise RuntimeError(f"the SEG and PDF report could not be written: {detail}")


def seeded_uid(seed: str, *parts: str) -> str:
    """A UID that depends only on ``seed`` and ``parts`` (pydicom's hash-based ``generate_uid``)."""
    return generate_uid(entropy_srcs=[seed, __version__, *parts])


def write_outputs(result: DetectionResult, out_dir: str | Path, dicom: bool | None = None,
                  uid_seed: str | None = None) -> dict:
    """Write ``vertebrae.json``, ``key_image.png`` and the DICOM outputs atomically, then ``status.json``.

    The results go through a temporary folder inside ``out_dir``; ``status.json`` (``ok: true``) is written
    only once all are in place.

    Args:
        result: The detection result (graded when ``findings`` is set).
        out_dir: Output folder.
        dicom: Write ``dicom/{sr,seg,report}.dcm``; by default when the result is graded and the series
            carries its source DICOM headers.
        uid_seed: Derive the DICOM outputs' UIDs from it (:func:`write_dicom_outputs`).

    Returns:
        The JSON result as written.

    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dicom is None:
        dicom = result.findings is not None and bool(result.volume.datasets) and bool(result.vertebrae)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        d = result.to_dict()
        d["key_image"] = {"file": "key_image.png", "slice_index": key_image(result, tmp / "key_image.png")}
        if dicom:
            t0 = time.perf_counter()
            files = write_dicom_outputs(result, tmp / "dicom", tmp / "key_image.png", uid_seed)
            d["dicom_outputs"] = {k: f"dicom/{v}" for k, v in files.items()}
            d["timings_s"]["dicom_outputs"] = round(time.perf_counter() - t0, 3)
        (tmp / "vertebrae.json").write_text(json.dumps(d, indent=1))
        names = ["vertebrae.json", "key_image.png"] + (["dicom"] if dicom else [])
        for name in names:
            if name == "dicom" and (out / name).exists():
                shutil.rmtree(out / name)
            (tmp / name).replace(out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_status(out, True, "ok", n_vertebrae=len(result.vertebrae), input_kind=result.input_kind)
    return d


__all__ = ["enable_parallel", "seeded_uid", "write_dicom_outputs", "write_outputs", "write_status"]
