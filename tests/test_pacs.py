"""DICOMweb round trip against a real Orthanc: store a study, fetch it, run the app, store and retrieve the outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest
from conftest import EXAMPLE, REPO
from dicomweb_client import DICOMwebClient
from servers import DICOMWEB_ROOT, free_port, orthanc_url  # noqa: F401  (pytest finds the fixture by name)

from spinepath.io.pacs import PacsError, fetch_study, find_series, find_studies, store_files
from spinepath.outputs.sr import read_findings

SOP_CLASS = {
    "sr.dcm": "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "seg.dcm": "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "report.dcm": "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
}
MODALITY = {"sr.dcm": "SR", "seg.dcm": "SEG", "report.dcm": "DOC"}


@pytest.fixture(scope="module")
def dicomweb(orthanc_url: str) -> str:  # noqa: F811  (the imported fixture)
    return orthanc_url + DICOMWEB_ROOT


@pytest.fixture(scope="module")
def source(dicomweb: str) -> pydicom.Dataset:
    """The example study stored in Orthanc (STOW-RS); returns the header of one of its instances."""
    files = sorted(EXAMPLE.glob("*.dcm"))
    assert files, f"no example study at {EXAMPLE}"
    store_files(dicomweb, files)
    return pydicom.dcmread(files[0], stop_before_pixels=True)


def test_store_and_query(dicomweb, source):
    assert source.StudyInstanceUID in find_studies(dicomweb)
    series = find_series(dicomweb, source.StudyInstanceUID)
    assert [s["SeriesInstanceUID"] for s in series] == [source.SeriesInstanceUID]
    assert series[0]["Modality"] == "MR" and series[0]["SeriesNumber"] == int(source.SeriesNumber)
    assert series[0]["SeriesDescription"] == source.SeriesDescription


def test_fetch_run_store_retrieve(dicomweb, source, tmp_path):
    study = source.StudyInstanceUID
    # WADO-RS: the whole study, as files in a new folder (nothing left beside it)
    fetched = tmp_path / "fetched"
    files = fetch_study(dicomweb, study, fetched)
    assert sorted(files) == sorted(fetched.iterdir()) and list(tmp_path.iterdir()) == [fetched]
    originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in EXAMPLE.glob("*.dcm")}
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files} == originals
    with pytest.raises(FileExistsError):
        fetch_study(dicomweb, study, fetched)

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "spinepath", "-q", "run", "-i", str(fetched), "-o", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    outputs = {name: out / "dicom" / name for name in SOP_CLASS}
    missing = [str(p) for p in outputs.values() if not p.is_file()]
    assert not missing, f"spinepath run wrote no DICOM outputs: {missing}"

    # STOW-RS the outputs back: they join the source study as three new series
    store_files(dicomweb, outputs.values())
    local = {name: pydicom.dcmread(p) for name, p in outputs.items()}
    series = {s["SeriesInstanceUID"]: s for s in find_series(dicomweb, study)}
    assert source.SeriesInstanceUID in series and series[source.SeriesInstanceUID]["Modality"] == "MR"
    for name, ds in local.items():
        assert series[ds.SeriesInstanceUID]["Modality"] == MODALITY[name], name
    assert sorted(s["Modality"] for s in series.values()) == ["DOC", "MR", "SEG", "SR"]

    # WADO-RS each output instance and check what came back
    client = DICOMwebClient(dicomweb)
    back = {name: client.retrieve_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            for name, ds in local.items()}
    for name, ds in back.items():
        assert ds.SOPClassUID == SOP_CLASS[name] and ds.SOPInstanceUID == local[name].SOPInstanceUID, name
        assert ds.StudyInstanceUID == study and ds.Modality == MODALITY[name], name
    seg, sr, pdf = back["seg.dcm"], back["sr.dcm"], back["report.dcm"]
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [source.SeriesInstanceUID]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence
    assert [e.StudyInstanceUID for e in evidence] == [study]
    assert [s.SeriesInstanceUID for s in evidence[0].ReferencedSeriesSequence] == [source.SeriesInstanceUID]
    assert pdf.EncapsulatedDocument == local["report.dcm"].EncapsulatedDocument
    sr_path = tmp_path / "sr_back.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    assert read_findings(sr_path) == read_findings(outputs["sr.dcm"])


def test_errors(dicomweb, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}{DICOMWEB_ROOT}"
    with pytest.raises(PacsError, match=r"QIDO-RS http://127\.0\.0\.1:\d+/dicom-web/studies .*cannot reach") as e:
        find_studies(closed)
    assert e.value.status is None and e.value.path == "/dicom-web/studies"
    with pytest.raises(PacsError, match="cannot reach"):
        store_files(closed, [next(EXAMPLE.glob("*.dcm"))])
    with pytest.raises(PacsError, match=r"/dicom-web/studies/1\.2\.3 failed: HTTP 404") as e:
        fetch_study(dicomweb, "1.2.3", tmp_path / "none")
    assert e.value.status == 404 and list(tmp_path.iterdir()) == []


def test_cli_fetches_runs_and_stores(dicomweb, tmp_path):
    """`spinepath run --dicomweb URL --study UID --store`: the whole loop in one command."""
    other = EXAMPLE.parent / "chu_t2_04"
    files = sorted(other.glob("*.dcm"))
    store_files(dicomweb, files)
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spinepath", "-q", "run", "--dicomweb", dicomweb, "--study", study, "--store",
           "-o", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["input"] == "dicomweb" and res["stored"] == 3
    assert sorted(s["Modality"] for s in find_series(dicomweb, study)) == ["DOC", "MR", "SEG", "SR"]
    bad = subprocess.run([sys.executable, "-m", "spinepath", "-q", "run", "--study", study, "-o", str(tmp_path / "x")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--dicomweb" in bad.stderr
