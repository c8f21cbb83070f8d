"""Issue 4 acceptance: real daemons, team membership, capability gossip, CLI, API."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio
from libp2p.identity.identify.pb.identify_pb2 import Identify
from meshtools import (
    CLI,
    Daemon,
    init_home,
    log_tail,
    mesh,
    run_cli,
    wait_for_full_mesh,
    wait_until,
)
from teammesh.node.core.config import Home
from teammesh.node.core.journal import Journal
from teammesh.node.p2p.host import (
    GOSSIP_HEARTBEAT_S,
    MAX_INBOUND_STREAMS_PER_PEER,
    STREAM_ERRORS,
    DialError,
    MeshHost,
    open_host,
)
from teammesh.node.p2p.membership import Membership
from teammesh.node.p2p.protocol_ids import TASKS
from teammesh.protocols.bitswap import BITSWAP_PROTOCOLS
from teammesh.protocols.identity import Identity
from teammesh.protocols.membership import Invite


def test_init_is_idempotent_and_private(tmp_path: Path) -> None:
    home = tmp_path / "h"
    first = json.loads(run_cli(home, "init", "--json").stdout)
    again = json.loads(run_cli(home, "init", "--json").stdout)
    assert first["created"] is True
    assert again["created"] is False
    assert first["peer_id"] == again["peer_id"]
    assert first["peer_id"].startswith("12D3KooW")
    for name in ("identity.key", "api.token"):
        mode = stat.S_IMODE((home / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))


def test_config_errors_name_key_and_fix(tmp_path: Path) -> None:
    home = init_home(tmp_path / "h")
    run_cli(home, "team", "create", "t")
    (home / "config.toml").write_text("[node]\nslots = \"many\"\n")
    proc = run_cli(home, "up", check=False, timeout=30)
    assert proc.returncode == 1
    assert "node.slots" in proc.stderr
    assert "integer" in proc.stderr
    assert "Traceback" not in proc.stderr
    (home / "config.toml").write_text("")
    env = {**os.environ, "TEAMMESH_NODE_SLOTS": "-3"}
    proc = subprocess.run([*CLI, "--home", str(home), "up"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 1
    assert "TEAMMESH_NODE_SLOTS" in proc.stderr


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    home = init_home(tmp_path / "h")
    proc = run_cli(home, "status", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "teammesh" in proc.stderr
    assert "up" in proc.stderr
    proc = run_cli(home, "join", "not-an-invite", check=False)
    assert proc.returncode == 1
    assert "invite" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_three_nodes_form_a_team_mesh(tmp_path: Path) -> None:
    with mesh(tmp_path, 3, slots=[1, 2, 3]) as nodes:
        wait_for_full_mesh(nodes, timeout=10)
        by_id = {d.peer_id: d for d in nodes}
        for d in nodes:
            for p in d.peers():
                assert p["slots"] == {1: 1, 2: 2, 3: 3}[
                    int(by_id[p["peer_id"]].home.name[1:]) + 1]
                assert "hash.sha256" in p["kinds"]
                assert all("/p2p/" + p["peer_id"] in a for a in p["addrs"])
        st = nodes[1].cli("status")
        assert st["peer_id"] == nodes[1].peer_id
        assert all(a.endswith("/p2p/" + st["peer_id"]) for a in st["addrs"])
        assert st["team"]["name"] == "testteam"
        assert st["slots"] == 2
        assert st["api"].startswith("http://127.0.0.1:")
        assert "reachable" in st["reachability"]
        assert "observed_addrs" in st["reachability"]
        # node 0 was dialled by the others: it has seen inbound connections
        assert nodes[0].cli("status")["reachability"]["inbound_connections"] >= 1


GOSSIP_HISTORY = 5  # node/p2p/host.py open_host: gossip_history (heartbeats in the cache)
MCACHE_S = GOSSIP_HISTORY * GOSSIP_HEARTBEAT_S


def api_get(d: Daemon, path: str) -> object:
    """One API call in this process (no CLI start-up between reads)."""
    token = (d.home / "api.token").read_text().strip()
    r = httpx.get(f"{d.api['url']}{path}", headers={"authorization": f"Bearer {token}"},
                  timeout=30)
    r.raise_for_status()
    return r.json()


def received_at(d: Daemon, peer_id: str) -> tuple[float, float]:
    """When ``d`` says it received ``peer_id``'s ad, on this process's monotonic clock:
    (earliest, latest), bracketing the read (an entry's age is relative to the read)."""
    before = time.monotonic()
    peers = api_get(d, "/v1/peers")
    after = time.monotonic()
    assert isinstance(peers, list)
    entry = next(p for p in peers if p["peer_id"] == peer_id)
    return before - entry["age_s"], after - entry["age_s"]


def test_a_starting_node_learns_the_whole_team_from_its_first_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Periodic ads a minute apart and one outbound connection per node: n2 and n1 both
    # dial only n0 and never each other, and n1's last ad has left gossipsub's message
    # cache (5 s) before n2 starts, so n2 can learn n1 within seconds only from the ad
    # table n0 hands it when it connects (/teammesh/ads/1.0.0).
    monkeypatch.setenv("TEAMMESH_GOSSIP_AD_INTERVAL_S", "60")
    monkeypatch.setenv("TEAMMESH_GOSSIP_AD_TTL_S", "300")
    monkeypatch.setenv("TEAMMESH_NODE_MAX_PEERS", "1")
    with mesh(tmp_path, 2, slots=[1, 2]) as nodes:
        wait_for_full_mesh(nodes, timeout=10)
        home = init_home(tmp_path / "n2")
        run_cli(home, "join", run_cli(nodes[0].home, "team", "invite").stdout.strip())
        # n1's last ad has left every gossip cache once n0 holds it for longer than the
        # cache's span (plus a heartbeat for the shift): the ad's age, not a fixed sleep
        n1 = nodes[1].peer_id
        wait_until(lambda: next(p for p in nodes[0].peers() if p["peer_id"] == n1)["age_s"]
                   > MCACHE_S + GOSSIP_HEARTBEAT_S, 60, interval=0.5,
                   what="n1's ad to outlive the gossip cache")
        n2_started = time.monotonic()
        nodes.append(Daemon(home, ["--slots", "3"]).start())
        wait_for_full_mesh(nodes, timeout=10)
        assert nodes[2].cli("status")["connected_peers"] == 1  # n0 only, as intended
        n1_in_n2 = next(p for p in nodes[2].peers() if p["peer_id"] == n1)
        assert n1_in_n2["slots"] == 2
        assert n1_in_n2["age_s"] + n1_in_n2["expires_in_s"] == pytest.approx(300, abs=0.01)
        # relayed, not re-dated: n2's copy says it was received when n0 received it, before
        # n2 was even started (a re-dated copy would be as new as n2's sync with n0). The
        # brackets come from reads in this process, so slow reads widen them, not the test.
        _, n2_latest = received_at(nodes[2], n1)
        n0_earliest, _ = received_at(nodes[0], n1)
        assert n2_latest < n2_started
        assert n2_latest >= n0_earliest - 0.01  # ages are rounded to the millisecond


def membership(home: Path) -> Membership:
    """A node's membership state as its journal holds it (read with the node stopped)."""
    journal = Journal(home / "journal.db")
    try:
        return Membership(Home(home), journal, Identity((home / "identity.key").read_bytes()))
    finally:
        journal.close()


def test_invite_is_one_time_and_expires(tmp_path: Path) -> None:
    with mesh(tmp_path, 1) as (admin,):
        invite = run_cli(admin.home, "team", "invite").stdout.strip()
        a = init_home(tmp_path / "a")
        b = init_home(tmp_path / "b")
        run_cli(a, "join", invite)
        proc = run_cli(b, "join", invite, check=False)
        assert proc.returncode == 1
        assert "already used" in proc.stderr
        # Expiry is enforced by the admin, whatever the invite text says: lapse a fresh
        # invite's record in the admin's journal (as if its hour had passed) and join with
        # the text unchanged.
        lapsed = run_cli(admin.home, "team", "invite", "--ttl", "1h").stdout.strip()
        inv = Invite.decode(lapsed)
        assert inv.expires > time.time() + 3000
        db = sqlite3.connect(admin.home / "journal.db", timeout=30)
        with db:
            changed = db.execute("UPDATE invites SET expires=? WHERE enroll_peer=?",
                                 (int(time.time()) - 1, inv.enroll_peer_id)).rowcount
        db.close()
        assert changed == 1
        c = init_home(tmp_path / "c")
        proc = run_cli(c, "join", lapsed, check=False)
        assert proc.returncode == 1
        assert "this invite expired" in proc.stderr
        assert membership(c).team is None
        # and the joiner refuses an invite whose own expiry has passed, before dialling
        stale = dataclasses.replace(Invite.decode(
            run_cli(admin.home, "team", "invite").stdout.strip()),
            expires=int(time.time()) - 1).encode()
        d = init_home(tmp_path / "d")
        proc = run_cli(d, "join", stale, check=False)
        assert proc.returncode == 1
        assert "this invite has expired" in proc.stderr
        assert "dialing" not in proc.stderr + proc.stdout
    # the admin is gone: a fresh invite cannot be redeemed
    e = init_home(tmp_path / "e")
    proc = run_cli(e, "join", invite, check=False)
    assert proc.returncode == 1


def test_join_fails_clearly_when_admin_is_down(tmp_path: Path) -> None:
    with mesh(tmp_path, 1) as (admin,):
        invite = run_cli(admin.home, "team", "invite").stdout.strip()
    home = init_home(tmp_path / "late")
    # no wall-clock bound here (scripts/bench holds timings); run_cli fails on a hang
    proc = run_cli(home, "join", invite, check=False, timeout=120)
    assert proc.returncode == 1
    assert "no admin reachable" in proc.stderr
    assert "teammesh up" in proc.stderr


def test_stranger_is_refused_everywhere(tmp_path: Path) -> None:
    with mesh(tmp_path, 2) as nodes:
        wait_for_full_mesh(nodes)
        # a node of another team, pointed at our members
        other = init_home(tmp_path / "stranger")
        run_cli(other, "team", "create", "otherteam")
        stranger = Daemon(other, ["--bootstrap", nodes[0].addr, "--bootstrap", nodes[1].addr])
        stranger.start()
        try:
            # every member it dialled refused it (a positive event at each, not a pause)
            for d in nodes:
                wait_until(lambda d=d: d.cli("status")["refused"]["handshakes"] >= 1,
                           30, what=f"{d.home.name} to refuse the stranger")
                assert d.log is not None
                assert "refused connection from non-member" in d.log.read_text()
            for d in nodes:
                assert stranger.peer_id not in {p["peer_id"] for p in d.peers()}
                assert d.cli("status")["connected_peers"] == len(nodes) - 1
            assert stranger.peers() == []
            assert stranger.cli("status")["connected_peers"] == 0
        finally:
            stranger.stop()
        wait_for_full_mesh(nodes)


def test_killed_node_drops_out_and_comes_back(tmp_path: Path) -> None:
    with mesh(tmp_path, 3) as nodes:
        wait_for_full_mesh(nodes)
        victim = nodes[2]
        gone_id = victim.peer_id
        victim.kill9()
        # ad ttl is 15 s by default
        wait_until(lambda: all(gone_id not in {p["peer_id"] for p in d.peers()}
                               for d in nodes[:2]), 25, interval=0.5,
                   what="the killed node to expire")
        victim.start()
        wait_for_full_mesh(nodes, timeout=15)


def test_revocation_spreads(tmp_path: Path) -> None:
    with mesh(tmp_path, 3) as nodes:
        wait_for_full_mesh(nodes)
        target = nodes[2]
        target_id = target.peer_id  # read now: a node that learns it was revoked stops
        nodes[0].cli("team", "revoke", target_id)
        wait_until(lambda: all(target_id not in {p["peer_id"] for p in d.peers()}
                               for d in nodes[:2]), 10, what="revocation to spread")
        members = nodes[1].cli("team", "members")["members"]
        assert any(m["peer_id"] == target_id and m["revoked"] for m in members)
        # every member cuts it off (resets its streams and closes its connections), and
        # each is left connected to the other member only
        for d in nodes[:2]:
            assert d.log is not None
            wait_until(lambda d=d: f"cut off revoked member {target_id}" in d.log.read_text(),
                       30, what=f"{d.home.name} to cut the revoked node off")
        wait_until(lambda: [d.cli("status")["connected_peers"] for d in nodes[:2]] == [1, 1],
                   30, what="every member to close its connections to the revoked node")
        wait_until(lambda: not target.alive() or target.cli("status")["connected_peers"] == 0,
                   30, what="the revoked node to be left with no connection")
        # It cannot come back. Whether the revocation reached it before the members cut it
        # off is a race; its journal says which, and so which refusal must follow.
        target.stop()
        knows = membership(target.home).is_revoked(target_id)
        refused_before = sum(d.cli("status")["refused"]["handshakes"] for d in nodes[:2])
        if knows:  # it refuses to start
            with pytest.raises(AssertionError, match="this node was revoked from team"):
                target.start()
        else:  # it starts, dials the members, and each dial is refused
            target.start()
            wait_until(lambda: sum(d.cli("status")["refused"]["handshakes"]
                                   for d in nodes[:2]) > refused_before,
                       30, what="a member to refuse the revoked node's dial")
        for d in nodes[:2]:
            assert target_id not in {p["peer_id"] for p in d.peers()}
            assert d.cli("status")["connected_peers"] == 1


def test_api_requires_token_and_serves_openapi(tmp_path: Path) -> None:
    with mesh(tmp_path, 1) as (node,):
        url = node.api["url"]
        assert httpx.get(f"{url}/v1/status").status_code == 401
        assert httpx.get(f"{url}/v1/status",
                         headers={"authorization": "Bearer wrong"}).status_code == 401
        spec = httpx.get(f"{url}/openapi.json").json()
        assert "/v1/status" in spec["paths"]
        assert "/v1/peers" in spec["paths"]
        token = (node.home / "api.token").read_text().strip()
        r = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"})
        assert "teammesh_peers_live" in r.text


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    with mesh(tmp_path, 1) as (node,):
        assert node.stop() == 0  # 0, not the -9 of Daemon.stop's SIGKILL after 10 s
        assert not (node.home / "api.json").exists()
        assert "Traceback" not in node.log.read_text()


def test_ready_means_serving(tmp_path: Path) -> None:
    # api.json is the readiness signal Daemon.start waits on: once it exists, the API and
    # the libp2p listener answer at once. How fast that is, scripts/bench_footprint
    # measures (start -> ready); a test asserts no wall-clock bound.
    home = init_home(tmp_path / "h")
    run_cli(home, "team", "create", "t")
    d = Daemon(home).start()
    try:
        st = api_get(d, "/v1/status")
        assert isinstance(st, dict)
        assert st["peer_id"] == d.peer_id
        host, port = d.addr.split("/")[2], int(d.addr.split("/")[4])
        with socket.create_connection((host, port), timeout=10):
            pass
    finally:
        assert d.stop() == 0


def test_wait_for_full_mesh_fails_on_a_dead_daemon(tmp_path: Path) -> None:
    # meshtools must not call a mesh full by skipping a daemon that died
    with mesh(tmp_path, 2) as nodes:
        wait_for_full_mesh(nodes, timeout=15)
        nodes[1].kill9()
        with pytest.raises(AssertionError, match=r"daemon n1 is not running \(exit -9\)") as info:
            wait_for_full_mesh(nodes, timeout=15)
        assert "its log ends:" in str(info.value)
        assert log_tail(nodes[1], 500) in str(info.value)


# --- issue 15.7: outsiders get their one protocol; per-peer stream bounds ---------------


IDENTIFY = "/ipfs/id/1.0.0"
PING = "/ipfs/ping/1.0.0"


async def _answered(host: MeshHost, peer_id: str, protocol: str, request: bytes = b"") -> bytes:
    """What the daemon answers on ``protocol`` (b"" if it refuses the stream)."""
    try:
        stream = await host.open_stream(peer_id, protocol)
        if request:
            await stream.write(request)
        out = b""
        with trio.fail_after(10):
            while chunk := await stream.read():
                out += chunk
                if request and len(out) >= len(request):
                    break
        return out
    except (DialError, *STREAM_ERRORS):
        return b""


def _identify(reply: bytes) -> Identify:
    n, used = 0, 0
    for i, b in enumerate(reply):  # varint length prefix
        n |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            used = i + 1
            break
    msg = Identify()
    msg.ParseFromString(reply[used:used + n])
    return msg


@pytest.mark.slow
async def test_outsiders_get_their_one_protocol_and_members_get_identify(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outsider_seed = secrets.token_bytes(32)
    # this outsider may fetch blocks ([files] allow_peers)
    monkeypatch.setenv("TEAMMESH_FILES_ALLOW_PEERS",
                       json.dumps([Identity(outsider_seed).peer_id]))
    with mesh(tmp_path, 1) as (node,):
        member = init_home(tmp_path / "member")
        await trio.to_thread.run_sync(lambda: run_cli(
            member, "join", run_cli(node.home, "team", "invite").stdout.strip()))
        invite = await trio.to_thread.run_sync(
            lambda: run_cli(node.home, "team", "invite").stdout.strip())
        ping = secrets.token_bytes(32)
        seeds = {"outsider": outsider_seed,
                 "enrollment key": Invite.decode(invite).key_seed,
                 "member": (member / "identity.key").read_bytes()}
        got: dict[str, tuple[bytes, bytes]] = {}
        for who, seed in seeds.items():
            async with open_host(seed, ["/ip4/127.0.0.1/tcp/0"], peer_gate=lambda p: True,
                                 stream_gate=lambda p, proto: False, gossip=False) as host:
                await host.connect(node.addr)  # the Noise gate lets all three in
                got[who] = (await _answered(host, node.peer_id, IDENTIFY),
                            await _answered(host, node.peer_id, PING, ping))
        # a member gets the full identify and ping
        full = _identify(got["member"][0])
        assert TASKS in full.protocols
        assert full.listen_addrs
        assert got["member"][1] == ping
        # an enrollment key gets neither (it may open /teammesh/enroll/1.0.0, nothing else)
        assert got["enrollment key"] == (b"", b"")
        # an outside Bitswap peer: no ping, and an identify naming Bitswap and no address
        # (js-libp2p sends wants only to peers whose identify lists Bitswap)
        outsider = _identify(got["outsider"][0])
        assert set(outsider.protocols) == set(BITSWAP_PROTOCOLS)
        assert not outsider.listen_addrs
        assert not outsider.observed_addr
        assert got["outsider"][1] == b""
        assert node.alive()
        assert "Traceback" not in node.log.read_text()


@pytest.mark.slow
async def test_one_member_cannot_hold_unbounded_streams(tmp_path: Path) -> None:
    with mesh(tmp_path, 1) as (node,):
        member = init_home(tmp_path / "member")
        await trio.to_thread.run_sync(lambda: run_cli(
            member, "join", run_cli(node.home, "team", "invite").stdout.strip()))
        seed = (member / "identity.key").read_bytes()
        async with open_host(seed, ["/ip4/127.0.0.1/tcp/0"], peer_gate=lambda p: True,
                             stream_gate=lambda p, proto: False, gossip=False) as host:
            await host.connect(node.addr)
            # task sessions stay open until the submitter ends them
            held = [await host.open_stream(node.peer_id, TASKS)
                    for _ in range(MAX_INBOUND_STREAMS_PER_PEER)]
            with trio.fail_after(10):
                assert not await _opened_and_kept(host, node.peer_id, TASKS)
            assert len(held) == MAX_INBOUND_STREAMS_PER_PEER
        peer = Identity(seed).peer_id
        log = node.log.read_text()
        assert (f"reset /teammesh/tasks/1.0.0 stream from {peer}: "
                f"{MAX_INBOUND_STREAMS_PER_PEER} already open") in log
        assert node.alive()
        assert "Traceback" not in log


async def _opened_and_kept(host: MeshHost, peer_id: str, protocol: str) -> bool:
    """False if the daemon refuses a new stream (at negotiation or by resetting it)."""
    try:
        stream = await host.open_stream(peer_id, protocol)
        return bool(await stream.read())
    except (DialError, *STREAM_ERRORS):
        return False
