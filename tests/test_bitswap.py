"""Bitswap: the pure codec and state machines, then real hosts and Helia on loopback.

Pure section: protobuf round trips (checked against py-libp2p's generated protobuf
classes), fuzzed decoding, CID prefixes, the server ledger and the want manager, and a
whole DAG moved between a Server and a WantManager with no I/O.

Integration section: py-libp2p hosts running BitswapService inside one trio.run, and
Helia (tests/helia/peer.mjs, installed by scripts/setup-helia) as a subprocess speaking
JSON lines. Throughput figures are printed; TEAMMESH_BITSWAP_BENCH_MIB sets their size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from teammesh.node.files.bitswap import BitswapConfig, BitswapService, BlockNotFound
from teammesh.node.p2p.host import MeshHost, open_host
from teammesh.protocols import bitswap as bs
from teammesh.protocols.errors import FrameTooLarge, RemoteProtocolError
from teammesh.protocols.wire import encode_varint
from teammesh.storage.cid import DAG_PB, RAW, Cid
from teammesh.storage.unixfs import FileImporter, cid_of_bytes, export_file, links_of

MiB = 1024 * 1024


def import_bytes(data: bytes, **kw: Any) -> tuple[Cid, dict[Cid, bytes]]:
    imp = FileImporter(**kw)
    blocks = dict(imp.feed(data))
    root, rest = imp.finish()
    blocks.update(rest)
    return root, blocks


# ===================================================================== pure: the codec ====


def sample_message() -> bs.Message:
    cid1 = Cid.of_block(RAW, b"one").to_bytes()
    cid0 = Cid.of_block(DAG_PB, b"zero", 0).to_bytes()
    return bs.Message(
        wantlist=(bs.Entry(cid1, 7, False, bs.WantType.HAVE, True),
                  bs.Entry(cid0, -3, True, bs.WantType.BLOCK, False)),
        full=True,
        blocks=(b"legacy",),
        payload=(bs.Payload(bs.Prefix.of_cid(cid1).encode(), b"one"),),
        presences=(bs.Presence(cid1, bs.PresenceType.HAVE),
                   bs.Presence(cid0, bs.PresenceType.DONT_HAVE)),
        pending_bytes=12345,
    )


def test_round_trip_and_agrees_with_generated_protobuf() -> None:
    pb = pytest.importorskip("libp2p.bitswap.pb.bitswap_pb2")
    msg = sample_message()
    raw = bs.encode(msg)
    assert bs.decode(raw) == msg
    theirs = pb.Message.FromString(raw)
    assert theirs.wantlist.full is True
    assert [e.priority for e in theirs.wantlist.entries] == [7, -3]
    assert theirs.wantlist.entries[0].wantType == 1
    assert theirs.wantlist.entries[0].sendDontHave
    assert theirs.wantlist.entries[1].cancel
    assert theirs.payload[0].data == b"one"
    assert theirs.pendingBytes == 12345
    assert [p.type for p in theirs.blockPresences] == [0, 1]
    # and the other way: their encoding decodes to the same message
    assert bs.decode(theirs.SerializeToString()) == msg


def test_empty_message_is_empty_bytes() -> None:
    assert bs.encode(bs.Message()) == b""
    assert bs.decode(b"") == bs.Message()


def test_unknown_fields_are_skipped() -> None:
    raw = bs.encode(sample_message())
    extra = bytes([9 << 3 | 0, 5, 10 << 3 | 2, 2, 0xAA, 0xBB, 11 << 3 | 5, 1, 2, 3, 4])
    assert bs.decode(extra + raw + extra) == sample_message()


@pytest.mark.parametrize("data", [
    b"\x0a",  # field 1, length missing
    b"\x0a\x05\x01",  # length past the end
    b"\x0b",  # wire type 3 (group)
    b"\x08\x01",  # wantlist as a varint
    b"\x0a\x02\x0a\x00",  # entry without a CID
    b"\x22\x04\x0a\x02\x12\x20\x10\x07",  # presence... with an unknown type
    b"\xff" * 11,  # over-long varint
])
def test_malformed_messages_raise_remote_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        bs.decode(data)


def test_frame_limits() -> None:
    msg = sample_message()
    dec = bs.FrameDecoder()
    framed = bs.frame(msg)
    assert [bs.decode(f) for f in dec.feed(framed[:3]) + dec.feed(framed[3:])] == [msg]
    with pytest.raises(FrameTooLarge):
        bs.FrameDecoder().feed(encode_varint(bs.MAX_MESSAGE_BYTES + 1) + b"x")
    assert bs.FrameDecoder().feed(encode_varint(bs.MAX_MESSAGE_BYTES)) == []
    with pytest.raises(FrameTooLarge):
        bs.decode(bytes(bs.MAX_MESSAGE_BYTES + 1))


cids = st.builds(lambda b, raw: Cid.of_block(RAW if raw else DAG_PB, b, 1 if raw else 0).to_bytes(),
                 st.binary(max_size=8), st.booleans())
entries = st.builds(bs.Entry, cids, st.integers(-(2**31), 2**31 - 1), st.booleans(),
                    st.sampled_from(bs.WantType), st.booleans())
messages = st.builds(
    bs.Message,
    st.lists(entries, max_size=5).map(tuple), st.booleans(),
    st.lists(st.binary(max_size=40), max_size=3).map(tuple),
    st.lists(st.builds(bs.Payload, st.binary(max_size=8), st.binary(max_size=40)),
             max_size=3).map(tuple),
    st.lists(st.builds(bs.Presence, cids, st.sampled_from(bs.PresenceType)),
             max_size=3).map(tuple),
    st.integers(-(2**31), 2**31 - 1),
)


@given(messages)
@settings(max_examples=300, deadline=None)
def test_round_trip_property(msg: bs.Message) -> None:
    assert bs.decode(bs.encode(msg)) == msg


@given(st.binary(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_fuzzed_decode_raises_only_remote_errors(data: bytes) -> None:
    try:
        msg = bs.decode(data)
        bs.readdress(msg)
    except RemoteProtocolError:
        pass
    try:
        bs.FrameDecoder(64).feed(data)
    except RemoteProtocolError:
        pass


@given(messages, st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_messages_raise_only_remote_errors(msg: bs.Message, data: st.DataObject) -> None:
    raw = bytearray(bs.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        bs.readdress(bs.decode(bytes(raw)))
    except RemoteProtocolError:
        pass


# ===================================================================== pure: CIDs =========


def test_prefix_rebuilds_cids() -> None:
    for cid in (Cid.of_block(RAW, b"leaf"), Cid.of_block(DAG_PB, b"node", 0),
                Cid.of_block(DAG_PB, b"node", 1)):
        data = b"leaf" if cid.codec == RAW else b"node"
        prefix = bs.Prefix.of_cid(cid.to_bytes())
        assert bs.Prefix.decode(prefix.encode()) == prefix
        assert prefix.cid_of(data) == cid.to_bytes()
    v0 = bs.Prefix.of_cid(Cid.of_block(DAG_PB, b"x", 0).to_bytes())
    assert v0.encode() == b"\x00\x70\x12\x20"


def test_readdress_detects_corruption_and_bad_prefixes() -> None:
    cid = Cid.of_block(RAW, b"good")
    prefix = bs.Prefix.of_cid(cid.to_bytes()).encode()
    msg = bs.Message(payload=(bs.Payload(prefix, b"good"), bs.Payload(prefix, b"evil"),
                              bs.Payload(b"\x05\x55\x12\x20", b"x"),  # version 5
                              bs.Payload(b"\x01\x55\x99\x01\x20", b"x")))  # unknown hash
    blocks, unusable = bs.readdress(msg)
    assert blocks[0] == (cid.to_bytes(), b"good")
    assert blocks[1][0] != cid.to_bytes()  # corrupted: a CID nobody wants
    assert unusable == 2


def test_v0_and_v1_wants_share_a_multihash() -> None:
    v0 = Cid.of_block(DAG_PB, b"n", 0)
    assert bs.multihash_of(v0.to_bytes()) == bs.multihash_of(v0.to_v1().to_bytes())


# ===================================================================== pure: server =======


def store_of(*blocks: bytes) -> tuple[list[bytes], Callable[[bytes], bytes | None]]:
    cids = [Cid.of_block(RAW, b).to_bytes() for b in blocks]
    table = dict(zip(cids, blocks, strict=True))
    return cids, table.get


def test_server_rules() -> None:
    small, big = b"s" * 100, b"b" * 5000
    (c_small, c_big), lookup = store_of(small, big)
    c_missing = Cid.of_block(RAW, b"missing").to_bytes()
    server = bs.Server()
    want = bs.Message(wantlist=(
        bs.Entry(c_small, want_type=bs.WantType.HAVE),  # small: the block itself
        bs.Entry(c_big, want_type=bs.WantType.HAVE),  # big: HAVE
        bs.Entry(c_missing, want_type=bs.WantType.BLOCK, send_dont_have=False),
    ))
    [reply] = server.receive("p", want, lookup)
    assert reply.payload == (bs.Payload(bs.Prefix.of_cid(c_small).encode(), small),)
    assert reply.presences == (bs.Presence(c_big, bs.PresenceType.HAVE),)
    assert server.wants_of("p") == [c_missing]  # unserved want stays; no DONT_HAVE unasked
    [reply] = server.receive("p", bs.Message(wantlist=(
        bs.Entry(c_big), bs.Entry(c_missing, send_dont_have=True))), lookup)
    assert [p.data for p in reply.payload] == [big]
    assert reply.presences == (bs.Presence(c_missing, bs.PresenceType.DONT_HAVE),)
    # the block arrives later: served from the ledger, then forgotten
    [(peer, late)] = server.block_added(c_missing, b"missing")
    assert peer == "p"
    assert late.payload[0].data == b"missing"
    assert server.wants_of("p") == []
    # cancel and full
    server.receive("p", bs.Message(wantlist=(bs.Entry(c_missing),)), lambda c: None)
    server.receive("p", bs.Message(wantlist=(bs.Entry(c_missing, cancel=True),)), lookup)
    assert server.wants_of("p") == []
    server.receive("p", bs.Message(wantlist=(bs.Entry(c_missing),)), lambda c: None)
    server.receive("p", bs.Message(full=True), lambda c: None)
    assert server.wants_of("p") == []


def test_server_splits_replies_with_pending_bytes() -> None:
    blocks = [os.urandom(bs.MESSAGE_TARGET_BYTES // 3) for _ in range(7)]
    cids, lookup = store_of(*blocks)
    replies = bs.Server().receive("p", bs.Message(wantlist=tuple(bs.Entry(c) for c in cids)),
                                  lookup)
    assert len(replies) == 4
    assert [p.data for r in replies for p in r.payload] == blocks
    assert all(len(bs.frame(r)) <= bs.MAX_MESSAGE_BYTES for r in replies)
    sizes = [sum(len(p.data) for p in r.payload) for r in replies]
    assert [r.pending_bytes for r in replies] == [sum(sizes[i + 1:]) for i in range(4)]


# ===================================================================== pure: client =======


def sends(effects: list[bs.Effect]) -> dict[str, list[bs.Entry]]:
    out: dict[str, list[bs.Entry]] = {}
    for e in effects:
        if isinstance(e, bs.Send):
            out.setdefault(e.peer, []).extend(e.message.wantlist)
    return out


def test_want_manager_spreads_and_limits() -> None:
    m = bs.WantManager(["a", "b"], max_in_flight=4, refill_below=3)  # refill on every block
    cids, _ = store_of(*[bytes([i]) for i in range(10)])
    for c in cids:
        m.want(c, 0.0)
    out = sends(m.poll(0.0))
    assert {p: len(es) for p, es in out.items()} == {"a": 2, "b": 2}
    assert all(e.send_dont_have and e.want_type == bs.WantType.BLOCK for e in out["a"])
    assert m.poll(0.0) == []  # full
    first = out["a"][0].cid
    [got] = m.receive("a", [(first, b"\x00")])
    assert isinstance(got, bs.Received)
    assert got.cid == first
    refill = [e for es in sends(m.poll(0.0)).values() for e in es]
    assert [e.cid for e in refill if e.cancel] == [first]  # a sent it: cancelled there
    assert sum(not e.cancel for e in refill) == 1


def test_want_manager_refills_a_peer_in_batches_and_cancels_what_it_sent() -> None:
    """Helia answers every wantlist message with every block still in its ledger, and
    drops served entries only after the whole reply is written: topping the window up
    block by block made it send each block many times over. A peer is topped up once
    its outstanding wants fall to ``refill_below``, and that message cancels the blocks
    it sent since, so nothing it already sent is sent again."""
    m = bs.WantManager(["a"], max_in_flight=6, refill_below=2)
    cids, _ = store_of(*[bytes([i]) for i in range(20)])
    for c in cids:
        m.want(c, 0.0)
    first = sends(m.poll(0.0))["a"]
    assert [e.cid for e in first] == cids[:6]
    for n, c in enumerate(cids[:4]):
        [got] = m.receive("a", [(c, bytes([n]))])
        assert isinstance(got, bs.Received)
        if n < 3:  # still 3+ outstanding: no message, and no busy loop waiting for one
            assert m.poll(1.0) == []
            assert m.next_deadline(1.0) > 1.0
    second = sends(m.poll(1.0))["a"]
    assert [e.cid for e in second if not e.cancel] == cids[6:10]  # back to 6 in flight
    assert [e.cid for e in second if e.cancel] == cids[:4]
    assert m.in_flight == 6
    # cancels of delivered blocks wait for the next wantlist, never go out alone
    m.receive("a", [(cids[4], b"\x04")])
    assert m.poll(2.0) == []


def test_want_manager_moves_wants_on_dont_have_timeout_and_bad_block() -> None:
    m = bs.WantManager(["a", "b", "c"], want_timeout_s=5.0, give_up_s=60.0)
    (c1,), _ = store_of(b"x")
    m.want(c1, 0.0)
    assert list(sends(m.poll(0.0))) == ["a"]
    m.receive("a", [], [bs.Presence(c1, bs.PresenceType.DONT_HAVE)])
    assert list(sends(m.poll(1.0))) == ["b"]
    assert m.next_deadline(1.0) == 6.0
    assert list(sends(m.poll(6.0))) == ["c"]  # b timed out
    m.bad_block("c")
    assert m.bad_blocks == {"c": 1}
    # every peer refused: a pause, then another round
    assert sends(m.poll(6.0)) == {}
    assert list(sends(m.poll(6.0 + m.retry_backoff_s))) == ["a"]
    # the block arrives from b after all: a gets a cancel
    [got] = m.receive("b", [(c1, b"x")])
    assert isinstance(got, bs.Received)
    assert m.done
    [cancel] = sends(m.poll(7.0))["a"]
    assert cancel.cancel
    assert cancel.cid == c1


def test_wants_waiting_for_a_full_window_do_not_spin_the_fetch() -> None:
    """b has refused every pending want and a's window is full: nothing can be sent
    until a block or a refusal arrives, so the next deadline is not 'now' (a fetch loop
    polled at once, over and over, and never read its inbox)."""
    m = bs.WantManager(["a", "b"], max_in_flight=8, refill_below=1, want_timeout_s=5.0)
    cids, _ = store_of(*[bytes([i]) for i in range(12)])
    for c in cids:
        m.want(c, 0.0)
    first = sends(m.poll(0.0))
    for e in first["b"]:
        m.receive("b", [], [bs.Presence(e.cid, bs.PresenceType.DONT_HAVE)], now=0.1)
    for t in (0.2, 0.3):  # b is asked for the rest, and refuses them too
        for e in sends(m.poll(t)).get("b", []):
            m.receive("b", [], [bs.Presence(e.cid, bs.PresenceType.DONT_HAVE)], now=t)
    assert m.poll(0.4) == []
    assert m.next_deadline(0.4) > 0.4
    # a block from a: one more look (a's window is still over refill_below), then quiet
    m.receive("a", [(first["a"][0].cid, b"")], now=0.5)
    assert m.next_deadline(0.5) == 0.5
    assert m.poll(0.5) == []
    assert m.next_deadline(0.5) > 0.5


def test_a_peer_still_sending_is_not_timed_out() -> None:
    """A window of wants is served in order: the last of 100 may wait longer than
    want_timeout_s behind the others while the peer sends steadily. Only a silent peer's
    wants time out."""
    m = bs.WantManager(["a", "b"], max_in_flight=4, refill_below=3, want_timeout_s=5.0)
    cids, _ = store_of(*[bytes([i]) for i in range(6)])
    for c in cids:
        m.want(c, 0.0)
    out = sends(m.poll(0.0))
    at_a = [e.cid for e in out["a"]]
    at_b = [e.cid for e in out["b"]]
    m.receive("a", [(at_a[0], b"")], now=4.0)  # a is heard from at 4 s, b never
    resent = sends(m.poll(6.0))
    assert set(at_b) <= {e.cid for e in resent["a"] if not e.cancel}  # b's went to a
    assert at_a[1] not in [e.cid for es in resent.values() for e in es]  # a's stayed
    assert m.next_deadline(6.0) == 9.0  # 5 s after a was last heard from


def test_give_up_counts_from_the_first_asking_not_the_queueing() -> None:
    m = bs.WantManager(["a"], max_in_flight=1, refill_below=0, want_timeout_s=100.0,
                       give_up_s=8.0)
    (c1, c2), _ = store_of(b"1", b"2")
    m.want(c1, 0.0)
    m.want(c2, 0.0)  # waits behind c1 for 25 s
    assert [e.cid for e in sends(m.poll(0.0))["a"]] == [c1]
    m.receive("a", [(c1, b"1")], now=25.0)
    assert [e.cid for e in sends(m.poll(25.0))["a"] if not e.cancel] == [c2]
    m.receive("a", [], [bs.Presence(c2, bs.PresenceType.DONT_HAVE)], now=26.0)
    assert not [e for e in m.poll(26.0) if isinstance(e, bs.Failed)]  # 1 s, not 26 s
    failed: list[bs.Failed] = []
    for t in range(27, 40):  # a keeps saying no: given up 8 s after the first asking
        for e in m.poll(float(t)):
            if isinstance(e, bs.Failed):
                failed.append(e)
            else:
                m.receive("a", [], [bs.Presence(c2, bs.PresenceType.DONT_HAVE)], now=t)
        if failed:
            assert t >= 25 + 8  # not 8 s after the queueing
            break
    assert [f.cid for f in failed] == [c2]


def test_want_manager_gives_up_with_reasons() -> None:
    m = bs.WantManager(["a"], give_up_s=2.0, retry_backoff_s=0.5)
    (c1,), _ = store_of(b"x")
    m.want(c1, 0.0)
    t = 0.0
    failed: list[bs.Failed] = []
    for _ in range(20):
        for e in m.poll(t):
            if isinstance(e, bs.Send):
                m.receive("a", [], [bs.Presence(c1, bs.PresenceType.DONT_HAVE)])
            elif isinstance(e, bs.Failed):
                failed.append(e)
        t += 0.5
    assert len(failed) == 1
    assert "a: DONT_HAVE" in failed[0].reason
    assert m.done


def test_send_failed_goes_elsewhere() -> None:
    m = bs.WantManager(["a", "b"])
    (c1,), _ = store_of(b"x")
    m.want(c1, 0.0)
    [send] = m.poll(0.0)
    assert isinstance(send, bs.Send)
    m.send_failed(send.peer, send.message)
    assert list(sends(m.poll(0.0))) == [{"a": "b", "b": "a"}[send.peer]]


def test_machine_pair_moves_a_dag_and_survives_a_liar() -> None:
    """Server and WantManager back to back, through the codec: a 3-level DAG arrives whole
    although one of the two servers corrupts a leaf."""
    data = os.urandom(3 * 174 * 1024 + 77)
    root, blocks = import_bytes(data, chunk_size=1024)
    honest = {c.to_bytes(): b for c, b in blocks.items()}
    leaf = next(c for c in blocks if c.codec == RAW)
    liar = dict(honest)
    liar[leaf.to_bytes()] = b"corrupt"
    servers = {"honest": (bs.Server(), honest.get), "liar": (bs.Server(), liar.get)}
    m = bs.WantManager(["liar", "honest"], max_in_flight=64)
    m.want(root.to_bytes(), 0.0)
    got: dict[bytes, bytes] = {}
    for step in range(10_000):
        effects = m.poll(float(step))
        if m.done:
            break
        for e in effects:
            assert isinstance(e, bs.Send)
            server, lookup = servers[e.peer]
            request = bs.decode(bs.encode(e.message))
            for reply in server.receive("client", request, lookup):
                blocks_in, _ = bs.readdress(bs.decode(bs.encode(reply)))
                if any(not m.wants(bs.multihash_of(c)) for c, _ in blocks_in):
                    m.bad_block(e.peer)
                for r in m.receive(e.peer, blocks_in, reply.presences):
                    assert isinstance(r, bs.Received)
                    got[r.cid] = r.data
                    cid = Cid.from_bytes(r.cid)
                    for child in links_of(cid, r.data):
                        m.want(child.to_bytes(), float(step))
    assert m.done
    assert b"".join(export_file(root, lambda c: got[c.to_bytes()])) == data
    assert m.bad_blocks == {"liar": 1}


# ===================================================================== integration ========

HELIA_DIR = Path(__file__).parent / "helia"
HAVE_HELIA = (HELIA_DIR / "node_modules" / "@helia" / "utils").is_dir() and bool(
    shutil.which("node"))
needs_helia = pytest.mark.skipif(
    not HAVE_HELIA, reason="Helia is not installed: run scripts/setup-helia (needs node/npm)")
BENCH_MIB = int(os.environ.get("TEAMMESH_BITSWAP_BENCH_MIB", "64"))
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def allow_peer(peer: str) -> bool:
    return True


def allow_stream(peer: str, protocol: str) -> bool:
    return True


@dataclass
class Node:
    host: MeshHost
    svc: BitswapService
    store: dict[Cid, bytes]


@asynccontextmanager
async def open_node(store: dict[Cid, bytes] | None = None, *,
                    get: Callable[[Cid], bytes | None] | None = None,
                    peer_gate: Callable[[str], bool] = allow_peer,
                    stream_gate: Callable[[str, str], bool] = allow_stream,
                    config: BitswapConfig | None = None) -> AsyncIterator[Node]:
    blocks: dict[Cid, bytes] = {} if store is None else store
    async with open_host(os.urandom(32), [LOOPBACK], peer_gate=peer_gate,
                         stream_gate=stream_gate, gossip=False) as host, \
            trio.open_nursery() as nursery:
        svc = BitswapService(host, get or blocks.get, blocks.__setitem__, config)
        await nursery.start(svc.run)
        yield Node(host, svc, blocks)
        nursery.cancel_scope.cancel()


class Helia:
    """tests/helia/peer.mjs in a subprocess, driven by JSON lines."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""
        self._id = 0
        self.peer_id = ""
        self.addr = ""

    async def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for _ in range(100_000):
            if b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                return dict(json.loads(line))
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                raise AssertionError("the Helia process exited")
            self._buf += chunk
        raise AssertionError("no line from Helia")

    async def call(self, cmd: str, limit_s: float = 60, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self._id += 1
        await self.proc.stdin.send_all(
            json.dumps({"id": self._id, "cmd": cmd, **args}).encode() + b"\n")
        with trio.fail_after(limit_s):
            for _ in range(1000):
                reply = await self.line()
                if reply.get("id") == self._id:
                    break
        if "error" in reply:
            raise AssertionError(f"Helia {cmd} failed: {reply['error']}")
        return reply


@asynccontextmanager
async def open_helia() -> AsyncIterator[Helia]:
    proc = await trio.lowlevel.open_process(
        ["node", str(HELIA_DIR / "peer.mjs")], cwd=str(HELIA_DIR),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    helia = Helia(proc)
    try:
        with trio.fail_after(30):
            ready = await helia.line()
        helia.peer_id, helia.addr = ready["peer_id"], ready["addrs"][0]
        yield helia
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                try:
                    await helia.call("stop", limit_s=5)
                except (AssertionError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await proc.wait()
            if proc.returncode is None:
                proc.kill()  # only the process this fixture started
                await proc.wait()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def report(capsys: pytest.CaptureFixture[str], what: str, mib: float, seconds: float) -> None:
    with capsys.disabled():
        print(f"\n[bitswap throughput] {what}: {mib:.0f} MiB in {seconds:.2f} s ="
              f" {mib / seconds:.1f} MiB/s")


async def py_fetch(node: Node, root: Cid, peers: list[str]) -> tuple[bytes, float]:
    got: dict[Cid, bytes] = {}
    t0 = trio.current_time()
    with trio.fail_after(120):
        await node.svc.fetch(root, peers, got.__setitem__)
    elapsed = trio.current_time() - t0
    return b"".join(export_file(root, got.__getitem__)), elapsed


async def test_membership_gates_admit_bitswap_peers_only(tmp_path: Path) -> None:
    from teammesh.node.core.config import Home
    from teammesh.node.core.journal import Journal
    from teammesh.node.p2p.membership import Membership
    from teammesh.node.p2p.protocol_ids import ROSTER_SYNC, TASKS
    from teammesh.protocols.identity import Identity

    journal = Journal(tmp_path / "journal.db")
    try:
        m = Membership(Home(tmp_path), journal, Identity(bytes(32)), bitswap_peers={"friend"})
        assert m.peer_gate("friend")
        assert not m.peer_gate("stranger")
        assert m.stream_gate("friend", bs.BITSWAP_120)
        assert m.stream_gate("friend", bs.BITSWAP_100)
        assert not m.stream_gate("friend", TASKS)
        assert not m.stream_gate("friend", ROSTER_SYNC)
        assert not m.stream_gate("friend", "/meshsub")
        assert not m.stream_gate("stranger", bs.BITSWAP_120)
        m.bitswap_public = True
        assert m.peer_gate("stranger")
        assert m.stream_gate("stranger", bs.BITSWAP_120)
        assert not m.stream_gate("stranger", TASKS)
        default = Membership(Home(tmp_path), journal, Identity(bytes(32)))
        assert not default.peer_gate("friend")
        assert not default.stream_gate("friend", bs.BITSWAP_120)

        # and for real: a server gated by Membership serves a listed outside peer
        root, blocks = import_bytes(os.urandom(3 * MiB))
        async with open_node() as client:
            m.bitswap_public = False
            m.bitswap_peers = {client.host.peer_id}
            async with open_node(blocks, peer_gate=m.peer_gate, stream_gate=m.stream_gate) as srv:
                await client.host.connect(srv.host.addrs[0])
                data, _ = await py_fetch(client, root, [srv.host.peer_id])
                assert cid_of_bytes(data) == root
    finally:
        journal.close()


async def test_missing_block_raises_block_not_found() -> None:
    cfg = BitswapConfig(give_up_s=1.0, want_timeout_s=0.5)
    async with open_node() as srv, open_node(config=cfg) as client:
        await client.host.connect(srv.host.addrs[0])
        with trio.fail_after(20), pytest.raises(BlockNotFound, match="DONT_HAVE"):
            await client.svc.fetch(Cid.of_block(RAW, b"nobody has this"), [srv.host.peer_id],
                                   lambda c, b: None)


async def test_a_peer_that_stops_reading_holds_bounded_memory_and_blocks_no_one() -> None:
    """Replies go through a per-peer outbox: a peer that asks for 24 MiB and never reads
    our stream fills its yamux window and then its outbox, and no more; another peer is
    served meanwhile."""
    from teammesh.node.files.bitswap import OUTBOX_BYTES

    data = os.urandom(24 * MiB)
    root, blocks = import_bytes(data)

    async def never_read(stream: Any) -> None:
        await trio.sleep_forever()

    async with open_node(blocks) as srv, open_node() as client:
        async with open_node() as staller:
            staller.host.set_handler(bs.BITSWAP_120, never_read)
            await staller.host.connect(srv.host.addrs[0])
            wants = tuple(bs.Entry(c.to_bytes(), want_type=bs.WantType.BLOCK) for c in blocks)
            stream = await staller.host.open_stream(srv.host.peer_id, bs.BITSWAP_120)
            await stream.write(bs.frame(bs.Message(wantlist=wants)))
            peer = staller.host.peer_id
            for _ in range(600):  # 30 s
                box = srv.svc._outboxes.get(peer)
                if box is not None and box.nbytes > OUTBOX_BYTES:
                    break
                await trio.sleep(0.05)
            else:
                raise AssertionError("the outbox of a peer that does not read never filled")
            # the staller holds the server's replies; a second peer is still served
            await client.host.connect(srv.host.addrs[0])
            got, _ = await py_fetch(client, root, [srv.host.peer_id])
            assert sha(got) == sha(data)
            box = srv.svc._outboxes[peer]
            assert box.nbytes <= OUTBOX_BYTES + bs.MESSAGE_TARGET_BYTES + MiB
            await stream.close()


async def test_py_to_py_64mib_and_a_corrupting_peer(capsys: pytest.CaptureFixture[str]) -> None:
    data = os.urandom(BENCH_MIB * MiB)
    root, blocks = import_bytes(data)
    # The root: the first want goes to the first peer listed, so the liar is surely asked.
    bad_cid = root

    def corrupt_get(cid: Cid) -> bytes | None:
        b = blocks.get(cid)
        return b"\x00" + b[1:] if cid == bad_cid and b is not None else b

    async with open_node(blocks) as honest, open_node(get=corrupt_get) as liar, \
            open_node() as client:
        for n in (honest, liar):
            await client.host.connect(n.host.addrs[0])
        got, seconds = await py_fetch(client, root, [honest.host.peer_id])
        assert sha(got) == sha(data)
        report(capsys, "py -> py", BENCH_MIB, seconds)
        got, seconds = await py_fetch(client, root, [liar.host.peer_id, honest.host.peer_id])
        assert sha(got) == sha(data)
        assert client.svc.bad_blocks[liar.host.peer_id] >= 1
        assert client.svc.bad_blocks[honest.host.peer_id] == 0
        report(capsys, "py + corrupting py -> py", BENCH_MIB, seconds)


@needs_helia
@pytest.mark.parametrize("size", [1024, 5 * MiB, 50 * MiB])
async def test_helia_fetches_from_py(size: int, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = os.urandom(size)
    root, blocks = import_bytes(data)
    async with open_node(blocks) as srv, open_helia() as helia:
        await helia.call("connect", addr=srv.host.addrs[0])
        out = tmp_path / "out"
        r = await helia.call("cat", cid=str(root), out=str(out), timeout_ms=60_000, limit_s=90)
        assert r["bytes"] == size
        assert sha(out.read_bytes()) == sha(data)
        if size >= 50 * MiB:
            report(capsys, "py -> Helia", size / MiB, r["ms"] / 1000)
        src = tmp_path / "src"
        src.write_bytes(data)
        added = await helia.call("add", path=str(src), kubo=True)
        assert Cid.parse(added["cid"]) == root  # Helia names the file as we do


@needs_helia
@pytest.mark.parametrize("kubo", [True, False], ids=["kubo-layout", "helia-default-layout"])
async def test_py_fetches_from_helia(kubo: bool, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    size = BENCH_MIB * MiB if not kubo else 8 * MiB + 12345
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    async with open_node() as client, open_helia() as helia:
        added = await helia.call("add", path=str(src), kubo=kubo)
        root = Cid.parse(added["cid"])
        await client.host.connect(helia.addr)
        got, seconds = await py_fetch(client, root, [helia.peer_id])
        assert sha(got) == sha(data)
        if kubo:
            assert root == cid_of_bytes(data)
        else:
            report(capsys, "Helia -> py", size / MiB, seconds)


@needs_helia
async def test_helia_to_helia(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = os.urandom(BENCH_MIB * MiB)
    src = tmp_path / "src"
    src.write_bytes(data)
    async with open_helia() as a, open_helia() as b:
        added = await a.call("add", path=str(src), kubo=True)
        await b.call("connect", addr=a.addr)
        out = tmp_path / "out"
        r = await b.call("cat", cid=added["cid"], out=str(out), timeout_ms=60_000, limit_s=90)
        assert sha(out.read_bytes()) == sha(data)
        report(capsys, "Helia -> Helia", BENCH_MIB, r["ms"] / 1000)
