"""Every decoder in protocols/ and storage/ against hostile bytes (``pytest -m fuzz``).

The property, decoder by decoder: on random bytes and on mutations of valid encodings, the
only exceptions that escape are the project's own (TeammeshError subclasses), so a peer's
bytes can be refused by name at the edge and never reach a nursery as a crash. The first
section bounds what one msgpack message may allocate (issue 15, item 6).
"""

from __future__ import annotations

import base64
import contextlib
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from teammesh.protocols import bitswap as bs
from teammesh.protocols import tasks, wire
from teammesh.protocols.capability import DOMAIN_CAP, CapabilityAd, open_ad
from teammesh.protocols.envelope import open_sealed, seal
from teammesh.protocols.errors import MalformedMessage, TeammeshError
from teammesh.protocols.identity import Identity, is_peer_id, verify_by_peer
from teammesh.protocols.membership import (
    DOMAIN_CERT,
    DOMAIN_EPOCH,
    DOMAIN_REVOKE,
    INVITE_PREFIX,
    ROLE_ADMIN,
    ROLE_MEMBER,
    Invite,
    Roster,
    TeamInfo,
    check_enroll_request,
    enroll_request,
    issue_certificate,
    issue_epoch_notice,
    issue_revocation,
    parse_certificate,
    parse_epoch_notice,
    parse_revocation,
)
from teammesh.protocols.tasks import TaskResult, TaskSpec
from teammesh.storage.blockstore import BlockNotFound
from teammesh.storage.cid import DAG_PB, RAW, Cid
from teammesh.storage.cid import decode_varint as storage_varint
from teammesh.storage.dagpb import decode_node, decode_unixfs
from teammesh.storage.unixfs import FileExporter, FileImporter, claimed_size, links_of

pytestmark = pytest.mark.fuzz

MiB = 1024 * 1024


def peak_bytes_while(fn: object, *args: object) -> tuple[BaseException | None, int]:
    """Run ``fn(*args)``; return the exception it raised (or None) and its peak allocation."""
    tracemalloc.start()
    try:
        try:
            fn(*args)  # type: ignore[operator]
        except Exception as exc:  # returned to the test, which asserts its type
            return exc, tracemalloc.get_traced_memory()[1]
        return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- msgpack bombs: bounded allocation per message -----------------------------------------


def empty_map_bomb(size: int) -> bytes:
    """A valid envelope whose ``x`` is a list of lists of empty maps, ``size`` bytes in all:
    one byte on the wire becomes a 64-byte dict in memory."""
    per_list = 60_000
    head = msgpack.packb({"t": "x", "v": 1})
    lists = (size - len(head)) // (per_list + 5)
    body = msgpack.packb([[{}] * per_list] * lists)
    return b"\x83" + head[1:] + msgpack.packb("x") + body


def test_empty_map_bomb_is_refused_within_bounded_memory(scenario_report) -> None:
    bomb = empty_map_bomb(wire.MAX_FRAME_BYTES - 64)
    assert len(bomb) <= wire.MAX_FRAME_BYTES
    exc, peak = peak_bytes_while(wire.unpack, bomb)
    assert isinstance(exc, MalformedMessage), exc
    assert "maps and lists" in str(exc)
    assert peak < 64 * MiB, f"decoding the bomb peaked at {peak / MiB:.0f} MiB"
    scenario_report("wire: 8 MiB frame of empty maps", tried=1, lost=0,
                    note=f"peak {peak / MiB:.0f} MiB")


def test_one_huge_list_of_nils_is_refused_within_bounded_memory() -> None:
    # 8 Mi one-byte nils: each costs an 8-byte pointer in a preallocated list
    bomb = b"\x83" + msgpack.packb({"t": "x", "v": 1})[1:] + msgpack.packb("x") \
        + b"\xdd" + (wire.MAX_FRAME_BYTES - 64).to_bytes(4, "big") \
        + b"\xc0" * (wire.MAX_FRAME_BYTES - 64)
    exc, peak = peak_bytes_while(wire.unpack, bomb)
    assert isinstance(exc, MalformedMessage), exc
    assert peak < 64 * MiB


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\xde\x00\x01\xa1k"])
def test_deep_nesting_is_refused(opener: bytes) -> None:
    deep = opener * 5000 + b"\xc0"
    exc, peak = peak_bytes_while(wire.unpack, deep)
    assert isinstance(exc, MalformedMessage), exc
    assert "deeper than" in str(exc)
    assert peak < 4 * MiB


