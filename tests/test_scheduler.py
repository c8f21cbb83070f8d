"""Unit tests of the pure scheduler: one rule at a time, the transition table, hostile ads.

Each test drives ``Scheduler.handle`` with typed events at explicit times and checks the
typed effects, as the trio shell in node/ would see them.
"""

from __future__ import annotations

import itertools
import math

import pytest
from teammesh.protocols.capability import CapabilityAd
from teammesh.protocols.errors import LocalProtocolError
from teammesh.protocols.scheduler import TRANSITIONS, Scheduler, Trigger, transition
from teammesh.protocols.scheduler_model import (
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
    Weights,
    Where,
)
from teammesh.protocols.scheduler_peers import MAX_COST, MAX_SLOTS, PeerView
from teammesh.protocols.scheduler_rules import settle_quorum

K = "hash.sha256"
D1, D2, D3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def ad(peer: str, *, slots: float = 1, free: float | None = None, queue: float = 0,
       cost: float = 0.0, rtt: float | None = None, memory: float = 4096,
       gpus: tuple[str, ...] = (), kinds: dict[str, str] | None = None) -> PeerAd:
    return PeerAd(peer, kinds if kinds is not None else {K: "1"}, slots,
                  slots if free is None else free, queue, memory, gpus, cost, rtt)


def task(tid: str = "t", **kw: object) -> Task:
    return Task(tid, K, "1", **kw)  # type: ignore[arg-type]


def sends(effects: list[Effect]) -> list[tuple[str, str]]:
    return [(e.peer, e.task.id) for e in effects if isinstance(e, Send)]


def finished(effects: list[Effect]) -> list[Finished]:
    return [e for e in effects if isinstance(e, Finished)]


def only(effects: list[Effect], cls: type) -> list[Effect]:
    return [e for e in effects if isinstance(e, cls)]


def sched(*ads: PeerAd, **cfg: object) -> Scheduler:
    s = Scheduler(SchedulerConfig(**cfg))  # type: ignore[arg-type]
    for a in ads:
        s.handle(a, 0.0)
    return s


# --- the transition table ------------------------------------------------------------------
def test_table_covers_every_state_and_terminal_states_go_nowhere() -> None:
    assert set(TRANSITIONS) == set(TaskState)
    for state in TaskState:
        assert (TRANSITIONS[state] == {}) == state.terminal


@pytest.mark.parametrize(("state", "trigger", "new"), [
    (TaskState.DONE, Trigger.PLACED, TaskState.RUNNING),
    (TaskState.CANCELLED, Trigger.RESULT, TaskState.DONE),
    (TaskState.QUEUED, Trigger.RESULT, TaskState.DONE),
    (TaskState.QUEUED, Trigger.ADMITTED, TaskState.RUNNING),
    (TaskState.RUNNING, Trigger.PLACED, TaskState.QUEUED),
    (TaskState.FAILED, Trigger.CANCELLED, TaskState.CANCELLED),
])
def test_illegal_transitions_raise(state: TaskState, trigger: Trigger, new: TaskState) -> None:
    with pytest.raises(LocalProtocolError, match="scheduler bug"):
        transition(state, trigger, new)


def test_legal_transition_returns_the_new_state() -> None:
    assert transition(TaskState.QUEUED, Trigger.PLACED, TaskState.RUNNING) is TaskState.RUNNING


def test_misuse_raises_local_protocol_error() -> None:
    s = sched(ad("p"))
    s.handle(Submitted(task("a")), 1.0)
    with pytest.raises(LocalProtocolError, match="submitted twice"):
        s.handle(Submitted(task("a")), 1.0)
    with pytest.raises(LocalProtocolError, match="clock went back"):
        s.handle(Tick(), 0.5)
    with pytest.raises(LocalProtocolError, match="quorum"):
        s.handle(Submitted(task("b", replicas=2, quorum=3)), 2.0)
    with pytest.raises(LocalProtocolError, match="replicas"):
        s.handle(Submitted(task("c", replicas=0)), 2.0)


# --- placement -----------------------------------------------------------------------------
def test_local_first_then_peers() -> None:
    s = sched(ad(LOCAL), ad("p", slots=4))
    out = s.handle(Submitted(task("a")), 1.0)
    assert only(out, RunLocal) == [RunLocal(task("a"))]
    out = s.handle(Submitted(task("b")), 1.0)
    assert sends(out) == [("p", "b")]
    assert s.state_of("b") is TaskState.RUNNING
    assert s.wait_of("b") == Wait(WaitReason.SENT, "p")


def test_scoring_prefers_cheap_and_near_and_weights_are_configurable() -> None:
    peers = (ad("far", rtt=500.0), ad("dear", rtt=1.0, cost=50.0))
    s = sched(*peers)
    assert sends(s.handle(Submitted(task("a")), 1.0)) == [("dear", "a")]
    s = sched(*peers, weights=Weights(compatibility=40, latency=0, cost=20, health=10))
    assert sends(s.handle(Submitted(task("a")), 1.0)) == [("far", "a")]


