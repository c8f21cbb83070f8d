"""Bitswap service: serve our blocks to peers and fetch UnixFS DAGs from them.

The rules live in protocols/bitswap.py; this module only moves bytes. Invariants:

- Streams are one-way. We read only streams a peer opens to us (many messages each) and
  send on streams we open (what Helia and Kubo expect: they never read the streams they
  open). Each peer has one outgoing stream, kept open while there is traffic and closed
  after ``SENDER_IDLE_S`` of silence; messages queued while a write is under way go out
  together in the next write. Opening a stream per message cost a multistream-select
  negotiation per block and per want. A failed write is retried on a fresh stream a few
  times; wants that still could not be sent go to another peer.
- Every received block is re-addressed by hashing (``readdress``) and routed to the fetch
  that wants its multihash. A block nobody wants and that did not just arrive from
  elsewhere is a bad block: counted in ``bad_blocks[peer]``, and the fetches move their
  wants outstanding at that peer to other peers.
- A fetch walks the DAG as blocks arrive (children are wanted as soon as their parent is
  verified), keeps up to ``max_in_flight`` wants outstanding, and hands each block to
  ``put_block`` at once: memory is bounded by the wants in flight, not the file size.
- A fetch with ``max_bytes`` refuses a root that claims more (before wanting any child)
  and stops when peers send more block bytes than the root's claim accounts for; each
  distinct block is wanted once, however often the DAG links it.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import trio
from teammesh.node.p2p.host import STREAM_ERRORS, DialError, MeshHost, Stream
from teammesh.protocols import bitswap as bs
from teammesh.protocols.errors import RemoteProtocolError, StorageError
from teammesh.storage.cid import DAG_PB, SHA2_256, Cid
from teammesh.storage.unixfs import claimed_size, links_of, over_limit

logger = logging.getLogger("teammesh.bitswap")

SEND_ATTEMPTS = 3
SEND_TIMEOUT_S = 20.0  # one message, open + write + close
SEND_BACKOFF_S = 0.2
STREAM_IDLE_S = 60.0  # an incoming stream silent this long is closed
MAX_MESSAGES_PER_STREAM = 1_000_000
INBOX_MESSAGES = 16  # per fetch: at most this many received messages (x 4 MiB) queued
RECENT_BLOCKS = 65_536  # multihashes remembered to tell late duplicates from bad blocks
FETCH_MAX_EVENTS = 100_000_000
SENDER_IDLE_S = 10.0  # an outgoing stream with nothing to send this long is closed
OUTBOX_BYTES = 8 * 1024 * 1024  # per peer: a sender waits while more than this is queued
WRITE_BYTES = 4 * 1024 * 1024  # queued messages joined into one write up to this size
SERVE_SLICE_WANTS = 32  # wants read and answered at a time: at most 64 MiB of blocks
# Block bytes a fetch accepts beyond the file size its root claims: dag-pb nodes add ~0.1%
# (CIDv0 leaves a few bytes per 256 KiB), plus one largest block of slack.
FETCH_OVERHEAD_DIVISOR = 64
FETCH_SLACK_BYTES = 4 * 1024 * 1024
_SEND_ERRORS: tuple[type[BaseException], ...] = (DialError, trio.TooSlowError, *STREAM_ERRORS)


class BlockNotFound(StorageError):
    """No peer gave us a block within the fetch's give-up time."""


class BadBlockFrom(StorageError):
    """A peer the fetch does not trust to retry with (an outside provider) sent a block
    that matches no CID we asked for; nothing it sent unverified was kept."""


@dataclass(frozen=True, slots=True)
class BitswapConfig:
    max_in_flight: int = 128  # wants outstanding per fetch
    refill_below: int | None = None  # top a peer up once its wants fall to this (None: 1/8)
    want_timeout_s: float = 10.0  # re-ask another peer when unanswered this long
    give_up_s: float = 30.0  # BlockNotFound when every peer refused a block this long
    max_bad_blocks: int = 3  # after this many bad blocks a peer is asked only as a last resort
    serve: bool = True  # answer other peers' wantlists


@dataclass(slots=True)
class BitswapStats:
    blocks_sent: int = 0
    bytes_sent: int = 0
    blocks_received: int = 0
    bytes_received: int = 0
    duplicate_blocks: int = 0
    messages_in: int = 0
    messages_out: int = 0
    send_failures: int = 0
    bad_messages: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class _Blocks:
    peer: str
    blocks: list[tuple[bytes, bytes]]
    presences: list[bs.Presence]