def nested_envelope(depth: int, *, pad: int = 0, filler: bytes = b"p") -> bytes:
    """An envelope whose field ``x`` nests lists so the whole message is ``depth`` deep."""
    inner: object = 0
    for _ in range(depth - 1):
        inner = [inner]
    return wire.pack({"t": "x", "v": 1, "x": inner, "pad": filler * pad})


# each way unpack checks depth: a small message measured by a walk; a small one with many
# header-like bytes (0x90: a fixarray's) wrapped; a large one wrapped
@pytest.mark.parametrize(("pad", "filler"), [(0, b"p"), (1024, b"\x90"), (64 * 1024, b"p")])
def test_nesting_limit_is_exact(pad: int, filler: bytes) -> None:
    assert wire.unpack(nested_envelope(wire.MAX_DEPTH, pad=pad, filler=filler))["t"] == "x"
    with pytest.raises(MalformedMessage, match="deeper than"):
        wire.unpack(nested_envelope(wire.MAX_DEPTH + 1, pad=pad, filler=filler))


def test_a_batch_of_4096_small_tasks_still_decodes() -> None:
    specs = [tasks.TaskSpec(id=f"t{i:032x}", kind="hash.sha256", version="1",
                            input=b"x" * 64, params={"n": i, "mode": "fast"},
                            timeout_ms=30_000) for i in range(tasks.MAX_BATCH)]
    (payload,) = wire.FrameDecoder().feed(tasks.assign(specs))
    m = wire.unpack(payload)
    assert [tasks.TaskSpec.from_wire(t) for t in m["tasks"]] == specs


def test_a_large_flat_output_within_the_frame_still_decodes() -> None:
    # 800k floats (7.2 MB): a legitimate result under the frame limit is not a bomb
    floats = [float(i) for i in range(800_000)]
    assert wire.unpack(wire.pack({"t": "x", "v": 1, "o": floats}))["o"] == floats


def test_the_budget_scales_with_the_size_limit() -> None:
    # the 64 KiB gossip limit allows 2,048 maps and lists: 3,000 empty maps are refused
    msg = wire.pack({"t": "x", "v": 1, "x": [{}] * 3000})
    assert len(msg) < wire.MAX_GOSSIP_BYTES
    with pytest.raises(MalformedMessage, match="maps and lists"):
        wire.unpack(msg, max_bytes=wire.MAX_GOSSIP_BYTES)
    assert len(wire.unpack(msg)["x"]) == 3000


# --- the property: only TeammeshError escapes a decoder ------------------------------------

NOW = 1_700_000_000
DAY = 86_400
ROOT = Identity(bytes([1]) * 32)
MEMBER = Identity(bytes([2]) * 32)
TEAM = TeamInfo.create("fuzz", ROOT.public)

# msgpack values of every type, nested a little: what a hostile map may put in any field
INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
SCALARS = (st.none() | st.booleans() | INTS
           | st.floats() | st.text(max_size=24) | st.binary(max_size=48))
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=6)
                      | st.dictionaries(st.text(max_size=8), kids, max_size=6), max_leaves=24)


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with one to four byte-level edits: bit flips, overwrites, insertions,
    deletions and truncation (the damage a lossy or hostile path does)."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        else:
            del data[i:]
    return bytes(data)


def bytes_like(*valid: bytes, max_size: int = 512) -> st.SearchStrategy[bytes]:
    """Random bytes, and mutations of the valid encodings given."""
    return st.binary(max_size=max_size) | st.sampled_from(valid).flatmap(mutated)


