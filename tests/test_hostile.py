"""Hostile peers against real daemons: strangers, malformed frames, reconnect storms.

One 3-node team is shared by the module (starting daemons is the slow part). A fourth home
is enrolled but never started: its identity is the "member gone bad" that an in-process
host (``open_host`` with its seed) uses to reach places a stranger cannot.

Each test ends by checking that every daemon is alive and the team still meshes, so a test
that breaks a daemon fails itself, not the next one.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from libp2p.pubsub.pb import rpc_pb2
from meshtools import Daemon, init_home, mesh, run_cli, wait_for_full_mesh, wait_until
from teammesh.node.p2p.host import STREAM_ERRORS, DialError, MeshHost, Stream, open_host
from teammesh.node.p2p.protocol_ids import ADS_SYNC, PING, ROSTER_SYNC, caps_topic
from teammesh.protocols import wire
from teammesh.protocols.capability import open_ad

pytestmark = pytest.mark.hostile

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
MESHSUB = ("/meshsub/1.1.0", "/meshsub/1.0.0")
STORM_CYCLES = 500
STORM_BUDGET_S = 120.0


@dataclass
class Team:
    tmp: Path
    nodes: list[Daemon]
    member_seed: bytes  # an enrolled member without a daemon of its own
    team_id: str


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    tmp = tmp_path_factory.mktemp("hostile")
    with mesh(tmp, 3) as nodes:
        member = init_home(tmp / "member")
        run_cli(member, "join", run_cli(nodes[0].home, "team", "invite").stdout.strip())
        wait_for_full_mesh(nodes, timeout=15)
        team_id = nodes[0].cli("status")["team"]["id"]
        yield Team(tmp, nodes, (member / "identity.key").read_bytes(), team_id)


def tcp_port(d: Daemon) -> int:
    parts = d.addr.split("/")
    return int(parts[parts.index("tcp") + 1])


def assert_team_healthy(t: Team) -> None:
    for d in t.nodes:
        assert d.alive(), f"daemon {d.home.name} died:\n{d.log.read_text()[-4000:]}"
    wait_for_full_mesh(t.nodes, timeout=15)
    for d in t.nodes:
        assert "Traceback" not in d.log.read_text(), d.log.read_text()[-4000:]


@asynccontextmanager
async def in_process_host(seed: bytes) -> AsyncIterator[MeshHost]:
    # it answers keepalive pings, as every node does: a member that does not is cut off
    # as silent after ~6 s, which a slow attack on a loaded machine can outlast
    async with open_host(seed, [LOOPBACK], peer_gate=lambda p: True,
                         stream_gate=lambda p, proto: proto == PING, gossip=False) as host:
        yield host


async def expect_dropped(stream: Stream) -> None:
    """The daemon must end the stream (EOF or reset) rather than hang or crash.

    Callers bound the wait (trio.fail_after)."""
    try:
        for _ in range(1000):
            if not await stream.read():
                return
    except STREAM_ERRORS:
        return
    raise AssertionError("the daemon kept answering a malformed stream")


async def send_expecting_drop(host: MeshHost, peer_id: str, protocol: str, frame: bytes,
                              *, required: bool = True) -> None:
    """Send one frame; the daemon must drop the stream within 5 s (``required``), or may
    within 0.3 s (a clean frame may be accepted and the stream stay open)."""
    stream = await host.open_stream(peer_id, protocol)
    try:
        await stream.write(frame)
    except STREAM_ERRORS:
        pass
    if required:
        with trio.fail_after(5):
            await expect_dropped(stream)
    else:
        with trio.move_on_after(0.3):
            await expect_dropped(stream)
        await stream.reset()


async def round_trip(host: MeshHost, peer_id: str, protocol: str,
                     request: dict) -> wire.Message:
    """One framed request, one framed reply: proves the daemon serves this connection."""
    stream = await host.open_stream(peer_id, protocol)
    await stream.write(wire.frame_message(request))
    decoder = wire.FrameDecoder()
    with trio.fail_after(5):
        for _ in range(1000):
            chunk = await stream.read()
            assert chunk, f"{protocol} stream ended without a reply"
            frames = decoder.feed(chunk)
            if frames:
                await stream.close()
                return wire.unpack(frames[0])
    raise AssertionError(f"no {protocol} reply")


async def roster_round_trip(host: MeshHost, peer_id: str) -> wire.Message:
    return await round_trip(host, peer_id, ROSTER_SYNC,
                            {"t": "roster", "v": 1, "certs": [], "revocations": []})


def status(d: Daemon) -> dict:
    return dict(d.cli("status"))


# --- 1. strangers ---------------------------------------------------------------------------


HANG_UP_BOUND_S = 15.0  # the daemon hangs up on EOF at once; this only bounds a hang


def assert_hangs_up(port: int, payload: bytes) -> None:
    """Send ``payload`` and EOF to 127.0.0.1:``port``: the other side must close the
    connection (EOF or reset) within HANG_UP_BOUND_S. It may hang up at any point; what it
    must not do is keep the socket open (a timeout here is the failure this looks for)."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_UP_BOUND_S) as s:
        try:
            if payload:
                s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            for _ in range(1000):  # bounded: a peer that streams bytes forever fails too
                if not s.recv(65536):
                    return
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            return  # hung up on us: what we want
        except TimeoutError:
            pytest.fail(f"the daemon kept the connection open {HANG_UP_BOUND_S:g} s after"
                        f" {payload[:24]!r} and EOF")
    pytest.fail(f"the daemon kept sending after {payload[:24]!r} and EOF")


