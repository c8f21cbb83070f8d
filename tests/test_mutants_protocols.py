"""Behaviours of protocols/ that survived a mutation pass (scripts/mutation, docs/TESTING.md).

Each test pins down one thing a user or the trio shell relies on and that the rest of the
suite let change unnoticed: a stale event that must be ignored, the exact retry delay, the
exact failure a caller is shown. The mutant each one was written against is named in its
docstring.
"""

from __future__ import annotations

import base64
import hashlib
import math

import base58
import msgpack
import pytest
from nacl.signing import VerifyKey
from teammesh.protocols import bitswap as bs
from teammesh.protocols import tasks, wire
from teammesh.protocols.bridgekey import MEMBER_KEY_LABEL, derive_member_key
from teammesh.protocols.capability import CapabilityAd, DownNotice, PeerTable, open_down
from teammesh.protocols.envelope import Opened, open_sealed, seal
from teammesh.protocols.errors import (
    BadSignature,
    FrameTooLarge,
    MalformedMessage,
    NotAMember,
    ResultRejected,
    leaves,
)
from teammesh.protocols.identity import (
    Identity,
    peer_id_bytes_from_public,
    public_from_peer_id,
    verify,
)
from teammesh.protocols.membership import (
    ROLE_ADMIN,
    ROLE_MEMBER,
    Roster,
    TeamInfo,
    issue_certificate,
    issue_revocation,
    open_own_certificate,
    parse_certificate,
)
from teammesh.protocols.scheduler import Scheduler
from teammesh.protocols.scheduler_model import (
    BRIDGE,
    Admission,
    AdmissionReply,
    AttemptLost,
    BridgeResult,
    BridgeUnavailable,
    CancelRemote,
    Effect,
    Escalate,
    FailReason,
    Failure,
    Finished,
    Loss,
    PeerAd,
    PeerGone,
    ResultArrived,
    SchedulerConfig,
    Submitted,
    TaskState,
    Tick,
    Wait,
    WaitReason,
    Where,
)
from teammesh.protocols.scheduler_peers import PeerView, ewma
from teammesh.protocols.scheduler_sim import SimReport
from test_scheduler import K, ad, finished, sends, task  # one set of scheduler test helpers


def sched(*ads: PeerAd, jitter: float | None = None, **cfg: object) -> Scheduler:
    if jitter is None:
        s = Scheduler(SchedulerConfig(**cfg))  # type: ignore[arg-type]
    else:
        s = Scheduler(SchedulerConfig(**cfg), jitter=lambda: jitter)  # type: ignore[arg-type]
    for a in ads:
        s.handle(a, 0.0)
    return s


# --- scheduler: retries (Rule 8) -----------------------------------------------------------
def test_default_jitter_is_none_the_first_retry_waits_exactly_the_base() -> None:
    """_no_jitter returning 2.0: the documented delay is base * 2**(n-1), no jitter by default."""
    s = sched(ad("p", slots=4), retry_base_s=0.25)
    s.handle(Submitted(task()), 1.0)
    s.handle(AttemptLost("t", "p", Loss.TIMEOUT), 2.0)
    assert s.next_wakeup() == pytest.approx(2.25)


@pytest.mark.parametrize(("jitter", "delay"), [
    (math.nan, 0.5), (math.inf, 0.5), (-1.0, 0.5), (0.0, 0.0), (2.0, 1.0),
])
def test_a_broken_jitter_source_means_no_jitter_and_zero_means_at_once(
        jitter: float, delay: float) -> None:
    """The jitter guard (`isfinite and >= 0`, fallback 1.0): each half and the fallback."""
    s = sched(ad("p", slots=4), jitter=jitter, retry_base_s=0.5)
    s.handle(Submitted(task()), 1.0)
    out = s.handle(AttemptLost("t", "p", Loss.TIMEOUT), 2.0)
    assert s.records["t"].not_before == pytest.approx(2.0 + delay)
    # zero jitter retries at once (p is the only runner, so its exclusion is lifted)
    assert sends(out) == ([("p", "t")] if delay == 0 else [])


def test_a_lost_attempt_frees_the_slot_and_counts_one_failure() -> None:
    """_lose: view.released(None, ...), failures = 1 / += 2, excluded.add(None)."""
    s = sched(ad("p", slots=1, rtt=1.0), ad("q", slots=1, rtt=90.0), retry_base_s=0.0)
    assert sends(s.handle(Submitted(task("a")), 1.0)) == [("p", "a")]
    out = s.handle(AttemptLost("a", "p", Loss.STREAM_CLOSED), 2.0)
    # p is excluded for this task, so the retry goes to q although p scores better
    assert sends(out) == [("q", "a")]
    assert s.peers["p"].inflight == set()
    assert s.peers["p"].failures == 1
    # p's one slot is free again: the next task goes there
    assert sends(s.handle(Submitted(task("b")), 2.0)) == [("p", "b")]
    s.handle(AttemptLost("b", "p", Loss.TIMEOUT), 3.0)
    assert s.peers["p"].failures == 2


def test_giving_up_names_the_last_peer_the_loss_and_the_attempts() -> None:
    """_lose: Failure(GAVE_UP, None, ...) / loss=None / target dropped."""
    s = sched(ad("p", slots=2), max_attempts=1)
    s.handle(Submitted(task()), 1.0)
    [f] = finished(s.handle(AttemptLost("t", "p", Loss.TIMEOUT), 2.0))
    assert f == Finished("t", TaskState.FAILED,
                         Failure(FailReason.GAVE_UP, "p", attempts=1, loss=Loss.TIMEOUT))


def test_stale_losses_are_ignored() -> None:
    """_on_lost: `rec is None and ...` (crashes on an unknown task) and a loss from a peer
    that does not hold the task (an old attempt) must change nothing."""
    s = sched(ad("p", slots=2), ad("q", slots=2))
    s.handle(Submitted(task()), 1.0)
    holder = next(iter(s.records["t"].attempts))
    other = "q" if holder == "p" else "p"
    assert s.handle(AttemptLost("nope", "p", Loss.TIMEOUT), 2.0) == []
    assert s.handle(AttemptLost("t", other, Loss.TIMEOUT), 2.0) == []
    assert s.records["t"].retries == 0
    assert s.peers[other].failures == 0
    assert s.wait_of("t") == Wait(WaitReason.SENT, holder)
    assert s.wait_of("nope") is None


