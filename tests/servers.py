"""Throwaway servers for tests: PostgreSQL, an Orthanc PACS (with DICOMweb) and MONAI Label, on loopback.

Use the fixtures from a test module (``tests/`` is on ``sys.path``, as for ``conftest``)::

    from servers import orthanc_url, postgres_url  # noqa: F401  (pytest finds the fixtures by name)

    def test_x(postgres_url: str) -> None: ...
    def test_y(orthanc_url: str) -> None: ...  # http://127.0.0.1:PORT; DICOMweb root: orthanc_url + DICOMWEB_ROOT

or the context managers :func:`postgres_server` / :func:`orthanc_server` / :func:`monailabel_server` outside
pytest. The binaries come from the Debian packages ``postgresql``, ``orthanc`` and ``orthanc-dicomweb``
(``scripts/setup_system.sh``); the system-wide services are never used. MONAI Label runs from its own
environment ``.venv-label`` (``scripts/setup_env.sh label``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ROOT = Path("/usr/lib/postgresql")
PG_SYSTEM_USER = "postgres"  # initdb/postgres refuse to run as root
SETUP_HINT = "run scripts/setup_system.sh (installs the Debian package postgresql)"


class ServerError(RuntimeError):
    """A test server could not be found or started."""


def find_pg_bin(root: Path | None = None) -> Path:
    """The ``bin`` folder of the newest PostgreSQL under ``/usr/lib/postgresql/<major>/bin``."""
    root = PG_ROOT if root is None else root
    found = [p.parent for p in root.glob("*/bin/initdb") if p.parent.name == "bin" and (p.parent / "pg_ctl").exists()]
    found = [b for b in found if b.parent.name.isdigit()]
    if not found:
        raise ServerError(f"PostgreSQL server binaries not found under {root}/*/bin; {SETUP_HINT}")
    return max(found, key=lambda b: int(b.parent.name))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _as_server_user(cmd: list[str]) -> list[str]:
    """Prefix ``cmd`` with ``runuser`` when running as root."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", PG_SYSTEM_USER, "--", *cmd]


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    res = subprocess.run(_as_server_user(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    if res.returncode:
        raise ServerError(f"{what} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")


@contextmanager
def postgres_server(database: str = "optuna", host: str = "127.0.0.1") -> Iterator[str]:
    """Start a fresh PostgreSQL cluster in a temporary folder; yields its SQLAlchemy URL.

    The cluster has trust authentication, listens only on ``host`` (a free port) and keeps its unix socket
    in the temporary folder. It is stopped and the folder removed on exit.

    Args:
        database: Database created in the cluster.
        host: Loopback address to listen on.

    Yields:
        ``postgresql+psycopg2://postgres@HOST:PORT/DATABASE``.

    Raises:
        ServerError: Binaries missing, or initdb / start / createdb failed.

    """
    bindir = find_pg_bin()
    root = os.geteuid() == 0
    if root:
        try:
            pw = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise ServerError(f"running as root needs the system user {PG_SYSTEM_USER!r}; {SETUP_HINT}") from None
    # As root, /tmp rather than $TMPDIR: the server user must be able to reach the folder
    tmp = Path(tempfile.mkdtemp(prefix="spinepath-pg-", dir="/tmp" if root else None))
    data, log = tmp / "data", tmp / "server.log"
    started, err = False, ServerError("pg_ctl start failed")
    try:
        if root:
            os.chown(tmp, pw.pw_uid, pw.pw_gid)
        _run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
              "--no-locale", "--no-sync"], tmp, "initdb")
        for _ in range(3):  # the free port may be taken between probing and binding
            port = free_port(host)
            # durability off: a test cluster is thrown away
            opts = (f"-c listen_addresses={host} -p {port} -k {tmp} -c fsync=off -c synchronous_commit=off "
                    "-c full_page_writes=off")
            try:
                _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts, "start"],
                     tmp, "pg_ctl start")
                started = True
                break
            except ServerError as exc:
                err = exc
        if not started:
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise ServerError(f"{err}\n{tail}")
        _run([str(bindir / "createdb"), "-h", host, "-p", str(port), "-U", "postgres", database], tmp, "createdb")
        yield f"postgresql+psycopg2://postgres@{host}:{port}/{database}"
    finally:
        if (data / "postmaster.pid").exists():  # also after a start that timed out
            subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                            "stop"]), cwd=tmp, capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a throwaway PostgreSQL database (``optuna``) for the whole test session."""
    try:
        import psycopg2  # noqa: F401  (the URL's driver)
    except ImportError:
        pytest.fail("psycopg2 is missing from the environment: pip install psycopg2-binary (requirements.txt)")
    try:
        with postgres_server() as url:
            yield url
    except ServerError as exc:
        pytest.fail(str(exc))


# --- Orthanc --------------------------------------------------------------------------------------------------------

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
ORTHANC_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
ORTHANC_HINT = "run scripts/setup_system.sh (installs the Debian packages orthanc and orthanc-dicomweb)"
DICOMWEB_ROOT = "/dicom-web"


def find_orthanc() -> tuple[Path, Path]:
    """The Orthanc executable and its DICOMweb plugin (``libOrthancDicomWeb.so``)."""
    exe = ORTHANC_BIN if ORTHANC_BIN.is_file() else (Path(w) if (w := shutil.which("Orthanc")) else None)
    if exe is None:
        raise ServerError(f"Orthanc not found ({ORTHANC_BIN}); {ORTHANC_HINT}")
    plugins = [p for d in ORTHANC_PLUGIN_DIRS for p in sorted(d.glob("libOrthancDicomWeb.so*")) if p.is_file()]
    if not plugins:  # elsewhere: ask dpkg where the package put it
        res = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30)
        plugins = [Path(ln) for ln in res.stdout.splitlines() if ".so" in Path(ln).name and Path(ln).is_file()]
    if not plugins:
        raise ServerError(f"the Orthanc DICOMweb plugin (libOrthancDicomWeb.so) was not found; {ORTHANC_HINT}")
    return exe, plugins[0]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_until_up(proc: subprocess.Popen, url: str, timeout: float, poll: float) -> bool:
    """Wait until ``url`` answers 200 while ``proc`` runs (at most ``timeout`` s); True when it does."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if _answers(url):
            return True
        time.sleep(poll)
    return proc.poll() is None and _answers(url)


