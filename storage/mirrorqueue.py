"""A persistent queue of files waiting to be uploaded to the R2 mirror.

One SQLite table in its own database file, so nothing queued is lost when the mirror is
down or the node restarts; the node's loop calls :func:`drain` now and then and the
mirror catches up when it is back.

Rules:

* A CID is queued at most once; queueing it again updates its path and makes it due.
* ``failed`` pushes an entry back by ``BACKOFF_BASE_S * 2**(attempts - 1)``, capped at
  ``BACKOFF_MAX_S``: a mirror that is down costs one request per entry per backoff.
* Time is passed in (``now``, seconds): the queue never reads a clock, so backoff is
  tested without waiting.
* :func:`drain` stops its round at the first :class:`~.r2.MirrorUnavailable`: when the
  endpoint is down, trying the next entries would only fail the same way.

Synchronous and thread-safe (one connection behind a lock); the node calls it through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from teammesh.protocols.errors import MirrorError, MirrorUnavailable

from .cid import Cid

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["BACKOFF_BASE_S", "BACKOFF_MAX_S", "DrainReport", "MirrorQueue", "QueueItem", "drain"]

logger = logging.getLogger(__name__)

BACKOFF_BASE_S: Final = 5.0
BACKOFF_MAX_S: Final = 3600.0
DRAIN_BATCH: Final = 100  # most entries one drain() round takes on

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS uploads (
    cid        TEXT PRIMARY KEY,
    path       TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_at    REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS uploads_next_at ON uploads (next_at);
"""


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One queued upload."""

    cid: Cid
    path: Path
    attempts: int
    next_at: float
    last_error: str | None


def backoff_s(attempts: int) -> float:
    """The pause after the ``attempts``-th failure in a row."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** min(attempts - 1, 30))


class MirrorQueue:
    """The upload queue, stored in the SQLite file ``db_path`` (created if missing)."""

    def __init__(self, db_path: Path) -> None:
        self._lock = threading.Lock()
        # One connection used from whichever worker thread holds the lock.
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> MirrorQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def enqueue(self, cid: Cid, path: Path) -> None:
        """Queue ``path`` for upload as ``cid``, due at once."""
        with self._lock:
            self._db.execute(
                "INSERT INTO uploads (cid, path) VALUES (?, ?) "
                "ON CONFLICT (cid) DO UPDATE SET path = excluded.path, next_at = 0",
                (str(cid.to_v1()), str(path)),
            )

    def due(self, now: float, limit: int = DRAIN_BATCH) -> list[QueueItem]:
        """The entries due at ``now``, longest waiting first, at most ``limit``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT cid, path, attempts, next_at, last_error FROM uploads "
                "WHERE next_at <= ? ORDER BY next_at, rowid LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_item(r) for r in rows]

    def done(self, cid: Cid) -> None:
        """Remove ``cid`` from the queue (uploaded, or no longer wanted)."""
        with self._lock:
            self._db.execute("DELETE FROM uploads WHERE cid = ?", (str(cid.to_v1()),))

    def failed(self, cid: Cid, error: str, now: float) -> float:
        """Record a failed upload; return when the entry is due again."""
        key = str(cid.to_v1())
        with self._lock:
            row = self._db.execute("SELECT attempts FROM uploads WHERE cid = ?", (key,)).fetchone()
            if row is None:
                return now
            attempts = int(row[0]) + 1
            next_at = now + backoff_s(attempts)
            self._db.execute(
                "UPDATE uploads SET attempts = ?, next_at = ?, last_error = ? WHERE cid = ?",
                (attempts, next_at, error[:1000], key),
            )
        return next_at

    def pending(self) -> list[QueueItem]:
        """Every queued entry, due or not, soonest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT cid, path, attempts, next_at, last_error FROM uploads "
                "ORDER BY next_at, rowid"
            ).fetchall()
        return [_item(r) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM uploads").fetchone()[0])


def _item(row: tuple[str, str, int, float, str | None]) -> QueueItem:
    return QueueItem(Cid.parse(row[0]), Path(row[1]), int(row[2]), float(row[3]), row[4])


class Uploader(Protocol):
    """What :func:`drain` needs of a mirror (:class:`~.r2.R2Mirror` is one)."""

    def upload_file(self, cid: Cid, path: Path) -> bool: ...


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What one :func:`drain` round did."""

    uploaded: int = 0  # sent to the mirror
    already: int = 0  # the mirror had it already
    failed: int = 0  # backed off
    dropped: int = 0  # the local file is gone: the entry was removed
    unavailable: bool = False  # the round stopped because the mirror is unreachable


def drain(queue: MirrorQueue, mirror: Uploader, now: float) -> DrainReport:
    """Upload every entry due at ``now`` (one batch), recording successes and failures.

    Returns:
        Counts of what happened; ``unavailable`` when the round stopped early.
    """
    uploaded = already = failed = dropped = 0
    for item in queue.due(now):
        if not item.path.is_file():
            logger.warning("dropping upload of %s: %s no longer exists", item.cid, item.path)
            queue.done(item.cid)
            dropped += 1
            continue
        try:
            sent = mirror.upload_file(item.cid, item.path)
        except MirrorUnavailable as e:
            queue.failed(item.cid, str(e), now)
            logger.warning("mirror unavailable, uploads wait: %s", e)
            return DrainReport(uploaded, already, failed + 1, dropped, unavailable=True)
        except MirrorError as e:
            queue.failed(item.cid, str(e), now)
            logger.warning("upload of %s failed: %s", item.cid, e)
            failed += 1
            continue
        queue.done(item.cid)
        if sent:
            uploaded += 1
        else:
            already += 1
    return DrainReport(uploaded, already, failed, dropped)
