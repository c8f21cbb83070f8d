"""Bitswap 1.2.0, sans-IO: the message codec, CID prefixes, a want manager and a server ledger.

Theory of operation (https://specs.ipfs.tech/bitswap-protocol/):

* A Bitswap stream is one-way. A peer opens a stream, writes varint-length-prefixed
  protobuf ``Message`` frames and never reads from it; the other side answers on a
  stream of its own. Nothing here knows about streams: ``encode``/``frame`` give bytes,
  ``FrameDecoder``/``decode`` take them, and everything else is data in, data out.
* A block travels as ``(prefix, data)``: the prefix holds CID version, codec, multihash
  type and digest length, and the receiver rebuilds the CID by hashing the data
  (``readdress``). A block is therefore verified by construction: a corrupted block gets
  a CID nobody asked for. Wants are matched by multihash, as Helia and Kubo do, so a
  CIDv0 and a CIDv1 want for one dag-pb block are one want.
* ``Server`` keeps, per peer, the ledger of what that peer wants from us. Rule 1:
  WANT_BLOCK is answered with the block; WANT_HAVE with HAVE, or with the block itself
  when it is smaller than ``INLINE_HAVE_LIMIT`` (Helia's rule). Rule 2: a want we cannot
  serve gets DONT_HAVE only when the peer asked for it (``sendDontHave``) and stays in the
  ledger, to be served by ``block_added``. Rule 3: served and cancelled entries leave the
  ledger; a ``full`` wantlist replaces it.
* ``WantManager`` is the client side of one fetch: which blocks we want, at which peer
  each is outstanding, and when to ask again. It keeps at most ``max_in_flight`` wants
  outstanding, gives each to the least loaded peer that has not refused it (peers that
  sent ``max_bad_blocks`` bad blocks only when no other is left), re-asks
  another peer after DONT_HAVE, a timeout, a failed send or a bad block from the peer
  that held it, cancels duplicates when a block arrives, and gives up on a block once
  every peer refused it for ``give_up_s``.

Everything is pure: no I/O, no clock (``now`` is passed in), no randomness.
Malformed input raises ``MalformedMessage`` or ``FrameTooLarge`` (both
``RemoteProtocolError``) and nothing else.
"""

from __future__ import annotations

import enum
import hashlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from .errors import FrameTooLarge, LocalProtocolError, MalformedMessage
from .wire import FrameDecoder as _WireFrameDecoder
from .wire import encode_varint, read_varint

__all__ = [
    "BITSWAP_100",
    "BITSWAP_110",
    "BITSWAP_120",
    "BITSWAP_PROTOCOLS",
    "INLINE_HAVE_LIMIT",
    "MAX_BLOCK_BYTES",
    "MAX_MESSAGE_BYTES",
    "Entry",
    "Failed",
    "FrameDecoder",
    "FrameTooLarge",
    "Message",
    "Payload",
    "Prefix",
    "Presence",
    "PresenceType",
    "Received",
    "Send",
    "Server",
    "WantManager",
    "WantType",
    "decode",
    "encode",
    "frame",
    "multihash_of",
    "readdress",
]

BITSWAP_120: Final = "/ipfs/bitswap/1.2.0"
BITSWAP_110: Final = "/ipfs/bitswap/1.1.0"
BITSWAP_100: Final = "/ipfs/bitswap/1.0.0"
BITSWAP_PROTOCOLS: Final = (BITSWAP_120, BITSWAP_110, BITSWAP_100)

MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024  # spec: implementations must accept 4 MiB
HELD_PER_POLL: Final = 4096  # wants set aside per poll while their peers' windows drain
MAX_ACKS_PER_PEER: Final = 4096  # received blocks cancelled in the next message to a peer
MAX_BLOCK_BYTES: Final = 2 * 1024 * 1024  # spec: blocks up to 2 MiB must be accepted
INLINE_HAVE_LIMIT: Final = 1024  # WANT_HAVE for a block smaller than this gets the block
MESSAGE_TARGET_BYTES: Final = 2 * 1024 * 1024  # we pack replies up to this size
MAX_WANTS_PER_PEER: Final = 16_384  # ledger entries we keep for one peer
MAX_ENTRIES_PER_MESSAGE: Final = 65_536