def message_like(t: str, fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Envelope maps of type ``t`` whose fields are each absent, well typed, or anything."""
    return st.fixed_dictionaries(
        {"t": st.just(t), "v": st.just(1)},
        optional={k: s | VALUES for k, s in fields.items()})


class Tally:
    """Counts the inputs a property tried and the ones that escaped as a crash."""

    def __init__(self) -> None:
        self.tried = 0
        self.crashes: set[str] = set()

    def run(self, fn: Callable[..., object], *args: Any) -> None:
        self.tried += 1
        try:
            fn(*args)
        except TeammeshError:
            pass
        except Exception as exc:
            self.crashes.add(f"{type(exc).__name__}: {exc}"[:200])
            raise


def fuzz(name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], object],
         report: Callable[..., None], examples: int = 400) -> None:
    """Run ``check`` on ``examples`` inputs; only TeammeshError may escape it."""
    tally = Tally()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(value: Any) -> None:
        tally.run(check, value)

    try:
        prop()
    finally:
        report(name, tried=tally.tried, lost=len(tally.crashes),
               note="; ".join(sorted(tally.crashes))[:300])


def signed(identity: Identity, domain: str, body: bytes) -> bytes:
    """A sealed envelope around any body bytes, correctly signed: gets past the signature
    to the body's own decoder."""
    return wire.pack({"t": "signed", "v": 1, "d": domain, "body": body,
                      "signer": identity.peer_id, "sig": identity.sign(domain, body)})


# -- protocols/wire.py ----------------------------------------------------------------------

VALID_MESSAGES = [
    wire.pack({"t": "x", "v": 1, "a": [1, 2.5, "s", b"b", None, True], "m": {"k": {"n": []}}}),
    wire.pack({"t": "assign", "v": 1, "tasks": [{"id": "t1", "input": b"\0" * 40}]}),
]


PLAIN = (type(None), bool, int, float, str, bytes)


def plain_data(value: object, depth: int = 0) -> None:
    """Raise AssertionError unless ``value`` is plain data nested at most MAX_DEPTH deep."""
    assert depth <= wire.MAX_DEPTH
    if isinstance(value, list):
        for v in value:
            plain_data(v, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            plain_data(v, depth + 1)
    else:
        assert isinstance(value, PLAIN), type(value)


def test_fuzz_wire_unpack(scenario_report) -> None:
    # ext types (0xc7-0xc9, 0xd4-0xd8), timestamps among them, spliced into valid messages
    ext = st.sampled_from([msgpack.packb(msgpack.ExtType(5, b"ab")), b"\xd6\xff\0\0\0\1",
                           b"\xc7\x0c\xff" + bytes(12), b"\xd4\x01\x00"])
    spliced = st.tuples(st.sampled_from(VALID_MESSAGES), ext, st.integers(0, 60)).map(
        lambda v: v[0][: v[2]] + v[1] + v[0][v[2]:])
    fuzz("fuzz: wire.unpack", bytes_like(*VALID_MESSAGES) | spliced,
         lambda d: plain_data(wire.unpack(d)), scenario_report, examples=1000)


def test_extension_types_are_refused_and_timestamps_are_numbers() -> None:
    with pytest.raises(MalformedMessage, match="extension type"):
        wire.unpack(wire.pack({"t": "x", "v": 1, "e": msgpack.ExtType(5, b"ab")}))
    m = wire.unpack(wire.pack({"t": "x", "v": 1, "e": msgpack.Timestamp(7, 500_000_000)}))
    assert m["e"] == 7.5


def test_fuzz_wire_unpack_small_limits(scenario_report) -> None:
    fuzz("fuzz: wire.unpack (64-byte limit)", bytes_like(*VALID_MESSAGES),
         lambda d: wire.unpack(d, max_bytes=64), scenario_report)


def feed_in_pieces(data_and_cuts: tuple[bytes, list[int]], max_frame: int = 256) -> None:
    data, cuts = data_and_cuts
    decoder = wire.FrameDecoder(max_frame)
    pos = 0
    for cut in [*sorted(cuts), len(data)]:
        for frame in decoder.feed(data[pos:cut]):
            wire.unpack(frame)
        pos = max(pos, cut)


def test_fuzz_wire_frame_decoder(scenario_report) -> None:
    stream = bytes_like(*(wire.frame(m) * 2 for m in VALID_MESSAGES))
    fuzz("fuzz: wire.FrameDecoder + unpack",
         st.tuples(stream, st.lists(st.integers(0, 600), max_size=6)), feed_in_pieces,
         scenario_report, examples=600)


def test_fuzz_wire_field_readers(scenario_report) -> None:
    readers = [wire.field_str, wire.field_int, wire.field_float, wire.field_bytes,
               wire.field_list, wire.field_map, wire.field_str_list]

    def check(m: dict[str, Any]) -> None:
        for read in readers:
            with contextlib.suppress(TeammeshError):
                read(m, "f")

    fuzz("fuzz: wire.field_*", st.fixed_dictionaries({}, optional={"f": VALUES}), check,
         scenario_report)


# -- protocols/envelope.py, identity.py -----------------------------------------------------


def test_fuzz_envelope_open_sealed(scenario_report) -> None:
    valid = seal(MEMBER, "d", {"t": "resultset", "v": 1, "results": []})
    bodies = bytes_like(*VALID_MESSAGES).map(lambda b: signed(MEMBER, "d", b))
    fuzz("fuzz: envelope.open_sealed", bytes_like(valid) | bodies,
         lambda d: open_sealed(d, "d", max_bytes=4096),
         scenario_report, examples=600)


def test_fuzz_identity_peer_ids_and_signatures(scenario_report) -> None:
    texts = (st.text(max_size=60) | st.sampled_from([MEMBER.peer_id, ROOT.peer_id]).flatmap(
        lambda p: mutated(p.encode()).map(lambda b: b.decode("latin-1"))))

    def check(args: tuple[str, bytes]) -> None:
        peer, sig = args
        is_peer_id(peer)
        verify_by_peer(peer, "d", b"body", sig)

    fuzz("fuzz: identity peer ids + verify",
         st.tuples(texts, st.binary(max_size=80) | mutated(MEMBER.sign("d", b"body"))),
         check, scenario_report)


# -- protocols/capability.py ----------------------------------------------------------------

AD = CapabilityAd(
    peer_id=MEMBER.peer_id, team_id=TEAM.team_id, addrs=("/ip4/127.0.0.1/tcp/1",), cores=4,
    slots=2, free_slots=1, memory_bytes=8 << 30, gpus=(), kinds={"hash.sha256": "1"},
    queue=0, cost=1.5, storage=("local",), software="0.1.0", seq=1, ttl_ms=15_000,
    cert=b"cert", pull=False)
AD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "peer": st.just(MEMBER.peer_id), "team": st.just(TEAM.team_id),
    "addrs": st.lists(st.text(max_size=30), max_size=3),
    "cores": INTS, "slots": INTS, "free": INTS,
    "mem": INTS, "gpu": st.lists(st.text(max_size=8), max_size=2),
    "kinds": st.dictionaries(st.text(max_size=8), st.text(max_size=4), max_size=3),
    "queue": INTS, "cost": st.floats() | INTS,
    "storage": st.lists(st.text(max_size=8), max_size=2), "sw": st.text(max_size=10),
    "seq": INTS, "ttl": INTS, "cert": st.binary(max_size=16),
    "pull": VALUES,
}


def test_fuzz_capability_ads(scenario_report) -> None:
    wire_ads = message_like("cap", AD_FIELDS)
    fuzz("fuzz: CapabilityAd.from_wire", wire_ads, CapabilityAd.from_wire, scenario_report,
         examples=800)
    sealed = (bytes_like(AD.sealed(MEMBER))
              | wire_ads.map(lambda m: signed(MEMBER, DOMAIN_CAP, wire.pack(m)))
              | bytes_like(AD.sealed(MEMBER)).map(lambda b: signed(MEMBER, DOMAIN_CAP, b)))
    fuzz("fuzz: capability.open_ad", sealed, open_ad, scenario_report, examples=800)


# -- protocols/membership.py ----------------------------------------------------------------

CERT = issue_certificate(ROOT, TEAM, MEMBER.peer_id, (ROLE_MEMBER,), NOW, DAY)
ADMIN = Identity(bytes([3]) * 32)
ADMIN_CERT = issue_certificate(ROOT, TEAM, ADMIN.peer_id, (ROLE_ADMIN,), NOW, DAY)
CHAINED = issue_certificate(ADMIN, TEAM, MEMBER.peer_id, (ROLE_MEMBER,), NOW, DAY, ADMIN_CERT)
REVOCATION = issue_revocation(ROOT, TEAM, MEMBER.peer_id, NOW)
PEER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "team": st.just(TEAM.team_id), "peer": st.just(MEMBER.peer_id),
    "roles": st.lists(st.sampled_from([ROLE_MEMBER, ROLE_ADMIN]), max_size=2),
    "issued": INTS, "expires": INTS, "at": INTS,
    "issuer": st.sampled_from([ROOT.peer_id, ADMIN.peer_id]), "epoch": INTS,
    "admin": st.just(ADMIN.peer_id),
}