@dataclass(frozen=True, slots=True)
class _BadBlock:
    peer: str


_Event = _Blocks | _BadBlock


@dataclass(eq=False, slots=True)
class _Outgoing:
    data: bytes  # one framed message
    on_fail: Callable[[], Awaitable[None]] | None


@dataclass(eq=False, slots=True)
class _Outbox:
    """One peer's queued messages; a sender task in the service's nursery drains it."""

    items: deque[_Outgoing] = field(default_factory=deque)
    nbytes: int = 0
    wakeup: trio.Event = field(default_factory=trio.Event)
    drained: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False, slots=True)
class _Session:
    manager: bs.WantManager
    inbox: trio.MemorySendChannel[_Event]
    # Seconds this fetch spent inside put_block, which may block (the store's writer
    # waits when its queue is full) and with it everything on this thread, reading
    # included. The want manager's clock leaves them out: a peer whose blocks sat
    # unread meanwhile was not silent, and must not be timed out for it.
    stalled_s: float = 0.0

    def now(self) -> float:
        return trio.current_time() - self.stalled_s


class BitswapService:
    """Bitswap over a MeshHost. ``blockstore_put`` must not block; ``blockstore_get`` runs on
    worker threads and must be thread-safe."""

    def __init__(self, host: MeshHost, blockstore_get: Callable[[Cid], bytes | None],
                 blockstore_put: Callable[[Cid, bytes], None],
                 config: BitswapConfig | None = None,
                 may_serve: Callable[[str], bool] | None = None) -> None:
        self._host = host
        # who may have its wantlists answered (None: whoever the host's gates admit); a
        # provider admitted only so that it can send us blocks is not served
        self._may_serve = may_serve
        self._get = blockstore_get
        self._put = blockstore_put
        self.config = config or BitswapConfig()
        self.server = bs.Server()
        self.stats = BitswapStats()
        self.bad_blocks: Counter[str] = Counter()
        self._sessions: set[_Session] = set()
        self._wanted: dict[bytes, set[_Session]] = {}  # multihash -> fetches wanting it
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self._outboxes: dict[str, _Outbox] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Register the Bitswap protocols and serve until cancelled."""
        async with trio.open_nursery() as nursery:  # owns the per-peer sender tasks
            self._nursery = nursery
            for proto in bs.BITSWAP_PROTOCOLS:
                self._host.set_handler(proto, self._handle)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # --- receiving ------------------------------------------------------------------------

    async def _handle(self, stream: Stream) -> None:
        peer = stream.peer_id
        decoder = bs.FrameDecoder()
        try:
            for _ in range(MAX_MESSAGES_PER_STREAM):
                with trio.move_on_after(STREAM_IDLE_S):
                    chunk = await stream.read()
                    if not chunk:
                        break
                    for raw in decoder.feed(chunk):
                        await self._on_message(peer, bs.decode(raw))
                    continue
                break  # idle
        except RemoteProtocolError as exc:
            self.stats.bad_messages[peer] += 1
            logger.warning("bad bitswap message from %s: %s", peer, exc)
            await stream.reset()
            return
        await stream.close()

    async def _on_message(self, peer: str, msg: bs.Message) -> None:
        self.stats.messages_in += 1
        if msg.has_wantlist and self.config.serve and (
                self._may_serve is None or self._may_serve(peer)):
            # A wantlist may name 65,536 blocks: answer it a slice at a time, so one
            # message holds at most SERVE_SLICE_WANTS blocks in memory (the outbox then
            # waits on the peer), not every block it names.
            entries = msg.wantlist
            for start in range(0, max(len(entries), 1), SERVE_SLICE_WANTS):
                part = bs.Message(wantlist=entries[start : start + SERVE_SLICE_WANTS],
                                  full=msg.full and start == 0)
                await self._serve_wants(peer, part)
        if not (msg.payload or msg.blocks or msg.presences):
            return
        blocks, unusable = bs.readdress(msg)
        routed: dict[_Session, _Blocks] = {}
        bad = unusable
        for cid, data in blocks:
            mh = bs.multihash_of(cid)
            sessions = self._wanted.get(mh)
            if sessions:
                for s in sessions:
                    routed.setdefault(s, _Blocks(peer, [], [])).blocks.append((cid, data))
            elif mh in self._recent:
                self.stats.duplicate_blocks += 1
            else:
                bad += 1
        for pr in msg.presences:
            try:
                mh = bs.multihash_of(pr.cid)
            except RemoteProtocolError:
                continue
            for s in self._wanted.get(mh, ()):
                routed.setdefault(s, _Blocks(peer, [], [])).presences.append(pr)
        for s, event in routed.items():
            await self._deliver(s, event)
        if bad:
            self.bad_blocks[peer] += bad
            logger.warning("%d bad block(s) from %s", bad, peer)
            for s in list(self._sessions):
                await self._deliver(s, _BadBlock(peer))

    async def _serve_wants(self, peer: str, msg: bs.Message) -> None:
        # Read (and hash-check) the wanted blocks on a worker thread: hashing releases
        # the GIL, so the trio thread keeps writing the previous replies meanwhile.
        wanted = [e.cid for e in msg.wantlist if not e.cancel]
        found: dict[bytes, bytes | None] = {}
        if wanted:
            found = await trio.to_thread.run_sync(self._read_blocks, wanted)
        for reply in self.server.receive(peer, msg, lambda c: self._served(found.get(c))):
            await self._send(peer, reply)

    async def _deliver(self, session: _Session, event: _Event) -> None:
        try:
            await session.inbox.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # that fetch just ended

    def _read_blocks(self, cids: list[bytes]) -> dict[bytes, bytes | None]:
        """(worker thread) The blocks we hold among ``cids``; None for the others."""
        return {cid: self._lookup(cid) for cid in cids}

    def _served(self, data: bytes | None) -> bytes | None:
        if data is not None:
            self.stats.blocks_sent += 1
            self.stats.bytes_sent += len(data)
        return data

    def _lookup(self, cid: bytes) -> bytes | None:
        try:
            c = Cid.from_bytes(cid)
        except StorageError:
            return None
        data = self._get(c)
        if data is None and c.codec == DAG_PB:  # Helia matches v0 and v1 wants by multihash
            if c.version == 0:
                data = self._get(c.to_v1())
            elif c.hash_code == SHA2_256 and len(c.multihash) == 34:
                data = self._get(Cid(0, DAG_PB, c.multihash))
        return data

    # --- sending --------------------------------------------------------------------------

    async def _send(self, peer: str, msg: bs.Message,
                    on_fail: Callable[[], Awaitable[None]] | None = None) -> None:
        """Queue one message for ``peer``; ``on_fail`` runs if it never gets through.

        Returns once queued; waits only while the peer's outbox holds over OUTBOX_BYTES, so
        a slow reader slows the handler that feeds it instead of growing memory.
        """
        if self._nursery is None:
            raise RuntimeError("BitswapService is not running")
        box = self._outboxes.get(peer)
        while box is not None and box.nbytes > OUTBOX_BYTES:
            await box.drained.wait()
            box = self._outboxes.get(peer)
        if box is None:
            box = self._outboxes[peer] = _Outbox()
            self._nursery.start_soon(self._sender, peer, box)
        data = bs.frame(msg)
        box.items.append(_Outgoing(data, on_fail))
        box.nbytes += len(data)
        box.wakeup.set()

    async def _sender(self, peer: str, box: _Outbox) -> None:
        stream: Stream | None = None
        try:
            while True:
                if not box.items:
                    box.wakeup = trio.Event()
                    with trio.move_on_after(SENDER_IDLE_S):
                        await box.wakeup.wait()
                    if not box.items:
                        break  # idle: the stream is closed below
                batch, size = [], 0
                while box.items and size < WRITE_BYTES:
                    item = box.items.popleft()
                    batch.append(item)
                    size += len(item.data)
                box.nbytes -= size
                box.drained.set()
                box.drained = trio.Event()
                stream, sent = await self._write(peer, stream, batch)
                if not sent and not self._host.is_connected(peer):
                    await self._drop_outbox(peer, box)
                    break
        finally:
            self._detach(peer, box)
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(SEND_BACKOFF_S):
                    await stream.close()

    def _detach(self, peer: str, box: _Outbox) -> None:
        """Stop queueing on ``box``: a later send starts a fresh outbox and sender, and
        anyone waiting for room looks again."""
        if self._outboxes.get(peer) is box:
            del self._outboxes[peer]
        box.drained.set()

    async def _drop_outbox(self, peer: str, box: _Outbox) -> None:
        """``peer`` left: fail everything queued for it at once (wants go elsewhere)
        instead of retrying each message against a peer that is not there."""
        self._detach(peer, box)  # before any await: nothing new lands in this box
        rest = list(box.items)
        box.items.clear()
        box.nbytes = 0
        if rest:
            logger.info("dropped %d queued bitswap message(s) for %s: not connected",
                        len(rest), peer)
        await self._failed(rest)

    async def _failed(self, items: list[_Outgoing]) -> None:
        self.stats.send_failures += len(items)
        for o in items:
            if o.on_fail is not None:
                await o.on_fail()

    async def _write(self, peer: str, stream: Stream | None,
                     batch: list[_Outgoing]) -> tuple[Stream | None, bool]:
        """Write ``batch`` on ``stream`` (opened if None): (the stream to use next, sent)."""
        data = batch[0].data if len(batch) == 1 else b"".join(o.data for o in batch)
        for attempt in range(SEND_ATTEMPTS):
            try:
                with trio.fail_after(SEND_TIMEOUT_S):
                    if stream is None:
                        stream = await self._host.open_stream(peer, bs.BITSWAP_120)
                    await stream.write(data)
                self.stats.messages_out += len(batch)
                return stream, True
            except _SEND_ERRORS as exc:
                logger.debug("bitswap send to %s failed (attempt %d): %s", peer, attempt + 1, exc)
                if stream is not None:
                    await stream.reset()  # the peer drops a half-read frame with the stream
                    stream = None
                if not self._host.is_connected(peer):
                    break  # gone: retrying would only dial a peer that left
                await trio.sleep(SEND_BACKOFF_S * 2**attempt)
        logger.warning("could not send %d bitswap message(s) to %s", len(batch), peer)
        await self._failed(batch)
        return None, False

    async def _send_wants(self, session: _Session, effect: bs.Send) -> None:
        async def failed() -> None:
            session.manager.send_failed(effect.peer, effect.message)
            await self._deliver(session, _Blocks(effect.peer, [], []))  # wake the fetch

        await self._send(effect.peer, effect.message, failed)

    # --- fetching -------------------------------------------------------------------------

    async def fetch(self, root: Cid, peers: list[str],
                    put_block: Callable[[Cid, bytes], None],
                    progress: Callable[[int, int], None] | None = None,
                    *, max_bytes: int | None = None,
                    strict: Collection[str] = ()) -> None:
        """Fetch the whole DAG under ``root`` from ``peers``.

        Args:
            root: the DAG's root (raw or dag-pb; CIDv0 or v1).
            peers: peer ids to ask; they must be connected or dialable by the host.
            put_block: called with each verified block as it arrives (any order).
            progress: called as ``progress(blocks, bytes)`` after each block.
            max_bytes: refuse a file whose root claims more than this many bytes, and
                stop if the blocks add up to more than the root claims (None: no limit).
            strict: peers whose first bad block ends the fetch (``BadBlockFrom``) instead
                of moving their wants elsewhere: outside providers, which a fetch has no
                reason to keep asking once they lied.

        Raises:
            BadBlockFrom: a peer in ``strict`` sent a block matching no CID we asked for.
            BlockNotFound: a block was refused by every peer (or timed out) for
                ``config.give_up_s``.
            StorageError: a verified block is not valid dag-pb / uses an unknown codec,
                or the file is over ``max_bytes`` (the message names the limit).
        """
        cfg = self.config
        manager = bs.WantManager(peers, max_in_flight=cfg.max_in_flight,
                                 want_timeout_s=cfg.want_timeout_s, give_up_s=cfg.give_up_s,
                                 max_bad_blocks=cfg.max_bad_blocks,
                                 refill_below=cfg.refill_below)
        send, recv = trio.open_memory_channel[_Event](INBOX_MESSAGES)
        session = _Session(manager, send)
        self._sessions.add(session)
        try:
            await self._fetch_loop(session, root, recv, put_block, progress, max_bytes,
                                   frozenset(strict))
        except BaseExceptionGroup as group:
            # the loop raises inside its nursery; hand a lone error of ours back as itself
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], StorageError):
                raise group.exceptions[0] from None
            raise
        finally:
            send.close()
            self._sessions.discard(session)
            for mh in [m for m, ss in self._wanted.items() if session in ss]:
                self._unwant(session, mh)

    async def _fetch_loop(self, session: _Session, root: Cid,
                          recv: trio.MemoryReceiveChannel[_Event],
                          put_block: Callable[[Cid, bytes], None],
                          progress: Callable[[int, int], None] | None,
                          max_bytes: int | None, strict: frozenset[str]) -> None:
        cfg = self.config
        manager = session.manager
        blocks = nbytes = 0
        budget: int | None = None  # block bytes allowed, once the root's claim is known
        root_mh = bs.multihash_of(root.to_bytes())
        received: set[bytes] = set()  # multihashes: a DAG may link one block many times
        async with recv, trio.open_nursery() as nursery:
            self._want(session, root.to_bytes())
            for _ in range(FETCH_MAX_EVENTS):
                for eff in manager.poll(session.now()):
                    if isinstance(eff, bs.Failed):
                        raise BlockNotFound(
                            f"no peer sent block {Cid.from_bytes(eff.cid)} of {root}"
                            f" within {cfg.give_up_s:g} s ({eff.reason})")
                    if isinstance(eff, bs.Send):
                        nursery.start_soon(self._send_wants, session, eff)
                if manager.done:
                    break
                event: _Event | None = None
                deadline = manager.next_deadline(session.now())
                if deadline <= session.now():
                    # work is due now, but what has arrived comes first (an expired
                    # deadline would cancel receive() before it looked at the inbox)
                    try:
                        event = recv.receive_nowait()
                    except trio.WouldBlock:
                        await trio.lowlevel.checkpoint()
                else:
                    with trio.move_on_at(deadline + session.stalled_s):
                        event = await recv.receive()
                if isinstance(event, _BadBlock):
                    if event.peer in strict:
                        raise BadBlockFrom(
                            f"peer {event.peer} sent a block that matches no CID asked for"
                            f" while fetching {root}: the fetch stopped and the block was"
                            " dropped (blocks are checked against their CID before they are"
                            " stored). Fetch it from another provider")
                    manager.bad_block(event.peer)
                    continue
                if event is None:
                    continue
                heard = event.blocks or event.presences  # not a failed send's wake-up
                for eff in manager.receive(event.peer, event.blocks, event.presences,
                                           now=session.now() if heard else None):
                    if not isinstance(eff, bs.Received):
                        continue
                    cid = Cid.from_bytes(eff.cid)
                    mh = bs.multihash_of(eff.cid)
                    if max_bytes is not None and mh == root_mh:
                        budget = self._fetch_budget(root, cid, eff.data, max_bytes)
                    nbytes += len(eff.data)
                    if budget is not None and nbytes > budget:
                        raise StorageError(
                            f"peers sent {nbytes} bytes of blocks for {root}, more than its"
                            f" root claims (at most {budget} with dag-pb nodes); the DAG is"
                            " malformed or hostile")
                    self._got(session, eff.cid, eff.data, nursery)
                    t0 = trio.current_time()
                    put_block(cid, eff.data)
                    if (held := trio.current_time() - t0) > 0:
                        session.stalled_s += held
                        if held > 1.0:
                            logger.info("storing a block held the fetch of %s for %.1f s",
                                        root, held)
                    received.add(mh)
                    blocks += 1
                    for child in links_of(cid, eff.data):
                        child_bytes = child.to_bytes()
                        if bs.multihash_of(child_bytes) not in received:
                            self._want(session, child_bytes)
                    if progress is not None:
                        progress(blocks, nbytes)
            nursery.cancel_scope.cancel()

    @staticmethod
    def _fetch_budget(root: Cid, cid: Cid, block: bytes, max_bytes: int) -> int:
        """The block bytes a fetch of ``root`` may take, from the size its root block
        claims; a claim over ``max_bytes`` is refused before any child is wanted."""
        claim = claimed_size(cid, block)
        if claim > max_bytes:
            raise over_limit(root, claim, max_bytes)
        return claim + claim // FETCH_OVERHEAD_DIVISOR + FETCH_SLACK_BYTES

    def _want(self, session: _Session, cid: bytes) -> None:
        if session.manager.want(cid, session.now()):
            self._wanted.setdefault(bs.multihash_of(cid), set()).add(session)

    def _unwant(self, session: _Session, mh: bytes) -> None:
        sessions = self._wanted.get(mh)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._wanted[mh]

    def _got(self, session: _Session, cid: bytes, data: bytes,
             nursery: trio.Nursery) -> None:
        mh = bs.multihash_of(cid)
        self._unwant(session, mh)
        self._recent[mh] = None
        if len(self._recent) > RECENT_BLOCKS:
            self._recent.popitem(last=False)
        self.stats.blocks_received += 1
        self.stats.bytes_received += len(data)
        if self.config.serve:  # peers that asked us for this block before we had it
            for peer, msg in self.server.block_added(cid, data):
                nursery.start_soon(self._send, peer, msg)