def test_exact_version_beats_another_version() -> None:
    s = sched(ad("old", kinds={K: "0"}, rtt=5.0), ad("same", rtt=20.0))
    assert sends(s.handle(Submitted(task("a")), 1.0)) == [("same", "a")]


def test_priorities_take_the_one_free_slot_first() -> None:
    s = sched(ad("p", slots=0, free=0))
    s.handle(Submitted(task("low", priority=-1)), 1.0)
    s.handle(Submitted(task("high", priority=5)), 1.0)
    s.handle(Submitted(task("mid")), 1.0)
    # the free slot to the highest; without a bridge the next one reserves a queue place
    assert sends(s.handle(ad("p", slots=1), 1.1)) == [("p", "high"), ("p", "mid")]


def test_resources_memory_and_gpu_are_matched_against_ads() -> None:
    s = sched(ad("small", memory=256), ad("big", memory=8192, rtt=400.0),
              ad("gpu", gpus=("nvidia-a100",), memory=256, rtt=900.0))
    assert sends(s.handle(Submitted(task("m", memory_mb=1024)), 1.0)) == [("big", "m")]
    assert sends(s.handle(Submitted(task("g", gpu=True)), 1.0)) == [("gpu", "g")]
    out = s.handle(Submitted(task("huge", memory_mb=10**6)), 1.0)
    assert sends(out) == []
    assert s.wait_of("huge") == Wait(WaitReason.NO_RESOURCES, kind=K)
    out = s.handle(Tick(), 10.0)  # past the startup grace: nobody ever can
    assert finished(out)[0].failure.reason is FailReason.NO_RUNNER  # type: ignore[union-attr]


def test_kind_limit() -> None:
    s = sched(ad("p", slots=8), kind_limits={K: 2})
    out = []
    for i in range(4):
        out += s.handle(Submitted(task(f"t{i}")), 1.0)
    assert len(sends(out)) == 2
    assert s.wait_of("t2") == Wait(WaitReason.KIND_LIMIT, count=2, kind=K)
    # t3 waits behind t2 in the same line, undecided (Rule 2), and says why all the same
    assert s.wait_of("t3") == Wait(WaitReason.KIND_LIMIT, count=2, kind=K)
    out = s.handle(ResultArrived("t0", "p", True, D1, 0.1), 2.0)
    assert sends(out) == [("p", "t2")]


# --- hostile ads ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, -1.0, -1e300, math.inf, 1e300])
def test_hostile_ad_values_are_clamped(bad: float) -> None:
    s = sched(PeerAd("evil", {K: "1"}, bad, bad, bad, bad, (), bad, bad), ad("good"))
    view = s.peers["evil"]
    for n in (view.slots, view.free, view.queue, view.memory_mb):
        assert 0 <= n <= 2**24
    assert view.free <= view.slots <= MAX_SLOTS
    assert 0.0 <= view.cost <= MAX_COST
    assert math.isfinite(view.score(task(), s.weights))
    assert math.isfinite(view.wait_s(1.0)) or view.wait_s(1.0) == math.inf
    out = s.handle(Submitted(task("a")), 1.0)
    # evil has no slots (NaN, negative) or the worst cost and latency (huge): good wins
    assert sends(out) == [("good", "a")]


def test_negative_cost_is_no_better_than_zero() -> None:
    s = sched(ad("liar", cost=-1e9, rtt=5.0), ad("honest", cost=0.0, rtt=4.0))
    assert sends(s.handle(Submitted(task("a")), 1.0)) == [("honest", "a")]


def test_free_slots_above_slots_and_junk_kinds_are_ignored() -> None:
    s = sched(PeerAd("p", {K: "1", 5: "x", "y": 7}, 1, 1000, 0))  # type: ignore[dict-item]
    assert s.peers["p"].free == 1
    assert s.peers["p"].kinds == {K: "1"}
    out = []
    for i in range(3):
        out += s.handle(Submitted(task(f"t{i}")), 1.0)
    assert len(sends(out)) == 2  # one free slot and one queue place, not 1000


def test_weights_from_config_nan_or_negative_count_as_zero() -> None:
    s = sched(ad("p"), weights=Weights(math.nan, -5, math.inf, 10))
    assert s.weights == Weights(0.0, 0.0, 0.0, 10)


def test_from_capability() -> None:
    cap = CapabilityAd("p", "team", (), 4, 2, 1, 2**30, ("gpu0",), {K: "1"}, 3, 0.5, (),
                       "sw", 1, 1000, b"")
    a = PeerAd.from_capability(cap, rtt_ms=7.0)
    assert (a.slots, a.free_slots, a.queue, a.memory_mb, a.gpus) == (2, 1, 3, 1024, ("gpu0",))


