"""The node's SQLite journal (WAL): membership state now, tasks and results too.

One file per home. WAL with synchronous=NORMAL survives kill -9 of the daemon without
losing a committed transaction (it may lose the last ones on power loss; see
docs/OPERATIONS.md). Writes on the hot path are grouped into one transaction per batch.
Short statements run inline on the trio thread: each is tens of microseconds, cheaper than
a thread hop.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS certs (peer TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS revocations (peer TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS invites (
    enroll_peer TEXT PRIMARY KEY, expires INTEGER NOT NULL, created INTEGER NOT NULL,
    used_by TEXT
);
"""


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        # The journal holds the bridge key and task data: private to the user, WAL and
        # shared-memory files included (SQLite gives them the main file's mode).
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        elif path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self.db.executescript(TASK_SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(tasks)")}
        if "interrupted" not in cols:  # journals from before restart counting
            self.db.execute("ALTER TABLE tasks ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- key/value --------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", (key, value))

    def prune(self, now: float, keep_s: float, cache_ttl_s: float) -> dict[str, int]:
        """Forget finished tasks older than ``keep_s``, cache entries older than
        ``cache_ttl_s`` and executor rows nobody collected (all wall-clock seconds), so a
        node that runs for months keeps a journal of bounded size."""
        with self.transaction() as db:
            tasks = db.execute(
                "DELETE FROM tasks WHERE state IN ('done', 'failed', 'cancelled')"
                " AND COALESCE(finished, submitted) < ?", (now - keep_s,)).rowcount
            cache = db.execute("DELETE FROM cache WHERE created < ?",
                               (now - cache_ttl_s,)).rowcount
            # rows written before `updated` was wall-clock time hold small numbers: keep
            # them rather than guess their age
            execs = db.execute("DELETE FROM exec WHERE updated > 1e9 AND updated < ?",
                               (now - keep_s,)).rowcount
        return {"tasks": tasks, "cache": cache, "exec": execs}

    # --- roster -----------------------------------------------------------------------
    def save_cert(self, peer: str, data: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO certs(peer, data) VALUES(?, ?)", (peer, data))

    def save_revocation(self, peer: str, data: bytes) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO revocations(peer, data) VALUES(?, ?)", (peer, data))
        self.db.execute("DELETE FROM certs WHERE peer=?", (peer,))

    def certs(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.db.execute("SELECT data FROM certs")]

    def revocations(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.db.execute("SELECT data FROM revocations")]

    # --- invites ----------------------------------------------------------------------
    def add_invite(self, enroll_peer: str, created: int, expires: int) -> None:
        self.db.execute(
            "INSERT INTO invites(enroll_peer, expires, created) VALUES(?, ?, ?)",
            (enroll_peer, expires, created))

    def invite(self, enroll_peer: str) -> tuple[int, str | None] | None:
        row = self.db.execute(
            "SELECT expires, used_by FROM invites WHERE enroll_peer=?", (enroll_peer,)
        ).fetchone()
        return None if row is None else (int(row[0]), row[1])

    def use_invite(self, enroll_peer: str, peer: str) -> bool:
        cur = self.db.execute(
            "UPDATE invites SET used_by=? WHERE enroll_peer=? AND used_by IS NULL",
            (peer, enroll_peer))
        return cur.rowcount == 1

    def live_invites(self, now: int, grace_s: int) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT enroll_peer FROM invites WHERE expires > ?", (now - grace_s,))]


TASK_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, version TEXT NOT NULL, input BLOB NOT NULL,
    params TEXT NOT NULL, options TEXT NOT NULL, state TEXT NOT NULL, executed_by TEXT,
    output BLOB, error TEXT, attempts TEXT NOT NULL, submitted REAL NOT NULL,
    started REAL, finished REAL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE TABLE IF NOT EXISTS exec (
    id TEXT PRIMARY KEY, submitter TEXT NOT NULL, state TEXT NOT NULL, result BLOB,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY, output BLOB NOT NULL, executed_by TEXT, created REAL NOT NULL
);
"""