def test_a_lost_bridge_attempt_waits_for_the_bridge_not_a_retry() -> None:
    """_on_lost for the bridge: _bridge_down(None/…) / the BRIDGE branch dropped."""
    s = sched(ad("p", free=0), bridge=True, offer_window_s=0.0, bridge_down_retry_s=3.0,
              max_attempts=1)
    assert s.handle(Submitted(task()), 1.0)[0] == Escalate(task())
    out = s.handle(AttemptLost("t", BRIDGE, Loss.TIMEOUT), 2.0)
    assert finished(out) == []  # the bridge's trouble is not the task's: no GAVE_UP
    # one failure does not open the bridge's breaker: the retry is bridge_down_retry_s away
    assert s.wait_of("t") == Wait(WaitReason.BRIDGE_DOWN, until=5.0)
    assert s.bridge_breaker.failures == 1
    assert s.records["t"].retries == 0
    assert [e for e in s.handle(Tick(), 5.0) if isinstance(e, Escalate)] == [Escalate(task())]


def test_bridge_unavailable_for_a_task_not_at_the_bridge_is_ignored() -> None:
    """_on_bridge_unavailable: `rec is not None or BRIDGE in ...`."""
    s = sched(ad("p"), bridge=True)
    s.handle(Submitted(task()), 1.0)
    assert s.handle(BridgeUnavailable("t"), 2.0) == []
    assert s.handle(BridgeUnavailable("nope"), 2.0) == []
    assert s.bridge_breaker.failures == 0
    assert s.wait_of("t") == Wait(WaitReason.SENT, "p")


def test_peer_gone_shows_the_loss_in_the_wait() -> None:
    """_on_peer_gone: loss None in the BACKOFF wait; `rec is not None or ...`."""
    s = sched(ad("a", rtt=1.0), ad("b", rtt=80.0), retry_base_s=1.0)
    s.handle(Submitted(task()), 1.0)
    s.handle(Submitted(task("u")), 1.0)  # on b
    s.handle(PeerGone("a"), 2.0)
    assert s.wait_of("t") == Wait(WaitReason.BACKOFF, "a", 1, 5, 3.0, loss=Loss.PEER_GONE)
    assert s.wait_of("u") == Wait(WaitReason.SENT, "b")
    assert "after a failed (peer_gone)" in s.wait_of("t").render(2.0)  # type: ignore[union-attr]
    assert s.handle(PeerGone("a"), 2.5) == []  # twice: nothing left to lose


def escalations(effects: list[Effect]) -> list[str]:
    return [e.task.id for e in effects if isinstance(e, Escalate)]


def test_an_open_bridge_breaker_holds_bridge_tasks_until_it_closes() -> None:
    """_to_bridge_or_wait: the BRIDGE_DOWN wait and its wake-up; _escalate(rec, None);
    _bridge_down: RUNNING instead of QUEUED."""
    s = sched(bridge=True, breaker_threshold=1, breaker_base_s=2.0, bridge_down_retry_s=1.0)
    assert escalations(s.handle(Submitted(task("a", where=Where.BRIDGE)), 1.0)) == ["a"]
    s.handle(BridgeUnavailable("a"), 2.0)
    assert s.state_of("a") is TaskState.QUEUED
    assert s.wait_of("a") == Wait(WaitReason.BRIDGE_DOWN, until=4.0)  # the breaker, not 3.0
    assert escalations(s.handle(Submitted(task("b", where=Where.BRIDGE)), 2.5)) == []
    assert s.wait_of("b") == Wait(WaitReason.BRIDGE_DOWN, until=4.0)
    assert s.next_wakeup() == 4.0
    assert escalations(s.handle(Tick(), 3.9)) == []
    assert sorted(escalations(s.handle(Tick(), 4.0))) == ["a", "b"]
    # the round trip is measured from the escalation (4.0), not from the submission
    out = s.handle(BridgeResult("b", True, b"\x01" * 32), 6.0)
    # the bridge answered: nothing to cancel there (_on_bridge_result: _drop_attempt(None))
    assert [e for e in out if isinstance(e, CancelRemote)] == []
    [f] = finished(out)
    assert f.state is TaskState.DONE
    assert f.by == (BRIDGE,)
    assert s.bridge_rtt_s == pytest.approx(ewma(1.0, 2.0))


def test_replicas_wait_for_members_during_the_grace_then_fail_with_the_count() -> None:
    """_too_few: the REPLICAS_PENDING wait (count, total), grace_end = start - grace,
    Failure(TOO_FEW_MEMBERS, attempts=None)."""
    s = sched(ad("a", slots=4), startup_grace_s=3.0)
    out = s.handle(Submitted(task("t", replicas=3)), 1.0)
    assert sends(out) == [("a", "t")]
    assert finished(out) == []
    assert s.wait_of("t") == Wait(WaitReason.REPLICAS_PENDING, count=1, total=3)
    # the pass that placed a replica sets no wake-up (see the xfail below); any later
    # event looks again and then waits for the grace's end
    assert finished(s.handle(Tick(), 1.5)) == []
    assert s.next_wakeup() == 3.0
    assert s.wait_of("t") == Wait(WaitReason.REPLICAS_PENDING, count=1, total=3)
    assert finished(s.handle(Tick(), 2.9)) == []
    [f] = finished(s.handle(Tick(), 3.0))
    assert f.failure == Failure(FailReason.TOO_FEW_MEMBERS, attempts=3)


def test_the_bridge_takes_at_most_max_inflight_tasks() -> None:
    """_escalate: `_bridge_inflight -= 1`; _drop_attempt: `+= 1` for the bridge."""
    s = sched(bridge=True, bridge_max_inflight=2)
    for tid in "abc":
        s.handle(Submitted(task(tid, where=Where.BRIDGE)), 1.0)
    assert s.state_of("c") is TaskState.QUEUED
    out = s.handle(BridgeResult("a", True, b"\x01" * 32), 2.0)
    assert escalations(out) == ["c"]
    s.handle(BridgeResult("b", True, b"\x01" * 32), 2.5)
    out = s.handle(Submitted(task("d", where=Where.BRIDGE)), 3.0)
    assert escalations(out) == ["d"]
    assert escalations(s.handle(Submitted(task("e", where=Where.BRIDGE)), 3.0)) == []


def test_a_short_estimated_queue_on_a_peer_is_not_left_for_the_bridge() -> None:
    """_queued_left: `view is not None` (the peer's measured task time ignored): a task
    queued at position 1 behind 0.1 s tasks stays there rather than take a 1 s bridge."""
    s = sched(ad("a"), bridge=True, offer_window_s=0.5, bridge_rtt_s=1.0)
    s.handle(Submitted(task("warm")), 0.5)
    s.handle(ResultArrived("warm", "a", True, b"\x01" * 32, 0.1), 0.6)
    s.handle(Submitted(task("t")), 1.0)
    s.handle(AdmissionReply("t", "a", Admission.QUEUED, 1), 1.01)
    out = s.handle(Tick(), 1.6)  # past the window; waited 0.6 s, estimate 0.1 s < 1 s
    assert escalations(out) == []
    assert [e for e in out if isinstance(e, CancelRemote)] == []
    assert s.wait_of("t") == Wait(WaitReason.QUEUED_ON_PEER, "a", 1)


