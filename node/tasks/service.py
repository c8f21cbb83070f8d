"""Task service, submitter side: accept, journal, route, retry, verify, finish.

A submitted task is journaled before the API answers. The dispatcher then places it:
local executor if this node runs the kind and has a free slot, else the best-scoring live
peer with room (compatibility, latency, cost, health; weights from config), else it waits
with a ``waiting_reason``. One long-lived stream per executor peer carries batches of
assigns one way and signed result batches the other (see protocols/tasks.py), so the cost
of a stream, a signature and a journal transaction is paid per batch, not per task.

Retries: an attempt lost with its peer (stream reset, peer killed, refused) is retried
elsewhere with exponential backoff and jitter, behind a per-peer circuit breaker. An
attempt the executor *ran* and reported failed (bad input, limits) is final. The first
verified result wins; any later one for the same id is ignored, so the client sees each
task finish exactly once, even across kill -9 of either side (the journal replays
unfinished tasks at start and executors return stored results for ids they already ran).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import random
import secrets
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from teammesh.node.p2p.host import (
    PEER_ERRORS,
    STREAM_ERRORS,
    DialError,
    MeshHost,
    Stream,
    single_leaf,
)
from teammesh.node.p2p.protocol_ids import OFFER, TASKS, tasks_topic
from teammesh.node.tasks.executor import Executor, Job, Limits
from teammesh.node.tasks.server import SPOOL_INPUT_BYTES, TaskServer
from teammesh.node.tasks.store import NewTask, Outcome, TaskRow, TaskStore, Txn
from teammesh.protocols import tasks as tp
from teammesh.protocols import wire
from teammesh.protocols.errors import (
    RemoteProtocolError,
    ResultRejected,
    TaskError,
    TeammeshError,
)
from teammesh.protocols.scheduler_model import (
    SchedulerConfig,
    TaskState,
    Wait,
    WaitReason,
    Weights,
)
from teammesh.protocols.scheduler_peers import Breaker, ewma, sane_weights
from teammesh.protocols.scheduler_rules import (
    KindClocks,
    escalate_now,
    fits_resources,
    leave_queue_for_bridge,
    next_queue_check,
    pipeline_depth,
    placement_score,
    queue_wait_s,
    queued_behind_others,
    retry_delay_s,
    settle_quorum,
)
from teammesh.protocols.tasks import TaskResult, TaskSpec, json_safe, make_result
from teammesh.storage.unixfs import FileTooLarge

if TYPE_CHECKING:
    from collections.abc import Mapping

    from teammesh.node.core.audit import AuditLog
    from teammesh.node.core.config import Config, Home
    from teammesh.node.core.journal import Journal
    from teammesh.node.files.service import FilesService
    from teammesh.node.kinds.base import Kind
    from teammesh.node.p2p.membership import Membership
    from teammesh.node.p2p.mesh import Capacity, Mesh
    from teammesh.protocols.identity import Identity

logger = logging.getLogger("teammesh.tasks")

TERMINAL = frozenset({"done", "failed", "cancelled"})
WHERE = ("any", "local", "peers", "bridge")
MAX_INPUT = tp.MAX_INLINE_INPUT
ACK_DELAY_S = 0.01
MEMORY_KEEP = 20_000  # finished tasks kept in memory; older ones are read from the journal
MAX_INTERRUPTIONS = 3  # a task running when the node stopped runs again at most twice
PRUNE_EVERY_S = 3600.0


class NoRoom(enum.Enum):
    """Why no target can take a task now. Control flow reads this, never the text."""

    NOBODY_RUNS = "nobody_runs"  # no live member runs the kind
    NO_SLOTS = "no_slots"  # members run it but offer 0 slots
    NOT_LOCAL = "not_local"  # where=local, and this node cannot
    UNFIT = "unfit"  # the members that run it lack its resources (GPU, memory)
    BUSY = "busy"  # every matching slot is taken


# Reasons that do not pass by waiting for a slot: after the start-up grace, the task fails
# unless its kind ran on the team recently (members that are only unreachable come back).
FINAL = frozenset({NoRoom.NOBODY_RUNS, NoRoom.NO_SLOTS, NoRoom.NOT_LOCAL, NoRoom.UNFIT})


@dataclass(frozen=True, slots=True)
class Waiting:
    why: NoRoom
    text: str  # for people (waiting_reason, errors); rendered here, never parsed

    def __str__(self) -> str:
        return self.text


def fits(resources: Any, memory_bytes: int, gpus: tuple[str, ...]) -> bool:
    """Can a node with this memory and these GPUs run a kind that needs ``resources``?"""
    if resources is None:
        return True
    return fits_resources(int(getattr(resources, "memory_mb", 0)),
                          bool(getattr(resources, "gpu", False)), memory_bytes / 2**20, gpus)


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
    waiting_reason: str | None = None
    cached: bool = False
    # runtime only
    inflight: dict[str, Attempt] = field(default_factory=dict)
    replica_results: dict[str, TaskResult] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    retries: int = 0
    not_before: float = 0.0
    deadline: float | None = None
    waiting_since: float | None = None
    changed: trio.Event = field(default_factory=trio.Event)
    order: int = 0
    runtime: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.quorum:
            self.quorum = self.replicas  # unanimity, as before quorums existed

    def __lt__(self, other: TaskRecord) -> bool:
        return (-self.priority, self.order) < (-other.priority, other.order)

    @property
    def options(self) -> dict[str, Any]:
        return {"priority": self.priority, "where": self.where, "replicas": self.replicas,
                "quorum": self.quorum, "timeout_s": self.timeout_s, "no_cache": self.no_cache,
                "tag": self.tag, "cached": self.cached, "input_cid": self.input_cid}

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

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


@dataclass(slots=True)
class PeerLink:
    """The submitter's stream to one executor peer."""

    peer: str
    outgoing: list[TaskSpec] = field(default_factory=list)
    control: list[bytes] = field(default_factory=list)
    wake: trio.Event = field(default_factory=trio.Event)
    inflight: dict[str, TaskRecord] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    alive: bool = True
    rtt_ms: float = 5.0
    avg_task_s: float | None = None  # our tasks' recent run times there (Rule 6's estimate)
    successes: int = 0
    failures: int = 0
    # cancelled when the peer goes silent (its ad expired): a cut link sends no FIN or RST,
    # and its tasks would otherwise wait on it for ever
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    gone_reason: str | None = None

    def send(self, spec: TaskSpec, record: TaskRecord) -> None:
        self.outgoing.append(spec)
        self.inflight[spec.id] = record
        self.wake.set()

    def send_control(self, frame: bytes) -> None:
        self.control.append(frame)
        self.wake.set()

    @property
    def health(self) -> float:
        return (self.successes + 1) / (self.successes + self.failures + 1)


