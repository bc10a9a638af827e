"""MONAI Deploy application: lumbar spine sagittal T2 MRI -> named, graded vertebrae and discs (JSON + key image).

Usage:
    python app.py [-i DICOM_DIR] [-o OUT_DIR] [-m MODEL_DIR]

or with the SDK runtime variables HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH. With no
input at all, the app runs on an embedded default (a real example series from ../shared/data when present,
else a synthetic phantom study) and says which. Bad input gives a one-line error, a non-zero exit and a
``status.json`` with ``ok: false`` in the output folder. NOT FOR DIAGNOSTIC USE.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _explicit(flag_short: str, flag_long: str, env: str, argv: list[str]) -> bool:
    return any(a in (flag_short, flag_long) or a.startswith(flag_long + "=") for a in argv) or bool(os.environ.get(env))


def _arg(argv: list[str], short: str, long: str) -> str | None:
    for i, a in enumerate(argv):
        if a in (short, long) and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(long + "="):
            return a.split("=", 1)[1]
    return None


def _model_dir(argv: list[str]) -> str | None:
    """The model folder given by ``-m`` or ``$HOLOSCAN_MODEL_PATH`` (None: the bundle's)."""
    if not _explicit("-m", "--model", "HOLOSCAN_MODEL_PATH", argv):
        return None
    return _arg(argv, "-m", "--model") or os.environ.get("HOLOSCAN_MODEL_PATH")


from spinepath.core.lean import defer_if_exported, exit_without_teardown, one_study_gc  # noqa: E402
from spinepath.outputs.process import start_writer_process  # noqa: E402

# a one-study process (issue 15: the cold start), before torch is imported: no cyclic garbage collection, and
# the outputs written by a process forked now, which imports and warms up their libraries on the second core
# while this one imports torch and runs the chain
if __name__ == "__main__":
    one_study_gc()
    start_writer_process()

# before the first MONAI import: with the networks exported, MONAI's package __init__ files (every MONAI
# network, torchvision) are not needed
defer_if_exported(_model_dir(sys.argv[1:]))

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402

from operators import (  # noqa: E402
    DegenerationGradingOperator,
    FindingsFusionOperator,
    FindingsReviewOperator,
    ResultsWriterOperator,
    SpineSegmentationOperator,
    StudyLoaderOperator,
    VertebraClassificationOperator,
    VertebraDetectionOperator,
)
from spinepath import DISCLAIMER, __version__  # noqa: E402
from spinepath.core.errors import StudyError  # noqa: E402
from spinepath.core.paths import model_files  # noqa: E402
from spinepath.outputs.status import write_status  # noqa: E402
from spinepath.run import default_input  # noqa: E402


class SpineVertebraApp(Application):
    """Load study -> sagittal T2 (and T1) -> detect/name -> classify -> fuse -> degeneration -> segment -> outputs.

    The degenerative grades use the T2 and, when the study has one, the sagittal T1.
    """

    name = "spinepath-vertebrae"
    description = (
        "Vertebra detection, level naming, per-vertebra pathology and disc grading on lumbar spine sagittal T2 MRI. "
        + DISCLAIMER
    )
    version = __version__

    def settings(self) -> tuple[Path, str, Path, Path, Path, Path, Path]:
        """Input folder and kind, output folder, the model files, from the arguments / SDK variables.

        With no input given, the embedded default (:func:`spinepath.run.default_input`).
        """
        argv = [a for a in self.argv if a]  # holoscan strips the program name (leaves "" when no args)
        ctx = Application.init_app_context([sys.argv[0], *argv])
        out_dir = Path(ctx.output_path)
        if _explicit("-i", "--input", "HOLOSCAN_INPUT_PATH", argv):
            in_dir, kind = Path(ctx.input_path), "dicom"
        else:
            in_dir, kind = default_input(out_dir.parent / ".spinepath-default-input")
        logging.getLogger(__name__).info("input: %s (%s)", kind, "given" if kind == "dicom" else "embedded default")
        model_dir = ctx.model_path if _explicit("-m", "--model", "HOLOSCAN_MODEL_PATH", argv) else None
        return in_dir, kind, out_dir, *model_files(model_dir)

    def compose(self) -> None:
        """Wire the operators: one per stage of :mod:`spinepath.stages`, then the results writer."""
        in_dir, kind, out_dir, model, grader_path, spider_path, seg_path = self.settings()
        self.input_kind = kind
        loader = StudyLoaderOperator(self, CountCondition(self, 1), input_folder=in_dir, name="study_loader")
        detector = VertebraDetectionOperator(self, model_path=model, name="vertebra_detection")
        classifier = VertebraClassificationOperator(self, grader=grader_path, name="classification")
        fusion = FindingsFusionOperator(self, grader=classifier.grader, name="fusion")
        degeneration = DegenerationGradingOperator(self, grader=spider_path, detector=detector.model,
                                                   name="degeneration")
        segmentation = SpineSegmentationOperator(self, model=seg_path, name="segmentation")
        review = FindingsReviewOperator(self, name="review")
        writer = ResultsWriterOperator(self, output_folder=out_dir, input_kind=kind, name="results_writer")
        self.add_flow(loader, detector, {("volume", "volume")})
        self.add_flow(detector, classifier, {("result", "result")})
        self.add_flow(classifier, fusion, {("result", "result"), ("scores", "scores")})
        self.add_flow(fusion, degeneration, {("result", "result")})
        self.add_flow(degeneration, segmentation, {("result", "result")})
        self.add_flow(segmentation, review, {("result", "result")})
        self.add_flow(review, writer, {("result", "result")})

def main(argv: list[str] | None = None) -> int:
    """Run the app; map failures to a one-line message, ``status.json`` and exit code 2."""
    argv = sys.argv if argv is None else argv
    app = SpineVertebraApp(argv)
    out_dir = Path(os.environ.get("HOLOSCAN_OUTPUT_PATH") or _arg(argv, "-o", "--output") or "output")
    try:
        app.run()
    except (StudyError, FileNotFoundError, ValueError) as exc:
        write_status(out_dir, False, str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (out_dir / "status.json").is_file():  # an operator failed inside the executor
        write_status(out_dir, False, "processing failed; see the log")
        print("error: processing failed", file=sys.stderr)
        return 3
    # the DICOM objects this run wrote, as its JSON lists them (not whatever an earlier run left in the folder)
    dicom = json.loads((out_dir / "vertebrae.json").read_text()).get("dicom_outputs") or {}
    print(f"wrote {out_dir / 'vertebrae.json'}, {out_dir / 'key_image.png'}"
          + "".join(f", {out_dir / rel} ({kind})" for kind, rel in dicom.items())
          + f" (input: {getattr(app, 'input_kind', '?')})")
    return 0


if __name__ == "__main__":
    # every output is on disk (atomically, status.json last): the interpreter's teardown is skipped
    exit_without_teardown(main())
