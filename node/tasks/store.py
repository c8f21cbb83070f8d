"""The task pipeline's journal store: every SQL statement of the task service and of the
executor side of the task protocol, typed.

Rows come back as dataclasses read by column name (``sqlite3.Row``), never by position,
so adding a column cannot silently shift a field. The schema is the journal's
(``node/core/journal.py``: tables ``tasks``, ``exec``, ``cache``); a node upgraded in
place keeps its tasks because nothing here changes a table, only how it is read.

Writes that must land together take a ``Txn`` (``with store.transaction() as txn``);
single statements outside a transaction run in autocommit, as before.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from teammesh.node.core.journal import Journal
from teammesh.protocols import wire
from teammesh.protocols.tasks import TaskResult

TASK_COLUMNS = ("id, kind, version, input, params, options, state, executed_by, output,"
                " error, attempts, submitted, started, finished, interrupted")
# what `task show` and `task list` need: not the input (up to 4 MiB a task)
SUMMARY_COLUMNS = ("id, kind, version, params, options, state, executed_by, output,"
                   " error, attempts, submitted, started, finished, interrupted")


def pack_output(output: Any) -> bytes:
    return wire.pack({"t": "output", "v": 1, "output": output})


def unpack_output(blob: Any) -> Any:
    return wire.unpack(bytes(blob))["output"]


def pack_result(result: TaskResult) -> bytes:
    return wire.pack({"t": "result", "v": 1, **result.to_wire()})


def unpack_result(blob: Any) -> TaskResult:
    return TaskResult.from_wire(wire.unpack(bytes(blob)))


@dataclass(frozen=True, slots=True)
class TaskRow:
    """A submitted task as the journal holds it (table ``tasks``). Read for a summary,
    ``input`` is empty."""

    id: str
    kind: str
    version: str
    input: bytes
    params: dict[str, Any]
    # JSON: priority, where, replicas, quorum, timeout_s, no_cache, tag, cached, input_cid;
    # readers default a missing key (journals from before it was added lack it)
    options: dict[str, Any]
    state: str
    executed_by: str | None
    output: Any  # unpacked; None when the task has no output (yet)
    error: str | None
    attempts: list[dict[str, Any]]
    submitted: float
    started: float | None
    finished: float | None
    interrupted: int = 0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TaskRow:
        blob = row["output"]
        return cls(
            id=row["id"], kind=row["kind"], version=row["version"],
            input=bytes(row["input"]) if "input" in row.keys() else b"",
            params=json.loads(row["params"]), options=json.loads(row["options"]),
            state=row["state"], executed_by=row["executed_by"],
            output=unpack_output(blob) if blob is not None else None, error=row["error"],
            attempts=json.loads(row["attempts"]), submitted=row["submitted"],
            started=row["started"], finished=row["finished"],
            interrupted=int(row["interrupted"] or 0))


@dataclass(frozen=True, slots=True)
class NewTask:
    """What a submission journals before the API answers."""

    id: str
    kind: str
    version: str
    input: bytes
    params: dict[str, Any]
    options: dict[str, Any]
    state: str
    submitted: float
    executed_by: str | None = None
    output: Any = None
    has_output: bool = False  # a cache hit is journaled done, with its output
    started: float | None = None
    finished: float | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A task's terminal state, written once."""

    id: str
    state: str
    executed_by: str | None
    output: Any
    error: str | None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None


@dataclass(frozen=True, slots=True)
class CacheHit:
    output: Any
    executed_by: str | None


@dataclass(frozen=True, slots=True)
class ExecRow:
    """An assignment this node accepted as an executor (table ``exec``)."""

    id: str
    submitter: str
    state: str  # accepted | done
    result: TaskResult | None


def _query(db: sqlite3.Connection, sql: str, args: Any = ()) -> sqlite3.Cursor:
    """Rows by column name, on this cursor only (the journal's other users are untouched)."""
    cur = db.cursor()
    cur.row_factory = sqlite3.Row
    return cur.execute(sql, args)