def root_signed(t: str, domain: str) -> st.SearchStrategy[bytes]:
    """``{"t": t, ...}`` bodies of any field values, signed by the team root."""
    def pack(m_chain: tuple[dict[str, Any], Any]) -> bytes:
        m, chain = m_chain
        body = wire.pack(m)
        outer: dict[str, Any] = {"t": f"signed_{t}", "v": 1, "body": body,
                                 "sig": ROOT.sign(domain, body)}
        if chain is not None:
            outer["chain"] = chain
        return wire.pack(outer)
    chains = st.none() | st.just(ADMIN_CERT.packed()) | mutated(ADMIN_CERT.packed()) | VALUES
    return st.tuples(message_like(t, PEER_FIELDS), chains).map(pack)


def test_fuzz_certificates(scenario_report) -> None:
    data = (bytes_like(CERT.packed(), CHAINED.packed(), max_size=1024)
            | root_signed("cert", DOMAIN_CERT))
    fuzz("fuzz: membership.parse_certificate", data,
         lambda d: parse_certificate(d, TEAM, NOW + 1), scenario_report, examples=800)


def test_fuzz_revocations_and_epoch_notices(scenario_report) -> None:
    notice = issue_epoch_notice(ROOT, TEAM, 2, ADMIN.peer_id, NOW)
    fuzz("fuzz: membership.parse_revocation",
         bytes_like(REVOCATION.packed()) | root_signed("revoke", DOMAIN_REVOKE),
         lambda d: parse_revocation(d, TEAM, NOW + 1), scenario_report)
    fuzz("fuzz: membership.parse_epoch_notice",
         bytes_like(notice.packed()) | root_signed("epoch", DOMAIN_EPOCH),
         lambda d: parse_epoch_notice(d, TEAM, NOW + 1), scenario_report)


