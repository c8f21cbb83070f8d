"""The libp2p boundary: the only module that imports py-libp2p.

Everything above this speaks peer ids as base58 strings, multiaddrs as strings, streams as
``Stream`` and gossip as (origin, forwarder, bytes). What this module fixes in py-libp2p
0.8.1 (see docs/DECISIONS.md, "py-libp2p"):

- Security and muxing are pinned to Noise + yamux; the library's default also offers
  /plaintext/2.0.0 (any peer can claim any id), SECIO and mplex.
- Membership is enforced inside the Noise handshake (``GatedNoise``): a non-member's
  connection is dropped before muxing, so no stream, identify or gossip of it exists.
- py-libp2p's identify and ping answer members only (an outside Bitswap peer gets an
  identify naming Bitswap alone); each peer may hold ``MAX_INBOUND_STREAMS_PER_PEER``
  inbound streams per protocol, and a revoked peer's streams can be reset at once
  (``drop_peer``).
- Stream handlers never raise: an exception escaping any handler tears down the host.
  Pubsub's own handler is re-registered behind a guard (one bad protobuf frame on
  /meshsub/* would otherwise kill the process).
- Every inbound connection holds a slot of the swarm's inbound limiter until the host
  stops; the wrapper releases it when the connection closes, so reconnect storms and
  laptops that come and go do not exhaust it.
- py-libp2p's AutoConnector is off: it dialled every peer in the peerstore (aiming at 150
  connections); the Mesh dialer keeps ``node.max_peers``.
- ``max_connections_per_peer=1`` (else every dial waits 250 ms), gossipsub heartbeat 1 s,
  and its adaptive/spam/eclipse protections off (they silently drop or slow our traffic).
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr  # type: ignore[import-untyped]
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL_ID
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from teammesh.node.p2p import yamux_io
from teammesh.protocols.bitswap import BITSWAP_PROTOCOLS
from teammesh.protocols.errors import RemoteProtocolError, TeammeshError, leaves
from teammesh.protocols.wire import encode_varint

logger = logging.getLogger("teammesh.host")
for _name in ("libp2p", "multiaddr"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

GOSSIP_HEARTBEAT_S = 1.0
MAX_GOSSIP_RPC_BYTES = 1024 * 1024
# Inbound streams one peer may have open at once on one protocol; more are reset, so one
# member cannot tie up every handler (a task session and a Bitswap session each use one).
MAX_INBOUND_STREAMS_PER_PEER = 64
# A member that sends this many malformed messages (or trips handlers) within the window
# is benched: its connection closed and its streams refused for a while, doubling each
# time it comes back and does it again. One bad message costs a stream; a stream of them
# costs the peer its access, not the node its time.
STRIKES_PER_WINDOW = 10
STRIKE_WINDOW_S = 60.0
BENCH_BASE_S = 30.0
BENCH_MAX_S = 600.0


# Exceptions that mean "this stream or connection is gone", as opposed to our bugs.
STREAM_ERRORS: tuple[type[BaseException], ...] = (
    StreamEOF, StreamReset, StreamClosed, StreamError, ConnectionError, OSError,
)


class HostError(TeammeshError):
    pass


class DialError(HostError):
    pass


# A peer failed us: unreachable, malformed, too slow or its stream gone. Any of these ends
# one exchange with that peer, never the service that started it.
PEER_ERRORS: tuple[type[BaseException], ...] = (
    DialError, RemoteProtocolError, trio.TooSlowError, *STREAM_ERRORS)


PeerGate = Callable[[str], bool]
StreamGate = Callable[[str, str], bool]
GossipValidator = Callable[[str, str, bytes], bool]


class Stream:
    """One libp2p stream: bytes in, bytes out, with the authenticated remote peer id."""

    __slots__ = ("_s", "peer_id", "protocol")

    def __init__(self, s: Any, protocol: str) -> None:
        self._s = s
        self.protocol = protocol
        self.peer_id = str(s.muxed_conn.peer_id)

    async def read(self, n: int = 65536) -> bytes:
        """Up to n bytes; b"" at end of stream."""
        return await yamux_io.read_stream(self._s, n)

    async def write(self, data: bytes) -> None:
        await yamux_io.write_stream(self._s, data)

    async def close_write(self) -> None:
        await self._s.close_write()

    async def close(self) -> None:
        try:
            await self._s.close()
        except STREAM_ERRORS:
            pass

    async def reset(self) -> None:
        try:
            await self._s.reset()
        except STREAM_ERRORS:
            pass


class GatedNoise(NoiseTransport):
    """Noise that refuses, right after the handshake, any peer the gate does not admit."""

    def __init__(self, key_pair: Any, gate: PeerGate, on_refuse: Callable[[str], None]) -> None:
        super().__init__(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self._gate = gate
        self._on_refuse = on_refuse

    async def _check(self, conn: Any) -> Any:
        peer = str(conn.get_remote_peer())
        if not self._gate(peer):
            self._on_refuse(peer)
            await conn.close()
            raise HandshakeFailure(f"peer {peer} is not a member of this team")
        return conn

    async def secure_inbound(self, conn: Any) -> Any:
        return await self._check(await super().secure_inbound(conn))

    async def secure_outbound(self, conn: Any, peer_id: Any) -> Any:
        return await self._check(await super().secure_outbound(conn, peer_id))


@dataclass(slots=True)
class HostStats:
    refused_handshakes: int = 0
    refused_streams: int = 0
    excess_streams: int = 0  # over MAX_INBOUND_STREAMS_PER_PEER, reset
    bad_gossip_streams: int = 0
    bad_gossip_messages: int = 0
    handler_errors: int = 0
    inbound_connections: int = 0
    penalised: int = 0  # times a peer was benched for misbehaving
    inbound_peers: set[str] = field(default_factory=set)
    # member -> trio time of the last keepalive ping it sent us (one side of each pair
    # pings, the other watches these; see node/p2p/mesh.py)
    pings_from: dict[str, float] = field(default_factory=dict)
    observed: dict[str, set[str]] = field(default_factory=dict)  # our addr -> observers


class MeshHost:
    """A running libp2p host with gossipsub, seen through teammesh's small vocabulary."""

    def __init__(self, host: Any, pubsub: Any, stats: HostStats, stream_gate: StreamGate) -> None:
        self._host = host
        self._pubsub = pubsub
        self.stats = stats
        self._stream_gate = stream_gate
        self.peer_id = str(host.get_id())
        # inbound streams being served, by peer: a revoked peer's are reset at once
        self._inbound: dict[str, set[Stream]] = {}
        self._open: dict[tuple[str, str], int] = {}  # (peer, protocol) -> streams served
        self._strikes: dict[str, list[float]] = {}  # peer -> recent misbehaviour times
        self._benched: dict[str, tuple[float, int]] = {}  # peer -> (until, times benched)

    def benched(self, peer_id: str) -> bool:
        b = self._benched.get(peer_id)
        return b is not None and time.monotonic() < b[0]

    async def strike(self, peer_id: str, reason: str) -> None:
        """Count one misbehaviour of ``peer_id`` (logged with its id); bench it when they
        add up (see STRIKES_PER_WINDOW)."""
        now = time.monotonic()
        recent = [t for t in self._strikes.get(peer_id, []) if t > now - STRIKE_WINDOW_S]
        recent.append(now)
        self._strikes[peer_id] = recent
        if len(self._strikes) > 4096:  # bounded whoever misbehaves
            self._strikes.pop(next(iter(self._strikes)))
        if len(recent) < STRIKES_PER_WINDOW or self.benched(peer_id):
            return
        times = self._benched.get(peer_id, (0.0, 0))[1]
        period = min(BENCH_MAX_S, BENCH_BASE_S * 2 ** times)
        self._benched[peer_id] = (now + period, times + 1)
        self._strikes.pop(peer_id, None)
        self.stats.penalised += 1
        logger.warning("penalising %s: %d protocol errors in %.0f s (last: %s); its streams"
                       " are refused for %.0f s", peer_id, len(recent), STRIKE_WINDOW_S,
                       reason, period)
        for stream in list(self._inbound.get(peer_id, ())):
            await stream.reset()
        await self.disconnect(peer_id)

    @property
    def listen_addrs(self) -> list[str]:
        return [str(a) for a in self._host.get_transport_addrs()]

    @property
    def addrs(self) -> list[str]:
        return [f"{a}/p2p/{self.peer_id}" for a in self.listen_addrs]

    def connected_peers(self) -> list[str]:
        return [str(p) for p in self._host.get_connected_peers()]

    def last_ping_from(self, peer_id: str) -> float | None:
        """When (trio time) ``peer_id`` last sent us a keepalive ping, if ever."""
        return self.stats.pings_from.get(peer_id)

    def is_connected(self, peer_id: str) -> bool:
        return bool(self._host.get_network().get_connections(ID.from_base58(peer_id)))

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (with /p2p/); returns the peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:  # multiaddr raises assorted types on bad text
            raise DialError(f"bad multiaddr {addr!r}: {exc}") from exc
        # A failed dial puts the peer in a 60 s negative cache; we retry on our own schedule.
        self._host.get_network().unblock_peer(info.peer_id)
        if not self.is_connected(str(info.peer_id)):
            # The swarm dials at most one peerstore address per transport class, so a
            # member that restarted on another port was dialled at its dead old address
            # forever. Callers try each address they know in turn: dial this one.
            self._host.get_peerstore().clear_addrs(info.peer_id)
        try:
            await self._host.connect(info)
        except Exception as exc:  # the swarm wraps every failure in its own types
            raise DialError(f"cannot reach {addr}: {exc}") from exc
        return str(info.peer_id)

    def add_addrs(self, peer_id: str, addrs: list[str]) -> None:
        pid = ID.from_base58(peer_id)
        maddrs = []
        for a in addrs:
            try:
                maddrs.append(multiaddr.Multiaddr(a.split("/p2p/")[0]))
            except Exception:  # a peer's bad address must not stop the good ones
                continue
        if maddrs:
            self._host.get_peerstore().add_addrs(pid, maddrs, 3600)

    async def disconnect(self, peer_id: str) -> None:
        try:
            await self._host.disconnect(ID.from_base58(peer_id))
        except Exception:  # already gone is fine
            logger.debug("disconnect %s failed", peer_id, exc_info=True)

    def blacklist(self, peer_id: str) -> None:
        if self._pubsub is not None:
            self._pubsub.add_to_blacklist(ID.from_base58(peer_id))

    def inbound_streams(self, peer_id: str) -> int:
        """How many of ``peer_id``'s inbound streams a handler is serving now."""
        return len(self._inbound.get(peer_id, ()))

    async def drop_peer(self, peer_id: str) -> None:
        """Cut a peer off now: reset every stream of it we serve, close its connections
        and stop relaying its gossip. The gates must already refuse it (a revocation is
        in the roster before this runs), so it cannot come straight back."""
        self.blacklist(peer_id)
        for stream in list(self._inbound.get(peer_id, ())):
            await stream.reset()
        await self.disconnect(peer_id)

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        try:
            s = await self._host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        except Exception as exc:  # negotiation, dial and muxer errors all mean "not now"
            raise DialError(f"cannot open {protocol} to {peer_id}: {exc}") from exc
        return Stream(s, protocol)

    def set_handler(self, protocol: str, handler: Callable[[Stream], Awaitable[None]]) -> None:
        """Register a handler that runs only for admitted peers and can never kill the host."""

        async def guarded(raw: Any) -> None:
            stream = Stream(raw, protocol)
            if not self._stream_gate(stream.peer_id, protocol):
                self.stats.refused_streams += 1
                logger.warning("refused %s stream from non-member %s", protocol, stream.peer_id)
                await stream.reset()
                return
            if self.benched(stream.peer_id):
                self.stats.refused_streams += 1
                await stream.reset()
                return
            key = (stream.peer_id, protocol)
            if self._open.get(key, 0) >= MAX_INBOUND_STREAMS_PER_PEER:
                self.stats.excess_streams += 1
                if self.stats.excess_streams % 100 == 1:  # a flood must not flood the log
                    logger.warning("reset %s stream from %s: %d already open (limit %d)",
                                   protocol, stream.peer_id, self._open[key],
                                   MAX_INBOUND_STREAMS_PER_PEER)
                await stream.reset()
                return
            self._open[key] = self._open.get(key, 0) + 1
            served = self._inbound.setdefault(stream.peer_id, set())
            served.add(stream)
            try:
                await handler(stream)
            except STREAM_ERRORS:
                await stream.reset()
            except TeammeshError as exc:
                logger.warning("%s from %s: %s", protocol, stream.peer_id, exc)
                await stream.reset()
                await self.strike(stream.peer_id, str(exc))
            except ExceptionGroup as group:
                # handlers with their own nursery wrap what they raise
                errors = leaves(group)
                if all(isinstance(e, (*STREAM_ERRORS, TeammeshError)) for e in errors):
                    logger.warning("%s from %s: %s", protocol, stream.peer_id,
                                   "; ".join(str(e) or type(e).__name__ for e in errors))
                else:
                    self.stats.handler_errors += 1
                    logger.error("%s handler failed for %s", protocol, stream.peer_id,
                                 exc_info=group)
                await stream.reset()
                if any(isinstance(e, TeammeshError) for e in errors):
                    await self.strike(stream.peer_id, "; ".join(map(str, errors)))
            except Exception as exc:  # a handler bug must cost one stream, not the node
                self.stats.handler_errors += 1
                logger.exception("%s handler failed for %s", protocol, stream.peer_id)
                await stream.reset()
                await self.strike(stream.peer_id, f"{type(exc).__name__}: {exc}")
            finally:
                served.discard(stream)
                if not served:
                    self._inbound.pop(stream.peer_id, None)
                left = self._open[key] - 1
                if left:
                    self._open[key] = left
                else:
                    del self._open[key]

        self._host.set_stream_handler(TProtocol(protocol), guarded)

    async def publish(self, topic: str, data: bytes) -> None:
        await self._pubsub.publish(topic, data)

    def set_validator(self, topic: str, validator: GossipValidator) -> None:
        def check(forwarder: Any, msg: Any) -> bool:
            try:
                origin = str(ID(msg.from_id))
                return validator(origin, str(forwarder), bytes(msg.data))
            except Exception:  # a validator bug rejects the message, nothing more
                logger.warning("gossip validator failed", exc_info=True)
                return False

        self._pubsub.set_topic_validator(topic, check, False)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[AsyncIterator[tuple[str, bytes]]]:
        sub = await self._pubsub.subscribe(topic)

        async def messages() -> AsyncIterator[tuple[str, bytes]]:
            async for msg in sub:
                yield _peer_b58(bytes(msg.from_id)), bytes(msg.data)

        try:
            yield messages()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self._pubsub.unsubscribe(topic)
                except Exception:  # shutdown is best effort
                    logger.debug("unsubscribe failed", exc_info=True)

    def gossip_peers(self, topic: str) -> list[str]:
        return [str(p) for p in self._pubsub.peer_topics.get(topic, ())]


