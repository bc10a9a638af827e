"""Command-line interface: ``spinepath train|evaluate|run|phantom``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from spinepath import DISCLAIMER, __version__
from spinepath.core.config import config_file

log = logging.getLogger("spinepath")
DEFAULT_TRAIN_CONFIG = config_file("detection_train.json")


class CliError(Exception):
    """An error reported to the user as one line, with a non-zero exit code."""


def _cmd_train(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.detection.network import DetectorConfig
    from spinepath.detection.training import TrainConfig, train

    cfg = json.loads(Path(args.config).read_text())
    tc_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in cfg.get("train", {}).items() if k in tc_fields})
    keys = (
        "data_root",
        "out_dir",
        "epochs",
        "max_minutes",
        "num_threads",
        "max_train_cases",
        "device",
        "init_from",
        "lr",
        "pseudo_t1_from",
        "pseudo_with_t2",
    )
    for k in keys:
        v = getattr(args, k, None)
        if v is not None:
            setattr(tc, k, v)
    tc.quiet = args.quiet
    tc.resume = not args.no_resume
    res = train(tc, DetectorConfig.from_dict(cfg.get("detector", {})))
    print(json.dumps(res))
    return 0


def _options(cls: type, args: argparse.Namespace):
    """An options dataclass from its defaults, overridden by the arguments given (same names) and ``-q``."""
    opts = cls(quiet=args.quiet)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "quiet":
            setattr(opts, f.name, v)
    return opts


def _cmd_train_pretrain(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.grading.pretraining import PretrainConfig, pretrain

    res = pretrain(_options(PretrainConfig, args))
    print(json.dumps({k: v for k, v in res.items() if k != "history"} | {"final_loss": res["history"][-1]["loss"]}))
    return 0


def _cmd_train_grading(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.grading.training import GradingTrainConfig, refit_fusion, train_grading

    if args.refit_fusion:
        print(json.dumps(refit_fusion(args.out_dir or GradingTrainConfig.out_dir)))
        return 0
    res = train_grading(_options(GradingTrainConfig, args))
    print(json.dumps({k: v for k, v in res.items() if k != "histories"}))
    return 0


def _cmd_train_spider(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.grading.spider_training import SpiderTrainConfig, combine_runs, train_spider

    tc = _options(SpiderTrainConfig, args)
    if args.combine:
        summary = combine_runs(args.combine, args.out_dir or "runs/spider_combined", tc.data_root)
        print(json.dumps({k: summary[k] for k in ("spider_grader", "levels", "combined", "oof")}))
        return 0
    print(json.dumps(train_spider(tc)))
    return 0


def _cmd_train_segmentation(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.core.paths import SHARED_EXAMPLES
    from spinepath.segmentation.network import SegNetConfig
    from spinepath.segmentation.training import combine_segmenters, train_segmentation

    data_root = args.data_root or SHARED_EXAMPLES.parent
    if args.combine:
        try:
            res = combine_segmenters(args.combine, args.out_dir, data_root, max_cases=args.max_cases or 0,
                                     num_threads=args.num_threads or 0)
        except (ValueError, FileNotFoundError) as exc:
            raise CliError(str(exc)) from None
        print(json.dumps(res))
        return 0
    cfg = SegNetConfig(**{k: v for k, v in (("epochs", args.epochs), ("patch", args.patch),
                                             ("batch_size", args.batch_size), ("lr", args.lr),
                                             ("seed", args.seed)) if v is not None},
                       sacrum_unknown=args.sacrum_unknown)
    res = train_segmentation(data_root, args.out_dir, cfg, step=args.step,
                             max_cases=args.max_cases or 0, num_threads=args.num_threads or 0,
                             progress=not args.quiet, init_from=args.init_from, pack=args.pack,
                             device=args.device, workers=args.workers, time_budget_min=args.time_budget or 0.0,
                             resume=args.resume)
    print(json.dumps({k: v for k, v in res.items() if k != "history"}))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.grading.search import PARAMS_FILE, run_search

    res = run_search(
        args.task,
        args.trials,
        storage=args.storage,
        study_name=args.study,
        data_root=args.data_root,
        max_epochs=args.max_epochs,
        max_cases=args.max_cases,
        save=not args.no_save,
        params_file=args.params_file or PARAMS_FILE,
        seed=args.seed,
        progress=not args.quiet,
        num_threads=args.num_threads,
    )
    print(json.dumps(res))
    return 0


def _enqueued(text: str | None) -> list[dict]:
    """``--enqueue``: one JSON object of parameters or a list of them."""
    if not text:
        return []
    try:
        v = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--enqueue is not JSON: {exc}") from exc
    v = v if isinstance(v, list) else [v]
    if not all(isinstance(x, dict) for x in v):
        raise CliError("--enqueue takes a JSON object of parameters or a list of objects")
    return v


def _cmd_search_spider(args: argparse.Namespace) -> int:
    enqueue = _enqueued(args.enqueue)  # a bad option fails before the imports
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.grading.spider_training import SPIDER_PARAMS, run_spider_search

    res = run_spider_search(args.trials, storage=args.storage, study_name=args.study or "spider",
                            data_root=args.data_root, detector=args.detector or "", max_patients=args.max_patients,
                            save=not args.no_save, params_file=args.params_file or SPIDER_PARAMS, seed=args.seed,
                            progress=not args.quiet, num_threads=args.num_threads, max_epochs=args.max_epochs,
                            scored_folds=args.scored_folds, enqueue=enqueue, device=args.device,
                            workers=args.workers, **({"models": tuple(args.models.split(","))} if args.models else {}))
    print(json.dumps(res))
    return 0


def _print_json(res: dict, out: str | None) -> None:
    """Print an evaluation result as JSON, and also write it to ``out`` when given."""
    text = json.dumps(res, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)


def _evaluation_cases(root: Path, split: str) -> list[str] | None:
    """The cases of ``--split``: by default the validation and the unseen cases (a held-out folder's), or all."""
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.data.split import evaluation_cases

    if split != "val":
        return None
    cases, left_out = evaluation_cases(root)
    if not cases:
        raise CliError(f"{root}: every case of this folder is a training or selection case of the split "
                       "(configs/split.json); use --split all to score them anyway")
    if left_out:
        log.info("%d of %d cases of %s are training or selection cases of the split: left out (--split all "
                 "scores them)", left_out, left_out + len(cases), root.name)
    return cases


def _report(res: dict, root: Path, args: argparse.Namespace) -> int:
    """Print (and with ``--out`` write) an evaluation's JSON with the folder name and split; exit code 0."""
    res["dataset"] = root.name
    res["split"] = args.split
    _print_json(res, args.out)
    return 0


def _cmd_evaluate_grading(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.core.paths import resolve_grader_path, resolve_model_path
    from spinepath.data.datasets import dataset_kind
    from spinepath.detection.predictor import VertebraDetector
    from spinepath.evaluation.grading import evaluate_grading
    from spinepath.grading.grader import Grader

    root = Path(args.dataset_dir)
    try:
        if dataset_kind(root) != "spark":
            raise CliError(f"{root}: grading needs a spark_midsag-format folder (labels.json with grades)")
        grader = Grader.load(resolve_grader_path(args.grader))
        detector = None if args.from_reference_locations else VertebraDetector.load(resolve_model_path(args.model))
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    res = evaluate_grading(root, grader, detector, cases=_evaluation_cases(root, args.split), progress=not args.quiet)
    return _report(res, root, args)


def _cmd_evaluate_segmentation(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.core.paths import resolve_model_path, resolve_segmentation_path
    from spinepath.data.datasets import dataset_kind
    from spinepath.detection.predictor import VertebraDetector
    from spinepath.evaluation.segmentation import evaluate_segmentation
    from spinepath.segmentation.inference import load_segmenter

    root = Path(args.dataset_dir)
    try:
        if dataset_kind(root) not in ("spider_seg", "volumes"):
            raise CliError(f"{root}: segmentation needs a spider_seg or 3D mask folder (index.json with masks)")
        model = load_segmenter(resolve_segmentation_path(args.seg_model))
        # the detector estimates the spacing of a case whose folder gives none (loaded only then)
        detector = VertebraDetector.load(resolve_model_path(args.model)) if args.model else None
        res = evaluate_segmentation(root, model, cases=_evaluation_cases(root, args.split),
                                    progress=not args.quiet, detector=detector)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    return _report(res, root, args)


def _cmd_evaluate_spider(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.core.paths import resolve_grader_path, resolve_model_path, resolve_spider_grader_path
    from spinepath.data.datasets import dataset_kind
    from spinepath.detection.predictor import VertebraDetector
    from spinepath.evaluation.spider import evaluate_spider
    from spinepath.grading.grader import Grader
    from spinepath.grading.spider import SpiderGrader
    from spinepath.stages import load_segmenter

    root = Path(args.dataset_dir)
    seqs = tuple(s.strip().lower() for s in args.sequences.split(",") if s.strip())
    if not seqs or any(s not in ("t1", "t2") for s in seqs):
        raise CliError(f"--sequences {args.sequences!r}: expected t1,t2 or t2 or t1")
    try:
        if dataset_kind(root) != "spider_midsag":
            raise CliError(f"{root}: SPIDER grading needs a spider_midsag-format folder (labels.json with discs)")
        grader = SpiderGrader.load(resolve_spider_grader_path(args.grader))
        detector = VertebraDetector.load(resolve_model_path(args.model))
        # the product's spark grader: the per-vertebra decision combines its score with the SPIDER evidence
        spark = Grader.load(resolve_grader_path())
        # and its segmentation: the spondylolisthesis decision combines the image with the measured slip
        segmenter = load_segmenter()
        res = evaluate_spider(root, detector, grader, cases=_evaluation_cases(root, args.split), sequences=seqs,
                              bootstrap=args.bootstrap, progress=not args.quiet, spark_grader=spark,
                              segmenter=segmenter)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    return _report(res, root, args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.core.paths import resolve_model_path
    from spinepath.data.datasets import dataset_kind
    from spinepath.detection.predictor import VertebraDetector
    from spinepath.evaluation.detection import evaluate_detection

    root = Path(args.dataset_dir)
    try:
        if dataset_kind(root) == "spider_midsag":
            raise CliError(f"{root}: spider_midsag has no locations to score detection on; use a spider_seg folder "
                           "(its disc grades are scored by the grading evaluation)")
        model = VertebraDetector.load(resolve_model_path(args.model))
        res = evaluate_detection(root, model, cases=_evaluation_cases(root, args.split), progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    return _report(res, root, args)


def _cmd_run(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    import tempfile

    from spinepath.core.errors import StudyError
    from spinepath.io.pacs import PacsError, fetch_study, store_files
    from spinepath.run import default_input, run_study

    if args.dicomweb and args.input:
        raise CliError("give either -i/--input or --dicomweb, not both")
    if (args.study or args.store) and not args.dicomweb:
        raise CliError("--study and --store need --dicomweb")
    if args.dicomweb and not args.study:
        raise CliError("--dicomweb needs --study (the StudyInstanceUID to fetch)")
    stored = None
    with tempfile.TemporaryDirectory(prefix="spinepath-fetch-") as tmp:
        try:
            if args.dicomweb:
                in_dir, kind = Path(tmp) / "study", "dicomweb"
                fetch_study(args.dicomweb, args.study, in_dir)
            elif args.input:
                in_dir, kind = Path(args.input), "dicom"
            else:
                in_dir, kind = default_input(Path(args.output).parent / ".spinepath-default-input")
            res = run_study(in_dir, args.output, args.model, input_kind=kind, grader=args.grader)
            if args.store:
                files = sorted((Path(args.output) / "dicom").glob("*.dcm"))
                store_files(args.dicomweb, files)
                stored = len(files)
        except (StudyError, PacsError, FileNotFoundError, FileExistsError, ValueError) as exc:
            raise CliError(str(exc)) from None
    out = {"input": kind, "levels": res["levels"], "output": str(args.output)}
    if stored is not None:
        out["stored"] = stored
    print(json.dumps(out))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.core.exported import export_meta
    from spinepath.core.paths import model_files

    try:
        paths = model_files(args.model_dir)
        if not args.force and all(export_meta(p) is not None for p in paths):  # current: no network code loaded
            print(json.dumps({p.name: "current" for p in paths}))
            return 0
        from spinepath.stages import export_models  # the network code, only when something is to be exported

        print(json.dumps(export_models(args.model_dir, force=args.force)))
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.batch import BatchError, BatchOptions, ModelPaths, parse_query, run_batch
    from spinepath.io.pacs import PacsError

    if args.query and not args.dicomweb:
        raise CliError("--query needs --dicomweb")
    if args.no_store and not args.dicomweb:
        raise CliError("--no-store needs --dicomweb")
    if args.workers is not None and args.workers < 1:
        raise CliError("--workers must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise CliError("--threads must be at least 1")
    try:
        query = parse_query(args.query)
        opts = BatchOptions(out=args.out, folder=args.folder, dicomweb=args.dicomweb, query=query,
                            store=not args.no_store, workers=args.workers or 2, scheduler=args.scheduler,
                            threads=args.threads, models=ModelPaths(args.model, args.grader), progress=not args.quiet)
        res = run_batch(opts)
    except (BatchError, PacsError, ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    if "message" in res:
        print(res["message"])
    print(json.dumps(res))
    return 1 if res["failed"] else 0


def _cmd_worker(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.core.lean import defer_if_exported

    defer_if_exported(args.model)  # before MONAI is imported: a warm worker starts faster too
    # after the import hook
    from spinepath.service.queue import StudyQueue
    from spinepath.service.worker import Worker, WorkerModels

    queue = StudyQueue(args.queue)
    if args.status:
        print(json.dumps(queue.counts()))
        return 0
    if not args.dicomweb:
        raise CliError("--dicomweb is required (the PACS's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web)")
    try:
        models = WorkerModels.load(args.model)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    n = Worker(args.dicomweb, queue, models).run(poll=args.poll, idle_exit=args.idle_exit)
    print(json.dumps({"processed": n, **queue.counts()}))
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    # imported per subcommand: each loads only what it runs, so `spinepath --help` stays fast
    from spinepath.io.phantom import write_phantom_study

    print(write_phantom_study(args.output, seed=args.seed))
    return 0


def _evaluation_args(p: argparse.ArgumentParser, dataset_help: str) -> None:
    p.add_argument("dataset_dir", help=dataset_help)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--model", help="detector weights (file or folder); default: the bundle's")
    p.add_argument("--split", choices=["val", "all"], default="val",
                   help="the cases no model learned from or was chosen on (default: the validation part of "
                   "configs/split.json, by patient, and every case the split does not list, e.g. a held-out "
                   "folder's), or all cases (training images included)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spinepath`` command."""
    p = argparse.ArgumentParser(prog="spinepath", description=f"spinepath {__version__}. {DISCLAIMER}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    # the same flag after the subcommand; SUPPRESS keeps the value given before it when absent here
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars, warnings only")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model")
    tsub = t.add_subparsers(dest="what", required=True)
    td = tsub.add_parser("detection", help="train the vertebral-body detector", parents=[quiet])
    td.add_argument("--config", default=str(DEFAULT_TRAIN_CONFIG))
    td.add_argument("--data-root", dest="data_root")
    td.add_argument("--out-dir", dest="out_dir")
    td.add_argument("--epochs", type=int)
    td.add_argument("--max-minutes", dest="max_minutes", type=float)
    td.add_argument("--max-train-cases", dest="max_train_cases", type=int, help="tiny subset (tests)")
    td.add_argument("--num-threads", dest="num_threads", type=int)
    td.add_argument("--device")
    td.add_argument("--init-from", dest="init_from", help="fine-tune from these detector weights")
    td.add_argument("--lr", type=float)
    td.add_argument("--pseudo-t1-from", dest="pseudo_t1_from",
                    help="add spider_midsag T1 images labelled with these weights' T2 boxes (where T1 and T2 agree)")
    td.add_argument("--pseudo-with-t2", dest="pseudo_with_t2", action="store_true", default=None,
                    help="with --pseudo-t1-from: the same patients' T2 images with those boxes too")
    td.add_argument("--no-resume", action="store_true")
    td.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a model on a dataset folder; prints JSON")
    esub = e.add_subparsers(dest="what", required=True)
    ed = esub.add_parser("detection", help="vertebral-body detection and level naming", parents=[quiet])
    _evaluation_args(ed, "a folder in the ../shared/data format (index.json or labels.json)")
    ed.set_defaults(func=_cmd_evaluate)
    eg = esub.add_parser("grading", help="vertebra pathology and disc grades (spark_midsag format)", parents=[quiet])
    _evaluation_args(eg, "a folder in the spark_midsag format (labels.json with grades)")
    eg.add_argument("--from-reference-locations", action="store_true",
                    help="crop at the reference centres instead of running detection")
    eg.add_argument("--grader", help="grading model (file or folder); default: the bundle's")
    eg.set_defaults(func=_cmd_evaluate_grading)
    es = esub.add_parser("spider", parents=[quiet],
                         help="SPIDER disc grades and per-vertebra pathology (spider_midsag format), end to end")
    _evaluation_args(es, "a folder in the spider_midsag format (labels.json with graded discs)")
    es.add_argument("--sequences", default="t1,t2", help="t1,t2 (default: both where present), t2 or t1")
    es.add_argument("--grader", help="SPIDER grader (file or folder); default: the bundle's spider_grader.pt")
    es.add_argument("--bootstrap", type=int, default=0, help="95%% intervals from this many patient resamples")
    es.set_defaults(func=_cmd_evaluate_spider)
    eseg = esub.add_parser("segmentation", parents=[quiet],
                           help="Dice per class and measurement agreement (spider_seg or 3D mask folders)")
    # its --model: the detector that estimates a spider_seg case's pixel spacing where the folder gives none
    _evaluation_args(eseg, "a spider_seg-format folder or a 3D mask folder (chu_t2, spineweb_vb, ivd_t2)")
    eseg.add_argument("--seg-model", dest="seg_model",
                      help="segmentation model (file or folder); default: the bundle's segmentation.pt")
    eseg.set_defaults(func=_cmd_evaluate_segmentation)

    tg = tsub.add_parser("grading", parents=[quiet],
                         help="train the grading classifiers (cross-validated) and the fusion model")
    tg.add_argument("--data-root", dest="data_root")
    tg.add_argument("--out-dir", dest="out_dir")
    tg.add_argument("--params-file", dest="params_file", help="searched parameters (configs/grading_params.json)")
    tg.add_argument("--detector", help="detector weights for the end-to-end out-of-fold runs")
    tg.add_argument("--folds", type=int)
    tg.add_argument("--views", type=int, help="pseudo-slice views per structure")
    tg.add_argument("--epochs", type=int, help="override the searched epochs (quick runs)")
    tg.add_argument("--max-train-cases", dest="max_train_cases", type=int, help="tiny subset (tests)")
    tg.add_argument("--num-threads", dest="num_threads", type=int)
    tg.add_argument("--seed", type=int)
    tg.add_argument("--init", help="pretrained backbone (spinepath train pretrain) for both classifiers")
    tg.add_argument("--ensemble", choices=["final", "folds+final"],
                    help="saved networks: the final model only, or it plus the fold models (averaged)")
    tg.add_argument("--refit-fusion", action="store_true",
                    help="only refit the fusion model from --out-dir's saved out-of-fold features")
    tg.set_defaults(func=_cmd_train_grading)
    ts = tsub.add_parser("spider", parents=[quiet],
                         help="SPIDER disc grading: multi-task network per disc crop (T1, T2), level fusion")
    ts.add_argument("--data-root", dest="data_root")
    ts.add_argument("--out-dir", dest="out_dir")
    ts.add_argument("--params-file", dest="params_file", help="network parameters (configs/spider_params.json)")
    ts.add_argument("--detector", help="detector weights that find the discs (default: the bundle's)")
    ts.add_argument("--folds", type=int)
    ts.add_argument("--epochs", type=int, help="override the stored epochs (quick runs)")
    ts.add_argument("--max-patients", dest="max_patients", type=int, help="tiny subset (tests)")
    ts.add_argument("--num-threads", dest="num_threads", type=int)
    ts.add_argument("--device", help="torch device the fold networks train on (cpu, cuda; default cpu)")
    ts.add_argument("--workers", type=int, help="data-loader processes for the crops (default 0: reproducible)")
    ts.add_argument("--combine", nargs="+", metavar="RUN",
                    help="no training: one grader from these runs' fold networks (averaged), its fusion refitted "
                         "on their averaged out-of-fold table, written to --out-dir")
    ts.add_argument("--init", help="self-supervised backbone (spinepath train pretrain --model resnet18_narrow) "
                                   "the fold networks start from (default: the params file's, random)")
    ts.add_argument("--distill", nargs="+", metavar="RUN",
                    help="knowledge distillation: each fold network also learns the mean probabilities of these "
                         "training runs' network of the same fold (on the same augmented crops)")
    ts.add_argument("--distill-weight", dest="distill_weight", type=float,
                    help="the teachers' share of the loss (default 0.5; the labels' is the rest)")
    ts.set_defaults(func=_cmd_train_spider)
    tsg = tsub.add_parser("segmentation", parents=[quiet],
                          help="segmentation of bodies, posterior elements, discs and canal (partial labels, "
                               "best epoch on the selection split)")
    tsg.add_argument("--data-root", dest="data_root")
    tsg.add_argument("--out-dir", dest="out_dir", default="runs/segmentation")
    tsg.add_argument("--epochs", type=int)
    tsg.add_argument("--patch", type=int, help="training patch size (grid pixels)")
    tsg.add_argument("--batch-size", dest="batch_size", type=int)
    tsg.add_argument("--step", type=int, default=2, help="every N-th lateral slice of the 3D volumes")
    tsg.add_argument("--max-cases", dest="max_cases", type=int, help="at most N cases per source (quick runs)")
    tsg.add_argument("--num-threads", dest="num_threads", type=int)
    tsg.add_argument("--lr", type=float, help="peak learning rate")
    tsg.add_argument("--seed", type=int, help="seed of the initialisation, the batches and the augmentation")
    tsg.add_argument("--init-from", dest="init_from",
                     help="fine-tune these weights (a second cosine cycle) instead of a random initialisation")
    tsg.add_argument("--pack", help="read the training and selection slices from this pack "
                                    "(scripts/pack_segmentation_slices.py) instead of the data folder")
    tsg.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    tsg.add_argument("--workers", type=int, default=0,
                     help="data-loader processes for the augmentation (0: in-process, reproducible)")
    tsg.add_argument("--time-budget", dest="time_budget", type=float,
                     help="minutes: cut the epochs (and the cosine schedule) to those that fit")
    tsg.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in OUT_DIR (its last.pt) with the same settings")
    tsg.add_argument("--sacrum-unknown", dest="sacrum_unknown", action="store_true",
                     help="below the labelled spine of spider_seg and chu_t2 (which leave the sacrum unlabelled), "
                          "unlabelled pixels are left out of the loss instead of teaching 'S1 is no body'")
    tsg.add_argument("--combine", nargs="+", metavar="MODEL",
                     help="instead of training: one model of these trained networks (the mean of their logits), "
                          "scored on the selection split, written to OUT_DIR/segmentation.pt")
    tsg.set_defaults(func=_cmd_train_segmentation)
    tp = tsub.add_parser("pretrain", parents=[quiet],
                         help="self-supervised (SimCLR) pretraining of the grading backbone")
    tp.add_argument("--data-root", dest="data_root")
    tp.add_argument("--out", help="backbone file (default runs/pretrain/backbone.pt)")
    tp.add_argument("--model", help="backbone: a ConvNeXt size (default convnext_atto, the spark classifiers') "
                                    "or a MONAI ResNet (resnet18_narrow: the SPIDER grader's)")
    tp.add_argument("--crop-mm", dest="crop_mm", type=float, help="crop side in mm (default 84; SPIDER: 64)")
    tp.add_argument("--intensity-strength", dest="intensity_strength", type=float,
                    help="scale of the views' intensity augmentation (default 1; lower keeps the signal "
                         "intensity a feature: Pfirrmann grades it)")
    tp.add_argument("--device", help="torch device the network trains on (cpu, cuda; default cpu)")
    tp.add_argument("--spider", action="store_true", default=None,
                    help="also the spider_midsag training + selection images, at the discs the product finds")
    tp.add_argument("--epochs", type=int)
    tp.add_argument("--crops-per-epoch", dest="crops_per_epoch", type=int)
    tp.add_argument("--batch-size", dest="batch_size", type=int)
    tp.add_argument("--max-minutes", dest="max_minutes", type=float)
    tp.add_argument("--num-threads", dest="num_threads", type=int)
    tp.add_argument("--seed", type=int)
    tp.add_argument("--workers", type=int, help="processes cutting the views (default 0: in-process, reproducible)")
    tp.add_argument("--time-budget", dest="time_budget", type=float,
                    help="minutes: cut the epochs (and the cosine schedule) to those that fit, timed on the second")
    tp.add_argument("--pack", help="read the unlabelled images from this pack (scripts/pack_pretrain_images.py) "
                                   "instead of the data folder")
    tp.set_defaults(func=_cmd_train_pretrain)

    s = sub.add_parser("search", help="Optuna hyper-parameter search")
    ssub = s.add_subparsers(dest="what", required=True)
    sg = ssub.add_parser("grading", help="search the grading classifier's hyper-parameters", parents=[quiet])
    sg.add_argument("--task", choices=["vertebra", "disc"], required=True)
    sg.add_argument("--trials", type=int, default=20, help="trials run by this worker")
    sg.add_argument("--storage", help="Optuna storage URL (default sqlite:///runs/search/<task>.db); "
                    "postgresql://user@host/db lets several workers share a study")
    sg.add_argument("--study", help="study name (default grading-<task>)")
    sg.add_argument("--data-root", dest="data_root", default="../shared/data")
    sg.add_argument("--max-epochs", dest="max_epochs", type=int, default=45)
    sg.add_argument("--max-cases", dest="max_cases", type=int, default=0, help="tiny subset (tests)")
    sg.add_argument("--params-file", dest="params_file", help="where the best parameters go")
    sg.add_argument("--no-save", action="store_true", help="do not store the best parameters")
    sg.add_argument("--seed", type=int, help="sampler seed (default random: parallel workers differ)")
    sg.add_argument("--num-threads", dest="num_threads", type=int, default=0,
                    help="torch threads per worker (use 1 with several workers on one machine)")
    sg.set_defaults(func=_cmd_search)
    ss = ssub.add_parser("spider", help="search the SPIDER multi-task network's hyper-parameters", parents=[quiet])
    ss.add_argument("--trials", type=int, default=10, help="trials run by this worker")
    ss.add_argument("--storage", help="Optuna storage URL (default sqlite:///runs/search/spider.db); "
                    "postgresql://user@host/db lets several workers share a study")
    ss.add_argument("--study", help="study name (default spider)")
    ss.add_argument("--models", help="comma-separated architectures to choose among (default: "
                    "resnet10_narrow,resnet18_narrow,convnext_zepto,convnext_atto)")
    ss.add_argument("--max-epochs", dest="max_epochs", type=int, default=40, help="upper bound of the epochs searched")
    ss.add_argument("--scored-folds", dest="scored_folds", type=int, default=1, choices=range(1, 6), metavar="N",
                    help="score each trial on the mean of the first N of the 5 folds (default 1; 5 on a GPU)")
    ss.add_argument("--enqueue", help="parameters tried first: a JSON object or a list of them, e.g. "
                    "'{\"model\": \"resnet18_narrow\", \"epochs\": 30}' (what it does not name keeps the stored value "
                    "where the search space has it, else is sampled)")
    ss.add_argument("--data-root", dest="data_root", default="../shared/data")
    ss.add_argument("--detector", help="detector weights that find the discs (default: the bundle's)")
    ss.add_argument("--max-patients", dest="max_patients", type=int, default=0, help="tiny subset (tests)")
    ss.add_argument("--params-file", dest="params_file", help="where the best parameters go")
    ss.add_argument("--no-save", action="store_true", help="do not store the best parameters")
    ss.add_argument("--seed", type=int, help="sampler seed (default random: parallel workers differ)")
    ss.add_argument("--num-threads", dest="num_threads", type=int, default=0,
                    help="torch threads per worker (use 1 with several workers on one machine)")
    ss.add_argument("--device", default="cpu", help="torch device the trial networks train on (cpu, cuda)")
    ss.add_argument("--workers", type=int, default=0, help="data-loader processes for the crops")
    ss.set_defaults(func=_cmd_search_spider)
    r = sub.add_parser("run", parents=[quiet],
                       help="run detection and grading on a DICOM study folder without Holoscan")
    r.add_argument("-i", "--input", help="DICOM study folder; default: the embedded example/phantom")
    r.add_argument("-o", "--output", default="output")
    r.add_argument("-m", "--model", help="detector weights (file or folder)")
    r.add_argument("--grader", help="grading model (file or folder); default: grader.pt beside the detector")
    r.add_argument("--dicomweb", metavar="URL", help="DICOMweb root (e.g. http://pacs:8042/dicom-web): fetch --study")
    r.add_argument("--study", metavar="UID", help="StudyInstanceUID to fetch (with --dicomweb)")
    r.add_argument("--store", action="store_true", help="store the DICOM outputs back (STOW-RS) to --dicomweb")
    r.set_defaults(func=_cmd_run)

    x = sub.add_parser("export", parents=[quiet],
                       help="export the networks to TorchScript beside their weights (<name>.ts; a faster cold start)")
    x.add_argument("--model-dir", dest="model_dir", help="folder of the four .pt files; default: the bundle's")
    x.add_argument("--force", action="store_true", help="export again even when the export is current")
    x.set_defaults(func=_cmd_export)

    b = sub.add_parser("batch", parents=[quiet],
                       help="run every study of a DICOMweb query or of a folder on a Dask cluster, each once")
    bsrc = b.add_mutually_exclusive_group(required=True)
    bsrc.add_argument("--folder", metavar="DIR", help="a folder with one sub-folder per study")
    bsrc.add_argument("--dicomweb", metavar="URL", help="DICOMweb root (e.g. http://pacs:8042/dicom-web)")
    b.add_argument("--query", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="QIDO-RS study matching key (repeatable), e.g. ModalitiesInStudy=MR, StudyDate=20240101-")
    b.add_argument("--out", required=True, metavar="OUT",
                   help="output folder: OUT/<StudyInstanceUID>/, OUT/ledger.json, OUT/findings.csv")
    bwho = b.add_mutually_exclusive_group()
    bwho.add_argument("--workers", type=int, metavar="N", help="worker processes of the local Dask cluster (default 2)")
    bwho.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler (e.g. tcp://host:8786)")
    b.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per worker (default: the cores shared among the local workers)")
    b.add_argument("--no-store", action="store_true", help="with --dicomweb: do not store the DICOM outputs back")
    b.add_argument("-m", "--model", help="detector weights (file or folder)")
    b.add_argument("--grader", help="grading model (file or folder); default: grader.pt beside the detector")
    b.set_defaults(func=_cmd_batch)

    w = sub.add_parser("worker", parents=[quiet],
                       help="the warm PACS worker: run every study Orthanc's plugin queues, store the results back")
    w.add_argument("--queue", required=True, metavar="FILE", help="the queue file (SpinepathQueue in Orthanc's config)")
    w.add_argument("--dicomweb", metavar="URL", help="the PACS's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    w.add_argument("-m", "--model", help="model folder (default: the bundle's)")
    w.add_argument("--poll", type=float, default=1.0, help="seconds between looks at an empty queue")
    w.add_argument("--idle-exit", dest="idle_exit", type=float, help="exit after this many idle seconds")
    w.add_argument("--status", action="store_true", help="print the queue's counts per state and exit")
    w.set_defaults(func=_cmd_worker)

    ph = sub.add_parser("phantom", help="write the synthetic phantom DICOM study", parents=[quiet])
    ph.add_argument("output")
    ph.add_argument("--seed", type=int, default=0)
    ph.set_defaults(func=_cmd_phantom)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spinepath`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # a process of its own for one study (the console script, python -m spinepath; not a caller's main([...])):
    # as app.py, with every network of the model folder exported MONAI's package __init__ files are not needed,
    # the outputs are written by a process forked at start-up, and the interpreter's teardown is skipped once
    # the outputs are on disk (issue 15: the cold start)
    one_study = argv is None and args.command == "run"
    if one_study:  # before torch is imported: no cyclic garbage collection, the outputs in a forked process
        # only this path needs them
        from spinepath.core.lean import one_study_gc
        from spinepath.outputs.process import start_writer_process

        one_study_gc()
        start_writer_process()  # the writer process builds the SEG and PDF in its own child beside the SR
    if one_study and not args.grader:
        from spinepath.core.lean import defer_if_exported  # only this path needs it

        defer_if_exported(args.model)
    try:
        code = int(args.func(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    if one_study:
        from spinepath.core.lean import exit_without_teardown  # only this path needs it

        exit_without_teardown(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