def test_a_partly_placed_replica_task_wakes_the_caller_at_the_grace_end() -> None:
    """Found by the mutation pass (docs/TESTING.md): a replica task placed in part during
    the startup grace set no wake-up, so a shell ticking at next_wakeup() left it pending.
    At the grace's end, with still one member for three replicas, it fails."""
    s = sched(ad("a", slots=4), startup_grace_s=3.0)
    s.handle(Submitted(task("t", replicas=3)), 1.0)
    assert s.next_wakeup() == 3.0
    out = finished(s.handle(Tick(), 3.0))
    assert [(f.task_id, f.state, f.failure.reason if f.failure else None) for f in out] == \
        [("t", TaskState.FAILED, FailReason.TOO_FEW_MEMBERS)]


# --- wire: field readers and limits --------------------------------------------------------
def test_field_readers_enforce_their_default_limits_and_name_the_field() -> None:
    """The defaults (4096 chars, 10,000 items, 1,000 strings) and the messages."""
    assert wire.field_str({"f": "x" * 4096}, "f") == "x" * 4096
    with pytest.raises(MalformedMessage, match="field 'f' longer than 4096"):
        wire.field_str({"f": "x" * 4097}, "f")
    assert len(wire.field_list({"f": [0] * 10_000}, "f")) == 10_000
    with pytest.raises(MalformedMessage, match="field 'f' has more than 10000 items"):
        wire.field_list({"f": [0] * 10_001}, "f")
    assert len(wire.field_str_list({"f": ["a"] * 1000}, "f")) == 1000
    with pytest.raises(MalformedMessage, match="more than 1000"):
        wire.field_str_list({"f": ["a"] * 1001}, "f")
    with pytest.raises(MalformedMessage, match="field 'f' must be a list of strings"):
        wire.field_str_list({"f": ["a", 1]}, "f")
    assert wire.field_bytes({"f": b"x" * 3}, "f", max_len=3) == b"xxx"
    with pytest.raises(MalformedMessage, match="field 'f' longer than 2"):
        wire.field_bytes({"f": b"x" * 3}, "f", max_len=2)
    for reader, what in [(wire.field_str, "a string"), (wire.field_int, "an integer"),
                         (wire.field_float, "a number"), (wire.field_bytes, "bytes"),
                         (wire.field_list, "a list"), (wire.field_map, "a map")]:
        with pytest.raises(MalformedMessage, match=f"field 'g' must be {what}"):
            reader({"f": None}, "g")  # type: ignore[operator]
    with pytest.raises(MalformedMessage, match="integer"):
        wire.field_int({"f": True}, "f")
    with pytest.raises(MalformedMessage, match="number"):
        wire.field_float({"f": False}, "f")
    value = wire.field_float({"f": 3}, "f")
    assert value == 3.0
    assert type(value) is float
    assert wire.field_map({"f": {"a": 1}}, "f") == {"a": 1}


def test_unpack_size_limit_is_inclusive_and_versions_are_exact() -> None:
    msg = wire.pack({"t": "x", "v": 1, "pad": b""})
    assert wire.unpack(msg, max_bytes=len(msg))["t"] == "x"
    with pytest.raises(FrameTooLarge, match=f"message of {len(msg)} bytes exceeds the "
                                            f"{len(msg) - 1}-byte limit"):
        wire.unpack(msg, max_bytes=len(msg) - 1)
    for v in (True, 1.0, 2, 0, None):
        with pytest.raises(MalformedMessage, match="unsupported message version"):
            wire.unpack(wire.pack({"t": "x", "v": v}))
    with pytest.raises(MalformedMessage, match="no type field"):
        wire.unpack(wire.pack({"t": 1, "v": 1}))
    with pytest.raises(MalformedMessage, match="not a map"):
        wire.unpack(wire.pack([1]))  # type: ignore[arg-type]


def test_varint_encoding_boundaries() -> None:
    assert wire.encode_varint(0) == b"\x00"
    assert wire.encode_varint(0x7F) == b"\x7f"
    assert wire.encode_varint(0x80) == b"\x80\x01"
    assert wire.encode_varint(300) == b"\xac\x02"
    assert wire.encode_varint(2**63) == b"\x80" * 9 + b"\x01"
    # ten bytes is the default limit; the eleventh is refused by name
    assert wire.read_varint(b"\x80" * 9 + b"\x01") == (2**63, 10)
    with pytest.raises(MalformedMessage, match="longer than 10 bytes"):
        wire.read_varint(b"\x80" * 10 + b"\x01")
    assert wire.read_varint(b"\x00", minimal=True) == (0, 1)
    assert wire.read_varint(b"\x01\x80\x01", 1) == (128, 3)
    # a stream decoder waits on a short prefix but refuses a long broken one
    assert wire.decode_varint(b"\x80" * 9) is None
    with pytest.raises(MalformedMessage):
        wire.decode_varint(b"\x80" * 10)
    assert wire.decode_varint(b"\x05\x80", 1) is None


def test_frame_decoder_limit_is_inclusive_and_keeps_the_tail() -> None:
    dec = wire.FrameDecoder(max_frame=4)
    assert dec.feed(wire.frame(b"abcd") + b"\x03ab") == [b"abcd"]
    assert dec.pending == 3
    assert dec.feed(b"c") == [b"abc"]
    assert dec.pending == 0
    with pytest.raises(FrameTooLarge, match="frame of 5 bytes exceeds the 4-byte limit"):
        dec.feed(b"\x05")
    assert wire.frame_message({"t": "x", "v": 1}) == wire.frame(wire.pack({"t": "x", "v": 1}))


# --- envelope and identity -----------------------------------------------------------------
def test_sealed_envelope_opens_to_its_signer_body_and_exact_bytes() -> None:
    me = Identity(bytes(range(32)))
    body = {"t": "ad", "v": 1, "n": 7}
    opened = open_sealed(seal(me, "cap", body), "cap", max_bytes=wire.MAX_GOSSIP_BYTES)
    assert opened == Opened(me.peer_id, body, wire.pack(body))


