"""Revocation for real (issue 15.4): every member cuts a revoked peer off at once.

A 3-node team of real daemons plus a fourth enrolled member that runs in this process
(``open_host`` with its seed). It holds open streams on a non-admin member, n1, and has
put its ad in n1's table; the admin, n0, revokes it. n1 must reset those streams, refuse
new connections and streams from it, and stop listing it, without any admin action on n1.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from meshtools import Daemon, init_home, mesh, run_cli, wait_for_full_mesh, wait_until
from teammesh.node.core.config import Home
from teammesh.node.core.journal import Journal
from teammesh.node.p2p.host import STREAM_ERRORS, DialError, MeshHost, Stream, open_host
from teammesh.node.p2p.membership import Membership
from teammesh.node.p2p.protocol_ids import ADS_SYNC, TASKS
from teammesh.protocols import wire
from teammesh.protocols.bitswap import BITSWAP_120
from teammesh.protocols.bridgekey import derive_member_key
from teammesh.protocols.capability import CapabilityAd
from teammesh.protocols.identity import Identity

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
CUT_OFF_BOUND_S = 20.0  # far below what the daemon would otherwise keep these streams


@dataclass
class Team:
    tmp: Path
    nodes: list[Daemon]
    member_home: Path  # enrolled, never started: this process plays it


@pytest.fixture
def team(tmp_path: Path) -> Iterator[Team]:
    with mesh(tmp_path, 3) as nodes:
        member = init_home(tmp_path / "member")
        run_cli(member, "join", run_cli(nodes[0].home, "team", "invite").stdout.strip())
        wait_for_full_mesh(nodes, timeout=15)
        yield Team(tmp_path, nodes, member)


@asynccontextmanager
async def member_host(seed: bytes) -> AsyncIterator[MeshHost]:
    async with open_host(seed, [LOOPBACK], peer_gate=lambda p: True,
                         stream_gate=lambda p, proto: False, gossip=False) as host:
        yield host


def member_ad(home: Path, team_id: str) -> bytes:
    """The member's own signed capability ad, carrying its certificate."""
    identity = Identity((home / "identity.key").read_bytes())
    journal = Journal(home / "journal.db")
    try:
        cert = Membership(Home(home), journal, identity).cert
    finally:
        journal.close()
    assert cert is not None
    ad = CapabilityAd(
        peer_id=identity.peer_id, team_id=team_id, addrs=(), cores=1, slots=1, free_slots=1,
        memory_bytes=1 << 30, gpus=(), kinds={"hash.sha256": "1"}, queue=0, cost=1.0,
        storage=("local",), software="test", seq=int(time.time() * 1000), ttl_ms=600_000,
        cert=cert.packed())
    return ad.sealed(identity)


async def push_ad(host: MeshHost, peer_id: str, sealed: bytes) -> None:
    stream = await host.open_stream(peer_id, ADS_SYNC)
    await stream.write(wire.frame_message({"t": "ads", "v": 1, "ads": [[sealed, 0]]}))
    decoder = wire.FrameDecoder()
    with trio.fail_after(10):
        while not decoder.feed(await stream.read()):
            pass
    await stream.close()


async def ended(stream: Stream) -> bool:
    """True once the daemon ends the stream (EOF or reset); False if it sent data."""
    try:
        return not await stream.read()
    except STREAM_ERRORS:
        return True


async def refused(host: MeshHost, addr: str, peer_id: str) -> bool:
    """Dial and open a task stream: True if the daemon refuses at either step."""
    try:
        await host.connect(addr)
        stream = await host.open_stream(peer_id, TASKS)
    except DialError:
        return True
    return await ended(stream)


def peer_ids(d: Daemon) -> set[str]:
    return {p["peer_id"] for p in d.peers()}


