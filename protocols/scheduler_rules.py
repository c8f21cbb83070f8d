"""The placement and settling rules as pure functions.

``scheduler.py`` (the state machine the daemon's task service drives, and the
simulations too) decides with these; each is small enough to pin at its boundaries
(tests/test_scheduler_rules.py) apart from the machine's bookkeeping. Each function names
the rule of ``scheduler.py``'s docstring it implements. (They were written to be shared
while the daemon still placed tasks itself, until session 10 handed placement over.)

Times are seconds; ``inf`` means unknown or never.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import LocalProtocolError
from .scheduler_model import FailReason, Failure, SchedulerConfig, TaskState, Weights


def pipeline_depth(avg_task_s: float | None, rtt_s: float, cfg: SchedulerConfig) -> int:
    """Rule 5 (pipelining): tasks to keep queued per peer slot beyond the running one.

    About ``target_queued_s`` of work, plus the link's round trip (up to
    ``max_rtt_covered_s``), so that a distant peer's slot does not idle while a result
    and the next assignment cross the network (docs/BENCHMARKS.md, "Distance"). A kind of
    unknown duration is not pipelined until results teach us its time: it may be a 60 s
    task, and a queue behind it is a wait nobody can estimate."""
    if avg_task_s is None or not math.isfinite(avg_task_s):
        return 0
    covered = min(max(rtt_s, 0.0), cfg.max_rtt_covered_s) if math.isfinite(rtt_s) else 0.0
    return int(min(cfg.max_pipeline, (cfg.target_queued_s + covered) / max(avg_task_s, 1e-6)))


def fits_resources(memory_mb: float, gpu: bool, have_memory_mb: float,
                   gpus: tuple[str, ...]) -> bool:
    """Rule 4's filter: can a member with ``have_memory_mb`` and ``gpus`` run a task that
    needs ``memory_mb`` (0: no need stated) and, if ``gpu``, a GPU?"""
    if gpu and not gpus:
        return False
    return memory_mb <= 0 or have_memory_mb >= memory_mb


def placement_score(same_version: bool, rtt_ms: float, cost: float, health: float,
                    w: Weights) -> float:
    """Rule 4: compatibility 40, latency 30, cost 20, health 10 (by default); higher is
    better. Inputs are already clamped (``scheduler_peers``) and weights sane."""
    compat = 1.0 if same_version else 0.5
    return (w.compatibility * compat + w.latency / (1 + rtt_ms / 10)
            + w.cost / (1 + cost) + w.health * health)


def queue_wait_s(avg_task_s: float | None, ahead: int, slots: int) -> float:
    """Estimated wait for a task with ``ahead`` tasks before it (running ones included)
    on ``slots`` slots, from recent task times there; ``inf`` when none are known."""
    if avg_task_s is None or not math.isfinite(avg_task_s):
        return math.inf
    return avg_task_s * max(0, ahead) / max(1, slots)


def escalate_now(now: float, waiting_since: float, cfg: SchedulerConfig, bridge_rtt_s: float,
                 queue_wait: float = math.inf) -> bool:
    """Rule 5's escalation: a task that found no free slot goes to the bridge once its
    kind has waited a whole offer window and the bridge's round trip is no longer than
    the wait in the best queue open to it (``inf``: no queue with a known wait)."""
    return now >= waiting_since + cfg.offer_window_s and bridge_rtt_s <= queue_wait


def leave_queue_for_bridge(now: float, queued_at: float, cfg: SchedulerConfig,
                           bridge_rtt_s: float, wait_left_s: float) -> bool:
    """Rule 6: a task queued in a busy peer's queue moves to the bridge once it has waited
    there an offer window and the bridge's round trip is shorter than the wait left. The
    wait left is the estimate, or the time already waited if that is longer (a task that
    outwaited its estimate was behind something slower than we knew)."""
    if now < queued_at + cfg.offer_window_s:
        return False
    return bridge_rtt_s < max(wait_left_s, now - queued_at)


def next_queue_check(now: float, queued_at: float, cfg: SchedulerConfig,
                     bridge_rtt_s: float) -> float:
    """When ``leave_queue_for_bridge`` can next change its answer by time alone: the end
    of the offer window, or the moment the time waited passes the bridge's round trip."""
    window_end = queued_at + cfg.offer_window_s
    if now < window_end:
        return window_end
    return max(now, queued_at + bridge_rtt_s) + 1e-6