def find_orthanc_python() -> Path:
    """Orthanc's Python plugin (Debian ``orthanc-python``: ``libOrthancPython.so``)."""
    found = [p for d in ORTHANC_PLUGIN_DIRS for p in sorted(d.glob("libOrthancPython.so*")) if p.is_file()]
    if not found:
        raise ServerError("the Orthanc Python plugin (libOrthancPython.so) was not found; run scripts/setup_system.sh "
                          "(installs the Debian package orthanc-python)")
    return found[0]


@contextmanager
def orthanc_server(host: str = "127.0.0.1", timeout: float = 60, extra: dict | None = None,
                   python_script: Path | None = None, info: dict | None = None) -> Iterator[str]:
    """Start a fresh Orthanc with the DICOMweb plugin in a temporary folder; yields its base URL.

    HTTP and DICOM ports are free ports picked on loopback; HTTP listens only on loopback
    (``RemoteAccessAllowed: false``), without authentication. The DICOM listener binds all interfaces (Orthanc
    has no bind-address option) but accepts no C-ECHO / C-STORE from unknown peers, and there are none. The
    DICOMweb API is at ``URL + DICOMWEB_ROOT``. Orthanc is stopped and the folder removed on exit.

    Args:
        host: Loopback address of the URL.
        timeout: Seconds to wait for ``/system`` to answer.
        extra: More configuration (e.g. ``DicomModalities`` allowed to store, ``StableAge``).
        python_script: A script for Orthanc's Python plugin (``PythonScript``).
        info: Filled with ``dicom_port``, ``aet`` and ``log`` (the log file) when given.

    Yields:
        ``http://HOST:PORT``.

    Raises:
        ServerError: Binaries missing, or Orthanc did not start.

    """
    exe, plugin = find_orthanc()
    plugins = [str(plugin)] + ([str(find_orthanc_python())] if python_script else [])
    tmp = Path(tempfile.mkdtemp(prefix="spinepath-orthanc-"))
    log = tmp / "orthanc.log"
    proc: subprocess.Popen | None = None
    try:
        for _ in range(3):  # a free port may be taken between probing and binding
            http_port, dicom_port = free_port(host), free_port(host)
            config = {
                "Name": "spinepath-test",
                "StorageDirectory": str(tmp / "storage"),
                "IndexDirectory": str(tmp / "index"),
                "HttpPort": http_port,
                "DicomPort": dicom_port,
                "DicomAet": "SPINEPATH",
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomAlwaysAllowEcho": False,
                "DicomAlwaysAllowStore": False,
                "SaveJobs": False,
                "Plugins": plugins,
                "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT + "/", "EnableWado": False},
                **({"PythonScript": str(python_script), "PythonVerbose": False} if python_script else {}),
                **(extra or {}),
            }
            (tmp / "orthanc.json").write_text(json.dumps(config, indent=2))
            with open(log, "ab") as fh:
                proc = subprocess.Popen([str(exe), str(tmp / "orthanc.json")], cwd=tmp, stdout=fh,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            url = f"http://{host}:{http_port}"
            if _wait_until_up(proc, f"{url}/system", timeout, 0.1):
                if not _answers(f"{url}{DICOMWEB_ROOT}/studies"):
                    raise ServerError(f"Orthanc started without DICOMweb ({plugin}):\n"
                                      f"{log.read_text(errors='replace')[-2000:]}")
                if info is not None:
                    info.update(dicom_port=dicom_port, aet=config["DicomAet"], log=log)
                yield url
                return
            if proc.poll() is None:  # up but silent: give up
                break
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        raise ServerError(f"Orthanc did not start (exit code {proc.poll() if proc else None}):\n{tail}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def orthanc_url() -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT``) of a throwaway Orthanc with DICOMweb for the whole test session."""
    try:
        with orthanc_server() as url:
            yield url
    except ServerError as exc:
        pytest.fail(str(exc))


# ------------------------------------------------------------------------------------------- MONAI Label
REPO = Path(__file__).resolve().parent.parent
LABEL_PYTHON = REPO / ".venv-label" / "bin" / "python"
LABEL_HINT = "run scripts/setup_env.sh label (creates .venv-label with monailabel 0.8.5)"


@contextmanager
def monailabel_server(studies: str, model_dir: Path, conf: dict[str, str] | None = None,
                      host: str = "127.0.0.1", timeout: float = 240) -> Iterator[str]:
    """Start the spinepath MONAI Label app (``label/``) on a free loopback port; yields its base URL.

    Args:
        studies: A studies folder or a DICOMweb URL.
        model_dir: The app's model folder (served model, rounds).
        conf: More ``--conf`` key/value pairs.
        host: Loopback address.
        timeout: Seconds to wait for ``/info/``.

    Raises:
        ServerError: The environment is missing or the server did not start.

    """
    if not LABEL_PYTHON.is_file():
        raise ServerError(f"MONAI Label environment not found ({LABEL_PYTHON}); {LABEL_HINT}")
    log = Path(tempfile.mkdtemp(prefix="spinepath-monailabel-")) / "server.log"
    # the server imports this checkout's spinepath (not whatever the environment was installed from)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PATH": f"{LABEL_PYTHON.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "PYTHONPATH": pythonpath}
    env.pop("VIRTUAL_ENV", None)
    proc: subprocess.Popen | None = None
    started: list[subprocess.Popen] = []
    try:
        for _ in range(3):
            port = free_port(host)
            cmd = [str(LABEL_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(REPO / "label"),
                   "--studies", studies, "--host", host, "--port", str(port), "--conf", "model_dir", str(model_dir)]
            for k, v in (conf or {}).items():
                cmd += ["--conf", k, str(v)]
            with open(log, "ab") as fh:
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            started.append(proc)
            url = f"http://{host}:{port}"
            if _wait_until_up(proc, f"{url}/info/", timeout, 0.5):
                yield url
                return
            if proc.poll() is None:
                break
        raise ServerError(f"MONAI Label did not start (exit code {proc.poll() if proc else None}):\n"
                          f"{log.read_text(errors='replace')[-3000:]}")
    finally:
        for p in started:  # each server and its training subprocesses (one process group per start)
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever outlived SIGTERM in the group
            except ProcessLookupError:
                pass
            if p.poll() is None:
                p.wait(timeout=30)
        shutil.rmtree(log.parent, ignore_errors=True)