@pytest.mark.slow
async def test_revoked_member_is_cut_off_by_non_admin_members(team: Team) -> None:
    admin, n1 = team.nodes[0], team.nodes[1]
    team_id = admin.cli("status")["team"]["id"]
    seed = (team.member_home / "identity.key").read_bytes()
    member_id = Identity(seed).peer_id
    async with member_host(seed) as host:
        # connected to every member, with a task session open on each
        for d in team.nodes:
            await host.connect(d.addr)
        await push_ad(host, n1.peer_id, member_ad(team.member_home, team_id))
        await trio.to_thread.run_sync(lambda: wait_until(
            lambda: member_id in peer_ids(n1), 10, what="n1 to list the member"))
        members = {d.peer_id for d in team.nodes}
        assert members <= set(host.connected_peers())
        # long-lived streams a member may hold: a task session on each member, and a
        # Bitswap session on n1
        held = [await host.open_stream(d.peer_id, TASKS) for d in team.nodes]
        held.append(await host.open_stream(n1.peer_id, BITSWAP_120))

        await trio.to_thread.run_sync(lambda: admin.cli("team", "revoke", member_id))

        with trio.fail_after(CUT_OFF_BOUND_S):
            for stream in held:
                assert await ended(stream)
        # every member closed its connection to it (this side closes none of them)
        for _ in range(int(CUT_OFF_BOUND_S / 0.1)):  # bounded: count and time
            if not members & set(host.connected_peers()):
                break
            await trio.sleep(0.1)
        assert not members & set(host.connected_peers()), "members still connected to it"
        # no way back in: a new dial is refused at the handshake, and if a connection
        # survived somehow, a new stream on it is refused too
        with trio.fail_after(CUT_OFF_BOUND_S):
            assert await refused(host, n1.addr, n1.peer_id)
    wait_until(lambda: member_id not in peer_ids(n1), 10, what="n1 to drop the member's ad")
    for d in team.nodes:
        log = d.log.read_text() if d.log else ""
        assert f"cut off revoked member {member_id}" in log, d.home.name
        assert "Traceback" not in log
        assert d.alive()


