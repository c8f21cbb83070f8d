"""A submitted task as this node holds it: the record the API shows and the journal keeps.

Plain data plus its JSON. Where the task runs is the scheduler's business
(protocols/scheduler.py); ``TaskService`` (service.py) mirrors the scheduler's decisions
onto these records: state, waiting reason, attempts, outcome.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from teammesh.node.tasks.store import TaskRow
from teammesh.protocols import tasks as tp
from teammesh.protocols.tasks import TaskResult, json_safe

TERMINAL = frozenset({"done", "failed", "cancelled"})
WHERE = ("any", "local", "peers", "bridge")
MAX_INPUT = tp.MAX_INLINE_INPUT


def new_task_id() -> str:
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


@dataclass(slots=True)
class Attempt:
    peer: str
    started: float
    ended: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "started": self.started, "ended": self.ended,
                "error": self.error}


@dataclass(slots=True)
class TaskRecord:
    id: str
    kind: str
    version: str
    input: bytes
    params: dict[str, Any]
    priority: int = 0
    where: str = "any"
    replicas: int = 1
    quorum: int = 0  # k of k-of-n: this many equal results settle it; 0 reads as replicas
    timeout_s: float | None = None
    no_cache: bool = False
    tag: Any = None
    input_cid: str | None = None
    state: str = "queued"
    executed_by: str | None = None
    output: Any = None
    error: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    submitted: float = 0.0
    started: float | None = None
    finished: float | None = None
    note: str | None = None  # the shell's own waiting text ("queued at the bridge (...)")
    cached: bool = False
    # runtime only
    inflight: dict[str, Attempt] = field(default_factory=dict)  # out now, by target
    results: dict[str, TaskResult] = field(default_factory=dict)  # by target
    errors: dict[str, str] = field(default_factory=dict)  # by target: a failure's own text
    losses: dict[str, str] = field(default_factory=dict)  # by target: why it was lost there
    deadline: float | None = None  # on trio's clock
    waiting_since: float | None = None  # queued with a wait that asks the team for room
    # the service's renderer of the scheduler's reason: the text is made when read
    render: Callable[[TaskRecord], str | None] | None = None
    _changed: trio.Event | None = None  # made when someone waits (most tasks: nobody)
    runtime: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.quorum:
            self.quorum = self.replicas  # unanimity, as before quorums existed

    @property
    def options(self) -> dict[str, Any]:
        return {"priority": self.priority, "where": self.where, "replicas": self.replicas,
                "quorum": self.quorum, "timeout_s": self.timeout_s, "no_cache": self.no_cache,
                "tag": self.tag, "cached": self.cached, "input_cid": self.input_cid}

    @property
    def waiting_reason(self) -> str | None:
        """Why it waits, for people: the shell's note, else the scheduler's reason."""
        if self.note is not None or self.render is None:
            return self.note
        return self.render(self)

    @waiting_reason.setter
    def waiting_reason(self, text: str | None) -> None:
        self.note = text

    @property
    def changed(self) -> trio.Event:
        """Set at the record's next change (state, reason, outcome)."""
        if self._changed is None:
            self._changed = trio.Event()
        return self._changed

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "version": self.version, "state": self.state,
            "executed_by": self.executed_by, "output": json_safe(self.output),
            "error": self.error, "waiting_reason": self.waiting_reason,
            "attempts": [a.to_json() for a in self.attempts], "priority": self.priority,
            "where": self.where, "replicas": self.replicas, "quorum": self.quorum,
            "tag": self.tag, "cached": self.cached, "input_cid": self.input_cid,
            "timings": {"submitted": self.submitted, "started": self.started,
                        "finished": self.finished, **self.runtime},
        }


def output_file(res: TaskResult) -> str | None:
    """The CID of a result's output when it is a file reference (a big output)."""
    out = res.output
    if res.ok and isinstance(out, dict) and isinstance(out.get("$cid"), str) and \
            set(out) <= {"$cid", "size", "format"}:
        return str(out["$cid"])
    return None


def row_json(row: TaskRow) -> dict[str, Any]:
    opts = row.options
    return {"id": row.id, "kind": row.kind, "version": row.version, "state": row.state,
            "executed_by": row.executed_by, "output": json_safe(row.output),
            "error": row.error,
            "waiting_reason": None if row.state in TERMINAL else "waiting to be resumed",
            "attempts": row.attempts, "priority": opts.get("priority", 0),
            "where": opts.get("where", "any"), "replicas": opts.get("replicas", 1),
            # a journal from before quorums has none: every replica had to agree
            "quorum": opts.get("quorum") or opts.get("replicas", 1),
            "tag": opts.get("tag"), "cached": opts.get("cached", False),
            "timings": {"submitted": row.submitted, "started": row.started,
                        "finished": row.finished}}
