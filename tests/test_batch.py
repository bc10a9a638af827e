"""`spinepath batch` on Dask (issue 15, item 3).

20 copies of the two real example studies (new Study / Series / SOP Instance UIDs per copy) on a loopback
Orthanc, 2 workers of a LocalCluster, one worker SIGKILLed once the first study is finished: every study is
finished exactly once (one output folder, one ledger entry, one SR / SEG / PDF in the PACS), and an identical
second run processes nothing. Folder mode: broken study folders are recorded as failed without stopping the
batch and are retried by the next run.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pydicom
import pytest
from conftest import DATA, REPO, copy_study, series_counts
from dicomweb_client import DICOMwebClient
from servers import DICOMWEB_ROOT, ServerError, orthanc_server

from spinepath.batch import findings_rows, parse_query, valid_uid
from spinepath.cli import main
from spinepath.io.pacs import store_files

EXAMPLES = [DATA / "dicom_examples" / "chu_t2_02", DATA / "dicom_examples" / "chu_t2_04"]
N_STUDIES = 20
OUTPUTS = ("vertebrae.json", "key_image.png", "status.json", "dicom/sr.dcm", "dicom/seg.dcm", "dicom/report.dcm")


def spinepath(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinepath", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def pacs():
    """A throwaway Orthanc of this module alone (the session's may hold other studies)."""
    try:
        with orthanc_server() as url:
            yield url + DICOMWEB_ROOT
    except ServerError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def archive(pacs: str, tmp_path_factory) -> dict:
    """20 MR study copies of both examples in Orthanc, and one CT study the query must leave out."""
    root = tmp_path_factory.mktemp("archive")
    uids = [copy_study(EXAMPLES[i % 2], root / f"s{i:02d}") for i in range(N_STUDIES)]
    ct = copy_study(EXAMPLES[0], root / "ct", edit=lambda ds: setattr(ds, "Modality", "CT"))
    store_files(pacs, sorted(root.rglob("*.dcm")))
    return {"mr": uids, "ct": ct}


def _workers(pid: int) -> list[psutil.Process]:
    """The Dask worker processes under the batch process (spawned by the nannies)."""
    found = []
    for c in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(c.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd:
            found.append(c)
    return found


def _kill_a_worker_after_first_result(proc: subprocess.Popen, out: Path, timeout: float = 600) -> tuple[int, int]:
    """Wait for the first finished study, then SIGKILL one worker; returns (its pid, partial folders then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(valid_uid(p.name) for p in out.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the batch ended before a worker could be killed"
    workers = _workers(proc.pid)
    assert len(workers) == 2, [w.pid for w in workers]
    partials = len(list(out.glob(".partial-*")))
    victim = workers[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    return victim.pid, partials


def test_dicomweb_batch_with_a_killed_worker(pacs, archive, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spinepath", "-q", "batch", "--dicomweb", pacs, "--query", "ModalitiesInStudy=MR",
           "--out", str(out), "--workers", "2"]
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=so, stderr=se, text=True)
        try:
            killed, partials = _kill_a_worker_after_first_result(proc, out)
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert partials >= 1  # the workers were inside a study when one was killed
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    res = summary(stdout)
    assert (res["studies"], res["processed"], res["done"], res["failed"], res["stored"]) == (20, 20, 20, 0, 20)
    uids = set(archive["mr"])

    # exactly one finished output folder per study, nothing half-written left
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == uids | {"ledger.json", "findings.csv"}
    assert not list(out.glob(".partial-*"))
    for uid in uids:
        for name in OUTPUTS:
            assert (out / uid / name).is_file(), (uid, name)
        assert json.loads((out / uid / "status.json").read_text())["ok"] is True
        assert json.loads((out / uid / "vertebrae.json").read_text())["input"]["study_instance_uid"] == uid

    # the ledger: 20 studies, each done once and stored
    ledger = json.loads((out / "ledger.json").read_text())
    assert set(ledger["studies"]) == uids
    for uid, e in ledger["studies"].items():
        assert (e["status"], e["attempts"], e["stored"], e["output"], e["error"]) == ("done", 1, True, uid, None)

    # the PACS: per source study one SR, one SEG and one PDF (one instance each), the ones in OUT/<uid>/dicom
    client = DICOMwebClient(pacs)
    for uid in uids:
        counts = series_counts(pacs, uid)
        assert counts == {"MR": [19], "SR": [1], "SEG": [1], "DOC": [1]}, (uid, counts)
        sr = pydicom.dcmread(out / uid / "dicom" / "sr.dcm", stop_before_pixels=True)
        assert client.search_for_instances(uid, sr.SeriesInstanceUID)[0]["00080018"]["Value"] == [sr.SOPInstanceUID]
    assert series_counts(pacs, archive["ct"]) == {"CT": [19]}  # not matched by the query: untouched

    # findings.csv: one row per study and level, findings and measurements as flat columns
    rows = read_csv(out / "findings.csv")
    assert {r["study_instance_uid"] for r in rows} == uids
    for col in ("level", "structure", "needs_review", "pathology_probability", "pathology_label", "grade",
                "pfirrmann_grade", "modic_type", "herniation_probability", "measured_middle_mm",
                "measured_disc_height_index", "measured_flags", "measured_review_reasons"):
        assert col in rows[0], col
    for uid in uids:
        mine = [r for r in rows if r["study_instance_uid"] == uid]
        d = json.loads((out / uid / "vertebrae.json").read_text())
        assert [r["level"] for r in mine] == [r["level"] for r in findings_rows(d, uid)]
        assert {r["level"] for r in mine if r["structure"] == "vertebra"} == {v["level"] for v in d["vertebrae"]}
        assert {r["level"] for r in mine if r["structure"] == "disc"} >= {x["level"] for x in d["discs"]}
        l4 = next(r for r in mine if r["level"] == "L4")
        assert float(l4["pathology_probability"]) == next(v for v in d["vertebrae"] if v["level"] == "L4")[
            "pathology"]["probability"]
        assert float(l4["measured_middle_mm"]) == d["measurements"]["vertebrae"]["L4"]["middle"]["mm"]

    # an identical second run processes nothing and says so
    before = (out / "ledger.json").read_bytes()
    again = spinepath("batch", "--dicomweb", pacs, "--query", "ModalitiesInStudy=MR", "--out", str(out),
                      "--workers", "2", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.splitlines()[0] == "nothing to do: 20 studies already done"
    assert summary(again.stdout)["processed"] == 0
    assert (out / "ledger.json").read_bytes() == before
    assert all(series_counts(pacs, uid) == {"MR": [19], "SR": [1], "SEG": [1], "DOC": [1]} for uid in uids)

    # a client killed after storing a study but before its ledger entry: the next run finds the finished folder
    # (the task writes nothing) and stores the same instances again, which the PACS keeps once
    lost = sorted(uids)[0]
    ledger["studies"].pop(lost)
    (out / "ledger.json").write_text(json.dumps(ledger))
    mtime = (out / lost / "vertebrae.json").stat().st_mtime_ns
    third = spinepath("-q", "batch", "--dicomweb", pacs, "--query", "ModalitiesInStudy=MR", "--out", str(out),
                      "--workers", "1", timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    res = summary(third.stdout)
    assert (res["processed"], res["done"], res["reused"], res["stored"]) == (1, 1, 1, 1)
    assert (out / lost / "vertebrae.json").stat().st_mtime_ns == mtime
    assert series_counts(pacs, lost) == {"MR": [19], "SR": [1], "SEG": [1], "DOC": [1]}
    assert json.loads((out / "ledger.json").read_text())["studies"][lost]["status"] == "done"


def test_folder_batch_records_failures_and_retries_them(tmp_path):
    root, out = tmp_path / "archive", tmp_path / "out"
    good = copy_study(EXAMPLES[1], root / "good")
    axial = copy_study(EXAMPLES[0], root / "axial",
                       edit=lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]))
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not DICOM")
    args = ("-q", "batch", "--folder", str(root), "--out", str(out), "--workers", "1")

    first = spinepath(*args)
    assert first.returncode == 1, first.stderr[-3000:]  # finished, with failed studies
    res = summary(first.stdout)
    assert (res["studies"], res["done"], res["failed"]) == (3, 1, 2)
    ledger = json.loads((out / "ledger.json").read_text())["studies"]
    assert set(ledger) == {good, axial, "folder:notes"}
    assert ledger[good]["status"] == "done" and ledger[good]["folder"] == "good"
    assert ledger[axial]["status"] == "failed" and "no sagittal" in ledger[axial]["error"]
    assert ledger["folder:notes"]["status"] == "failed" and "no readable DICOM" in ledger["folder:notes"]["error"]
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {good, "ledger.json", "findings.csv"}
    assert {r["study_instance_uid"] for r in read_csv(out / "findings.csv")} == {good}
    done_mtime = (out / good / "vertebrae.json").stat().st_mtime_ns

    # the next run retries the failed studies only
    second = spinepath(*args)
    assert second.returncode == 1, second.stderr[-3000:]
    res = summary(second.stdout)
    assert (res["already_done"], res["processed"], res["failed"]) == (1, 2, 2)
    ledger = json.loads((out / "ledger.json").read_text())["studies"]
    assert [ledger[k]["attempts"] for k in (good, axial, "folder:notes")] == [1, 2, 2]
    assert (out / good / "vertebrae.json").stat().st_mtime_ns == done_mtime

    # once the broken folders are gone there is nothing to do
    for name in ("axial", "notes"):
        for p in (root / name).iterdir():
            p.unlink()
        (root / name).rmdir()
    third = spinepath(*args)
    assert third.returncode == 0 and third.stdout.splitlines()[0] == "nothing to do: 1 study already done"


def test_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: exactly one source
        main(["batch", "--folder", str(tmp_path), "--dicomweb", "http://x/dicom-web", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    with pytest.raises(SystemExit):  # --workers and --scheduler exclude each other
        main(["batch", "--folder", str(tmp_path), "--out", "o", "--workers", "2", "--scheduler", "tcp://x:8786"])
    cases = [
        (["--folder", str(tmp_path), "--query", "PatientName=SECRET"], "--query needs --dicomweb"),
        (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--query", "Patient Name=SECRET"], "KEY=VALUE"),
        (["--folder", str(tmp_path), "--workers", "0"], "--workers must be at least 1"),
        (["--folder", str(tmp_path / "missing")], "not a folder"),
        (["--folder", str(tmp_path / "empty")], "no study folders"),
        (["--folder", str(tmp_path), "-m", str(tmp_path / "nope.pt")], "model not found"),
    ]
    (tmp_path / "empty").mkdir()
    for extra, message in cases:
        capsys.readouterr()
        assert main(["batch", *extra, "--out", str(tmp_path / "empty" / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and "SECRET" not in err, err
    assert parse_query(["ModalitiesInStudy=MR", "StudyDate=20240101-20241231"]) == {
        "ModalitiesInStudy": "MR", "StudyDate": "20240101-20241231"}
    with pytest.raises(ValueError, match="twice"):
        parse_query(["PatientID=a", "PatientID=b"])


WORKER_STUDY = """
import json, sys, tempfile
from spinepath.batch import ModelPaths, StudyTask, process_study, worker_models
task = StudyTask("1.2.3", tempfile.mkdtemp(), folder=sys.argv[1], models=ModelPaths())
res = process_study(task)  # as a Dask worker runs it
detector = worker_models(ModelPaths())[0]
print(json.dumps({"status": res["status"], "exported": type(detector.detector).__name__,
                  "heavy": [m for m in ("monai.networks.nets", "torchvision", "timm", "torch._dynamo", "triton")
                            if m in sys.modules]}))
"""


def test_a_worker_runs_studies_without_monais_networks():
    """A batch worker defers MONAI's package imports before its first study imports the chain, then loads the
    bundle's exported networks, as the app does (issue 15: a worker starts sooner and closes sooner)."""
    out = subprocess.run([sys.executable, "-c", WORKER_STUDY, str(DATA / "dicom_examples" / "chu_t2_02")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"status": "done", "exported": "ExportedRetinaNet", "heavy": []}