def test_stranger_raw_tcp_garbage_is_refused(team: Team) -> None:
    target = team.nodes[0]
    port = tcp_port(target)
    payloads = [
        b"",  # connect and close
        os.urandom(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x13/multistream/1.0.0\n",  # a valid header, then nothing
        b"\x13/multistream/1.0.0\n\x07/noise\n" + os.urandom(512),  # garbage Noise
        b"\x13/multistream/1.0.0\n\x07/noise\n\xff\xff" + os.urandom(64),  # huge Noise length
        b"\xff" * 64,  # an endless varint
    ]
    for payload in payloads:
        assert_hangs_up(port, payload)
    # half-open connections that never speak must not block members
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        assert_team_healthy(team)
    finally:
        for s in idle:
            s.close()
    assert_team_healthy(team)


def test_stranger_with_noise_handshake_is_refused(team: Team) -> None:
    target = team.nodes[0]
    before = status(target)["refused"]["handshakes"]

    async def attack() -> None:
        async with in_process_host(secrets.token_bytes(32)) as host:
            for d in team.nodes:
                with pytest.raises(DialError):
                    with trio.fail_after(10):
                        await host.connect(d.addr)
                assert not host.connected_peers()

    trio.run(attack)
    after = status(target)["refused"]["handshakes"]
    assert after > before
    for d in team.nodes:
        assert "refused connection from non-member" in d.log.read_text()
    assert_team_healthy(team)


# --- 2. malformed frames from a member ------------------------------------------------------


def rpc_frame(rpc: rpc_pb2.RPC) -> bytes:
    data = rpc.SerializeToString()
    return wire.encode_varint(len(data)) + data


def hostile_gossip_frames(team_id: str, member_peer_bytes: bytes) -> list[bytes]:
    topic = caps_topic(team_id)
    frames = [
        b"\x05\xff\xff\xff\xff\xff",  # garbage protobuf
        b"\x02\x0a\xff",  # a field whose length runs past the frame
        wire.encode_varint(64 * 1024 * 1024) + b"\x00" * 16,  # oversized length prefix
        b"\xff" * 11,  # a varint that never ends
    ]
    # well-formed protobuf, hostile content: unsigned, forged and malformed messages
    bad_messages = [
        rpc_pb2.Message(from_id=member_peer_bytes, data=b"x", seqno=b"\x00" * 8,
                        topicIDs=[topic]),
        rpc_pb2.Message(from_id=member_peer_bytes, data=b"x", seqno=b"\x01" * 8,
                        topicIDs=[topic], signature=b"\x00" * 64),
        rpc_pb2.Message(from_id=b"\xff" * 40, data=b"x", seqno=b"\x02" * 8, topicIDs=[topic],
                        signature=b"\x00" * 64, key=b"\xff" * 10),
        rpc_pb2.Message(from_id=b"", data=b"", seqno=b"", topicIDs=[topic],
                        signature=b"\x00"),
    ]
    frames += [rpc_frame(rpc_pb2.RPC(publish=[m])) for m in bad_messages]
    frames.append(rpc_frame(rpc_pb2.RPC(
        subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid="x" * 5000)] * 50)))
    frames.append(rpc_frame(rpc_pb2.RPC(control=rpc_pb2.ControlMessage(
        ihave=[rpc_pb2.ControlIHave(topicID=topic, messageIDs=[os.urandom(20)] * 500)],
        graft=[rpc_pb2.ControlGraft(topicID="nope")],
        prune=[rpc_pb2.ControlPrune(topicID=topic, backoff=2**63)]))))
    return frames