def kv(home: Path, key: str) -> bytes | None:
    """One journal key/value, read-only beside the running daemon."""
    db = sqlite3.connect(f"file:{home / 'journal.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
    finally:
        db.close()
    return None if row is None else bytes(row[0])


def epoch(home: Path) -> int:
    return int(kv(home, "bridge_epoch") or b"-1")


@pytest.mark.slow
def test_revocation_rotates_the_bridge_master_and_members_fetch_their_new_keys(
        tmp_path: Path) -> None:
    with mesh(tmp_path, 3) as nodes:
        wait_for_full_mesh(nodes, timeout=15)
        admin, stays, goes = nodes
        old_master = kv(admin.home, "bridge_master")
        assert old_master is not None
        assert len(old_master) == 32
        # enrollment handed each member its own key, never the master
        for d in nodes:
            assert kv(d.home, "bridge_key") == derive_member_key(old_master, d.peer_id)
            assert epoch(d.home) == 0
        for d in (stays, goes):
            assert kv(d.home, "bridge_master") is None
        revoked_key = kv(goes.home, "bridge_key")
        goes_id = goes.peer_id  # read now: a revoked daemon stops (and removes api.json)

        admin.cli("team", "revoke", goes_id)

        wait_until(lambda: epoch(stays.home) == 1, 30, what="the member to fetch its new key")
        new_master = kv(admin.home, "bridge_master")
        assert new_master is not None
        assert new_master != old_master
        assert epoch(admin.home) == 1
        keys = {d.peer_id: kv(d.home, "bridge_key") for d in (admin, stays)}
        assert keys == {d.peer_id: derive_member_key(new_master, d.peer_id)
                        for d in (admin, stays)}
        assert kv(stays.home, "bridge_master") is None
        # the revoked member learnt no key of the new epoch, and its old one is dead
        assert kv(goes.home, "bridge_key") == revoked_key
        assert revoked_key != derive_member_key(new_master, goes_id)
        assert revoked_key not in keys.values()
        assert "got this node's bridge key for epoch 1" in stays.log.read_text()
        # what an admin gives the Worker (BRIDGE_KEY); a member has nothing to give
        assert admin.cli("team", "bridge-key") == {"master": new_master.hex(), "epoch": 1}
        proc = run_cli(stays.home, "team", "bridge-key", check=False)
        assert proc.returncode == 1
        assert "only a team admin holds the master bridge key" in proc.stderr


def test_a_journal_with_the_old_shared_bridge_key_keeps_working(tmp_path: Path) -> None:
    admin_home = init_home(tmp_path / "admin")
    run_cli(admin_home, "team", "create", "t")
    master = kv(admin_home, "bridge_master")
    assert master is not None
    # what every node's journal held before per-member keys: the master in bridge_key
    db = sqlite3.connect(admin_home / "journal.db")
    with db:
        db.execute("DELETE FROM kv WHERE key IN ('bridge_master', 'bridge_epoch')")
        db.execute("UPDATE kv SET value=? WHERE key='bridge_key'", (master,))
    db.close()
    identity = Identity((admin_home / "identity.key").read_bytes())
    journal = Journal(admin_home / "journal.db")
    try:
        m = Membership(Home(admin_home), journal, identity)
        assert m.bridge_master == master  # the admin keeps the master as its master
        assert m.bridge_key == derive_member_key(master, identity.peer_id)
        assert m.bridge_epoch == 0
    finally:
        journal.close()


BRIDGE_DIR = Path(__file__).resolve().parent.parent / "bridge"
# test_bridge.py's master key: bridge/.dev.vars is shared by every local Worker, so a
# Worker started here must not change it under a test_bridge run
WORKER_MASTER = bytes.fromhex("5eed" * 16)


@contextmanager
def local_worker(persist: Path) -> Iterator[str]:
    """`wrangler dev --local` with master WORKER_MASTER at epoch 0; ended by its PID."""
    from teammesh.node.bridge.dev import free_port, wrangler_command, wrangler_env, write_dev_vars

    port = free_port()
    write_dev_vars(BRIDGE_DIR, WORKER_MASTER.hex())
    persist.mkdir(parents=True, exist_ok=True)
    with open(persist / "wrangler.log", "wb") as log:
        proc = subprocess.Popen(
            wrangler_command(BRIDGE_DIR, port, persist), cwd=BRIDGE_DIR, env=wrangler_env(),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, (persist / "wrangler.log").read_text()[-2000:]
            try:
                return httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 90, interval=0.3, what="the local Worker")
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


async def bridge_accepts(url: str, key: bytes, peer_id: str) -> bool:
    """One signed request; False if the Worker refuses the key (stale or wrong)."""
    from teammesh.node.bridge.client import BridgeClient, BridgeRejected, BridgeStaleKey

    async with BridgeClient(url, key, peer_id) as client:
        try:
            await client.list(limit=1)
        except (BridgeStaleKey, BridgeRejected):
            return False
    return True


def set_master(home: Path, peer_id: str, master: bytes) -> None:
    db = sqlite3.connect(home / "journal.db")
    with db:
        db.execute("UPDATE kv SET value=? WHERE key='bridge_master'", (master,))
        db.execute("UPDATE kv SET value=? WHERE key='bridge_key'",
                   (derive_member_key(master, peer_id),))
    db.close()


@pytest.mark.slow
@pytest.mark.skipif(not (BRIDGE_DIR / "node_modules" / "wrangler").is_dir(),
                    reason="bridge/node_modules is missing: run `npm ci` in bridge/")
async def test_the_worker_refuses_a_revoked_members_key_after_rotation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with local_worker(tmp_path / "worker") as url:
        monkeypatch.setenv("TEAMMESH_BRIDGE_URL", url)
        admin_home = init_home(tmp_path / "admin")
        run_cli(admin_home, "team", "create", "t")
        admin_id = Identity((admin_home / "identity.key").read_bytes()).peer_id
        set_master(admin_home, admin_id, WORKER_MASTER)  # the master the Worker was given
        nodes = [Daemon(admin_home).start()]
        try:
            for name in ("stays", "goes"):
                home = init_home(tmp_path / name)
                run_cli(home, "join", run_cli(admin_home, "team", "invite").stdout.strip())
                nodes.append(Daemon(home).start())
            wait_for_full_mesh(nodes, timeout=15)
            admin, stays, goes = nodes
            old = {d.peer_id: kv(d.home, "bridge_key") for d in nodes}
            for d in nodes:
                assert await bridge_accepts(url, old[d.peer_id], d.peer_id)
            goes_id = goes.peer_id  # read now: a revoked daemon stops (and removes api.json)

            admin.cli("team", "revoke", goes_id)

            wait_until(lambda: epoch(stays.home) == 1, 60, what="the member's new key")
            assert "the bridge took master key epoch 1" in admin.log.read_text()
            new_key = kv(stays.home, "bridge_key")
            assert new_key is not None
            assert await bridge_accepts(url, new_key, stays.peer_id)
            # the revoked member's key, and every key of the old epoch, are refused
            assert not await bridge_accepts(url, old[goes_id], goes_id)
            assert not await bridge_accepts(url, old[stays.peer_id], stays.peer_id)
        finally:
            for d in nodes:
                d.stop()
