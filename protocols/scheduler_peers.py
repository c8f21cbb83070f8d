"""What a submitter believes about each peer: clamped ads, capacity estimates, breakers,
scores and estimated waits.

Theory of operation:
- An ad's numbers come from the network. Each is clamped into a sane range before use
  (NaN, negative and huge values included), so no score is NaN and no estimate divides by
  zero. A hostile ad can at worst claim the best legitimate values, never better.
- Capacity is an estimate corrected by every fact we learn: the ad sets free slots and
  queue (minus our own assignments it cannot have seen yet); each of our assignments takes
  a free slot or a queue place; an admission reply says started (as estimated), queued at
  position N (no slot was free) or busy (nothing fits until the peer tells us otherwise);
  each of our results gives a place back.
- A breaker opens after ``threshold`` consecutive failures, for ``base * 2**extra`` seconds
  capped at ``max``; a success closes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .scheduler_model import LOCAL, PeerAd, SchedulerConfig, Task, Weights
from .scheduler_rules import fits_resources, placement_score, queue_wait_s

MAX_SLOTS = 4096
MAX_QUEUE = 1_000_000
MAX_MEMORY_MB = 2**24  # 16 TiB
MAX_COST = 1e6
MAX_RTT_MS = 60_000.0
DEFAULT_RTT_MS = 5.0
EWMA = 0.2  # weight of the newest sample in running averages


def clamp_int(value: float, hi: int) -> int:
    """A count from the network: NaN or negative -> 0, huge -> ``hi``."""
    if not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        return 0
    return int(min(value, hi))


def clamp_float(value: float, lo: float, hi: float, nan: float) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return nan
    return float(min(max(value, lo), hi))


def ewma(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - EWMA) * old + EWMA * sample


@dataclass(slots=True)
class Breaker:
    """A per-target circuit breaker: open after ``breaker_threshold`` failures in a row,
    for ``breaker_base_s`` doubling per further failure up to ``breaker_max_s``."""

    failures: int = 0
    open_until: float = 0.0
    opened_at: float = -math.inf

    def allows(self, now: float, heard_at: float = -math.inf) -> bool:
        """Closed; or open, but the target was heard from (a fresh ad, after a partition
        heals) since it opened: one probe goes through, half-open."""
        return now >= self.open_until or heard_at > self.opened_at

    def success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def failure(self, now: float, cfg: SchedulerConfig) -> None:
        self.failures += 1
        extra = self.failures - cfg.breaker_threshold
        if extra >= 0:
            self.opened_at = now
            self.open_until = now + min(cfg.breaker_max_s, cfg.breaker_base_s * 2 ** min(extra, 30))


@dataclass(slots=True)
class PeerView:
    peer: str
    kinds: dict[str, str]
    slots: int
    free: int  # estimated free slots
    queue: int  # estimated queue length
    memory_mb: int
    gpus: tuple[str, ...]
    cost: float
    rtt_ms: float
    full: bool = False  # said busy: nothing fits until an ad or a result says otherwise
    inflight: set[str] = field(default_factory=set)  # our task ids there
    unconfirmed: set[str] = field(default_factory=set)  # ... without an admission reply yet
    avg_task_s: float | None = None
    successes: int = 0
    failures: int = 0
    breaker: Breaker = field(default_factory=Breaker)
    stamp: int = 0  # bumped on every change the scheduler's indexes care about
    listed_free: bool | None = None  # whether PeerIndex's free sets hold it (None: unlisted)

    @classmethod
    def from_ad(cls, ad: PeerAd) -> PeerView:
        v = cls(ad.peer, {}, 0, 0, 0, 0, (), 0.0, DEFAULT_RTT_MS)
        v.update(ad)
        return v

    def update(self, ad: PeerAd) -> None:
        """Take a newer ad; our assignments it cannot have counted yet stay deducted."""
        kinds = ad.kinds if isinstance(ad.kinds, dict) else dict(ad.kinds)
        self.kinds = {k: v for k, v in kinds.items() if isinstance(k, str) and isinstance(v, str)}
        self.slots = clamp_int(ad.slots, MAX_SLOTS)
        free = min(clamp_int(ad.free_slots, MAX_SLOTS), self.slots)
        self.free = max(0, free - len(self.unconfirmed))
        # Taken as it is, though it may count some of our tasks that have ended since it
        # was made: it is the only news of other submitters' work queued after our last
        # admission reply there. Capping it by our own bookkeeping (session 10) hid that
        # work and cost 3 % of the simulated makespan (docs/BENCHMARKS.md, "Scheduler
        # decisions"), for no measurable gain to one submitter.
        self.queue = clamp_int(ad.queue, MAX_QUEUE)
        self.memory_mb = clamp_int(ad.memory_mb, MAX_MEMORY_MB)
        self.gpus = tuple(g for g in ad.gpus if isinstance(g, str))[:16]
        self.cost = clamp_float(ad.cost, 0.0, MAX_COST, nan=MAX_COST)
        if ad.rtt_ms is not None:
            self.rtt_ms = clamp_float(ad.rtt_ms, 0.0, MAX_RTT_MS, nan=MAX_RTT_MS)
        if self.peer == LOCAL:
            self.rtt_ms = 0.0
        self.full = False

    # --- capacity bookkeeping --------------------------------------------------------------
    def assigned(self, task_id: str) -> None:
        self.inflight.add(task_id)
        self.unconfirmed.add(task_id)
        if self.free > 0:
            self.free -= 1
        else:
            self.queue = min(MAX_QUEUE, self.queue + 1)

    def admitted_queued(self, task_id: str, position: int) -> None:
        self.unconfirmed.discard(task_id)
        self.free = 0
        self.queue = max(self.queue, clamp_int(position, MAX_QUEUE))

    def started(self, task_id: str) -> None:
        self.unconfirmed.discard(task_id)

    def refused_busy(self, task_id: str) -> None:
        self.inflight.discard(task_id)
        self.unconfirmed.discard(task_id)
        self.free = 0
        self.full = True

    def released(self, task_id: str, wall_s: float | None) -> None:
        """One of our attempts ended here: its place goes to the queue or is free."""
        if task_id not in self.inflight:
            return
        self.inflight.discard(task_id)
        self.unconfirmed.discard(task_id)
        self.full = False
        if self.queue > 0:
            self.queue -= 1
        else:
            self.free = min(self.slots, self.free + 1)
        if wall_s is not None and math.isfinite(wall_s) and wall_s >= 0:
            self.avg_task_s = ewma(self.avg_task_s, min(wall_s, 86_400.0))

    # --- placement -------------------------------------------------------------------------
    def runs(self, task: Task) -> bool:
        """Runs the kind and has the resources (memory, GPU) the task needs."""
        if task.kind not in self.kinds or self.slots == 0:
            return False
        return fits_resources(task.memory_mb, task.gpu, self.memory_mb, self.gpus)

    def can_start(self) -> bool:
        return self.free > 0 and not self.full

    @property
    def has_queue_place(self) -> bool:
        """Room for one more of ours in its queue: one queue place per slot (Rule 5)."""
        return not self.full and 0 < self.slots and len(self.inflight) < 2 * self.slots

    def wait_s(self, kind_avg_s: float | None) -> float:
        """Estimated time until a task sent now would start here (inf when unknown)."""
        if self.can_start():
            return 0.0
        avg = self.avg_task_s if self.avg_task_s is not None else kind_avg_s
        if self.full or self.slots == 0:
            return math.inf
        return queue_wait_s(avg, self.queue + 1, self.slots)

    @property
    def health(self) -> float:
        return (self.successes + 1) / (self.successes + self.failures + 1)

    @property
    def load(self) -> float:
        """Queue places per slot, counting one more (what a new task would find)."""
        return (self.queue + 1) / max(1, self.slots)

    def score(self, task: Task, w: Weights) -> float:
        return self.score_for(task.kind, task.version, w)

    def score_for(self, kind: str, version: str, w: Weights) -> float:
        """Compatibility 40, latency 30, cost 20, health 10 (by default); higher is better."""
        return placement_score(self.kinds.get(kind) == version, self.rtt_ms, self.cost,
                               self.health, w)


def sane_weights(w: Weights) -> Weights:
    """Weights from config: NaN, negative or infinite ones count as 0."""
    def ok(x: float) -> float:
        return x if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else 0.0
    return Weights(ok(w.compatibility), ok(w.latency), ok(w.cost), ok(w.health))
