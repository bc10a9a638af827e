"""Throwaway servers for tests: a PostgreSQL cluster on loopback.

Use the fixture from a test module (``tests/`` is on ``sys.path``, as for ``conftest``)::

    from servers import postgres_url  # noqa: F401  (pytest finds the fixture by name)

    def test_x(postgres_url: str) -> None: ...

or the context manager :func:`postgres_server` outside pytest. The binaries come from the Debian
``postgresql`` package (``scripts/setup_system.sh``); the system-wide service is never used.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
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