OTHER_ROOT = Identity(bytes([5]) * 32)
OTHER_TEAM = TeamInfo.create("other", OTHER_ROOT.public)


def test_roster_merge_skips_a_foreign_revocation_and_applies_the_rest() -> None:
    foreign = issue_revocation(OTHER_ROOT, OTHER_TEAM, MEMBER.peer_id, NOW).packed()
    expired_chain = issue_revocation(
        ADMIN, TEAM, MEMBER.peer_id, NOW,
        issue_certificate(ROOT, TEAM, ADMIN.peer_id, (ROLE_ADMIN,), NOW, 10)).packed()
    roster = Roster(TEAM)
    roster.merge([], [foreign, expired_chain, REVOCATION.packed()], NOW + 100)
    assert MEMBER.peer_id in roster.revocations


def test_fuzz_roster_merge_never_raises(scenario_report) -> None:
    """merge skips invalid entries (its contract): nothing escapes it, whatever the
    entries hold."""
    entries = st.lists(bytes_like(CERT.packed(), CHAINED.packed(), REVOCATION.packed())
                       | root_signed("cert", DOMAIN_CERT), max_size=4)

    def check(args: tuple[list[bytes], list[bytes]]) -> None:
        try:
            Roster(TEAM).merge(args[0], args[1], NOW + 1)
        except TeammeshError as exc:  # merge broke its contract
            raise AssertionError(f"Roster.merge raised {exc!r}") from exc

    fuzz("fuzz: membership.Roster.merge (no raise)", st.tuples(entries, entries), check,
         scenario_report, examples=200)


def test_the_harness_reports_a_decoder_that_crashes() -> None:
    """A property that cannot fail would prove nothing: a decoder with a crash (an
    IndexError on every input of odd length) is caught, reported as lost, and fails."""
    seen: list[tuple[str, int, int]] = []

    def report(name: str, *, tried: int, lost: int, note: str = "") -> None:
        seen.append((name, tried, lost))

    def fragile(data: bytes) -> None:
        if len(data) % 2:
            raise IndexError("crash")
        raise MalformedMessage("refused")

    with pytest.raises(IndexError):
        fuzz("fragile", bytes_like(b"\x00\x01"), fragile, report, examples=200)
    ((name, tried, lost),) = seen
    assert (name, lost) == ("fragile", 1)
    assert tried >= 1


