"""Mesh service: capability ads on gossip, the live-peer table, and keeping connected.

- Publishes this node's signed ad at start, whenever local capacity changes (coalesced),
  and every ``gossip.ad_interval_s``; peers drop it ``ad_ttl_s`` after they last heard it.
- Validates every ad before gossipsub forwards it: the origin must be a member (or show a
  valid certificate in the ad) and must have signed it. Non-members' ads go nowhere.
- Dials bootstrap addresses and the addresses in members' ads, with exponential backoff
  and jitter per target, and exchanges rosters and ad tables with each member it dials
  (so a node that starts knows the whole team at its first connection, however seldom
  a big team's periodic ads go out).
- Liveness: a member whose connection closes is marked down in the peer table at once
  (within ``LIVENESS_POLL_S``), and so leaves every listing and placement; one that stops
  answering the keepalive ping for ``PING_TIMEOUT_S`` (frozen, or its machine or cable
  gone while the TCP connection stays open) is disconnected, which does the same. It is
  up again as soon as it connects (docs/PROTOCOL.md §5.6).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]
import trio
from teammesh.node.p2p.host import PEER_ERRORS, STREAM_ERRORS, DialError, MeshHost, Stream
from teammesh.node.p2p.membership import Membership, read_message, request_reply
from teammesh.node.p2p.protocol_ids import ADS_SYNC, PING, PING_BYTES, caps_topic
from teammesh.protocols import wire
from teammesh.protocols.capability import (
    DOMAIN_DOWN,
    DOWN_HOLD_S,
    CapabilityAd,
    DownNotice,
    PeerTable,
    open_ad,
    open_down,
)
from teammesh.protocols.errors import RemoteProtocolError
from teammesh.protocols.identity import Identity

import teammesh

logger = logging.getLogger("teammesh.mesh")

DIAL_BACKOFF_MIN_S = 0.25
DIAL_BACKOFF_MAX_S = 30.0
DIAL_TIMEOUT_S = 5.0
DIAL_IDLE_S = 2.0  # nothing to retry: look for lost connections this often
CHANGE_COALESCE_S = 0.05
# Load (busy/queued slots) flips on every task; announcing each flip costs every node a
# gossip relay per task, which profiles showed as most of a worker's CPU during a run of
# short tasks. Load goes out only if it still differs after settling; submitters already
# count what they assigned themselves.
LOAD_SETTLE_S = 0.25
GREET_DELAY_S = 1.2  # a bit over one gossipsub heartbeat
TEAM_ADS_PER_S = 0.5
ADS_SYNC_TIMEOUT_S = 10.0
ADS_SYNC_MAX = 1024  # ads taken from one sync message (a team's table, with room)
# Liveness. A closed connection is seen by the next poll; a silent one by the keepalive:
# of each connected pair, the lower peer id pings every PING_INTERVAL_S on one stream
# and cuts off a peer whose pong is PING_TIMEOUT_S late; the other cuts off a peer whose
# pings stop for PING_INTERVAL_S + PING_TIMEOUT_S. A member that froze just after a ping
# is down within 8.5 s (the goal is 10 s). Each ping costs both nodes about what a gossip
# message does, so the interval is as long as the goal allows (pings every 1.5 s from both
# sides, and polling each peer twice a second, took an idle daemon of a 20-node mesh from
# 0.5 % to 1.6-2.6 % CPU on a loaded machine; docs/BENCHMARKS.md). The timeout is long enough that a loaded machine's late pong is not taken
# for death; gossip the peer forwarded us meanwhile counts as an answer (a starved node
# is slow, a frozen one says nothing at all); and when our own event loop was late (we
# were frozen or starved; see STALL_S) the silence is not held against the peer.
LIVENESS_POLL_S = 0.5
PING_INTERVAL_S = 2.5
PING_TIMEOUT_S = 6.0
PASSIVE_GRACE_S = 2 * PING_INTERVAL_S + 1.0
STALL_S = 2.0
# A member told it was seen down answers with a fresh ad, sent after DOWN_HOLD_S (an ad
# received sooner after the notice does not lift it) and at most once per that period.
REFUTE_AFTER_S = DOWN_HOLD_S + 0.5


@dataclass(slots=True)
class Capacity:
    """What this node offers; the executor updates it and sets ``changed``."""

    slots: int
    busy: int = 0
    queue: int = 0
    kinds: dict[str, str] = field(default_factory=dict)
    cost: float = 1.0
    storage: tuple[str, ...] = ("local",)
    pull: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    # set while a load change is settling: further load changes need not wake anyone
    load_pending: bool = False

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.busy)

    def notify(self) -> None:
        self.changed.set()

    def notify_load(self) -> None:
        if not self.load_pending:
            self.load_pending = True
            self.changed.set()

    def config_key(self) -> tuple[Any, ...]:
        return (self.slots, tuple(sorted(self.kinds.items())), self.cost, self.storage, self.pull)

    def load_key(self) -> tuple[int, int]:
        return (self.free_slots, self.queue)


@dataclass(slots=True)
class _Target:
    addrs: list[str]
    delay: float = DIAL_BACKOFF_MIN_S
    next_at: float = 0.0
    dialing: bool = False
    failures: int = 0
    last_error: str = ""


def dialable_addrs(listen_addrs: list[str], peer_id: str) -> list[str]:
    """Expand wildcard listen addresses into the host's concrete ones, with /p2p/."""
    out: list[str] = []
    for a in listen_addrs:
        parts = a.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] == "0.0.0.0":
            for ifaddrs in psutil.net_if_addrs().values():
                for ia in ifaddrs:
                    if ia.family.name == "AF_INET":
                        out.append("/".join([*parts[:2], ia.address, *parts[3:]]))
        else:
            out.append(a)
    # loopback last: peers on other machines should try the routable ones first
    out.sort(key=lambda s: s.startswith("/ip4/127."))
    return [f"{a}/p2p/{peer_id}" for a in out]