def _disable_auto_connector(swarm: Any) -> None:
    """Our Mesh dialer owns outbound connections (``node.max_peers``).

    py-libp2p's AutoConnector aims at the middle of its watermarks (150 connections) and,
    every 10-30 s, dials up to 32 not-connected peers from the peerstore, which identify
    and gossip fill with every member: at 20-50 loopback daemons each node drifted to
    dozens of connections, each one more gossipsub peer to heartbeat and gossip to.
    """

    async def no_auto_connect() -> None:
        return None

    swarm.auto_connector.maybe_connect = no_auto_connect


def _patch_inbound_release(swarm: Any, stats: HostStats) -> None:
    original = swarm.upgrade_inbound_raw_conn

    async def upgrade_and_release(raw_conn: Any, maddr: Any) -> Any:
        muxed = await original(raw_conn, maddr)
        stats.inbound_connections += 1
        peer = getattr(muxed, "peer_id", None)
        if peer is not None:
            stats.inbound_peers.add(str(peer))
        # py-libp2p keeps the caller (and its inbound-limiter slot) alive until the host
        # stops; returning once the connection closes frees the slot.
        await muxed.event_closed.wait()
        raise ConnectionError("inbound connection closed")

    swarm.upgrade_inbound_raw_conn = upgrade_and_release