# --- admission replies and the busy-queue rule ---------------------------------------------
def test_busy_refusal_replaces_at_once_and_fences_the_peer() -> None:
    s = sched(ad("a", rtt=1.0), ad("b", rtt=50.0))
    s.handle(Submitted(task("t")), 1.0)
    out = s.handle(AdmissionReply("t", "a", Admission.BUSY), 1.01)
    assert sends(out) == [("b", "t")]
    out = s.handle(AdmissionReply("t", "b", Admission.BUSY), 1.02)
    assert sends(out) == []
    assert s.state_of("t") is TaskState.QUEUED
    assert s.wait_of("t") is not None
    assert s.wait_of("t").reason is WaitReason.ALL_BUSY  # type: ignore[union-attr]
    assert sends(s.handle(ad("b", rtt=50.0), 1.5)) == [("b", "t")]  # b has room again


def test_queued_task_moves_when_a_slot_frees_elsewhere() -> None:
    s = sched(ad("a", rtt=1.0), ad("b", slots=1, free=0))
    s.handle(Submitted(task("t")), 1.0)
    out = s.handle(AdmissionReply("t", "a", Admission.QUEUED, 3), 1.01)
    assert out == [Persist("t", TaskState.RUNNING, Wait(WaitReason.QUEUED_ON_PEER, "a", 3),
                           ("a",))]
    out = s.handle(ad("b"), 1.2)
    assert CancelRemote("a", "t") in out
    assert sends(out) == [("b", "t")]
    assert out.index(CancelRemote("a", "t")) < out.index(Send("b", task("t")))
    # the old attempt's late result is ignored; b's result finishes it, once
    assert s.handle(ResultArrived("t", "a", True, D1, 0.1), 1.3) == []
    assert finished(s.handle(ResultArrived("t", "b", True, D1, 0.1), 1.4))[0].by == ("b",)


def test_without_persist_waits_only_state_and_targets_are_reported() -> None:
    s = sched(ad("a", rtt=1.0), persist_waits=False)
    out = s.handle(Submitted(task("t")), 1.0)
    assert only(out, Persist) == [Persist("t", TaskState.RUNNING, Wait(WaitReason.SENT, "a"),
                                          ("a",))]
    # a new reason alone is no Persist: the shell reads wait_of when it shows the task
    assert s.handle(AdmissionReply("t", "a", Admission.QUEUED, 3), 1.01) == []
    assert s.wait_of("t") == Wait(WaitReason.QUEUED_ON_PEER, "a", 3)
    assert s.handle(AdmissionReply("t", "a", Admission.STARTED), 1.02) == []
    assert s.wait_of("t") == Wait(WaitReason.RUNNING_ON, "a")
    # losing the attempt changes state and targets: reported
    out = s.handle(AttemptLost("t", "a", Loss.STREAM_CLOSED), 1.1)
    assert [(p.state, p.targets) for p in only(out, Persist)] == [(TaskState.QUEUED, ())]


def test_a_task_queued_on_this_nodes_own_executor_moves_too() -> None:
    # this node's slots serve other members as well: a RunLocal to a slot that looked free
    # can wait behind their work, and Rule 6 applies to it as to a peer's queue
    s = sched(ad(LOCAL), ad("b", slots=1, free=0))
    assert only(s.handle(Submitted(task("t")), 1.0), RunLocal) == [RunLocal(task("t"))]
    s.handle(AdmissionReply("t", LOCAL, Admission.QUEUED, 2), 1.01)
    out = s.handle(ad("b"), 1.2)
    assert CancelRemote(LOCAL, "t") in out
    assert sends(out) == [("b", "t")]


def test_the_bridges_measured_round_trip_replaces_the_guess_then_averages() -> None:
    s = sched(bridge=True, bridge_rtt_s=1.0)
    s.handle(BridgeMeasured(0.05), 1.0)
    assert s.bridge_rtt_s == pytest.approx(0.05)  # not averaged with the 1 s guess
    s.handle(BridgeMeasured(0.15), 1.1)
    assert s.bridge_rtt_s == pytest.approx(0.07)  # then an EWMA (0.2 per sample)
    for junk in (math.nan, -1.0):
        s.handle(BridgeMeasured(junk), 1.2)
    assert s.bridge_rtt_s == pytest.approx(0.07)


def test_queued_task_moves_to_the_bridge_after_the_offer_window() -> None:
    s = sched(ad("a"), bridge=True, offer_window_s=0.5, bridge_rtt_s=0.3)
    s.handle(Submitted(task("t")), 1.0)
    s.handle(AdmissionReply("t", "a", Admission.QUEUED, 1), 1.01)
    assert s.next_wakeup() == pytest.approx(1.51)
    assert only(s.handle(Tick(), 1.2), Escalate) == []
    out = s.handle(Tick(), 1.51)
    assert CancelRemote("a", "t") in out
    assert Escalate(task("t")) in out