def retry_delay_s(retries: int, cfg: SchedulerConfig, jitter: float) -> float:
    """Rule 8: the wait before retry number ``retries`` (1 = the first retry):
    ``min(max, base * 2**(retries - 1)) * jitter``. A jitter that is not a finite,
    non-negative number counts as 1."""
    j = jitter if math.isfinite(jitter) and jitter >= 0 else 1.0
    return min(cfg.retry_max_s, cfg.retry_base_s * 2.0 ** min(max(retries, 1) - 1, 30)) * j


KIND_CLOCK_IDLE_S = 1.0  # a kind idle this long past its window waits a window again


@dataclass(slots=True)
class KindClocks:
    """Rule 5's clock, per (kind, version): since when tasks of the kind find no room.

    The clock is the kind's, not the task's: once a kind has waited a whole offer window,
    the next task of it need not wait another (sustained saturation escalates at once,
    not one window per task). It stops when a task of the kind is placed on a free slot
    (``placed``), or when no task of it has waited for ``offer_window_s +
    KIND_CLOCK_IDLE_S``: a kind that saturated an hour ago gives peers a fresh window."""

    _clocks: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)

    def waiting(self, key: tuple[str, str], now: float, cfg: SchedulerConfig) -> float:
        """A task of the kind found no room now: since when the kind has been waiting."""
        since, last = self._clocks.get(key, (now, now))
        if now - last > cfg.offer_window_s + KIND_CLOCK_IDLE_S:
            since = now
        self._clocks[key] = (since, now)
        return since

    def placed(self, key: tuple[str, str]) -> None:
        self._clocks.pop(key, None)


# --- Rule 9 ------------------------------------------------------------------------------
# The daemon's task service settles replicas with it, and so does Scheduler._settle
# (tests/test_scheduler.py checks it against the scheduler's Finished for every order).
@dataclass(frozen=True, slots=True)
class Verdict:
    """Where a task with replicas stands after the results so far (``settle_quorum``).

    ``state`` is RUNNING (wait for more results), DONE (``by`` agreed on ``digest``) or
    FAILED: either ``by`` agreed on a failed outcome (``failure`` is TASK_ERROR, naming the
    first of them), or no outcome can reach the quorum any more (``failure`` is
    REPLICAS_DISAGREE with every (target, digest) received, ``by`` empty)."""

    state: TaskState
    by: tuple[str, ...] = ()
    digest: bytes | None = None
    failure: Failure | None = None


def settle_quorum(results: Mapping[str, tuple[bytes, bool]], replicas: int,
                  quorum: int) -> Verdict:
    """Rule 9: a task with ``replicas`` = n is done when ``quorum`` = k results agree.

    Args:
        results: target -> (output digest, ok) of each result received so far, in arrival
            order; targets whose attempt was lost are not in it (they are retried, so they
            still count as possible results).
        replicas: n, how many distinct members run the task.
        quorum: k, how many equal results settle it (1..n; n is unanimity).

    Returns:
        The verdict. Results agree when their digests are equal: the digest covers ok,
        output and error (protocols/tasks.py ``output_digest``), so a failed result is an
        outcome of its own, never agreeing with a success; k equal failures fail the task
        with that error. Agreement is impossible as soon as the largest group plus the n
        results still to come (running, or not placed yet) is short of k.

    Raises:
        LocalProtocolError: n < 1, or k outside 1..n (the caller validates user input).
    """
    if replicas < 1 or not 1 <= quorum <= replicas:
        raise LocalProtocolError(f"replicas must be >= 1 and the quorum between 1 and "
                                 f"replicas (got {replicas}, {quorum})")
    groups: dict[tuple[bytes, bool], list[str]] = {}
    for target, (digest, ok) in results.items():
        # keyed by ok too: a result that claims a digest it does not match cannot make a
        # failure agree with a success (digests are checked before they get here)
        groups.setdefault((digest, ok), []).append(target)
    if not groups:
        return Verdict(TaskState.RUNNING)
    # Called after each result, only the group that just grew can newly reach k (any
    # other would have settled the task before); max keeps the first of equal groups.
    (digest, ok), agreeing = max(groups.items(), key=lambda kv: len(kv[1]))
    if len(agreeing) >= quorum:
        failure = None if ok else Failure(FailReason.TASK_ERROR, agreeing[0])
        return Verdict(TaskState.DONE if ok else TaskState.FAILED, tuple(agreeing), digest,
                       failure)
    still_possible = replicas - len(results)
    if len(agreeing) + still_possible < quorum:
        pairs = tuple(sorted((p, d) for p, (d, _ok) in results.items()))
        return Verdict(TaskState.FAILED, failure=Failure(
            FailReason.REPLICAS_DISAGREE, attempts=replicas, digests=pairs, quorum=quorum))
    return Verdict(TaskState.RUNNING)