class Txn:
    """Statements inside one journal transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    # --- submitter ------------------------------------------------------------------------
    def cache_lookup(self, key: str, not_before: float) -> CacheHit | None:
        row = _query(self.db, "SELECT output, executed_by FROM cache WHERE key=?"
                     " AND created >= ?", (key, not_before)).fetchone()
        if row is None:
            return None
        return CacheHit(unpack_output(row["output"]), row["executed_by"])

    def insert_task(self, t: NewTask) -> None:
        self.db.execute(
            "INSERT INTO tasks(id, kind, version, input, params, options, state,"
            " executed_by, output, attempts, submitted, started, finished)"
            " VALUES(:id, :kind, :version, :input, :params, :options, :state, :executed_by,"
            " :output, '[]', :submitted, :started, :finished)",
            {"id": t.id, "kind": t.kind, "version": t.version, "input": t.input,
             "params": json.dumps(t.params), "options": json.dumps(t.options),
             "state": t.state, "executed_by": t.executed_by,
             "output": pack_output(t.output) if t.has_output else None,
             "submitted": t.submitted, "started": t.started, "finished": t.finished})

    def finish(self, o: Outcome) -> None:
        self.db.execute(
            "UPDATE tasks SET state=:state, executed_by=:by, output=:output, error=:error,"
            " attempts=:attempts, started=:started, finished=:finished WHERE id=:id",
            {"state": o.state, "by": o.executed_by, "output": pack_output(o.output),
             "error": o.error, "attempts": json.dumps(o.attempts), "started": o.started,
             "finished": o.finished, "id": o.id})

    def cache_put(self, key: str, output: Any, executed_by: str | None,
                  created: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO cache(key, output, executed_by, created)"
                        " VALUES(?,?,?,?)", (key, pack_output(output), executed_by, created))

    def mark_running(self, started: Iterable[tuple[str, float | None]]) -> None:
        """These queued tasks started on this node (the crash-loop count needs it)."""
        self.db.executemany("UPDATE tasks SET state='running', started=? WHERE id=?"
                            " AND state='queued'", [(s, i) for i, s in started])

    # --- executor -------------------------------------------------------------------------
    def exec_get(self, task_id: str) -> ExecRow | None:
        row = _query(self.db, "SELECT id, submitter, state, result FROM exec WHERE id=?",
                     (task_id,)).fetchone()
        if row is None:
            return None
        blob = row["result"]
        return ExecRow(row["id"], row["submitter"], row["state"],
                       unpack_result(blob) if blob is not None else None)

    def exec_accept(self, task_id: str, submitter: str, now: float) -> None:
        self.db.execute("INSERT INTO exec(id, submitter, state, updated) VALUES(?,?,?,?)",
                        (task_id, submitter, "accepted", now))

    def exec_done(self, results: Iterable[TaskResult]) -> None:
        self.db.executemany("UPDATE exec SET state='done', result=? WHERE id=?",
                            [(pack_result(r), r.id) for r in results])

    def exec_forget(self, submitter: str, ids: Iterable[str]) -> None:
        """The submitter journaled these results (its ack): forget them."""
        self.db.executemany("DELETE FROM exec WHERE id=? AND submitter=?",
                            [(i, submitter) for i in ids])


class TaskStore:
    """The task tables of one node's journal."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._now = Txn(journal.db)

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        with self.journal.transaction() as db:
            yield Txn(db)

    @property
    def autocommit(self) -> Txn:
        """Statements that stand alone (each its own implicit transaction)."""
        return self._now

    # --- reads ----------------------------------------------------------------------------
    def get(self, task_id: str) -> TaskRow | None:
        """A task's summary (no input)."""
        row = _query(self.journal.db, f"SELECT {SUMMARY_COLUMNS} FROM tasks WHERE id=?",
                     (task_id,)).fetchone()
        return None if row is None else TaskRow.from_row(row)

    def listing(self, state: str | None, limit: int) -> list[TaskRow]:
        """Newest first (ids start with the submission time)."""
        if state:
            cur = _query(
                self.journal.db,
                f"SELECT {SUMMARY_COLUMNS} FROM tasks WHERE state=? ORDER BY id DESC LIMIT ?",
                (state, limit))
        else:
            cur = _query(self.journal.db,
                         f"SELECT {SUMMARY_COLUMNS} FROM tasks ORDER BY id DESC LIMIT ?", (limit,))
        return [TaskRow.from_row(r) for r in cur]

    def unfinished(self) -> list[TaskRow]:
        cur = _query(self.journal.db,
                     f"SELECT {TASK_COLUMNS} FROM tasks WHERE state IN ('queued', 'running')")
        return [TaskRow.from_row(r) for r in cur]

    # --- restart bookkeeping --------------------------------------------------------------
    def count_interruption(self, task_id: str, interrupted: int) -> None:
        self.journal.db.execute("UPDATE tasks SET interrupted=? WHERE id=?",
                                (interrupted, task_id))

    def fail_interrupted(self, task_id: str, error: str, finished: float) -> None:
        self.journal.db.execute(
            "UPDATE tasks SET state='failed', error=?, finished=? WHERE id=?",
            (error, finished, task_id))

    def requeue_running(self) -> None:
        """A clean stop interrupted nothing: only a crash counts against a task."""
        self.journal.db.execute("UPDATE tasks SET state='queued' WHERE state='running'")

    def exec_recover(self) -> None:
        """After a restart, executor work accepted but not finished is lost: forget it so
        a re-assign runs it again."""
        self.journal.db.execute("DELETE FROM exec WHERE state != 'done'")

    def prune(self, now: float, keep_s: float, cache_ttl_s: float) -> dict[str, int]:
        return self.journal.prune(now, keep_s, cache_ttl_s)
