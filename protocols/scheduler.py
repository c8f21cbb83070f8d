"""The submitter's task scheduler: a pure state machine, typed events in, typed effects out.

Theory of operation. ``Scheduler.handle(event, now) -> list[Effect]`` is the only way in;
``now`` is the caller's monotonic clock in seconds and never goes back. The caller (a thin
trio service) carries out the effects in order: ``Send`` an assignment to a peer,
``RunLocal``, ``Escalate`` to the bridge, ``CancelRemote``, ``Persist`` a change, report
``Finished``. It feeds back what happens (admission replies, results, losses, ads) and
calls ``handle(Tick(), now)`` at ``next_wakeup()``. Randomness (retry jitter) is injected.

A task's life (``TRANSITIONS`` below is the whole of it; ``_move`` enforces it):

    QUEUED --placed/escalated--> RUNNING --result/quorum--> DONE | FAILED
       ^                            |
       +--- lost, busy, bridge down-+          any live state --cancel--> CANCELLED
                                               any live state --deadline--> FAILED

The rules, in the order they are applied on every event:

Rule 1 (deadlines). A task whose deadline passed fails (``FailReason.DEADLINE``) and
    every attempt of it is cancelled, the bridge's included.
Rule 2 (order). Waiting tasks are considered by priority, then submission order. Tasks
    that need the same kind of place (kind, version, where, resources) form one line; when
    the head of a line finds no room, the rest of the line waits too, and the line is not
    looked at again until room may have appeared (the capacity epoch moved: an ad, a
    result, a place given back) or its wake-up time (window end, breaker, grace) comes.
Rule 3 (kind limits). At most ``kind_limits[kind]`` tasks of a kind run at once.
Rule 4 (placement). Local first when it runs the kind and has a free slot; then the
    best-scoring peer with a free slot (compatibility/latency/cost/health, 40/30/20/10 by
    default); replicas go to distinct members.
Rule 5 (no room). When nobody can start the task now, it goes to whichever starts it
    soonest: a peer's queue or the bridge (its measured round trip), the bridge only once
    the kind has waited one offer window (or at once when no member runs the kind).
    A queue's wait is known only behind our own tasks (their recent times x (queue + 1) /
    slots): short kinds are pipelined there. Behind others' work it is unknown, so a task
    queues there only when the bridge cannot take it (one per slot, least loaded first,
    so executors can give submitters fair turns). Otherwise it waits here. When no
    member present can run it (kind, memory, GPU), it waits for one that could and was
    heard within ``kind_memory_s`` (UNREACHABLE), else fails after the startup grace.
Rule 6 (no waiting behind a busy peer). A task an executor queued (admission reply) is
    moved as soon as a free slot exists elsewhere, or to the bridge once it has waited an
    offer window and the bridge's round trip is shorter than the wait left there (the
    estimate, or the time already waited if that is longer: the estimate was wrong).
Rule 7 (busy). A busy refusal is not a failure: the task is placed again at once and the
    peer gets nothing more until an ad or a result shows room.
Rule 8 (retries). A lost attempt excludes that peer for the task, counts a failure on the
    peer's breaker and retries after ``min(max, base * 2**(n-1)) * jitter()``; after
    ``max_attempts`` the task fails (``GAVE_UP``). The bridge being down is not the task's
    fault: it waits for the bridge's breaker and is never failed for it.
Rule 9 (quorum). A task with n replicas is done when k results have the same digest; it
    fails with ``REPLICAS_DISAGREE`` as soon as no digest can reach k, and with
    ``TOO_FEW_MEMBERS`` when fewer than n members run the kind after the startup grace.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import LocalProtocolError
from .scheduler_index import PeerIndex
from .scheduler_model import (
    BRIDGE,
    LOCAL,
    Admission,
    AdmissionReply,
    AttemptLost,
    BridgeMeasured,
    BridgeResult,
    BridgeUnavailable,
    Cancelled,
    CancelRemote,
    Effect,
    Escalate,
    Event,
    FailReason,
    Failure,
    Finished,
    Loss,
    PeerAd,
    PeerGone,
    Persist,
    ResultArrived,
    RunLocal,
    SchedulerConfig,
    Send,
    Submitted,
    Task,
    TaskState,
    Tick,
    Wait,
    WaitReason,
    Where,
)
from .scheduler_peers import Breaker, PeerView, ewma, sane_weights
from .scheduler_rules import (
    KindClocks,
    escalate_now,
    fits_resources,
    leave_queue_for_bridge,
    next_queue_check,
    pipeline_depth,
    queue_wait_s,
    retry_delay_s,
    settle_quorum,
)


class Trigger(enum.Enum):
    """What moved a task: an event, or a decision the scheduler took on one."""

    __hash__ = object.__hash__  # members are singletons: hash by identity, in C

    PLACED = "placed"  # Send / RunLocal / Escalate
    MOVED = "moved"  # taken out of a busy peer's queue to a better place
    ADMITTED = "admitted"  # AdmissionReply started/queued
    REFUSED_BUSY = "refused_busy"  # AdmissionReply busy
    RESULT = "result"  # ResultArrived / BridgeResult
    LOST = "lost"  # AttemptLost / PeerGone / BridgeUnavailable
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    UNPLACEABLE = "unplaceable"  # no runner and no bridge, or where=bridge without one


Q, R, D, F, C = (TaskState.QUEUED, TaskState.RUNNING, TaskState.DONE, TaskState.FAILED,
                 TaskState.CANCELLED)
TRANSITIONS: Final[dict[TaskState, dict[Trigger, frozenset[TaskState]]]] = {
    Q: {
        Trigger.PLACED: frozenset({R}),
        Trigger.CANCELLED: frozenset({C}),
        Trigger.DEADLINE: frozenset({F}),
        Trigger.UNPLACEABLE: frozenset({F}),
    },
    R: {
        Trigger.PLACED: frozenset({R}),  # another replica
        Trigger.MOVED: frozenset({R}),
        Trigger.ADMITTED: frozenset({R}),
        Trigger.REFUSED_BUSY: frozenset({R, Q}),
        Trigger.RESULT: frozenset({R, D, F}),  # R: a replica, short of the quorum
        Trigger.LOST: frozenset({R, Q, F}),
        Trigger.CANCELLED: frozenset({C}),
        Trigger.DEADLINE: frozenset({F}),
        Trigger.UNPLACEABLE: frozenset({F}),  # replicas: too few members run the kind
    },
    D: {},
    F: {},
    C: {},
}


# the table flattened for the hot path: one set lookup per step
_ALLOWED: Final[frozenset[tuple[TaskState, Trigger, TaskState]]] = frozenset(
    (state, trigger, new) for state, rules in TRANSITIONS.items()
    for trigger, news in rules.items() for new in news)


def transition(state: TaskState, trigger: Trigger, new: TaskState) -> TaskState:
    """Check one step against ``TRANSITIONS``.

    Raises:
        LocalProtocolError: the step is not in the table (a bug in the scheduler or in how
            its caller drives it).
    """
    if (state, trigger, new) not in _ALLOWED:
        raise LocalProtocolError(f"task cannot go from {state.value} to {new.value} on "
                                 f"{trigger.value}: a scheduler bug, please report it")
    return new


_SUBMITTED: Final = Wait(WaitReason.SUBMITTED)  # immutable: one for every new task


class Phase(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: hash by identity, in C

    SENT = "sent"
    QUEUED = "queued"
    STARTED = "started"


class _Outcome(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: hash by identity, in C

    DONE = 1  # placed, escalated or failed: off the line
    BLOCKED = 2  # no room: the rest of its line waits too
    SKIP = 3  # this task waits, the next in line may still go


Key = tuple[str, str, Where, int, bool, bool, bool, bool]


@dataclass(slots=True)
class Attempt:
    target: str
    sent: float
    phase: Phase = Phase.SENT
    position: int = 0
    queued_at: float = 0.0


@dataclass(slots=True)
class Record:
    task: Task
    seq: int
    submitted: float
    state: TaskState = TaskState.QUEUED
    attempts: dict[str, Attempt] = field(default_factory=dict)
    results: dict[str, tuple[bytes, bool]] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    retries: int = 0
    not_before: float = 0.0
    waiting_since: float | None = None
    wait: Wait | None = None
    token: int = 0  # invalidates stale line entries (lazy deletion)
    persisted: tuple[TaskState, Wait | None, tuple[str, ...]] | None = None
    # its line while queued, and while running (more replicas, a retry): a running task
    # is in a line of its own, so a kind limit that holds the queued ones back does not
    # hold it back too; built once, a line is looked up several times per event
    key_queued: Key = field(init=False)
    key_running: Key = field(init=False)

    def __post_init__(self) -> None:
        t = self.task
        base = (t.kind, t.version, t.where, t.memory_mb, t.gpu, t.bridge_ok, t.replicas > 1)
        self.key_queued, self.key_running = (*base, False), (*base, True)

    @property
    def key(self) -> Key:
        return self.key_running if self.state is TaskState.RUNNING else self.key_queued

    @property
    def need(self) -> int:
        return self.task.replicas - len(self.attempts) - len(self.results)


def _no_jitter() -> float:
    return 1.0


class Scheduler:
    """One submitter's scheduler. See the module docstring for the rules."""

    def __init__(self, config: SchedulerConfig | None = None, *,
                 jitter: Callable[[], float] = _no_jitter) -> None:
        self.config = config or SchedulerConfig()
        self.weights = sane_weights(self.config.weights)
        self._jitter = jitter
        self.records: dict[str, Record] = {}
        self.index = PeerIndex(self.weights)
        self.peers = self.index.views
        self._lines: dict[Key, list[tuple[int, int, str, int]]] = {}
        self._delayed: list[tuple[float, int, str, int]] = []
        self._deadlines: list[tuple[float, int, str]] = []
        self._remote_queued: dict[tuple[str, str], None] = {}  # (task id, peer queueing it)
        self._kind_clocks = KindClocks()
        # peer -> when it last had slots, and what it ran then (kinds, memory, GPUs): a
        # task nobody present can run waits for a member that could, if one was heard
        # lately (Rule 5), not for any member of the kind
        self._capable: dict[str, tuple[float, dict[str, str], int, tuple[str, ...]]] = {}
        self._max_rtt_s = 0.0  # the slowest link seen: bounds every link's pipeline depth
        # Capacity epoch: bumped whenever room may have appeared (an ad, a result, a slot
        # or bridge place given back). A line whose head found no room is not looked at
        # again until the epoch moves or its wake-up time comes: in a saturated team most
        # events change nothing, and re-deciding cost O(members) each time.
        self._epoch = 0
        self._blocked: dict[Key, tuple[int, float]] = {}  # line -> (epoch, wake-up)
        self._moved: tuple[int, float] = (-1, math.inf)  # Rule 6's (epoch, wake-up)
        self._line_wake = math.inf
        self._bridge_epoch = 0  # bumped when the bridge gets a place back
        self._running_by_kind: dict[str, int] = {}
        self._queued = 0  # records in QUEUED (the dashboard and /metrics read it often)
        self._kind_avg_s: dict[str, float] = {}
        self.bridge_rtt_s = self.config.bridge_rtt_s
        self._bridge_measured = False  # BridgeMeasured fed: results no longer measure it
        self.bridge_breaker = Breaker()
        self._bridge_inflight = 0
        self._seq = 0
        self._started: float | None = None
        self._now = -math.inf
        self._wakeup: float = math.inf
        self._out: list[Effect] = []
        self._dirty: dict[str, None] = {}
        self._fresh: list[Record] = []  # submitted in this call
        self._persist_waits = self.config.persist_waits
        self._target_waits: dict[tuple[WaitReason, str], Wait] = {}
        self._handlers: dict[type, Callable[[Any, float], None]] = {
            Submitted: self._on_submitted, Cancelled: self._on_cancelled,
            PeerAd: self._on_peer_ad, PeerGone: self._on_peer_gone,
            AdmissionReply: self._on_admission, ResultArrived: self._on_result,
            AttemptLost: self._on_lost, BridgeResult: self._on_bridge_result,
            BridgeUnavailable: self._on_bridge_unavailable,
            BridgeMeasured: self._on_bridge_measured, Tick: self._on_tick}

    # --- the one entry point ---------------------------------------------------------------
    def handle(self, event: Event, now: float) -> list[Effect]:
        """Apply ``event`` at time ``now`` and return what to do, in order.

        Raises:
            LocalProtocolError: ``now`` went back, a task id was submitted twice, or a task
                is malformed (replicas < 1, quorum outside 1..replicas).
        """
        return self.handle_many((event,), now)

    def handle_many(self, events: Iterable[Event], now: float) -> list[Effect]:
        """Apply several events that happened by ``now``, in order, then decide once.

        The same rules as one ``handle`` per event at ``now``, but one placement pass for
        the lot: a shell that reads a frame of 500 results, or takes a batch of 2,000
        submissions, pays for one pass, not one per event. Tasks submitted together are
        placed by priority then order, as if queued before the pass. An error raised by
        one event leaves the earlier ones applied; the next call places them."""
        if now < self._now:
            raise LocalProtocolError(f"the scheduler's clock went back ({now} < {self._now})")
        self._now = now
        if self._started is None:
            self._started = now
        self._out = []
        for event in events:
            self._apply(event, now)
        self._expire(now)
        self._dispatch(now)
        self._flush_persist()
        return self._out

    def next_wakeup(self) -> float | None:
        """When to call ``handle(Tick(), t)`` next if nothing else happens (None: never)."""
        times = [self._wakeup]
        if self._delayed:
            times.append(self._delayed[0][0])
        if self._deadlines:
            times.append(self._deadlines[0][0])
        t = min(times)
        return None if math.isinf(t) else t

    def state_of(self, task_id: str) -> TaskState | None:
        rec = self.records.get(task_id)
        return None if rec is None else rec.state

    def wait_of(self, task_id: str) -> Wait | None:
        rec = self.records.get(task_id)
        return None if rec is None else rec.wait

    def running_by_kind(self) -> dict[str, int]:
        """Tasks running now (an attempt out), by kind: what ``kind_limits`` counts."""
        return {k: n for k, n in self._running_by_kind.items() if n > 0}

    def queued(self) -> int:
        """Tasks held here waiting for a place."""
        return self._queued

    def breakers(self) -> dict[str, Breaker]:
        """Each known peer's circuit breaker (LOCAL excluded), and the bridge's."""
        out = {p: v.breaker for p, v in self.peers.items() if p != LOCAL}
        if self.config.bridge:
            out[BRIDGE] = self.bridge_breaker
        return out

    # --- events ----------------------------------------------------------------------------
    def _apply(self, event: Event, now: float) -> None:
        # by exact type, one dict lookup (a match statement tries each case in turn, and
        # the common events, results and admission replies, came late in it)
        handler = self._handlers.get(type(event))
        if handler is None:
            raise LocalProtocolError(f"the scheduler does not take {type(event).__name__}")
        handler(event, now)

    def _on_tick(self, ev: Tick, now: float) -> None:
        pass  # Rules 1, 5 and 6 run after every event

    def _on_submitted(self, ev: Submitted, now: float) -> None:
        t = ev.task
        if t.id in self.records:
            raise LocalProtocolError(f"task {t.id} was submitted twice; task ids must be unique")
        if t.replicas < 1 or not 1 <= t.k <= t.replicas:
            raise LocalProtocolError(f"task {t.id}: replicas must be >= 1 and the quorum "
                                     f"between 1 and replicas (got {t.replicas}, {t.quorum})")
        self._seq += 1
        rec = Record(t, self._seq, now, wait=_SUBMITTED)
        self.records[t.id] = rec
        self._queued += 1
        if t.where is Where.BRIDGE and not self.config.bridge:
            self._finish(rec, Trigger.UNPLACEABLE, TaskState.FAILED,
                         failure=Failure(FailReason.NO_BRIDGE))
            return
        if t.deadline is not None:
            heapq.heappush(self._deadlines, (t.deadline, rec.seq, t.id))
        self._enqueue(rec)
        self._dirty[t.id] = None
        self._fresh.append(rec)

    def _on_cancelled(self, ev: Cancelled, now: float) -> None:
        rec = self.records.get(ev.task_id)
        if rec is None:
            return  # finished already (or never ours): cancelling is idempotent
        self._finish(rec, Trigger.CANCELLED, TaskState.CANCELLED)

    def _on_peer_ad(self, ev: PeerAd, now: float) -> None:
        view = self.index.upsert(ev)
        if view.slots > 0:
            self._heard(view, now)
        self._max_rtt_s = max(self._max_rtt_s, view.rtt_ms / 1000)
        self._grew()

    def _on_peer_gone(self, ev: PeerGone, now: float) -> None:
        view = self.index.remove(ev.peer)
        if view is None:
            return
        if view.slots > 0:
            self._heard(view, now)
        for task_id in sorted(view.inflight):
            rec = self.records.get(task_id)
            if rec is not None and ev.peer in rec.attempts:
                self._lose(rec, ev.peer, Loss.PEER_GONE, now, blame=False)

    def _on_admission(self, ev: AdmissionReply, now: float) -> None:
        rec = self.records.get(ev.task_id)
        attempt = rec.attempts.get(ev.peer) if rec is not None else None
        view = self.peers.get(ev.peer)
        if rec is None or attempt is None:
            return  # stale: the attempt was moved, lost or the task finished
        if ev.admission is Admission.BUSY:
            self._drop_attempt(rec, ev.peer)
            if view is not None:
                view.refused_busy(rec.task.id)
                self.index.touch(view)
            new = TaskState.QUEUED if not rec.attempts else TaskState.RUNNING
            self._move(rec, Trigger.REFUSED_BUSY, new)
            self._enqueue(rec)
            return
        if ev.admission is Admission.STARTED:
            attempt.phase = Phase.STARTED
            self._remote_queued.pop((rec.task.id, ev.peer), None)
            if view is not None:
                view.started(rec.task.id)
            self._set_wait(rec, self._wait_at(WaitReason.RUNNING_ON, ev.peer))
        else:
            attempt.phase, attempt.position, attempt.queued_at = (
                Phase.QUEUED, max(1, ev.position), now)
            if view is not None:
                free, queue = view.free, view.queue
                view.admitted_queued(rec.task.id, ev.position)
                if view.free != free or view.queue != queue:  # pipelined: counted already
                    self.index.touch(view)
            # this node's own queue too: its slots also serve other members' tasks, so a
            # task RunLocal sent to a slot that looked free can wait behind them (Rule 6)
            self._remote_queued[(rec.task.id, ev.peer)] = None
            self._moved = (-1, math.inf)
            self._set_wait(rec, Wait(WaitReason.QUEUED_ON_PEER, ev.peer, attempt.position))
        self._move(rec, Trigger.ADMITTED, TaskState.RUNNING)

    def _on_result(self, ev: ResultArrived, now: float) -> None:
        rec = self.records.get(ev.task_id)
        if rec is None or ev.peer not in rec.attempts or ev.peer == BRIDGE:
            return  # stale or duplicate: nothing is delivered twice
        wall = ev.wall_s if math.isfinite(ev.wall_s) and ev.wall_s >= 0 else None
        view = self.peers.get(ev.peer)
        if view is not None:
            view.successes += 1
            view.breaker.success()
            view.released(rec.task.id, wall)
            self.index.touch(view)
        if wall is not None:
            self._kind_avg_s[rec.task.kind] = ewma(self._kind_avg_s.get(rec.task.kind), wall)
        self._drop_attempt(rec, ev.peer)
        rec.results[ev.peer] = (ev.digest, ev.ok)
        self._settle(rec)

    def _on_lost(self, ev: AttemptLost, now: float) -> None:
        rec = self.records.get(ev.task_id)
        if rec is None or ev.peer not in rec.attempts:
            return
        if ev.peer == BRIDGE:
            self._bridge_down(rec, now)
            return
        self._lose(rec, ev.peer, ev.loss, now, blame=True)

    def _on_bridge_result(self, ev: BridgeResult, now: float) -> None:
        rec = self.records.get(ev.task_id)
        attempt = rec.attempts.get(BRIDGE) if rec is not None else None
        if rec is None or attempt is None:
            return
        if not self._bridge_measured:
            self.bridge_rtt_s = ewma(self.bridge_rtt_s, now - attempt.sent)
        self.bridge_breaker.success()
        self._drop_attempt(rec, BRIDGE)
        state = TaskState.DONE if ev.ok else TaskState.FAILED
        failure = None if ev.ok else Failure(FailReason.TASK_ERROR, ev.executed_by)
        self._finish(rec, Trigger.RESULT, state, failure=failure, by=(ev.executed_by,),
                     digest=ev.digest)

    def _on_bridge_measured(self, ev: BridgeMeasured, now: float) -> None:
        if math.isfinite(ev.rtt_s) and ev.rtt_s >= 0:
            # the first measure replaces the config's guess rather than averaging with it
            old = self.bridge_rtt_s if self._bridge_measured else None
            self._bridge_measured = True
            self.bridge_rtt_s = ewma(old, min(ev.rtt_s, 3600.0))
            self._grew()  # a queue's wait may now lose to the bridge (Rule 6)

    def _on_bridge_unavailable(self, ev: BridgeUnavailable, now: float) -> None:
        rec = self.records.get(ev.task_id)
        if rec is not None and BRIDGE in rec.attempts:
            self._bridge_down(rec, now)

    # --- outcomes --------------------------------------------------------------------------
    def _settle(self, rec: Record) -> None:
        """Rule 9: accept on k equal digests; fail once no digest can reach k (the rule is
        ``settle_quorum``, which the node's replicas use too)."""
        t = rec.task
        if t.replicas == 1:  # the common case, without building settle_quorum's groups
            ((target, (digest, ok)),) = rec.results.items()
            self._finish(rec, Trigger.RESULT, TaskState.DONE if ok else TaskState.FAILED,
                         failure=None if ok else Failure(FailReason.TASK_ERROR, target),
                         by=(target,), digest=digest)
            return
        verdict = settle_quorum(rec.results, t.replicas, t.k)
        if verdict.state is not TaskState.RUNNING:
            self._finish(rec, Trigger.RESULT, verdict.state, failure=verdict.failure,
                         by=verdict.by, digest=verdict.digest)
            return
        self._move(rec, Trigger.RESULT, TaskState.RUNNING)
        if rec.need > 0:
            self._enqueue(rec)

    def _lose(self, rec: Record, target: str, loss: Loss, now: float, *, blame: bool) -> None:
        """Rule 8: an attempt ended without a result."""
        view = self.peers.get(target)
        if view is not None:
            view.released(rec.task.id, None)
            if blame:
                view.failures += 1
                view.breaker.failure(now, self.config)
            self.index.touch(view)
        self._drop_attempt(rec, target)
        rec.excluded.add(target)
        rec.retries += 1
        if rec.retries >= self.config.max_attempts:
            self._finish(rec, Trigger.LOST, TaskState.FAILED, failure=Failure(
                FailReason.GAVE_UP, target, attempts=rec.retries, loss=loss))
            return
        cfg = self.config
        rec.not_before = now + retry_delay_s(rec.retries, cfg, self._jitter())
        self._move(rec, Trigger.LOST, TaskState.RUNNING if rec.attempts else TaskState.QUEUED)
        self._set_wait(rec, Wait(WaitReason.BACKOFF, target, rec.retries,
                                 cfg.max_attempts, rec.not_before, loss=loss))
        self._enqueue(rec)

    def _bridge_down(self, rec: Record, now: float) -> None:
        self.bridge_breaker.failure(now, self.config)
        self._drop_attempt(rec, BRIDGE)
        rec.not_before = max(now + self.config.bridge_down_retry_s,
                             self.bridge_breaker.open_until)
        self._move(rec, Trigger.LOST, TaskState.RUNNING if rec.attempts else TaskState.QUEUED)
        self._set_wait(rec, Wait(WaitReason.BRIDGE_DOWN, until=rec.not_before))
        self._enqueue(rec)

    def _finish(self, rec: Record, trigger: Trigger, state: TaskState, *,
                failure: Failure | None = None, by: tuple[str, ...] = (),
                digest: bytes | None = None) -> None:
        self._move(rec, trigger, state)
        for target in list(rec.attempts):
            self._out.append(CancelRemote(target, rec.task.id))
            view = self.peers.get(target)
            if view is not None:
                view.released(rec.task.id, None)
                self.index.touch(view)
            self._drop_attempt(rec, target)
        del self.records[rec.task.id]
        self._dirty.pop(rec.task.id, None)
        self._out.append(Finished(rec.task.id, state, failure, by, digest))

    def _expire(self, now: float) -> None:
        """Rule 1."""
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, task_id = heapq.heappop(self._deadlines)
            rec = self.records.get(task_id)
            if rec is not None:
                d = rec.task.deadline or now
                self._finish(rec, Trigger.DEADLINE, TaskState.FAILED, failure=Failure(
                    FailReason.DEADLINE, seconds=round(d - rec.submitted, 3)))

    # --- the placement pass (Rules 2-7) ----------------------------------------------------
    def _dispatch(self, now: float) -> None:
        self._wakeup = math.inf
        while self._delayed and self._delayed[0][0] <= now:
            _, _, task_id, token = heapq.heappop(self._delayed)
            rec = self.records.get(task_id)
            if rec is not None and rec.token == token:
                self._enqueue(rec)
        heads: list[tuple[int, int, Key]] = []
        for key, line in self._lines.items():
            head = self._head(line)
            if head is not None:
                heads.append((head.task.priority * -1, head.seq, key))
        heapq.heapify(heads)
        skipped: list[Record] = []
        while heads:
            _, _, key = heapq.heappop(heads)
            line = self._lines[key]
            rec = self._head(line)
            if rec is None:
                continue
            cached = self._blocked.get(key)
            if cached is not None and cached[0] == self._epoch and now < cached[1]:
                self._wake_at(cached[1])
                continue
            epoch, self._line_wake = self._epoch, math.inf
            outcome = self._decide(rec, now)
            if outcome is _Outcome.BLOCKED:
                self._blocked[key] = (epoch, self._line_wake)
                continue
            self._blocked.pop(key, None)
            heapq.heappop(line)
            if outcome is _Outcome.SKIP:
                skipped.append(rec)
            elif rec.state is TaskState.RUNNING and rec.need > 0 and rec.task.id in self.records:
                skipped.append(rec)  # replicas still short
            head = self._head(line)
            if head is not None:
                heapq.heappush(heads, (-head.task.priority, head.seq, key))
        for rec in skipped:
            self._enqueue(rec)
        self._move_queued(now)
        self._explain_fresh()

    def _explain_fresh(self) -> None:
        """A task that joined a line whose head waits was not decided (Rule 2): it waits
        for the same reason, and says so rather than "submitted"."""
        fresh, self._fresh = self._fresh, []
        for rec in fresh:
            if rec.state is not TaskState.QUEUED or rec.wait is None \
                    or rec.wait.reason is not WaitReason.SUBMITTED:
                continue
            head = self._head(self._lines.get(rec.key, []))
            if head is not None and head is not rec and head.wait is not None:
                self._set_wait(rec, head.wait)

    def _head(self, line: list[tuple[int, int, str, int]]) -> Record | None:
        while line:
            _, _, task_id, token = line[0]
            rec = self.records.get(task_id)
            if rec is not None and rec.token == token:
                return rec
            heapq.heappop(line)
        return None

    def _decide(self, rec: Record, now: float) -> _Outcome:
        t = rec.task
        if rec.need <= 0:
            return _Outcome.DONE
        if t.where is Where.BRIDGE:
            return self._to_bridge_or_wait(rec, now)
        limit = self.config.kind_limits.get(t.kind)
        # a running task (more replicas, a retry beside one) is counted already
        if limit is not None and rec.state is TaskState.QUEUED \
                and self._running_by_kind.get(t.kind, 0) >= limit:
            self._set_wait(rec, Wait(WaitReason.KIND_LIMIT, count=limit, kind=t.kind))
            return _Outcome.BLOCKED
        placed = False
        while rec.need > 0:
            target = self._free_target(rec)
            if target is None:
                break
            self._assign(rec, target, now)
            placed = True
        if rec.need <= 0:
            self._kind_clocks.placed((t.kind, t.version))
            return _Outcome.DONE
        if placed:
            self._set_wait(rec, Wait(WaitReason.REPLICAS_PENDING, count=len(rec.attempts)
                                     + len(rec.results), total=t.replicas))
            # placed in part during the startup grace: look again when it ends (Rule 5's
            # too-few check), or a shell that ticks at next_wakeup() would never fail it
            assert self._started is not None
            grace_end = self._started + self.config.startup_grace_s
            if now < grace_end:
                self._wake_at(grace_end)
            return _Outcome.SKIP
        return self._no_room(rec, now)

    def _no_room(self, rec: Record, now: float) -> _Outcome:
        """Rule 5."""
        t = rec.task
        runners, slots, allowed = self.index.runners_for(rec.key, t)
        if not runners:
            return self._nobody_runs(rec, now)
        if t.replicas > 1 and len(set(runners) | set(rec.results)) < t.replicas:
            return self._too_few(rec, now)
        if rec.excluded and all(p in rec.excluded or p in rec.attempts for p in runners):
            # every runner failed it once: a lost stream is usually a passing event, and
            # the retry budget still bounds this
            rec.excluded.clear()
            return self._decide(rec, now)
        bridge = self._bridge_eligible(t)
        bridge_open = bridge and self._bridge_open(now)
        peer, peer_wait = self._best_queue(rec, allowed, unknown_ok=not bridge_open)
        if self.config.bridge:  # the kind's clock is read only to escalate
            since = self._kind_clock(t, now)
            rec.waiting_since = min(
                rec.waiting_since if rec.waiting_since is not None else now, since)
        if bridge_open:
            assert rec.waiting_since is not None
            if escalate_now(now, rec.waiting_since, self.config, self.bridge_rtt_s, peer_wait):
                return self._escalate(rec, now)
            window_end = rec.waiting_since + self.config.offer_window_s
            bridge_eta = max(0.0, window_end - now) + self.bridge_rtt_s
            self._wake_at(window_end)
        else:
            bridge_eta = math.inf
            if bridge:
                self._wake_at(self.bridge_breaker.open_until)
        if peer is not None and peer_wait <= bridge_eta:
            self._assign(rec, peer, now)
            return _Outcome.DONE if rec.need <= 0 else _Outcome.SKIP
        if bridge and not self._bridge_open(now):
            self._set_wait(rec, Wait(WaitReason.BRIDGE_DOWN, until=self.bridge_breaker.open_until))
        elif t.replicas > 1:
            self._set_wait(rec, Wait(WaitReason.REPLICAS_PENDING, count=len(rec.attempts)
                                     + len(rec.results), total=t.replicas))
        else:
            self._set_wait(rec, Wait(WaitReason.ALL_BUSY, count=slots, kind=t.kind))
        return _Outcome.SKIP if rec.excluded or rec.attempts or rec.results else _Outcome.BLOCKED

    def _nobody_runs(self, rec: Record, now: float) -> _Outcome:
        t = rec.task
        assert self._started is not None
        grace_end = self._started + self.config.startup_grace_s
        if self._bridge_eligible(t) and now >= grace_end:
            return self._to_bridge_or_wait(rec, now)
        seen = self._last_capable(t, now)
        any_kind = bool(self.index.runners.get(t.kind))
        if now >= grace_end and not rec.attempts and not rec.results and seen is not None:
            # members that ran it lately are unreachable, not gone: wait for them a while
            self._wake_at(seen + self.config.kind_memory_s)
            self._set_wait(rec, Wait(WaitReason.UNREACHABLE, kind=t.kind, until=seen))
            return _Outcome.SKIP if rec.excluded else _Outcome.BLOCKED
        if now >= grace_end and not rec.attempts:
            failure = (Failure(FailReason.TOO_FEW_MEMBERS, attempts=t.replicas) if rec.results
                       else Failure(FailReason.NO_RUNNER))
            self._finish(rec, Trigger.UNPLACEABLE, TaskState.FAILED, failure=failure)
            return _Outcome.DONE
        self._wake_at(grace_end)
        reason = WaitReason.NO_RESOURCES if any_kind else WaitReason.NO_RUNNER
        self._set_wait(rec, Wait(reason, kind=t.kind))
        return _Outcome.BLOCKED

    def _too_few(self, rec: Record, now: float) -> _Outcome:
        """Replicas need distinct members: fewer run the kind (after the startup grace)."""
        assert self._started is not None
        grace_end = self._started + self.config.startup_grace_s
        if now < grace_end:
            self._wake_at(grace_end)
            self._set_wait(rec, Wait(WaitReason.REPLICAS_PENDING, count=len(rec.attempts)
                                     + len(rec.results), total=rec.task.replicas))
            return _Outcome.SKIP
        self._finish(rec, Trigger.UNPLACEABLE, TaskState.FAILED,
                     failure=Failure(FailReason.TOO_FEW_MEMBERS, attempts=rec.task.replicas))
        return _Outcome.DONE

    def _to_bridge_or_wait(self, rec: Record, now: float) -> _Outcome:
        if BRIDGE in rec.attempts:
            return _Outcome.DONE
        if self._bridge_open(now):
            return self._escalate(rec, now)
        self._wake_at(self.bridge_breaker.open_until)
        self._set_wait(rec, Wait(WaitReason.BRIDGE_DOWN, until=self.bridge_breaker.open_until))
        return _Outcome.BLOCKED

    def _move_queued(self, now: float) -> None:
        """Rule 6: nothing waits in a busy peer's queue if it can start sooner elsewhere."""
        epoch, wake = self._moved
        if epoch == self.index.free_epoch + self._bridge_epoch and now < wake:
            self._wake_at(wake)
            return
        self._line_wake = math.inf
        epoch = self.index.free_epoch + self._bridge_epoch
        free_kinds = {kind for kind, peers in self.index.free.items() if peers}
        bridge_open = self.config.bridge and self._bridge_open(now)
        if self.config.bridge and self._remote_queued:
            self._wake_at(self.bridge_breaker.open_until)  # a closed breaker reopens
        for task_id, peer in list(self._remote_queued) if free_kinds or bridge_open else ():
            rec = self.records.get(task_id)
            attempt = rec.attempts.get(peer) if rec is not None else None
            if rec is None or attempt is None or attempt.phase is not Phase.QUEUED:
                self._remote_queued.pop((task_id, peer), None)
                continue
            kind = rec.task.kind
            free = self.index.free.get(kind) if kind in free_kinds else None
            # (the only free member being the one that queues it: an ad older than our
            # assignments there; nothing to move to)
            target = self._free_target(rec) if free and free != {peer} else None
            if target is not None:
                self._take_back(rec, peer)
                self._assign(rec, target, now, trigger=Trigger.MOVED)
                if not self.index.free.get(kind):
                    # that was the last free slot: the rest of the scan is a dict lookup
                    # each, not a heap pick each (a pipelined executor has ~65 queued)
                    free_kinds.discard(kind)
                    if not free_kinds and not bridge_open:
                        break
                continue
            if not (bridge_open and self._bridge_eligible(rec.task)
                    and self._bridge_open(now)):
                continue
            if leave_queue_for_bridge(now, attempt.queued_at, self.config, self.bridge_rtt_s,
                                      self._queued_left(rec, peer, attempt)):
                self._take_back(rec, peer)
                self._escalate(rec, now, trigger=Trigger.MOVED)
            else:  # the window ends, or the time waited passes the bridge's round trip
                self._wake_at(next_queue_check(now, attempt.queued_at, self.config,
                                               self.bridge_rtt_s))
        self._moved = (epoch, self._line_wake)

    # --- helpers ---------------------------------------------------------------------------
    def _heard(self, view: PeerView, now: float) -> None:
        """A member with slots was heard from (an ad) or went away (then: last heard).
        This node is always here: nothing to wait for when it cannot run a task."""
        if view.peer != LOCAL:
            self._capable[view.peer] = (now, view.kinds, view.memory_mb, view.gpus)
        if len(self._capable) > 2 * len(self.index.views) + 64:  # bounded: members come
            horizon = now - self.config.kind_memory_s             # and go for months
            self._capable = {p: c for p, c in self._capable.items() if c[0] >= horizon}

    def _last_capable(self, t: Task, now: float) -> float | None:
        """When a member that could run ``t`` (kind, memory, GPU) was last heard, within
        ``kind_memory_s``; None if none was."""
        if t.where is Where.LOCAL:
            return None  # this node is always here: waiting would not change it
        horizon = now - self.config.kind_memory_s
        seen = [when for when, kinds, memory_mb, gpus in self._capable.values()
                if when > horizon and t.kind in kinds
                and fits_resources(t.memory_mb, t.gpu, memory_mb, gpus)]
        return max(seen) if seen else None

    def _kind_clock(self, t: Task, now: float) -> float:
        """Since when tasks of this kind found no room (``KindClocks``)."""
        return self._kind_clocks.waiting((t.kind, t.version), now, self.config)

    def _usable(self, rec: Record, peer: str) -> bool:
        return (peer not in rec.attempts and peer not in rec.results
                and peer not in rec.excluded and self.peers[peer].breaker.allows(self._now))

    def _free_target(self, rec: Record) -> str | None:
        """Rule 4: local with a free slot, else the best-scoring peer with one."""
        t = rec.task
        free = self.index.free.get(t.kind)
        if not free:
            return None
        if t.where in (Where.ANY, Where.LOCAL) and LOCAL in free and self._usable(rec, LOCAL) \
                and self.peers[LOCAL].runs(t):
            return LOCAL
        if t.where not in (Where.ANY, Where.PEERS):
            return None
        return self.index.best_free(t.kind, t.version, lambda view: (
            view.can_start() and self._usable(rec, view.peer) and view.runs(t)))

    def _best_queue(self, rec: Record, allowed: frozenset[str], *,
                    unknown_ok: bool) -> tuple[str | None, float]:
        """The peer whose queue would start the task soonest, and its estimated wait.

        Behind our own tasks the wait is known (their times are ours): short kinds are
        pipelined there up to the pipeline depth. Behind another submitter's work the wait
        is unknown (it may be a 60 s task), so a task queues there only when nothing else
        (the bridge) can take it (``unknown_ok``), one per slot, least loaded first: the
        executor's queue is where submitters get their fair turns."""
        t = rec.task
        if t.where is Where.LOCAL:
            return None, math.inf
        kind_avg = self._kind_avg_s.get(t.kind)
        best, best_rank, best_wait = None, (math.inf, math.inf), math.inf
        # the deepest any link could need (the slowest round trip seen): 0 for long kinds,
        # which skip the scan (in a big team, a sort and a walk of every busy member)
        deepest = pipeline_depth(kind_avg, self._max_rtt_s, self.config)
        for peer in sorted(self.index.filled & allowed) if deepest else ():
            view = self.peers[peer]
            mine = len(view.inflight)
            if view.full or view.queue > mine - view.slots \
                    or mine >= view.slots * (1 + deepest) or not self._usable(rec, peer):
                continue
            # this link's own depth: the target work plus its round trip
            if mine >= view.slots * (1 + pipeline_depth(kind_avg, view.rtt_ms / 1000,
                                                        self.config)):
                continue
            wait = view.wait_s(view.avg_task_s if view.avg_task_s is not None else kind_avg)
            rank = (wait, view.load)
            if rank < best_rank:
                best, best_rank, best_wait = peer, rank, wait
        if best is not None or not unknown_ok:
            return best, best_wait
        reserve = self.index.least_loaded(t.kind, lambda view: (
            view.peer in allowed and view.has_queue_place and self._usable(rec, view.peer)))
        return reserve, math.inf

    def _queued_left(self, rec: Record, peer: str, attempt: Attempt) -> float:
        """Estimated wait left in ``peer``'s queue. A task that already waited longer than
        estimated waits at least as long again (the estimate was wrong), so the caller takes
        the larger of this and the time waited."""
        view = self.peers.get(peer)
        if view is None:
            return math.inf
        return queue_wait_s(view.avg_task_s, attempt.position, view.slots)

    def bridge_can_take(self, t: Task) -> bool:
        """The bridge is configured and could run this task (breaker aside)."""
        return self._bridge_eligible(t)

    def _bridge_eligible(self, t: Task) -> bool:
        return (self.config.bridge and t.where in (Where.ANY, Where.BRIDGE)
                and t.replicas == 1 and t.bridge_ok and not t.gpu
                and t.memory_mb <= self.config.bridge_memory_mb)

    def _bridge_open(self, now: float) -> bool:
        return (self.bridge_breaker.allows(now)
                and self._bridge_inflight < self.config.bridge_max_inflight)

    def _assign(self, rec: Record, target: str, now: float,
                trigger: Trigger = Trigger.PLACED) -> None:
        rec.attempts[target] = Attempt(target, now)
        rec.waiting_since = None
        view = self.peers[target]
        view.assigned(rec.task.id)
        self.index.touch(view)
        self._move(rec, trigger, TaskState.RUNNING)
        if target == LOCAL:
            self._out.append(RunLocal(rec.task))
            self._set_wait(rec, self._wait_at(WaitReason.RUNNING_ON, LOCAL))
        else:
            self._out.append(Send(target, rec.task))
            self._set_wait(rec, self._wait_at(WaitReason.SENT, target))

    def _escalate(self, rec: Record, now: float, trigger: Trigger = Trigger.PLACED) -> _Outcome:
        rec.attempts[BRIDGE] = Attempt(BRIDGE, now)
        rec.waiting_since = None
        self._bridge_inflight += 1
        self._move(rec, trigger, TaskState.RUNNING)
        self._out.append(Escalate(rec.task))
        self._set_wait(rec, Wait(WaitReason.ON_BRIDGE, BRIDGE))
        return _Outcome.DONE

    def _take_back(self, rec: Record, peer: str) -> None:
        self._out.append(CancelRemote(peer, rec.task.id))
        view = self.peers.get(peer)
        if view is not None:
            view.released(rec.task.id, None)
            self.index.touch(view)
        self._drop_attempt(rec, peer)

    def _drop_attempt(self, rec: Record, target: str) -> None:
        if rec.attempts.pop(target, None) is not None:
            self._grew()  # a place given back (or a bridge place)
            if target == BRIDGE:
                self._bridge_inflight -= 1
                self._bridge_epoch += 1
        self._remote_queued.pop((rec.task.id, target), None)

    def _enqueue(self, rec: Record) -> None:
        rec.token += 1
        if rec.attempts or rec.results or rec.excluded:
            self._blocked.pop(rec.key, None)  # not like the rest of its line
        if rec.not_before > self._now:
            heapq.heappush(self._delayed, (rec.not_before, rec.seq, rec.task.id, rec.token))
            return
        line = self._lines.setdefault(rec.key, [])
        heapq.heappush(line, (-rec.task.priority, rec.seq, rec.task.id, rec.token))

    def _move(self, rec: Record, trigger: Trigger, new: TaskState) -> None:
        old = rec.state
        rec.state = transition(old, trigger, new)
        if old is not new:
            self._queued += (new is TaskState.QUEUED) - (old is TaskState.QUEUED)
        if old is not TaskState.RUNNING and new is TaskState.RUNNING:
            self._running_by_kind[rec.task.kind] = self._running_by_kind.get(rec.task.kind, 0) + 1
        elif old is TaskState.RUNNING and new is not TaskState.RUNNING:
            self._running_by_kind[rec.task.kind] -= 1
            self._grew()
        elif trigger is Trigger.ADMITTED:
            return  # neither its state nor its targets changed: nothing to persist
        self._dirty[rec.task.id] = None

    def _set_wait(self, rec: Record, wait: Wait) -> None:
        if not self._persist_waits:
            rec.wait = wait  # read when asked (wait_of): no change to detect
        elif rec.wait != wait:
            rec.wait = wait
            self._dirty[rec.task.id] = None

    def _wait_at(self, reason: WaitReason, target: str) -> Wait:
        """A shared ``Wait`` for the reasons that name only a target (two per task)."""
        key = (reason, target)
        wait = self._target_waits.get(key)
        if wait is None:
            if len(self._target_waits) > 4096:  # peers come and go: bounded
                self._target_waits.clear()
            wait = self._target_waits[key] = Wait(reason, target)
        return wait

    def _wake_at(self, t: float) -> None:
        if t > self._now:
            self._wakeup = min(self._wakeup, t)
            self._line_wake = min(self._line_wake, t)

    def _grew(self) -> None:
        """Room may have appeared: every waiting line is worth another look."""
        self._epoch += 1

    def _flush_persist(self) -> None:
        for task_id in self._dirty:
            rec = self.records.get(task_id)
            if rec is None:
                continue
            attempts = rec.attempts
            snap = (rec.state, rec.wait if self._persist_waits else None,
                    tuple(attempts) if len(attempts) < 2 else tuple(sorted(attempts)))
            if snap != rec.persisted:
                rec.persisted = snap
                self._out.append(Persist(task_id, rec.state, rec.wait, snap[2]))
        self._dirty = {}
