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
from spinepath.core.levels import structure_rank
from spinepath.core.results import DetectionResult, key_slice
from spinepath.measurements.spine import SACRAL_BODIES, UNCLEAR_ENDPLATE
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


#: Pfirrmann grades in the words of a report (roman numeral first, as radiologists write them).
PFIRRMANN_SHORT = ("I, homogeneous bright", "II, inhomogeneous bright", "III, grey", "IV, dark grey, lower",
                   "V, black, collapsed")
DEGENERATION_HEADER = ["Disc", "Pfirrmann", "Modic", "Endplate change", "Listhesis", "Herniation", "Narrowing",
                       "Bulging", "Review"]


def _yes_no(g, name: str) -> str:
    p = g.modic_any if name == "modic_any" else g.binary[name]
    return f"suspected ({p:.2f})" if g.positive(name) else "no"


def degeneration_table(result: DetectionResult) -> list[list[str]]:
    """Rows of the degenerative table per disc, top-down (columns :data:`DEGENERATION_HEADER`).

    Pfirrmann grade in words, Modic type, which endplates changed, then listhesis / herniation / narrowing /
    bulging as "suspected (probability)" or "no", and whether the disc needs review.
    """
    f = result.findings
    rev = result.review
    rows = []
    for g in f.degeneration if f is not None else []:
        ends = [w for w, k in (("upper", "upper_endplate_change"), ("lower", "lower_endplate_change")) if g.positive(k)]
        flag = rev.discs.get(g.level) if rev is not None else None
        rows.append([
            g.level,
            PFIRRMANN_SHORT[g.pfirrmann - 1],
            f"type {g.modic_type} ({g.modic_any:.2f})" if g.modic_type else "none",
            " + ".join(ends) or "none",
            *(_yes_no(g, k) for k in ("spondylolisthesis", "herniation", "narrowing", "bulging")),
            "yes" if flag is not None and flag.needs_review else "",
        ])  # fmt: skip
    return rows


MEASUREMENT_HEADER = ["Level", "Heights A / M / P (mm)", "Ratios", "Canal AP (mm)", "Listhesis / height loss",
                      "Flags"]


def measurement_table(result: DetectionResult) -> list[list[str]]:
    """Rows of the measurement table, top-down, each body followed by the disc below it.

    Columns :data:`MEASUREMENT_HEADER`: the three heights, the ratios (wedge and biconcavity of a body; disc
    height index and T2 disc/CSF ratio of a disc), the canal's AP diameter (mid-body or at the disc), the slip
    over the vertebra below and the height loss against the neighbours, and the derived flags. A named body
    that was not measured, or an S1 left out of the lordosis and the slip, says why in the flags column (cut by
    the field of view, partly segmented, superior endplate not told from a wall).
    """
    seg = result.segmentation
    if seg is None:
        return []
    m, flags = seg.measurements, seg.flags()

    def hts(e: dict) -> str:
        return " / ".join(f"{e[p]['mm']:.1f}" if e.get(p) else "-" for p in ("anterior", "middle", "posterior"))

    def mm(x: dict | None) -> str:
        return f"{x['mm']:.1f}" if x else "-"

    rows = []
    skipped = m.get("not_measured", {})
    for lv in sorted(set(m["vertebrae"]) | set(m["discs"]) | set(skipped), key=structure_rank):
        if lv in skipped and lv not in m["vertebrae"]:
            rows.append([f"{lv} body", "not measured", "", "-", "", skipped[lv]])
        elif lv in m["vertebrae"]:
            e = m["vertebrae"][lv]
            slip = next((f"{v['offset_mm']:+.1f} mm ({v['percent']:+.0f}%) over "
                         + ("disc" if v.get("against") == "disc" else k.split("-")[1])
                         for k, v in m["listhesis"].items() if k.split("-")[0] == lv), "")
            loss = f"loss {100 * e['height_loss']:.0f}%" if e.get("height_loss") is not None else ""
            ratios = ", ".join(x for x in (f"wedge {e['wedge_ratio']:.2f}" if "wedge_ratio" in e else "",
                                           f"biconc. {e['biconcavity_ratio']:.2f}" if "biconcavity_ratio" in e
                                           else "") if x)
            fl = flags["vertebrae"].get(lv, []) + [f for k, v in flags["listhesis"].items()
                                                   if k.split("-")[0] == lv for f in v]
            rows.append([f"{lv} body", "not measured (sacrum)" if lv in SACRAL_BODIES else hts(e), ratios,
                         mm(e.get("canal_ap_mid_body")),
                         "; ".join(x for x in (slip, loss) if x), ", ".join(fl)])
        else:
            e = m["discs"][lv]
            ratios = ", ".join(x for x in (f"DHI {e['disc_height_index']:.2f}" if "disc_height_index" in e else "",
                                           f"T2/CSF {e['t2_signal_ratio']:.2f}" if e.get("t2_signal_ratio")
                                           is not None else "") if x)
            rows.append([f"{lv} disc", hts(e), ratios, mm(e.get("canal_ap")), "",
                         ", ".join(flags["discs"].get(lv, []))])
    return rows


