"""The warm PACS worker (issue 15, item 2): Orthanc receives studies by C-STORE, its Python plugin queues each
stable study on disk, ``spinepath worker`` runs them and stores SR / SEG / PDF back; killed mid-queue and
restarted, it loses nothing and stores nothing twice."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, REPO, copy_study, series_counts
from servers import DICOMWEB_ROOT, ServerError, orthanc_server

from spinepath.service.queue import StudyQueue

EXAMPLES = [DATA / "dicom_examples" / "chu_t2_02", DATA / "dicom_examples" / "chu_t2_04"]
N_STUDIES = 10
PLUGIN = REPO / "spinepath" / "service" / "orthanc_plugin.py"
SCANNER_AET = "SCANNER"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """An Orthanc with the plugin: C-STORE from SCANNER allowed, studies stable after 2 s; (DICOMweb URL, info)."""
    queue = tmp_path_factory.mktemp("queue") / "queue.sqlite"
    info: dict = {}
    extra = {"StableAge": 2, "SpinepathQueue": str(queue),
             "DicomModalities": {"scanner": [SCANNER_AET, "127.0.0.1", 104]}}
    try:
        with orthanc_server(extra=extra, python_script=PLUGIN, info=info) as url:
            yield url + DICOMWEB_ROOT, info, queue
    except ServerError as exc:
        pytest.fail(str(exc))


def _worker(dicomweb: str, queue: Path, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "spinepath", "worker", "--queue", str(queue), "--dicomweb",
                                 dicomweb, "--poll", "0.3", *extra], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)


def _wait(cond, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_pushed_study_gets_its_results_once_across_a_worker_kill(pacs, tmp_path):
    dicomweb, info, queue_file = pacs
    storescu = shutil.which("storescu")
    assert storescu, "storescu missing: run scripts/setup_system.sh (Debian dcmtk)"
    studies = [copy_study(EXAMPLES[i % 2], tmp_path / f"s{i}") for i in range(N_STUDIES)]
    worker = _worker(dicomweb, queue_file, tmp_path / "worker1.log")
    # the scanner pushes the ten studies at once (one association each)
    pushes = [subprocess.Popen([storescu, "-aet", SCANNER_AET, "-aec", info["aet"], "127.0.0.1",
                                str(info["dicom_port"]), *map(str, sorted((tmp_path / f"s{i}").glob("*.dcm")))],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(N_STUDIES)]
    for p in pushes:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode(errors="replace")[-2000:]
    queue = StudyQueue(queue_file)
    _wait(lambda: sum(queue.counts().values()) == N_STUDIES, 120, "the plugin to queue every study")
    # kill the worker in the middle of the queue: some studies done, one claimed, the rest pending
    _wait(lambda: queue.counts()["done"] >= 2 and queue.counts()["running"] == 1, 900, "two studies done")
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    before = queue.counts()
    assert before["running"] == 1 and before["done"] < N_STUDIES, before
    # restarted: the claimed study is put back and everything finishes; it exits once idle
    worker = _worker(dicomweb, queue_file, tmp_path / "worker2.log", "--idle-exit", "15")
    _wait(lambda: queue.counts()["done"] == N_STUDIES, 1200, "every study done")
    assert worker.wait(timeout=120) == 0, (tmp_path / "worker2.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "worker2.log").read_text().strip().splitlines()[-1])
    assert summary["done"] == N_STUDIES and summary["processed"] == N_STUDIES - before["done"]
    assert "put back 1 studies" in (tmp_path / "worker2.log").read_text()
    for uid in studies:
        counts = series_counts(dicomweb, uid)
        assert counts["MR"] == [19], counts  # the source series, untouched
        assert counts["SR"] == [1] and counts["SEG"] == [1] and counts["DOC"] == [1], counts  # each exactly once
    rows = queue.rows()
    assert len(rows) == N_STUDIES and {r["study_uid"] for r in rows} == set(studies)
    # the stored results made the studies stable again: not queued again (their source images did not change)
    time.sleep(4)
    assert queue.counts() == {"pending": 0, "running": 0, "done": N_STUDIES, "failed": 0}
    assert all(r["version"] == 1 and r["attempts"] in (1, 2) and r["stored"] == 3 for r in queue.rows())
    assert all(0 < r["chain_seconds"] < r["seconds"] for r in queue.rows())
