"""The warm PACS worker (``spinepath worker``): models loaded once, every queued study read, stored back.

Orthanc receives the studies (DICOM C-STORE from the modalities) and its plugin script
(:mod:`spinepath.service.orthanc_plugin`) puts each stable study into the queue file
(:mod:`spinepath.service.queue`). The worker claims them one at a time: it fetches the study over DICOMweb
(WADO-RS), runs the chain (:func:`spinepath.run.run_study` with the models it holds), stores the SR, SEG and PDF
back into the same study (STOW-RS), and marks the study done. Killed at any point, the next worker puts the
study it held back in the queue; the outputs' UIDs are derived from the study and the queue version
(``uid_seed``), so a study processed again after a kill stores the same three objects, which the PACS already
has: each study gets its results exactly once. A study that cannot be read is marked failed after
:data:`~spinepath.service.queue.MAX_ATTEMPTS` tries, with the reason, and the worker goes on. Logs name studies
by their Orthanc ID, never by patient data.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from spinepath import stages
from spinepath.core.errors import StudyError
from spinepath.io.pacs import PacsError, fetch_study, store_files
from spinepath.run import run_study
from spinepath.service.queue import Job, StudyQueue

log = logging.getLogger(__name__)


@dataclass
class WorkerModels:
    """The four models, loaded once (:func:`load`)."""

    detector: object
    grader: object
    spider_grader: object
    segmenter: object

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> WorkerModels:
        """The models of a folder (or the bundle's); their TorchScript exports when current."""
        return cls(*stages.load_all_models(model_dir))


class Worker:
    """Process the queue's studies against one DICOMweb server.

    Args:
        dicomweb: The PACS's DICOMweb root (Orthanc: ``http://host:8042/dicom-web``).
        queue: The queue file (shared with Orthanc's plugin).
        models: The loaded models.
        work_dir: Where each study is fetched and written while it is processed (a temporary folder by default).

    """

    def __init__(self, dicomweb: str, queue: StudyQueue, models: WorkerModels,
                 work_dir: str | Path | None = None) -> None:
        self.dicomweb, self.queue, self.models = dicomweb, queue, models
        self.work_dir = Path(work_dir) if work_dir else None
        self.stopping = False

    def process(self, job: Job) -> tuple[int, float]:
        """Fetch, run and store back one study; returns the number of objects stored and the chain's seconds."""
        with tempfile.TemporaryDirectory(prefix="spinepath-worker-", dir=self.work_dir) as tmp:
            study, out = Path(tmp) / "study", Path(tmp) / "out"
            fetch_study(self.dicomweb, job.study_uid, study)
            m = self.models
            res = run_study(study, out, m.detector, grader=m.grader, spider_grader=m.spider_grader,
                      segmenter=m.segmenter, uid_seed=f"{job.study_uid}/{job.version}")
            files = sorted((out / "dicom").glob("*.dcm"))
            if not files:
                raise StudyError("no DICOM results were written (no vertebra found)")
            store_files(self.dicomweb, files)
            return len(files), float(sum(res["timings_s"].values()))

    def run(self, poll: float = 1.0, idle_exit: float | None = None, max_studies: int | None = None) -> int:
        """Work until stopped (SIGTERM / SIGINT: after the current study), idle too long, or ``max_studies``.

        Returns:
            The number of studies processed (done or failed).

        """
        recovered = self.queue.recover()
        if recovered:
            log.info("put back %d studies claimed by a worker that stopped", recovered)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        n, idle_since = 0, time.monotonic()
        while not self.stopping and (max_studies is None or n < max_studies):
            job = self.queue.claim()
            if job is None:
                if idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                    break
                time.sleep(poll)
                continue
            t0 = time.perf_counter()
            try:
                stored, chain = self.process(job)
            except (StudyError, PacsError, FileNotFoundError, ValueError) as exc:
                self.queue.fail(job, str(exc))
                log.warning("study %s failed (try %d): %s", job.orthanc_id, job.attempts, exc)
            else:
                secs = time.perf_counter() - t0
                self.queue.finish(job, secs, stored, chain)
                log.info("study %s done in %.1f s (the chain %.1f s): %d objects stored", job.orthanc_id, secs,
                         chain, stored)
            n += 1
            idle_since = time.monotonic()
        return n

    def _stop(self, signum, frame) -> None:
        log.info("stopping after the current study")
        self.stopping = True