def test_fuzz_invites_and_enroll_requests(scenario_report) -> None:
    invite = Invite(TEAM, ADMIN.peer_id, ("/ip4/127.0.0.1/tcp/1",), bytes([9]) * 32,
                    NOW + DAY).encode()
    texts = (st.text(max_size=200) | mutated(invite.encode()).map(lambda b: b.decode("latin-1"))
             | st.builds(lambda b: INVITE_PREFIX + base64.urlsafe_b64encode(b).decode(),
                         bytes_like(base64.urlsafe_b64decode(
                             invite[len(INVITE_PREFIX):] + "=" * (-len(invite) % 4)))))
    fuzz("fuzz: membership.Invite.decode", texts, Invite.decode, scenario_report)
    enroll = enroll_request(MEMBER, ADMIN.peer_id, TEAM.team_id)
    fuzz("fuzz: membership.check_enroll_request", bytes_like(enroll),
         lambda d: check_enroll_request(d, ADMIN.peer_id, TEAM.team_id), scenario_report)


# -- protocols/tasks.py ---------------------------------------------------------------------

TASK_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": st.text(max_size=70), "kind": st.text(max_size=10), "ver": st.text(max_size=4),
    "input": st.binary(max_size=32), "params": st.dictionaries(st.text(max_size=6), VALUES),
    "timeout": INTS, "prio": INTS, "cid": st.text(max_size=60),
}
RESULT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": st.text(max_size=70), "ok": st.booleans(), "output": VALUES,
    "error": st.none() | st.text(max_size=20), "digest": st.binary(min_size=32, max_size=32),
    "wall": st.floats() | INTS, "cpu": st.floats() | INTS,
}


def test_fuzz_task_messages(scenario_report) -> None:
    def spec_then_cid_refs(m: dict[str, Any]) -> None:
        spec = TaskSpec.from_wire(m)
        spec.needs_files  # noqa: B018 - reads every param: is_cid_ref on hostile values
        spec.size_hint  # noqa: B018

    fuzz("fuzz: TaskSpec.from_wire", message_like("task", TASK_FIELDS) | VALUES,
         spec_then_cid_refs, scenario_report, examples=600)

    def result_then_digest(m: dict[str, Any]) -> None:
        r = TaskResult.from_wire(m)
        r.size_hint  # noqa: B018 - packs the output: a hostile output must not crash it

    fuzz("fuzz: TaskResult.from_wire", message_like("result", RESULT_FIELDS) | VALUES,
         result_then_digest, scenario_report, examples=600)
    lists = message_like("x", {"ids": st.lists(st.text(max_size=70), max_size=4),
                               "refused": st.lists(st.lists(st.text(max_size=4), max_size=4)
                                                   | VALUES, max_size=4)})
    fuzz("fuzz: tasks.id_list / refused_list", lists,
         lambda m: (tasks.id_list(m), tasks.refused_list(m)), scenario_report)


def test_fuzz_open_results(scenario_report) -> None:
    good = tasks.make_result("t1", True, {"n": 1}, None, 1.0, 2.0)
    frame = tasks.seal_results(MEMBER, ROOT.peer_id, [good])
    (payload,) = wire.FrameDecoder().feed(frame)
    sealed = wire.unpack(payload)["sealed"]
    bodies = st.lists(message_like("result", RESULT_FIELDS) | VALUES, max_size=3).map(
        lambda rs: signed(MEMBER, tasks.DOMAIN_RESULTS, wire.pack(
            {"t": "resultset", "v": 1, "submitter": ROOT.peer_id, "executor": MEMBER.peer_id,
             "results": rs})))
    fuzz("fuzz: tasks.open_results", bytes_like(sealed) | bodies,
         lambda d: tasks.open_results(d, MEMBER.peer_id, ROOT.peer_id), scenario_report)


# -- protocols/bitswap.py -------------------------------------------------------------------

LEAF = b"leaf block"
LEAF_CID = Cid.of_block(RAW, LEAF).to_bytes()
BITSWAP_VALID = [
    bs.encode(bs.Message(wantlist=(bs.Entry(LEAF_CID, 1, False, bs.WantType.HAVE, True),),
                         full=True)),
    bs.encode(bs.Message(payload=(bs.Payload(bs.Prefix.of_cid(LEAF_CID).encode(), LEAF),),
                         presences=(bs.Presence(LEAF_CID, bs.PresenceType.HAVE),),
                         pending_bytes=5)),
]


def test_fuzz_bitswap_messages(scenario_report) -> None:
    def check(data: bytes) -> None:
        msg = bs.decode(data)
        bs.readdress(msg)
        server = bs.Server()
        server.receive("peer", msg, lambda cid: LEAF)  # serves whatever is asked
        for e in msg.wantlist:
            with contextlib.suppress(TeammeshError):
                server.block_added(e.cid, LEAF)
        manager = bs.WantManager(["peer"])
        manager.want(LEAF_CID, 0.0)
        manager.poll(0.0)
        manager.receive("peer", bs.readdress(msg)[0], msg.presences)

    fuzz("fuzz: bitswap.decode + Server/WantManager", bytes_like(*BITSWAP_VALID), check,
         scenario_report, examples=800)


