"""Batch runs over an archive on Dask: every study of a DICOMweb query or of a folder, each finished once.

``spinepath batch`` (:func:`run_batch`) lists the studies (QIDO-RS, or the study folders under a directory),
skips those the ledger ``OUT/ledger.json`` records as done, and submits one task per remaining study to a Dask
cluster (a ``LocalCluster`` of single-threaded worker processes by default, or the scheduler at an address).

How a study is finished exactly once:

- **Models once per worker.** A task (:func:`process_study`) takes the models from a per-process cache keyed by
  their paths (:func:`worker_models`): the first task of a worker process loads them, the next ones reuse
  them. A restarted worker (e.g. after being killed) loads them again.
- **Outputs appear complete or not at all.** A task writes the usual outputs of ``spinepath run`` into a
  temporary folder ``OUT/.partial-<uid>-*`` and renames it to ``OUT/<StudyInstanceUID>/`` when complete. A
  worker killed mid-task leaves only a ``.partial-`` folder (removed by the client when the batch ends); Dask
  runs the task again on another worker. A task whose study folder already exists (the first execution
  renamed it and died before reporting, or another execution won the race: a rename onto a non-empty folder
  fails) keeps the existing folder and writes nothing.
- **Stored back once, by the client.** Workers never store. In DICOMweb mode the client stores the study's
  ``dicom/*.dcm`` (STOW-RS) when the task's result arrives and then records the study as done. A killed
  worker therefore never stores, and a client killed between the store and the ledger write stores the same
  files again on the next run: the same SOP Instance UIDs, which the PACS keeps once.
- **The ledger is written by the client only**, atomically, after each result (at most every
  ``LEDGER_SAVE_S`` seconds, and at the end). One entry per study (``status`` ``done`` or ``failed``,
  ``error``, ``seconds``, ``output``, ``stored`` in DICOMweb mode, ``attempts``). Done studies are skipped by
  the next run; **failed studies are retried by every run** (the cause may have been transient: an
  unreachable PACS, a worker that died three times), and their ``attempts`` count up. A failed study gets no
  ``OUT/<uid>/`` folder. To process a done study again, delete its entry (and its folder).
- **One batch per output folder at a time** (a lock file ``OUT/.ledger.lock``).

At the end ``OUT/findings.csv`` is written from every done study in the ledger (:func:`write_findings`): one row
per study and level (vertebrae and discs, top-down) with the findings, grades, probabilities, review flags and
the measurements of ``vertebrae.json``.

Error messages recorded in the ledger are the refusal reasons of the pipeline, which never carry patient
identifiers; nothing here logs patient names or IDs.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import re
import resource
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from distributed import Client, KilledWorker, LocalCluster, WorkerPlugin, as_completed
from tqdm.auto import tqdm

from spinepath import __version__
from spinepath.core.errors import StudyError
from spinepath.core.files import atomic_file
from spinepath.core.levels import structure_rank
from spinepath.io.pacs import PacsError, fetch_study, find_studies, store_files

log = logging.getLogger(__name__)

LEDGER = "ledger.json"
FINDINGS = "findings.csv"
LOCK = ".ledger.lock"
PARTIAL = ".partial-"
LEDGER_FORMAT = "spinepath-batch-ledger"
LEDGER_SAVE_S = 1.0
DONE, FAILED = "done", "failed"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_QUERY_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]*|[0-9A-Fa-f]{8}")


class BatchError(RuntimeError):
    """The batch cannot start: bad source, unreadable ledger, another batch running on the output folder."""


def valid_uid(uid: str) -> bool:
    """True when ``uid`` is a DICOM UID (digits and dots, at most 64 characters): safe as a folder name."""
    return len(uid) <= 64 and bool(_UID.fullmatch(uid))


def parse_query(items: Iterable[str]) -> dict[str, str]:
    """QIDO-RS matching keys from ``KEY=VALUE`` strings (``--query``).

    Args:
        items: Strings such as ``"ModalitiesInStudy=MR"`` or ``"00100020=ABC*"``.

    Returns:
        ``{key: value}`` in the given order.

    Raises:
        ValueError: An item is not ``KEY=VALUE`` with a DICOM keyword or an 8-digit hex tag as key, or a key
            is repeated (the message quotes the key only, never the value).

    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _QUERY_KEY.fullmatch(key):
            raise ValueError(f"--query expects KEY=VALUE with a DICOM keyword or tag as KEY (got key {key!r})")
        if key in out:
            raise ValueError(f"--query {key} given twice")
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ the studies