def _peer_of(addr: str) -> str | None:
    return addr.rsplit("/p2p/", 1)[1] if "/p2p/" in addr else None


class Mesh:
    def __init__(self, identity: Identity, membership: Membership, capacity: Capacity,
                 *, interval_s: float, ttl_s: float, bootstrap: list[str], max_peers: int,
                 memory_bytes: int | None = None, gpus: tuple[str, ...] = ()) -> None:
        self.identity = identity
        self.membership = membership
        self.capacity = capacity
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.max_peers = max_peers
        self.table = PeerTable()
        self.seq = int(time.time() * 1000)
        self.cores = os.cpu_count() or 1
        self.memory_bytes = memory_bytes or psutil.virtual_memory().total
        self.gpus = gpus
        self.targets: dict[str, _Target] = {}
        self.bootstrap = bootstrap
        for addr in bootstrap:
            peer = _peer_of(addr)
            if peer and peer != identity.peer_id:
                self.targets.setdefault(peer, _Target([])).addrs.append(addr)
        self._verified: OrderedDict[bytes, CapabilityAd] = OrderedDict()
        # our latest signed ad: ad sync sends it with the table's
        self._own_sealed: bytes | None = None
        self.ads_received = 0
        self.ads_rejected = 0
        self.ads_published = 0
        # called when the live-peer table changes (the task scheduler wakes on it)
        self.on_peers_changed: list[Callable[[], None]] = []
        self._wake_dialer = trio.Event()
        self.host: MeshHost | None = None
        self._last_publish = -1e9
        self._published_config: tuple[Any, ...] | None = None
        self._published_load: tuple[int, int] | None = None
        # liveness: members connected at the last poll, and those with a keepalive running
        self._connected: set[str] = set()
        self._pinging: set[str] = set()
        self._last_tick = 0.0
        self._grace_until = 0.0
        self.keepalive_timeouts = 0
        self.peers_dropped = 0
        self.notices_sent = 0
        self.notices_applied = 0
        self._refuting = False
        # member -> when it last forwarded us gossip: proof of life for the keepalive
        self._heard: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    def _peers_changed(self) -> None:
        for hook in self.on_peers_changed:
            hook()

    # --- ads --------------------------------------------------------------------------
    @property
    def effective_interval_s(self) -> float:
        """The refresh period, stretched in big teams so the whole team sends about one
        periodic ad every two seconds (every node relays every ad, so this is what caps
        gossip CPU: one a second kept 50 idle daemons at 1.0 % each, two at 1.5 %);
        changes are still published at once, and joining nodes get the table by ad sync."""
        n = len(self.table.entries) + 1
        return max(self.interval_s, n / TEAM_ADS_PER_S)

    @property
    def effective_ttl_s(self) -> float:
        return max(self.ttl_s, 3 * self.effective_interval_s)

    def own_ad(self, host: MeshHost) -> CapabilityAd:
        team, _ = self.membership.require_team()
        assert self.membership.cert is not None
        self.seq += 1
        c = self.capacity
        return CapabilityAd(
            peer_id=self.identity.peer_id, team_id=team.team_id,
            addrs=tuple(dialable_addrs(host.listen_addrs, host.peer_id)) if not c.pull else (),
            cores=self.cores, slots=c.slots, free_slots=c.free_slots,
            memory_bytes=self.memory_bytes, gpus=self.gpus, kinds=dict(c.kinds), queue=c.queue,
            cost=c.cost, storage=c.storage, software=teammesh.__version__, seq=self.seq,
            ttl_ms=int(self.effective_ttl_s * 1000), cert=self.membership.cert.packed(),
            pull=c.pull, wall_ms=int(time.time() * 1000),
        )

    def _verify(self, data: bytes) -> CapabilityAd:
        ad = self._verified.get(data)
        if ad is None:
            ad = open_ad(data)
            self._verified[data] = ad
            if len(self._verified) > 512:
                self._verified.popitem(last=False)
        return ad

    def validate(self, origin: str, forwarder: str, data: bytes) -> bool:
        if not self.membership.is_member(forwarder):
            self.ads_rejected += 1
            return False
        self._heard[forwarder] = trio.current_time()
        try:
            ad = self._verify(data)
        except RemoteProtocolError as exc:
            if _is_notice(data):
                return self.validate_notice(origin, forwarder, data)
            self.ads_rejected += 1
            logger.warning("rejected capability ad from %s: %s", origin, exc)
            return False
        team = self.membership.team
        if ad.peer_id != origin or team is None or ad.team_id != team.team_id:
            self.ads_rejected += 1
            return False
        if not self.membership.is_member(origin):
            # An ad carries its author's certificate: a member we have not heard of yet.
            try:
                self.membership.learn_certificate(ad.cert)
            except RemoteProtocolError:
                pass
            if not self.membership.is_member(origin):
                self.ads_rejected += 1
                logger.warning("rejected capability ad from non-member %s", origin)
                return False
        return True

    def on_ad(self, origin: str, data: bytes, age: float = 0.0) -> None:
        if origin == self.identity.peer_id:
            return
        try:
            ad = self._verify(data)
        except RemoteProtocolError:
            if age == 0.0 and self.host is not None and _is_notice(data):
                self.on_notice(self.host, data)  # down notices share the caps topic
            return
        self.ads_received += 1
        if not self.membership.is_member(ad.peer_id):
            return
        if self.table.update(ad, trio.current_time(), age, data, wall=time.time()):
            self._peers_changed()
        if ad.addrs and ad.peer_id not in self.targets:
            self.targets[ad.peer_id] = _Target(list(ad.addrs))
            self._wake_dialer.set()
            self._remember(ad.peer_id, list(ad.addrs))
        elif ad.addrs and self.targets[ad.peer_id].addrs != list(ad.addrs):
            # It moved (a restart on another port): the backoff earned by its old address
            # says nothing about the new one, so dial it now.
            target = self.targets[ad.peer_id]
            target.addrs = list(ad.addrs)
            target.delay = DIAL_BACKOFF_MIN_S
            target.next_at = 0.0
            self._wake_dialer.set()
            self._remember(ad.peer_id, list(ad.addrs))

    def _remember(self, peer_id: str, addrs: list[str]) -> None:
        # Peer exchange across restarts: a node that comes back (the team's creator has no
        # bootstrap address) dials the members it knew instead of waiting to be found.
        journal = self.membership.journal
        known = json.loads(journal.get("peers") or b"{}")
        known[peer_id] = addrs
        journal.put("peers", json.dumps(known).encode())

    def load_known_peers(self) -> None:
        known = json.loads(self.membership.journal.get("peers") or b"{}")
        for peer, addrs in known.items():
            if peer != self.identity.peer_id and self.membership.is_member(peer):
                self.targets.setdefault(peer, _Target(list(addrs)))

    def forget(self, peer_id: str) -> None:
        self.table.remove(peer_id)
        self.targets.pop(peer_id, None)

    # --- ad sync (/teammesh/ads/1.0.0) -------------------------------------------------
    def _ads_message(self) -> bytes:
        now = trio.current_time()
        ads: list[list[Any]] = []
        if self._own_sealed is not None:
            ads.append([self._own_sealed, 0])
        for e in self.table.live(now):
            if e.sealed:
                ads.append([e.sealed, int((now - e.received) * 1000)])
        return wire.frame_message({"t": "ads", "v": 1, "ads": ads})

    def apply_ads(self, sender: str, m: wire.Message) -> int:
        """Take the ads a member sent us, each checked as if it had come over gossip
        with ``sender`` as the forwarder; return how many were accepted."""
        if m.get("t") != "ads":
            raise RemoteProtocolError("expected an ads message")
        accepted = 0
        for item in wire.field_list(m, "ads")[:ADS_SYNC_MAX]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes)
                    and isinstance(item[1], int)):
                self.ads_rejected += 1
                continue
            data, age_ms = item
            try:
                origin = self._verify(data).peer_id
            except RemoteProtocolError:
                self.ads_rejected += 1
                continue
            if origin != self.identity.peer_id and self.validate(origin, sender, data):
                self.on_ad(origin, data, age_ms / 1000)
                accepted += 1
        return accepted

    async def handle_ads_sync(self, stream: Stream) -> None:
        request = await read_message(stream, wire.MAX_FRAME_BYTES, ADS_SYNC_TIMEOUT_S)
        self.apply_ads(stream.peer_id, request)  # a malformed request gets no answer
        await stream.write(self._ads_message())
        await stream.close()

    async def sync_ads_with(self, host: MeshHost, peer_id: str) -> None:
        """Exchange ad tables with a member we just dialed."""
        try:
            self.apply_ads(peer_id, await request_reply(host, peer_id, ADS_SYNC,
                                                        self._ads_message(), ADS_SYNC_TIMEOUT_S))
        except PEER_ERRORS as exc:
            logger.debug("ad sync with %s failed: %s", peer_id, exc)

    def live_peers(self) -> list[dict[str, Any]]:
        """Members that are up (down ones are left out: see docs/PROTOCOL.md §5.6), with
        whether we hold a connection to them (a connected peer's liveness is checked by
        the keepalive; others' only by their ads' expiry)."""
        now = trio.current_time()
        return [e.to_json(now) | {"connected": e.ad.peer_id in self._connected}
                for e in self.table.live(now)]

    def down_peers(self) -> list[dict[str, Any]]:
        """Members seen to drop whose ad has not expired yet: held back from the live list
        until they connect again or publish a newer ad."""
        now = trio.current_time()
        return [{"peer_id": e.ad.peer_id, "down_for_s": round(now - mark.at, 3),
                 "expires_in_s": round(e.expires - now, 3)}
                for e, mark in self.table.down_entries(now)]

    # --- liveness -------------------------------------------------------------------------
    def _stalled(self) -> bool:
        now = trio.current_time()
        return now - self._last_tick > STALL_S or now < self._grace_until

    def _set_down(self, peer: str, why: str) -> None:
        now = trio.current_time()
        entry = self.table.entries.get(peer)
        if not self.table.mark_down(peer, now):
            return
        self.peers_dropped += 1
        logger.info("member %s is down: %s", peer, why)
        self._peers_changed()
        # Tell the members that are not connected to it. Not when we were the one frozen
        # or starved, nor when we lost every connection: then the fault is likely ours,
        # and such notices would only make healthy members refute them.
        connected = self.host is not None and any(
            p != peer and self.membership.is_member(p) for p in self.host.connected_peers())
        if (entry is not None and connected and not self._stalled()
                and self._nursery is not None and self.host is not None):
            self._nursery.start_soon(self._publish_down, self.host, peer, entry.ad.seq)

    async def _publish_down(self, host: MeshHost, peer: str, seq: int) -> None:
        team, _ = self.membership.require_team()
        notice = DownNotice(self.identity.peer_id, team.team_id, peer, seq)
        try:
            await host.publish(caps_topic(team.team_id), notice.sealed(self.identity))
            self.notices_sent += 1
        except STREAM_ERRORS:
            logger.debug("down notice publish failed", exc_info=True)

    def validate_notice(self, origin: str, forwarder: str, data: bytes) -> bool:
        team = self.membership.team
        try:
            notice = open_down(data)
        except RemoteProtocolError as exc:
            logger.warning("rejected down notice from %s: %s", origin, exc)
            return False
        if not self.membership.is_member(forwarder):
            return False
        self._heard[forwarder] = trio.current_time()
        return (team is not None and notice.team_id == team.team_id
                and notice.observer == origin and self.membership.is_member(origin))

    def on_notice(self, host: MeshHost, data: bytes) -> None:
        try:
            notice = open_down(data)
        except RemoteProtocolError:
            return
        if notice.peer_id == self.identity.peer_id:
            # Someone lost us (its own blip, or a link between us): show the team we are
            # alive with an ad newer than the one the notice names.
            if not self._refuting and self._nursery is not None:
                self._refuting = True
                self._nursery.start_soon(self._refute, host)
            return
        if notice.peer_id in self._connected:
            return  # our keepalive watches it: a third party's view does not override it
        if self.table.apply_notice(notice, trio.current_time()):
            self.notices_applied += 1
            logger.info("member %s is down: %s saw it drop", notice.peer_id, notice.observer)
            self._peers_changed()

    async def _refute(self, host: MeshHost) -> None:
        try:
            await trio.sleep(REFUTE_AFTER_S)
            team, _ = self.membership.require_team()
            await self.publish_now(host, caps_topic(team.team_id))
        finally:
            self._refuting = False

    def _set_up(self, peer: str) -> None:
        if self.table.mark_up(peer, trio.current_time()):
            logger.info("member %s is up again", peer)
            self._peers_changed()

    async def _liveness_loop(self, host: MeshHost, nursery: trio.Nursery) -> None:
        self._last_tick = trio.current_time()
        while True:
            await trio.sleep(LIVENESS_POLL_S)
            now = trio.current_time()
            if now - self._last_tick > STALL_S:
                # We were frozen or starved: pings that timed out meanwhile say nothing
                # about the peers; give them one more timeout.
                self._grace_until = now + PING_TIMEOUT_S
                logger.info("event loop was %.1f s late: keepalive timeouts deferred",
                            now - self._last_tick - LIVENESS_POLL_S)
            self._last_tick = now
            connected = {p for p in host.connected_peers() if self.membership.is_member(p)}
            for peer in self._connected - connected:
                self._set_down(peer, "connection closed")
            for peer in connected - self._connected:
                self._set_up(peer)
            for peer in connected - self._pinging:
                self._pinging.add(peer)
                nursery.start_soon(self._keepalive, host, peer)
            self._connected = connected

    async def _keepalive(self, host: MeshHost, peer: str) -> None:
        """Watch ``peer`` while we are connected to it; cut it off when it goes silent.

        One side of each pair pings (the lower peer id), the other watches the pings
        arrive: half the frames of both pinging (each costs a node about as much CPU as
        a gossip message). A peer that has not pinged us PASSIVE_GRACE_S after we
        connected (a node from before session 7, or one that froze at once) is pinged."""
        try:
            if await self._watch_pings(host, peer):
                await self._ping_loop(host, peer)
        finally:
            self._pinging.discard(peer)

    async def _watch_pings(self, host: MeshHost, peer: str) -> bool:
        """The passive side: return True if ``peer`` should be pinged instead."""
        start = trio.current_time()
        if self.identity.peer_id < peer:
            return True
        # Wake when the peer's silence would reach the limit, not on every poll: with a
        # dozen connections, polling each twice a second cost more than the pings.
        while peer in self._connected:
            now = trio.current_time()
            heard = host.last_ping_from(peer)
            if heard is not None:
                heard = max(heard, self._heard.get(peer, heard))
            if heard is None or heard < start:
                if now - start > PASSIVE_GRACE_S:
                    return True  # it does not ping us: ping it
                wake = start + PASSIVE_GRACE_S
            else:
                if self.table.is_down(peer):
                    self._set_up(peer)
                silent = now - heard
                if silent > PING_INTERVAL_S + PING_TIMEOUT_S:
                    if not self._stalled():
                        await self._silent(host, peer, silent)
                        return False
                    start = now  # we were the late one: count again from now
                    host.stats.pings_from.pop(peer, None)
                    wake = now + PASSIVE_GRACE_S
                else:
                    wake = heard + PING_INTERVAL_S + PING_TIMEOUT_S
            await trio.sleep(max(LIVENESS_POLL_S, wake - now + 0.01))
        return False

    async def _silent(self, host: MeshHost, peer: str, silent: float) -> None:
        self.keepalive_timeouts += 1
        self._set_down(peer, f"no answer to keepalive for {silent:.1f} s")
        with trio.move_on_after(2):
            await host.disconnect(peer)

    async def _ping_loop(self, host: MeshHost, peer: str) -> None:
        stream: Stream | None = None
        last_heard = trio.current_time()
        try:
            while peer in self._connected:
                payload = os.urandom(PING_BYTES)
                try:
                    with trio.fail_after(PING_TIMEOUT_S):
                        if stream is None:
                            stream = await host.open_stream(peer, PING)
                        await stream.write(payload)
                        echo = b""
                        while len(echo) < PING_BYTES:
                            chunk = await stream.read(PING_BYTES - len(echo))
                            if not chunk:
                                raise RemoteProtocolError("ping stream closed")
                            echo += chunk
                    if echo != payload:
                        raise RemoteProtocolError("ping answered with other bytes")
                    last_heard = trio.current_time()
                    self._set_up(peer)
                except PEER_ERRORS as exc:
                    if stream is not None:
                        await stream.reset()
                        stream = None
                    if not host.is_connected(peer):
                        return
                    now = trio.current_time()
                    if self._stalled():  # we were the late one: count again from now
                        last_heard = now
                    # gossip it forwarded meanwhile: slow, not gone
                    last_heard = max(last_heard, self._heard.get(peer, last_heard))
                    silent = now - last_heard
                    if silent >= PING_TIMEOUT_S:
                        await self._silent(host, peer, silent)
                        return
                    logger.debug("keepalive ping to %s failed (%s); heard from it %.1f s"
                                 " ago", peer, type(exc).__name__, silent)
                await trio.sleep(PING_INTERVAL_S)
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await stream.close()

    # --- service ----------------------------------------------------------------------
    async def run(self, host: MeshHost, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        team, _ = self.membership.require_team()
        self.host = host
        topic = caps_topic(team.team_id)
        host.set_validator(topic, self.validate)
        host.set_handler(ADS_SYNC, self.handle_ads_sync)
        self.membership.on_revoked.append(self.forget)
        self.load_known_peers()
        async with host.subscribe(topic) as messages, trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._publish_loop, host, topic)
            nursery.start_soon(self._expire_loop)
            nursery.start_soon(self._dial_loop, host, nursery)
            nursery.start_soon(self._liveness_loop, host, nursery)
            task_status.started()
            async for origin, data in messages:
                self.on_ad(origin, data)

    async def publish_now(self, host: MeshHost, topic: str) -> None:
        try:
            self._last_publish = trio.current_time()
            self._published_config = self.capacity.config_key()
            self._published_load = self.capacity.load_key()
            self.capacity.load_pending = False  # this ad carries the current load
            self._own_sealed = self.own_ad(host).sealed(self.identity)
            await host.publish(topic, self._own_sealed)
            self.ads_published += 1
        except STREAM_ERRORS:
            logger.debug("ad publish failed", exc_info=True)

    async def _publish_loop(self, host: MeshHost, topic: str) -> None:
        known: set[str] = set()
        next_periodic = 0.0
        greet_at: float | None = None
        load_due: float | None = None
        while True:
            now = trio.current_time()
            if load_due is not None and now >= load_due:
                load_due = None
                self.capacity.load_pending = False
                if self.capacity.load_key() != self._published_load:
                    next_periodic = now
            if now >= next_periodic or (greet_at is not None and now >= greet_at):
                await self.publish_now(host, topic)
                next_periodic = trio.current_time() + self.effective_interval_s
                greet_at = None
            wake = min(next_periodic, greet_at or next_periodic, load_due or next_periodic,
                       trio.current_time() + 1.0)
            with trio.move_on_at(wake):
                await self.capacity.changed.wait()
                self.capacity.changed = trio.Event()
                if self.capacity.config_key() != self._published_config:
                    # A change goes out at once unless an ad left in the last 50 ms; then
                    # a burst is folded into one ad at most 50 ms on.
                    next_periodic = min(next_periodic,
                                        self._last_publish + CHANGE_COALESCE_S)
                elif load_due is None and self.capacity.load_key() != self._published_load:
                    load_due = trio.current_time() + LOAD_SETTLE_S
                elif load_due is None:
                    self.capacity.load_pending = False  # back to what we announced
            # A member that just connected has none of our state: greet it once the gossip
            # mesh has had a heartbeat to take it in, instead of after a full interval.
            connected = set(host.connected_peers())
            if connected - known and greet_at is None:
                greet_at = trio.current_time() + GREET_DELAY_S
            known = connected

    async def _expire_loop(self) -> None:
        while True:
            # sleep until the next ad can expire (idle CPU matters with many nodes)
            now = trio.current_time()
            soonest = min((e.expires for e in self.table.entries.values()), default=now + 5)
            await trio.sleep(max(0.05, min(5.0, soonest - now + 0.01)))
            if self.table.expire(trio.current_time()):
                self._peers_changed()

    async def _dial_loop(self, host: MeshHost, nursery: trio.Nursery) -> None:
        while True:
            now = trio.current_time()
            connected = set(host.connected_peers())
            budget = self.max_peers - len(connected)
            for peer, target in list(self.targets.items()):
                if peer in connected or target.dialing or target.next_at > now:
                    continue
                if budget <= 0 and peer not in self._bootstrap_peers():
                    continue
                if not self.membership.is_member(peer) and peer not in self._bootstrap_peers():
                    continue
                target.dialing = True
                budget -= 1
                nursery.start_soon(self._dial, host, peer, target)
            pending = any(t.next_at > trio.current_time() for t in self.targets.values())
            with trio.move_on_after(0.5 if pending else DIAL_IDLE_S):
                await self._wake_dialer.wait()
            self._wake_dialer = trio.Event()

    def _bootstrap_peers(self) -> set[str]:
        return {p for p in (_peer_of(a) for a in self.bootstrap) if p}

    async def _dial(self, host: MeshHost, peer: str, target: _Target) -> None:
        try:
            for addr in target.addrs:
                try:
                    with trio.fail_after(DIAL_TIMEOUT_S):
                        await host.connect(addr)
                except (DialError, trio.TooSlowError) as exc:
                    target.last_error = str(exc)
                    continue
                target.delay = DIAL_BACKOFF_MIN_S
                target.failures = 0
                await self.membership.sync_with(host, peer)
                await self.sync_ads_with(host, peer)
                return
            target.failures += 1
            target.next_at = trio.current_time() + target.delay * random.uniform(0.8, 1.2)
            target.delay = min(DIAL_BACKOFF_MAX_S, target.delay * 2)
            if target.failures == 1 or target.failures % 10 == 0:
                logger.info("cannot reach %s (%d tries): %s", peer, target.failures,
                            target.last_error[:200])
        finally:
            target.dialing = False


def _is_notice(data: bytes) -> bool:
    """Whether a caps-topic message is a signed down notice rather than an ad (cheap: the
    envelope's domain, no signature check)."""
    try:
        return wire.unpack(data, max_bytes=wire.MAX_GOSSIP_BYTES).get("d") == DOMAIN_DOWN
    except RemoteProtocolError:
        return False


def is_loopback(addr: str) -> bool:
    parts = addr.split("/")
    try:
        return len(parts) > 2 and ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False