# Multicodec / multihash codes we need to rebuild CIDs.
DAG_PB: Final = 0x70
SHA2_256: Final = 0x12
SHA2_512: Final = 0x13
IDENTITY: Final = 0x00
BLAKE2B_256: Final = 0xB220
_MAX_IDENTITY_BYTES: Final = 128


class WantType(enum.IntEnum):
    BLOCK = 0
    HAVE = 1


class PresenceType(enum.IntEnum):
    HAVE = 0
    DONT_HAVE = 1


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One wantlist entry; ``cid`` is the binary CID (a bare multihash for CIDv0)."""

    cid: bytes
    priority: int = 1
    cancel: bool = False
    want_type: WantType = WantType.BLOCK
    send_dont_have: bool = False


@dataclass(frozen=True, slots=True)
class Payload:
    """A block as it travels: the CID prefix of its name and its bytes."""

    prefix: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Presence:
    cid: bytes
    type: PresenceType


@dataclass(frozen=True, slots=True)
class Message:
    """A Bitswap message. ``blocks`` is the 1.0.0 field (implied CIDv0 dag-pb sha2-256)."""

    wantlist: tuple[Entry, ...] = ()
    full: bool = False
    blocks: tuple[bytes, ...] = ()
    payload: tuple[Payload, ...] = ()
    presences: tuple[Presence, ...] = ()
    pending_bytes: int = 0

    @property
    def has_wantlist(self) -> bool:
        return bool(self.wantlist) or self.full


# --- protobuf, by hand ---------------------------------------------------------------------

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _key(num: int, wire_type: int) -> bytes:
    return encode_varint(num << 3 | wire_type)


def _len_field(num: int, value: bytes) -> bytes:
    return _key(num, _LEN) + encode_varint(len(value)) + value


def _int_field(num: int, value: int) -> bytes:
    # int32/enum: negatives are sign-extended to 64 bits, ten bytes on the wire
    return _key(num, _VARINT) + encode_varint(value & 0xFFFF_FFFF_FFFF_FFFF)


def _encode_entry(e: Entry) -> bytes:
    parts = [_len_field(1, e.cid)]
    if e.priority:
        parts.append(_int_field(2, e.priority))
    if e.cancel:
        parts.append(_int_field(3, 1))
    if e.want_type:
        parts.append(_int_field(4, int(e.want_type)))
    if e.send_dont_have:
        parts.append(_int_field(5, 1))
    return b"".join(parts)


def encode(msg: Message) -> bytes:
    """Serialise ``msg`` as the protobuf ``bitswap.pb.Message`` (no length prefix)."""
    if not -(2**31) <= msg.pending_bytes < 2**31:
        raise LocalProtocolError(f"pendingBytes {msg.pending_bytes} does not fit an int32")
    parts: list[bytes] = []
    if msg.has_wantlist:
        wl = [_len_field(1, _encode_entry(e)) for e in msg.wantlist]
        if msg.full:
            wl.append(_int_field(2, 1))
        parts.append(_len_field(1, b"".join(wl)))
    parts.extend(_len_field(2, b) for b in msg.blocks)
    for p in msg.payload:
        parts.append(_len_field(3, _len_field(1, p.prefix) + _len_field(2, p.data)))
    for pr in msg.presences:
        body = _len_field(1, pr.cid) + (_int_field(2, int(pr.type)) if pr.type else b"")
        parts.append(_len_field(4, body))
    if msg.pending_bytes:
        parts.append(_int_field(5, msg.pending_bytes))
    return b"".join(parts)


def frame(msg: Message) -> bytes:
    """``msg`` encoded with its unsigned-varint length prefix, ready for a stream."""
    body = encode(msg)
    if len(body) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return encode_varint(len(body)) + body


def _fields(buf: memoryview, start: int, end: int) -> Iterable[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value): ints for varints, views for LEN fields."""
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise MalformedMessage("protobuf field number 0")
        if wt == _VARINT:
            value, pos = read_varint(buf, pos, end)
            yield num, wt, value
        elif wt == _LEN:
            n, pos = read_varint(buf, pos, end)
            if n > end - pos:
                raise MalformedMessage("protobuf field runs past the end of its message")
            yield num, wt, buf[pos : pos + n]
            pos += n
        elif wt == _I64:
            pos += 8
        elif wt == _I32:
            pos += 4
        else:
            raise MalformedMessage(f"unsupported protobuf wire type {wt}")
        if pos > end:
            raise MalformedMessage("protobuf field runs past the end of its message")


