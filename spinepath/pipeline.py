"""The detection pipeline on a DICOM series and its outputs (JSON + key image)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinepath import DISCLAIMER, __version__
from spinepath.detection import VertebraDetector
from spinepath.dicom_io import SeriesVolume
from spinepath.grouping import Vertebra, group_and_name
from spinepath.labelmap import label_colors

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "bundle" / "models" / "model.pt"
DEFAULT_GRADER = REPO / "bundle" / "models" / "grader.pt"


def _resolve(model: str | Path | None, default: Path, name: str, folder: str) -> Path:
    cand = model or os.environ.get("HOLOSCAN_MODEL_PATH") or default
    p = Path(cand)
    if p.is_dir():
        for sub in (name, f"{folder}/{name}", f"models/{name}"):
            if (p / sub).is_file():
                return p / sub
        return p / name
    return p


def resolve_model_path(model: str | Path | None = None) -> Path:
    """The detector weights: ``model`` (file or folder), else ``$HOLOSCAN_MODEL_PATH``, else the bundle's."""
    return _resolve(model, DEFAULT_MODEL, "model.pt", "detector")


def resolve_grader_path(model: str | Path | None = None) -> Path:
    """The grading model: ``model`` (file or folder), else ``$HOLOSCAN_MODEL_PATH``, else the bundle's."""
    return _resolve(model, DEFAULT_GRADER, "grader.pt", "grading")


@dataclass
class DetectionResult:
    """Vertebrae found in one series, with timings."""

    vertebrae: list[Vertebra]
    volume: SeriesVolume
    timings: dict[str, float]
    input_kind: str = "dicom"
    findings: object | None = None  # spinepath.findings.Findings once graded

    def to_dict(self) -> dict:
        """Return the JSON-ready result.

        Per vertebra: level, name confidence, slice range, per-slice boxes (pixels and patient mm) and scores,
        and, once graded, ``pathology`` (fused probability, label, threshold, per-slice probabilities). Per
        disc (graded only): grade, grade name and class probabilities.
        """
        v = self.volume
        out = []
        graded = {f.level: f for f in self.findings.vertebrae} if self.findings is not None else {}
        for t in self.vertebrae:
            per_slice = []
            for k, b, s, s1 in zip(t.slices, t.boxes, t.scores, t.s1_scores):
                r0, c0, r1, c1 = (float(x) for x in b)
                corners = [v.pixel_to_patient(k, r0 - 0.5, c0 - 0.5), v.pixel_to_patient(k, r1 - 0.5, c1 - 0.5)]
                centre = v.pixel_to_patient(k, (r0 + r1) / 2 - 0.5, (c0 + c1) / 2 - 0.5)
                per_slice.append(
                    {
                        "slice_index": int(k),
                        "sop_instance_uid": v.sop_instance_uids[k],
                        "box_pixels": {"row_min": r0, "col_min": c0, "row_max": r1, "col_max": c1},
                        "box_patient_mm": {
                            "corner_top_anterior": [round(float(x), 2) for x in corners[0]],
                            "corner_bottom_posterior": [round(float(x), 2) for x in corners[1]],
                            "centre": [round(float(x), 2) for x in centre],
                        },
                        "score": round(float(s), 4),
                        "s1_score": round(float(s1), 4),
                    }
                )
            out.append(
                {
                    "level": t.level,
                    "name_confidence": round(t.name_confidence, 4),
                    "score": round(t.score, 4),
                    "slice_range": [int(min(t.slices)), int(max(t.slices))],
                    "n_slices": len(t.slices),
                    "truncated_by_field_of_view": t.truncated,
                    "pathology": graded[t.level].to_dict() if t.level in graded else None,
                    "slices": per_slice,
                }
            )
        extra = {}
        if self.findings is not None:
            extra = {"discs": [d.to_dict() for d in self.findings.discs], "grading_model": self.findings.model}
            self.timings.update(self.findings.timings)
        return {
            "disclaimer": DISCLAIMER,
            "software": {"name": "spinepath", "version": __version__},
            "input": {
                "kind": self.input_kind,
                "study_instance_uid": v.study_uid,
                "series_instance_uid": v.series_uid,
                "series_description": v.description,
                "n_slices": int(v.pixels.shape[0]),
                "matrix": [int(v.pixels.shape[1]), int(v.pixels.shape[2])],
                "pixel_spacing_mm": [float(x) for x in v.spacing],
                "slice_spacing_mm": round(v.slice_spacing, 3),
            },
            "n_vertebrae": len(out),
            "levels": [t.level for t in self.vertebrae],
            "vertebrae": out,
            **extra,
            "timings_s": {k: round(x, 3) for k, x in self.timings.items()},
        }


