"""The placement rules both schedulers share (protocols/scheduler_rules.py).

The simulations (test_scheduler_sim.py) drive them through protocols/scheduler.py; the
daemon's task service calls the same functions (test_capacity.py, test_escalation.py run
them in real daemons). These pin each rule's boundaries.
"""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from teammesh.protocols.scheduler_model import SchedulerConfig, Weights
from teammesh.protocols.scheduler_rules import (
    KIND_CLOCK_IDLE_S,
    KindClocks,
    escalate_now,
    fits_resources,
    leave_queue_for_bridge,
    next_queue_check,
    pipeline_depth,
    placement_score,
    queue_wait_s,
    retry_delay_s,
)

CFG = SchedulerConfig(offer_window_s=0.5, target_queued_s=0.02, max_pipeline=64,
                      max_rtt_covered_s=0.5)


def test_pipeline_depth_covers_target_work_plus_the_round_trip() -> None:
    assert pipeline_depth(None, 0.05, CFG) == 0  # unknown duration: nothing queued
    assert pipeline_depth(math.nan, 0.0, CFG) == 0
    assert pipeline_depth(0.01, 0.0, CFG) == 2  # 20 ms of 10 ms tasks
    assert pipeline_depth(0.01, 0.05, CFG) == 7  # + 50 ms of round trip
    assert pipeline_depth(0.01, 10.0, CFG) == 52  # the round trip is covered up to 0.5 s
    assert pipeline_depth(0.01, math.inf, CFG) == 2
    assert pipeline_depth(0.0, 0.0, CFG) == 64  # capped
    assert pipeline_depth(1.0, 0.05, CFG) == 0  # long tasks are not pipelined


def test_placement_score_weights_compatibility_latency_cost_health() -> None:
    w = Weights()
    best = placement_score(True, 0.0, 0.0, 1.0, w)
    assert best == 100.0
    assert placement_score(False, 0.0, 0.0, 1.0, w) == 80.0
    assert placement_score(True, 10.0, 0.0, 1.0, w) == 85.0
    assert placement_score(True, 0.0, 1.0, 1.0, w) == 90.0
    assert placement_score(True, 0.0, 0.0, 0.5, w) == 95.0
    assert placement_score(True, 0.0, 0.0, 1.0, Weights(0, 0, 0, 0)) == 0.0


def test_queue_wait_is_unknown_without_task_times() -> None:
    assert queue_wait_s(None, 3, 1) == math.inf
    assert queue_wait_s(0.1, 3, 2) == 0.15000000000000002
    assert queue_wait_s(0.1, 3, 0) == 0.30000000000000004  # no slot counts as one
    assert queue_wait_s(0.1, -1, 1) == 0.0


def test_escalation_waits_one_window_and_only_for_a_slower_queue() -> None:
    assert not escalate_now(0.49, 0.0, CFG, bridge_rtt_s=0.1)
    assert escalate_now(0.5, 0.0, CFG, bridge_rtt_s=0.1)
    assert escalate_now(0.5, 0.0, CFG, bridge_rtt_s=0.1, queue_wait=0.1)  # a tie: the bridge
    assert not escalate_now(0.5, 0.0, CFG, bridge_rtt_s=0.2, queue_wait=0.1)


def test_a_queued_task_leaves_for_the_bridge_when_its_wait_is_longer() -> None:
    # within the window it stays, whatever the estimate
    assert not leave_queue_for_bridge(0.4, 0.0, CFG, bridge_rtt_s=0.1, wait_left_s=math.inf)
    assert leave_queue_for_bridge(0.5, 0.0, CFG, bridge_rtt_s=0.1, wait_left_s=math.inf)
    # a short known wait keeps it there ...
    assert not leave_queue_for_bridge(0.5, 0.0, CFG, bridge_rtt_s=1.0, wait_left_s=0.01)
    # ... until it has waited longer than the bridge's round trip: the estimate was wrong
    assert leave_queue_for_bridge(1.01, 0.0, CFG, bridge_rtt_s=1.0, wait_left_s=0.01)
    assert not leave_queue_for_bridge(1.0, 0.0, CFG, bridge_rtt_s=1.0, wait_left_s=0.01)


@given(now=st.floats(0, 100), since=st.floats(0, 100), rtt=st.floats(0, 10),
       left=st.one_of(st.floats(0, 10), st.just(math.inf)))
def test_the_next_check_is_when_the_answer_can_change(now: float, since: float, rtt: float,
                                                     left: float) -> None:
    """Nothing changes before next_queue_check by time alone, so a shell may sleep until
    then; and it never asks to be woken in the past."""
    if leave_queue_for_bridge(now, since, CFG, rtt, left):
        return
    at = next_queue_check(now, since, CFG, rtt)
    assert at > now or at == since + CFG.offer_window_s > now
    assert at >= now
    # at the check, with no new estimate, it leaves (or the estimate keeps it: then the
    # time waited decides at the following check)
    later = next_queue_check(at, since, CFG, rtt)
    assert leave_queue_for_bridge(later, since, CFG, rtt, left) or left > later - since


def test_retry_delays_double_up_to_the_cap() -> None:
    cfg = SchedulerConfig(retry_base_s=0.1, retry_max_s=5.0)
    assert [retry_delay_s(n, cfg, 1.0) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert retry_delay_s(10, cfg, 1.0) == 5.0
    assert retry_delay_s(10_000, cfg, 1.0) == 5.0  # no overflow
    assert retry_delay_s(2, cfg, 1.5) == 0.30000000000000004
    assert retry_delay_s(2, cfg, math.nan) == 0.2  # a broken jitter counts 1
    assert retry_delay_s(2, cfg, -1.0) == 0.2


def test_a_kinds_clock_runs_while_it_waits_and_restarts_after_idling() -> None:
    cfg = SchedulerConfig(offer_window_s=0.5)
    clocks = KindClocks()
    key = ("sleep", "1")
    assert clocks.waiting(key, 10.0, cfg) == 10.0
    assert clocks.waiting(key, 10.4, cfg) == 10.0  # still the kind's first wait
    assert clocks.waiting(key, 11.9, cfg) == 10.0  # 1.5 s since the last: not idle yet
    # idle for longer than a window + KIND_CLOCK_IDLE_S: peers get a fresh window
    assert clocks.waiting(key, 11.9 + 0.5 + KIND_CLOCK_IDLE_S + 0.01, cfg) == \
        11.9 + 0.5 + KIND_CLOCK_IDLE_S + 0.01
    clocks.placed(key)
    assert clocks.waiting(key, 20.0, cfg) == 20.0
    assert clocks.waiting(("sleep", "2"), 20.1, cfg) == 20.1  # versions are apart


def test_resources_fit_by_memory_and_gpu() -> None:
    assert fits_resources(0, False, 0, ())  # no need stated
    assert fits_resources(256, False, 256, ())
    assert not fits_resources(257, False, 256, ())
    assert not fits_resources(0, True, 4096, ())
    assert fits_resources(1024, True, 4096, ("A100, 40960 MiB",))