@dataclass(frozen=True)
class Study:
    """One study of the batch.

    Attributes:
        key: The ledger key: the StudyInstanceUID, or ``folder:<name>`` for a study folder whose UID could not
            be read (it is recorded as failed).
        folder: Folder mode: the study folder; ``None`` in DICOMweb mode.
        error: Why the study cannot be run at all (found while listing), else ``None``.

    """

    key: str
    folder: str | None = None
    error: str | None = None


def _folder_study_uid(folder: Path) -> str | None:
    """The StudyInstanceUID of the first DICOM file under ``folder`` (headers only), or ``None``."""
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # noqa: BLE001  (stray non-DICOM, truncated or unreadable files are skipped)
            continue
        uid = str(getattr(ds, "StudyInstanceUID", "") or "").strip()
        if uid:
            return uid
    return None


def folder_studies(root: str | Path, exclude: str | Path | None = None) -> list[Study]:
    """The studies of a folder: each sub-folder of ``root`` is one study (its files may lie in sub-folders).

    A study's key is the StudyInstanceUID of its first readable DICOM file. A folder without one (or with an
    invalid UID) becomes a study that fails with that reason; a second folder with the same UID is skipped
    with a warning. Hidden folders and ``exclude`` (the batch's output folder, when it lies in ``root``) are
    not studies.

    Args:
        root: The folder holding one folder per study.
        exclude: A folder to leave out.

    Returns:
        The studies, sorted by folder name.

    Raises:
        BatchError: ``root`` is not a folder or holds no sub-folder.

    """
    root = Path(root)
    if not root.is_dir():
        raise BatchError(f"{root}: not a folder")
    skip = Path(exclude).resolve() if exclude is not None else None
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.resolve() != skip)
    if not folders:
        raise BatchError(f"{root}: no study folders in it (one sub-folder per study)")
    studies: list[Study] = []
    seen: dict[str, Path] = {}
    for f in folders:
        uid = _folder_study_uid(f)
        if uid is None or not valid_uid(uid):
            reason = "no readable DICOM file with a StudyInstanceUID" if uid is None else "invalid StudyInstanceUID"
            studies.append(Study(f"folder:{f.name}", str(f), f"{reason} in the folder"))
            continue
        if uid in seen:
            log.warning("folder %s holds the same study as %s: skipped", f.name, seen[uid].name)
            continue
        seen[uid] = f
        studies.append(Study(uid, str(f)))
    return studies


def dicomweb_studies(url: str, query: Mapping[str, str] | None = None) -> list[Study]:
    """The studies matching a QIDO-RS query (every study without one).

    Raises:
        PacsError: Server unreachable or HTTP error.

    """
    return [Study(uid) if valid_uid(uid) else Study(uid, error="invalid StudyInstanceUID")
            for uid in find_studies(url, query=query)]


# ------------------------------------------------------------------------------------------------ worker side


@dataclass(frozen=True)
class ModelPaths:
    """Where the models come from (``None``: the bundle's, or the one beside the detector)."""

    model: str | None = None
    grader: str | None = None
    spider_grader: str | None = None
    segmenter: str | None = None


@dataclass(frozen=True)
class StudyTask:
    """What a worker needs to run one study (small and picklable).

    Attributes:
        uid: StudyInstanceUID (the output folder's name).
        out: The batch's output folder, seen by the worker at this path.
        folder: Folder mode: the study folder.
        dicomweb: DICOMweb mode: the service root to fetch the study from.
        models: The model paths.

    """

    uid: str
    out: str
    folder: str | None = None
    dicomweb: str | None = None
    models: ModelPaths = field(default_factory=ModelPaths)