def test_no_pipelining_behind_unknown_work_but_short_own_kinds_pipeline() -> None:
    s = sched(ad("p", slots=1), bridge=True, offer_window_s=5.0)
    s.handle(Submitted(task("t0")), 1.0)
    s.handle(AdmissionReply("t0", "p", Admission.STARTED), 1.0)
    out = s.handle(Submitted(task("t1")), 1.0)
    assert sends(out) == []  # duration unknown: keep it here
    s.handle(ResultArrived("t0", "p", True, D1, 0.001), 1.01)  # t1 goes into the free slot
    out = []
    for i in range(2, 6):
        out += s.handle(Submitted(task(f"t{i}")), 1.02)
    assert len(sends(out)) == 4  # 1 ms tasks behind our own: pipelined (1 slot x 20)


# --- escalation ----------------------------------------------------------------------------
def test_escalates_after_the_offer_window_not_before() -> None:
    s = sched(ad(LOCAL, free=0), ad("p", free=0), bridge=True, offer_window_s=0.5)
    assert only(s.handle(Submitted(task("t")), 5.0), Escalate) == []
    assert s.next_wakeup() == pytest.approx(5.5)
    assert only(s.handle(Tick(), 5.4), Escalate) == []
    assert only(s.handle(Tick(), 5.5), Escalate) == [Escalate(task("t"))]
    out = s.handle(BridgeResult("t", True, D1), 5.7)
    assert finished(out) == [Finished("t", TaskState.DONE, None, (BRIDGE,), D1)]
    assert s.bridge_rtt_s < 1.0  # measured 0.2 s pulls the 1 s guess down


def test_sustained_saturation_escalates_at_once() -> None:
    s = sched(ad("p", free=0), bridge=True, offer_window_s=0.5)
    s.handle(Submitted(task("a")), 1.0)
    s.handle(Tick(), 1.5)
    assert only(s.handle(Submitted(task("b")), 1.6), Escalate) == [Escalate(task("b"))]


def test_nobody_runs_the_kind_escalates_after_grace_or_fails() -> None:
    s = sched(ad("p", kinds={"other": "1"}), bridge=True, startup_grace_s=3.0)
    assert only(s.handle(Submitted(task("t")), 1.0), Escalate) == []
    assert s.wait_of("t") == Wait(WaitReason.NO_RUNNER, kind=K)
    assert only(s.handle(Tick(), 3.0), Escalate) == [Escalate(task("t"))]
    s = sched(ad("p", kinds={"other": "1"}), startup_grace_s=3.0)
    s.handle(Submitted(task("t")), 1.0)
    f = finished(s.handle(Tick(), 3.0))[0]
    assert f.failure is not None
    assert f.failure.reason is FailReason.NO_RUNNER


def test_a_kind_whose_members_went_away_lately_waits_for_them() -> None:
    """A laptop's network drops: the members that ran the kind are unreachable, not gone.
    Its tasks wait (typed UNREACHABLE) for an hour after one was last heard, then fail;
    a member coming back runs them. Members that never had a slot do not count."""
    s = sched(ad("p"), startup_grace_s=3.0, kind_memory_s=3600.0)
    s.handle(PeerGone("p"), 2.0)
    assert finished(s.handle(Submitted(task("t")), 10.0)) == []
    w = s.wait_of("t")
    assert w == Wait(WaitReason.UNREACHABLE, kind=K, until=2.0)
    assert w is not None
    assert w.render(12.0).startswith(
        f"no member that can run it (kind {K}, with the memory and GPU it needs) is"
        " reachable now (one was 10 s ago)")
    assert s.next_wakeup() == 3602.0
    assert sends(s.handle(PeerAd("p", {K: "1"}, 1, 1, 0), 20.0)) == [("p", "t")]
    s.handle(PeerGone("p"), 21.0)  # lost again: the retry waits for a member too
    assert s.state_of("t") is TaskState.QUEUED
    assert s.wait_of("t") is not None
    s.handle(Submitted(task("u")), 30.0)
    assert finished(s.handle(Tick(), 3620.0)) == []
    assert s.state_of("t") is TaskState.QUEUED
    assert s.state_of("u") is TaskState.QUEUED
    # an hour after the kind was last seen, both fail: no task waits for ever
    f = finished(s.handle(Tick(), 3621.5))
    assert sorted((x.task_id, x.failure) for x in f) == [
        ("t", Failure(FailReason.NO_RUNNER)), ("u", Failure(FailReason.NO_RUNNER))]
    # a member with no slots never ran anything here
    s = sched(ad("idle", slots=0), startup_grace_s=3.0)
    s.handle(PeerGone("idle"), 2.0)
    f = finished(s.handle(Submitted(task("v")), 10.0))
    assert [x.failure for x in f] == [Failure(FailReason.NO_RUNNER)]