def test_envelope_checks_its_kind_domain_and_field_sizes_by_name() -> None:
    me = Identity(bytes(range(32)))
    raw = wire.pack({"t": "x", "v": 1})

    def outer(**kw: object) -> bytes:
        fields = {"t": "signed", "v": 1, "d": "cap", "body": raw, "signer": me.peer_id,
                  "sig": me.sign("cap", raw)}
        fields.update(kw)
        return wire.pack(fields)

    assert open_sealed(outer(), "cap", max_bytes=1024).signer == me.peer_id
    with pytest.raises(MalformedMessage, match="expected a signed envelope"):
        open_sealed(outer(t="plain"), "cap", max_bytes=1024)
    with pytest.raises(MalformedMessage, match="expected a 'cap' envelope"):
        open_sealed(outer(d="res"), "cap", max_bytes=1024)
    # a 65-byte signature is a malformed field, refused before any verification
    with pytest.raises(MalformedMessage, match="field 'sig' longer than 64"):
        open_sealed(outer(sig=me.sign("cap", raw) + b"\0"), "cap", max_bytes=1024)
    with pytest.raises(MalformedMessage, match="field 'signer' longer than 100"):
        open_sealed(outer(signer="1" * 101), "cap", max_bytes=1024)
    long_domain = "d" * 65
    with pytest.raises(MalformedMessage, match="field 'd' longer than 64"):
        open_sealed(seal(me, long_domain, {"t": "x", "v": 1}), long_domain, max_bytes=1024)
    ok_domain = "d" * 64
    assert open_sealed(seal(me, ok_domain, {"t": "x", "v": 1}), ok_domain,
                       max_bytes=1024).body == {"t": "x", "v": 1}
    with pytest.raises(BadSignature, match="bad cap signature"):
        open_sealed(outer(sig=me.sign("res", raw)), "cap", max_bytes=1024)


def test_peer_id_and_key_checks_name_what_is_wrong() -> None:
    me = Identity(bytes(range(32)))
    assert public_from_peer_id(me.peer_id) == me.public
    assert peer_id_bytes_from_public(me.public)[6:] == me.public
    with pytest.raises(MalformedMessage, match="32 bytes"):
        peer_id_bytes_from_public(me.public + b"\0")
    with pytest.raises(MalformedMessage, match="not base58"):
        public_from_peer_id("0OIl")
    with pytest.raises(MalformedMessage, match="not an Ed25519 peer id"):
        public_from_peer_id(base58.b58encode(peer_id_bytes_from_public(me.public)[:-1]).decode())
    with pytest.raises(BadSignature, match="signature must be 64 bytes"):
        verify(me.public, "cap", b"x", me.sign("cap", b"x")[:63])
    verify(me.public, "cap", b"x", me.sign("cap", b"x"))
    assert Identity.generate(bytes(range(32))).peer_id == me.peer_id
    # the seed is what a node writes to its key file: it must be the one given
    assert me.seed == bytes(range(32))
    assert Identity(me.seed).public == me.public


# --- tasks: every message the executor and submitter exchange, encoded then decoded -----
def one_frame(data: bytes) -> tasks.TaskMessage:
    [payload] = wire.FrameDecoder().feed(data)
    return tasks.decode_frame(payload)


def test_task_messages_round_trip_through_their_encoders() -> None:
    """call/cancel/progress/ack/offer had no test outside node/ (mutmut: "no tests")."""
    assert one_frame(tasks.progress(["a", "b"], "running")) == tasks.Progress(["a", "b"],
                                                                            "running")
    assert one_frame(tasks.ack(["a"])) == tasks.Ack(["a"])
    assert one_frame(tasks.cancel(["a", "b"])) == tasks.Cancel(["a", "b"])
    assert one_frame(tasks.offer("c1", K, 3)) == tasks.Offer("c1", K, 3)
    assert tasks.decode(wire.unpack(tasks.call("c1", K, "1", 5))) == tasks.Call("c1", K, "1", 5)
    # an executor's offer is clamped to 0..MAX_OFFER_FREE
    assert one_frame(tasks.offer("c", K, -5)) == tasks.Offer("c", K, 0)
    assert one_frame(tasks.offer("c", K, 10**6)) == tasks.Offer("c", K, tasks.MAX_OFFER_FREE)
    assert tasks.decode({"t": "x" * 40, "v": 1}) == tasks.Unknown("x" * 32)
    with pytest.raises(MalformedMessage, match="needs a type"):
        tasks.decode({"v": 1})


def test_accepted_carries_refusals_and_admission_positions() -> None:
    msg = one_frame(tasks.accepted(["a", "b"], [("c", "busy", "full"), ("d", "zzz", "new")],
                                   {"a": 0, "b": 2}))
    assert msg == tasks.Accepted(
        ["a", "b"], [tasks.Refusal("c", tasks.RefuseCode.BUSY, "full"),
                     tasks.Refusal("d", tasks.RefuseCode.OTHER, "new")], {"a": 0, "b": 2})
    assert one_frame(tasks.accepted(["a"], [])) == tasks.Accepted(["a"], [], None)
    base = {"t": "accepted", "v": 1, "ids": [], "refused": []}
    assert tasks.decode(base | {"adm": [["a", 1 << 31]]}).positions == {"a": 1 << 31}  # type: ignore[union-attr]
    for bad in (["a", -1], ["a", (1 << 31) + 1], ["a", True], ["x" * 65, 1], [1, 1], ["a"]):
        with pytest.raises(MalformedMessage, match="'adm' must hold"):
            tasks.decode(base | {"adm": [bad]})
    for bad_ids in ([1], ["x" * 65]):
        with pytest.raises(MalformedMessage, match="'ids' must be a list of task ids"):
            tasks.decode(base | {"ids": bad_ids})
    assert tasks.decode(base | {"ids": ["x" * 64]}).ids == ["x" * 64]  # type: ignore[union-attr]
    with pytest.raises(MalformedMessage, match="triples"):
        tasks.decode(base | {"refused": [["a", "busy"]]})


def test_task_spec_round_trip_keeps_every_field() -> None:
    spec = tasks.TaskSpec("t1", K, "2", b"in", {"n": 1}, 5000, priority=3, input_cid="bafy")
    [msg] = [one_frame(tasks.assign([spec]))]
    assert msg == tasks.Assign([spec])
    plain = tasks.TaskSpec("t2", K, "2", b"", {}, 10)
    assert "cid" not in plain.to_wire()
    assert one_frame(tasks.assign([plain])) == tasks.Assign([plain])
    assert spec.needs_files
    assert not plain.needs_files