def test_malformed_gossip_and_roster_frames_do_not_kill_the_daemon(team: Team) -> None:
    target = team.nodes[0]
    before = status(target)["refused"]["bad_gossip_streams"]
    from libp2p.peer.id import ID
    from teammesh.protocols.identity import Identity

    member = Identity(team.member_seed)
    frames = hostile_gossip_frames(team.team_id, ID.from_base58(member.peer_id).to_bytes())
    addr, peer_id = target.addr, target.peer_id

    async def attack() -> None:
        async with in_process_host(team.member_seed) as host:
            with trio.fail_after(10):
                await host.connect(addr)
            for proto in MESHSUB:
                for f in frames:
                    await send_expecting_drop(host, peer_id, proto, f, required=False)
            # the first garbage frame, once more, and wait for the daemon to drop it
            stream = await host.open_stream(peer_id, MESHSUB[0])
            await stream.write(frames[0])
            with trio.fail_after(5):
                await expect_dropped(stream)

            for f in (wire.frame(b"\xc1 not msgpack"),
                      wire.encode_varint(2**40),  # huge length
                      b"\xff" * 11,  # endless varint
                      wire.frame_message({"t": "roster", "v": 1, "certs": "no",
                                          "revocations": [b"junk"]}),
                      wire.frame_message({"t": "roster", "v": 1, "certs": [b"\x00" * 100],
                                          "revocations": [b"\x00"]}),
                      wire.frame_message({"t": "enrolled", "v": 1})):
                await send_expecting_drop(host, peer_id, ROSTER_SYNC, f)
            # the same connection still gets a proper answer
            reply = await roster_round_trip(host, peer_id)
            assert reply["t"] == "roster"
            assert len(reply["certs"]) >= 4

    trio.run(attack)
    assert status(target)["refused"]["bad_gossip_streams"] > before
    # a well-formed RPC carrying an undecodable signing key is dropped, not fatal
    assert "dropped malformed gossip message" in target.log.read_text()
    assert_team_healthy(team)
    # enrollment on the attacked admin still works
    fresh = init_home(team.tmp / "fresh")
    run_cli(fresh, "join", run_cli(target.home, "team", "invite").stdout.strip())
    assert_team_healthy(team)


def ads_rejected(d: Daemon) -> int:
    token = (d.home / "api.token").read_text().strip()
    r = httpx.get(f"{d.api['url']}/metrics", headers={"authorization": f"Bearer {token}"})
    line = next(x for x in r.text.splitlines() if x.startswith("teammesh_ads_rejected_total"))
    return int(float(line.split()[1]))