def test_a_gpu_task_waits_for_its_gpu_member_even_while_others_run_the_kind() -> None:
    """The member a task needs (a GPU) dropped off: other members of the kind, without a
    GPU, cannot run it, so the task waits for that one (UNREACHABLE) instead of failing;
    a task needing what no member ever had fails after the grace as before."""
    s = sched(ad("gpu", gpus=("nvidia-a100",)), ad("cpu"), startup_grace_s=3.0,
              kind_memory_s=3600.0)
    s.handle(PeerGone("gpu"), 2.0)
    assert finished(s.handle(Submitted(task("g", gpu=True)), 10.0)) == []
    assert s.wait_of("g") == Wait(WaitReason.UNREACHABLE, kind=K, until=2.0)
    assert sends(s.handle(Submitted(task("c")), 11.0)) == [("cpu", "c")]  # others run
    f = finished(s.handle(Submitted(task("big", memory_mb=10**6)), 12.0))
    assert [x.failure for x in f] == [Failure(FailReason.NO_RUNNER)]  # nobody ever had it
    assert sends(s.handle(ad("gpu", gpus=("nvidia-a100",)), 20.0)) == [("gpu", "g")]
    # this node is always here: a task for peers only does not wait for it
    s = sched(ad(LOCAL), startup_grace_s=3.0)
    f = finished(s.handle(Submitted(task("p", where=Where.PEERS)), 10.0))
    assert [x.failure for x in f] == [Failure(FailReason.NO_RUNNER)]


def test_where_bridge_without_a_bridge_fails_typed() -> None:
    s = sched(ad("p"))
    f = finished(s.handle(Submitted(task("t", where=Where.BRIDGE)), 1.0))[0]
    assert f.failure is not None
    assert f.failure.reason is FailReason.NO_BRIDGE
    assert "--bridge" in f.failure.render()


def test_replicas_gpu_and_big_memory_never_escalate() -> None:
    s = sched(ad("p", free=0, memory=8192, gpus=("g",)), bridge=True, offer_window_s=0.0)
    out: list[Effect] = []
    out += s.handle(Submitted(task("r", replicas=2)), 1.0)
    out += s.handle(Submitted(task("g", gpu=True)), 1.0)
    out += s.handle(Submitted(task("m", memory_mb=1024)), 1.0)
    out += s.handle(Tick(), 9.0)
    assert only(out, Escalate) == []


def test_bridge_down_waits_for_its_breaker_and_never_fails_the_task() -> None:
    s = sched(ad("p", free=0), bridge=True, offer_window_s=0.0, breaker_threshold=1,
              breaker_base_s=2.0, max_attempts=1)
    s.handle(Submitted(task("t")), 1.0)
    out = s.handle(BridgeUnavailable("t"), 2.0)
    assert finished(out) == []
    assert s.wait_of("t") == Wait(WaitReason.BRIDGE_DOWN, until=4.0)
    assert "retrying in 2 s" in s.wait_of("t").render(2.0)  # type: ignore[union-attr]
    assert only(s.handle(Tick(), 3.9), Escalate) == []
    assert only(s.handle(Tick(), 4.0), Escalate) == [Escalate(task("t"))]


# --- retries and breakers ------------------------------------------------------------------
def test_retry_backoff_uses_the_injected_jitter_and_gives_up_typed() -> None:
    jitters = iter([0.5, 1.5, 1.0, 1.0])
    s = Scheduler(SchedulerConfig(max_attempts=3, retry_base_s=0.1), jitter=lambda: next(jitters))
    s.handle(ad("p", slots=4), 0.0)
    s.handle(Submitted(task("t")), 1.0)
    out = s.handle(AttemptLost("t", "p", Loss.STREAM_CLOSED), 2.0)
    assert sends(out) == []  # excluded and backing off
    assert s.wait_of("t") == Wait(WaitReason.BACKOFF, "p", 1, 3, 2.0 + 0.1 * 0.5,
                                  loss=Loss.STREAM_CLOSED)
    assert s.next_wakeup() == pytest.approx(2.05)
    assert "retry 2 of 3" in s.wait_of("t").render(2.0)  # type: ignore[union-attr]
    # only p runs it: the exclusion is lifted (a lost stream is usually passing)
    assert sends(s.handle(Tick(), 2.05)) == [("p", "t")]
    s.handle(AttemptLost("t", "p", Loss.TIMEOUT), 3.0)
    assert s.next_wakeup() == pytest.approx(3.0 + 0.2 * 1.5)
    s.handle(Tick(), 3.3)
    f = finished(s.handle(AttemptLost("t", "p", Loss.TIMEOUT), 4.0))[0]
    assert f.failure is not None
    assert (f.failure.reason, f.failure.attempts) == (FailReason.GAVE_UP, 3)