def test_fuzz_bitswap_frames_and_cids(scenario_report) -> None:
    def frames(data_and_cuts: tuple[bytes, list[int]]) -> None:
        data, cuts = data_and_cuts
        decoder = bs.FrameDecoder()
        pos = 0
        for cut in [*sorted(cuts), len(data)]:
            for raw in decoder.feed(data[pos:cut]):
                bs.decode(raw)
            pos = max(pos, cut)

    stream = bytes_like(*(bs.frame(bs.decode(m)) for m in BITSWAP_VALID))
    fuzz("fuzz: bitswap.FrameDecoder", st.tuples(stream, st.lists(st.integers(0, 600),
                                                                   max_size=4)),
         frames, scenario_report)

    def cid_bytes(data: bytes) -> None:
        bs.multihash_of(data)
        bs.Prefix.of_cid(data)
        bs.Prefix.decode(data).cid_of(LEAF)

    fuzz("fuzz: bitswap CIDs and prefixes",
         bytes_like(LEAF_CID, Cid.of_block(DAG_PB, b"x", 0).to_bytes(),
                    bs.Prefix.of_cid(LEAF_CID).encode(), max_size=64),
         cid_bytes, scenario_report)


# -- storage: CIDs, dag-pb, UnixFS ----------------------------------------------------------

SMALL = FileImporter(chunk_size=4, max_links=3)
SMALL.feed(b"0123456789abcdefghij")
SMALL_ROOT, SMALL_BLOCKS = SMALL.finish()
SMALL_STORE = dict(SMALL_BLOCKS)
SMALL_NODES = [b for c, b in SMALL_BLOCKS if c.codec == DAG_PB]


def test_fuzz_cids(scenario_report) -> None:
    v1 = str(SMALL_ROOT)
    v0 = str(Cid.of_block(DAG_PB, SMALL_NODES[0], 0))
    texts = (st.text(max_size=80)
             | st.sampled_from([v1, v0, "z" + v1[1:], "f" + SMALL_ROOT.to_bytes().hex()])
             .flatmap(lambda t: mutated(t.encode())).map(lambda b: b.decode("latin-1")))
    fuzz("fuzz: Cid.parse", texts, Cid.parse, scenario_report, examples=600)

    def from_bytes(data: bytes) -> None:
        cid = Cid.from_bytes(data)
        str(cid)
        cid.to_v1()
        cid.verify(b"x")
        storage_varint(data, 0)

    fuzz("fuzz: Cid.from_bytes", bytes_like(SMALL_ROOT.to_bytes(), LEAF_CID, max_size=80),
         from_bytes, scenario_report, examples=600)


def test_fuzz_dagpb_and_unixfs(scenario_report) -> None:
    def node(data: bytes) -> None:
        decoded = decode_node(data)
        if decoded.data is not None:
            decode_unixfs(decoded.data)
        cid = Cid.of_block(DAG_PB, data)
        links_of(cid, data)
        claimed_size(cid, data)

    fuzz("fuzz: dag-pb decode_node + UnixFS", bytes_like(*SMALL_NODES), node,
         scenario_report, examples=800)
    unixfs = [decode_node(n).data or b"" for n in SMALL_NODES]
    fuzz("fuzz: UnixFS decode_unixfs", bytes_like(*unixfs), decode_unixfs, scenario_report)


def test_fuzz_file_export_of_a_damaged_root(scenario_report) -> None:
    def get(cid: Cid) -> bytes:
        try:
            return SMALL_STORE[cid]
        except KeyError:
            raise BlockNotFound(f"{cid} is not stored") from None

    def export(root_block: bytes) -> None:
        root = Cid.of_block(DAG_PB, root_block)
        blocks = {**SMALL_STORE, root: root_block}
        out = b"".join(FileExporter(root, lambda c: blocks.get(c) or get(c),
                                    max_size=1 << 20))
        assert len(out) <= 1 << 20

    fuzz("fuzz: UnixFS export of a damaged root", bytes_like(SMALL_STORE[SMALL_ROOT]),
         export, scenario_report, examples=600)
