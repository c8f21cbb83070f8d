"""Liveness: a member whose connection drops leaves the others' peer lists within seconds,
long before its ad expires.

The daemons run with gossip.ad_ttl_s = 300, the TTL a 50-member team stretches to, so a
member still listed after the bounded wait below would be one that only ad expiry could
remove. The waits are bounded polls on what `teammesh peers` shows; the measured seconds
are printed (docs/BENCHMARKS.md, "Liveness (session 7)", has the figures), never asserted.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from meshtools import Daemon, mesh, wait_for_full_mesh, wait_until
from teammesh.protocols.capability import (
    DOMAIN_DOWN,
    DOWN_HOLD_S,
    MAX_WALL_MS,
    CapabilityAd,
    DownNotice,
    PeerTable,
    open_ad,
    open_down,
)
from teammesh.protocols.envelope import seal
from teammesh.protocols.errors import MalformedMessage
from teammesh.protocols.identity import Identity

from teammesh.client import Client

LONG_TTL_S = 300
WAIT_S = 60.0  # bounded: well above the 10 s goal, far below the 300 s TTL


def _ad(ident: Identity, seq: int, ttl_ms: int = 300_000, wall_ms: int | None = None
        ) -> CapabilityAd:
    return CapabilityAd(
        peer_id=ident.peer_id, team_id="t", addrs=(), cores=2, slots=1, free_slots=1,
        memory_bytes=1 << 30, gpus=(), kinds={}, queue=0, cost=1.0, storage=("local",),
        software="0", seq=seq, ttl_ms=ttl_ms, cert=b"", wall_ms=wall_ms)


# --- the table's rules (pure) -----------------------------------------------------------
def test_a_down_member_leaves_the_live_list_and_old_ads_do_not_bring_it_back() -> None:
    a = Identity.generate(os.urandom(32))
    table = PeerTable()
    assert table.update(_ad(a, 10), now=100.0)
    assert table.mark_down(a.peer_id, now=101.0)
    assert table.live(101.0) == []
    assert table.get(a.peer_id, 101.0) is None
    assert [e.ad.peer_id for e, _ in table.down_entries(101.0)] == [a.peer_id]
    # a relay's copy of what it said before (same seq, any age) keeps it down
    assert not table.update(_ad(a, 10), now=150.0, age=0.5)
    # a newer ad still in flight when it dropped (received within DOWN_HOLD_S) too
    assert not table.update(_ad(a, 11), now=101.0 + DOWN_HOLD_S / 2)
    # and a newer ad a relay received before the drop (its age puts it before)
    assert not table.update(_ad(a, 12), now=110.0, age=20.0)
    assert table.live(160.0) == []
    # an ad it published after the drop is proof of life
    assert table.update(_ad(a, 13), now=160.0)
    assert [e.ad.seq for e in table.live(160.0)] == [13]


def test_a_reconnected_member_is_up_at_once_and_down_marks_expire_with_the_ad() -> None:
    a, b = Identity.generate(os.urandom(32)), Identity.generate(os.urandom(32))
    table = PeerTable()
    table.update(_ad(a, 1), now=0.0)
    table.update(_ad(b, 1, ttl_ms=10_000), now=0.0)
    assert table.mark_down(a.peer_id, 1.0)
    assert table.mark_down(b.peer_id, 1.0)
    assert not table.mark_down(a.peer_id, 1.5)  # already down: no second change
    assert table.mark_up(a.peer_id, 2.0)  # connected again
    assert {e.ad.peer_id for e in table.live(2.0)} == {a.peer_id}
    # b's ad expires while it is down: its mark goes with it, and it had left the list
    assert table.expire(11.0) == []
    assert not table.is_down(b.peer_id)
    assert table.get(b.peer_id, 11.0) is None
    assert not table.mark_up(b.peer_id, 11.0)
    assert not table.mark_down("unknown", 11.0)  # nothing to take down


def test_ads_carry_the_wall_clock_bounded_and_optional() -> None:
    a = Identity.generate(os.urandom(32))
    sealed = _ad(a, 1, wall_ms=1_800_000_000_000).sealed(a)
    assert open_ad(sealed).wall_ms == 1_800_000_000_000
    table = PeerTable()
    # received 2 s late through a relay, on a clock that reads 30 s less: +30 s offset
    table.update(open_ad(sealed), now=50.0, age=2.0, wall=1_800_000_000 - 30 + 2)
    assert table.entries[a.peer_id].clock_offset_s == pytest.approx(30.0)
    assert table.entries[a.peer_id].to_json(50.0)["clock_offset_s"] == 30.0
    # an ad from a node before the field existed is still valid, with no offset
    old = _ad(a, 2)
    assert "wall" not in old.to_wire()
    assert open_ad(old.sealed(a)).wall_ms is None
    table.update(old, now=51.0, wall=1_800_000_000.0)
    assert table.entries[a.peer_id].clock_offset_s is None
    for bad in (-1, MAX_WALL_MS + 1, True, 1.5, "now"):
        m = _ad(a, 3).to_wire() | {"wall": bad}
        with pytest.raises(MalformedMessage, match="'wall'"):
            CapabilityAd.from_wire(m)


# --- real daemons -----------------------------------------------------------------------
def _listed(d: Daemon, peer: str) -> bool:
    """Whether ``peer`` is in d's `GET /v1/peers` (what `teammesh peers` prints): polled
    through the API, since a CLI process per poll would add seconds to the figures."""
    with Client.from_home(d.home) as c:
        return peer in {p["peer_id"] for p in c.peers()}


def _wait_listed(watchers: list[Daemon], peer: str, listed: bool, what: str) -> float:
    """Poll until every watcher lists (or no longer lists) ``peer``; the seconds taken."""
    t0 = time.monotonic()
    wait_until(lambda: all(_listed(d, peer) == listed for d in watchers), WAIT_S,
               interval=0.2, what=what)
    return time.monotonic() - t0


@pytest.fixture
def long_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAMMESH_GOSSIP_AD_TTL_S", str(LONG_TTL_S))


def _assert_long_lived(watchers: list[Daemon], peer: str) -> None:
    """Only liveness can take ``peer`` off these lists soon: its ad lives for minutes, and
    each watcher holds a connection to it (whose loss or silence is what takes it off)."""
    def entries() -> list[dict[str, object]]:
        return [next(p for p in d.peers() if p["peer_id"] == peer) for d in watchers]

    def connected() -> list[dict[str, object]] | None:
        e = entries()
        return e if all(x["connected"] for x in e) else None

    listed = wait_until(connected, WAIT_S, interval=0.2, what="every watcher to connect to it")
    for entry in listed:
        assert float(str(entry["expires_in_s"])) > LONG_TTL_S - 60, entry


@pytest.mark.usefixtures("long_ttl")
def test_a_killed_member_leaves_every_list_and_comes_back_when_restarted(
        tmp_path: Path) -> None:
    with mesh(tmp_path, 3) as nodes:
        wait_for_full_mesh(nodes, timeout=60)
        watchers, victim = nodes[:2], nodes[2]
        gone = victim.peer_id
        _assert_long_lived(watchers, gone)
        victim.kill9()
        took = _wait_listed(watchers, gone, False, "the killed member to leave `peers`")
        print(f"kill -9: gone from both lists after {took:.2f} s (ad TTL {LONG_TTL_S} s)")
        for d in watchers:  # as the CLI shows it, and in the status the dashboard reads
            assert gone not in {p["peer_id"] for p in d.peers()}
            st = d.cli("status")
            assert st["live_peers"] == 1, st
        # A member that restarts without having seen it drop takes the other's table by
        # ad sync: the killed member's ad, still within its TTL there, is not relayed.
        watchers[1].stop()
        watchers[1].start()
        wait_until(lambda: _listed(watchers[1], watchers[0].peer_id), WAIT_S,
                   what="the restarted member to sync with the first")
        assert not _listed(watchers[1], gone)
        # (c) the killed member starts again: listed by both at once, as connected
        victim.start()
        took = _wait_listed(watchers, gone, True, "the restarted member to be listed again")
        print(f"restart: listed again after {took:.2f} s")
        _assert_long_lived(watchers, gone)


@pytest.mark.usefixtures("long_ttl")
def test_a_frozen_member_is_down_after_the_keepalive_and_up_when_it_resumes(
        tmp_path: Path) -> None:
    with mesh(tmp_path, 3) as nodes:
        wait_for_full_mesh(nodes, timeout=60)
        watchers, victim = nodes[:2], nodes[2]
        frozen = victim.peer_id
        _assert_long_lived(watchers, frozen)
        assert victim.proc is not None
        pid = victim.proc.pid
        os.kill(pid, signal.SIGSTOP)  # its sockets stay open: only the keepalive can tell
        try:
            took = _wait_listed(watchers, frozen, False, "the frozen member to leave `peers`")
            print(f"SIGSTOP: gone from both lists after {took:.2f} s")
            # the live members still list each other: nobody else was taken down
            assert _listed(watchers[0], watchers[1].peer_id)
            assert _listed(watchers[1], watchers[0].peer_id)
            # placement goes around it: work submitted for peers runs on the live one
            with Client.from_home(watchers[0].home) as c:
                t = c.submit("hash.sha256", b"liveness", where="peers", no_cache=True)
                done = c.task(t["id"], wait=60)
            assert done["state"] == "done", done
            assert watchers[1].peer_id in str(done), done
        finally:
            os.kill(pid, signal.SIGCONT)
        took = _wait_listed(watchers, frozen, True, "the resumed member to be listed again")
        print(f"SIGCONT: listed again after {took:.2f} s")
        _assert_long_lived(watchers, frozen)
        # and the keepalive watches the new connections: a second freeze is seen too
        os.kill(pid, signal.SIGSTOP)
        try:
            took = _wait_listed(watchers, frozen, False, "the member frozen again to leave")
            print(f"SIGSTOP again: gone from both lists after {took:.2f} s")
        finally:
            os.kill(pid, signal.SIGCONT)
        _wait_listed(watchers, frozen, True, "the member resumed again to be listed")


def test_down_notices_only_lower_what_the_observer_had_heard() -> None:
    a, watcher, x = (Identity.generate(os.urandom(32)) for _ in range(3))
    table = PeerTable()
    table.update(_ad(x, 5), now=0.0)
    notice = DownNotice(watcher.peer_id, "t", x.peer_id, 5)
    assert open_down(notice.sealed(watcher)) == notice
    # a member cannot speak for another observer, nor report itself
    with pytest.raises(MalformedMessage, match="signed by"):
        open_down(seal(a, DOMAIN_DOWN, notice.to_wire()))
    with pytest.raises(MalformedMessage, match="itself"):
        open_down(seal(a, DOMAIN_DOWN, DownNotice(a.peer_id, "t", a.peer_id, 5).to_wire()))
    with pytest.raises(MalformedMessage, match="signed by its observer"):
        notice.sealed(a)
    # the observer heard seq 4 last, we have heard 5 since: it is not down for us
    assert not table.apply_notice(DownNotice(watcher.peer_id, "t", x.peer_id, 4), 1.0)
    assert table.apply_notice(notice, 1.0)
    assert table.get(x.peer_id, 1.0) is None
    # its refutation, a newer ad sent DOWN_HOLD_S later, brings it back
    assert table.update(_ad(x, 6), now=1.0 + DOWN_HOLD_S)
    assert table.get(x.peer_id, 1.0 + DOWN_HOLD_S) is not None


@pytest.mark.usefixtures("long_ttl")
def test_members_not_connected_to_a_killed_member_hear_of_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One outbound connection each: both members dial the creator and not each other,
    # so only the creator sees the victim's connection drop.
    monkeypatch.setenv("TEAMMESH_NODE_MAX_PEERS", "1")
    with mesh(tmp_path, 3) as nodes:
        wait_for_full_mesh(nodes, timeout=60)
        hub, far, victim = nodes
        with Client.from_home(far.home) as c:
            entry = next(p for p in c.peers() if p["peer_id"] == victim.peer_id)
        assert entry["connected"] is False, entry  # far knows it by its ad alone
        assert entry["expires_in_s"] > LONG_TTL_S - 60, entry
        victim.kill9()
        took = _wait_listed([hub, far], victim.peer_id, False,
                            "the killed member to leave both lists")
        print(f"kill -9, not connected: gone from both lists after {took:.2f} s")
        assert far.peer_id in {p["peer_id"] for p in hub.peers()}
