"""The scheduler's vocabulary: tasks, events in, effects out, states and typed reasons.

Everything here is plain data (frozen dataclasses and enums). The rules that connect them
live in ``scheduler.py``, and those the daemon's task service applies too in
``scheduler_rules.py``; the per-peer bookkeeping (clamped ads, scores, breakers) in
``scheduler_peers.py``. Human text is
rendered from the typed reasons (``Wait.render``, ``Failure.render``) and never parsed
back: code decides on the enums.

Targets are strings: a peer id, or one of the two reserved names ``LOCAL`` (this node's
own executor) and ``BRIDGE`` (the Cloudflare Worker). Peer ids are base58 multihashes, so
they can never collide with the reserved names.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .capability import CapabilityAd

LOCAL = "local"
BRIDGE = "bridge"


class TaskState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: hash by identity, in C

    QUEUED = "queued"  # held by the submitter, waiting for a place (see its Wait)
    RUNNING = "running"  # at least one attempt is out (sent, queued remotely, started)
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


class Where(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: hash by identity, in C

    ANY = "any"  # local, then peers, then the bridge
    LOCAL = "local"
    PEERS = "peers"
    BRIDGE = "bridge"


class Admission(enum.Enum):
    """An executor's reply to an assignment (one per task, within one round trip)."""

    __hash__ = object.__hash__  # members are singletons: hash by identity, in C

    STARTED = "started"
    QUEUED = "queued"  # with its position in the executor's queue (1 = next)
    BUSY = "busy"  # refused: no slot and no queue place


class Loss(enum.Enum):
    """Why an attempt ended without a result."""

    __hash__ = object.__hash__  # members are singletons: hash by identity, in C

    STREAM_CLOSED = "stream_closed"
    TIMEOUT = "timeout"
    REFUSED = "refused"  # unknown kind, not allowed (busy is an Admission, not a loss)
    BAD_RESULT = "bad_result"  # forged or altered result
    PEER_GONE = "peer_gone"