@functools.lru_cache(maxsize=1024)
def _peer_b58(raw: bytes) -> str:
    # A fresh ID per message computes its base58 form anew (pure Python, ~14 % of an idle
    # daemon's CPU at 50 nodes, py-spy); a team has few senders.
    return str(ID(raw))


LOCAL_RECORD_REUSE_S = 5.0


def _wrap_pubsub_helper(name: str, wrap: Callable[[Any], Any]) -> None:
    """Replace py-libp2p's pubsub helper function ``name`` with ``wrap(original)``, once
    per process; pubsub and gossipsub each import it by name, so both are patched."""
    import libp2p.pubsub.gossipsub as gs_mod
    import libp2p.pubsub.pubsub as ps_mod

    original = getattr(ps_mod, name)
    if getattr(original, "_teammesh_wrapped", False):
        return
    wrapped = wrap(original)
    wrapped._teammesh_wrapped = True
    setattr(ps_mod, name, wrapped)
    setattr(gs_mod, name, wrapped)


def _cache_local_record(original: Any) -> Any:
    """Build our signed peer record once every few seconds, not for every gossip RPC.

    py-libp2p attaches it to every pubsub RPC it sends and rebuilds it each time from
    ``host.get_addrs()`` (a getsockname per listener, multiaddr and netaddr parsing) before
    re-marshalling the same envelope. Listen addresses change only when a listener starts
    or stops, and a record a few seconds stale is harmless: teammesh dials from its own
    signed capability ads. Identify, which announces address changes, keeps the original.
    """
    made: weakref.WeakKeyDictionary[Any, tuple[float, bytes]] = weakref.WeakKeyDictionary()

    def cached(host: Any) -> tuple[bytes, bool]:
        now = time.monotonic()
        hit = made.get(host)
        if hit is not None and now - hit[0] < LOCAL_RECORD_REUSE_S:
            return hit[1], False
        envelope, fresh = original(host)
        made[host] = (now, envelope)
        return envelope, fresh

    return cached


