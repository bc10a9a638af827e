"""The persistent study queue between the PACS and the worker: one SQLite file on disk.

Orthanc's plugin (:mod:`spinepath.service.orthanc_plugin`, run by Orthanc's own Python) adds every stable study;
the worker (:mod:`spinepath.service.worker`) claims them one at a time and marks each done or failed. Standard
library only, so that Orthanc's Python can import it. Every change is one committed transaction (SQLite's
journal in WAL mode), so a process killed at any point leaves the queue as it was before or after a change:

- a study is added once (its Orthanc ID is the key); one that becomes stable again is queued again, as a new
  version, only when it was done and its source images changed (the results the worker stores back make it
  stable again too: those alone do not);
- a claimed study whose worker died is ``running`` with that worker's process ID; :meth:`StudyQueue.recover`
  puts it back to ``pending`` when the worker starts again.

A study processed twice would store its results twice; the worker makes that harmless too (its outputs have UIDs
derived from the study, so storing them again adds nothing to the PACS).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: The states of a queued study.
STATES = ("pending", "running", "done", "failed")
#: A study that failed this many times stays failed (it is not retried by the worker).
MAX_ATTEMPTS = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    orthanc_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 1,
    instances INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,
    queued REAL NOT NULL,
    updated REAL NOT NULL,
    seconds REAL,
    chain_seconds REAL,
    stored INTEGER,
    error TEXT
)
"""


@dataclass
class Job:
    """A claimed study."""

    orthanc_id: str
    study_uid: str
    attempts: int
    version: int


class StudyQueue:
    """The queue file (created on first use).

    Args:
        path: The SQLite file.
        timeout: Seconds to wait for another process's lock.

    """

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        with self._tx() as db:
            db.execute(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (``BEGIN IMMEDIATE``: writers wait for each other), committed on success."""
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def add(self, orthanc_id: str, study_uid: str, instances: int) -> bool:
        """Queue a stable study with ``instances`` source images; True when it is now (again) pending."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state, instances FROM studies WHERE orthanc_id = ?", (orthanc_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO studies (orthanc_id, study_uid, instances, queued, updated)"
                           " VALUES (?, ?, ?, ?, ?)", (orthanc_id, study_uid, instances, now, now))
                return True
            if row[0] in ("done", "failed") and row[1] != instances:  # images changed after it was processed
                db.execute("UPDATE studies SET state = 'pending', attempts = 0, version = version + 1, error = NULL,"
                           " instances = ?, updated = ? WHERE orthanc_id = ?", (instances, now, orthanc_id))
                return True
            if row[0] in ("pending", "running"):
                db.execute("UPDATE studies SET instances = ? WHERE orthanc_id = ?", (instances, orthanc_id))
            return False

    def recover(self) -> int:
        """Put back to ``pending`` the studies claimed by workers that are no longer running; how many."""
        with self._tx() as db:
            rows = db.execute("SELECT orthanc_id, worker_pid FROM studies WHERE state = 'running'").fetchall()
            dead = [oid for oid, pid in rows if not _alive(pid)]
            db.executemany("UPDATE studies SET state = 'pending', worker_pid = NULL WHERE orthanc_id = ?",
                           [(o,) for o in dead])
        return len(dead)

    def claim(self) -> Job | None:
        """The oldest pending study, now ``running`` for this process; None when there is none."""
        with self._tx() as db:
            row = db.execute("SELECT orthanc_id, study_uid, attempts, version FROM studies WHERE state = 'pending'"
                             " ORDER BY queued LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE studies SET state = 'running', attempts = attempts + 1, worker_pid = ?, updated = ?"
                       " WHERE orthanc_id = ?", (os.getpid(), time.time(), row[0]))
        return Job(row[0], row[1], row[2] + 1, row[3])

    def finish(self, job: Job, seconds: float, stored: int, chain_seconds: float | None = None) -> None:
        """Mark a claimed study done (its results stored back).

        ``seconds``: the whole study; ``chain_seconds``: the chain's stages (the rest is fetching and storing).
        """
        with self._tx() as db:
            db.execute("UPDATE studies SET state = 'done', seconds = ?, chain_seconds = ?, stored = ?, error = NULL,"
                       " worker_pid = NULL, updated = ? WHERE orthanc_id = ? AND version = ?",
                       (seconds, chain_seconds, stored, time.time(), job.orthanc_id, job.version))

    def fail(self, job: Job, error: str) -> None:
        """Record a failure: pending again until :data:`MAX_ATTEMPTS`, then ``failed``."""
        state = "failed" if job.attempts >= MAX_ATTEMPTS else "pending"
        with self._tx() as db:
            db.execute("UPDATE studies SET state = ?, error = ?, worker_pid = NULL, updated = ?"
                       " WHERE orthanc_id = ? AND version = ?", (state, error[:500], time.time(), job.orthanc_id,
                                                                 job.version))

    def counts(self) -> dict[str, int]:
        """How many studies are in each state."""
        with self._tx() as db:
            rows = dict(db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall())
        return {s: int(rows.get(s, 0)) for s in STATES}

    def rows(self) -> list[dict]:
        """Every queued study (no patient identifiers are kept: Orthanc ID and Study Instance UID only)."""
        with self._tx() as db:
            cur = db.execute("SELECT * FROM studies ORDER BY queued")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")  # a killed process not yet reaped by its parent is a zombie: dead
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
