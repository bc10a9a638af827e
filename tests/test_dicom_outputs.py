"""DICOM SR (TID 1500) and Encapsulated PDF outputs: conformance (dciodvfy) and exact round trips."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import EXAMPLE, dciodvfy_errors

from spinepath.core.paths import resolve_grader_path, resolve_model_path
from spinepath.detection.predictor import VertebraDetector
from spinepath.grading.grader import Grader
from spinepath.grading.inference import grade_detections
from spinepath.io.dicom import load_study
from spinepath.outputs.common import write_dataset
from spinepath.outputs.pdf import build_pdf_dataset, read_pdf, render_pdf
from spinepath.outputs.seg import build_vertebra_seg
from spinepath.outputs.sr import build_sr, central_slice, read_findings
from spinepath.stages import detect_series


@pytest.fixture(scope="module")
def graded():
    vol = load_study(EXAMPLE)
    res = detect_series(vol, VertebraDetector.load(resolve_model_path()))
    res.findings = grade_detections(res, Grader.load(resolve_grader_path()))
    return res


def test_sr_conforms_and_round_trips(graded, tmp_path):
    p = write_dataset(build_sr(graded), tmp_path / "sr.dcm")
    assert dciodvfy_errors(p) == []
    ds = pydicom.dcmread(p)
    src = graded.volume.datasets[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
    back = read_findings(p)
    f = graded.findings
    assert set(back["vertebrae"]) == {v.level for v in f.vertebrae}
    tracks = {t.level: t for t in graded.vertebrae}
    for v in f.vertebrae:
        b = back["vertebrae"][v.level]
        assert b["probability"] == round(v.probability, 4)
        assert b["finding"] == ("Abnormal" if v.label == "pathological" else "Normal")
        assert b["finding_site"] == f"{v.level} vertebra"
        k = central_slice(tracks[v.level])
        assert b["source_sop_instance_uid"] == graded.volume.sop_instance_uids[k]
        r0, c0, r1, c1 = tracks[v.level].box_on(k)
        np.testing.assert_allclose(np.array(b["polyline"])[:4], [[c0, r0], [c1, r0], [c1, r1], [c0, r1]], atol=1e-3)
    assert set(back["discs"]) == {d.level for d in f.discs}
    for d in f.discs:
        b = back["discs"][d.level]
        assert b["grade"] == d.grade and b["probability"] == round(d.abnormal_probability, 4)
        assert b["finding"] == ("Normal" if d.grade == "v1" else "Abnormal")
        assert b["finding_site"].replace("/", "-").startswith(d.level.split("-")[0])


def test_pdf_conforms_and_round_trips(graded, tmp_path):
    pdf = render_pdf(graded)
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000
    p = write_dataset(build_pdf_dataset(graded, pdf), tmp_path / "report.dcm")
    assert dciodvfy_errors(p) == []
    ds = pydicom.dcmread(p)
    src = graded.volume.datasets[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and ds.Modality == "DOC"
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in ds.DocumentTitle and "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
    assert read_pdf(p) == pdf


def test_no_patient_identifiers_in_warnings(graded):
    import warnings

    src = graded.volume.datasets[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_sr(graded)
        build_vertebra_seg(graded)
        build_pdf_dataset(graded, b"%PDF-1.4 test")
    text = " ".join(str(w.message) for w in caught)
    assert str(src.PatientName) not in text and str(src.PatientID) not in text


def test_sr_requires_findings(graded):
    import copy

    ungraded = copy.copy(graded)
    ungraded.findings = None
    with pytest.raises(ValueError, match="no findings"):
        build_sr(ungraded)


def _values(seq) -> list:
    """Every element of a content tree but its UIDs (tracking UIDs are new in every report)."""
    return [(e.tag, e.value) for item in seq for e in item.iterall() if e.VR not in ("UI", "SQ")]


def _observer_uid(sr) -> str:
    """The SR's Device Observer UID (DCM 121012)."""
    return next(str(i.UID) for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121012")


def test_forked_pdf_writer_gives_the_same_objects(graded, tmp_path, monkeypatch):
    """With PARALLEL (a one-study process) the SEG and PDF are built in a forked child: the same three objects."""
    from spinepath.outputs import writer

    written = {}
    for parallel in (False, True):
        monkeypatch.setattr(writer, "PARALLEL", parallel)
        folder = tmp_path / str(parallel)
        files = writer.write_dicom_outputs(graded, folder, uid_seed="study-1")
        assert sorted(p.name for p in folder.iterdir()) == sorted(files.values())
        written[parallel] = {k: pydicom.dcmread(folder / v) for k, v in files.items()}
    for kind, ds in written[True].items():
        seq = written[False][kind]
        assert ds.SOPInstanceUID == seq.SOPInstanceUID and ds.SeriesInstanceUID == seq.SeriesInstanceUID
    # the same content: the SEG's segments and masks, the SR's findings, the report's pages
    seg = {m: written[m]["seg"] for m in written}
    assert seg[True].PixelData == seg[False].PixelData and seg[True].NumberOfFrames == seg[False].NumberOfFrames
    assert [s.SegmentLabel for s in seg[True].SegmentSequence] == [s.SegmentLabel for s in seg[False].SegmentSequence]
    sr = [written[m]["sr"] for m in (False, True)]
    assert [_values(x.ContentSequence) for x in sr] == [_values(sr[0].ContentSequence)] * 2
    assert len({_observer_uid(x) for x in sr}) == 1  # one device: this software at this version
    pdfs = [re.sub(rb"/CreationDate \(D:\d+Z\)", b"", read_pdf(tmp_path / str(m) / "report.dcm"))
            for m in (False, True)]
    assert pdfs[0] == pdfs[1]  # the same bytes but the second the PDF was made in
    assert read_pdf(tmp_path / "True" / "report.dcm").startswith(b"%PDF")
    assert dciodvfy_errors(tmp_path / "True" / "report.dcm") == []


def test_forked_pdf_writer_failure_is_raised_in_the_parent(graded, tmp_path, monkeypatch):
    """A PDF that cannot be built in the child fails the write in the parent, naming the error."""
    from spinepath.outputs import writer

    def broken(*args, **kwargs):
        raise ValueError("no room on the page")

    monkeypatch.setattr(writer, "PARALLEL", True)
    monkeypatch.setattr(writer, "build_pdf_dataset", broken)
    with pytest.raises(RuntimeError, match="SEG and PDF report could not be written: ValueError: no room on the page"):
        writer.write_dicom_outputs(graded, tmp_path / "out")
    assert not (tmp_path / "out" / "report.dcm").exists()


WRITER_PROCESS_RUN = """
import json, pickle, sys
from spinepath.outputs import process
started = process.start_writer_process()  # before torch: the result's pickle does not import it
child = process._WRITER.pid
error = None
if sys.argv[1] != "-":  # "-": end without a study (a refused one)
    result = pickle.load(open(sys.argv[1], "rb"))
    try:
        process.write_outputs(result, sys.argv[2], uid_seed="study-1")
    except RuntimeError as exc:
        error = str(exc)
imported = {m: sys.modules.get(m) is not None for m in ("torch", "highdicom", "matplotlib")}
second = None
if sys.argv[1] != "-" and error is None:  # a second study: written in this process (matplotlib unhidden)
    second = process.write_outputs(result, sys.argv[2] + "-second")["levels"]
print(json.dumps({"started": started, "child": child, "error": error, "imported": imported, "second": second}))
"""


def _writer_process_run(result, out: Path, tmp_path: Path) -> dict:
    """Run :data:`WRITER_PROCESS_RUN` on ``result`` (None: no study) in a fresh process; its JSON line."""
    import json
    import pickle
    import subprocess
    import sys

    from conftest import REPO

    job = "-"
    if result is not None:
        job = str(tmp_path / "result.pkl")
        Path(job).write_bytes(pickle.dumps(result))
    run = subprocess.run([sys.executable, "-c", WRITER_PROCESS_RUN, job, str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _wait_gone(pid: int, seconds: float = 10) -> None:
    import time

    import psutil

    deadline = time.time() + seconds
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the writer process outlived its parent"
        time.sleep(0.1)


def test_writer_process_writes_what_the_writer_writes(graded, tmp_path):
    """A one-study process's writer process (forked before torch) writes the same outputs as the writer itself;
    the parent imports neither highdicom nor matplotlib (issue 15)."""
    import json

    from spinepath.outputs import process, writer

    forked, direct = tmp_path / "forked", tmp_path / "direct"
    res = _writer_process_run(graded, forked, tmp_path)
    assert res["started"] and res["error"] is None
    assert res["imported"] == {"torch": False, "highdicom": False, "matplotlib": False}
    assert res["second"] == graded.to_dict()["levels"]
    assert (tmp_path / "forked-second" / "dicom" / "report.dcm").is_file()
    _wait_gone(res["child"])
    assert not process.start_writer_process()  # this test process has imported torch: it writes in-process
    writer.write_outputs(graded, direct, uid_seed="study-1")
    assert sorted(p.name for p in forked.rglob("*")) == sorted(p.name for p in direct.rglob("*"))
    a, b = (json.loads((d / "vertebrae.json").read_text()) for d in (forked, direct))
    a.pop("timings_s"), b.pop("timings_s")
    assert a == b
    assert json.loads((forked / "status.json").read_text())["ok"] is True
    for name in ("sr.dcm", "seg.dcm", "report.dcm"):
        x, y = (pydicom.dcmread(d / "dicom" / name) for d in (forked, direct))
        assert x.SOPInstanceUID == y.SOPInstanceUID and x.SOPClassUID == y.SOPClassUID
    assert read_findings(forked / "dicom" / "sr.dcm") == read_findings(direct / "dicom" / "sr.dcm")
    assert (forked / "key_image.png").read_bytes() == (direct / "key_image.png").read_bytes()
    assert dciodvfy_errors(forked / "dicom" / "sr.dcm") == []


def test_writer_process_failure_is_raised_in_the_parent(graded, tmp_path):
    """Outputs the writer process cannot write fail in the parent with the child's error; a parent that ends
    without a study (a refused one) leaves no writer process behind."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = _writer_process_run(graded, blocker / "out", tmp_path)
    assert res["error"].startswith("the outputs could not be written: ") and "a-file" in res["error"]
    assert not (blocker / "out").exists()
    _wait_gone(res["child"])
    res = _writer_process_run(None, tmp_path / "none", tmp_path)
    assert res["started"] and res["error"] is None
    _wait_gone(res["child"])
    assert not (tmp_path / "none").exists()