def test_breaker_opens_after_three_failures() -> None:
    s = sched(ad("bad", rtt=1.0, slots=8), ad("ok", rtt=100.0, slots=8), retry_base_s=0.0)
    for i in range(3):
        assert sends(s.handle(Submitted(task(f"t{i}")), 1.0)) == [("bad", f"t{i}")]
        s.handle(AttemptLost(f"t{i}", "bad", Loss.STREAM_CLOSED), 1.0)
    assert not s.peers["bad"].breaker.allows(1.0)
    assert sends(s.handle(Submitted(task("x")), 1.5)) == [("ok", "x")]
    assert sends(s.handle(Submitted(task("y")), 3.1)) == [("bad", "y")]  # half-open


def test_peer_gone_retries_elsewhere_without_blame() -> None:
    s = sched(ad("a", rtt=1.0), ad("b", rtt=80.0))
    assert sends(s.handle(Submitted(task("t")), 1.0)) == [("a", "t")]
    out = s.handle(PeerGone("a"), 2.0)
    assert "a" not in s.peers
    assert sends(out) == []  # a short backoff first
    assert sends(s.handle(Tick(), 3.0)) == [("b", "t")]
    assert s.peers["b"].breaker.failures == 0


# --- replicas ------------------------------------------------------------------------------
def test_quorum_accepts_k_equal_digests_and_cancels_the_rest() -> None:
    s = sched(ad("a"), ad("b"), ad("c"))
    out = s.handle(Submitted(task("t", replicas=3, quorum=2)), 1.0)
    assert sorted(sends(out)) == [("a", "t"), ("b", "t"), ("c", "t")]
    assert finished(s.handle(ResultArrived("t", "a", True, D1, 0.1), 2.0)) == []
    out = s.handle(ResultArrived("t", "b", True, D1, 0.1), 2.1)
    assert CancelRemote("c", "t") in out
    assert finished(out) == [Finished("t", TaskState.DONE, None, ("a", "b"), D1)]


def test_quorum_fails_typed_as_soon_as_agreement_is_impossible() -> None:
    s = sched(ad("a"), ad("b"), ad("c"))
    s.handle(Submitted(task("t", replicas=3, quorum=2)), 1.0)
    s.handle(ResultArrived("t", "a", True, D1, 0.1), 2.0)
    s.handle(ResultArrived("t", "b", True, D2, 0.1), 2.0)
    out = s.handle(ResultArrived("t", "c", True, D3, 0.1), 2.0)
    f = finished(out)[0]
    assert f.state is TaskState.FAILED
    assert f.failure is not None
    assert f.failure.reason is FailReason.REPLICAS_DISAGREE
    assert f.failure.render().startswith("replicas disagree: a -> 0101")
    s = sched(ad("a"), ad("b"))
    s.handle(Submitted(task("u", replicas=2)), 1.0)  # all must agree
    s.handle(ResultArrived("u", "a", True, D1, 0.1), 2.0)
    f = finished(s.handle(ResultArrived("u", "b", True, D2, 0.1), 2.0))[0]
    assert f.failure is not None
    assert f.failure.reason is FailReason.REPLICAS_DISAGREE


D_FAIL = b"\xee" * 32  # a failed result's digest (it covers ok and the error)


@pytest.mark.parametrize(("replicas", "k", "results", "state", "by"), [
    (3, 2, [], TaskState.RUNNING, ()),
    (3, 2, [("a", D1, True)], TaskState.RUNNING, ()),
    (3, 2, [("a", D1, True), ("b", D1, True)], TaskState.DONE, ("a", "b")),
    (3, 2, [("a", D2, True), ("b", D1, True), ("c", D1, True)], TaskState.DONE, ("b", "c")),
    (3, 2, [("a", D1, True), ("b", D2, True)], TaskState.RUNNING, ()),  # c can decide
    (3, 2, [("a", D1, True), ("b", D2, True), ("c", D3, True)], TaskState.FAILED, ()),
    (3, 3, [("a", D1, True), ("b", D2, True)], TaskState.FAILED, ()),  # c cannot help
    (3, 1, [("a", D2, True)], TaskState.DONE, ("a",)),
    (2, 2, [("a", D1, True), ("b", D1, True)], TaskState.DONE, ("a", "b")),
    # a failure is an outcome of its own: it never agrees with a success...
    (3, 2, [("a", D1, True), ("b", D_FAIL, False)], TaskState.RUNNING, ()),
    (2, 2, [("a", D1, True), ("b", D_FAIL, False)], TaskState.FAILED, ()),
    # ...and k equal failures fail the task with that error, not as a disagreement
    (3, 2, [("a", D_FAIL, False), ("b", D_FAIL, False)], TaskState.FAILED, ("a", "b")),
])
def test_settle_quorum_table(replicas: int, k: int, results: list[tuple[str, bytes, bool]],
                             state: TaskState, by: tuple[str, ...]) -> None:
    v = settle_quorum({p: (d, ok) for p, d, ok in results}, replicas, k)
    assert (v.state, v.by) == (state, by)
    if state is TaskState.DONE:
        assert v.failure is None
        assert v.digest == results[[p for p, _, _ in results].index(by[0])][1]
    elif state is TaskState.FAILED and by:
        assert v.failure == Failure(FailReason.TASK_ERROR, by[0])
    elif state is TaskState.FAILED:
        assert v.failure is not None
        assert v.failure.reason is FailReason.REPLICAS_DISAGREE
        assert v.failure.digests == tuple(sorted((p, d) for p, d, _ in results))
        text = v.failure.render()
        assert text.startswith("replicas disagree: a -> ")
        assert f"no answer can reach the quorum of {k} of {replicas} replicas" in text
    else:
        assert v.failure is None
        assert v.digest is None