def _cache_sender_records(original: Any) -> Any:
    """Verify each peer's signed peer record once, not on every gossip RPC.

    py-libp2p attaches the sender's signed record to every pubsub RPC and verifies it on
    receipt (about 7 % of a node's gossip CPU, measured). A record that verified once is
    the same bytes next time; remember it.
    """
    seen: dict[tuple[str, bytes], bool] = {}

    def cached(msg: Any, host: Any, peer_id: Any) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (str(peer_id), bytes(msg.senderRecord))
        ok = seen.get(key)
        if ok is None:
            ok = bool(original(msg, host, peer_id))
            if len(seen) > 4096:
                seen.clear()
            seen[key] = ok
        return ok

    return cached


def _patch_observations(host: Any, stats: HostStats) -> None:
    manager = getattr(host, "_observed_addr_manager", None)
    if manager is None:
        return
    original = manager.record_observation

    def record(conn: Any, observed: Any, local_addrs: Any) -> Any:
        observer = str(getattr(conn.muxed_conn, "peer_id", "?"))
        stats.observed.setdefault(str(observed), set()).add(observer)
        return original(conn, observed, local_addrs)

    manager.record_observation = record


def _gate_default_protocols(host: Any, gate: StreamGate, stats: HostStats) -> None:
    """Serve py-libp2p's own protocols (identify, identify push, ping) to members only.

    new_host registers them for every connection the Noise gate lets through, which
    includes enrollment-key peers and outside Bitswap peers: each of those must get its
    one protocol and nothing else (docs/PROTOCOL.md §1.2), not our addresses, our protocol
    list or a ping. One exception, for interop: an outside Bitswap peer gets an identify
    that names the Bitswap protocols and nothing more (no addresses, no peer record), since
    js-libp2p (Helia) only sends wants to peers whose identify lists Bitswap. Our side
    likewise stops sending identify requests and pushes to non-members.
    """
    for proto, handler in list(host.multiselect.handlers.items()):
        if proto is None:
            continue
        if str(proto) == IDENTIFY_PROTOCOL_ID:
            handler = _identify_for_outsiders(host, handler, gate)
        if str(proto) == PING_PROTOCOL_ID:
            handler = _tap_pings(handler, stats.pings_from)
        host.set_stream_handler(proto, _gated(str(proto), handler, gate, stats))

    def member(peer: Any) -> bool:
        return gate(str(peer), IDENTIFY_PROTOCOL_ID)

    should_identify = host._should_identify_peer

    def should_identify_member(peer_id: Any) -> bool:
        return member(peer_id) and bool(should_identify(peer_id))

    host._should_identify_peer = should_identify_member

    async def push_to_members() -> None:
        from libp2p.identity.identify_push.identify_push import push_identify_to_peers

        peers = {p for p in host.get_connected_peers() if member(p)}
        try:
            await push_identify_to_peers(host, peer_ids=peers)
        except Exception:  # best effort, as py-libp2p's own push
            logger.debug("identify push failed", exc_info=True)

    host._push_identify_to_all_peers = push_to_members