_MODELS: dict[ModelPaths, tuple] = {}
_MODELS_LOCK = threading.Lock()


def _defer_imports(paths: ModelPaths) -> None:
    """Defer MONAI's package ``__init__`` files in a worker, before it first imports MONAI.

    With the bundle's (or one folder's) exported networks, as in the app and the PACS worker: loading the models
    takes 1.0 s instead of 3.5 s, and no MONAI network, torchvision, torch._dynamo or Triton is imported. Nothing
    changes where MONAI is imported already.
    """
    if paths.grader is None and paths.spider_grader is None and paths.segmenter is None:
        # only in a worker, before the chain's imports
        from spinepath.core.lean import defer_if_exported

        defer_if_exported(paths.model)


def worker_models(paths: ModelPaths) -> tuple:
    """The four models of this process, loaded on the first call for these paths (one copy per process).

    Returns:
        ``(detector, grader, spider_grader, segmenter)``.

    """
    with _MODELS_LOCK:
        if paths not in _MODELS:
            _defer_imports(paths)
            # torch and the models only where studies run: a batch with nothing to do starts fast
            from spinepath import stages

            _MODELS.clear()
            t0 = time.perf_counter()
            _MODELS[paths] = stages.load_all_models(paths.model, paths.grader, paths.spider_grader, paths.segmenter)
            log.info("worker %d: models loaded in %.1f s", os.getpid(), time.perf_counter() - t0)
        return _MODELS[paths]


def _finished(folder: Path) -> bool:
    """True when ``folder`` is a study's finished output (its ``status.json`` says ok)."""
    try:
        return bool(json.loads((folder / "status.json").read_text()).get("ok"))
    except (OSError, ValueError):
        return False


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # kB on Linux