class WaitReason(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: hash by identity, in C

    SUBMITTED = "submitted"
    NO_RUNNER = "no_runner"  # nobody runs the kind (yet: startup grace)
    UNREACHABLE = "unreachable"  # members that could run it lately are gone for now
    NO_RESOURCES = "no_resources"  # runners exist, none with the memory/GPU it needs
    ALL_BUSY = "all_busy"
    KIND_LIMIT = "kind_limit"
    BACKOFF = "backoff"
    BRIDGE_DOWN = "bridge_down"
    REPLICAS_PENDING = "replicas_pending"
    SENT = "sent"  # assigned, admission reply not yet in
    QUEUED_ON_PEER = "queued_on_peer"
    RUNNING_ON = "running_on"
    ON_BRIDGE = "on_bridge"


class FailReason(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: hash by identity, in C

    DEADLINE = "deadline"
    GAVE_UP = "gave_up"  # max_attempts attempts lost
    NO_RUNNER = "no_runner"
    NO_BRIDGE = "no_bridge"  # where=bridge on a node without one
    REPLICAS_DISAGREE = "replicas_disagree"
    TOO_FEW_MEMBERS = "too_few_members"  # fewer members run the kind than replicas wanted
    TASK_ERROR = "task_error"  # the kind itself reported an error (an accepted result)


@dataclass(frozen=True, slots=True)
class Wait:
    """Why a task is where it is; ``render`` makes the text users see."""

    reason: WaitReason
    target: str | None = None  # peer for SENT/QUEUED_ON_PEER/RUNNING_ON/BACKOFF
    count: int = 0  # queue position, busy slots, limit, attempt number, replicas placed
    total: int = 0  # max attempts, replicas wanted
    until: float | None = None  # BACKOFF/BRIDGE_DOWN: when it is tried again;
    #                             UNREACHABLE: when one that could run it was heard
    kind: str = ""
    loss: Loss | None = None

    def render(self, now: float) -> str:
        # only the one text is built: the shell renders a wait on every change
        w = WaitReason
        match self.reason:
            case w.SENT:
                return f"sent to {self.target}"
            case w.QUEUED_ON_PEER:
                return f"queued on {self.target} at position {self.count}"
            case w.RUNNING_ON:
                return f"running on {self.target}"
            case w.ON_BRIDGE:
                return "sent to the bridge"
            case w.ALL_BUSY:
                return f"all {self.count} matching slots busy"
            case w.SUBMITTED:
                return "submitted"
            case w.NO_RUNNER:
                return (f"no member runs kind {self.kind} (waiting for members to advertise"
                        " it)")
            case w.UNREACHABLE:
                ago = now - (self.until if self.until is not None else now)
                return (f"no member that can run it (kind {self.kind}, with the memory and"
                        f" GPU it needs) is reachable now (one was {ago:.0f} s ago);"
                        " waiting for one")
            case w.NO_RESOURCES:
                return f"no member running {self.kind} has the memory or GPU it needs"
            case w.KIND_LIMIT:
                return f"kind limit: {self.count} {self.kind} tasks already running"
            case w.BACKOFF:
                left = max(0.0, (self.until or now) - now)
                return (f"retry {self.count + 1} of {self.total} in {left:.1f} s after "
                        f"{self.target} failed ({self.loss.value if self.loss else '?'})")
            case w.BRIDGE_DOWN:
                left = max(0.0, (self.until or now) - now)
                return (f"no peer has capacity and the bridge is unreachable; retrying "
                        f"in {left:.0f} s")
            case w.REPLICAS_PENDING:
                return (f"{self.count} of {self.total} replicas placed; waiting for more"
                        " distinct members")
        raise AssertionError(f"no text for {self.reason}")  # every WaitReason has one


@dataclass(frozen=True, slots=True)
class Failure:
    reason: FailReason
    target: str | None = None
    attempts: int = 0
    loss: Loss | None = None
    digests: tuple[tuple[str, bytes], ...] = ()  # REPLICAS_DISAGREE: (peer, digest)
    seconds: float = 0.0  # DEADLINE: the timeout
    quorum: int = 0  # REPLICAS_DISAGREE: the k that no digest can reach (0: not said)

    def render(self) -> str:
        f = FailReason
        if self.reason is f.DEADLINE:
            return f"deadline of {self.seconds:g} s exceeded"
        if self.reason is f.GAVE_UP:
            loss = self.loss.value if self.loss else "?"
            return f"gave up after {self.attempts} attempts; last: {self.target} ({loss})"
        if self.reason is f.NO_RUNNER:
            return "no member runs this kind with the resources it needs, and no bridge can"
        if self.reason is f.NO_BRIDGE:
            return "no bridge configured for this node (set [bridge] url or use --bridge URL)"
        if self.reason is f.TOO_FEW_MEMBERS:
            return (f"{self.attempts} replicas need as many distinct members running the "
                    "kind, and fewer do: lower --replicas or add members")
        if self.reason is f.REPLICAS_DISAGREE:
            detail = "; ".join(f"{p} -> {d.hex()[:12]}" for p, d in self.digests)
            if self.quorum:
                return (f"replicas disagree: {detail} (no answer can reach the quorum of"
                        f" {self.quorum} of {self.attempts} replicas)")
            return f"replicas disagree: {detail}"
        return f"the task failed on {self.target}"


@dataclass(frozen=True, slots=True)
class Task:
    """What the scheduler needs to know about a task (the shell keeps inputs and params).

    ``deadline`` is absolute, on the clock the caller passes as ``now``. ``quorum`` is the
    k of k-of-n (None: every replica must agree). ``bridge_ok``: the bridge can run this
    kind (portable, or a pull-mode worker does)."""

    id: str
    kind: str
    version: str
    priority: int = 0
    where: Where = Where.ANY
    replicas: int = 1
    quorum: int | None = None
    deadline: float | None = None
    memory_mb: int = 0
    gpu: bool = False
    bridge_ok: bool = True

    @property
    def k(self) -> int:
        return self.replicas if self.quorum is None else self.quorum


# --- events in -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Submitted:
    task: Task


@dataclass(frozen=True, slots=True)
class Cancelled:
    task_id: str


@dataclass(frozen=True, slots=True)
class PeerAd:
    """A peer's (or, with ``peer=LOCAL``, this node's own) capacity. Values come from the
    network and are clamped by the scheduler, so any number is acceptable here."""

    peer: str
    kinds: Mapping[str, str]
    slots: float
    free_slots: float
    queue: float
    memory_mb: float = 0
    gpus: tuple[str, ...] = ()
    cost: float = 0.0
    rtt_ms: float | None = None

    @classmethod
    def from_capability(cls, ad: CapabilityAd, rtt_ms: float | None = None) -> PeerAd:
        return cls(ad.peer_id, dict(ad.kinds), ad.slots, ad.free_slots, ad.queue,
                   ad.memory_bytes / 2**20, tuple(ad.gpus), ad.cost, rtt_ms)


@dataclass(frozen=True, slots=True)
class PeerGone:
    peer: str


@dataclass(frozen=True, slots=True)
class AdmissionReply:
    task_id: str
    peer: str
    admission: Admission
    position: int = 0


@dataclass(frozen=True, slots=True)
class ResultArrived:
    """A verified result (its digest already checked against the output)."""

    task_id: str
    peer: str
    ok: bool
    digest: bytes
    wall_s: float = math.nan


@dataclass(frozen=True, slots=True)
class AttemptLost:
    task_id: str
    peer: str
    loss: Loss


@dataclass(frozen=True, slots=True)
class BridgeResult:
    task_id: str
    ok: bool
    digest: bytes
    executed_by: str = BRIDGE  # a pull-mode member's peer id when one ran it


@dataclass(frozen=True, slots=True)
class BridgeUnavailable:
    task_id: str


@dataclass(frozen=True, slots=True)
class BridgeMeasured:
    """The bridge answered a request in ``rtt_s`` (a health check, or a submit's answer):
    the round trip Rules 5 and 6 weigh queues against. ``BridgeResult`` measures it too,
    from ``Escalate`` to the result, for shells that learn nothing sooner."""

    rtt_s: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: deadlines, backoffs and offer windows are checked on every event."""


Event = (Submitted | Cancelled | PeerAd | PeerGone | AdmissionReply | ResultArrived
         | AttemptLost | BridgeResult | BridgeUnavailable | BridgeMeasured | Tick)


# --- effects out ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    peer: str
    task: Task


@dataclass(frozen=True, slots=True)
class RunLocal:
    task: Task


@dataclass(frozen=True, slots=True)
class Escalate:
    task: Task


@dataclass(frozen=True, slots=True)
class CancelRemote:
    """Stop this attempt: ``target`` is a peer id, ``LOCAL`` or ``BRIDGE``."""

    target: str
    task_id: str


@dataclass(frozen=True, slots=True)
class Persist:
    """A non-terminal change worth journaling (state, or why it waits)."""

    task_id: str
    state: TaskState
    wait: Wait | None
    targets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Finished:
    """The task's one terminal outcome. ``by`` lists the targets whose results were
    accepted (the replicas that agreed); the shell takes the output from any of them."""

    task_id: str
    state: TaskState
    failure: Failure | None = None
    by: tuple[str, ...] = ()
    digest: bytes | None = None


Effect = Send | RunLocal | Escalate | CancelRemote | Persist | Finished


# --- configuration -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Weights:
    compatibility: float = 40.0
    latency: float = 30.0
    cost: float = 20.0
    health: float = 10.0


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    weights: Weights = field(default_factory=Weights)
    offer_window_s: float = 0.5  # how long a task waits for a peer before the bridge
    startup_grace_s: float = 3.0  # before "nobody runs kind K" is final
    max_attempts: int = 5
    retry_base_s: float = 0.1
    retry_max_s: float = 5.0
    breaker_threshold: int = 3  # consecutive failures that open a breaker
    breaker_base_s: float = 2.0
    breaker_max_s: float = 60.0
    kind_limits: Mapping[str, int] = field(default_factory=dict)
    bridge: bool = False  # a bridge is configured
    bridge_rtt_s: float = 1.0  # first estimate of the bridge's round trip, until measured
    bridge_memory_mb: int = 128
    bridge_max_inflight: int = 256
    bridge_down_retry_s: float = 1.0
    target_queued_s: float = 0.02  # pipeline about this much work per slot beyond the running
    max_pipeline: int = 64
    max_rtt_covered_s: float = 0.5  # a slower link's round trip is not pipelined further
    # a member that could run a task (its kind, memory and GPU) and was heard this
    # recently is worth waiting for: a laptop whose network drops must not fail its whole
    # queue (Rule 5)
    kind_memory_s: float = 3600.0
    # False: Persist only when a task's state or targets change, not when only why it
    # waits does (a shell that shows wait_of() when asked, such as the daemon's, saves
    # two effects per task; the simulations keep every change)
    persist_waits: bool = True