def test_params_size_and_batches() -> None:
    """params_size: `if params or True` (0 for the empty map); chunks: append(None)."""
    assert tasks.params_size({}) == 0
    assert tasks.params_size({"a": 1}) == len(wire.pack({"p": {"a": 1}}))
    items = list(range(10))
    parts = list(tasks.chunks(items, lambda i: tasks.BATCH_BYTES // 4))
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    parts = list(tasks.chunks(list(range(tasks.MAX_BATCH + 1)), lambda i: 1))
    assert [len(p) for p in parts] == [tasks.MAX_BATCH, 1]
    assert list(tasks.chunks([], lambda i: 1)) == []
    # one item bigger than a batch still goes, alone
    assert list(tasks.chunks(["big", "x"], lambda s: tasks.BATCH_BYTES * 2)) == [["big"], ["x"]]


# --- capability: what `teammesh peers --json` shows, and forgetting a peer ----------------
def ident(n: int) -> Identity:
    return Identity(bytes([n]) * 32)


def cap_ad(who: Identity, team: TeamInfo, seq: int = 1, **kw: object) -> CapabilityAd:
    fields: dict[str, object] = dict(
        peer_id=who.peer_id, team_id=team.team_id, addrs=("/ip4/127.0.0.1/tcp/1",), cores=4,
        slots=2, free_slots=1, memory_bytes=8 << 30, gpus=("gpu0",), kinds={K: "1"},
        queue=3, cost=1.5, storage=("local",), software="0.1.0", seq=seq, ttl_ms=10_000,
        cert=b"cert", pull=True, wall_ms=1_000_000)
    fields.update(kw)
    return CapabilityAd(**fields)  # type: ignore[arg-type]


def test_peer_entry_json_is_what_the_cli_prints() -> None:
    """PeerEntry.to_json had no pure test (mutmut: "no tests" on every key)."""
    team = TeamInfo.create("t", ident(10).public)
    a = ident(11)
    table = PeerTable()
    # received 2 s ago by a relay; our wall clock says 1003 s when we hear it
    assert table.update(cap_ad(a, team), now=100.0, age=2.0, wall=1003.0)
    entry = table.get(a.peer_id, 100.0)
    assert entry is not None
    assert entry.to_json(101.0) == {
        "peer_id": a.peer_id, "addrs": ["/ip4/127.0.0.1/tcp/1"], "cores": 4, "slots": 2,
        "free_slots": 1, "memory_bytes": 8 << 30, "gpus": ["gpu0"], "kinds": {K: "1"},
        "queue": 3, "cost": 1.5, "storage": ["local"], "version": "0.1.0", "seq": 1,
        "pull": True, "age_s": 3.0, "expires_in_s": 7.0,
        # the author's clock (1000 s) minus ours when it made the ad (1003 - 2 = 1001 s)
        "clock_offset_s": -1.0,
    }
    b = ident(12)
    table.update(cap_ad(b, team, wall_ms=None), now=100.0)
    assert table.entries[b.peer_id].to_json(100.0)["clock_offset_s"] is None


def test_removing_a_peer_forgets_its_ad_and_its_down_mark() -> None:
    team = TeamInfo.create("t", ident(10).public)
    a = ident(11)
    table = PeerTable()
    table.remove(a.peer_id)  # never seen: nothing to do, no error
    table.update(cap_ad(a, team, seq=5), now=100.0)
    assert table.mark_down(a.peer_id, 101.0)
    table.remove(a.peer_id)
    assert table.entries == {}
    assert table.down == {}
    # back at once with any seq: nothing remembers it went down
    assert table.update(cap_ad(a, team, seq=1), now=101.5)
    assert [e.ad.peer_id for e in table.live(101.5)] == [a.peer_id]


# --- membership ------------------------------------------------------------------------------
def test_a_node_reads_its_own_lapsed_certificate_but_not_another_teams() -> None:
    """open_own_certificate: parse_certificate(data, 0) (team dropped) had no pure test."""
    root = ident(10)
    team = TeamInfo.create("t", root.public)
    me = ident(11)
    cert = issue_certificate(root, team, me.peer_id, (ROLE_MEMBER,), 1000, 100)
    lapsed = open_own_certificate(cert.packed(), team, 5000)
    assert (lapsed.peer_id, lapsed.expires) == (me.peer_id, 1100)
    assert open_own_certificate(cert.packed(), team, 1050).expires == 1100
    other = TeamInfo.create("u", ident(20).public)
    with pytest.raises(NotAMember, match="certificate is for team"):
        open_own_certificate(cert.packed(), other, 5000)


# --- bitswap: the protobuf on the wire, and the server's ledger ----------------------------
def test_bitswap_encoding_matches_the_spec_field_numbers() -> None:
    """Field numbers from bitswap.proto (Bitswap 1.2.0 spec), written out by hand: a wrong
    number survived before, since our own decoder skips unknown fields."""
    msg = bs.Message(
        wantlist=(bs.Entry(b"C", priority=7, cancel=True, want_type=bs.WantType.HAVE,
                           send_dont_have=True),),
        full=True, blocks=(b"B",), payload=(bs.Payload(b"P", b"xy"),),
        presences=(bs.Presence(b"D", bs.PresenceType.DONT_HAVE),
                   bs.Presence(b"E", bs.PresenceType.HAVE)),
        pending_bytes=300)
    entry = bytes.fromhex("0a0143" "1007" "1801" "2001" "2801")  # block, prio, cancel, type, sdh
    wantlist = b"\x0a" + bytes([len(entry)]) + entry + bytes.fromhex("1001")  # entries, full
    expected = (b"\x0a" + bytes([len(wantlist)]) + wantlist
                + bytes.fromhex("120142")                    # blocks = 2
                + bytes.fromhex("1a07" "0a0150" "12027879")  # payload = 3 {prefix 1, data 2}
                + bytes.fromhex("2205" "0a0144" "1001")      # presence = 4 {cid 1, type 2}
                + bytes.fromhex("2203" "0a0145")             # HAVE (0) is the default: omitted
                + bytes.fromhex("28ac02"))                   # pendingBytes = 5
    assert bs.encode(msg) == expected
    assert bs.decode(expected) == msg
    # an int32 below zero is sign-extended to ten bytes, as protobuf requires
    assert bs.encode(bs.Message(pending_bytes=-1)) == b"\x28" + b"\xff" * 9 + b"\x01"
    assert bs.decode(b"\x28" + b"\xff" * 9 + b"\x01").pending_bytes == -1


def raw_cid(data: bytes) -> bytes:
    return b"\x01\x55\x12\x20" + hashlib.sha256(data).digest()


def test_want_have_inlines_only_blocks_below_the_limit() -> None:
    """Server._serve: `len(data) <= limit` instead of `<` (Helia's rule: below the limit)."""
    small, edge = b"s" * 9, b"e" * 10
    store = {raw_cid(small): small, raw_cid(edge): edge}
    server = bs.Server(inline_have_limit=10)
    want = bs.Message(wantlist=(bs.Entry(raw_cid(small), want_type=bs.WantType.HAVE),
                                bs.Entry(raw_cid(edge), want_type=bs.WantType.HAVE)))
    [reply] = server.receive("p", want, store.get)
    assert [p.data for p in reply.payload] == [small]
    assert reply.presences == (bs.Presence(raw_cid(edge), bs.PresenceType.HAVE),)


def test_a_peer_whose_wants_are_all_cancelled_leaves_no_ledger() -> None:
    """Server.receive: ledgers.pop(None) kept an empty ledger per peer forever."""
    server = bs.Server()
    cid = raw_cid(b"missing")
    assert server.receive("p", bs.Message(wantlist=(bs.Entry(cid),)), {}.get) == []
    assert server.wants_of("p") == [cid]
    server.receive("p", bs.Message(wantlist=(bs.Entry(cid, cancel=True),)), {}.get)
    assert server.ledgers == {}


def test_want_manager_asks_for_blocks_with_dont_have_and_names_refusals() -> None:
    """poll: the Entry sent (None); receive: the DONT_HAVE reason in Failed (None)."""
    a = raw_cid(b"a")
    wm = bs.WantManager(["p"], give_up_s=0.0)
    wm.want(a, 0.0)
    assert wm.poll(0.0) == [bs.Send("p", bs.Message(wantlist=(
        bs.Entry(a, priority=1, want_type=bs.WantType.BLOCK, send_dont_have=True),)))]
    wm.receive("p", [], [bs.Presence(a, bs.PresenceType.DONT_HAVE)], now=1.0)
    assert wm.poll(1.0) == [bs.Failed(a, "p: DONT_HAVE")]
    assert wm.done


def test_want_manager_refills_a_peer_once_its_window_drained() -> None:
    """_forget: `_load[peer] += 1` (a received block must lower the peer's load)."""
    blocks = [bytes([i]) for i in range(3)]
    wm = bs.WantManager(["p"], max_in_flight=2, refill_below=0)
    for b in blocks:
        wm.want(raw_cid(b), 0.0)
    [first] = wm.poll(0.0)
    assert isinstance(first, bs.Send)
    assert [e.cid for e in first.message.wantlist] == [raw_cid(b) for b in blocks[:2]]
    wm.receive("p", [(raw_cid(blocks[0]), blocks[0])], now=0.1)
    wm.receive("p", [(raw_cid(blocks[1]), blocks[1])], now=0.2)
    sent = [e for e in wm.poll(0.3) if isinstance(e, bs.Send)]
    wanted = [e.cid for s in sent for e in s.message.wantlist if not e.cancel]
    assert wanted == [raw_cid(blocks[2])]
    assert wm.in_flight == 1


# --- results: sealed by the executor, opened by the submitter ------------------------------
def test_sealed_results_open_for_their_submitter_only() -> None:
    """seal_results/open_results had no pure round trip: a renamed key or type survived."""
    executor, submitter = ident(11), ident(12)
    results = [tasks.make_result("t1", True, b"out", None, 1.23456, 0.5),
               tasks.make_result("t2", False, None, "boom", 2.0, 1.0)]
    assert results[1].error == "boom"
    assert results[0].wall_ms == 1.235
    frame = one_frame(tasks.seal_results(executor, submitter.peer_id, results))
    assert isinstance(frame, tasks.Results)
    assert tasks.open_results(frame.sealed, executor.peer_id, submitter.peer_id) == results
    with pytest.raises(ResultRejected, match="not addressed to us"):
        tasks.open_results(frame.sealed, executor.peer_id, ident(13).peer_id)
    with pytest.raises(ResultRejected, match="signed by"):
        tasks.open_results(frame.sealed, ident(13).peer_id, submitter.peer_id)
    # a body that is not a result set is refused even when signed and addressed to us
    other = seal(executor, tasks.DOMAIN_RESULTS, {"t": "other", "v": 1,
                                                  "submitter": submitter.peer_id})
    with pytest.raises(ResultRejected, match="not addressed to us"):
        tasks.open_results(other, executor.peer_id, submitter.peer_id)


def test_output_digest_is_sha256_of_the_documented_map() -> None:
    """Replicas on other versions must agree: the digest's input is fixed by the protocol."""
    expected = hashlib.sha256(msgpack.packb({"ok": False, "output": [1, "x"], "error": "e"},
                                            use_bin_type=True)).digest()
    assert tasks.output_digest(False, [1, "x"], "e") == expected


def test_team_id_of_a_fixed_root_key_does_not_change() -> None:
    """team_id_from_root: digest[:11] instead of [:10] changed every team id and no test
    saw it. The derivation, written out: "tm" + base32(sha256("teammesh-team:" + root)[:10])."""
    root = ident(10).public
    team = TeamInfo.create("t", root)
    digest = hashlib.sha256(b"teammesh-team:" + root).digest()
    assert team.team_id == "tm" + base64.b32encode(digest[:10]).decode().lower()
    assert team.team_id == "tm5lar4gomk3rxjqe6"


def test_bitswap_decoder_skips_fixed_width_fields_and_names_bad_wire_types() -> None:
    """_fields: `pos += 9` for a fixed64; _sub(None, ...) in the message naming the field."""
    known = bytes.fromhex("28ac02")  # pendingBytes = 300
    fixed64 = b"\x31" + b"\x00" * 8  # field 6, wire type 1, skipped
    fixed32 = b"\x3d" + b"\x00" * 4  # field 7, wire type 5, skipped
    assert bs.decode(fixed64 + known).pending_bytes == 300
    assert bs.decode(fixed32 + known).pending_bytes == 300
    with pytest.raises(MalformedMessage, match="runs past the end"):
        bs.decode(b"\x31" + b"\x00" * 7)
    # a wantlist entry sent as a varint instead of a message
    with pytest.raises(MalformedMessage, match="bitswap field 1 has wire type 0, expected 2"):
        bs.decode(b"\x0a\x02\x08\x01")


def test_cid_v0_prefix_is_dag_pb_sha256_32_only() -> None:
    """Prefix.decode: `length == 32` inverted refused every CIDv0 block."""
    assert bs.Prefix.decode(bs.V0_PREFIX.encode()) == bs.V0_PREFIX
    for bad in (bs.Prefix(0, bs.DAG_PB, bs.SHA2_256, 31), bs.Prefix(0, 0x55, bs.SHA2_256, 32),
                bs.Prefix(0, bs.DAG_PB, bs.SHA2_512, 32)):
        with pytest.raises(MalformedMessage, match="CIDv0 prefix"):
            bs.Prefix.decode(bad.encode())
    data = b"block"
    assert bs.V0_PREFIX.cid_of(data) == b"\x12\x20" + hashlib.sha256(data).digest()


def test_revocations_by_an_admin_count_while_the_admin_certificate_holds() -> None:
    """Roster.merge: add_revocation(r, None) (the admin chain is checked at ``now``)."""
    root = ident(10)
    team = TeamInfo.create("t", root.public)
    admin, peer = ident(11), ident(12)
    admin_cert = issue_certificate(root, team, admin.peer_id, (ROLE_ADMIN,), 1000, 100)
    roster = Roster(team)
    roster.merge([issue_certificate(root, team, peer.peer_id, (ROLE_MEMBER,), 1000,
                                    10_000).packed()], [], 1000)
    late = issue_revocation(admin, team, peer.peer_id, 1200, issuer_cert=admin_cert)
    assert roster.merge([], [late.packed()], 1200) == (0, [])  # the admin's cert lapsed
    assert roster.is_member(peer.peer_id, 1200)
    ok = issue_revocation(admin, team, peer.peer_id, 1050, issuer_cert=admin_cert)
    assert roster.merge([], [ok.packed()], 1050) == (0, [peer.peer_id])
    assert not roster.is_member(peer.peer_id, 1050)


def test_down_notices_round_trip_and_name_what_is_wrong() -> None:
    """DownNotice had no test in the pure suite outside the fuzz run."""
    team = TeamInfo.create("t", ident(10).public)
    observer, peer = ident(11), ident(12)
    notice = DownNotice(observer.peer_id, team.team_id, peer.peer_id, 7)
    assert open_down(notice.sealed(observer)) == notice
    with pytest.raises(MalformedMessage, match="signed by its observer"):
        notice.sealed(peer)
    body = notice.to_wire()
    assert body == {"t": "down", "v": 1, "by": observer.peer_id, "team": team.team_id,
                    "peer": peer.peer_id, "seq": 7}
    for key, value, match in [("seq", -1, "must not be negative"),
                              ("peer", observer.peer_id, "cannot report itself"),
                              ("peer", "x" * 101, "'peer' longer than 100"),
                              ("by", "x" * 101, "'by' longer than 100"),
                              ("team", "x" * 65, "'team' longer than 64")]:
        with pytest.raises(MalformedMessage, match=match):
            DownNotice.from_wire(body | {key: value})
    with pytest.raises(MalformedMessage, match="signed by"):
        open_down(seal(peer, "down", body))


def test_a_down_notice_takes_a_peer_down_unless_we_heard_newer() -> None:
    """PeerTable.apply_notice: every refusal returns False (a mutant returned True)."""
    team = TeamInfo.create("t", ident(10).public)
    a = ident(11)
    table = PeerTable()
    notice = DownNotice(ident(12).peer_id, team.team_id, a.peer_id, 5)
    assert not table.apply_notice(notice, 100.0)  # never heard of it
    table.update(cap_ad(a, team, seq=6), now=100.0)
    assert not table.apply_notice(notice, 100.0)  # we hold a newer ad than the observer
    assert table.live(100.0) != []
    table.update(cap_ad(a, team, seq=7), now=200.0)  # the observer saw this one too
    newer = DownNotice(ident(12).peer_id, team.team_id, a.peer_id, 7)
    assert table.apply_notice(newer, 200.0)
    assert table.live(200.0) == []
    assert not table.apply_notice(newer, 200.5)  # already down
    assert not table.apply_notice(newer, 500.0)  # its ad expired


def test_task_id_lists_are_bounded_by_the_batch_size() -> None:
    """id_list: the MAX_BATCH bound dropped (the field default is 10,000)."""
    ids = [str(i) for i in range(tasks.MAX_BATCH)]
    assert tasks.decode({"t": "ack", "v": 1, "ids": ids}) == tasks.Ack(ids)
    with pytest.raises(MalformedMessage, match="more than 4096"):
        tasks.decode({"t": "ack", "v": 1, "ids": [*ids, "x"]})


def test_an_unreachable_peer_gives_its_wants_back_first_in_line() -> None:
    """send_failed: front=False (a want that could not be sent waits behind the rest)."""
    blocks = [bytes([i]) for i in range(3)]
    wm = bs.WantManager(["p", "q"], max_in_flight=1)
    for b in blocks:
        wm.want(raw_cid(b), 0.0)
    [sent] = wm.poll(0.0)
    assert isinstance(sent, bs.Send)
    assert [e.cid for e in sent.message.wantlist] == [raw_cid(blocks[0])]
    wm.send_failed(sent.peer, sent.message)
    [again] = wm.poll(0.1)
    assert isinstance(again, bs.Send)
    assert again.peer != sent.peer
    assert [e.cid for e in again.message.wantlist] == [raw_cid(blocks[0])]


def test_signatures_cover_the_documented_domain_prefix() -> None:
    """identity._message: the "teammesh:" prefix renamed made every signature foreign to
    other versions; checked with libsodium directly, not through our own verify."""
    me = ident(11)
    sig = me.sign("cap", b"body")
    VerifyKey(me.public).verify(b"teammesh:cap\0body", sig)


def test_ad_storage_list_and_progress_state_are_bounded() -> None:
    """CapabilityAd.from_wire: storage max_len=16 dropped; decode: progress state max 32."""
    team = TeamInfo.create("t", ident(10).public)
    body = cap_ad(ident(11), team).to_wire()
    assert CapabilityAd.from_wire(body | {"storage": ["s"] * 16}).storage == ("s",) * 16
    with pytest.raises(MalformedMessage, match="'storage' has more than 16"):
        CapabilityAd.from_wire(body | {"storage": ["s"] * 17})
    msg = {"t": "progress", "v": 1, "ids": ["a"]}
    assert tasks.decode(msg | {"state": "r" * 32}) == tasks.Progress(["a"], "r" * 32)
    with pytest.raises(MalformedMessage, match="'state' longer than 32"):
        tasks.decode(msg | {"state": "r" * 33})


def test_refusals_say_what_was_wrong() -> None:
    """Messages a user reads: msgpack extension types, a chained admin certificate."""
    with pytest.raises(MalformedMessage, match=r"extension type .* only plain data"):
        wire.unpack(msgpack.packb({"t": "x", "v": 1, "e": msgpack.ExtType(5, b"x")}))
    root = ident(10)
    team = TeamInfo.create("t", root.public)
    admin = issue_certificate(root, team, ident(11).peer_id, (ROLE_ADMIN,), 1000, 100)
    # a certificate issued by an admin carries the admin's certificate as its chain; the
    # admin's own certificate may not carry one (one level only)
    member = issue_certificate(ident(11), team, ident(12).peer_id, (ROLE_MEMBER,), 1000, 100,
                               issuer_cert=admin)
    outer = msgpack.unpackb(member.packed())
    outer["chain"] = "not bytes"
    with pytest.raises(MalformedMessage, match="certificate chain must be one admin certificate"):
        parse_certificate(msgpack.packb(outer, use_bin_type=True), team, 1000)


def test_a_lone_peer_that_sent_bad_blocks_is_still_asked() -> None:
    """WantManager.poll: `trusted and peers` banned the only peer for good."""
    a = raw_cid(b"a")
    wm = bs.WantManager(["p"], max_bad_blocks=1)
    wm.bad_block("p")
    wm.want(a, 0.0)
    assert wm.poll(0.0) == [bs.Send("p", bs.Message(wantlist=(
        bs.Entry(a, priority=1, want_type=bs.WantType.BLOCK, send_dont_have=True),)))]


def test_a_cid_varint_with_a_trailing_zero_is_refused_by_name() -> None:
    with pytest.raises(MalformedMessage, match=r"^non-minimal varint: trailing zero byte$"):
        wire.read_varint(b"\x81\x00", minimal=True)


def _hmac_sha256_by_hand(key: bytes, message: bytes) -> bytes:
    """RFC 2104 written out with hashlib alone (no hmac module), for bridgekey's tests."""
    block = 64
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(k ^ 0x36 for k in key) + message).digest()
    return hashlib.sha256(bytes(k ^ 0x5C for k in key) + inner).digest()


def test_member_bridge_keys_match_the_documented_derivation() -> None:
    """bridgekey.derive_member_key: no pure test reached it (only test_revocation, with
    daemons). A wrong key means the Worker refuses every request of that member. The
    expected values are openssl's (`openssl dgst -sha256 -mac HMAC -macopt hexkey:...` over
    the label, its NUL and the peer id) and RFC 2104 written out with hashlib."""
    # The hand-written HMAC first proves itself on RFC 4231 test case 2.
    assert _hmac_sha256_by_hand(b"Jefe", b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert MEMBER_KEY_LABEL == b"teammesh-bridge-member-v1\x00"
    master = bytes(range(32))
    assert derive_member_key(master, "QmPe\u00e9r").hex() == (
        "1f2db6a0c5c187f987290a087b28e1ba70fd6c47fcd0f3ac660b329087da8913")
    assert derive_member_key(b"\xaa" * 32, "12D3KooWQ9k3example").hex() == (
        "f77053284f1b46fb338ad43e68011eddb500ca7f1d339ecdefa76363396171cd")
    peers = ["12D3KooWA", "12D3KooWB", ""]
    keys = {derive_member_key(master, p) for p in peers}
    assert len(keys) == 3  # one member's key is not another's
    for p in peers:
        want = _hmac_sha256_by_hand(master, b"teammesh-bridge-member-v1\x00" + p.encode())
        assert derive_member_key(master, p) == want
        assert derive_member_key(b"\x01" + master[1:], p) != want  # the master key counts


def test_failures_render_the_text_users_are_shown() -> None:
    """Failure.render: the GAVE_UP loss dropped (`self.loss and False`), the NO_RUNNER and
    TOO_FEW_MEMBERS texts changed, the REPLICAS_DISAGREE separator changed. `teammesh
    status` and the API print these; the hints in them are what a user acts on."""
    f = FailReason
    assert Failure(f.GAVE_UP, "peerA", 3, Loss.TIMEOUT).render() == (
        "gave up after 3 attempts; last: peerA (timeout)")
    assert Failure(f.GAVE_UP, "peerA", 3).render() == "gave up after 3 attempts; last: peerA (?)"
    assert Failure(f.NO_RUNNER).render() == (
        "no member runs this kind with the resources it needs, and no bridge can")
    assert Failure(f.TOO_FEW_MEMBERS, attempts=3).render() == (
        "3 replicas need as many distinct members running the kind, and fewer do: "
        "lower --replicas or add members")
    assert Failure(f.REPLICAS_DISAGREE, digests=(("a", bytes(range(16))), ("b", b"\xff" * 16)),
                   ).render() == "replicas disagree: a -> 000102030405; b -> ffffffffffff"


def test_waits_render_the_text_users_are_shown() -> None:
    """Wait.render: the REPLICAS_PENDING and ON_BRIDGE texts changed."""
    w = WaitReason
    assert Wait(w.REPLICAS_PENDING, count=1, total=3).render(0.0) == (
        "1 of 3 replicas placed; waiting for more distinct members")
    assert Wait(w.ON_BRIDGE).render(0.0) == "sent to the bridge"


def test_a_capability_ad_keeps_its_cost_and_memory_in_mib() -> None:
    """PeerAd.from_capability: the cost dropped (`None`, or the argument left out so the
    rtt took its place). The cost is what ranks equally placed peers (Weights.cost)."""
    cap = CapabilityAd("p", "team", (), 4, 2, 1, 3 * 2**30, ("gpu0",), {K: "1"}, 5, 0.25,
                       (), "tm", 1, 1000, b"")
    got = PeerAd.from_capability(cap, rtt_ms=7.5)
    assert got == PeerAd("p", {K: "1"}, 2, 1, 5, 3072.0, ("gpu0",), 0.25, 7.5)


def test_a_peers_queue_drains_before_its_slots_free_and_sets_the_wait() -> None:
    """PeerView.released: `queue > 1`, `queue += 1`, the 86,400 s cap as 86,401;
    PeerView.wait_s: `avg / (queue + 1)`. The wait is what Rule 6 compares with the bridge
    (docs/SCHEDULER.md: avg task time * (queue + 1) / slots)."""
    v = PeerView.from_ad(PeerAd("p", {K: "1"}, 2, 0, 0))
    for t in "abcd":
        v.assigned(t)
    assert (v.free, v.queue) == (0, 4)
    v.released("a", 10.0)
    assert (v.free, v.queue, v.avg_task_s) == (0, 3, 10.0)
    assert v.wait_s(None) == 10.0 * (3 + 1) / 2
    v.released("b", None)
    v.released("c", None)
    assert (v.free, v.queue) == (0, 1)
    v.released("d", None)
    assert (v.free, v.queue) == (0, 0)
    assert v.wait_s(None) == 10.0 * (0 + 1) / 2
    v2 = PeerView.from_ad(PeerAd("q", {K: "1"}, 1, 1, 0))
    v2.assigned("x")
    assert (v2.free, v2.queue) == (0, 0)
    v2.released("x", 1e9)  # a day at most: one stuck task must not poison the average
    assert (v2.free, v2.queue, v2.avg_task_s) == (1, 0, 86_400.0)
    v2.released("x", 5.0)  # not ours any more: ignored
    assert (v2.free, v2.avg_task_s) == (1, 86_400.0)


def test_leaves_flattens_nested_exception_groups_in_order() -> None:
    """errors.leaves: `leaves(None)` for each sub-group. No pure test reached it; the
    daemon uses it to judge each error a nursery grouped (a lost stream, a bad peer)."""
    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    grouped = BaseExceptionGroup("outer", [a, ExceptionGroup("inner", [b, ExceptionGroup(
        "deep", [c])])])
    got = leaves(grouped)
    assert [id(e) for e in got] == [id(a), id(b), id(c)]
    assert leaves(a) == [a]


def test_a_simulation_report_has_no_state_for_an_unfinished_task() -> None:
    """SimReport.state: `f or True` (a crash instead of None for a task still running)."""
    report = SimReport()
    report.submitted["t"] = "alice"
    assert report.state("t") is None
    assert report.lost() == ["t"]