class TaskService:
    def __init__(self, *, config: Config, home: Home, identity: Identity, journal: Journal,
                 audit: AuditLog, membership: Membership, mesh: Mesh, capacity: Capacity,
                 kinds: Mapping[str, Kind], files: FilesService,
                 stop_requested: trio.Event) -> None:
        """Built by the composition root (node/daemon.py) with the services it uses."""
        self.files = files
        cfg = config
        self.home = home
        self.identity = identity
        self.audit = audit
        self.membership = membership
        self.mesh = mesh
        self.capacity = capacity
        self.stop_requested = stop_requested
        self.store = TaskStore(journal)
        self.kinds = kinds
        self.spool = home.path / "spool"
        self.limits = Limits(
            max_input_mb=int(cfg.get("executor", "max_input_mb")),
            max_output_mb=int(cfg.get("executor", "max_output_mb")),
            kind_input_mb=dict(cfg.get("executor", "kind_max_input_mb")),
            kind_output_mb=dict(cfg.get("executor", "kind_max_output_mb")))
        self.executor = Executor(capacity, allow=list(cfg.get("executor", "allow")),
                                 memory_mb=cfg.get("executor", "memory_mb"),
                                 cpu_s=cfg.get("executor", "cpu_s"),
                                 timeout_s=cfg.get("executor", "timeout_s"),
                                 kinds=kinds, limits=self.limits, spool=self.spool,
                                 store=self._store_spilled)
        self.keep_s = float(cfg.get("journal", "keep_days")) * 86400
        self.cache_ttl_s = float(cfg.get("scheduler", "cache_ttl_s"))
        self.server = TaskServer(
            store=self.store, executor=self.executor, kinds=kinds, files=files,
            identity=identity, audit=audit, run_with_files=self.run_with_files,
            member_queue=int(cfg.get("executor", "member_queue")),
            member_queue_mb=int(cfg.get("executor", "member_queue_mb")))
        self.cache_enabled = bool(cfg.get("scheduler", "cache"))
        self.kind_limits: dict[str, int] = dict(cfg.get("scheduler", "kind_limits"))
        self.default_timeout_s = float(cfg.get("executor", "timeout_s"))
        self.records: OrderedDict[str, TaskRecord] = OrderedDict()
        self._now_running: list[TaskRecord] = []
        self.queue: list[TaskRecord] = []
        self._order = itertools.count()
        self.links: dict[str, PeerLink] = {}
        self.breakers: dict[str, Breaker] = {}  # the scheduler's, with its defaults
        # The rules' parameters (protocols/scheduler_rules.py), shared with the simulations,
        # and the breakers' too. Before "nobody runs kind X" is final (startup grace),
        # every member has had time to advertise.
        w = dict(cfg.get("scheduler", "weights"))
        self.rules = SchedulerConfig(
            weights=sane_weights(Weights(**{k: float(w[k]) for k in (
                "compatibility", "latency", "cost", "health") if k in w})),
            offer_window_s=float(cfg.get("scheduler", "offer_window_s")),
            max_attempts=int(cfg.get("scheduler", "max_attempts")),
            startup_grace_s=float(cfg.get("gossip", "ad_interval_s")) + 1.0)
        # measured on every escalation (the Worker's answer to a submit); the first guess
        # is the rules' default until then
        self.bridge_rtt_s = self.rules.bridge_rtt_s
        self.kind_ms: dict[str, float] = {}
        self.running_by_kind: dict[str, int] = {}
        self._wake = trio.Event()
        self._started_at = 0.0
        self.host: MeshHost | None = None
        self.watchers: dict[str, trio.MemorySendChannel[str]] = {}
        self.bridge: Any = None  # BridgeClient, when the node has a bridge URL and key
        self.offers: dict[str, tuple[str, int, float]] = {}  # peer -> (kind, free, until)
        # peer -> when an admission reply showed it queueing our task behind other
        # members' work: it counts as full until an ad received after that says otherwise
        self.peer_full: dict[str, float] = {}
        # task id -> (the busy member queueing it behind others' work, since, position)
        self.remote_queued: dict[str, tuple[str, float, int]] = {}
        self.kind_clocks = KindClocks()  # Rule 5: since when each kind finds no room
        self._kind_seen: dict[str, float] = {}  # kind -> last time a live ad listed it
        self.last_call: dict[tuple[str, str], float] = {}
        self.calls_to_publish: list[tuple[str, str, int]] = []
        self._calls_wake = trio.Event()
        self.counters = {"submitted": 0, "done": 0, "failed": 0, "cancelled": 0,
                         "retries": 0, "rejected_results": 0, "cache_hits": 0,
                         "calls_published": 0, "offers_received": 0, "offers_sent": 0,
                         "moved": 0}

    # --- submission ---------------------------------------------------------------------
    def _spec_from_request(self, body: dict[str, Any]) -> TaskRecord:
        import base64

        kind = body.get("kind")
        if not isinstance(kind, str) or not kind:
            raise TaskError("'kind' (string) is required")
        raw = body.get("input_b64")
        data = b""
        if raw is not None:
            if not isinstance(raw, str):
                raise TaskError("'input_b64' must be a base64 string")
            try:
                data = base64.b64decode(raw, validate=True)
            except ValueError as exc:
                raise TaskError("'input_b64' is not valid base64") from exc
        if len(data) > MAX_INPUT:
            raise TaskError(f"input is {len(data)} bytes; inline inputs are limited to"
                            f" {MAX_INPUT} bytes (share larger files by CID)")
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise TaskError("'params' must be an object")
        try:
            psize = tp.params_size(params)
        except TeammeshError as exc:
            raise TaskError(f"'params' cannot be encoded: {exc}") from exc
        if psize > tp.MAX_PARAMS_BYTES:
            raise TaskError(f"'params' is {psize} bytes packed; the limit is"
                            f" {tp.MAX_PARAMS_BYTES} (pass big data as the input or by CID)")
        where = body.get("where", "any")
        if where not in WHERE:
            raise TaskError(f"'where' must be one of {', '.join(WHERE)}")
        replicas = body.get("replicas", 1)
        priority = body.get("priority", 0)
        timeout = body.get("timeout_s")
        if not isinstance(replicas, int) or not 1 <= replicas <= 16:
            raise TaskError("'replicas' must be an integer from 1 to 16")
        quorum = body.get("quorum")
        if quorum is None:
            quorum = replicas  # every replica must agree
        elif isinstance(quorum, bool) or not isinstance(quorum, int) \
                or not 1 <= quorum <= replicas:
            raise TaskError(f"'quorum' must be an integer from 1 to 'replicas' ({replicas}):"
                            f" how many of the replicas must agree (got {quorum!r}); lower"
                            " 'quorum' or raise 'replicas'")
        if not isinstance(priority, int):
            raise TaskError("'priority' must be an integer")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise TaskError("'timeout_s' must be a positive number")
        input_cid = body.get("input_cid")
        if input_cid is not None:
            from teammesh.node.files.service import parse_cid

            if not isinstance(input_cid, str):
                raise TaskError("'input_cid' must be a CID string")
            input_cid = str(parse_cid(input_cid))
            if data:
                raise TaskError("give either 'input_b64' or 'input_cid', not both")
        version = body.get("version") or self._known_version(kind) or "1"
        return TaskRecord(
            id=new_task_id(), kind=kind, version=str(version), input=data, params=params,
            priority=priority, where=where, replicas=replicas, quorum=quorum,
            timeout_s=float(timeout) if timeout else None,
            no_cache=bool(body.get("no_cache", False)), tag=body.get("tag"),
            input_cid=input_cid, submitted=time.time())

    def _known_version(self, kind: str) -> str | None:
        k = self.kinds.get(kind)
        if k is not None:
            return k.version
        for e in self.mesh.table.live(trio.current_time()):
            if kind in e.ad.kinds:
                return e.ad.kinds[kind]
        return None

    def submit_many(self, bodies: list[dict[str, Any]]) -> list[TaskRecord]:
        """Validate all, journal all in one transaction, then queue: all or nothing."""
        records = [self._spec_from_request(b) for b in bodies]
        try:
            return self._journal_and_queue(records)
        except sqlite3.OperationalError as exc:
            # nothing was accepted (the transaction rolled back): the caller is told why
            raise TaskError(f"this node's journal cannot take the tasks ({exc}); free disk"
                            f" space in {self.home.path} and submit again") from exc

    def _journal_and_queue(self, records: list[TaskRecord]) -> list[TaskRecord]:
        now = trio.current_time()
        hits: list[TaskRecord] = []
        with self.store.transaction() as txn:
            for r in records:
                if self.cache_enabled and not r.no_cache and r.replicas == 1:
                    hit = txn.cache_lookup(self._cache_key(r), time.time() - self.cache_ttl_s)
                    if hit is not None:
                        r.state, r.output, r.executed_by = "done", hit.output, hit.executed_by
                        r.cached, r.started, r.finished = True, r.submitted, r.submitted
                        hits.append(r)
                txn.insert_task(NewTask(
                    id=r.id, kind=r.kind, version=r.version, input=r.input, params=r.params,
                    options=r.options, state=r.state, submitted=r.submitted,
                    executed_by=r.executed_by, output=r.output, has_output=r.state == "done",
                    started=r.started, finished=r.finished))
        self.counters["submitted"] += len(records)
        self.counters["cache_hits"] += len(hits)
        for r in records:
            self._remember(r)
            if r.state == "queued":
                if r.timeout_s:
                    r.deadline = now + r.timeout_s
                self._enqueue(r)
        self._wake.set()
        return records

    def _cache_key(self, r: TaskRecord) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([r.kind, r.version, r.params, r.input_cid], sort_keys=True,
                            separators=(",", ":")).encode())
        h.update(b"\0")
        h.update(r.input)
        return h.hexdigest()

    def _remember(self, r: TaskRecord) -> None:
        self.records[r.id] = r
        while len(self.records) > MEMORY_KEEP:
            oldest_id, oldest = next(iter(self.records.items()))
            if oldest.state not in TERMINAL:
                break
            del self.records[oldest_id]

    def _enqueue(self, r: TaskRecord) -> None:
        r.order = next(self._order)
        heapq.heappush(self.queue, r)

    def get(self, task_id: str) -> TaskRecord | dict[str, Any] | None:
        r = self.records.get(task_id)
        if r is not None:
            return r
        row = self.store.get(task_id)
        return None if row is None else _row_json(row)

    def list_tasks(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        out = []
        for row in self.store.listing(state, limit):
            live = self.records.get(row.id)
            out.append(live.to_json() if live is not None else _row_json(row))
        return out

    def cancel(self, task_id: str) -> TaskRecord:
        r = self.records.get(task_id)
        if r is None:
            raise TaskError(f"no active task {task_id}")
        if r.state in TERMINAL:
            return r
        self._cancel_attempts(r)
        self._finalise(r, "cancelled", error="cancelled by the user")
        return r

    def _cancel_attempts(self, r: TaskRecord, why: str | None = None) -> None:
        """Tell every target still running ``r`` to stop: the task ends without them.
        ``why`` goes on their attempts (the user's cancel leaves them as they were)."""
        for peer, attempt in list(r.inflight.items()):
            if why is not None and attempt.error is None:
                attempt.error = why
            if peer == "local":
                self.executor.cancel(r.id)
            elif peer in self.links:
                link = self.links[peer]
                link.send_control(tp.cancel([r.id]))
                link.inflight.pop(r.id, None)
                link.sent_at.pop(r.id, None)

    # --- results ------------------------------------------------------------------------
    def _finalise(self, r: TaskRecord, state: str, *, output: Any = None,
                  error: str | None = None, executed_by: str | None = None,
                  result: TaskResult | None = None, db: Txn | None = None) -> None:
        if r.state in TERMINAL:
            return
        # running_by_kind counts tasks in state running (placed, not back in the queue)
        was_running = r.state == "running"
        r.state, r.output, r.error = state, output, error
        r.executed_by = executed_by
        r.finished = time.time()
        r.waiting_reason = None
        if result is not None:
            r.runtime = {"wall_ms": result.wall_ms, "cpu_ms": result.cpu_ms}
        for peer in r.inflight:
            if peer in self.links:
                self.links[peer].inflight.pop(r.id, None)
        for a in r.inflight.values():
            a.ended = r.finished
        r.inflight.clear()
        self._running_delta(r.kind, -1 if was_running else 0)
        self.counters[state] = self.counters.get(state, 0) + 1
        txn = db if db is not None else self.store.autocommit
        txn.finish(Outcome(r.id, state, executed_by, output, error,
                           [a.to_json() for a in r.attempts], r.started, r.finished))
        if (state == "done" and self.cache_enabled and not r.no_cache and r.replicas == 1):
            txn.cache_put(self._cache_key(r), output, executed_by, r.finished)
        self.audit.append("result", task=r.id, kind=r.kind, state=state, by=executed_by)
        r.notify()
        watcher = self.watchers.pop(r.id, None)
        if watcher is not None:
            watcher.send_nowait(r.id)  # sized to its batch: never blocks
        self._wake.set()

    def watch(self, r: TaskRecord, channel: trio.MemorySendChannel[str]) -> None:
        if r.state not in TERMINAL:
            self.watchers[r.id] = channel

    def unwatch(self, r: TaskRecord) -> None:
        self.watchers.pop(r.id, None)

    def _back_to_queue(self, r: TaskRecord) -> None:
        """Its last attempt ended without a result: it is queued again, and no longer
        counts against its kind's limit (kind_limits) until it is placed again."""
        if r.state == "running" and not r.inflight:
            r.state = "queued"
            self._running_delta(r.kind, -1)

    def _running_delta(self, kind: str, delta: int) -> None:
        self.running_by_kind[kind] = max(0, self.running_by_kind.get(kind, 0) + delta)

    def apply_results(self, peer: str, results: list[TaskResult], db: Txn) -> None:
        """Verified results from ``peer`` ('local' for our executor)."""
        for res in results:
            r = self.records.get(res.id)
            if r is None or r.state in TERMINAL or peer not in r.inflight:
                continue
            attempt = r.inflight.pop(peer)
            attempt.ended = time.time()
            if not res.ok:
                attempt.error = res.error
            old = self.kind_ms.get(r.kind, res.wall_ms)
            self.kind_ms[r.kind] = 0.8 * old + 0.2 * res.wall_ms
            if r.replicas == 1:
                if res.ok:
                    self._finalise(r, "done", output=res.output, executed_by=peer, result=res,
                                   db=db)
                else:
                    self._finalise(r, "failed", error=f"{res.error} (on {peer})",
                                   executed_by=peer, result=res, db=db)
                continue
            r.replica_results[peer] = res
            self._settle_replicas(r, db)

    def _settle_replicas(self, r: TaskRecord, db: Txn) -> None:
        """Rule 9, the scheduler's own function: done as soon as ``quorum`` results carry
        one digest (the output is theirs, ``executed_by`` lists them), failed as soon as
        no digest can reach it counting the replicas still out. A failed result is an
        outcome of its own (its digest covers ok and the error). Replicas still running
        when it settles are cancelled: their answer can no longer change it."""
        results = r.replica_results
        verdict = settle_quorum({p: (res.digest, res.ok) for p, res in results.items()},
                                r.replicas, r.quorum)
        if verdict.state is TaskState.RUNNING:
            return
        self._cancel_attempts(r, f"cancelled: the task settled on {len(results)} of"
                              f" {r.replicas} replicas")
        failure = verdict.failure
        if verdict.by:  # the quorum agreed, on an output or on a failure
            first = results[verdict.by[0]]
            by = ",".join(verdict.by)
            if failure is None:
                self._finalise(r, "done", output=first.output, executed_by=by, result=first,
                               db=db)
            else:
                on = ("all replicas" if len(verdict.by) == r.replicas else
                      f"{len(verdict.by)} of {r.replicas} replicas: {', '.join(verdict.by)}")
                self._finalise(r, "failed", error=f"{first.error} (on {on})", executed_by=by,
                               db=db)
            return
        assert failure is not None  # no agreement possible: REPLICAS_DISAGREE
        errors = "".join(f"; {p} failed: {res.error}" for p, res in results.items()
                         if not res.ok)
        self._finalise(r, "failed", error=failure.render() + errors,
                       executed_by=",".join(results), db=db)

    def attempt_lost(self, r: TaskRecord, peer: str, reason: str) -> None:
        """An attempt ended without a result (peer gone, refused): retry elsewhere."""
        attempt = r.inflight.pop(peer, None)
        if attempt is not None:
            attempt.ended = time.time()
            attempt.error = reason
        if r.state in TERMINAL:
            return
        r.excluded.add(peer)
        r.retries += 1
        self.counters["retries"] += 1
        if r.retries >= self.rules.max_attempts:
            self._finalise(r, "failed", error=f"gave up after {r.retries} attempts; last: "
                           f"{peer} failed with {reason}")
            return
        delay = retry_delay_s(r.retries, self.rules, random.uniform(0.5, 1.5))
        r.not_before = trio.current_time() + delay
        r.waiting_reason = (f"retry {r.retries + 1} of {self.rules.max_attempts} in {delay:.1f} s "
                            f"after {peer} failed with: {reason}")
        self._back_to_queue(r)
        if not r.inflight or len(r.inflight) < r.replicas:
            self._enqueue(r)
        r.notify()
        self._wake.set()

    def _requeue_busy(self, r: TaskRecord, peer: str, message: str) -> None:
        """The peer had no room (or this submitter used its share there): the task waits
        a moment and is placed again. Not a failure: a busy team delays a task, it never
        uses up its attempts."""
        attempt = r.inflight.pop(peer, None)
        if attempt is not None:
            attempt.ended, attempt.error = time.time(), f"busy: {message}"
        if r.state in TERMINAL:
            return
        r.not_before = trio.current_time() + random.uniform(0.05, 0.25)
        r.waiting_reason = f"{peer} is busy ({message}); placing it again"
        self._back_to_queue(r)
        self._enqueue(r)
        r.notify()
        self._wake.set()

    # --- placement ----------------------------------------------------------------------
    def _pipeline(self, kind: str, rtt_ms: float = 0.0) -> int:
        """Tasks to keep queued per peer slot beyond the running one (Rule 5's
        pipelining, protocols/scheduler_rules.pipeline_depth)."""
        ms = self.kind_ms.get(kind)
        return pipeline_depth(None if ms is None else ms / 1000, rtt_ms / 1000, self.rules)

    def _candidates(self, r: TaskRecord,
                    now: float) -> tuple[list[tuple[float, str]], Waiting | None]:
        """Scored targets with room, or why there are none."""
        out: list[tuple[float, str]] = []
        behind: list[tuple[float, str]] = []  # busy with others' work: a last resort
        runners = 0
        idle_runners = 0  # run the kind but offer no slots
        unfit = 0  # run the kind but lack its resources
        matching_slots = 0
        taken = set(r.inflight) | set(r.replica_results)
        w = self.rules.weights
        known = self.kinds.get(r.kind)
        needs = known.resources if known is not None else None
        mesh = self.mesh
        local_fits = fits(needs, mesh.memory_bytes, mesh.gpus)
        if r.where in ("any", "local") and r.kind in self.kinds and self.executor.slots > 0 \
                and not local_fits:
            unfit += 1
        elif r.where in ("any", "local") and r.kind in self.kinds and self.executor.slots > 0:
            runners += 1
            matching_slots += self.executor.slots
            free = self.executor.slots - self.capacity.busy - self.capacity.queue
            # local with a free slot always wins, and so does a task that runs at once
            inline = not r.input_cid and self.executor.runs_inline(r.kind, len(r.input))
            if (free > 0 or inline) and "local" not in taken:
                out.append((1e9, "local"))
        if r.where in ("any", "peers"):
            for e in self.mesh.table.live(now):
                ad = e.ad
                if r.kind not in ad.kinds:
                    continue
                self._kind_seen[r.kind] = now
                if ad.slots == 0:
                    idle_runners += 1
                    continue
                if not fits(needs, ad.memory_bytes, ad.gpus):
                    unfit += 1
                    continue
                runners += 1
                matching_slots += ad.slots
                peer = ad.peer_id
                if peer in taken or peer in r.excluded:
                    continue
                br = self.breakers.get(peer)
                if br is not None and not br.allows(now, e.received):
                    continue
                link = self.links.get(peer)
                inflight = len(link.inflight) if link else 0
                window = ad.slots * (1 + self._pipeline(r.kind, link.rtt_ms if link else 0.0))
                offered = self._offered(peer, r.kind, now)
                full_at = self.peer_full.get(peer)
                full = full_at is not None and full_at >= e.received  # no newer ad yet
                if offered:
                    window = max(window, inflight + offered)
                elif (inflight == 0 and ad.free_slots == 0) or full:
                    # Busy with other members' work: a task sent now would wait in its
                    # queue while another peer or the bridge could start it. (Our own
                    # tasks in flight there are what its ad counts when we pipeline.) It
                    # queues there only if nothing else can take it: the executor then
                    # gives us our turn among its submitters (one place per slot). An
                    # admission reply that queued our task behind others' work marks it
                    # full until its next ad, however its last ad counted.
                    if inflight < max(1, ad.slots):
                        rtt = link.rtt_ms if link else 5.0
                        behind.append((1.0 / (1 + ad.queue / max(1, ad.slots)) / (1 + rtt),
                                       peer))
                    continue
                if inflight >= window:
                    continue
                rtt = link.rtt_ms if link else 5.0
                health = link.health if link else 1.0
                score = placement_score(ad.kinds[r.kind] == r.version, rtt, ad.cost, health,
                                        w) * (1 - inflight / window)
                out.append((score, peer))
        if r.where in ("any", "peers"):
            # members that answered an open call but whose ad we have not seen
            for peer, (kind, free, until) in self.offers.items():
                if kind != r.kind or until <= now or peer in taken or peer in r.excluded:
                    continue
                if self.mesh.table.get(peer, now) is not None:
                    continue
                runners += 1
                link = self.links.get(peer)
                if (len(link.inflight) if link else 0) < free:
                    out.append((1.0, peer))
        if out:
            return out, None
        if behind and not self._bridge_could_take(r):
            return behind, None
        if (runners == 0 and unfit and r.where != "local") or (r.where == "local" and unfit):
            need = "a GPU" if getattr(needs, "gpu", False) else \
                f"{getattr(needs, 'memory_mb', 0)} MiB of memory"
            return [], Waiting(NoRoom.UNFIT, f"the {unfit} members that run kind {r.kind}"
                               f" lack what it needs ({need})")
        if runners == 0 and idle_runners and r.where != "local":
            return [], Waiting(NoRoom.NO_SLOTS,
                               f"no member runs kind {r.kind} with free capacity: the"
                               f" {idle_runners} that run it offer 0 slots (no capacity)")
        if runners == 0:
            if r.where == "local":
                return [], Waiting(NoRoom.NOT_LOCAL,
                                   f"this node does not run kind {r.kind} (or has no slots)")
            return [], Waiting(NoRoom.NOBODY_RUNS, f"no member runs kind {r.kind}")
        if r.excluded and len(r.excluded) >= runners:
            # Every runner failed it once: try them again (the retry budget still bounds
            # this); a lost stream is usually a passing network event, not a bad peer.
            r.excluded.clear()
            return self._candidates(r, now)
        return [], Waiting(NoRoom.BUSY, f"all {matching_slots} matching slots busy")

    def _drop_silent_links(self, now: float) -> None:
        """End links to peers whose ad expired (or who were revoked): their tasks move."""
        table = self.mesh.table
        for link in list(self.links.values()):
            if not link.inflight or table.get(link.peer, now) is not None:
                continue
            offer = self.offers.get(link.peer)
            if offer is not None and offer[2] > now:
                continue
            link.gone_reason = "it went silent (its capability ad expired)"
            link.scope.cancel()

    def _dispatch_once(self, nursery: trio.Nursery) -> None:
        now = trio.current_time()
        self._drop_silent_links(now)
        if self.remote_queued:
            self._recheck_remote_queued(now, nursery)
        uptime = now - self._started_at
        deferred: list[TaskRecord] = []
        reasons_changed: list[TaskRecord] = []
        local_batch: list[TaskRecord] = []
        no_room: dict[tuple[str, str], Waiting] = {}
        hits = 0
        while self.queue:
            if hits >= 32:
                # A long run of tasks with no room: stop if the rest of the queue can only
                # be the same (a heap pop per waiting task per result was most of the cost)
                hits = 0
                if self._rest_waits(no_room, now):
                    break
            r = heapq.heappop(self.queue)
            try:
                if r.state in TERMINAL:
                    continue
                if r.deadline is not None and now >= r.deadline:
                    self._finalise(r, "failed", error=f"deadline of {r.timeout_s:g} s exceeded")
                    continue
                if r.not_before > now:
                    deferred.append(r)
                    continue
                if r.where == "bridge":
                    if self.bridge is None:
                        self._finalise(r, "failed", error="no bridge configured for this node"
                                       " (set [bridge] url or use --bridge URL)")
                        continue
                    why_not = self._bridge_cannot_run(r, explicit=True)
                    if why_not is not None:
                        self._finalise(r, "failed", error=why_not)
                        continue
                    if "bridge" not in r.inflight:
                        self._escalate(r, nursery, now)
                    continue
                limit = self.kind_limits.get(r.kind)
                if limit is not None and self.running_by_kind.get(r.kind, 0) >= limit:
                    deferred.append(r)
                    self._set_reason(r, f"kind limit: {limit} {r.kind} tasks already running",
                                     reasons_changed)
                    continue
                needed = r.replicas - len(r.inflight) - len(r.replica_results)
                if needed <= 0:
                    continue
                # In a pass, a task that is neither placed, retried nor replicated gets the same
                # answer as the last such task of its kind and placement when that answer was
                # "no room" (placing others only takes room). Without this, a queue of 2,000
                # waiting tasks cost 2,000 candidate scans per result, most of a submitter's CPU.
                plain = not r.inflight and not r.replica_results and not r.excluded
                key = (r.kind, r.where)
                waiting: Waiting | None
                candidates: list[tuple[float, str]]
                if plain and key in no_room:
                    candidates, waiting = [], no_room[key]
                    hits += 1
                else:
                    hits = 0
                    candidates, waiting = self._candidates(r, now)
                    if waiting is not None and plain:
                        no_room[key] = waiting
                if waiting is not None and self._should_escalate(r, waiting, now, uptime):
                    self._escalate(r, nursery, now)
                    continue
                if waiting is not None:
                    text = waiting.text
                    if waiting.why in FINAL:
                        seen = self._kind_seen.get(r.kind)
                        if uptime <= self.rules.startup_grace_s:
                            text += " (waiting for peers to announce themselves)"
                        elif waiting.why is NoRoom.NOBODY_RUNS and seen is not None \
                                and now - seen < self.rules.kind_memory_s:
                            # members that ran it are unreachable, not gone: a laptop whose
                            # network drops must not fail its whole queue (the machine's
                            # WaitReason.UNREACHABLE, with the same text)
                            text = Wait(WaitReason.UNREACHABLE, kind=r.kind,
                                        until=seen).render(now)
                        else:
                            self._finalise(r, "failed",
                                           error=text + self._known_kinds_hint())
                            continue
                    deferred.append(r)
                    self._set_reason(r, text, reasons_changed)
                    self._note_waiting(r, now)
                    continue
                self.kind_clocks.placed((r.kind, r.version))
                candidates.sort(reverse=True)
                chosen = [p for _, p in candidates[:needed]]
                for peer in chosen:
                    self._assign(r, peer, nursery, local_batch)
                if len(r.inflight) + len(r.replica_results) < r.replicas:
                    deferred.append(r)
                    self._set_reason(r, f"{len(r.inflight)} of {r.replicas} replicas placed;"
                                     " waiting for more distinct members", reasons_changed)
            except Exception as exc:
                # One task's placement must never stop the dispatcher (a hostile ad once
                # made every member's loop divide by zero): the task fails, loudly.
                logger.exception("placing task %s (%s) failed", r.id, r.kind)
                self._finalise(r, "failed", error=f"internal error while placing the task:"
                               f" {type(exc).__name__}: {exc}")
        if self.queue:
            for r in deferred:
                heapq.heappush(self.queue, r)
        else:
            self.queue = deferred  # popped in order: a sorted list is already a heap
        for r in reasons_changed:
            r.notify()
        self._persist_running()
        for r in local_batch:
            self._run_local(r)

    def _persist_running(self) -> None:
        """Journal which tasks started: one that was running when the node died is
        counted at restart (MAX_INTERRUPTIONS), so no task can crash-loop a node."""
        if not self._now_running:
            return
        # only a run on this node can be what stopped it: a task on a peer is unaffected
        # by our restarts and stays 'queued' in the journal (it is re-sent at start)
        rows = [(r.id, r.started) for r in self._now_running
                if r.state == "running" and "local" in r.inflight]
        self._now_running = []
        with self.store.transaction() as txn:
            txn.mark_running(rows)

    def _rest_waits(self, no_room: dict[tuple[str, str], Waiting], now: float) -> bool:
        """Would every task still queued just wait again (no room for its kind, nothing
        to fail, time out or escalate)?"""
        if self.bridge is not None:
            return False
        for waiting in no_room.values():
            if waiting.why in FINAL:
                return False
        for t in self.queue:
            if t.state in TERMINAL:
                continue
            if (t.kind, t.where) not in no_room or t.inflight or t.replica_results \
                    or t.excluded or (t.deadline is not None and t.deadline <= now):
                return False
        return True

    # --- escalation to the Cloudflare bridge ---------------------------------------------------
    def _bridge_could_take(self, r: TaskRecord) -> bool:
        """Would this task escalate if it found no room (so it need not queue behind
        other members' work)?"""
        br = self.breakers.get("bridge")
        return (self.bridge is not None and r.where == "any" and r.replicas == 1
                and self._bridge_cannot_run(r) is None
                and (br is None or br.allows(trio.current_time())))

    def _bridge_cannot_run(self, r: TaskRecord, *, explicit: bool = False) -> str | None:
        """Why the bridge cannot be given this task with its data, or None. The Worker
        reads an input file from the R2 mirror, or queues the task for pull-mode members
        (which fetch it over the mesh): asked explicitly, that is the user's call; as an
        escalation it needs the mirror, or the task could wait there for a puller while
        a mesh peer frees up. File params ({"$cid"}) the Worker never runs itself: it
        queues them for pull-mode members, so they go to the bridge only when asked."""
        if not explicit and any(tp.is_cid_ref(v) for v in r.params.values()):
            return ("the bridge queues tasks with file ({\"$cid\"}) params for pull-mode"
                    " members; ask for it with --where bridge")
        if r.input_cid is not None and not explicit and \
                self.files.mirror is None:
            return ("the bridge reads input files from the R2 mirror, and this node has no"
                    " mirror configured ([r2] in config.toml)")
        return None

    def _should_escalate(self, r: TaskRecord, waiting: Waiting, now: float,
                         uptime: float) -> bool:
        if self.bridge is None or r.where != "any" or r.replicas != 1 or "bridge" in r.inflight:
            return False
        if self._bridge_cannot_run(r) is not None:
            return False
        br = self.breakers.get("bridge")
        if br is not None and not br.allows(now):
            return False
        # The clock is the kind's: once tasks of a kind have found no room for a whole
        # window, the next one need not wait another (sustained saturation escalates in
        # milliseconds, not one window per task). Placing any task of the kind resets it.
        kind_since = self.kind_clocks.waiting((r.kind, r.version), now, self.rules)
        r.waiting_since = min(r.waiting_since if r.waiting_since is not None else now,
                              kind_since)
        if waiting.why in (NoRoom.UNFIT, NoRoom.NOT_LOCAL):
            return False  # the bridge has no GPU either; where=local never escalates
        nobody = waiting.why in (NoRoom.NOBODY_RUNS, NoRoom.NO_SLOTS)
        if nobody and uptime <= self.rules.startup_grace_s:
            return False
        # saturated or empty mesh: give peers one offer window to free up first (no queue
        # with a known wait is open to it, or it would have been a candidate)
        return nobody or escalate_now(now, r.waiting_since, self.rules, self.bridge_rtt_s)

    def _escalate(self, r: TaskRecord, nursery: trio.Nursery, now: float) -> None:
        attempt = Attempt("bridge", time.time())
        r.attempts.append(attempt)
        r.inflight["bridge"] = attempt
        if r.state == "queued":
            r.state = "running"
            r.started = r.started or attempt.started
            self._running_delta(r.kind, 1)
            self._now_running.append(r)
        r.waiting_reason = "sent to the bridge"
        r.notify()
        nursery.start_soon(self._run_on_bridge, r)

    async def _run_on_bridge(self, r: TaskRecord) -> None:
        try:
            await self._run_on_bridge_unguarded(r)
        except Exception as exc:
            # the bridge's answer is untrusted input: it can fail this task, nothing else
            logger.exception("task %s on the bridge", r.id)
            attempt = r.inflight.pop("bridge", None)
            if attempt is not None:
                attempt.ended, attempt.error = time.time(), str(exc)
            self._finalise(r, "failed", error=f"the bridge's answer could not be used:"
                           f" {type(exc).__name__}: {exc}", executed_by="bridge")

    async def _run_on_bridge_unguarded(self, r: TaskRecord) -> None:
        import base64

        from teammesh.node.bridge.client import BridgeRejected, BridgeUnavailable, decode_task

        assert self.bridge is not None
        body: dict[str, Any] = {"id": r.id, "kind": r.kind, "version": r.version,
                                "params": r.params, "priority": r.priority,
                                "submitter": self.identity.peer_id}
        if r.input_cid is not None:
            body["input_cid"] = r.input_cid  # the Worker reads it from the R2 mirror
        else:
            body["input_b64"] = base64.b64encode(r.input).decode()
        breaker = self.breakers.setdefault("bridge", Breaker())
        try:
            sent = trio.current_time()
            task = await self.bridge.submit(body)
            self.bridge_rtt_s = ewma(self.bridge_rtt_s, trio.current_time() - sent)
            delay = 0.05
            while task.get("state") not in TERMINAL and r.state not in TERMINAL:
                r.waiting_reason = f"queued at the bridge ({task.get('state')})"
                await trio.sleep(delay)
                delay = min(2.0, delay * 1.5)
                task = await self.bridge.get(r.id)
        except BridgeRejected as exc:
            breaker.success()
            r.inflight.pop("bridge", None)
            self._finalise(r, "failed", error=f"the bridge refused it: {exc}",
                           executed_by="bridge")
            return
        except BridgeUnavailable as exc:
            breaker.failure(trio.current_time(), self.rules)
            # The bridge being down is not the task's fault: it waits (journaled) and is
            # retried; it is never failed for this.
            attempt = r.inflight.pop("bridge", None)
            if attempt is not None:
                attempt.ended, attempt.error = time.time(), str(exc)
            if r.state not in TERMINAL:
                wait = max(1.0, breaker.open_until - trio.current_time())
                r.not_before = trio.current_time() + wait
                r.waiting_reason = (f"no peer has capacity and the bridge is unreachable"
                                    f" ({exc}); retrying in {wait:.0f} s")
                self._back_to_queue(r)
                self._enqueue(r)
                r.notify()
                self._wake.set()
            return
        breaker.success()
        if r.state == "cancelled" and task.get("state") not in TERMINAL:
            # the user cancelled while the bridge held it: tell the Worker, so a pull
            # member does not run it for nothing (best effort: the result is ignored)
            await self._cancel_on_bridge(r.id)
            return
        if r.state in TERMINAL or "bridge" not in r.inflight:
            return
        r.inflight.pop("bridge").ended = time.time()
        decoded = decode_task(task, r.id)
        output = decoded.output
        # "bridge" when the Worker ran it, a pull-mode member's peer id when one did
        by = decoded.executed_by or "bridge"
        with self.store.transaction() as db:
            if task.get("state") == "done":
                self._finalise(r, "done", output=output, executed_by=by, db=db)
            else:
                self._finalise(r, "failed", error=f"{task.get('error')} (on {by})",
                               executed_by=by, db=db)

    async def _measure_bridge(self) -> None:
        """Seed the bridge's round trip with one health check at start, so Rule 6 does
        not decide on the rules' 1 s guess until the first escalation measures it."""
        sent = trio.current_time()
        with trio.move_on_after(10):
            try:
                await self.bridge.health()
            except Exception as exc:  # the bridge's answer is untrusted: never the service's end
                logger.info("bridge health check at start failed (%s): its round trip is"
                            " measured at the first escalation", exc)
                return
            self.bridge_rtt_s = trio.current_time() - sent

    async def _cancel_on_bridge(self, task_id: str) -> None:
        from teammesh.node.bridge.client import BridgeRejected, BridgeUnavailable

        assert self.bridge is not None
        try:
            await self.bridge.cancel(task_id)
        except (BridgeRejected, BridgeUnavailable) as exc:
            logger.info("could not cancel %s at the bridge (its result will be ignored):"
                        " %s", task_id, exc)

    def _offered(self, peer: str, kind: str, now: float) -> int:
        offer = self.offers.get(peer)
        if offer is None or offer[0] != kind or offer[2] <= now:
            return 0
        return offer[1]

    def _note_waiting(self, r: TaskRecord, now: float) -> None:
        """Tasks of a kind waited past the offer window: ask the team (open call)."""
        key = (r.kind, r.version)
        since = self.kind_clocks.waiting(key, now, self.rules)
        if now - since >= self.rules.offer_window_s and now - self.last_call.get(key, -1e9) >= 1.0:
            self.last_call[key] = now
            self.calls_to_publish.append((r.kind, r.version, 1))
            self._calls_wake.set()

    def _known_kinds_hint(self) -> str:
        names: set[str] = set(self.kinds)
        for e in self.mesh.table.live(trio.current_time()):
            names.update(e.ad.kinds)
        return f"; kinds the team runs: {', '.join(sorted(names)) or 'none'}"

    def _set_reason(self, r: TaskRecord, reason: str, changed: list[TaskRecord]) -> None:
        if r.waiting_reason != reason:
            r.waiting_reason = reason
            changed.append(r)

    def _assign(self, r: TaskRecord, peer: str, nursery: trio.Nursery,
                local_batch: list[TaskRecord]) -> None:
        attempt = Attempt(peer, time.time())
        r.attempts.append(attempt)
        r.inflight[peer] = attempt
        if r.state == "queued":
            r.state = "running"
            r.started = r.started or attempt.started
            self._running_delta(r.kind, 1)
            self._now_running.append(r)
        r.waiting_reason = None
        if peer == "local":
            local_batch.append(r)
            return
        link = self.links.get(peer)
        if link is None or not link.alive:
            link = PeerLink(peer)
            self.links[peer] = link
            nursery.start_soon(self._run_link, link)
        timeout = r.timeout_s or self.default_timeout_s
        link.send(TaskSpec(r.id, r.kind, r.version, r.input, r.params, int(timeout * 1000),
                           r.priority, r.input_cid), r)
        r.waiting_reason = f"queued on {peer}" if r.replicas == 1 else None
        link.sent_at[r.id] = trio.current_time()

    def _run_local(self, r: TaskRecord) -> None:
        timeout = r.timeout_s or self.default_timeout_s
        spec = TaskSpec(r.id, r.kind, r.version, r.input, r.params, int(timeout * 1000),
                        r.priority, r.input_cid)
        job = Job(spec, "local", self._local_done)
        if spec.needs_files:
            try:
                self.files.start_job(functools.partial(self.run_with_files, job, []))
            except TeammeshError as exc:  # too many transfers now: a wait, not a failure
                self._requeue_busy(r, "local", str(exc))
            return
        self.executor.submit_nowait(job)

    async def run_with_files(self, job: Job, peers: list[str]) -> None:
        """Fetch a job's input files into the spool (from ``peers`` first), then queue it.

        The worker reads them from disk: a file input never sits whole in the daemon's
        memory or rides a pipe frame."""
        spec = job.spec
        limit = self.limits.input_bytes(spec.kind)
        try:
            if len(spec.input) > SPOOL_INPUT_BYTES:
                path = self.spool / f"in-{secrets.token_hex(8)}"
                await trio.to_thread.run_sync(_write_private, path, spec.input)
                job.input_path = path
                job.spec = spec = dataclasses.replace(spec, input=b"")
            if spec.input_cid is not None:
                job.input_path = await self._fetch_to_spool(spec.input_cid, peers, limit)
            for key, value in spec.params.items():
                if tp.is_cid_ref(value):
                    job.param_paths[key] = await self._fetch_to_spool(value["$cid"], peers,
                                                                      limit)
            total = sum(p.stat().st_size for p in (job.input_path, *job.param_paths.values())
                        if p is not None)
        except (TeammeshError, OSError) as exc:
            job.remove_files()
            job.deliver(job, make_result(spec.id, False, None,
                                         f"cannot fetch input file: {exc}", 0, 0))
            return
        job.input_size = total + len(spec.input)
        self.executor.submit_nowait(job)

    async def _fetch_to_spool(self, cid_text: str, peers: list[str], max_bytes: int) -> Path:
        dest = self.spool / f"in-{secrets.token_hex(8)}"
        await self.files.fetch_to_path(cid_text, dest, peers, max_bytes)
        return dest

    async def _store_spilled(self, path: Path) -> dict[str, Any]:
        """A worker's big output, added to the block store: the result carries its CID."""
        return dict(await self.files.store_path(path))

    def _local_done(self, job: Job | None, result: TaskResult) -> None:
        with self.store.transaction() as db:
            self.apply_results("local", [result], db)

    # --- links to executor peers ----------------------------------------------------------
    async def _run_link(self, link: PeerLink) -> None:
        assert self.host is not None
        reason = "connection lost"
        try:
            with link.scope:
                stream = await self.host.open_stream(link.peer, TASKS)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._link_writer, link, stream)
                        await self._link_reader(link, stream)
                        nursery.cancel_scope.cancel()
                except ExceptionGroup as group:
                    # One side of the link failed; judge it by what failed, below. A group
                    # of several, or a bug, propagates unchanged.
                    raise single_leaf(group) from None
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await stream.reset()
                reason = "stream closed by the peer"
            if link.scope.cancelled_caught:
                reason = link.gone_reason or "link dropped"
        except DialError as exc:
            reason = f"cannot reach it ({exc})"
        except (RemoteProtocolError, ResultRejected) as exc:
            reason = str(exc)
            self.counters["rejected_results"] += isinstance(exc, ResultRejected)
            logger.warning("dropping link to %s: %s", link.peer, exc)
            with trio.CancelScope(shield=True):
                await self.host.strike(link.peer, reason)
        except STREAM_ERRORS as exc:
            reason = f"connection lost ({type(exc).__name__})"
        except Exception as exc:
            # what a peer sends can reset its stream and cost it health, never the service
            reason = f"its stream failed: {type(exc).__name__}: {exc}"
            logger.exception("dropping link to %s after an unexpected error", link.peer)
        finally:
            link.alive = False
            if self.links.get(link.peer) is link:
                del self.links[link.peer]
            now = trio.current_time()
            self.breakers.setdefault(link.peer, Breaker()).failure(now, self.rules)
            for r in list(link.inflight.values()):
                self.attempt_lost(r, link.peer, reason)
            link.inflight.clear()
            self._wake.set()

    async def _link_writer(self, link: PeerLink, stream: Stream) -> None:
        while True:
            await link.wake.wait()
            if not link.outgoing:
                # acks are never urgent: let them ride with the next assign or a few more acks
                with trio.move_on_after(ACK_DELAY_S):
                    while not link.outgoing:
                        link.wake = trio.Event()
                        await link.wake.wait()
            link.wake = trio.Event()
            frames = link.control
            link.control = []
            if link.outgoing:
                batch, link.outgoing = link.outgoing, []
                frames.extend(tp.assign(part) for part in tp.chunks(batch, lambda t: t.size_hint))
            if frames:
                await stream.write(b"".join(frames))

    async def _link_reader(self, link: PeerLink, stream: Stream) -> None:
        decoder = wire.FrameDecoder()
        me = self.identity.peer_id
        while True:
            data = await stream.read()
            if not data:
                return
            for frame in decoder.feed(data):
                match tp.decode_frame(frame):
                    case tp.Accepted() as acc:
                        self._on_accepted(link, acc)
                    case tp.Results(sealed=sealed):
                        self._on_results(link, tp.open_results(sealed, link.peer, me))
                    case tp.Progress(ids=ids):
                        self._on_progress(link, ids)
                    case _:
                        pass  # S → E messages, or a newer peer's: nothing to do here

    def _on_accepted(self, link: PeerLink, acc: tp.Accepted) -> None:
        now = trio.current_time()
        for tid in acc.ids:
            sent = link.sent_at.pop(tid, None)
            if sent is not None:
                link.rtt_ms = 0.9 * link.rtt_ms + 0.1 * (now - sent) * 1000
        for refusal in acc.refused:
            link.sent_at.pop(refusal.id, None)
            r = link.inflight.pop(refusal.id, None)
            if r is None:
                continue
            if refusal.code is tp.RefuseCode.BUSY:
                self._requeue_busy(r, link.peer, refusal.message)
            else:
                self.attempt_lost(r, link.peer,
                                  f"refused ({refusal.code.value}): {refusal.message}")
        if acc.positions is not None:
            self._on_admission(link, acc.positions, now)

    def _on_admission(self, link: PeerLink, positions: dict[str, int], now: float) -> None:
        """The executor's admission reply, one round trip after the assign: each task
        started (0) or waits in its queue at a position. A task queued behind other
        members' work (more tasks ahead of it there than ours) may wait long (it may be a
        60 s task): the peer counts as full until a newer ad, and the task is placed again
        at once if another peer advertises a free slot. Otherwise it stays, and Rule 6
        (``_recheck_remote_queued``) moves it when a slot frees elsewhere, or to the bridge
        once the bridge's round trip is shorter than its wait there. The executor gives
        each submitter its turn meanwhile."""
        slots = self._slots_of(link.peer, now)
        own = len(link.inflight)
        moves: list[TaskRecord] = []
        for tid, pos in positions.items():
            r = link.inflight.get(tid)
            if r is None or r.state in TERMINAL or pos <= 0:
                continue
            r.waiting_reason = f"queued on {link.peer} at position {pos}"
            r.notify()
            if not queued_behind_others(own, slots, pos):
                continue  # pipelined behind our own tasks: their times are known and short
            self.peer_full[link.peer] = now
            if r.replicas == 1 and self._free_elsewhere(r, link.peer, now):
                moves.append(r)
            elif r.replicas == 1:
                self.remote_queued[r.id] = (link.peer, now, pos)
        for r in moves:
            self._move_off(r, link, "it queued the task behind other members' work")

    def _recheck_remote_queued(self, now: float, nursery: trio.Nursery) -> None:
        """Rule 6: a task in a busy member's queue behind others' work moves as soon as
        another member advertises a free slot, or to the bridge once it has waited an offer
        window there and the bridge's measured round trip is shorter than the wait left
        (estimated from our tasks' recent times on that member, or the time already
        waited if longer): protocols/scheduler_rules.leave_queue_for_bridge."""
        for tid, (peer, queued_at, pos) in list(self.remote_queued.items()):
            r = self.records.get(tid)
            link = self.links.get(peer)
            if r is None or r.state in TERMINAL or link is None or tid not in link.inflight:
                del self.remote_queued[tid]
            elif self._free_elsewhere(r, peer, now):
                del self.remote_queued[tid]
                self._move_off(r, link, "a member with a free slot appeared")
            elif self._bridge_could_take(r) and leave_queue_for_bridge(
                    now, queued_at, self.rules, self.bridge_rtt_s,
                    self._queued_left(link, pos, now)):
                del self.remote_queued[tid]
                self._take_back(r, link, "the bridge starts it sooner than its queue there")
                self._escalate(r, nursery, now)

    def _queued_left(self, link: PeerLink, position: int, now: float) -> float:
        return queue_wait_s(link.avg_task_s, position, self._slots_of(link.peer, now))

    def _slots_of(self, peer: str, now: float) -> int:
        """A live member's advertised slots (at least 1: it queued our task, so it runs)."""
        entry = self.mesh.table.get(peer, now)
        return max(1, entry.ad.slots) if entry is not None else 1

    def _next_queue_check(self, now: float) -> float:
        """When Rule 6 can next send a task in a busy member's queue to the bridge."""
        if self.bridge is None:
            return math.inf
        soonest = math.inf
        for tid, (_peer, since, _pos) in self.remote_queued.items():
            r = self.records.get(tid)
            if r is not None and self._bridge_could_take(r):
                soonest = min(soonest, next_queue_check(now, since, self.rules,
                                                        self.bridge_rtt_s))
        return soonest

    def _free_elsewhere(self, r: TaskRecord, peer: str, now: float) -> bool:
        """Does another live member that runs this kind advertise a free slot that our
        own tasks in flight there do not already take?"""
        for e in self.mesh.table.live(now):
            p = e.ad.peer_id
            if p == peer or p in r.excluded or r.kind not in e.ad.kinds:
                continue
            link = self.links.get(p)
            if e.ad.free_slots - (len(link.inflight) if link else 0) <= 0:
                continue
            full_at = self.peer_full.get(p)
            if full_at is None or full_at < e.received:
                return True
        return False

    def _take_back(self, r: TaskRecord, link: PeerLink, why: str) -> None:
        """Take a task out of a peer's queue (cancel it there). Not a failure: it costs
        no attempt and no breaker strike."""
        link.send_control(tp.cancel([r.id]))
        link.inflight.pop(r.id, None)
        link.sent_at.pop(r.id, None)
        attempt = r.inflight.pop(link.peer, None)
        if attempt is not None:
            attempt.ended, attempt.error = time.time(), f"moved: {why}"
        self.counters["moved"] += 1
        r.excluded.add(link.peer)  # not back there for this task while others can run it

    def _move_off(self, r: TaskRecord, link: PeerLink, why: str) -> None:
        """Take a task out of a peer's queue and place it again now."""
        self._take_back(r, link, why)
        self._back_to_queue(r)
        r.not_before = 0.0
        r.waiting_reason = f"moved off {link.peer}: {why}"
        self._enqueue(r)
        r.notify()
        self._wake.set()

    def _on_results(self, link: PeerLink, results: list[TaskResult]) -> None:
        for res in results:
            link.inflight.pop(res.id, None)
            link.sent_at.pop(res.id, None)
            if math.isfinite(res.wall_ms) and res.wall_ms >= 0:
                link.avg_task_s = ewma(link.avg_task_s, min(res.wall_ms, 86_400_000) / 1000)
        files = [res for res in results if _output_file(res) is not None]
        if files:
            results = [res for res in results if _output_file(res) is None]
            for res in files:
                try:
                    self.files.start_job(
                        functools.partial(self._collect_output, link.peer, res))
                except TeammeshError as exc:  # too many transfers: the task runs again
                    r = self.records.get(res.id)
                    if r is not None and link.peer in r.inflight:
                        self.attempt_lost(r, link.peer, f"its output could not be fetched"
                                          f" now: {exc}")
        with self.store.transaction() as db:
            self.apply_results(link.peer, results, db)
        link.successes += len(results)
        self.breakers.setdefault(link.peer, Breaker()).success()
        link.send_control(tp.ack([res.id for res in results]))
        self._wake.set()

    def _on_progress(self, link: PeerLink, ids: list[str]) -> None:
        for tid in ids:
            self.remote_queued.pop(tid, None)  # running there now: it stays
            r = link.inflight.get(tid)
            if r is not None and r.state == "running":
                r.waiting_reason = None
                r.notify()

    async def _collect_output(self, peer: str, res: TaskResult) -> None:
        """A result whose output is a file on the executor: copy the file here (pinned)
        before the task is done, so the output outlives the executor."""
        r = self.records.get(res.id)
        cid = _output_file(res)
        if r is None or r.state in TERMINAL or peer not in r.inflight or cid is None:
            return
        # bounded by the kind's output limit on this node, not only files.max_file_mb:
        # the size the result claims is checked first, the root block's claim by the pin,
        # and the real size after it
        limit = self.limits.output_bytes(r.kind)
        claimed = res.output.get("size") if isinstance(res.output, dict) else None
        if isinstance(claimed, int) and claimed > limit:
            self._output_too_big(r, peer, claimed)
            return
        r.waiting_reason = f"fetching its output ({cid}) from {peer}"
        r.notify()
        try:
            # refused at the file's root block if it claims more than the limit
            await self.files.pin(cid, max_bytes=limit)
            from teammesh.node.files.service import parse_cid

            size = await trio.to_thread.run_sync(self.files.store.file_size, parse_cid(cid))
        except FileTooLarge as exc:  # final: another member would make the same output
            self._output_too_big(r, peer, exc.size)
            return
        except TeammeshError as exc:
            self.attempt_lost(r, peer, f"its output {cid} could not be fetched: {exc}")
            return
        if size > limit:
            await self.files.unpin(cid)
            self._output_too_big(r, peer, size)
            return
        if r.state in TERMINAL or peer not in r.inflight:
            return
        with self.store.transaction() as db:
            self.apply_results(peer, [res], db)

    def _output_too_big(self, r: TaskRecord, peer: str, size: int) -> None:
        """The task ran, and its output is over this node's limit for the kind: final
        (another member would make the same output)."""
        if r.state in TERMINAL or peer not in r.inflight:
            return  # moved, lost or finished meanwhile: that attempt no longer counts
        attempt = r.inflight.pop(peer, None)
        error = self.limits.output_error(r.kind, size)
        if attempt is not None:
            attempt.ended, attempt.error = time.time(), error
        self._finalise(r, "failed", error=f"{error} (on {peer}); raise the limit on this"
                       " node to collect it", executed_by=peer)

    # --- service --------------------------------------------------------------------------
    def _resume_from_journal(self) -> int:
        now = trio.current_time()
        resumed = 0
        for row in self.store.unfinished():
            if row.state == "running":
                # it was running when the node stopped: if it is what stops the node, a
                # crash loop would follow; run it again at most twice, then fail it
                interrupted = row.interrupted + 1
                self.store.count_interruption(row.id, interrupted)
                if interrupted >= MAX_INTERRUPTIONS:
                    self.store.fail_interrupted(
                        row.id, f"the node stopped while running it ({interrupted} times);"
                        " it is not run again", time.time())
                    self.counters["failed"] += 1
                    logger.warning("task %s (%s) failed: the node stopped while running it"
                                   " %d times", row.id, row.kind, interrupted)
                    continue
            resumed += 1
            opts = row.options
            replicas = opts.get("replicas", 1)
            # journals from before quorums have none: every replica must agree, as then
            quorum = opts.get("quorum")
            if not isinstance(quorum, int) or not 1 <= quorum <= replicas:
                quorum = replicas
            r = TaskRecord(
                id=row.id, kind=row.kind, version=row.version, input=row.input,
                params=row.params, priority=opts.get("priority", 0),
                where=opts.get("where", "any"), replicas=replicas, quorum=quorum,
                timeout_s=opts.get("timeout_s"), no_cache=opts.get("no_cache", False),
                tag=opts.get("tag"), input_cid=opts.get("input_cid"),
                submitted=row.submitted, started=row.started)
            r.attempts = [Attempt(a["peer"], a["started"], a.get("ended"),
                                  a.get("error") or "interrupted by a restart")
                          for a in row.attempts]
            if r.timeout_s:
                r.deadline = now + r.timeout_s
            self._remember(r)
            self._enqueue(r)
        return resumed

    async def run(self, host: MeshHost, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.host = host
        self._started_at = trio.current_time()
        self.spool.mkdir(mode=0o700, exist_ok=True)
        for leftover in self.spool.iterdir():  # a crash's inputs and outputs
            leftover.unlink(missing_ok=True)
        self.store.exec_recover()
        host.set_handler(TASKS, self.server.handle_stream)
        resumed = self._resume_from_journal()
        if resumed:
            logger.info("resuming %d unfinished tasks from the journal", resumed)
        host.set_handler(OFFER, self._handle_offer)
        team, _ = self.membership.require_team()
        topic = tasks_topic(team.team_id)
        host.set_validator(topic, self._validate_call)
        # a peer with room (or a new peer) can place waiting tasks: wake the dispatcher
        self.mesh.on_peers_changed.append(lambda: self._wake.set())
        try:
            async with host.subscribe(topic) as calls, trio.open_nursery() as nursery:
                await nursery.start(self.executor.run)
                nursery.start_soon(self._dispatch_loop, nursery)
                nursery.start_soon(self._publish_calls, host, topic)
                nursery.start_soon(self._prune_loop)
                if self.bridge is not None:
                    nursery.start_soon(self._measure_bridge)
                task_status.started()
                async for origin, data in calls:
                    try:
                        self._on_call(origin, data, nursery)
                    except Exception:
                        logger.exception("open call from %s", origin)
        finally:
            if self.stop_requested.is_set():
                # a clean stop interrupted nothing: only a crash counts against a task
                self.store.requeue_running()

    async def _prune_loop(self) -> None:
        while True:
            try:
                gone = self.store.prune(time.time(), self.keep_s, self.cache_ttl_s)
            except sqlite3.OperationalError as exc:  # busy: next time
                logger.warning("journal prune failed: %s", exc)
            else:
                if any(gone.values()):
                    logger.info("journal: forgot %(tasks)d finished tasks, %(cache)d cache"
                                " entries, %(exec)d executor rows", gone)
                    for tid in [t for t, r in self.records.items() if r.state in TERMINAL
                                and (r.finished or 0) < time.time() - self.keep_s]:
                        del self.records[tid]
            await trio.sleep(PRUNE_EVERY_S)

    # --- open calls and offers ---------------------------------------------------------------
    def _validate_call(self, origin: str, forwarder: str, data: bytes) -> bool:
        membership = self.membership
        if not (membership.is_member(origin) and membership.is_member(forwarder)):
            return False
        try:
            return isinstance(tp.decode_frame(data, max_bytes=wire.MAX_GOSSIP_BYTES), tp.Call)
        except RemoteProtocolError:
            return False

    def _on_call(self, origin: str, data: bytes, nursery: trio.Nursery) -> None:
        if origin == self.identity.peer_id:
            return
        try:
            msg = tp.decode_frame(data, max_bytes=wire.MAX_GOSSIP_BYTES)
        except RemoteProtocolError:
            return
        if not isinstance(msg, tp.Call):
            return
        kind = self.kinds.get(msg.kind)
        cap = self.capacity
        free = cap.slots - cap.busy - cap.queue
        if kind is None or kind.version != msg.version or free <= 0:
            return
        nursery.start_soon(self._send_offer, origin, msg.call_id, kind.name, free)

    async def _send_offer(self, peer: str, call_id: str, kind: str, free: int) -> None:
        assert self.host is not None
        try:
            with trio.fail_after(5):
                stream = await self.host.open_stream(peer, OFFER)
                await stream.write(tp.offer(call_id[:64], kind, free))
                await stream.close()
            self.counters["offers_sent"] += 1
        except PEER_ERRORS as exc:
            logger.debug("offer to %s failed: %s", peer, exc)

    async def _handle_offer(self, stream: Stream) -> None:
        from teammesh.node.p2p.membership import read_message

        msg = tp.decode(await read_message(stream, 4096, 5))
        await stream.close()
        if not isinstance(msg, tp.Offer):
            raise RemoteProtocolError("expected an offer")
        until = trio.current_time() + max(self.rules.offer_window_s, 1.0)
        self.offers[stream.peer_id] = (msg.kind, msg.free, until)
        self.counters["offers_received"] += 1
        self._wake.set()

    async def _publish_calls(self, host: MeshHost, topic: str) -> None:
        while True:
            await self._calls_wake.wait()
            self._calls_wake = trio.Event()
            calls, self.calls_to_publish = self.calls_to_publish, []
            for kind, version, count in calls:
                try:
                    await host.publish(topic, tp.call(new_task_id(), kind, version, count))
                    self.counters["calls_published"] += 1
                except STREAM_ERRORS:
                    logger.debug("call publish failed", exc_info=True)

    async def _dispatch_loop(self, nursery: trio.Nursery) -> None:
        while True:
            self._dispatch_once(nursery)
            # Results, new links, offers and peer-table changes set _wake; time itself
            # only matters for retries (not_before), deadlines and the end of an offer
            # window. Sleep until the first of those instead of polling a waiting queue.
            now = trio.current_time()
            # a waiting queue is re-checked four times a second (start-up grace, room that
            # frees without a wake-up); an empty one sleeps until something arrives
            soonest = now + 0.25 if self.queue else math.inf
            for r in self.queue:
                if r.not_before > now:
                    soonest = min(soonest, r.not_before)
                if r.deadline is not None:
                    soonest = min(soonest, r.deadline)
                if r.waiting_since is not None and self.bridge is not None \
                        and r.waiting_since + self.rules.offer_window_s > now:
                    soonest = min(soonest, r.waiting_since + self.rules.offer_window_s)
            if self.remote_queued:
                soonest = min(soonest, self._next_queue_check(now))
            with trio.move_on_at(max(soonest, now + 0.001)):
                await self._wake.wait()
            self._wake = trio.Event()

    async def wait(self, task_id: str) -> TaskRecord | dict[str, Any] | None:
        """Until the task ends; callers bound it with move_on_after."""
        r = self.records.get(task_id)
        if r is None:
            return self.get(task_id)
        while r.state not in TERMINAL:
            await r.changed.wait()
        return r

    def metrics_lines(self) -> list[str]:
        lines = []
        for k, v in self.counters.items():
            lines += [f"# TYPE teammesh_tasks_{k}_total counter", f"teammesh_tasks_{k}_total {v}"]
        lines += ["# TYPE teammesh_tasks_queued gauge", f"teammesh_tasks_queued {len(self.queue)}"]
        return lines

    def kinds_json(self) -> list[dict[str, Any]]:
        table: dict[tuple[str, str], dict[str, Any]] = {}
        for k in self.kinds.values():
            table[(k.name, k.version)] = {"name": k.name, "version": k.version,
                                          "description": k.description, "local": True,
                                          "peers": 0, "portable": k.portable}
        for e in self.mesh.table.live(trio.current_time()):
            for name, ver in e.ad.kinds.items():
                entry = table.setdefault((name, ver), {"name": name, "version": ver,
                                                       "description": "", "local": False,
                                                       "peers": 0, "portable": False})
                entry["peers"] += 1
        return sorted(table.values(), key=lambda d: (d["name"], d["version"]))


def _output_file(res: TaskResult) -> str | None:
    """The CID of a result's output when it is a file reference (a big output)."""
    out = res.output
    if res.ok and isinstance(out, dict) and isinstance(out.get("$cid"), str) and \
            set(out) <= {"$cid", "size", "format"}:
        return str(out["$cid"])
    return None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _row_json(row: TaskRow) -> dict[str, Any]:
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