class _PingTap:
    """A ping stream that notes when its peer last sent something (py-libp2p's handler
    reads it; everything but ``read`` goes to the real stream)."""

    __slots__ = ("_peer", "_raw", "_seen")

    def __init__(self, raw: Any, peer: str, seen: dict[str, float]) -> None:
        self._raw = raw
        self._peer = peer
        self._seen = seen

    async def read(self, n: int | None = None) -> bytes:
        data: bytes = await self._raw.read(n)
        if data:
            self._seen[self._peer] = trio.current_time()
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _tap_pings(handler: Any, seen: dict[str, float]) -> Any:
    async def tapped(raw: Any) -> None:
        # only members reach this (the gate wraps it), so ``seen`` is bounded by the team
        await handler(_PingTap(raw, str(raw.muxed_conn.peer_id), seen))

    return tapped


def _outsider_protocols(gate: StreamGate, peer: str) -> list[str]:
    return [p for p in BITSWAP_PROTOCOLS if gate(peer, p)]


def _identify_for_outsiders(host: Any, full: Any, gate: StreamGate) -> Any:
    """Members get py-libp2p's identify; an outside Bitswap peer a minimal one."""

    async def handle(raw: Any) -> None:
        peer = str(raw.muxed_conn.peer_id)
        if gate(peer, IDENTIFY_PROTOCOL_ID):
            await full(raw)
            return
        from libp2p.identity.identify.identify import AGENT_VERSION, PROTOCOL_VERSION
        from libp2p.identity.identify.pb.identify_pb2 import Identify

        msg = Identify(protocol_version=PROTOCOL_VERSION, agent_version=AGENT_VERSION,
                       public_key=host.get_public_key().serialize(),
                       protocols=_outsider_protocols(gate, peer)).SerializeToString()
        await raw.write(encode_varint(len(msg)) + msg)
        await raw.close()

    return handle