def test_ad_sync_answers_members_and_takes_only_genuine_ads(team: Team) -> None:
    target = team.nodes[0]
    before = ads_rejected(target)
    addr, peer_id = target.addr, target.peer_id
    genuine: list[bytes] = []

    async def attack() -> None:
        async with in_process_host(team.member_seed) as host:
            with trio.fail_after(10):
                await host.connect(addr)
            reply = await round_trip(host, peer_id, ADS_SYNC, {"t": "ads", "v": 1, "ads": []})
            assert reply["t"] == "ads"
            opened = {open_ad(data).peer_id: data for data, _age in reply["ads"]}
            assert set(opened) == {d.peer_id for d in team.nodes}  # its own ad and its table
            genuine.extend(opened.values())
            for f in (wire.frame(b"\xc1 not msgpack"), wire.encode_varint(2**40),
                      wire.frame_message({"t": "roster", "v": 1, "certs": [],
                                          "revocations": []}),
                      wire.frame_message({"t": "ads", "v": 1, "ads": "no"})):
                await send_expecting_drop(host, peer_id, ADS_SYNC, f)
            good = genuine[-1]
            forged = good[:-3] + bytes(b ^ 0xFF for b in good[-3:])
            reply = await round_trip(host, peer_id, ADS_SYNC, {"t": "ads", "v": 1, "ads": [
                [forged, 0], [b"junk", 0], "not a pair", [good, "not an age"], [good, 0]]})
            assert len(reply["ads"]) == 3

    trio.run(attack)
    assert ads_rejected(target) == before + 4  # the genuine ad was taken, nothing else
    assert_team_healthy(team)


# --- 3. reconnect storm ---------------------------------------------------------------------


def test_reconnect_storm(team: Team) -> None:
    target = team.nodes[1]
    before = status(target)["reachability"]["inbound_connections"]
    addr, peer_id = target.addr, target.peer_id
    cycles = 0
    t0 = time.monotonic()

    async def storm() -> None:
        nonlocal cycles
        async with in_process_host(team.member_seed) as host, trio.open_nursery() as closers:
            deadline = trio.current_time() + STORM_BUDGET_S
            while cycles < STORM_CYCLES and trio.current_time() < deadline:
                with trio.fail_after(10):
                    await host.connect(addr)
                    # py-libp2p lingers 0.1 s inside its own close; the attacker need not
                    # wait for that, only for the connection to be gone.
                    closers.start_soon(host.disconnect, peer_id)
                    for _ in range(5000):
                        if not host.is_connected(peer_id):
                            break
                        await trio.sleep(0.002)
                cycles += 1
            elapsed = time.monotonic() - t0
            print(f"\nreconnect storm: {cycles} cycles in {elapsed:.2f} s"
                  f" ({elapsed / max(cycles, 1) * 1000:.1f} ms per cycle)")
            # after the storm the same identity still connects and is served
            with trio.fail_after(10):
                await host.connect(addr)
            reply = await roster_round_trip(host, peer_id)
            assert reply["t"] == "roster"

    trio.run(storm)
    assert cycles == STORM_CYCLES
    assert status(target)["reachability"]["inbound_connections"] >= before + STORM_CYCLES
    assert_team_healthy(team)

    # a brand-new member dials the stormed node and appears in the team within 10 s
    home = init_home(team.tmp / "late")
    run_cli(home, "join", run_cli(team.nodes[0].home, "team", "invite").stdout.strip())
    late = Daemon(home, ["--bootstrap", target.addr]).start()
    try:
        wait_until(lambda: late.peer_id in {p["peer_id"] for p in target.peers()}, 10,
                   what="a new member to reach the stormed node")
        wait_until(lambda: target.peer_id in {p["peer_id"] for p in late.peers()}, 10,
                   what="the stormed node to reach the new member")
    finally:
        late.stop()
    for d in team.nodes:
        assert d.alive()