def detect_series(volume: SeriesVolume, model: VertebraDetector, batch_size: int = 8) -> DetectionResult:
    """Detect, group and name the vertebrae of a sagittal series."""
    t0 = time.perf_counter()
    dets = model.predict(list(volume.pixels), volume.spacing, batch_size=batch_size)
    t1 = time.perf_counter()
    verts = group_and_name(dets, volume.pixels.shape[1:])
    t2 = time.perf_counter()
    return DetectionResult(verts, volume, {"detection": t1 - t0, "grouping": t2 - t1})


#: Key-image colours of vertebra findings and disc grades.
FINDING_COLOURS = {"pathological": (255, 48, 48), "healthy": (64, 220, 64)}
DISC_COLOURS = {"v1": (160, 200, 255), "v2": (255, 220, 64), "v3": (255, 150, 40), "v4": (255, 48, 48),
                "v5": (220, 120, 255)}


def key_slice(result: DetectionResult) -> int:
    """The mid-sagittal slice of the detected spine: the median of the vertebrae's score-weighted slice centres."""
    if not result.vertebrae:
        return result.volume.pixels.shape[0] // 2
    centres = [float(np.average(t.slices, weights=t.scores)) for t in result.vertebrae]
    k = int(round(float(np.median(centres))))
    # prefer a nearby slice where most vertebrae have a box
    cands = range(max(0, k - 1), min(result.volume.pixels.shape[0], k + 2))
    return max(cands, key=lambda j: (sum(t.box_on(j) is not None for t in result.vertebrae), -abs(j - k)))