def _as_int32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _want(num: int, wt: int, v: int | memoryview, expect: int) -> int | memoryview:
    if wt != expect:
        raise MalformedMessage(f"bitswap field {num} has wire type {wt}, expected {expect}")
    return v


def _sub(num: int, wt: int, v: int | memoryview) -> memoryview:
    value = _want(num, wt, v, _LEN)
    assert isinstance(value, memoryview)
    return value


def _num(num: int, wt: int, v: int | memoryview) -> int:
    value = _want(num, wt, v, _VARINT)
    assert isinstance(value, int)
    return value


def _decode_entry(buf: memoryview) -> Entry:
    cid = b""
    priority, cancel, want_type, sdh = 0, False, 0, False
    for num, wt, v in _fields(buf, 0, len(buf)):
        if num == 1:
            cid = bytes(_sub(num, wt, v))
        elif num == 2:
            priority = _as_int32(_num(num, wt, v))
        elif num == 3:
            cancel = bool(_num(num, wt, v))
        elif num == 4:
            want_type = _num(num, wt, v)
        elif num == 5:
            sdh = bool(_num(num, wt, v))
    if not cid:
        raise MalformedMessage("wantlist entry without a CID")
    if want_type not in (0, 1):
        raise MalformedMessage(f"unknown wantType {want_type}")
    return Entry(cid, priority, cancel, WantType(want_type), sdh)


