"""A deterministic simulation of a team driving ``Scheduler`` instances, for the tests and
``scripts/bench sched``.

Theory of operation: one virtual clock and one event heap. Every member has an executor
(slots, a bounded queue served round-robin across submitters that, when full, gives a
place of the submitter holding most to one holding fewer; admission replies, results
after each task's duration, cancel). Some members are submitters, each with its own
``Scheduler`` that sees the other members through ads (sent on change after
``ad_delay_s`` and every ``ad_period_s``) and its own executor as ``LOCAL``. Messages take
``latency_s`` one way; a dead member goes silent and submitters learn it ``detect_s``
later. The bridge answers after its round trip (plus the task's duration), or reports
itself unavailable while it is down. Nothing here reads a clock or draws a random number
except through the injected ``random.Random`` and the optional ``meter``.

After every event the simulation checks the invariant it can only check from outside:
no task waits in an executor's queue while another member that runs the kind has had a
free slot for longer than ``slack_s`` (and is usable by that task's submitter), nor longer
than ``offer_window_s + bridge_rtt_s + slack_s`` while the bridge is up and could take it.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .scheduler import Scheduler
from .scheduler_model import (
    BRIDGE,
    LOCAL,
    Admission,
    AdmissionReply,
    BridgeResult,
    BridgeUnavailable,
    CancelRemote,
    Effect,
    Escalate,
    Event,
    Finished,
    PeerAd,
    PeerGone,
    ResultArrived,
    RunLocal,
    SchedulerConfig,
    Send,
    Submitted,
    Task,
    TaskState,
    Tick,
    Where,
)


@dataclass(frozen=True, slots=True)
class MemberSpec:
    name: str
    slots: int = 1
    queue_max: int = 8
    kinds: tuple[str, ...] = ("k",)
    memory_mb: int = 4096
    gpus: tuple[str, ...] = ()
    submitter: bool = False
    liar: bool = False  # returns a wrong digest for everything
    dies_at: float | None = None
    speed: float = 1.0


@dataclass(frozen=True, slots=True)
class SimConfig:
    members: tuple[MemberSpec, ...]
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    latency_s: float = 0.002
    ad_period_s: float = 2.0
    ad_delay_s: float = 0.25
    detect_s: float = 1.0
    bridge_rtt_s: float = 0.2  # the real round trip (the scheduler starts with its guess)
    bridge_down: tuple[tuple[float, float], ...] = ()
    slack_s: float = 0.6
    check: bool = True


@dataclass(slots=True)
class Job:
    task: Task
    submitter: str
    duration: float
    attempt: int  # sequence number of the assignment, to drop stale completions


@dataclass(slots=True)
class Executor:
    spec: MemberSpec
    running: dict[tuple[str, str], Job] = field(default_factory=dict)
    queues: dict[str, list[Job]] = field(default_factory=dict)  # per submitter, FIFO
    rr: list[str] = field(default_factory=list)  # round-robin order of submitters
    alive: bool = True
    idle_since: float | None = 0.0
    queued_at: dict[tuple[str, str], float] = field(default_factory=dict)
    ad_pending: bool = False

    @property
    def free(self) -> int:
        return self.spec.slots - len(self.running)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())


@dataclass(slots=True)
class SimReport:
    submitted: dict[str, str] = field(default_factory=dict)  # task id -> submitter
    finished: dict[str, list[Finished]] = field(default_factory=dict)
    finish_time: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    escalated_at: dict[str, float] = field(default_factory=dict)
    queued_on: dict[str, list[str]] = field(default_factory=dict)  # task -> executors queued
    decision_s: float = 0.0
    handle_calls: int = 0
    end: float = 0.0

    def lost(self) -> list[str]:
        return sorted(t for t in self.submitted if not self.finished.get(t))

    def twice(self) -> list[str]:
        return sorted(t for t, f in self.finished.items() if len(f) > 1)

    def state(self, task_id: str) -> TaskState | None:
        f = self.finished.get(task_id)
        return f[0].state if f else None


def honest_digest(task_id: str) -> bytes:
    return hashlib.sha256(task_id.encode()).digest()


class Simulation:
    def __init__(self, cfg: SimConfig, rng: random.Random,
                 meter: Callable[[], float] | None = None) -> None:
        self.cfg = cfg
        self.rng = rng
        self.meter = meter
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.execs = {m.name: Executor(m) for m in cfg.members}
        self.scheds: dict[str, Scheduler] = {}
        self.durations: dict[str, float] = {}
        self.report = SimReport()
        self._tick_at: dict[str, float] = {}
        self._attempt = 0
        self._cancelled: set[tuple[str, str]] = set()  # (member, task) cancelled remotely
        self._bridge_jobs: dict[str, int] = {}
        self._reported: set[str] = set()
        for m in cfg.members:
            if m.submitter:
                self.scheds[m.name] = Scheduler(
                    cfg.sched, jitter=lambda: rng.uniform(0.5, 1.5))
            if m.dies_at is not None:
                self.at(m.dies_at, partial(self._die, m.name))
        for m in cfg.members:
            self.at(rng.uniform(0, 0.01), partial(self._publish, m.name, periodic=True))

    # --- driving ---------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn))

    def submit(self, submitter: str, task: Task, at: float, duration: float) -> None:
        self.durations[task.id] = duration
        self.report.submitted[task.id] = submitter
        self.at(at, lambda: self._feed(submitter, Submitted(task)))

    def run(self, until: float, max_events: int = 5_000_000) -> SimReport:
        n = 0
        while self._heap and n < max_events:
            t, _, fn = heapq.heappop(self._heap)
            if t > until:
                break
            self.now = t
            fn()
            n += 1
            if self.cfg.check:
                self._check()
            if len(self.report.finished) >= len(self.report.submitted) and \
                    self._all_submitted_seen():
                break
        self.report.end = self.now
        return self.report

    def _all_submitted_seen(self) -> bool:
        return all(t in self.report.finished for t in self.report.submitted)

    def _feed(self, name: str, event: Event) -> None:
        sched = self.scheds.get(name)
        if sched is None or not self.execs[name].alive:
            return
        if self.meter is not None:
            t0 = self.meter()
            effects = sched.handle(event, self.now)
            self.report.decision_s += self.meter() - t0
        else:
            effects = sched.handle(event, self.now)
            # the count the dashboard reads is kept, not counted: it must agree
            held = sum(1 for rec in sched.records.values() if rec.state is TaskState.QUEUED)
            if sched.queued() != held:
                self.report.violations.append(
                    f"{name}: queued() is {sched.queued()} while {held} tasks are held")
        self.report.handle_calls += 1
        for eff in effects:
            self._carry_out(name, eff)
        wake = sched.next_wakeup()
        if wake is not None and wake < self._tick_at.get(name, math.inf):
            self._tick_at[name] = wake
            self.at(wake, lambda: self._tick(name, wake))

    def _tick(self, name: str, when: float) -> None:
        if self._tick_at.get(name) == when:
            del self._tick_at[name]
        self._feed(name, Tick())

    def _carry_out(self, sub: str, eff: Effect) -> None:
        lat = self.cfg.latency_s
        if isinstance(eff, Send):
            self.at(self.now + lat, lambda: self._assign(eff.peer, sub, eff.task))
        elif isinstance(eff, RunLocal):
            self._assign(sub, sub, eff.task)
        elif isinstance(eff, Escalate):
            self._escalate(sub, eff.task)
        elif isinstance(eff, CancelRemote):
            if eff.target == BRIDGE:
                self._bridge_jobs.pop(eff.task_id, None)
            else:
                member = sub if eff.target == LOCAL else eff.target
                delay = 0.0 if eff.target == LOCAL else lat
                self.at(self.now + delay, lambda: self._cancel(member, eff.task_id))
        elif isinstance(eff, Finished):
            self.report.finished.setdefault(eff.task_id, []).append(eff)
            self.report.finish_time.setdefault(eff.task_id, self.now)

    # --- executors -------------------------------------------------------------------------
    def _as_seen(self, member: str, sub: str) -> str:
        return LOCAL if member == sub else member

    def _reply(self, member: str, sub: str, event: Event) -> None:
        delay = 0.0 if member == sub else self.cfg.latency_s
        self.at(self.now + delay, lambda: self._feed(sub, event))

    def _assign(self, member: str, sub: str, task: Task) -> None:
        ex = self.execs[member]
        if not ex.alive:
            return  # the submitter learns from PeerGone
        self._cancelled.discard((member, task.id))
        self._attempt += 1
        job = Job(task, sub, self.durations[task.id] / ex.spec.speed, self._attempt)
        seen = self._as_seen(member, sub)
        if ex.free > 0:
            self._start(ex, job)
            self._reply(member, sub, AdmissionReply(task.id, seen, Admission.STARTED))
        elif ex.queued < ex.spec.queue_max or self._evict_for(ex, sub):
            q = ex.queues.setdefault(sub, [])
            if sub not in ex.rr:
                ex.rr.append(sub)
            q.append(job)
            ex.queued_at[(sub, task.id)] = self.now
            self.report.queued_on.setdefault(task.id, []).append(member)
            self._reply(member, sub, AdmissionReply(task.id, seen, Admission.QUEUED, ex.queued))
        else:
            self._reply(member, sub, AdmissionReply(task.id, seen, Admission.BUSY))
        self._changed(member)

    def _evict_for(self, ex: Executor, sub: str) -> bool:
        """A full queue makes room for a submitter with fewer places than the one with
        the most: that one's newest entry is refused (busy) after the fact. Without this
        the first submitter to fill every queue keeps the team to itself."""
        mine = len(ex.queues.get(sub, ()))
        top = max(ex.queues, key=lambda s: (len(ex.queues[s]), s), default=None)
        if top is None or top == sub or len(ex.queues[top]) <= mine + 1:
            return False
        job = ex.queues[top].pop()
        ex.queued_at.pop((top, job.task.id), None)
        if not ex.queues[top]:
            ex.rr.remove(top)
        seen = self._as_seen(ex.spec.name, top)
        self._reply(ex.spec.name, top, AdmissionReply(job.task.id, seen, Admission.BUSY))
        return True

    def _start(self, ex: Executor, job: Job) -> None:
        ex.running[(job.submitter, job.task.id)] = job
        ex.idle_since = None
        self.at(self.now + job.duration, lambda: self._complete(ex, job))

    def _complete(self, ex: Executor, job: Job) -> None:
        key = (job.submitter, job.task.id)
        if not ex.alive or ex.running.get(key) is not job:
            return  # cancelled meanwhile
        del ex.running[key]
        digest = (hashlib.sha256(b"lie" + ex.spec.name.encode()).digest() if ex.spec.liar
                  else honest_digest(job.task.id))
        seen = self._as_seen(ex.spec.name, job.submitter)
        self._reply(ex.spec.name, job.submitter,
                    ResultArrived(job.task.id, seen, True, digest, job.duration))
        self._next(ex)

    def _next(self, ex: Executor) -> None:
        while ex.free > 0 and ex.queued > 0:
            sub = ex.rr.pop(0)
            q = ex.queues[sub]
            job = q.pop(0)
            if q:
                ex.rr.append(sub)
            ex.queued_at.pop((sub, job.task.id), None)
            self._start(ex, job)
            # the progress message: a queued task started
            seen = self._as_seen(ex.spec.name, sub)
            self._reply(ex.spec.name, sub, AdmissionReply(job.task.id, seen, Admission.STARTED))
        if ex.free > 0 and ex.idle_since is None:
            ex.idle_since = self.now
        self._changed(ex.spec.name)

    def _cancel(self, member: str, task_id: str) -> None:
        ex = self.execs[member]
        for key in [k for k in ex.running if k[1] == task_id]:
            del ex.running[key]
        for sub, q in ex.queues.items():
            kept = [j for j in q if j.task.id != task_id]
            if len(kept) != len(q):
                ex.queues[sub] = kept
                ex.queued_at.pop((sub, task_id), None)
                if not kept and sub in ex.rr:
                    ex.rr.remove(sub)
        self._next(ex)

    def _die(self, name: str) -> None:
        ex = self.execs[name]
        ex.alive = False
        ex.running.clear()
        ex.queues.clear()
        ex.queued_at.clear()
        for sub in self.scheds:
            if sub != name:
                self.at(self.now + self.cfg.detect_s, partial(self._feed, sub, PeerGone(name)))

    # --- ads -------------------------------------------------------------------------------
    def _ad(self, ex: Executor, as_local: bool) -> PeerAd:
        m = ex.spec
        return PeerAd(LOCAL if as_local else m.name, dict.fromkeys(m.kinds, "1"), m.slots,
                      max(0, ex.free), ex.queued, m.memory_mb, m.gpus, 0.0,
                      self.cfg.latency_s * 2000)

    def _changed(self, name: str) -> None:
        ex = self.execs[name]
        if name in self.scheds:  # our own executor: the scheduler sees it at once
            self.at(self.now, lambda: self._feed(name, self._ad(ex, True)))
        if not ex.ad_pending:
            ex.ad_pending = True
            self.at(self.now + self.cfg.ad_delay_s, lambda: self._publish(name, periodic=False))

    def _publish(self, name: str, *, periodic: bool) -> None:
        ex = self.execs[name]
        if not ex.alive:
            return
        if not periodic:
            ex.ad_pending = False
        for sub in self.scheds:
            ad = self._ad(ex, sub == name)
            delay = 0.0 if sub == name else self.cfg.latency_s
            self.at(self.now + delay, partial(self._feed, sub, ad))
        if periodic:
            self.at(self.now + self.cfg.ad_period_s * self.rng.uniform(0.9, 1.1),
                    lambda: self._publish(name, periodic=True))

    # --- bridge ----------------------------------------------------------------------------
    def bridge_up(self, t: float) -> bool:
        return not any(a <= t < b for a, b in self.cfg.bridge_down)

    def _escalate(self, sub: str, task: Task) -> None:
        self.report.escalated_at.setdefault(task.id, self.now)
        self._attempt += 1
        token = self._attempt
        self._bridge_jobs[task.id] = token
        rtt = self.cfg.bridge_rtt_s
        if not self.bridge_up(self.now + rtt / 2):
            self.at(self.now + rtt, lambda: self._bridge_done(sub, task, token, ok=False))
            return
        self.at(self.now + rtt + self.durations[task.id],
                lambda: self._bridge_done(sub, task, token, ok=True))

    def _bridge_done(self, sub: str, task: Task, token: int, *, ok: bool) -> None:
        if self._bridge_jobs.get(task.id) != token:
            return  # cancelled
        del self._bridge_jobs[task.id]
        event: Event = (BridgeResult(task.id, True, honest_digest(task.id)) if ok
                        else BridgeUnavailable(task.id))
        self._feed(sub, event)

    # --- the outside invariant -------------------------------------------------------------
    def _check(self) -> None:
        slack = self.cfg.slack_s
        for ex in self.execs.values():
            if not ex.alive:
                continue
            for (sub, task_id), since in ex.queued_at.items():
                waited = self.now - since
                if waited <= slack:
                    continue
                other = self._idle_elsewhere(ex, sub, task_id, since)
                if other is not None:
                    self._violation(f"{task_id} of {sub} waited {waited:.2f} s in "
                                    f"{ex.spec.name}'s queue while {other} had a free slot")
                elif self._bridge_could(sub, task_id, since):
                    self._violation(f"{task_id} of {sub} waited {waited:.2f} s in "
                                    f"{ex.spec.name}'s queue while the bridge was up")

    def _violation(self, text: str) -> None:
        key = text.split(" waited")[0]
        if key not in self._reported:
            self._reported.add(key)
            self.report.violations.append(f"t={self.now:.3f}: {text}")

    def _idle_elsewhere(self, ex: Executor, sub: str, task_id: str,
                        since: float) -> str | None:
        sched = self.scheds[sub]
        rec = sched.records.get(task_id)
        if rec is None:
            return None
        for other in self.execs.values():
            name = other.spec.name
            seen = self._as_seen(name, sub)
            if other is ex or not other.alive or other.idle_since is None:
                continue
            if self.now - max(other.idle_since, since) <= self.cfg.slack_s:
                continue
            view = sched.peers.get(seen)
            if view is None or not view.runs(rec.task) or seen in rec.excluded \
                    or seen in rec.attempts or seen in rec.results \
                    or not view.breaker.allows(self.now):
                continue
            if rec.task.where is Where.PEERS and seen == LOCAL:
                continue
            return name
        return None

    def _bridge_could(self, sub: str, task_id: str, since: float) -> bool:
        sched = self.scheds[sub]
        rec = sched.records.get(task_id)
        cfg = self.cfg.sched
        if rec is None or not cfg.bridge or not self.bridge_up(self.now):
            return False
        eligible = (rec.task.where is Where.ANY and sched.bridge_can_take(rec.task)
                    and sched.bridge_breaker.allows(self.now))
        limit = cfg.offer_window_s + max(cfg.bridge_rtt_s, sched.bridge_rtt_s) + self.cfg.slack_s
        # counted from when the submitter could know the bridge was back (its breaker)
        waited = self.now - max(since, sched.bridge_breaker.open_until)
        own_pipeline = self._behind_own(rec, sub)
        return eligible and not own_pipeline and waited > limit

    def _behind_own(self, rec: Any, sub: str) -> bool:
        """Pipelined short tasks wait behind the submitter's own tasks on purpose."""
        sched = self.scheds[sub]
        avg = sched._kind_avg_s.get(rec.task.kind)
        return avg is not None and avg * 4 < sched.bridge_rtt_s