def process_study(task: StudyTask) -> dict[str, Any]:
    """Run one study on a worker: fetch it (DICOMweb), run the chain, move the outputs to ``OUT/<uid>/``.

    Never stores anything and never raises for a study the pipeline refuses or that cannot be fetched: such
    failures are returned (``status: "failed"`` with the error). A study whose output folder already exists
    is not run again (``reused: true``).

    Args:
        task: The study and where to put it.

    Returns:
        ``{"key", "status", "seconds", "output", "reused", "levels", "error", "peak_rss_mb"}``.

    """
    _defer_imports(task.models)  # before the chain's imports
    # torch and the models only where studies run: a batch with nothing to do starts fast
    from spinepath.run import run_study

    t0 = time.perf_counter()
    out_root = Path(task.out)
    final = out_root / task.uid
    res: dict[str, Any] = {"key": task.uid, "status": DONE, "output": task.uid, "reused": False, "error": None}
    if _finished(final):
        res["reused"] = True
        return res | {"seconds": 0.0, "peak_rss_mb": _peak_rss_mb()}
    tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL}{task.uid}-", dir=out_root))
    fetched = None
    try:
        if task.dicomweb:
            fetched = Path(tempfile.mkdtemp(prefix=f"{PARTIAL}fetch-{task.uid}-", dir=out_root))
            in_dir, kind = fetched / "study", "dicomweb"
            fetch_study(task.dicomweb, task.uid, in_dir)
        else:
            in_dir, kind = Path(str(task.folder)), "dicom"
        detector, grader, spider, segmenter = worker_models(task.models)
        result = run_study(in_dir, tmp / "out", detector, input_kind=kind, grader=grader, spider_grader=spider,
                           segmenter=segmenter)
        res["levels"] = result.get("levels", [])
        try:
            os.rename(tmp / "out", final)  # atomic; fails onto a non-empty folder
        except OSError:
            if not _finished(final):
                raise
            res["reused"] = True  # another execution of this task finished first
    except (StudyError, PacsError, FileNotFoundError, FileExistsError, ValueError) as exc:
        res |= {"status": FAILED, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001  (a bug on one study must not stop the batch)
        log.exception("study %s: unexpected error", task.uid)
        res |= {"status": FAILED, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fetched is not None:
            shutil.rmtree(fetched, ignore_errors=True)
    return res | {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": _peak_rss_mb()}


class TorchThreads(WorkerPlugin):
    """Dask worker plugin: ``torch.set_num_threads(n)`` on every worker, restarted ones included."""

    name = "spinepath-torch-threads"

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def setup(self, worker: Any) -> None:
        """Set the torch intra-op threads of the worker process."""
        import torch  # on the worker only, which imports it anyway to run studies

        torch.set_num_threads(self.n)


# ------------------------------------------------------------------------------------------------ the ledger


class Ledger:
    """``OUT/ledger.json``: one entry per study, written atomically by the batch's client only.

    Attributes:
        path: The ledger file.
        studies: ``{key: entry}``; an entry has ``status`` (``"done"``/``"failed"``), ``error``, ``seconds``,
            ``output``, ``attempts``, ``finished`` (UTC, ISO 8601) and in DICOMweb mode ``stored``.

    """

    def __init__(self, path: str | Path, studies: dict[str, dict] | None = None) -> None:
        self.path = Path(path)
        self.studies: dict[str, dict] = dict(studies or {})
        self._saved = 0.0
        self._dirty = False

    @classmethod
    def load(cls, path: str | Path) -> Ledger:
        """Read a ledger (an empty one when the file does not exist).

        Raises:
            BatchError: The file exists but is not a spinepath batch ledger.

        """
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            d = json.loads(path.read_text())
            if d.get("format") != LEDGER_FORMAT or not isinstance(d.get("studies"), dict):
                raise ValueError("not a spinepath batch ledger")
        except (OSError, ValueError) as exc:
            raise BatchError(f"{path}: cannot read the ledger ({exc}); move it away to start afresh") from None
        return cls(path, d["studies"])

    def done(self, key: str) -> bool:
        """True when the study is recorded as done."""
        return self.studies.get(key, {}).get("status") == DONE

    def record(self, key: str, entry: dict) -> dict:
        """Record a study's outcome (counting its attempts); returns the entry."""
        attempts = int(self.studies.get(key, {}).get("attempts", 0)) + 1
        entry = entry | {"attempts": attempts, "finished": datetime.now(UTC).isoformat(timespec="seconds")}
        self.studies[key] = entry
        self._dirty = True
        return entry

    def save(self, force: bool = False) -> None:
        """Write the ledger atomically (durably); unless ``force``, at most every ``LEDGER_SAVE_S`` seconds."""
        if not self._dirty and self.path.exists():
            return
        if not force and time.monotonic() - self._saved < LEDGER_SAVE_S:
            return
        d = {"format": LEDGER_FORMAT, "version": 1, "software_version": __version__,
             "studies": dict(sorted(self.studies.items()))}
        with atomic_file(self.path, suffix=".json", durable=True) as tmp:
            Path(tmp).write_text(json.dumps(d, indent=1))
        self._saved = time.monotonic()
        self._dirty = False


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold ``OUT/.ledger.lock`` for the block; another batch on the same folder is refused."""
    fh = open(out / LOCK, "a")  # noqa: SIM115  (held for the whole block)
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchError(f"{out}: another spinepath batch is running on this output folder") from None
        yield
    finally:
        fh.close()


def _remove_partials(out: Path) -> None:
    """Remove what killed tasks left behind (``OUT/.partial-*``)."""
    for p in out.glob(f"{PARTIAL}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ findings.csv

# geometry and per-slice detail that do not belong in a table of findings
_SKIP = {"slices", "slice_range", "points_pixels", "points_patient_mm", "per_slice_probability", "line", "lines",
         "weights", "level"}
# lists of probabilities indexed by a grade that starts at 1 (Pfirrmann 1-5); others start at 0 (Modic 0-3)
_LIST_BASE = {"pfirrmann_probabilities": 1}
FINDINGS_LEAD = ["study_instance_uid", "level", "structure", "study_needs_review", "measured_lordosis_deg"]


def _flatten(prefix: str, obj: Any, row: dict[str, Any]) -> None:
    """Scalar leaves of ``obj`` into ``row`` with ``_``-joined names; string lists joined with ``"; "``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in _SKIP:
                _flatten(f"{prefix}_{k}" if prefix else str(k), v, row)
    elif isinstance(obj, list | tuple):
        if all(isinstance(x, str) for x in obj):
            row[prefix] = "; ".join(obj)
        elif all(isinstance(x, int | float) and not isinstance(x, bool) for x in obj):
            base = _LIST_BASE.get(prefix, 0)
            for i, x in enumerate(obj):
                row[f"{prefix}_{i + base}"] = x
    elif obj is not None:  # a value the level lacks (null) stays an empty cell
        row[prefix] = obj


def findings_rows(result: Mapping[str, Any], study_uid: str) -> list[dict[str, Any]]:
    """The rows of one study's ``vertebrae.json`` for ``findings.csv``: one per level, top-down.

    Each row has ``study_instance_uid``, ``level``, ``structure`` (``vertebra`` / ``disc``), the study's
    ``study_needs_review`` and ``measured_lordosis_deg``, the level's findings as in the JSON with flat names
    (``needs_review``, ``review_reasons``, ``pathology_probability``, ``pathology_label``, ``grade``,
    ``probabilities_v1`` …, ``pfirrmann_grade``, ``pfirrmann_probabilities_1`` … ``_5``, ``modic_type``,
    ``herniation_probability`` …) and its measurements prefixed ``measured_`` (``measured_anterior_mm``,
    ``measured_wedge_ratio``, ``measured_disc_height_index``, ``measured_canal_ap_mm``,
    ``measured_listhesis_offset_mm``, ``measured_flags``, ``measured_review_reasons`` …). Geometry (boxes,
    lines, points) is left out.

    Args:
        result: A study's ``vertebrae.json``.
        study_uid: Its StudyInstanceUID.

    Returns:
        The rows (dicts; a column a level lacks is missing from its dict).

    """
    m = result.get("measurements") or {}
    flags = m.get("flags") or {}
    review_of = m.get("review") or {}
    levels: dict[tuple[str, str], dict[str, Any]] = {}

    def row(level: str, kind: str) -> dict[str, Any]:
        return levels.setdefault((level, kind), {"study_instance_uid": study_uid, "level": level, "structure": kind,
                                                 "study_needs_review": result.get("needs_review"),
                                                 "measured_lordosis_deg": m.get("lordosis_deg")})

    for kind, section in (("vertebra", "vertebrae"), ("disc", "discs")):
        for item in result.get(section) or []:
            if item.get("level"):
                _flatten("", item, row(item["level"], kind))
        for level, values in (m.get(section) or {}).items():
            r = row(level, kind)
            _flatten("measured", values, r)
            reasons = list((flags.get(section) or {}).get(level) or [])
            review = list(((review_of.get(section) or {}).get(level) or {}).get("review_reasons") or [])
            if kind == "disc":
                reasons += list((flags.get("listhesis") or {}).get(level) or [])
                review += list(((review_of.get("listhesis") or {}).get(level) or {}).get("review_reasons") or [])
            r["measured_flags"] = "; ".join(reasons)
            if review_of:
                r["measured_review_reasons"] = "; ".join(review)
    for level, values in (m.get("listhesis") or {}).items():
        _flatten("measured_listhesis", values, row(level, "disc"))
    return [levels[k] for k in sorted(levels, key=lambda k: (structure_rank(k[0]), k[0]))]


def write_findings(out: str | Path, study_uids: Iterable[str]) -> Path:
    """Write ``OUT/findings.csv`` (atomically) from the ``OUT/<uid>/vertebrae.json`` of the given studies.

    Columns: :data:`FINDINGS_LEAD`, the findings of vertebrae, of discs, then the ``measured_`` columns, each
    in the order they first appear (studies sorted by UID, levels top-down); an empty cell where a level has no
    such value.

    Returns:
        The CSV's path.

    """
    out = Path(out)
    rows: list[dict[str, Any]] = []
    for uid in sorted(study_uids):
        p = out / uid / "vertebrae.json"
        if p.is_file():
            rows += findings_rows(json.loads(p.read_text()), uid)
    # the findings of vertebrae, then of discs, then the measurements, each in the order they first appear
    seen = dict.fromkeys(FINDINGS_LEAD)
    for kind in ("vertebra", "disc"):
        for r in rows:
            if r["structure"] == kind:
                seen |= dict.fromkeys(r)
    columns = [c for c in seen if c in FINDINGS_LEAD or not c.startswith("measured_")]
    columns += [c for c in seen if c not in columns]
    path = out / FINDINGS
    with atomic_file(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------ client side


@dataclass
class BatchOptions:
    """A batch run (``spinepath batch``).

    Attributes:
        out: Output folder (``OUT/<uid>/``, ``ledger.json``, ``findings.csv``). With a remote scheduler it must
            be the same path on every worker (a shared file system), as must ``folder``.
        folder: Folder mode: one sub-folder per study.
        dicomweb: DICOMweb mode: the service root (QIDO-RS, WADO-RS, STOW-RS).
        query: QIDO-RS matching keys (DICOMweb mode).
        store: DICOMweb mode: store each study's DICOM outputs back (STOW-RS).
        workers: Worker processes of the local cluster.
        scheduler: Address of a running Dask scheduler instead of a local cluster.
        threads: Torch threads per worker; default: the cores shared among the local workers (at least 1), and
            left as the workers have it with ``scheduler``.
        models: The model paths.
        progress: Show a progress bar.

    """

    out: str | Path
    folder: str | Path | None = None
    dicomweb: str | None = None
    query: dict[str, str] = field(default_factory=dict)
    store: bool = True
    workers: int = 2
    scheduler: str | None = None
    threads: int | None = None
    models: ModelPaths = field(default_factory=ModelPaths)
    progress: bool = True


def _studies(n: int) -> str:
    return f"{n} study" if n == 1 else f"{n} studies"


@contextmanager
def _quiet_dask() -> Iterator[None]:
    """Dask's own log lines off in this process for the block.

    Cluster start-up, a worker restarted by its nanny, a result lost with a killed worker and computed again:
    the batch records the outcome of every study itself.
    """
    names = ["distributed"] + [n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


@contextmanager
def _dask_client(opts: BatchOptions) -> Iterator[Any]:
    if opts.scheduler:
        with Client(opts.scheduler) as client:
            if opts.threads:
                client.register_plugin(TorchThreads(opts.threads))
            yield client
        return
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
    with LocalCluster(n_workers=opts.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.register_plugin(TorchThreads(threads))
        yield client


def _store(url: str, folder: Path) -> int:
    files = sorted((folder / "dicom").glob("*.dcm"))
    if files:
        store_files(url, files)
    return len(files)


def run_batch(opts: BatchOptions) -> dict[str, Any]:
    """Run every study of the source that the ledger does not record as done; see the module's docstring.

    Args:
        opts: The batch.

    Returns:
        A summary: ``studies`` (found), ``already_done``, ``processed`` (this run), ``done``, ``failed``,
        ``stored`` (studies stored back this run), ``reused`` (results whose task found the study's output
        folder already finished: a task computed again after its first result was lost with a killed worker),
        ``failed_studies`` (keys), ``wall_s``, ``study_s`` (the tasks' seconds summed), ``peak_worker_rss_mb``,
        ``out``, and ``message`` (for a run with nothing to do: ``"nothing to do: N studies already done"``).

    Raises:
        BatchError: Bad source, a model path that does not exist, unreadable ledger or another batch running
            on ``out``.
        PacsError: The DICOMweb query failed.

    """
    if (opts.folder is None) == (opts.dicomweb is None):
        raise BatchError("give exactly one source: a folder or a DICOMweb URL")
    if opts.workers < 1:
        raise BatchError("--workers must be at least 1")
    for path in (opts.models.model, opts.models.grader, opts.models.spider_grader, opts.models.segmenter):
        if path is not None and not Path(path).exists():  # not every study failing on it in the workers
            raise BatchError(f"model not found: {path}")
    out = Path(opts.out)
    t_start = time.perf_counter()
    studies = (folder_studies(opts.folder, exclude=out) if opts.folder is not None
               else dicomweb_studies(str(opts.dicomweb), opts.query))
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        ledger = Ledger.load(out / LEDGER)
        todo = [s for s in studies if not ledger.done(s.key)]
        summary: dict[str, Any] = {"studies": len(studies), "already_done": len(studies) - len(todo),
                                   "processed": len(todo), "done": 0, "failed": 0, "stored": 0, "reused": 0,
                                   "failed_studies": [], "out": str(out)}
        done_uids = [k for k, e in ledger.studies.items() if e.get("status") == DONE and valid_uid(k)]
        if not todo:
            if not (out / FINDINGS).exists():
                write_findings(out, done_uids)
            ledger.save(force=True)
            summary["message"] = (f"nothing to do: {_studies(len(studies))} already done"
                                  if studies else "nothing to do: no studies found")
            return summary
        _remove_partials(out)
        run_tasks(opts, out, ledger, todo, summary)
        ledger.save(force=True)
        _remove_partials(out)
        write_findings(out, [k for k, e in ledger.studies.items() if e.get("status") == DONE and valid_uid(k)])
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    return summary


def run_tasks(opts: BatchOptions, out: Path, ledger: Ledger, todo: list[Study], summary: dict[str, Any]) -> None:
    """Submit the studies to the cluster and record each result as it arrives (store back first)."""
    base = {"stored": False} if opts.dicomweb else {}
    folders = {s.key: Path(s.folder).name for s in todo if s.folder}
    study_s, peak = 0.0, 0.0

    def record(key: str, res: dict[str, Any]) -> None:
        entry = base | {k: res.get(k) for k in ("status", "error", "seconds", "output")}
        if not opts.dicomweb:
            entry["folder"] = folders.get(key)
        if entry["status"] == DONE and opts.dicomweb and opts.store:
            try:
                entry["stored"] = _store(opts.dicomweb, out / key) > 0
            except (PacsError, FileNotFoundError, ValueError) as exc:
                entry |= {"status": FAILED, "error": f"store: {exc}"}
        if entry["status"] != DONE:
            entry["output"] = None
            log.warning("study %s failed: %s", key, entry["error"])
            summary["failed_studies"].append(key)
        summary[entry["status"]] += 1
        summary["reused"] += int(bool(res.get("reused")))
        summary["stored"] += int(bool(entry.get("stored")))
        ledger.record(key, entry)
        ledger.save()

    runnable = [s for s in todo if s.error is None]
    with tqdm(total=len(todo), unit="study", desc="batch", disable=not opts.progress) as bar:
        for s in todo:
            if s.error is not None:
                record(s.key, {"status": FAILED, "error": s.error, "seconds": 0.0})
                bar.update()
        if not runnable:
            summary["study_s"] = 0.0
            return
        token = secrets.token_hex(4)
        with _quiet_dask(), _dask_client(opts) as client:
            futures = {}
            for s in runnable:
                task = StudyTask(s.key, str(out.resolve()), folder=str(Path(s.folder).resolve()) if s.folder else None,
                                 dicomweb=opts.dicomweb, models=opts.models)
                futures[client.submit(process_study, task, key=f"spinepath-study-{s.key}-{token}", pure=False)] = s
            for fut in as_completed(futures):
                s = futures[fut]
                try:
                    res = fut.result()
                except KilledWorker:
                    res = {"status": FAILED, "error": "the workers running this study died each time (memory? see the "
                                                      "worker logs)", "seconds": None}
                except Exception as exc:  # noqa: BLE001  (recorded: one study must not stop the batch)
                    res = {"status": FAILED, "error": f"{type(exc).__name__}: {exc}", "seconds": None}
                study_s += float(res.get("seconds") or 0.0)
                peak = max(peak, float(res.get("peak_rss_mb") or 0.0))
                record(s.key, res)
                bar.update()
                bar.set_postfix(failed=summary["failed"], refresh=False)
    summary["study_s"] = round(study_s, 1)
    summary["peak_worker_rss_mb"] = peak