def lordosis_note(measurements: dict) -> str:
    """The measurement page's lordosis line: the angle, or why there is none."""
    lord = measurements.get("lordosis_deg")
    if lord is not None:
        return f"Lumbar lordosis (L1 to S1 superior endplates): {lord:.1f} degrees."
    if measurements.get("not_measured", {}).get("S1") == UNCLEAR_ENDPLATE:
        return f"Lumbar lordosis: not measured (S1 segmented, but its {UNCLEAR_ENDPLATE} on this slice)."
    return "Lumbar lordosis: not measured (L1 or S1 not segmented on this slice)."


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


def _table(fig, rect: list[float], rows: list[list[str]], header: list[str], fontsize: float = 7.5,
           widths: list[float] | None = None):
    """A matplotlib table of ``rows`` under ``header`` in the figure rectangle ``rect`` (relative column widths)."""
    ax = fig.add_axes(rect)
    ax.axis("off")
    w = np.asarray(widths or [1.0] * len(header), float)
    tab = ax.table(cellText=rows or [["-"] * len(header)], colLabels=header, loc="upper center", cellLoc="center",
                   colWidths=list(w / w.sum()))
    tab.auto_set_font_size(False)
    tab.set_fontsize(fontsize)
    tab.scale(1, 1.25)
    return tab


