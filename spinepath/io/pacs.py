"""A small DICOMweb client (QIDO-RS, WADO-RS, STOW-RS) for fetching studies from and storing results to a PACS.

Built on ``dicomweb-client``. Every function takes ``url``, the DICOMweb service root (for Orthanc with the
DICOMweb plugin: ``http://HOST:8042/dicom-web``), opens its own HTTP session and closes it before returning.
Requests that fail in transport or with a transient status are retried a few times (``RETRY_ATTEMPTS``); then
network and HTTP failures raise :class:`PacsError`, whose message names the server, the URL path and the HTTP
status, never response bodies or query strings (which could carry patient data).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
import retrying
from dicomweb_client import DICOMwebClient

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
# dicomweb-client retries a request that failed in transport or answered 408/429/503/504, with exponential
# back-off (here 0.5 s, then 1 s): a refused connection fails after 1.5 s
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_MS = 250
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
STOW_BATCH_BYTES = 64 * 2**20  # one STOW-RS request carries at most this much (or a single larger file)
STOW_BATCH_FILES = 200
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

# DICOM JSON keywords of the series attributes returned by find_series
SERIES_FIELDS = {
    "SeriesInstanceUID": "0020000E",
    "Modality": "00080060",
    "SeriesDescription": "0008103E",
    "SeriesNumber": "00200011",
}
STUDY_INSTANCE_UID = "0020000D"


class PacsError(RuntimeError):
    """A DICOMweb request failed: server unreachable, HTTP error or rejected instances.

    Attributes:
        path: URL path of the failed request (no query string).
        status: HTTP status code, or ``None`` when no response came back.

    """

    def __init__(self, message: str, path: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.status = status


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, without credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _path(url: str | None, fallback: str) -> str:
    """URL path of ``url`` (query string and credentials dropped), or ``fallback``'s."""
    return urlsplit(url or fallback).path or "/"


