"""Task service, submitter side: the I/O shell around the scheduler.

Where a task runs is decided by ``protocols/scheduler.py`` (``Scheduler``), a pure state
machine, and only there (its rules: docs/SCHEDULER.md). This service feeds it what
happens, each with the time: submissions and journaled tasks at start, the mesh table's
verified ads and open-call offers (``PeerAd``/``PeerGone``), this node's own executor
capacity (``PeerAd(LOCAL)``), admission replies, verified results, lost links, the
bridge's answers and round trip, cancels, and the clock (``Tick`` at
``next_wakeup()``). It carries out what the scheduler returns, in order: assign on a
peer's stream (``Send``), run on the local executor (``RunLocal``), escalate to the
Cloudflare bridge (``Escalate``), cancel an attempt (``CancelRemote``), show why a task
waits (``Persist``) and end it (``Finished``). What stays here is I/O and what users
read: the journal, streams, files, the bridge's HTTP, and the texts, rendered from the
scheduler's typed reasons (with what only the shell knows: a refusal's message, the
mesh's view of who runs a kind).

One long-lived stream per executor peer carries batches of assigns one way and signed
result batches the other (see protocols/tasks.py), so the cost of a stream, a signature
and a journal transaction is paid per batch, not per task. The first verified result
wins; any later one for the same id is ignored, so the client sees each task finish
exactly once, even across kill -9 of either side (the journal replays unfinished tasks at
start and executors return stored results for ids they already ran).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
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
from teammesh.node.tasks.records import (
    TERMINAL,
    Attempt,
    TaskRecord,
    new_task_id,
    output_file,
    row_json,
)
from teammesh.node.tasks.server import SPOOL_INPUT_BYTES, TaskServer
from teammesh.node.tasks.store import NewTask, Outcome, TaskStore, Txn
from teammesh.node.tasks.submission import record_from_request
from teammesh.protocols import scheduler_model as sm
from teammesh.protocols import tasks as tp
from teammesh.protocols import wire
from teammesh.protocols.errors import (
    RemoteProtocolError,
    ResultRejected,
    TaskError,
    TeammeshError,
)
from teammesh.protocols.scheduler import Scheduler
from teammesh.protocols.scheduler_model import BRIDGE, LOCAL, SchedulerConfig, Weights
from teammesh.protocols.scheduler_peers import Breaker, sane_weights
from teammesh.protocols.scheduler_rules import fits_resources
from teammesh.protocols.tasks import TaskResult, TaskSpec, make_result
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

ACK_DELAY_S = 0.01
MEMORY_KEEP = 20_000  # finished tasks kept in memory; older ones are read from the journal
MAX_INTERRUPTIONS = 3  # a task running when the node stopped runs again at most twice
PRUNE_EVERY_S = 3600.0
OFFER_MEMORY_MB = 2**24  # what an offer's ad claims: as much as any kind asks (clamped)
RECHECK_S = 0.25  # while tasks are held, the scheduler looks at the time this often
# Waits that ask the team for room (an open call) once a task has waited an offer window
CALL_WAITS = frozenset({sm.WaitReason.ALL_BUSY, sm.WaitReason.NO_RUNNER,
                        sm.WaitReason.UNREACHABLE, sm.WaitReason.REPLICAS_PENDING,
                        sm.WaitReason.BRIDGE_DOWN})


_WHERE = {w.value: w for w in sm.Where}


def fits(resources: Any, memory_bytes: int, gpus: tuple[str, ...]) -> bool:
    """Can a node with this memory and these GPUs run a kind that needs ``resources``?"""
    if resources is None:
        return True
    return fits_resources(int(getattr(resources, "memory_mb", 0)),
                          bool(getattr(resources, "gpu", False)), memory_bytes / 2**20, gpus)


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

    def forget(self, task_id: str) -> None:
        self.inflight.pop(task_id, None)
        self.sent_at.pop(task_id, None)

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
        self.default_timeout_s = float(cfg.get("executor", "timeout_s"))
        self.records: OrderedDict[str, TaskRecord] = OrderedDict()
        self._now_running: list[TaskRecord] = []
        self.links: dict[str, PeerLink] = {}
        # The scheduler's parameters from [scheduler]. Before "nobody runs kind X" is
        # final (startup grace), every member has had time to advertise.
        w = dict(cfg.get("scheduler", "weights"))
        self.rules = SchedulerConfig(
            weights=sane_weights(Weights(**{k: float(w[k]) for k in (
                "compatibility", "latency", "cost", "health") if k in w})),
            offer_window_s=float(cfg.get("scheduler", "offer_window_s")),
            max_attempts=int(cfg.get("scheduler", "max_attempts")),
            startup_grace_s=float(cfg.get("gossip", "ad_interval_s")) + 1.0,
            kind_limits=dict(cfg.get("scheduler", "kind_limits")))
        self.bridge: Any = None  # BridgeClient, when the node has a bridge URL and key
        # rebuilt by run() once the bridge is known (it is set after construction)
        self.sched = self._new_scheduler()
        self._live: dict[str, TaskRecord] = {}  # the tasks the scheduler holds
        self._inbox: list[sm.Event] = []
        self._results_held = False  # results in the inbox: the next pass is journaled
        self._acks: list[tuple[PeerLink, list[str]]] = []  # sent once their pass commits
        self._handling = False
        self._nursery: trio.Nursery | None = None
        self._txn: Txn | None = None  # the journal transaction of a frame of results
        # what the scheduler was last told about each peer (its ad entry, or an offer)
        self._fed: dict[str, object] = {}
        self._peers_dirty = True
        self._next_expiry = math.inf
        self._local_fed: tuple[int, int, int] | None = None
        self._wake = trio.Event()
        self._sleeping_until = math.inf  # when the clock loop wakes by itself
        self._started_at = 0.0
        self.host: MeshHost | None = None
        self.watchers: dict[str, trio.MemorySendChannel[str]] = {}
        self.offers: dict[str, tuple[str, int, float]] = {}  # peer -> (kind, free, until)
        self.last_call: dict[tuple[str, str], float] = {}
        self.calls_to_publish: list[tuple[str, str, int]] = []
        self._calls_wake = trio.Event()
        self._next_call_check = 0.0
        self.counters = {"submitted": 0, "done": 0, "failed": 0, "cancelled": 0,
                         "retries": 0, "rejected_results": 0, "cache_hits": 0,
                         "calls_published": 0, "offers_received": 0, "offers_sent": 0,
                         "moved": 0}

    def _new_scheduler(self) -> Scheduler:
        cfg = dataclasses.replace(self.rules, bridge=self.bridge is not None,
                                  persist_waits=False)
        return Scheduler(cfg, jitter=lambda: random.uniform(0.5, 1.5))

    # --- what the API and metrics read ----------------------------------------------------
    @property
    def bridge_rtt_s(self) -> float:
        """The bridge's round trip as the scheduler weighs it (measured once it answers)."""
        return self.sched.bridge_rtt_s

    @property
    def breakers(self) -> dict[str, Breaker]:
        return self.sched.breakers()

    @property
    def running_by_kind(self) -> dict[str, int]:
        return self.sched.running_by_kind()

    @property
    def queued_count(self) -> int:
        return self.sched.queued()

    # --- submission ---------------------------------------------------------------------
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
        records = [record_from_request(b, self._known_version) for b in bodies]
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
        events: list[sm.Event] = []
        for r in records:
            self._remember(r)
            if r.state != "queued":
                continue
            if r.timeout_s:
                r.deadline = now + r.timeout_s
            if self._runs_inline_here(r):
                self._run_inline(r)
                continue
            self._live[r.id] = r
            events.append(sm.Submitted(self._task_of(r)))
        if events:  # cache hits and inline runs need no pass of the scheduler
            self._post(events)
        return records

    def _task_of(self, r: TaskRecord) -> sm.Task:
        """What the scheduler needs to know of a task (inputs and params stay here)."""
        kind = self.kinds.get(r.kind)
        needs = kind.resources if kind is not None else None
        return sm.Task(
            r.id, r.kind, r.version, priority=r.priority, where=_WHERE[r.where],
            replicas=r.replicas, quorum=r.quorum, deadline=r.deadline,
            memory_mb=int(getattr(needs, "memory_mb", 0) or 0),
            gpu=bool(getattr(needs, "gpu", False)),
            # (read only when a bridge is configured)
            bridge_ok=self.bridge is None or r.where == "bridge"
            or self._bridge_cannot_run(r) is None)

    def _runs_inline_here(self, r: TaskRecord) -> bool:
        """Kinds that run at once inside this daemon (a small hash) need no place: they
        run before the scheduler sees them, like a cache hit."""
        return (r.where in ("any", "local") and r.replicas == 1 and r.kind in self.kinds
                and self.executor.slots > 0 and r.input_cid is None
                and r.kind not in self.rules.kind_limits
                and not any(tp.is_cid_ref(v) for v in r.params.values())
                and self.executor.runs_inline(r.kind, len(r.input))
                and fits(self.kinds[r.kind].resources, self.mesh.memory_bytes, self.mesh.gpus))

    def _run_inline(self, r: TaskRecord) -> None:
        self._open_attempt(r, LOCAL)
        r.state = "running"
        self._run_local(r, trio.current_time(), admit=False)

    def _cache_key(self, r: TaskRecord) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([r.kind, r.version, r.params, r.input_cid], sort_keys=True,
                            separators=(",", ":")).encode())
        h.update(b"\0")
        h.update(r.input)
        return h.hexdigest()

    def _remember(self, r: TaskRecord) -> None:
        r.render = self._render_wait
        self.records[r.id] = r
        while len(self.records) > MEMORY_KEEP:
            oldest_id, oldest = next(iter(self.records.items()))
            if oldest.state not in TERMINAL:
                break
            del self.records[oldest_id]


    def get(self, task_id: str) -> TaskRecord | dict[str, Any] | None:
        r = self.records.get(task_id)
        if r is not None:
            return r
        row = self.store.get(task_id)
        return None if row is None else row_json(row)

    def list_tasks(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        out = []
        for row in self.store.listing(state, limit):
            live = self.records.get(row.id)
            out.append(live.to_json() if live is not None else row_json(row))
        return out


    def cancel(self, task_id: str) -> TaskRecord:
        r = self.records.get(task_id)
        if r is None:
            raise TaskError(f"no active task {task_id}")
        if r.state in TERMINAL:
            return r
        if r.id in self._live:
            self._feed([sm.Cancelled(r.id)])  # Finished(CANCELLED), its attempts cancelled
        if r.state not in TERMINAL:  # not the scheduler's (an inline run): nothing to stop
            self._finalise(r, "cancelled", error="cancelled by the user")
        return r

    # --- results ------------------------------------------------------------------------
    def _finalise(self, r: TaskRecord, state: str, *, output: Any = None,
                  error: str | None = None, executed_by: str | None = None,
                  result: TaskResult | None = None) -> None:
        if r.state in TERMINAL:
            return
        self._live.pop(r.id, None)
        r.state, r.output, r.error = state, output, error
        r.executed_by = executed_by
        r.finished = time.time()
        r.note = None
        if result is not None and result.wall_ms:
            r.runtime = {"wall_ms": result.wall_ms, "cpu_ms": result.cpu_ms}
        for target in list(r.inflight):
            self._close_attempt(r, target, None)
        self.counters[state] = self.counters.get(state, 0) + 1
        txn = self._txn if self._txn is not None else self.store.autocommit
        txn.finish(Outcome(r.id, state, executed_by, output, error,
                           [a.to_json() for a in r.attempts], r.started, r.finished))
        if (state == "done" and self.cache_enabled and not r.no_cache and r.replicas == 1):
            txn.cache_put(self._cache_key(r), output, executed_by, r.finished)
        self.audit.append("result", task=r.id, kind=r.kind, state=state, by=executed_by)
        # a finished record stays in memory (MEMORY_KEEP) for reads: what only a live task
        # needs goes, or 20,000 of them hold every result twice and slow the collector
        r.results.clear()
        r.render = None
        r.notify()
        watcher = self.watchers.pop(r.id, None)
        if watcher is not None:
            watcher.send_nowait(r.id)  # sized to its batch: never blocks

    def watch(self, r: TaskRecord, channel: trio.MemorySendChannel[str]) -> None:
        if r.state not in TERMINAL:
            self.watchers[r.id] = channel

    def unwatch(self, r: TaskRecord) -> None:
        self.watchers.pop(r.id, None)

    # --- the scheduler: events in, effects out --------------------------------------------
    def _feed(self, events: Iterable[sm.Event] = ()) -> None:
        """Tell the scheduler what happened and carry out what it decides. Carrying out
        an effect can cause events (an inline run's result, a refusal): they queue and
        are handled next, in order, so the scheduler is never entered twice at once.
        Results waiting in the inbox are journaled in one transaction for the pass, and
        acknowledged to their executors once it is committed."""
        self._inbox.extend(events)
        if self._handling or self._nursery is None:
            return  # the running call (or run(), once started) takes them
        if self._results_held and self._txn is None:
            self._results_held = False
            self._handle_journaled()
        else:
            self._handle_inbox()
        # the clock loop sleeps until the scheduler's wake-up as it was: an earlier one
        # now (a deadline, a retry, tasks held) must wake it
        wakeup = self.sched.next_wakeup()
        if self._live:
            wakeup = min(wakeup or math.inf, trio.current_time() + RECHECK_S)
        if wakeup is not None and wakeup < self._sleeping_until:
            self._wake.set()

    def _handle_journaled(self) -> None:
        try:
            with self.store.transaction() as db:
                self._txn = db
                try:
                    self._handle_inbox()
                finally:
                    self._txn = None
        except sqlite3.Error as exc:
            # the tasks are settled here but not in the journal: after a restart they run
            # again (nothing is lost); a full disk must not stop the node
            logger.error("the journal could not record finished tasks (%s); free disk space"
                         " in %s", exc, self.home.path)
            if self._inbox:  # the transaction never began
                self._handle_inbox()
            return
        acks, self._acks = self._acks, []
        for link, ids in acks:
            link.send_control(tp.ack(ids))

    def _handle_inbox(self) -> None:
        self._handling = True
        try:
            while True:
                now = trio.current_time()
                self._sync_capacity(now)
                batch, self._inbox = self._inbox, []
                try:
                    effects = self.sched.handle_many(batch, now)
                except Exception:
                    # a scheduler bug must not stop the node; the events before the failing
                    # one were applied (handle_many's contract), the rest are lost
                    logger.exception("the scheduler failed on %d events; please report it",
                                     len(batch))
                    effects = []
                self._carry_out(effects, now)
                if not self._inbox:
                    break
        finally:
            self._handling = False
        self._persist_running()

    def _post(self, events: Iterable[sm.Event]) -> None:
        """Events that can wait for the clock loop's next pass (a trio checkpoint away):
        submissions and admission replies from many requests and frames then cost the
        scheduler one pass, not one each. Results and cancels go through ``_feed`` at
        once: a user waits on them."""
        self._inbox.extend(events)
        self._wake.set()

    def _sync_capacity(self, now: float) -> None:
        """Bring the scheduler's picture of the team up to date: the mesh table's live ads
        and offers (``PeerAd``, ``PeerGone`` for those gone) and this node's executor."""
        if self._peers_dirty or now >= self._next_expiry:
            self._peers_dirty = False
            self._sync_peers(now)
        ex = self.executor
        held = len(ex.by_id)  # set as a job is accepted, before it starts: no double count
        local = (ex.slots, max(0, ex.slots - held), max(0, held - ex.slots))
        if local != self._local_fed:
            self._local_fed = local
            kinds = {name: k.version for name, k in self.kinds.items()} if ex.slots else {}
            self._inbox.append(sm.PeerAd(LOCAL, kinds, *local, self.mesh.memory_bytes / 2**20,
                                         tuple(self.mesh.gpus)))

    def _sync_peers(self, now: float) -> None:
        fed: dict[str, object] = {}
        expiry = math.inf
        for e in self.mesh.table.live(now):
            peer = e.ad.peer_id
            if peer == self.identity.peer_id:
                continue
            fed[peer] = e
            expiry = min(expiry, e.expires)
            if self._fed.get(peer) is not e:
                link = self.links.get(peer)
                self._inbox.append(sm.PeerAd.from_capability(
                    e.ad, link.rtt_ms if link is not None else None))
        # members that answered an open call but whose ad we have not seen: an ad for the
        # offer's window
        for peer, (kind, free, until) in list(self.offers.items()):
            if until <= now:
                del self.offers[peer]
                continue
            if peer in fed:
                continue
            offer = (kind, free, until)
            fed[peer] = offer
            expiry = min(expiry, until)
            if self._fed.get(peer) != offer:
                version = next((v for (k, v) in self.last_call if k == kind), "")
                # An offer answers our call for the kind: the member says it runs it now.
                # It names no memory; with 0 the scheduler would count it a member too
                # small for the kind, and a task whose members had just dropped off would
                # fail "no member runs it" instead of waiting for them (a chaos run did).
                self._inbox.append(sm.PeerAd(peer, {kind: version}, free, free, 0,
                                             memory_mb=OFFER_MEMORY_MB))
        for peer in self._fed.keys() - fed.keys():
            self._inbox.append(sm.PeerGone(peer))
        self._fed = fed
        self._next_expiry = expiry

    def _carry_out(self, effects: Sequence[sm.Effect], now: float) -> None:
        # why an attempt stops (its task's Finished, or an escalation moving it): looked
        # up only for a CancelRemote, rare beside the Sends and Finisheds of a pass
        finishing: dict[str, sm.Finished] | None = None
        escalating: set[str] = set()
        for effect in effects:
            try:
                match effect:  # the common effects first: each case is an isinstance
                    case sm.Send(peer=peer, task=task):
                        self._send(peer, task.id, now)
                    case sm.Persist():
                        self._on_persist(effect, now)
                    case sm.Finished():
                        self._on_finished(effect)
                    case sm.RunLocal(task=task):
                        self._start_local(task.id, now)
                    case sm.Escalate(task=task):
                        self._start_bridge(task.id)
                    case sm.CancelRemote(target=target, task_id=task_id):
                        if finishing is None:
                            finishing = {e.task_id: e for e in effects
                                         if isinstance(e, sm.Finished)}
                            escalating = {e.task.id for e in effects
                                          if isinstance(e, sm.Escalate)}
                        self._cancel_attempt(target, task_id, finishing.get(task_id),
                                             task_id in escalating)
            except Exception as exc:
                # one task's effect (a stream, a spool file) can fail that attempt, never
                # the service: the scheduler hears it as lost and places the task again
                logger.exception("carrying out %s failed", type(effect).__name__)
                placed = _placement_of(effect)
                if placed is not None:
                    lost = self._lost(placed[0], placed[1], sm.Loss.REFUSED,
                                      f"internal error: {type(exc).__name__}: {exc}")
                    if lost is not None:
                        self._inbox.append(lost)

    def _open_attempt(self, r: TaskRecord, target: str) -> Attempt:
        attempt = Attempt(target, time.time())
        r.attempts.append(attempt)
        r.inflight[target] = attempt
        r.waiting_since = None
        if r.started is None:
            r.started = attempt.started
        return attempt

    def _close_attempt(self, r: TaskRecord, target: str, error: str | None) -> None:
        attempt = r.inflight.pop(target, None)
        if attempt is not None:
            attempt.ended = time.time()
            if error is not None and attempt.error is None:
                attempt.error = error
        link = self.links.get(target)
        if link is not None:
            link.forget(r.id)

    def _lost(self, task_id: str, target: str, loss: sm.Loss,
              reason: str) -> sm.AttemptLost | None:
        """An attempt ended without a result: the event for the scheduler (which retries
        it elsewhere, Rule 8), or None if that attempt no longer counts."""
        r = self._live.get(task_id)
        if r is None or target not in r.inflight:
            return None
        self._close_attempt(r, target, reason)
        r.losses[target] = reason
        self.counters["retries"] += 1
        return sm.AttemptLost(task_id, target, loss)

    def _send(self, peer: str, task_id: str, now: float) -> None:
        r = self._live.get(task_id)
        if r is None:
            return
        self._open_attempt(r, peer)
        link = self.links.get(peer)
        if link is None or not link.alive:
            link = PeerLink(peer)
            self.links[peer] = link
            assert self._nursery is not None
            self._nursery.start_soon(self._run_link, link)
        link.send(self._spec(r, now), r)
        link.sent_at[r.id] = now

    def _spec(self, r: TaskRecord, now: float) -> TaskSpec:
        # the executor stops it at the task's deadline (a timeout counts from submission)
        timeout = self.default_timeout_s if r.deadline is None else max(0.001, r.deadline - now)
        return TaskSpec(r.id, r.kind, r.version, r.input, r.params, int(timeout * 1000),
                        r.priority, r.input_cid)

    def _cancel_attempt(self, target: str, task_id: str, finished: sm.Finished | None,
                        to_bridge: bool) -> None:
        r = self._live.get(task_id)
        if r is None or target not in r.inflight:
            return
        if finished is None:  # Rule 6: taken out of a busy member's queue, placed again
            why = ("moved: the bridge starts it sooner than its queue there" if to_bridge
                   else "moved: a member with a free slot starts it sooner")
            self.counters["moved"] += 1
        elif finished.state is sm.TaskState.CANCELLED:
            why = None  # the user's cancel leaves the attempts as they were
        elif finished.failure is not None and finished.failure.reason is sm.FailReason.DEADLINE:
            why = "cancelled: the task's deadline passed"
        else:
            why = (f"cancelled: the task settled on {len(r.results)} of {r.replicas}"
                   " replicas")
        self._close_attempt(r, target, why)
        if target == LOCAL:
            self.executor.cancel(task_id)
        elif target == BRIDGE:
            assert self._nursery is not None
            self._nursery.start_soon(self._cancel_on_bridge, task_id)
        else:
            link = self.links.get(target)
            if link is not None:
                link.send_control(tp.cancel([task_id]))

    def _on_persist(self, p: sm.Persist, now: float) -> None:
        r = self._live.get(p.task_id)
        if r is None:
            return
        for target in [t for t in r.inflight if t not in p.targets]:
            # the scheduler dropped it without an effect: its member went away (PeerGone)
            self._close_attempt(r, target, r.losses.get(target, "its member went away"))
        state = p.state.value
        r.state = state
        # since when it is held here, for open calls (_call_for_room)
        if p.state is not sm.TaskState.QUEUED:
            r.waiting_since = None
        elif r.waiting_since is None:
            r.waiting_since = now
        r.note = None  # the shell's own text gives way to the scheduler's new reason
        r.notify()

    def _on_finished(self, f: sm.Finished) -> None:
        r = self._live.get(f.task_id)
        if r is None:
            return
        if f.state is sm.TaskState.CANCELLED:
            self._finalise(r, "cancelled", error="cancelled by the user")
            return
        by = ",".join(f.by) or None
        first = r.results.get(f.by[0]) if f.by else None
        if f.state is sm.TaskState.DONE and first is not None:
            self._finalise(r, "done", output=first.output, executed_by=by, result=first)
            return
        failure = f.failure
        error = self._failure_text(r, failure, f.by) if failure is not None else "failed"
        if failure is not None and failure.reason is sm.FailReason.REPLICAS_DISAGREE:
            by = ",".join(r.results) or None  # every member that answered
        self._finalise(r, "failed", error=error, executed_by=by, result=first)

    # --- texts users read, rendered from the scheduler's typed reasons ---------------------
    def _render_wait(self, r: TaskRecord) -> str | None:
        """``TaskRecord.render``: the text of the scheduler's reason, made when read."""
        if r.state in TERMINAL:
            return None
        # the scheduler's reason now (it reports only state changes: persist_waits)
        wait, now = self.sched.wait_of(r.id), trio.current_time()
        if wait is None:
            return None
        w = sm.WaitReason
        if wait.reason is w.RUNNING_ON:
            return None
        if wait.reason in (w.NO_RUNNER, w.NO_RESOURCES):
            text = self._no_runner_text(r)
            if now - self._started_at <= self.rules.startup_grace_s:
                text += " (waiting for peers to announce themselves)"
            return text
        if wait.reason is w.BACKOFF:
            left = max(0.0, (wait.until or now) - now)
            why = r.losses.get(wait.target or "", wait.loss.value if wait.loss else "?")
            return (f"retry {wait.count + 1} of {wait.total} in {left:.1f} s after"
                    f" {wait.target} failed with: {why}")
        if wait.reason is w.SUBMITTED:
            return "waiting to be placed"
        return wait.render(now)

    def _failure_text(self, r: TaskRecord, failure: sm.Failure, by: Sequence[str]) -> str:
        f = sm.FailReason
        if failure.reason is f.TASK_ERROR:
            target = failure.target or "?"
            if target in r.errors:
                return r.errors[target]
            res = r.results.get(target)
            error = res.error if res is not None else "failed"
            if r.replicas == 1 or len(by) <= 1:
                return f"{error} (on {target})"
            on = ("all replicas" if len(by) == r.replicas else
                  f"{len(by)} of {r.replicas} replicas: {', '.join(by)}")
            return f"{error} (on {on})"
        if failure.reason is f.REPLICAS_DISAGREE:
            errors = "".join(f"; {p} failed: {res.error}" for p, res in r.results.items()
                             if not res.ok)
            return failure.render() + errors
        if failure.reason is f.DEADLINE:
            if r.attempts:
                return (f"timed out: no result within its {r.timeout_s:g} s timeout (last"
                        f" tried on {r.attempts[-1].peer})")
            return f"deadline of {r.timeout_s:g} s exceeded"
        if failure.reason is f.GAVE_UP:
            target = failure.target or "?"
            why = r.losses.get(target, failure.loss.value if failure.loss else "?")
            return f"gave up after {failure.attempts} attempts; last: {target} failed with {why}"
        if failure.reason is f.NO_RUNNER:
            return self._no_runner_text(r) + self._known_kinds_hint()
        return failure.render()

    def _no_runner_text(self, r: TaskRecord) -> str:
        """Why no member can take a task, from the mesh's view of who runs its kind."""
        kind = self.kinds.get(r.kind)
        needs = kind.resources if kind is not None else None
        mesh = self.mesh
        local = kind is not None and self.executor.slots > 0
        if r.where == "local":
            if local and not fits(needs, mesh.memory_bytes, mesh.gpus):
                return self._unfit_text(r, 1, needs)
            return f"this node does not run kind {r.kind} (or has no slots)"
        ads = [e.ad for e in mesh.table.live(trio.current_time()) if r.kind in e.ad.kinds]
        with_slots = [a for a in ads if a.slots > 0]
        unfit = sum(1 for a in with_slots if not fits(needs, a.memory_bytes, a.gpus))
        if r.where == "any" and local:
            with_slots.append(None)  # type: ignore[arg-type]
            unfit += not fits(needs, mesh.memory_bytes, mesh.gpus)
        if ads and not with_slots:
            return (f"no member runs kind {r.kind} with free capacity: the {len(ads)} that"
                    " run it offer 0 slots (no capacity)")
        if with_slots and unfit == len(with_slots):
            return self._unfit_text(r, unfit, needs)
        return f"no member runs kind {r.kind}"

    @staticmethod
    def _unfit_text(r: TaskRecord, n: int, needs: Any) -> str:
        need = "a GPU" if getattr(needs, "gpu", False) else \
            f"{getattr(needs, 'memory_mb', 0)} MiB of memory"
        return f"the {n} members that run kind {r.kind} lack what it needs ({need})"

    def _persist_running(self) -> None:
        """Journal which tasks started: one that was running when the node died is
        counted at restart (MAX_INTERRUPTIONS), so no task can crash-loop a node."""
        if not self._now_running:
            return
        # only a run on this node can be what stopped it: a task on a peer is unaffected
        # by our restarts and stays 'queued' in the journal (it is re-sent at start)
        rows = [(r.id, r.started) for r in self._now_running
                if r.state == "running" and LOCAL in r.inflight]
        self._now_running = []
        if rows and self._txn is not None:
            self._txn.mark_running(rows)
        elif rows:
            with self.store.transaction() as txn:
                txn.mark_running(rows)

    # --- the local executor ----------------------------------------------------------------
    def _start_local(self, task_id: str, now: float) -> None:
        r = self._live.get(task_id)
        if r is None:
            return
        self._open_attempt(r, LOCAL)
        self._now_running.append(r)
        self._run_local(r, now)

    def _run_local(self, r: TaskRecord, now: float, *, admit: bool = True) -> None:
        job = Job(self._spec(r, now), LOCAL, self._local_done)
        if job.spec.needs_files:
            try:
                self.files.start_job(functools.partial(self._run_local_with_files, job))
            except TeammeshError as exc:  # too many transfers now: a wait, not a failure
                self._close_attempt(r, LOCAL, f"busy: {exc}")
                self._feed([sm.AdmissionReply(r.id, LOCAL, sm.Admission.BUSY)])
            return
        if not admit:
            self.executor.submit_nowait(job)
            return
        position = self.executor.admission_position(job)
        self.executor.submit_nowait(job)
        self._feed([self._admitted(r.id, LOCAL, position)])

    async def _run_local_with_files(self, job: Job) -> None:
        await self.run_with_files(job, [])
        self._feed([self._admitted(job.spec.id, LOCAL, 0)])

    @staticmethod
    def _admitted(task_id: str, target: str, position: int) -> sm.AdmissionReply:
        if position <= 0:
            return sm.AdmissionReply(task_id, target, sm.Admission.STARTED)
        return sm.AdmissionReply(task_id, target, sm.Admission.QUEUED, position)

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
        r = self.records.get(result.id)
        if r is not None and r.id not in self._live and LOCAL in r.inflight \
                and r.state not in TERMINAL:
            # an inline run (the scheduler never held it): its result is the outcome
            self._close_attempt(r, LOCAL, None if result.ok else result.error)
            if result.ok:
                self._finalise(r, "done", output=result.output, executed_by=LOCAL,
                               result=result)
            else:
                self._finalise(r, "failed", error=f"{result.error} (on {LOCAL})",
                               executed_by=LOCAL, result=result)
            return
        self._deliver(LOCAL, [result])

    def _deliver(self, target: str, results: Iterable[TaskResult]) -> None:
        """Verified results (seal and digest checked) from ``target``: to the scheduler,
        which settles each task (Rule 9) and says when it is finished."""
        events: list[sm.Event] = []
        for res in results:
            r = self._live.get(res.id)
            if r is None or target not in r.inflight:
                continue  # moved, lost or finished meanwhile: that attempt no longer counts
            self._close_attempt(r, target, None if res.ok else res.error)
            r.results[target] = res
            wall = res.wall_ms / 1000 if math.isfinite(res.wall_ms) else math.nan
            events.append(sm.ResultArrived(res.id, target, res.ok, res.digest, wall))
        if events:
            # the clock loop's next pass (a trio checkpoint away) takes them, with the
            # other frames' results and replies that came meanwhile: one scheduler pass
            # and one journal transaction for the lot, not one per frame
            self._results_held = True
            self._post(events)

    # --- escalation to the Cloudflare bridge ---------------------------------------------------
    def _bridge_cannot_run(self, r: TaskRecord) -> str | None:
        """Why the bridge should not be given this task as an escalation, or None. The
        Worker reads an input file from the R2 mirror, or queues the task for pull-mode
        members (which fetch it over the mesh): asked explicitly (``where=bridge``), that
        is the user's call; as an escalation it needs the mirror, or the task could wait
        there for a puller while a mesh peer frees up. File params ({"$cid"}) the Worker
        never runs itself: it queues them for pull-mode members, so they go to the bridge
        only when asked."""
        if any(tp.is_cid_ref(v) for v in r.params.values()):
            return ("the bridge queues tasks with file ({\"$cid\"}) params for pull-mode"
                    " members; ask for it with --where bridge")
        if r.input_cid is not None and self.files.mirror is None:
            return ("the bridge reads input files from the R2 mirror, and this node has no"
                    " mirror configured ([r2] in config.toml)")
        return None

    def _start_bridge(self, task_id: str) -> None:
        r = self._live.get(task_id)
        if r is None:
            return
        self._open_attempt(r, BRIDGE)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_on_bridge, r)

    async def _run_on_bridge(self, r: TaskRecord) -> None:
        try:
            await self._run_on_bridge_unguarded(r)
        except Exception as exc:
            # the bridge's answer is untrusted input: it can fail this task, nothing else
            logger.exception("task %s on the bridge", r.id)
            self._bridge_outcome(r, False, None, BRIDGE, f"the bridge's answer could not be"
                                 f" used: {type(exc).__name__}: {exc}")

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
        try:
            sent = trio.current_time()
            task = await self.bridge.submit(body)
            # the round trip Rules 5 and 6 weigh queues against: the Worker's answer
            self._post([sm.BridgeMeasured(trio.current_time() - sent)])
            delay = 0.05
            while task.get("state") not in TERMINAL and BRIDGE in r.inflight:
                r.waiting_reason = f"queued at the bridge ({task.get('state')})"
                await trio.sleep(delay)
                delay = min(2.0, delay * 1.5)
                task = await self.bridge.get(r.id)
        except BridgeRejected as exc:
            self._bridge_outcome(r, False, None, BRIDGE, f"the bridge refused it: {exc}")
            return
        except BridgeUnavailable as exc:
            # Not the task's fault: the scheduler holds it for the bridge's breaker (Rule
            # 8) and never fails it for this. The text is the scheduler's BRIDGE_DOWN.
            if BRIDGE in r.inflight:
                self._close_attempt(r, BRIDGE, str(exc))
                self._feed([sm.BridgeUnavailable(r.id)])
            return
        if BRIDGE not in r.inflight:
            return  # cancelled, or finished otherwise meanwhile (CancelRemote told the Worker)
        decoded = decode_task(task, r.id)
        # "bridge" when the Worker ran it, a pull-mode member's peer id when one did
        by = decoded.executed_by or BRIDGE
        if task.get("state") == "done":
            self._bridge_outcome(r, True, decoded.output, by, None)
        else:
            self._bridge_outcome(r, False, None, by, f"{task.get('error')} (on {by})")

    def _bridge_outcome(self, r: TaskRecord, ok: bool, output: Any, by: str,
                        error: str | None) -> None:
        if BRIDGE not in r.inflight or r.id not in self._live:
            return
        res = make_result(r.id, ok, output, error, 0.0, 0.0)
        self._close_attempt(r, BRIDGE, error)
        r.results[by] = res
        if error is not None:
            r.errors[by] = error
        self._results_held = True
        self._feed([sm.BridgeResult(r.id, ok, res.digest, by)])

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
            self._post([sm.BridgeMeasured(trio.current_time() - sent)])

    async def _cancel_on_bridge(self, task_id: str) -> None:
        from teammesh.node.bridge.client import BridgeRejected, BridgeUnavailable

        assert self.bridge is not None
        try:
            await self.bridge.cancel(task_id)
        except (BridgeRejected, BridgeUnavailable) as exc:
            logger.info("could not cancel %s at the bridge (its result will be ignored):"
                        " %s", task_id, exc)

    def _known_kinds_hint(self) -> str:
        names: set[str] = set(self.kinds)
        for e in self.mesh.table.live(trio.current_time()):
            names.update(e.ad.kinds)
        return f"; kinds the team runs: {', '.join(sorted(names)) or 'none'}"


    # --- links to executor peers ----------------------------------------------------------
    async def _run_link(self, link: PeerLink) -> None:
        assert self.host is not None
        reason = "connection lost"
        loss = sm.Loss.STREAM_CLOSED
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
                loss = sm.Loss.PEER_GONE
        except DialError as exc:
            reason = f"cannot reach it ({exc})"
        except (RemoteProtocolError, ResultRejected) as exc:
            reason = str(exc)
            loss = sm.Loss.BAD_RESULT
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
            link.failures += 1
            lost = [self._lost(tid, link.peer, loss, reason) for tid in list(link.inflight)]
            link.inflight.clear()
            self._feed([e for e in lost if e is not None])
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
        """The executor's answer to a batch of assigns, one round trip after it: each task
        started (0) or queued at a position (``adm``), or refused. The scheduler decides
        what a queue position means (Rule 6: a task behind other members' work moves when
        another place would start it sooner) and what a busy refusal means (Rule 7)."""
        now = trio.current_time()
        for tid in acc.ids:
            sent = link.sent_at.pop(tid, None)
            if sent is not None:
                link.rtt_ms = 0.9 * link.rtt_ms + 0.1 * (now - sent) * 1000
        events: list[sm.Event] = []
        for refusal in acc.refused:
            link.sent_at.pop(refusal.id, None)
            r = link.inflight.get(refusal.id)
            if r is None or link.peer not in r.inflight:
                continue
            if refusal.code is tp.RefuseCode.BUSY:  # a wait, not a failure
                self._close_attempt(r, link.peer, f"busy: {refusal.message}")
                events.append(sm.AdmissionReply(r.id, link.peer, sm.Admission.BUSY))
            else:
                lost = self._lost(r.id, link.peer, sm.Loss.REFUSED,
                                  f"refused ({refusal.code.value}): {refusal.message}")
                if lost is not None:
                    events.append(lost)
        for tid, pos in (acc.positions or {}).items():
            if tid in link.inflight:
                events.append(self._admitted(tid, link.peer, pos))
        self._post(events)

    def _on_progress(self, link: PeerLink, ids: list[str]) -> None:
        """Queued tasks that started there."""
        self._post([sm.AdmissionReply(tid, link.peer, sm.Admission.STARTED)
                    for tid in ids if tid in link.inflight])

    def _on_results(self, link: PeerLink, results: list[TaskResult]) -> None:
        for res in results:
            link.sent_at.pop(res.id, None)
        files = [res for res in results if output_file(res) is not None]
        plain = [res for res in results if output_file(res) is None] if files else results
        for res in files:
            # the link no longer answers for it: the output is fetched from the executor
            link.inflight.pop(res.id, None)
            try:
                self.files.start_job(functools.partial(self._collect_output, link.peer, res))
            except TeammeshError as exc:  # too many transfers: the task runs again
                lost = self._lost(res.id, link.peer, sm.Loss.BAD_RESULT,
                                  f"its output could not be fetched now: {exc}")
                if lost is not None:
                    self._feed([lost])
        link.successes += len(results)
        self._deliver(link.peer, plain)
        # acknowledged once the journal holds them (the executor keeps them until then)
        self._acks.append((link, [res.id for res in results]))
        self._results_held = True
        self._wake.set()

    async def _collect_output(self, peer: str, res: TaskResult) -> None:
        """A result whose output is a file on the executor: copy the file here (pinned)
        before the task is done, so the output outlives the executor."""
        r = self._live.get(res.id)
        cid = output_file(res)
        if r is None or peer not in r.inflight or cid is None:
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
            lost = self._lost(r.id, peer, sm.Loss.BAD_RESULT,
                              f"its output {cid} could not be fetched: {exc}")
            if lost is not None:
                self._feed([lost])
            return
        if size > limit:
            await self.files.unpin(cid)
            self._output_too_big(r, peer, size)
            return
        self._deliver(peer, [res])

    def _output_too_big(self, r: TaskRecord, peer: str, size: int) -> None:
        """The task ran, and its output is over this node's limit for the kind: a failed
        result (another member would make the same output), with the limit named."""
        if r.id not in self._live or peer not in r.inflight:
            return  # moved, lost or finished meanwhile: that attempt no longer counts
        error = self.limits.output_error(r.kind, size)
        failed = make_result(r.id, False, None, error, 0.0, 0.0)
        r.errors[peer] = f"{error} (on {peer}); raise the limit on this node to collect it"
        self._deliver(peer, [failed])

    # --- service --------------------------------------------------------------------------
    def _resume_from_journal(self) -> int:
        now = trio.current_time()
        resumed = 0
        events: list[sm.Event] = []
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
            self._live[r.id] = r
            events.append(sm.Submitted(self._task_of(r)))
        self._feed(events)  # handled once run() has its nursery
        return resumed

    async def run(self, host: MeshHost, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.host = host
        self._started_at = trio.current_time()
        self.sched = self._new_scheduler()  # the bridge is known now
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
        self.mesh.on_peers_changed.append(self._peers_changed)
        try:
            async with host.subscribe(topic) as calls, trio.open_nursery() as nursery:
                await nursery.start(self.executor.run)
                self._nursery = nursery
                nursery.start_soon(self._dispatch_loop)
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
            self._nursery = None
            if self.stop_requested.is_set():
                # a clean stop interrupted nothing: only a crash counts against a task
                self.store.requeue_running()

    def _peers_changed(self) -> None:
        self._peers_dirty = True
        self._wake.set()

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
        self._peers_changed()

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

    async def _dispatch_loop(self) -> None:
        """The scheduler's clock: ``Tick`` at its next wake-up (a retry, a deadline, the
        end of an offer window), when the mesh changes, and a few times a second while it
        holds tasks (this node's own capacity changes without a wake-up). Submissions,
        replies and results are fed as they come."""
        while True:
            now = trio.current_time()
            self._drop_silent_links(now)
            self._feed([sm.Tick()])
            self._call_for_room(now)
            soonest = min(self.sched.next_wakeup() or math.inf, self._next_expiry)
            if self._live:
                soonest = min(soonest, now + RECHECK_S)
            self._sleeping_until = max(soonest, now + 0.001)
            with trio.move_on_at(self._sleeping_until):
                await self._wake.wait()
            self._wake = trio.Event()

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

    def _call_for_room(self, now: float) -> None:
        """Tasks of a kind waited past the offer window: ask the team (an open call, at
        most one a second per kind); members with room answer with an offer."""
        if now < self._next_call_check:
            return  # it walks every held task: a few times a second is enough
        self._next_call_check = now + RECHECK_S
        due: set[tuple[str, str]] = set()
        window = self.rules.offer_window_s
        wait_of = self.sched.wait_of
        for r in self._live.values():
            if r.waiting_since is not None and now - r.waiting_since >= window:
                wait = wait_of(r.id)
                if wait is not None and wait.reason in CALL_WAITS:
                    due.add((r.kind, r.version))
        for key in sorted(due):
            if now - self.last_call.get(key, -1e9) >= 1.0:
                self.last_call[key] = now
                self.calls_to_publish.append((key[0], key[1], 1))
                self._calls_wake.set()

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
        lines += ["# TYPE teammesh_tasks_queued gauge",
                  f"teammesh_tasks_queued {self.queued_count}"]
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


def _placement_of(effect: sm.Effect) -> tuple[str, str] | None:
    """(task id, target) of an effect that starts an attempt."""
    match effect:
        case sm.Send(peer=peer, task=task):
            return task.id, peer
        case sm.RunLocal(task=task):
            return task.id, LOCAL
        case sm.Escalate(task=task):
            return task.id, BRIDGE
    return None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