def render_pdf(result: DetectionResult, key_png: str | Path | None = None) -> bytes:
    """An A4 PDF: the findings, the measurements (once segmented), then the key image.

    Page 1: disclaimer, review reasons, the table per level, the degenerative table per disc. Then, once
    segmented, the measurement table (:func:`measurement_table`) with the lordosis and the definitions. Last:
    the key image and the software version.

    Args:
        result: The graded detection result.
        key_png: The key image already written by :func:`spinepath.outputs.key_image.key_image`; drawn here when None.

    """
    # matplotlib is imported only where a figure is drawn (Agg backend set first)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen
    from matplotlib.backends.backend_pdf import PdfPages  # two pages: the findings, then the key image

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
    lines = review_lines(result, width=150)[:24]
    for i, line in enumerate(lines):
        fig.text(0.06, 0.9 - 0.0105 * i, line, fontsize=6.5,
                 color="#b05000" if i == 0 and "NEEDS" in line else "black")
    top = 0.895 - 0.0105 * len(lines)
    rows = findings_table(result)
    fig.text(0.06, top - 0.012, "Vertebrae and disc morphology", fontsize=9, weight="bold")
    h1 = 0.0185 * (len(rows) + 1)
    tab = _table(fig, [0.06, top - 0.02 - h1, 0.88, h1], rows, ["Level", "Vertebra", "P(path.)", "Disc below",
                                                                   "Spark grade", "P(abnormal)", "Review"])
    for (r, c), cell in tab.get_celld().items():
        if r > 0 and rows and rows[r - 1][1] == "pathological":
            cell.set_facecolor("#ffe0e0")
        if r > 0 and c == 6 and rows and rows[r - 1][6]:
            cell.set_facecolor("#fff0c0")
    deg = degeneration_table(result)
    y = top - 0.045 - h1
    if deg:
        seq = ", ".join(s.upper() for s in (result.findings.degeneration_model or {}).get("sequences", []))
        fig.text(0.06, y, f"Degenerative findings per disc (from {seq or 'T2'})", fontsize=9, weight="bold")
        h2 = 0.0185 * (len(deg) + 1)
        tab = _table(fig, [0.03, y - 0.008 - h2, 0.94, h2], deg, DEGENERATION_HEADER, fontsize=6.5,
                     widths=[0.7, 1.6, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 0.6])
        for (r, c), cell in tab.get_celld().items():
            if r > 0 and c == 8 and deg[r - 1][8]:
                cell.set_facecolor("#fff0c0")
            if r > 0 and 2 <= c <= 7 and deg[r - 1][c] not in ("none", "no"):
                cell.set_facecolor("#ffe0e0")
        y -= h2 + 0.03
    f = result.findings
    thr = f"{f.vertebrae[0].threshold:.2f}" if f is not None and f.vertebrae else "n/a"
    notes = [f"Vertebra decision threshold {thr}. Spark grades (the earlier disc model): v1 normal, v2 bulge, "
             "v3 protrusion, v4 extrusion, v5 Schmorl's node.",
             "Where a disc has both, its findings are the degenerative ones: on SPIDER's graded discs they rank "
             "herniation, bulging and endplate change better",
             "(a Spark protrusion was a herniation in 7% and a bulge in 82% of them; see the model card).",
             "Degenerative findings: Pfirrmann grade I-V of the nucleus on T2; Modic type of the endplate marrow "
             "(T1 with T2); endplate change includes Schmorl's nodes.",
             "Suspected: probability (in brackets) above a sensitive operating point chosen on out-of-fold data "
             "(maximum balanced accuracy); for the rare",
             "findings (listhesis, herniation) most suspected discs are not confirmed: see the model card. "
             "Research prototype."]
    for i, line in enumerate(notes):
        fig.text(0.06, max(y, 0.08) - 0.012 * i, line, fontsize=6.5)
    pages = [fig]
    meas = measurement_table(result)
    if meas:
        pm = plt.figure(figsize=(8.27, 11.69))
        pm.text(0.5, 0.965, "Measurements", ha="center", fontsize=13, weight="bold")
        pm.text(0.5, 0.945, DISCLAIMER, ha="center", fontsize=8, color="#b00000", weight="bold", wrap=True)
        seg = result.segmentation
        pm.text(0.06, 0.92, f"On the mid-sagittal slice {seg.key_slice + 1} of {v.pixels.shape[0]} "
                "(segmentation network); lines drawn on the key image.", fontsize=8)
        h = 0.0185 * (len(meas) + 1)
        tab = _table(pm, [0.03, 0.905 - h, 0.94, h], meas, MEASUREMENT_HEADER, fontsize=6.5,
                     widths=[0.8, 1.2, 1.3, 0.7, 1.6, 1.7])
        for (r, c), cell in tab.get_celld().items():
            if r > 0 and c == 5 and meas[r - 1][5]:  # a finding; why a body was not measured in review yellow
                cell.set_facecolor("#fff0c0" if meas[r - 1][1] == "not measured" else "#ffe0e0")
        y = 0.88 - h
        notes = [lordosis_note(seg.measurements),
                 "Heights at 15% / 50% / 85% of the depth, across the mean endplate direction. Wedge = anterior / "
                 "posterior; biconcavity = middle / posterior;",
                 "height loss against the neighbours' mean, Genant grade 1 / 2 / 3 from 20 / 25 / 40%. Disc height "
                 "index = middle disc height /",
                 "mean middle height of its two bodies (L5 alone at L5-S1). S1, fused with the sacrum, is not measured "
                 "as a body.",
                 "Disc narrowing flag (L1-L2 to L5-S1): middle height below 75% of its measured neighbouring discs'. "
                 "Canal AP < 10 mm absolute,",
                 "10-12 mm relative stenosis, L1 to L5-S1 (sagittal diameter only: a cross-sectional area needs axial "
                 "images; not graded above L1).",
                 "Listhesis: posterior corners, across the bisector of the two posterior walls; flagged from 3 mm "
                 "(Meyerding grade).",
                 "L5 'over disc': against the L5-S1 disc's lower boundary where S1's body was not segmented; "
                 "reported only (not flagged, not evidence).",
                 "Structures cut by the field of view, and bodies only partly segmented, are not measured. Research "
                 "prototype: see the model card."]
        for i, line in enumerate(notes):
            pm.text(0.06, y - 0.013 * i, line, fontsize=6.5, weight="bold" if i == 0 else "normal")
        pages.append(pm)
    page2 = plt.figure(figsize=(8.27, 11.69))
    page2.text(0.5, 0.965, "Key image", ha="center", fontsize=13, weight="bold")
    page2.text(0.5, 0.945, DISCLAIMER, ha="center", fontsize=8, color="#b00000", weight="bold", wrap=True)
    axk = page2.add_axes([0.05, 0.12, 0.90, 0.80])
    axk.imshow(key)
    axk.set_title(f"slice {k + 1} of {v.pixels.shape[0]}", fontsize=9)
    axk.axis("off")
    # two lines by hand: matplotlib wraps at the page's edge, not at the margin
    page2.text(0.06, 0.07, "Beside each disc: Pfirrmann grade (Pf), Modic type (M) and the degenerative findings "
               "present, orange where one is suspected\n(E endplate change, L listhesis, H herniation, N narrowing, "
               "B bulging); the Spark grade only where the SPIDER grader did not grade the disc.",
               fontsize=7)
    page2.text(0.06, 0.045, f"spinepath {__version__}", fontsize=7)
    buf = io.BytesIO()
    pages.append(page2)
    with PdfPages(buf) as pdf:
        for page in pages:
            pdf.savefig(page)
            plt.close(page)
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