def _reason(exc: BaseException) -> str:
    """A short, data-free reason for a transport error: the underlying OS error if any, else the class name."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        todo += [a for a in e.args if isinstance(a, BaseException)]
        todo += [c for c in (e.__cause__, e.__context__, getattr(e, "reason", None)) if isinstance(c, BaseException)]
    return type(exc).__name__


def _http_error(url: str, what: str, response: requests.Response) -> PacsError:
    path = _path(response.request.url if response.request is not None else None, url)
    reason = f" {response.reason}" if response.reason else ""
    return PacsError(
        f"{what} {_origin(url)}{path} failed: HTTP {response.status_code}{reason}", path=path,
        status=response.status_code,
    )


@contextmanager
def _errors(url: str, what: str) -> Iterator[None]:
    """Turn ``requests``/``retrying`` failures inside the block into :class:`PacsError`."""
    try:
        yield
    except requests.HTTPError as exc:
        if exc.response is None:
            raise PacsError(f"{what} {_origin(url)}{_path(None, url)} failed: {type(exc).__name__}",
                            path=_path(None, url)) from None
        raise _http_error(url, what, exc.response) from None
    except retrying.RetryError as exc:  # a retriable status (429, 503, ...) until the attempts ran out
        value = exc.last_attempt.value
        if isinstance(value, requests.Response):
            raise _http_error(url, what, value) from None
        raise PacsError(f"{what} {_origin(url)}{_path(None, url)} failed after retries",
                        path=_path(None, url)) from None
    except requests.RequestException as exc:  # connection refused, DNS, timeout, broken stream
        request = getattr(exc, "request", None)
        path = _path(getattr(request, "url", None), url)
        raise PacsError(f"{what} {_origin(url)}{path} failed: cannot reach the DICOMweb server ({_reason(exc)})",
                        path=path) from None


@contextmanager
def _client(url: str, timeout: float) -> Iterator[DICOMwebClient]:
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) DICOMweb URL: {_origin(url) or url[:40]!r}")
    with requests.Session() as session:
        client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
        client.set_http_retry_params(
            retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_BACKOFF_MS
        )
        yield client


def _value(item: dict[str, Any], tag: str) -> Any:
    """First value of attribute ``tag`` (8 hex digits) in a DICOM JSON object, or ``None``."""
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def find_studies(
    url: str, *, query: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> list[str]:
    """Study Instance UIDs of the studies on the server (QIDO-RS ``GET /studies``, every page).

    Args:
        url: DICOMweb service root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        query: QIDO-RS study matching keys, e.g. ``{"ModalitiesInStudy": "MR", "StudyDate": "20240101-"}``
            (attribute keyword or tag -> value, with the server's matching rules: wildcards, date ranges);
            default: every study.
        timeout: Seconds to wait for the server per request.

    Returns:
        The UIDs, sorted.

    Raises:
        PacsError: Server unreachable or HTTP error (the message never carries the query's values).

    """
    filters = {str(k): str(v) for k, v in (query or {}).items()} or None
    uids: set[str] = set()
    offset = 0
    with _client(url, timeout) as client, _errors(url, "QIDO-RS"):
        # pages until one is empty or brings no new study: some servers ignore the offset for some matching
        # keys (Orthanc with ModalitiesInStudy answers every page with the same studies)
        while True:
            page = client.search_for_studies(fields=["StudyInstanceUID"], search_filters=filters, offset=offset)
            new = {str(_value(s, STUDY_INSTANCE_UID)) for s in page if _value(s, STUDY_INSTANCE_UID)} - uids
            if not page or not new:
                break
            uids |= new
            offset += len(page)
    return sorted(uids)


def find_series(url: str, study_uid: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """The series of a study (QIDO-RS ``GET /studies/{uid}/series``).

    Args:
        url: DICOMweb service root.
        study_uid: Study Instance UID.
        timeout: Seconds to wait for the server per request.

    Returns:
        One dict per series with ``SeriesInstanceUID``, ``Modality``, ``SeriesDescription`` (str or ``None``)
        and ``SeriesNumber`` (int or ``None``), sorted by series number then UID. Empty for an unknown study.

    Raises:
        PacsError: Server unreachable or HTTP error.

    """
    with _client(url, timeout) as client, _errors(url, "QIDO-RS"):
        found = client.search_for_series(study_uid, fields=list(SERIES_FIELDS), get_remaining=True)
    out = []
    for s in found:
        d = {k: _value(s, tag) for k, tag in SERIES_FIELDS.items()}
        d["SeriesNumber"] = int(d["SeriesNumber"]) if d["SeriesNumber"] not in (None, "") else None
        out.append(d)
    out.sort(key=lambda d: (d["SeriesNumber"] is None, d["SeriesNumber"] or 0, str(d["SeriesInstanceUID"])))
    return out


def fetch_study(
    url: str,
    study_uid: str,
    dest_dir: str | Path,
    *,
    transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[Path]:
    """Download all instances of a study (WADO-RS ``GET /studies/{uid}``) into a new folder.

    The instances are streamed into a temporary folder beside ``dest_dir``, one ``<SOPInstanceUID>.dcm`` file
    each, which is renamed to ``dest_dir`` once complete: ``dest_dir`` never holds a partial study. Like
    :func:`tempfile.mkdtemp`'s, the folder is readable only by the current user.

    Args:
        url: DICOMweb service root.
        study_uid: Study Instance UID.
        dest_dir: Folder to create; it must not exist or be empty.
        transfer_syntax: Transfer syntax to ask for; the default (Explicit VR Little Endian) makes the server
            decompress the pixel data, ``"*"`` gets the instances as stored.
        timeout: Seconds to wait for the server per request.

    Returns:
        The written files, sorted.

    Raises:
        FileExistsError: ``dest_dir`` exists and is not an empty folder.
        PacsError: Server unreachable, HTTP error (404 for an unknown study) or an empty study.

    """
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        names: set[str] = set()
        with _client(url, timeout) as client, _errors(url, "WADO-RS"):
            media = (("application/dicom", transfer_syntax),)
            for i, ds in enumerate(client.iter_study(study_uid, media_types=media)):
                uid = str(getattr(ds, "SOPInstanceUID", ""))
                name = f"{uid}.dcm" if _UID.fullmatch(uid) and len(uid) <= 64 else f"instance{i:05d}.dcm"
                ds.save_as(tmp / name, enforce_file_format=True)
                names.add(name)
        if not names:
            path = f"{_path(None, url).rstrip('/')}/studies/{study_uid}"
            raise PacsError(f"WADO-RS {_origin(url)}{path}: the study has no instances", path=path)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fetched %d instance(s) of study %s into %s", len(names), study_uid, dest)
    return [dest / n for n in sorted(names)]


def _batches(paths: list[Path]) -> Iterator[list[Path]]:
    batch: list[Path] = []
    size = 0
    for p in paths:
        n = p.stat().st_size
        if batch and (size + n > STOW_BATCH_BYTES or len(batch) >= STOW_BATCH_FILES):
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += n
    if batch:
        yield batch


def store_files(url: str, paths: Iterable[str | Path], *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Upload DICOM files (STOW-RS ``POST /studies``), in batches of at most 64 MiB.

    Args:
        url: DICOMweb service root.
        paths: DICOM Part 10 files.
        timeout: Seconds to wait for the server per request.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: A file is not DICOM.
        PacsError: Server unreachable, HTTP error, or the server rejected some instances (the message counts
            them and names their SOP Instance UIDs and failure reasons).

    """
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"not a file: {p}")
    stored = 0
    with _client(url, timeout) as client:
        for batch in _batches(files):
            datasets = []
            for p in batch:
                try:
                    datasets.append(pydicom.dcmread(p))
                except pydicom.errors.InvalidDicomError:
                    raise ValueError(f"not a DICOM file: {p}") from None
            with _errors(url, "STOW-RS"):
                response = client.store_instances(datasets)
            failed = [] if response is None else list(response.get("FailedSOPSequence", []))
            if failed:
                path = f"{_path(None, url).rstrip('/')}/studies"
                detail = ", ".join(
                    f"{item.get('ReferencedSOPInstanceUID', '?')} (reason 0x{int(item.get('FailureReason', 0)):04X})"
                    for item in failed[:5]
                )
                raise PacsError(
                    f"STOW-RS {_origin(url)}{path}: the server rejected {len(failed)} of {len(datasets)} "
                    f"instance(s): {detail}", path=path,
                )
            stored += len(datasets)
    log.info("stored %d instance(s)", stored)