def _gated(protocol: str, handler: Any, gate: StreamGate, stats: HostStats) -> Any:
    async def gated(raw: Any) -> None:
        stream = Stream(raw, protocol)
        admitted = gate(stream.peer_id, protocol) or (
            protocol == IDENTIFY_PROTOCOL_ID and _outsider_protocols(gate, stream.peer_id))
        if not admitted:
            stats.refused_streams += 1
            logger.info("refused %s stream from %s", protocol, stream.peer_id)
            await stream.reset()
            return
        try:
            await handler(raw)
        except STREAM_ERRORS:
            await stream.reset()
        except Exception:  # py-libp2p's handler failing must cost one stream, not the host
            stats.handler_errors += 1
            logger.warning("%s handler failed for %s", protocol, stream.peer_id,
                           exc_info=True)
            await stream.reset()

    return gated


def _guard_pubsub(host: Any, pubsub: Any, router: Any, stats: HostStats, gate: StreamGate) -> None:
    async def guarded(stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if not gate(peer, "/meshsub"):
            stats.refused_streams += 1
            await Stream(stream, "/meshsub").reset()
            return
        try:
            await pubsub.stream_handler(stream)
        except STREAM_ERRORS:
            await Stream(stream, "/meshsub").reset()
        except Exception:  # a hostile frame (e.g. protobuf DecodeError) costs one stream
            stats.bad_gossip_streams += 1
            logger.warning("dropped malformed gossip stream from %s", peer)
            await Stream(stream, "/meshsub").reset()

    for proto in router.get_protocols():
        host.set_stream_handler(proto, guarded)

    # Each received message is processed by push_msg in a task of pubsub's service, where
    # any exception stops the service and the host with it. Its signature check raises on
    # a hostile message (an undecodable `key` field: protobuf DecodeError), so a member
    # could kill us with one well-formed RPC. Drop such messages instead.
    push_msg = pubsub.push_msg
    own_id = pubsub.my_id

    async def guarded_push(forwarder: Any, msg: Any) -> None:
        if forwarder == own_id:  # our own publish: let its errors reach the caller
            await push_msg(forwarder, msg)
            return
        try:
            await push_msg(forwarder, msg)
        except STREAM_ERRORS:
            logger.debug("forwarding gossip from %s failed", forwarder, exc_info=True)
        except Exception:  # see _guard_pubsub: never let pubsub's background task die
            stats.bad_gossip_messages += 1
            logger.warning("dropped malformed gossip message from %s", forwarder)

    pubsub.push_msg = guarded_push

    # add_to_blacklist (our revocation path) runs _teardown_if_connected as a service task;
    # it awaits stream.reset() and then `del peers[peer]`, but the reset lets the dead-peer
    # handler delete the entry first: KeyError, and the service takes the host down.
    teardown = pubsub._teardown_if_connected

    async def guarded_teardown(peer_id: Any) -> None:
        try:
            await teardown(peer_id)
        except KeyError:
            pubsub._forget_all_subscriptions(peer_id)  # the step the KeyError skipped

    pubsub._teardown_if_connected = guarded_teardown


@asynccontextmanager
async def open_host(
    seed: bytes,
    listen: list[str],
    *,
    peer_gate: PeerGate,
    stream_gate: StreamGate,
    gossip: bool = True,
) -> AsyncIterator[MeshHost]:
    """Run a Noise+yamux libp2p host (with gossipsub) for the body of the block."""
    stats = HostStats()
    key_pair = create_new_key_pair(seed)

    def refused(peer: str) -> None:
        stats.refused_handshakes += 1
        logger.warning("refused connection from non-member %s", peer)

    sec_opt = {TProtocol(NOISE_PROTOCOL_ID): GatedNoise(key_pair, peer_gate, refused)}
    muxer_opt = {TProtocol(YAMUX_PROTOCOL_ID): Yamux}
    try:
        listen_addrs = [multiaddr.Multiaddr(a) for a in listen]
    except Exception as exc:  # multiaddr raises assorted types on bad text
        raise HostError(f"bad listen address in {listen!r}: {exc}") from exc
    host = new_host(
        key_pair=key_pair,
        sec_opt=sec_opt,
        muxer_opt=muxer_opt,
        listen_addrs=listen_addrs,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    _gate_default_protocols(host, stream_gate, stats)
    _patch_inbound_release(host.get_network(), stats)
    _disable_auto_connector(host.get_network())
    _wrap_pubsub_helper("maybe_consume_signed_record", _cache_sender_records)
    _wrap_pubsub_helper("env_to_send_in_RPC", _cache_local_record)
    yamux_io.install()
    _patch_observations(host, stats)
    # Pubsub registers a connection notifee whose queue only drains while its service
    # runs: constructing it for a gossip-less host would block every dial.
    router: GossipSub | None = None
    pubsub: Pubsub | None = None
    if gossip:
        router, pubsub = _gossip(host, stats, stream_gate)
    mesh = MeshHost(host, pubsub, stats, stream_gate)
    try:
        async with host.run(listen_addrs=listen_addrs):
            if pubsub is None or router is None:
                yield mesh
                return
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                yield mesh
                # Close connections before the services stop, so no inbound gossip lands
                # in a closed nursery (py-libp2p raises from host.run() otherwise).
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    for p in mesh.connected_peers():
                        await mesh.disconnect(p)
    except OSError as exc:
        raise HostError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    except BaseExceptionGroup as group:
        # py-libp2p's teardown may still race with an in-flight gossip read; those
        # RuntimeErrors carry no information, anything else propagates.
        rest = group.split(
            lambda e: isinstance(e, RuntimeError) and "closed" in str(e)
        )[1]
        if rest is None:
            return
        # py-libp2p's nurseries wrap whatever the body raised; hand a lone error back as
        # itself so callers can catch it by type.
        raise single_leaf(rest) from None


def _gossip(host: Any, stats: HostStats, stream_gate: StreamGate) -> tuple[GossipSub, Pubsub]:
    """The gossipsub router and pubsub service, tuned for small teams and guarded."""
    router = GossipSub(
        # v1.1: py-libp2p's v1.2 sends an IDONTWANT control RPC to every mesh peer for
        # every message it forwards, whatever its size (go only above 1 KiB); for our
        # sub-KiB ads that doubled the gossip RPCs each node handles
        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=4, degree_low=3, degree_high=6,  # fewer duplicate copies; teams are small
        heartbeat_interval=GOSSIP_HEARTBEAT_S,  # type: ignore[arg-type]
        heartbeat_initial_delay=0.1,
        time_to_live=30, gossip_window=3, gossip_history=5,
        adaptive_gossip_enabled=False,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
    )
    pubsub = Pubsub(host, router, max_inbound_rpc_size=MAX_GOSSIP_RPC_BYTES)
    _guard_pubsub(host, pubsub, router, stats, stream_gate)
    return router, pubsub


def single_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one exception inside ``group`` (however nested), or the group itself."""
    errors = leaves(group)
    return errors[0] if len(errors) == 1 else group