@pytest.mark.parametrize(("replicas", "k"), [(0, 1), (2, 0), (2, 3), (1, 2)])
def test_settle_quorum_refuses_a_quorum_outside_1_to_replicas(replicas: int, k: int) -> None:
    with pytest.raises(LocalProtocolError, match="quorum between 1 and replicas"):
        settle_quorum({}, replicas, k)


def test_settle_quorum_is_the_schedulers_rule_9() -> None:
    """Every arrival order of every outcome mix for n <= 3: the scheduler's Finished is
    the first non-running verdict of settle_quorum on the results so far, no earlier and
    no later (the scheduler and the daemon both settle replicas with settle_quorum)."""
    outcomes = [(D1, True), (D2, True), (D_FAIL, False)]
    peers = ("a", "b", "c")
    checked = 0
    for n in (1, 2, 3):
        for k in range(1, n + 1):
            for mix in itertools.product(outcomes, repeat=n):
                s = sched(*(ad(p) for p in peers[:n]))
                s.handle(Submitted(task("t", replicas=n, quorum=k)), 1.0)
                got: dict[str, tuple[bytes, bool]] = {}
                expected = None
                for p, (d, ok) in zip(peers, mix, strict=False):
                    out = finished(s.handle(ResultArrived("t", p, ok, d, 0.1), 2.0))
                    got[p] = (d, ok)
                    v = settle_quorum(got, n, k)
                    if v.state is TaskState.RUNNING:
                        assert out == []
                        continue
                    expected = Finished("t", v.state, v.failure, v.by, v.digest)
                    assert out == [expected], (n, k, mix)
                    break
                assert expected is not None  # n results always settle it
                checked += 1
    assert checked == 3 + 9 * 2 + 27 * 3


def test_replicas_need_distinct_members() -> None:
    s = sched(ad("a", slots=4), startup_grace_s=3.0)
    out = s.handle(Submitted(task("t", replicas=2)), 1.0)
    assert sends(out) == [("a", "t")]
    out = s.handle(Tick(), 3.0)
    assert CancelRemote("a", "t") in out
    f = finished(out)[0]
    assert f.failure is not None
    assert f.failure.reason is FailReason.TOO_FEW_MEMBERS
    assert s.state_of("t") is None


# --- deadlines, cancel, duplicates ---------------------------------------------------------
def test_deadline_fails_and_cancels_attempts() -> None:
    s = sched(ad("p"))
    s.handle(Submitted(task("t", deadline=5.0)), 1.0)
    assert s.next_wakeup() == 5.0
    out = s.handle(Tick(), 5.0)
    assert CancelRemote("p", "t") in out
    f = finished(out)[0]
    assert f.failure is not None
    assert f.failure.reason is FailReason.DEADLINE
    assert f.failure.render() == "deadline of 4 s exceeded"


def test_cancel_reaches_the_bridge_and_is_idempotent() -> None:
    s = sched(bridge=True)
    s.handle(Submitted(task("t", where=Where.BRIDGE)), 1.0)
    out = s.handle(Cancelled("t"), 2.0)
    assert out == [CancelRemote(BRIDGE, "t"), Finished("t", TaskState.CANCELLED)]
    assert s.handle(Cancelled("t"), 2.1) == []
    assert s.handle(BridgeResult("t", True, D1), 2.2) == []  # too late: not delivered


def test_results_from_strangers_and_duplicates_are_ignored() -> None:
    s = sched(ad("a"), ad("b", rtt=500.0))
    s.handle(Submitted(task("t")), 1.0)
    assert s.handle(ResultArrived("t", "b", True, D2, 0.1), 1.1) == []
    assert s.handle(AdmissionReply("t", "b", Admission.STARTED), 1.1) == []
    assert len(finished(s.handle(ResultArrived("t", "a", True, D1, 0.1), 1.2))) == 1
    assert s.handle(ResultArrived("t", "a", True, D1, 0.1), 1.3) == []
    assert s.records == {}