def key_image(result: DetectionResult, path: str | Path) -> int:
    """Write the key image PNG: the :func:`key_slice` with the vertebrae's boxes and level names drawn.

    Returns:
        The slice index shown.

    """
    from PIL import Image, ImageDraw

    v = result.volume
    k = key_slice(result)
    sl = v.pixels[k]
    lo, hi = np.percentile(sl, [1, 99.5])
    g = np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1)
    scale = max(1, round(512 / max(sl.shape)))
    im = Image.fromarray((g * 255).astype(np.uint8)).convert("RGB")
    im = im.resize((sl.shape[1] * scale, sl.shape[0] * scale), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    colors = label_colors()
    f = result.findings
    graded = {x.level: x for x in f.vertebrae} if f is not None else {}
    discs = {d.level: d for d in f.discs} if f is not None else {}
    centres = {}
    for t in result.vertebrae:
        b = t.box_on(k)
        if b is None:
            continue
        r0, c0, r1, c1 = (float(x) * scale for x in b)
        centres[t.level] = ((r0 + r1) / 2, c0)
        g = graded.get(t.level)
        if g is None:  # not graded: level colour
            col, text = colors.get(t.level, (255, 255, 0)), f"{t.level} {t.name_confidence:.2f}"
        else:  # findings: red pathological, green healthy
            col = FINDING_COLOURS[g.label]
            text = f"{t.level} {'PATH' if g.label == 'pathological' else 'ok'} {g.probability:.2f}"
        draw.rectangle([c0, r0, c1, r1], outline=col, width=3 if g is not None and g.label == "pathological" else 2)
        draw.text((c1 + 4, (r0 + r1) / 2 - 6), text, fill=col)
    for lv, d in discs.items():
        a, b_ = lv.split("-")
        if a in centres and b_ in centres:
            row = (centres[a][0] + centres[b_][0]) / 2
            text = f"{lv} {d.grade_name}"
            # anterior (left) of the bodies, so that disc and vertebra labels never overlap
            col = max(2.0, min(centres[a][1], centres[b_][1]) - 6 - draw.textlength(text))
            draw.text((col, row - 6), text, fill=DISC_COLOURS[d.grade])
    if f is not None:
        draw.text((4, 18), "boxes: red = pathological, green = healthy; discs: grade", fill=(255, 255, 255))
    draw.text((4, 4), "NOT FOR DIAGNOSTIC USE", fill=(255, 170, 0))
    draw.text((4, im.height - 14), f"slice {k + 1}/{v.pixels.shape[0]}  spinepath {__version__}", fill=(255, 255, 255))
    im.save(path)
    return k


def write_dicom_outputs(
    result: DetectionResult, folder: str | Path, key_png: str | Path | None = None
) -> dict[str, str]:
    """Write the DICOM outputs of a graded result into ``folder``.

    ``sr.dcm`` (Comprehensive 3D SR, TID 1500), ``seg.dcm`` (vertebra segmentation) and ``report.dcm``
    (Encapsulated PDF), each a new series of the source study. ``key_png``: the key image already written, for
    the PDF (drawn again when None).

    Returns:
        ``{kind: file name}`` for the JSON.

    """
    from spinepath.outputs.common import write_dataset
    from spinepath.outputs.pdf import build_pdf_dataset
    from spinepath.outputs.seg import build_vertebra_seg
    from spinepath.outputs.sr import build_sr

    folder = Path(folder)
    files = {"sr": "sr.dcm", "seg": "seg.dcm", "pdf_report": "report.dcm"}
    write_dataset(build_sr(result), folder / files["sr"])
    write_dataset(build_vertebra_seg(result), folder / files["seg"])
    write_dataset(build_pdf_dataset(result, key_png=key_png), folder / files["pdf_report"])
    return files


def write_outputs(result: DetectionResult, out_dir: str | Path, dicom: bool | None = None) -> dict:
    """Write ``vertebrae.json``, ``key_image.png`` and the DICOM outputs atomically, then ``status.json``.

    The results go through a temporary folder inside ``out_dir``; ``status.json`` (``ok: true``) is written
    only once all are in place.

    Args:
        result: The detection result (graded when ``findings`` is set).
        out_dir: Output folder.
        dicom: Write ``dicom/{sr,seg,report}.dcm``; by default when the result is graded and the series
            carries its source DICOM headers.

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
            files = write_dicom_outputs(result, tmp / "dicom", tmp / "key_image.png")
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


def write_status(out_dir: str | Path, ok: bool, message: str, **fields: object) -> Path:
    """Write the machine-readable ``status.json`` (ok flag + message) into the output folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = out / "status.json"
    p.write_text(json.dumps({"ok": ok, "message": message, "software_version": __version__, **fields}, indent=1))
    return p


SHARED_EXAMPLES = REPO.parent / "shared" / "data" / "dicom_examples"


def default_input(work_dir: str | Path) -> tuple[Path, str]:
    """Return the embedded default input.

    A real example series when ``../shared/data/dicom_examples`` exists, otherwise the synthetic phantom study
    written into ``work_dir``.

    Returns:
        ``(folder, kind)`` with kind ``"real example (chu_t2_02)"`` or ``"synthetic phantom"``.

    """
    real = SHARED_EXAMPLES / "chu_t2_02"
    if real.is_dir() and any(real.glob("*.dcm")):
        return real, "real example (dicom_examples/chu_t2_02)"
    from spinepath.phantom import write_phantom_study

    return write_phantom_study(Path(work_dir) / "phantom"), "synthetic phantom"


def run_study(
    input_dir: str | Path,
    output_dir: str | Path,
    model: VertebraDetector | str | Path | None = None,
    input_kind: str = "dicom",
    grader=None,
) -> dict:
    """Read a DICOM study, detect and name its vertebrae, grade them, and write the outputs.

    ``grader`` is a :class:`spinepath.grading.Grader` or a path; by default the one beside the detector
    (:func:`resolve_grader_path`).

    Writes ``vertebrae.json``, ``key_image.png`` and ``status.json``. On a refused study only ``status.json``
    (``ok: false``) is written and the error re-raised.

    Returns:
        The JSON result.

    """
    from spinepath.dicom_io import StudyError, load_study
    from spinepath.findings import grade_detections
    from spinepath.grading import Grader

    if not isinstance(grader, Grader):
        near = None  # a detector given as a path: the grader beside it
        if isinstance(model, str | Path):
            near = Path(model).parent if Path(model).is_file() else model
        grader = Grader.load(resolve_grader_path(grader or near))
    if not isinstance(model, VertebraDetector):
        model = VertebraDetector.load(resolve_model_path(model))
    t0 = time.perf_counter()
    try:
        volume = load_study(input_dir)
    except StudyError as exc:
        write_status(output_dir, False, str(exc))
        raise
    t1 = time.perf_counter()
    result = detect_series(volume, model)
    result.input_kind = input_kind
    result.timings = {"load": t1 - t0, **result.timings}
    result.findings = grade_detections(result, grader)
    return write_outputs(result, output_dir)