def decode(data: bytes | memoryview) -> Message:
    """Parse one ``bitswap.pb.Message``; unknown fields are skipped.

    Raises:
        FrameTooLarge: over ``MAX_MESSAGE_BYTES``.
        MalformedMessage: anything that is not a well-formed message.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise FrameTooLarge(f"bitswap message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    buf = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    entries: list[Entry] = []
    full = False
    blocks: list[bytes] = []
    payload: list[Payload] = []
    presences: list[Presence] = []
    pending = 0
    for num, wt, v in _fields(buf, 0, len(buf)):
        if num == 1:
            wl = _sub(num, wt, v)
            for n2, wt2, v2 in _fields(wl, 0, len(wl)):
                if n2 == 1:
                    entries.append(_decode_entry(_sub(n2, wt2, v2)))
                    if len(entries) > MAX_ENTRIES_PER_MESSAGE:
                        raise MalformedMessage("too many wantlist entries in one message")
                elif n2 == 2:
                    full = bool(_num(n2, wt2, v2))
        elif num == 2:
            blocks.append(bytes(_sub(num, wt, v)))
        elif num == 3:
            b = _sub(num, wt, v)
            prefix, block = b"", b""
            for n2, wt2, v2 in _fields(b, 0, len(b)):
                if n2 == 1:
                    prefix = bytes(_sub(n2, wt2, v2))
                elif n2 == 2:
                    block = bytes(_sub(n2, wt2, v2))
            payload.append(Payload(prefix, block))
        elif num == 4:
            b = _sub(num, wt, v)
            cid, ptype = b"", 0
            for n2, wt2, v2 in _fields(b, 0, len(b)):
                if n2 == 1:
                    cid = bytes(_sub(n2, wt2, v2))
                elif n2 == 2:
                    ptype = _num(n2, wt2, v2)
            if not cid or ptype not in (0, 1):
                raise MalformedMessage("block presence without a CID or of unknown type")
            presences.append(Presence(cid, PresenceType(ptype)))
        elif num == 5:
            pending = _as_int32(_num(num, wt, v))
    return Message(tuple(entries), full, tuple(blocks), tuple(payload), tuple(presences), pending)


class FrameDecoder(_WireFrameDecoder):
    """Split a byte stream into Bitswap frames; a frame over 4 MiB raises ``FrameTooLarge``."""

    def __init__(self, max_frame: int = MAX_MESSAGE_BYTES) -> None:
        super().__init__(max_frame)


# --- CIDs and prefixes ---------------------------------------------------------------------


def _split_cid(cid: bytes) -> tuple[int, int, bytes]:
    """``(version, codec, multihash)`` of a binary CID; ``MalformedMessage`` if invalid."""
    buf = memoryview(cid)
    if len(cid) == 34 and cid[0] == SHA2_256 and cid[1] == 32:
        return 0, DAG_PB, cid
    version, pos = read_varint(buf, 0, len(buf))
    if version != 1:
        raise MalformedMessage(f"CID version {version} is not 0 or 1")
    codec, pos = read_varint(buf, pos, len(buf))
    mh = cid[pos:]
    _, p2 = read_varint(buf, pos, len(buf))
    length, p3 = read_varint(buf, p2, len(buf))
    if len(cid) - p3 != length:
        raise MalformedMessage("CID multihash length does not match its digest")
    return 1, codec, mh


def multihash_of(cid: bytes) -> bytes:
    """The multihash of a binary CID: the key wants are matched by."""
    return _split_cid(cid)[2]


@dataclass(frozen=True, slots=True)
class Prefix:
    """The CID prefix a payload block carries: how to rebuild its CID from its bytes."""

    version: int
    codec: int
    mh_type: int
    mh_len: int

    @classmethod
    def of_cid(cls, cid: bytes) -> Prefix:
        version, codec, mh = _split_cid(cid)
        buf = memoryview(mh)
        code, pos = read_varint(buf, 0, len(buf))
        length, _ = read_varint(buf, pos, len(buf))
        return cls(version, codec, code, length)

    @classmethod
    def decode(cls, data: bytes) -> Prefix:
        buf = memoryview(data)
        version, pos = read_varint(buf, 0, len(buf))
        codec, pos = read_varint(buf, pos, len(buf))
        code, pos = read_varint(buf, pos, len(buf))
        length, pos = read_varint(buf, pos, len(buf))
        if pos != len(data):
            raise MalformedMessage("trailing bytes after a CID prefix")
        if version not in (0, 1):
            raise MalformedMessage(f"CID prefix version {version} is not 0 or 1")
        if version == 0 and (codec != DAG_PB or code != SHA2_256 or length != 32):
            raise MalformedMessage("a CIDv0 prefix must be dag-pb sha2-256/32")
        return cls(version, codec, code, length)

    def encode(self) -> bytes:
        return b"".join(encode_varint(x) for x in (self.version, self.codec, self.mh_type,
                                                    self.mh_len))

    def cid_of(self, data: bytes) -> bytes | None:
        """The binary CID of ``data`` under this prefix; None for an unsupported hash."""
        digest = _hash(self.mh_type, data)
        if digest is None or self.mh_len > len(digest):
            return None
        mh = encode_varint(self.mh_type) + encode_varint(self.mh_len) + digest[: self.mh_len]
        if self.version == 0:
            return mh
        return encode_varint(1) + encode_varint(self.codec) + mh


V0_PREFIX: Final = Prefix(0, DAG_PB, SHA2_256, 32)


def _hash(code: int, data: bytes) -> bytes | None:
    if code == SHA2_256:
        return hashlib.sha256(data).digest()
    if code == SHA2_512:
        return hashlib.sha512(data).digest()
    if code == BLAKE2B_256:
        return hashlib.blake2b(data, digest_size=32).digest()
    if code == IDENTITY and len(data) <= _MAX_IDENTITY_BYTES:
        return data
    return None


def readdress(msg: Message) -> tuple[list[tuple[bytes, bytes]], int]:
    """Rebuild the CIDs of a message's blocks by hashing them.

    Returns ``([(cid, data), ...], unusable)``: ``unusable`` counts blocks with a bad
    prefix, an unsupported hash or over ``MAX_BLOCK_BYTES`` (drop them, blame the peer).
    """
    out: list[tuple[bytes, bytes]] = []
    unusable = 0
    items = [(V0_PREFIX, b) for b in msg.blocks]
    for p in msg.payload:
        try:
            items.append((Prefix.decode(p.prefix), p.data))
        except MalformedMessage:
            unusable += 1
    for prefix, data in items:
        cid = prefix.cid_of(data) if len(data) <= MAX_BLOCK_BYTES else None
        if cid is None:
            unusable += 1
        else:
            out.append((cid, data))
    return out, unusable


# --- server: per-peer ledgers --------------------------------------------------------------

Lookup = Callable[[bytes], bytes | None]


def _pack(payload: list[Payload], presences: list[Presence],
          target: int = MESSAGE_TARGET_BYTES) -> list[Message]:
    """Split blocks and presences into messages of about ``target`` bytes each;
    ``pendingBytes`` of each says how many block bytes the later ones carry."""
    if not payload and not presences:
        return []
    groups: list[list[Payload]] = [[]]
    size = 0
    for p in payload:
        n = len(p.data) + len(p.prefix) + 16
        if groups[-1] and size + n > target:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += n
    remaining = sum(len(p.data) for p in payload)
    out: list[Message] = []
    for i, g in enumerate(groups):
        remaining -= sum(len(p.data) for p in g)
        out.append(Message(payload=tuple(g), presences=tuple(presences) if i == 0 else (),
                           pending_bytes=min(remaining, 2**31 - 1)))
    return out


@dataclass(slots=True)
class Server:
    """What each peer wants from us, and the replies that serves it.

    ``lookup(cid)`` returns a block we hold or None; it is injected so this stays pure.
    """

    inline_have_limit: int = INLINE_HAVE_LIMIT
    max_wants_per_peer: int = MAX_WANTS_PER_PEER
    target_bytes: int = MESSAGE_TARGET_BYTES
    ledgers: dict[str, dict[bytes, Entry]] = field(default_factory=dict)

    def receive(self, peer: str, msg: Message, lookup: Lookup) -> list[Message]:
        """Apply ``peer``'s wantlist and return the replies to send it, in order."""
        if not msg.has_wantlist:
            return []
        ledger = self.ledgers.setdefault(peer, {})
        if msg.full:
            ledger.clear()
        payload: list[Payload] = []
        presences: list[Presence] = []
        for e in msg.wantlist:
            try:
                mh = multihash_of(e.cid)
            except MalformedMessage:
                continue  # an entry we cannot even name; the rest of the message stands
            if e.cancel:
                ledger.pop(mh, None)
                continue
            data = lookup(e.cid)
            if data is None:
                if e.send_dont_have:
                    presences.append(Presence(e.cid, PresenceType.DONT_HAVE))
                if mh in ledger or len(ledger) < self.max_wants_per_peer:
                    ledger[mh] = e
                continue
            ledger.pop(mh, None)
            self._serve(e, data, payload, presences)
        if not ledger:
            self.ledgers.pop(peer, None)
        return _pack(payload, presences, self.target_bytes)

    def _serve(self, e: Entry, data: bytes, payload: list[Payload],
               presences: list[Presence]) -> None:
        if e.want_type == WantType.BLOCK or len(data) < self.inline_have_limit:
            payload.append(Payload(Prefix.of_cid(e.cid).encode(), data))
        else:
            presences.append(Presence(e.cid, PresenceType.HAVE))

    def block_added(self, cid: bytes, data: bytes) -> list[tuple[str, Message]]:
        """We now hold ``cid``: the replies for every peer whose ledger waits for it."""
        mh = multihash_of(cid)
        out: list[tuple[str, Message]] = []
        for peer, ledger in list(self.ledgers.items()):
            e = ledger.pop(mh, None)
            if e is None:
                continue
            if not ledger:
                del self.ledgers[peer]
            payload: list[Payload] = []
            presences: list[Presence] = []
            self._serve(e, data, payload, presences)
            out.extend((peer, m) for m in _pack(payload, presences, self.target_bytes))
        return out

    def peer_gone(self, peer: str) -> None:
        self.ledgers.pop(peer, None)

    def wants_of(self, peer: str) -> list[bytes]:
        return [e.cid for e in self.ledgers.get(peer, {}).values()]


