"""The task journal store (node/tasks/store.py): typed rows by column name, and journals
written by earlier versions read unchanged (a node upgraded in place keeps its tasks)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from teammesh.node.core.journal import Journal
from teammesh.node.tasks.store import NewTask, Outcome, TaskStore
from teammesh.protocols.tasks import make_result


def _new(task_id: str, **kw: object) -> NewTask:
    base: dict[str, object] = dict(id=task_id, kind="hash.sha256", version="1", input=b"abc",
                                   params={"n": 1}, options={"priority": 3, "tag": "t"},
                                   state="queued", submitted=1000.0)
    base.update(kw)
    return NewTask(**base)  # type: ignore[arg-type]


def test_submit_finish_and_read_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    store = TaskStore(journal)
    with store.transaction() as txn:
        txn.insert_task(_new("a1"))
        txn.insert_task(_new("a2", input=b"x" * 100))
    unfinished = {r.id: r for r in store.unfinished()}
    assert unfinished["a2"].input == b"x" * 100
    assert unfinished["a1"].params == {"n": 1}
    assert unfinished["a1"].options["priority"] == 3
    with store.transaction() as txn:
        txn.finish(Outcome("a1", "done", "peerX", {"digest": b"\x01"}, None,
                           [{"peer": "peerX", "started": 1.0, "ended": 2.0, "error": None}],
                           1001.0, 1002.0))
        txn.cache_put("key1", {"digest": b"\x01"}, "peerX", 1002.0)
    row = store.get("a1")
    assert row is not None
    assert (row.state, row.executed_by, row.output) == ("done", "peerX", {"digest": b"\x01"})
    assert row.attempts[0]["peer"] == "peerX"
    assert row.finished == 1002.0
    assert row.input == b""  # a summary: no input read
    assert [r.id for r in store.unfinished()] == ["a2"]
    assert [r.id for r in store.listing("done", 10)] == ["a1"]
    assert [r.id for r in store.listing(None, 10)] == ["a2", "a1"]  # newest first
    with store.transaction() as txn:
        hit = txn.cache_lookup("key1", 1000.0)
        assert hit is not None
        assert hit.output == {"digest": b"\x01"}
        assert txn.cache_lookup("key1", 1003.0) is None  # too old
    journal.close()


def test_crash_loop_bookkeeping(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    store = TaskStore(journal)
    with store.transaction() as txn:
        txn.insert_task(_new("b1"))
        txn.insert_task(_new("b2"))
        txn.mark_running([("b1", 5.0)])
    rows = {r.id: r for r in store.unfinished()}
    assert (rows["b1"].state, rows["b1"].started, rows["b2"].state) == ("running", 5.0, "queued")
    store.count_interruption("b1", 2)
    assert {r.id: r.interrupted for r in store.unfinished()} == {"b1": 2, "b2": 0}
    store.fail_interrupted("b1", "stopped twice", 9.0)
    failed = store.get("b1")
    assert failed is not None
    assert (failed.state, failed.error) == ("failed", "stopped twice")
    with store.transaction() as txn:
        txn.mark_running([("b2", 6.0)])
    store.requeue_running()
    assert {r.id: r.state for r in store.unfinished()} == {"b2": "queued"}
    journal.close()


def test_executor_rows(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    store = TaskStore(journal)
    res = make_result("e1", True, b"out", None, 1.0, 1.0)
    with store.transaction() as txn:
        txn.exec_accept("e1", "sub", 1e10)
        txn.exec_accept("e2", "sub", 1e10)
        txn.exec_done([res])
    with store.transaction() as txn:
        row = txn.exec_get("e1")
        assert row is not None
        assert row.result == res
        assert row.submitter == "sub"
        assert txn.exec_get("nope") is None
    store.exec_recover()  # e2 was accepted, never finished: forgotten
    with store.transaction() as txn:
        assert txn.exec_get("e2") is None
        txn.exec_forget("someone-else", ["e1"])  # only the submitter's ack forgets it
        assert txn.exec_get("e1") is not None
        txn.exec_forget("sub", ["e1"])
        assert txn.exec_get("e1") is None
    journal.close()


def test_journal_from_before_restart_counting_keeps_its_tasks(tmp_path: Path) -> None:
    """A journal written before the `interrupted` column: its tasks resume unchanged."""
    path = tmp_path / "journal.db"
    db = sqlite3.connect(path)
    db.executescript("""
CREATE TABLE tasks (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, version TEXT NOT NULL, input BLOB NOT NULL,
    params TEXT NOT NULL, options TEXT NOT NULL, state TEXT NOT NULL, executed_by TEXT,
    output BLOB, error TEXT, attempts TEXT NOT NULL, submitted REAL NOT NULL,
    started REAL, finished REAL
);
INSERT INTO tasks VALUES('old1', 'hash.sha256', '1', X'616263', '{}',
    '{"priority": 0, "where": "any"}', 'running', NULL, NULL, NULL, '[]', 5.0, 6.0, NULL);
""")
    db.commit()
    db.close()
    journal = Journal(path)
    store = TaskStore(journal)
    (row,) = store.unfinished()
    assert (row.id, row.input, row.state, row.interrupted, row.started) == \
        ("old1", b"abc", "running", 0, 6.0)
    assert row.options["where"] == "any"
    journal.close()
