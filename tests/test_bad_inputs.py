"""Bad-input corpus, end to end through ``spinepath run``.

Every kind of bad input is built in a temporary folder from the real example series (copied, then modified with
pydicom) and run through the command line in a subprocess. A refusal must exit with code 2, print one
``error: ...`` line naming the reason, and leave only ``status.json`` (``ok: false`` and the same message) in the
output folder. An accepted input must exit with 0 and write ``status.json`` (``ok: true``) and a
``vertebrae.json`` with at least 5 vertebrae. Never a traceback, never a half-written output, and never the
patient's name or ID in stdout/stderr.

Each CLI run loads the models (about 6 s for a refusal, 15 s for an accepted study on two cores), so several
accepted kinds share one study (one run): the four compressed transfer syntaxes and signed pixels are slices of
one series; stray, truncated, unreadable and duplicate files sit next to one valid series. The accepted studies
use the 7 central slices of the example. The runs needed by the selected tests go two at a time
(``SPINEPATH_TEST_WORKERS``). A few more refusals whose CLI path is the same are checked on the reader only.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import EXAMPLE, REPO, edit_all
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from spinepath.core.config import config_file
from spinepath.core.errors import StudyError
from spinepath.io.dicom import load_study

IDENTIFIERS = ("CHU02",)  # PatientName and PatientID of the example
CENTRAL = [f"IM{i:04d}.dcm" for i in range(7, 14)]  # the 7 central slices (accepted studies)
RULES = json.loads(config_file("series_selection.json").read_text())
T1_REFUSED = "t1" not in RULES.get("main_sequences", [])  # a T1 acquisition is never the main series
TIMEOUT_S = 240
PRIVATE_TS = "1.3.6.1.4.1.99999.1.2.4.1"  # made-up vendor-private transfer syntax
# In the "encodings" study: slice -> how it is stored
ENCODING_OF = {
    "IM0007.dcm": "jpeg_baseline",
    "IM0008.dcm": "jpeg_ls",
    "IM0009.dcm": "jpeg2000",
    "IM0010.dcm": "rle",
    "IM0011.dcm": "signed16",
    "IM0012.dcm": "jpeg_ls",
    "IM0013.dcm": "jpeg2000",
}
# A subprocess prelude hiding every JPEG-LS decoder from pydicom (the "missing decoder" case)
NO_JPEGLS = (
    "import sys, runpy; sys.modules.update(jpeg_ls=None, libjpeg=None, pylibjpeg=None, gdcm=None); "
    "runpy.run_module('spinepath', run_name='__main__', alter_sys=True)"
)


@dataclass(frozen=True)
class Kind:
    """One kind of bad input: the run (study) it is in and the expected outcome."""

    run: str
    reason: str | None = None  # regex the refusal message must match; None: accepted


KINDS = {
    # refusals
    "missing_folder": Kind("missing_folder", r"does not exist"),
    "empty_folder": Kind("empty_folder", r"is empty"),
    "non_dicom_only": Kind("nothing_readable", r"no readable DICOM file \(.*3 non-DICOM or unreadable files"),
    "unreadable_only": Kind("nothing_readable", r"no readable DICOM file \(2 unreadable entries"),
    "truncated_only": Kind("truncated_only", r"no readable DICOM file \(1 truncated"),
    "truncated_slice": Kind("truncated_slice", r"1 truncated or damaged image in the selected series"),
    "ct_study": Kind("ct_study", r"no MR series .*CT"),
    "axial_only_mr": Kind("axial_only_mr", r"no sagittal MR series .*axial"),
    "sagittal_t1_only": Kind("sagittal_t1_only", r"no sagittal T2 series: .*T1 \(spin echo" if T1_REFUSED else None),
    "single_slice": Kind("single_slice", r"single image"),
    "missing_pixel_spacing": Kind("missing_pixel_spacing", r"missing PixelSpacing"),
    "missing_orientation": Kind("missing_orientation", r"missing ImageOrientationPatient"),
    "mixed_matrix": Kind("mixed_matrix", r"mixed matrix sizes"),
    "huge_matrix": Kind("huge_matrix", r"matrix 20000x20000 exceeds the supported maximum"),
    "corrupt_compressed": Kind("corrupt_compressed", r"unreadable pixel data \(JPEG-LS"),
    "missing_decoder": Kind("missing_decoder", r"cannot decode JPEG-LS.*no decoder plugin installed"),
    # accepted
    "jpeg_baseline": Kind("encodings"),
    "jpeg_ls": Kind("encodings"),
    "jpeg2000": Kind("encodings"),
    "rle": Kind("encodings"),
    "signed16": Kind("encodings"),
    "stray_non_dicom": Kind("messy_folder"),
    "truncated_next_to_valid": Kind("messy_folder"),
    "unreadable_files": Kind("messy_folder"),
    "duplicate_instances": Kind("messy_folder"),
    "t1_and_t2": Kind("t1_and_t2"),
}
ACCEPTED_RUNS = {k.run for k in KINDS.values() if k.reason is None}
# More refusals, checked on the reader only (in-process, fast): their CLI path is the one of the refusals above
READER_KINDS = {
    "input_is_a_file": Kind("input_is_a_file", r"not a folder"),
    "duplicate_positions": Kind("duplicate_positions", r"share one slice position"),
    "unsupported_compression": Kind("unsupported_compression", r"unsupported transfer syntax"),
}


# ------------------------------------------------------------------------------------------------ builders
def _copy(dst: Path, names: list[str] | None = None) -> Path:
    dst.mkdir(parents=True)
    for p in sorted(EXAMPLE.glob("*.dcm")):
        if names is None or p.name in names:
            shutil.copy(p, dst / p.name)
    return dst


def _cut(src: Path, dst: Path, n_bytes: int | None = None) -> None:
    """Write the first ``n_bytes`` (default: half) of a file."""
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2 if n_bytes is None else n_bytes])


def _t1(ds) -> None:
    """A sagittal T1 acquisition (spin echo TR 550 TE 11), named so."""
    ds.RepetitionTime, ds.EchoTime, ds.SeriesDescription = 550, 11, "T1_TSE_SAG"


def _new_series(folder: Path, description: str, fn=None) -> None:
    """Turn a copied series into another one (new series and instance UIDs), optionally editing it."""
    uid = generate_uid()

    def edit(ds):
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = description
        if fn is not None:
            fn(ds)

    edit_all(folder, edit)


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_baseline(ds: pydicom.Dataset) -> None:
    """Re-encode as 8-bit JPEG baseline (Pillow), rescaling to 8 bit if needed."""
    from PIL import Image

    arr = ds.pixel_array.astype(np.float64)
    scale = max(1.0, float(arr.max()) / 255.0)
    img = np.clip(np.round(arr / scale), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if scale != 1.0:
        ds.RescaleSlope, ds.RescaleIntercept = scale, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


def _signed16(ds: pydicom.Dataset, offset: int = 100) -> None:
    """Store as signed 16-bit with negative values (stored = value - offset, RescaleIntercept = offset)."""
    arr = ds.pixel_array.astype(np.int32) - offset
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = offset, 1
    ds.PixelData = arr.astype("<i2").tobytes()


def _encode(path: Path, how: str) -> None:
    ds = pydicom.dcmread(str(path))
    if how == "jpeg_baseline":
        _jpeg_baseline(ds)
    elif how in ("jpeg_ls", "jpeg2000", "rle"):
        ts = {"jpeg_ls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless, "rle": RLELossless}[how]
        ds.compress(ts, generate_instance_uid=False)  # same instance: the decoded slice is compared with it
    elif how == "signed16":
        _signed16(ds)
    ds.save_as(str(path))


def _set_encapsulated(path: Path, ts: str, frame: bytes) -> None:
    ds = pydicom.dcmread(str(path))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(str(path), implicit_vr=False, little_endian=True)


def build(run: str, root: Path) -> Path:  # noqa: C901, PLR0912, PLR0915 - one branch per study
    """Build the study of a run under ``root``; return the input path given to ``spinepath run -i``."""
    d = root / run
    if run == "missing_folder":
        return d / "does-not-exist"
    if run == "input_is_a_file":
        _copy(d)
        return d / "IM0010.dcm"
    if run == "empty_folder":
        d.mkdir()
    elif run == "nothing_readable":
        d.mkdir()
        (d / "notes.txt").write_text("not a DICOM file\n")
        (d / "preview.png").write_bytes(_png())
        (d / "empty.dcm").write_bytes(b"")
        os.mkfifo(d / "IM0001.dcm")  # opening it for reading would block forever
        (d / "IM0002.dcm").symlink_to(d / "nowhere.dcm")
        (d / "IM0003.dcm").mkdir()
    elif run == "truncated_only":
        d.mkdir()
        _cut(EXAMPLE / "IM0010.dcm", d / "IM0010.dcm")
    elif run == "truncated_slice":
        _copy(d, CENTRAL)
        _cut(EXAMPLE / "IM0010.dcm", d / "IM0010.dcm")
    elif run == "ct_study":
        edit_all(_copy(d), lambda ds: setattr(ds, "Modality", "CT"))
    elif run == "axial_only_mr":
        _copy(d)
        _new_series(d, "T2_TSE_AX", lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]))
    elif run == "sagittal_t1_only":
        edit_all(_copy(d, CENTRAL), _t1)
    elif run == "single_slice":
        _copy(d, ["IM0010.dcm"])
    elif run == "missing_pixel_spacing":
        edit_all(_copy(d), lambda ds: delattr(ds, "PixelSpacing"))
    elif run == "missing_orientation":
        edit_all(_copy(d), lambda ds: delattr(ds, "ImageOrientationPatient"))
    elif run == "mixed_matrix":
        _copy(d)
        ds = pydicom.dcmread(str(d / "IM0005.dcm"))
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:256, :300]).tobytes()
        ds.Rows, ds.Columns = 256, 300
        ds.save_as(str(d / "IM0005.dcm"))
    elif run == "huge_matrix":
        # the header claims 20000 x 20000 (800 MB per slice decoded): refused from the header, nothing allocated
        edit_all(_copy(d), lambda ds: (setattr(ds, "Rows", 20000), setattr(ds, "Columns", 20000)))
    elif run == "duplicate_positions":
        _copy(d)
        sub = d / "reexport"
        _copy(sub, ["IM0003.dcm", "IM0004.dcm"])

        def new_uids(ds):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()

        edit_all(sub, new_uids)
    elif run == "corrupt_compressed":
        _copy(d, CENTRAL)
        _set_encapsulated(d / "IM0010.dcm", JPEGLSLossless, b"\xff\xd8" + bytes(range(256)) * 8 + b"\xff\xd9")
    elif run == "unsupported_compression":
        _copy(d, CENTRAL)
        for p in sorted(d.glob("*.dcm")):  # a vendor-private compressed transfer syntax: no decoder exists
            _set_encapsulated(p, PRIVATE_TS, b"\x00\x01" + bytes(64))
    elif run == "missing_decoder":
        _copy(d, CENTRAL)
        for p in sorted(d.glob("*.dcm")):
            _encode(p, "jpeg_ls")
    elif run == "encodings":
        _copy(d, CENTRAL)
        for name, how in ENCODING_OF.items():
            _encode(d / name, how)
    elif run == "messy_folder":
        _copy(d / "series", CENTRAL)
        (d / "notes.txt").write_text("not a DICOM file\n")
        (d / "preview.png").write_bytes(_png())
        (d / "empty.dat").write_bytes(b"")
        (d / "stray").mkdir()
        _cut(EXAMPLE / "IM0001.dcm", d / "stray" / "IM0001.dcm", 600)  # header cut short, no series UID left
        _cut(EXAMPLE / "IM0010.dcm", d / "stray" / "IM0010_partial.dcm")  # truncated copy of an intact slice
        _copy(d / "copy", CENTRAL)  # duplicate instances (same SOP instance UIDs)
        os.mkfifo(d / "IM9999.dcm")
        (d / "IM9998.dcm").symlink_to(d / "nowhere.dcm")
        (d / "IM9996.dcm").symlink_to(d / "IM9995.dcm")
        (d / "IM9995.dcm").symlink_to(d / "IM9996.dcm")  # a link loop
        (d / "IM9997.dcm").mkdir()
        locked = d / "locked"
        _copy(locked, ["IM0008.dcm"])
        (locked / "IM0008.dcm").chmod(0)  # unreadable when not root (root reads it: a duplicate either way)
    elif run == "t1_and_t2":
        _copy(d / "t2", CENTRAL)
        _copy(d / "t1", CENTRAL)
        _new_series(d / "t1", "T1_TSE_SAG", _t1)
    else:
        raise KeyError(run)
    return d


# ---------------------------------------------------------------------------------------------- CLI runs
@dataclass
class Run:
    """One ``spinepath run`` of a study."""

    input: Path
    out: Path
    rc: int
    stdout: str
    stderr: str


def _command(run: str, inp: Path, out: Path) -> list[str]:
    args = ["-q", "run", "-i", str(inp), "-o", str(out)]
    if run == "missing_decoder":
        return [sys.executable, "-c", NO_JPEGLS, *args]
    return [sys.executable, "-m", "spinepath", *args]


def _execute(run: str, inp: Path, out: Path, threads: int) -> Run:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "default"}
    try:
        p = subprocess.run(
            _command(run, inp, out), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired as exc:
        return Run(inp, out, -999, str(exc.stdout or ""), f"TIMEOUT after {TIMEOUT_S} s\n{exc.stderr or ''}")
    return Run(inp, out, p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, Run]:
    """Build the studies of the selected tests' kinds and run them through the CLI (two at a time)."""
    wanted = sorted(  # the longer accepted runs first
        {
            KINDS[item.callspec.params["kind"]].run
            for item in request.session.items
            if item.module is request.module and hasattr(item, "callspec") and "kind" in item.callspec.params
        },
        key=lambda r: (r not in ACCEPTED_RUNS, r),
    )
    ref = pydicom.dcmread(str(EXAMPLE / "IM0010.dcm"), stop_before_pixels=True)
    assert {str(ref.PatientName), str(ref.PatientID)} <= set(IDENTIFIERS)
    root = tmp_path_factory.mktemp("bad_inputs")
    inputs = {r: build(r, root / "studies") for r in wanted}
    workers = max(1, int(os.environ.get("SPINEPATH_TEST_WORKERS", "2")))
    threads = max(1, (os.cpu_count() or 2) // workers)
    with ThreadPoolExecutor(workers) as pool:
        futures = {r: pool.submit(_execute, r, inputs[r], root / "out" / r, threads) for r in wanted}
        return {r: f.result() for r, f in futures.items()}


def _describe(r: Run) -> str:
    return f"rc={r.rc}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


def _status(r: Run) -> dict:
    p = r.out / "status.json"
    assert p.is_file(), f"no status.json in the output folder\n{_describe(r)}"
    return json.loads(p.read_text())


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input(kind: str, runs: dict[str, Run]):
    spec = KINDS[kind]
    r = runs[spec.run]
    log = r.stdout + r.stderr
    assert "Traceback" not in log, _describe(r)
    for ident in IDENTIFIERS:
        assert ident not in log, f"patient identifier in the logs\n{_describe(r)}"
    leftovers = [p.name for p in r.out.glob(".partial*")] if r.out.is_dir() else []
    assert not leftovers, f"half-written outputs: {leftovers}"
    status = _status(r)
    assert not any(ident in status["message"] for ident in IDENTIFIERS)
    if spec.reason is not None:  # refused
        assert r.rc == 2, _describe(r)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, _describe(r)
        assert re.search(spec.reason, errors[0]), f"expected /{spec.reason}/\n{_describe(r)}"
        assert status["ok"] is False
        assert status["message"] == errors[0][len("error: "):]
        assert sorted(p.name for p in r.out.iterdir()) == ["status.json"], "result files next to a refusal"
        return
    assert r.rc == 0, _describe(r)
    assert status["ok"] is True, status
    assert all((r.out / f).is_file() for f in ("vertebrae.json", "key_image.png")), list(r.out.iterdir())
    res = json.loads((r.out / "vertebrae.json").read_text())
    assert res["n_vertebrae"] >= 5, res["levels"]
    assert status["n_vertebrae"] == res["n_vertebrae"]
    _check_accepted(kind, r, res)


@pytest.mark.parametrize("reader_kind", list(READER_KINDS))
def test_reader_refuses(reader_kind: str, tmp_path: Path):
    spec = READER_KINDS[reader_kind]
    with pytest.raises(StudyError, match=spec.reason):
        load_study(build(spec.run, tmp_path))


def _check_accepted(kind: str, r: Run, res: dict) -> None:
    """Per-kind checks of an accepted study beyond the CLI outcome (the reader run in-process)."""
    if kind in ("t1_and_t2", "sagittal_t1_only"):
        want = "T2_TSE_SAG" if kind == "t1_and_t2" else "T1_TSE_SAG"
        assert res["input"]["series_description"] == want
        if kind == "t1_and_t2":  # the T1 of the study is recorded for the grading that uses both
            assert res["input"]["series_selection"]["t1"]["series_description"] == "T1_TSE_SAG"
    elif kind in ("duplicate_instances", "truncated_next_to_valid", "unreadable_files", "stray_non_dicom"):
        assert res["input"]["n_slices"] == len(CENTRAL)  # each instance once, stray files ignored
    elif kind in set(ENCODING_OF.values()):
        _check_decoded(kind, r.input)


def _check_decoded(kind: str, folder: Path) -> None:
    """The slices stored as ``kind`` are in that encoding and decode to the original values."""
    ts = {
        "jpeg_baseline": JPEGBaseline8Bit,
        "jpeg_ls": JPEGLSLossless,
        "jpeg2000": JPEG2000Lossless,
        "rle": RLELossless,
        "signed16": pydicom.dcmread(str(EXAMPLE / "IM0010.dcm")).file_meta.TransferSyntaxUID,
    }[kind]
    vol = load_study(folder)
    names = [n for n, how in ENCODING_OF.items() if how == kind]
    for name in names:
        ds = pydicom.dcmread(str(folder / name), stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == ts
        if kind == "signed16":
            assert ds.PixelRepresentation == 1
            assert pydicom.dcmread(str(folder / name)).pixel_array.min() < 0
        ref = pydicom.dcmread(str(EXAMPLE / name))
        got = vol.pixels[vol.sop_instance_uids.index(str(ref.SOPInstanceUID))]
        want = ref.pixel_array.astype(np.float32)
        if kind == "jpeg_baseline":  # lossy
            assert np.abs(got - want).mean() < 2.0
        else:
            np.testing.assert_array_equal(got, want)