# --- client: the want manager --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Effect: send ``message`` to ``peer`` (on a stream of our own)."""

    peer: str
    message: Message


@dataclass(frozen=True, slots=True)
class Received:
    """Effect: ``data`` is the verified block ``cid`` (the CID we asked for), from ``peer``."""

    cid: bytes
    data: bytes
    peer: str


@dataclass(frozen=True, slots=True)
class Failed:
    """Effect: no peer gave us ``cid`` within ``give_up_s``; ``reason`` says who said what."""

    cid: bytes
    reason: str


Effect = Send | Received | Failed


@dataclass(slots=True)
class _Want:
    cid: bytes
    created: float
    asked: set[str] = field(default_factory=set)
    first_asked: float | None = None  # give_up_s counts from here, not from queueing
    refused: dict[str, str] = field(default_factory=dict)  # peer -> why, this round
    history: dict[str, str] = field(default_factory=dict)  # peer -> last refusal, for errors
    not_before: float = 0.0


class WantManager:
    """The client half of one fetch: wants in, ``Send``/``Received``/``Failed`` out."""

    def __init__(self, peers: Iterable[str], *, max_in_flight: int = 128,
                 want_timeout_s: float = 10.0, give_up_s: float = 30.0,
                 retry_backoff_s: float = 0.5, max_bad_blocks: int = 3,
                 refill_below: int | None = None) -> None:
        self.peers = list(dict.fromkeys(peers))
        if not self.peers:
            raise LocalProtocolError("a fetch needs at least one peer")
        self.max_in_flight = max_in_flight
        # A peer gets new wants only once its outstanding wants fell to this many; then
        # it is topped up to the window in one message (see "Pipelining" above).
        self.refill_below = (max_in_flight // 8 if refill_below is None
                             else max(0, min(refill_below, max_in_flight - 1)))
        self.want_timeout_s = want_timeout_s
        self.give_up_s = give_up_s
        self.retry_backoff_s = retry_backoff_s
        self.max_bad_blocks = max_bad_blocks
        self.bad_blocks: dict[str, int] = {}
        self._wants: dict[bytes, _Want] = {}  # multihash -> want
        self._pending: deque[bytes] = deque()  # wants outstanding nowhere, ready to send
        self._parked: list[bytes] = []  # every peer refused; retried after a backoff
        self._outstanding: dict[tuple[bytes, str], float] = {}  # (mh, peer) -> sent at
        self._load: dict[str, int] = dict.fromkeys(self.peers, 0)
        self._cancels: dict[str, list[bytes]] = {}
        # blocks each peer sent us since we last wrote to it: cancelled in the next
        # message we send it anyway, never in a message of their own
        self._acks: dict[str, list[bytes]] = {}
        # when each peer last sent us a block or a presence: a peer still sending is not
        # timed out on the wants it has yet to reach (a window is served in order)
        self._heard: dict[str, float] = {}
        # the last poll set every pending want aside (their peers' windows are full):
        # nothing to do until a block, a refusal or a new want changes that
        self._stuck = False

    @property
    def done(self) -> bool:
        return not self._wants

    @property
    def in_flight(self) -> int:
        return len(self._outstanding)

    def wants(self, mh: bytes) -> bool:
        return mh in self._wants

    def want(self, cid: bytes, now: float) -> bool:
        """Add a want; False if that block (by multihash) is already wanted."""
        mh = multihash_of(cid)
        if mh in self._wants:
            return False
        self._wants[mh] = _Want(cid, now)
        self._pending.append(mh)
        self._stuck = False
        return True

    def _refillable(self, peer: str) -> bool:
        return self._load[peer] <= self.refill_below

    def next_deadline(self, now: float) -> float:
        """When ``poll`` next has work (``now`` if it has some already)."""
        if (self._pending and len(self._outstanding) < self.max_in_flight and not self._stuck
                and any(self._refillable(p) for p in self.peers)):
            return now
        if self._cancels:
            return now
        times = [self._expiry(mh_peer[1], sent) for mh_peer, sent in self._outstanding.items()]
        times += [self._wants[m].not_before for m in self._parked if m in self._wants]
        return min(times, default=now + self.give_up_s)

    def poll(self, now: float) -> list[Effect]:
        """Expire timed-out wants, hand pending wants to peers, emit the messages."""
        effects: list[Effect] = []
        for (mh, peer), sent in list(self._outstanding.items()):
            if now >= self._expiry(peer, sent):
                self._drop_outstanding(mh, peer, "timed out", front=True)
        ready = [m for m in self._parked if m in self._wants and self._wants[m].not_before <= now]
        if ready:
            self._parked = [m for m in self._parked if m in self._wants and m not in ready]
            self._pending.extendleft(reversed(ready))
        entries: dict[str, list[Entry]] = {}
        open_peers = {p for p in self.peers if self._refillable(p)}
        held: list[bytes] = []  # wants whose peers are all still draining their window
        while (self._pending and open_peers and len(held) < HELD_PER_POLL
               and len(self._outstanding) < self.max_in_flight):
            mh = self._pending.popleft()
            w = self._wants.get(mh)
            if w is None or w.asked:
                continue
            peers = [p for p in self.peers if p not in w.refused]
            # peers that sent bad blocks are asked only when no other peer is left: a
            # lone peer behind a flaky link must not be banned for good
            trusted = [p for p in peers if self.bad_blocks.get(p, 0) < self.max_bad_blocks]
            peers = trusted or peers
            if peers and not open_peers.intersection(peers):
                held.append(mh)
                continue
            peers = [p for p in peers if p in open_peers]
            if not peers:
                if now - (w.created if w.first_asked is None else w.first_asked) >= self.give_up_s:
                    del self._wants[mh]
                    why = "; ".join(f"{p}: {r}" for p, r in w.history.items())
                    effects.append(Failed(w.cid, why or "no peer answered"))
                else:  # every peer said no: give them all another round after a pause
                    w.not_before = now + self.retry_backoff_s
                    self._parked.append(mh)
                    w.refused.clear()
                continue
            peer = min(peers, key=lambda p: self._load[p])
            w.asked.add(peer)
            if w.first_asked is None:
                w.first_asked = now
            self._outstanding[(mh, peer)] = now
            self._load[peer] += 1
            entries.setdefault(peer, []).append(
                Entry(w.cid, priority=1, want_type=WantType.BLOCK, send_dont_have=True))
        self._pending.extendleft(reversed(held))
        self._stuck = bool(held) and not any(
            not e.cancel for es in entries.values() for e in es)
        for peer, cids in self._cancels.items():
            entries.setdefault(peer, []).extend(Entry(c, cancel=True) for c in cids)
        self._cancels.clear()
        for peer, es in entries.items():
            acks = self._acks.pop(peer, None)
            if acks:
                es.extend(Entry(c, cancel=True) for c in acks)
        effects.extend(Send(p, Message(wantlist=tuple(es))) for p, es in entries.items())
        return effects

    def receive(self, peer: str, blocks: Iterable[tuple[bytes, bytes]],
                presences: Iterable[Presence] = (), now: float | None = None) -> list[Effect]:
        """Take verified ``(cid, data)`` blocks and presences from ``peer``.

        Blocks we do not want are ignored (the caller decides whether they were bad).
        ``now``, when given, records that ``peer`` is alive: its outstanding wants time
        out ``want_timeout_s`` after the later of their sending and its last message.
        """
        effects: list[Effect] = []
        if now is not None:
            self._heard[peer] = now
        for cid, data in blocks:
            mh = multihash_of(cid)
            w = self._wants.pop(mh, None)
            if w is None:
                continue
            for p in w.asked:
                self._forget(mh, p)
                if p != peer:
                    self._cancels.setdefault(p, []).append(w.cid)
            if peer in self._load:
                acks = self._acks.setdefault(peer, [])
                if len(acks) < MAX_ACKS_PER_PEER:
                    acks.append(w.cid)
            effects.append(Received(w.cid, data, peer))
        for pr in presences:
            if pr.type == PresenceType.DONT_HAVE:
                try:
                    mh = multihash_of(pr.cid)
                except MalformedMessage:
                    continue
                if (mh, peer) in self._outstanding:
                    self._drop_outstanding(mh, peer, "DONT_HAVE", front=True)
        return effects

    def bad_block(self, peer: str) -> None:
        """``peer`` sent a block that matches nothing we asked for: move its wants away."""
        self.bad_blocks[peer] = self.bad_blocks.get(peer, 0) + 1
        for mh, p in [k for k in self._outstanding if k[1] == peer]:
            self._drop_outstanding(mh, p, "sent a bad block", front=True)

    def send_failed(self, peer: str, message: Message) -> None:
        """A message to ``peer`` could not be delivered: its wants go to other peers."""
        for e in message.wantlist:
            if e.cancel:
                continue
            mh = multihash_of(e.cid)
            if (mh, peer) in self._outstanding:
                self._drop_outstanding(mh, peer, "unreachable", front=True)

    def _expiry(self, peer: str, sent: float) -> float:
        return max(sent, self._heard.get(peer, sent)) + self.want_timeout_s

    def _forget(self, mh: bytes, peer: str) -> None:
        if self._outstanding.pop((mh, peer), None) is not None:
            self._load[peer] -= 1
            self._stuck = False  # a window has room again

    def _drop_outstanding(self, mh: bytes, peer: str, why: str, *, front: bool) -> None:
        self._forget(mh, peer)
        w = self._wants.get(mh)
        if w is None:
            return
        w.asked.discard(peer)
        w.refused[peer] = why
        w.history[peer] = why
        if not w.asked:
            if front:
                self._pending.appendleft(mh)
            else:
                self._pending.append(mh)