def test_task_error_is_a_typed_failure_with_the_digest() -> None:
    s = sched(ad("a"))
    s.handle(Submitted(task("t")), 1.0)
    f = finished(s.handle(ResultArrived("t", "a", False, D1, 0.1), 1.1))[0]
    assert (f.state, f.digest, f.by) == (TaskState.FAILED, D1, ("a",))
    assert f.failure is not None
    assert f.failure.reason is FailReason.TASK_ERROR


def test_persist_is_emitted_once_per_change() -> None:
    s = sched(ad("p", free=0), bridge=True, offer_window_s=5.0)
    out = s.handle(Submitted(task("t")), 1.0)
    assert only(out, Persist) == [Persist("t", TaskState.QUEUED,
                                          Wait(WaitReason.ALL_BUSY, count=1, kind=K), ())]
    assert only(s.handle(Tick(), 1.1), Persist) == []


def test_every_wait_reason_renders() -> None:
    for reason in WaitReason:
        text = Wait(reason, "p", 1, 3, 2.0, K, Loss.TIMEOUT).render(1.0)
        assert text
        assert "None" not in text
    for fr in FailReason:
        assert Failure(fr, "p", 2, Loss.TIMEOUT, (("p", D1),), 3.0).render()


def test_peer_view_counts_our_own_unconfirmed_assignments_against_a_new_ad() -> None:
    v = PeerView.from_ad(ad("p", slots=2))
    v.assigned("x")
    v.update(ad("p", slots=2))  # the ad predates x
    assert v.free == 1
    v.started("x")
    v.update(ad("p", slots=2, free=1))
    assert v.free == 1


def test_where_local_and_where_peers_are_honoured() -> None:
    s = sched(ad(LOCAL, free=0), ad("p", slots=4), bridge=True, offer_window_s=0.0)
    out = s.handle(Submitted(task("l", where=Where.LOCAL)), 1.0)
    assert sends(out) == []
    assert only(out, Escalate) == []
    assert only(s.handle(ad(LOCAL), 1.5), RunLocal) == [RunLocal(task("l", where=Where.LOCAL))]
    s = sched(ad(LOCAL, slots=4), ad("p", free=0), bridge=True, offer_window_s=0.0)
    out = s.handle(Submitted(task("q", where=Where.PEERS)), 1.0)
    assert only(out, RunLocal) == []
    assert only(out, Escalate) == []
    # only p may take it and nothing else can: it takes a queue place there
    assert sends(out) == [("p", "q")]


def test_breaker_half_open_when_heard_from_again() -> None:
    """The daemon's breaker (shared with the machine): open after three failures for
    2 s doubling, and one probe goes through as soon as the peer is heard from again."""
    from teammesh.protocols.scheduler_peers import Breaker

    cfg = SchedulerConfig()
    b = Breaker()
    for _ in range(2):
        b.failure(10.0, cfg)
    assert b.allows(10.0)
    b.failure(10.0, cfg)
    assert not b.allows(11.9)
    assert b.allows(12.0)
    assert not b.allows(11.0, heard_at=9.0)  # heard before it opened: still open
    assert b.allows(11.0, heard_at=10.5)  # heard since: half-open
    b.failure(12.0, cfg)
    assert not b.allows(15.9)
    assert b.allows(16.0)
    b.success()
    assert b.allows(0.0)


def test_handle_many_places_a_burst_in_one_pass_by_the_same_rules() -> None:
    """A batch of submissions and results through handle_many ends as one handle per
    event would: the same tasks on the same peers, by priority then order."""
    def burst(s: Scheduler) -> list[Event]:
        return [Submitted(task(f"t{i}", priority=i % 3)) for i in range(12)]

    one, many = sched(ad("a", slots=2), ad("b", slots=3)), \
        sched(ad("a", slots=2), ad("b", slots=3))
    seq: list[Effect] = []
    for ev in burst(one):
        seq += one.handle(ev, 1.0)
    batched = many.handle_many(burst(many), 1.0)
    # both fill the five slots and one queue place per slot (Rule 5, no bridge) ...
    assert len(sends(seq)) == len(sends(batched)) == 10
    # ... but batched sees the whole burst: the slots go to the highest priorities
    assert {t for _, t in sends(batched)[:5]} == {"t2", "t5", "t8", "t11", "t1"}
    assert {t for _, t in sends(batched)} == {f"t{i}" for i in range(12)} - {"t6", "t9"}
    assert {t for _, t in sends(seq)} == {f"t{i}" for i in range(10)}
    # results and more submissions in one call: each freed slot is taken once
    done = [ResultArrived(t, p, True, D1, 0.1) for p, t in sends(batched)[:2]]
    out = many.handle_many([*done, Submitted(task("late", priority=5))], 2.0)
    assert [f.task_id for f in finished(out)] == [t for _, t in sends(batched)[:2]]
    assert "late" in {t for _, t in sends(out)}
    with pytest.raises(LocalProtocolError):
        many.handle_many([Tick()], 1.5)  # the clock never goes back
