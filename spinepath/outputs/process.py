"""The outputs written by a process forked at start-up, warm by the time the chain ends (issue 15: the cold start).

A one-study process (``app.py``, ``spinepath run``) spends about 1.5 s of its cold start on the outputs' own
start-up: importing highdicom and matplotlib, parsing highdicom's DICOM-standard tables (the 22 MB module map,
read by the first object that checks an IOD) and drawing a first figure. :func:`start_writer_process` forks,
before torch is imported, a child that does all of that on the second core while the parent imports torch and
runs the chain, then waits. :func:`write_outputs` hands the finished result to it (pickled through a pipe, a few
milliseconds) and waits for its reply: the child writes exactly what :func:`spinepath.outputs.writer.write_outputs`
writes (the same function, atomically, ``status.json`` last) and reports success or its error, which is raised
in the parent. Without a started child, :func:`write_outputs` is the writer's own, in this process.

The parent never draws once the child is started: :func:`start_writer_process` hides matplotlib from it
(MONAI's utilities import pyplot only to offer plots). Long-running processes (the PACS worker, Dask workers,
MONAI Label) do not start one: they keep their imports warm themselves.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any, BinaryIO

from spinepath.outputs.status import write_status

log = logging.getLogger(__name__)

#: Modules the parent never imports while a writer process holds the outputs (see the module docstring).
PARENT_HIDDEN = ("matplotlib",)


class WriterProcess:
    """The forked writer: its pid and the two pipe ends the parent keeps."""

    def __init__(self, pid: int, jobs: BinaryIO, replies: BinaryIO) -> None:
        self.pid, self.jobs, self.replies = pid, jobs, replies

    def write(self, result: Any, out_dir: Path, options: dict) -> dict:
        """Send one result to the child and return the JSON it wrote; the child exits after it.

        Raises:
            RuntimeError: If the child failed (its error in the message) or ended without a reply.

        """
        try:
            try:
                pickle.dump((result, out_dir, options), self.jobs, protocol=pickle.HIGHEST_PROTOCOL)
            finally:
                self.jobs.close()  # the child reads to the end (a truncated job fails there, and it exits)
            reply = pickle.load(self.replies)
        except (BrokenPipeError, EOFError) as exc:
            reply = ("error", f"the writer process ended without a reply ({type(exc).__name__})")
        finally:
            self.replies.close()
            _, status = os.waitpid(self.pid, 0)
        kind, payload = reply
        if kind != "ok":
            raise RuntimeError(f"the outputs could not be written: {payload}")
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the writer process failed (exit status {os.waitstatus_to_exitcode(status)})")
        return payload


_WRITER: WriterProcess | None = None
_HIDDEN: list[str] = []  # what start_writer_process hid from this process


def start_writer_process() -> bool:
    """Fork the writer process of a one-study process (POSIX only), before torch is imported.

    A process that has imported torch is not forked here (its thread pools make a fork unsafe, and the child
    would gain nothing): nothing happens, and :func:`write_outputs` writes in this process.

    Returns:
        Whether a writer process is running (started now or before).

    """
    global _WRITER
    if _WRITER is not None:
        return True
    if not hasattr(os, "fork") or "torch" in sys.modules:
        return False
    jobs_r, jobs_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(jobs_w)
        os.close(replies_r)
        _serve(os.fdopen(jobs_r, "rb"), os.fdopen(replies_w, "wb"))
    os.close(jobs_r)
    os.close(replies_w)
    _WRITER = WriterProcess(pid, os.fdopen(jobs_w, "wb"), os.fdopen(replies_r, "rb"))
    for m in PARENT_HIDDEN:
        if m not in sys.modules:
            sys.modules[m] = None  # type: ignore[assignment]  # `import matplotlib` raises ImportError here
            _HIDDEN.append(m)
    return True


def write_outputs(result: Any, out_dir: str | Path, dicom: bool | None = None, uid_seed: str | None = None) -> dict:
    """:func:`spinepath.outputs.writer.write_outputs`, in the writer process when one was started.

    Raises:
        RuntimeError: If the writer process could not write the outputs (nothing is left half-written: the
            writer replaces the output files only once all are made).

    """
    global _WRITER
    options = {"dicom": dicom, "uid_seed": uid_seed}
    if _WRITER is None:
        while _HIDDEN:  # a second study after the writer process's one: this process draws after all
            sys.modules.pop(_HIDDEN.pop(), None)
        from spinepath.outputs import writer  # highdicom and the rest only in the process that writes

        return writer.write_outputs(result, out_dir, **options)
    proc, _WRITER = _WRITER, None  # one study per writer process
    return proc.write(result, Path(out_dir), options)


def _warm() -> None:
    """Everything the outputs start with: their modules, highdicom's standard tables, matplotlib's first figure."""
    # imported here, in the writer process: the parent never imports them
    import io

    import highdicom as hd
    import matplotlib
    import numpy as np
    from pydicom.uid import MRImageStorage, generate_uid

    matplotlib.use("Agg")
    # after the backend is chosen; then the result's classes (for unpickling it) and the writer
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    import spinepath.review  # noqa: F401
    from spinepath.outputs import writer

    writer.enable_parallel()  # a one-study process: the SEG and PDF report in a forked child beside the SR
    # a region on an MR image reads highdicom's module map (cached for the process, and for the SEG's child)
    hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=np.array([[0.0, 0.0], [1.0, 1.0]]),
                      source_image=hd.sr.SourceImageForRegion(MRImageStorage, generate_uid()))
    fig = plt.figure(figsize=(2, 2))
    fig.text(0.5, 0.5, "warm-up")
    with PdfPages(io.BytesIO()) as pdf:
        pdf.savefig(fig)
    plt.close(fig)


def _serve(jobs: BinaryIO, replies: BinaryIO) -> None:
    """The writer process: warm up, write the one result the parent sends, reply, exit (no teardown)."""
    code = 0
    try:
        try:
            _warm()
        except Exception:  # noqa: BLE001  (the write below then pays the start-up itself, or fails with the reason)
            log.debug("writer warm-up failed: %s", traceback.format_exc())
        try:
            result, out_dir, options = pickle.load(jobs)
        except EOFError:  # the parent ended without outputs (a refused study)
            os._exit(0)
        from spinepath.outputs import writer  # warm already (the write pays the imports if the warm-up failed)

        reply: tuple[str, Any] = ("ok", writer.write_outputs(result, out_dir, **options))
    except BaseException as exc:  # noqa: BLE001  (everything goes to the parent, which raises it)
        reply, code = ("error", f"{type(exc).__name__}: {exc}"), 1
        log.debug("writer process failed: %s", traceback.format_exc())
    try:
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.close()
    except Exception:  # noqa: BLE001  (the parent is gone)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["WriterProcess", "start_writer_process", "write_outputs", "write_status"]
