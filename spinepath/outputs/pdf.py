"""PDF report of the findings (matplotlib) and its Encapsulated PDF DICOM object (pydicom).

highdicom has no Encapsulated PDF class; the IOD (PS3.3 A.45.1) is filled here with the patient and study
modules copied from the source series, in a new series of the same study.
"""

from __future__ import annotations

import datetime as dt
import io
import tempfile
import textwrap
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from spinepath import DISCLAIMER, __version__
from spinepath.core.results import DetectionResult, key_slice
from spinepath.outputs.key_image import key_image

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
PDF_SERIES_NUMBER = 903
#: Patient / study attributes copied from the source (type 2 ones are written empty when absent).
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def findings_table(result: DetectionResult) -> list[list[str]]:
    """Rows of the per-level table: level, vertebra finding, P, disc below, grade, P(abnormal), what needs review."""
    f = result.findings
    vert = {v.level: v for v in f.vertebrae} if f is not None else {}
    disc = {d.level.split("-")[0]: d for d in f.discs} if f is not None else {}
    rev = result.review
    rows = []
    for t in result.vertebrae:
        v, d = vert.get(t.level), disc.get(t.level)
        flags = []
        if rev is not None and rev.vertebra(t, result).needs_review:
            flags.append("vertebra")
        if rev is not None and d is not None and rev.discs.get(d.level) is not None and rev.discs[d.level].needs_review:
            flags.append("disc")
        rows.append([
            t.level,
            v.label if v else "not graded",
            f"{v.probability:.2f}" if v else "",
            d.level if d else "",
            f"{d.grade} {d.grade_name}" if d else "",
            f"{d.abnormal_probability:.2f}" if d else "",
            " + ".join(flags),
        ])  # fmt: skip
    return rows


def review_lines(result: DetectionResult, width: int = 110) -> list[str]:
    """The study's review reasons, and each flagged finding's, as report lines."""
    rev = result.review
    if rev is None:
        return []
    out = ["NEEDS REVIEW: " + "; ".join(rev.study.reasons) if rev.study.needs_review else "No study-level concern."]
    for t in result.vertebrae:
        f = rev.vertebra(t, result)
        if f.needs_review:
            out.append(f"{t.level} vertebra: {'; '.join(f.reasons)}")
    for lv, f in rev.discs.items():
        if f.needs_review:
            out.append(f"{lv} disc: {'; '.join(f.reasons)}")
    return [w for line in out for w in textwrap.wrap(line, width)]


def render_pdf(result: DetectionResult, key_png: str | Path | None = None) -> bytes:
    """A one-page A4 PDF: disclaimer, table per level, key image, model versions.

    Args:
        result: The graded detection result.
        key_png: The key image already written by :func:`spinepath.outputs.key_image.key_image`; drawn here when None.

    """
    # matplotlib is imported only where a figure is drawn (Agg backend set first)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen


    with tempfile.TemporaryDirectory() as d:
        if key_png is None:
            key_png = Path(d) / "key.png"
            k = key_image(result, key_png)
        else:
            k = key_slice(result)
        with Image.open(key_png) as im:
            key = np.asarray(im.convert("RGB"))
    fig = plt.figure(figsize=(8.27, 11.69))
    fig.text(0.5, 0.965, "spinepath - lumbar spine MRI findings", ha="center", fontsize=15, weight="bold")
    fig.text(0.5, 0.94, DISCLAIMER, ha="center", fontsize=9, color="#b00000", weight="bold", wrap=True)
    v = result.volume
    fig.text(0.06, 0.915, f"Series: {v.description or '(no description)'} - {v.pixels.shape[0]} slices, "
             f"{v.spacing[0]:.2f} x {v.spacing[1]:.2f} mm", fontsize=8)
    lines = review_lines(result)[:9]
    for i, line in enumerate(lines):
        fig.text(0.06, 0.9 - 0.012 * i, line, fontsize=7, color="#b05000" if i == 0 and "NEEDS" in line else "black")
    top = 0.9 - 0.012 * len(lines)
    ax = fig.add_axes([0.06, 0.56, 0.88, top - 0.57])
    ax.axis("off")
    rows = findings_table(result) or [["-"] * 7]
    tab = ax.table(cellText=rows, colLabels=["Level", "Vertebra", "P(path.)", "Disc below", "Disc grade",
                                              "P(abnormal)", "Review"], loc="upper center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.25)
    for (r, _c), cell in tab.get_celld().items():
        if r > 0 and rows[r - 1][1] == "pathological":
            cell.set_facecolor("#ffe0e0")
        if r > 0 and _c == 6 and rows[r - 1][6]:
            cell.set_facecolor("#fff0c0")
    axk = fig.add_axes([0.15, 0.07, 0.70, 0.46])
    axk.imshow(key)
    axk.set_title(f"Key image: slice {k + 1}", fontsize=9)
    axk.axis("off")
    f = result.findings
    thr = f"{f.vertebrae[0].threshold:.2f}" if f is not None and f.vertebrae else "n/a"
    fig.text(0.06, 0.035, f"spinepath {__version__}; vertebra decision threshold {thr}; disc grades v1 normal, v2 "
             "bulge, v3 protrusion, v4 extrusion, v5 Schmorl's node. Research prototype.", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf")
    plt.close(fig)
    return buf.getvalue()


def build_pdf_dataset(
    result, pdf: bytes | None = None, series_number: int = PDF_SERIES_NUMBER, key_png: str | Path | None = None
) -> pydicom.Dataset:
    """The Encapsulated PDF DICOM object of the report, in a new series of the source study.

    ``pdf`` is rendered by :func:`render_pdf` (with ``key_png``) when not given.

    Raises:
        ValueError: If the series volume has no source headers.

    """
    if not result.volume.datasets:
        raise ValueError("the series volume carries no source DICOM headers")
    src = result.volume.datasets[0]
    pdf = render_pdf(result, key_png) if pdf is None else pdf
    now = dt.datetime.now()
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = src.get("SpecificCharacterSet", "ISO_IR 192")
    for kw in COPIED:
        setattr(ds, kw, src.get(kw, ""))
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = hd.UID()
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = hd.UID()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "spinepath report - NOT FOR DIAGNOSTIC USE"
    ds.Manufacturer = "spinepath"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "spinepath lumbar spine findings (NOT FOR DIAGNOSTIC USE)"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ds.SourceInstanceSequence = [ref]
    data = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocument = data
    ds.EncapsulatedDocumentLength = len(pdf)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def read_pdf(path: str | Path) -> bytes:
    """The PDF bytes of an Encapsulated PDF file (without the even-length padding)."""
    ds = pydicom.dcmread(path)
    data = bytes(ds.EncapsulatedDocument)
    n = int(ds.get("EncapsulatedDocumentLength", len(data)))
    return data[:n]
