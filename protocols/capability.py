"""Capability advertisements and the live-peer table built from them.

Theory of operation:
- Each node publishes a signed ``cap`` ad on its team's capability topic at start, on
  every change, and every ``interval`` seconds. The ad carries the node's certificate so a
  receiver that has not yet seen it on the roster topic can still verify membership.
- Receivers order a peer's ads by ``seq`` (monotonic per node; a restarted node starts
  above its last value because seq is seeded from its wall clock in milliseconds).
- Expiry is measured on the receiver's clock: an ad is live for ``ttl_ms`` after it was
  received. The sender's clock is never compared with ours, so skew does not matter.
- Liveness: a member whose connection the receiver saw drop is *down* (``mark_down``)
  until it connects again or publishes an ad newer than the one it was down with; a down
  member is left out of ``live`` (so of placement and every listing) although its ad is
  kept until it expires, so a relay cannot bring it back with an old ad.
- ``wall`` (optional) is the sender's wall clock when it made the ad: used only to report
  clock skew to an operator (``teammesh doctor``), never for expiry or ordering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import wire
from .envelope import open_sealed, seal
from .errors import MalformedMessage
from .identity import Identity

DOMAIN_CAP = "cap"
MAX_KINDS = 256
# What a real node can report. An ad outside these bounds is refused whole: its author
# is buggy or hostile, and a receiver must never do arithmetic on such values (a cost of
# -1 once divided by zero in every member's placement loop).
MAX_CORES = 65_536
MAX_SLOTS = 4_096
MAX_QUEUE = 1_000_000
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB
MAX_COST = 1_000_000.0
MAX_WALL_MS = 1 << 47  # the year 6429: a wall clock in ms, not something else in the field
# An ad that arrives this soon after its author was seen to drop does not bring it back:
# gossip may still deliver (IHAVE/IWANT, up to gossip_history heartbeats) an ad the
# author published just before it died.
DOWN_HOLD_S = 3.0


@dataclass(frozen=True, slots=True)
class CapabilityAd:
    peer_id: str
    team_id: str
    addrs: tuple[str, ...]
    cores: int
    slots: int
    free_slots: int
    memory_bytes: int
    gpus: tuple[str, ...]
    kinds: dict[str, str]  # kind name -> version
    queue: int
    cost: float
    storage: tuple[str, ...]
    software: str
    seq: int
    ttl_ms: int
    cert: bytes
    pull: bool = False
    wall_ms: int | None = None  # sender's wall clock (ms since the epoch) at signing

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "cap", "v": 1, "peer": self.peer_id, "team": self.team_id,
            "addrs": list(self.addrs), "cores": self.cores, "slots": self.slots,
            "free": self.free_slots, "mem": self.memory_bytes, "gpu": list(self.gpus),
            "kinds": dict(self.kinds), "queue": self.queue, "cost": float(self.cost),
            "storage": list(self.storage), "sw": self.software, "seq": self.seq,
            "ttl": self.ttl_ms, "cert": self.cert, "pull": self.pull,
        } | ({} if self.wall_ms is None else {"wall": self.wall_ms})

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> CapabilityAd:
        if m["t"] != "cap":
            raise MalformedMessage("not a capability ad")
        kinds = wire.field_map(m, "kinds")
        if len(kinds) > MAX_KINDS or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in kinds.items()
        ):
            raise MalformedMessage("field 'kinds' must map up to 256 names to version strings")
        ad = cls(
            peer_id=wire.field_str(m, "peer", max_len=100),
            team_id=wire.field_str(m, "team", max_len=64),
            addrs=tuple(wire.field_str_list(m, "addrs", max_len=32)),
            cores=wire.field_int(m, "cores"),
            slots=wire.field_int(m, "slots"),
            free_slots=wire.field_int(m, "free"),
            memory_bytes=wire.field_int(m, "mem"),
            gpus=tuple(wire.field_str_list(m, "gpu", max_len=16)),
            kinds=kinds,
            queue=wire.field_int(m, "queue"),
            cost=wire.field_float(m, "cost"),
            storage=tuple(wire.field_str_list(m, "storage", max_len=16)),
            software=wire.field_str(m, "sw", max_len=64),
            seq=wire.field_int(m, "seq"),
            ttl_ms=wire.field_int(m, "ttl"),
            cert=wire.field_bytes(m, "cert", max_len=4096),
            pull=bool(m.get("pull", False)),
            wall_ms=_wall(m),
        )
        if not 0 < ad.ttl_ms <= 3_600_000:
            raise MalformedMessage("field 'ttl' must be between 1 ms and 1 hour")
        _check_capacity(ad)
        return ad

    def sealed(self, identity: Identity) -> bytes:
        if identity.peer_id != self.peer_id:
            raise MalformedMessage("an ad is signed by the peer it describes")
        return seal(identity, DOMAIN_CAP, self.to_wire())


def _wall(m: dict[str, Any]) -> int | None:
    wall = m.get("wall")
    if wall is None:
        return None  # ads from nodes before session 7 have no clock
    if isinstance(wall, bool) or not isinstance(wall, int) or not 0 <= wall <= MAX_WALL_MS:
        raise MalformedMessage(f"field 'wall' must be an integer from 0 to {MAX_WALL_MS}"
                               " (ms since the epoch)")
    return wall


def _check_capacity(ad: CapabilityAd) -> None:
    bounds = (("cores", ad.cores, MAX_CORES), ("slots", ad.slots, MAX_SLOTS),
              ("free", ad.free_slots, MAX_SLOTS), ("queue", ad.queue, MAX_QUEUE),
              ("mem", ad.memory_bytes, MAX_MEMORY_BYTES))
    for name, value, top in bounds:
        if not 0 <= value <= top:
            raise MalformedMessage(f"field {name!r} is {value}; it must be from 0 to {top}")
    if ad.free_slots > ad.slots:
        raise MalformedMessage(f"field 'free' ({ad.free_slots}) exceeds 'slots' ({ad.slots})")
    # NaN fails both comparisons, so it is refused with the negative and the absurd
    if not 0.0 <= ad.cost <= MAX_COST:
        raise MalformedMessage(f"field 'cost' is {ad.cost}; it must be from 0 to {MAX_COST:g}")
    if ad.seq < 0:
        raise MalformedMessage("field 'seq' must not be negative")


def open_ad(data: bytes) -> CapabilityAd:
    """Verify and decode a gossiped ad; the signer must be the peer it describes."""
    opened = open_sealed(data, DOMAIN_CAP, max_bytes=wire.MAX_GOSSIP_BYTES)
    ad = CapabilityAd.from_wire(opened.body)
    if ad.peer_id != opened.signer:
        raise MalformedMessage(f"ad for {ad.peer_id} signed by {opened.signer}")
    return ad


DOMAIN_DOWN = "down"


@dataclass(frozen=True, slots=True)
class DownNotice:
    """A member saw another's connection drop (or go silent to its keepalive): gossiped on
    the team's liveness topic so members not connected to it learn it too. Signed by the
    observer; ``seq`` is the newest seq of the dropped member's ad the observer held."""

    observer: str
    team_id: str
    peer_id: str
    seq: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": "down", "v": 1, "by": self.observer, "team": self.team_id,
                "peer": self.peer_id, "seq": self.seq}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> DownNotice:
        if m["t"] != "down":
            raise MalformedMessage("not a down notice")
        notice = cls(observer=wire.field_str(m, "by", max_len=100),
                     team_id=wire.field_str(m, "team", max_len=64),
                     peer_id=wire.field_str(m, "peer", max_len=100),
                     seq=wire.field_int(m, "seq"))
        if notice.seq < 0:
            raise MalformedMessage("field 'seq' must not be negative")
        if notice.peer_id == notice.observer:
            raise MalformedMessage("a member cannot report itself down")
        return notice

    def sealed(self, identity: Identity) -> bytes:
        if identity.peer_id != self.observer:
            raise MalformedMessage("a down notice is signed by its observer")
        return seal(identity, DOMAIN_DOWN, self.to_wire())


def open_down(data: bytes) -> DownNotice:
    """Verify and decode a gossiped down notice; the signer must be its observer."""
    opened = open_sealed(data, DOMAIN_DOWN, max_bytes=wire.MAX_GOSSIP_BYTES)
    notice = DownNotice.from_wire(opened.body)
    if notice.observer != opened.signer:
        raise MalformedMessage(f"notice by {notice.observer} signed by {opened.signer}")
    return notice


@dataclass(slots=True)
class PeerEntry:
    ad: CapabilityAd
    received: float  # receiver's monotonic clock, seconds
    expires: float
    sealed: bytes = b""  # the ad as its author signed it, for relaying (ad sync)
    # the author's wall clock minus ours when it made the ad (None: it sent no clock)
    clock_offset_s: float | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        a = self.ad
        return {
            "peer_id": a.peer_id, "addrs": list(a.addrs), "cores": a.cores, "slots": a.slots,
            "free_slots": a.free_slots, "memory_bytes": a.memory_bytes, "gpus": list(a.gpus),
            "kinds": dict(a.kinds), "queue": a.queue, "cost": a.cost,
            "storage": list(a.storage), "version": a.software, "seq": a.seq, "pull": a.pull,
            "age_s": round(now - self.received, 3),
            "expires_in_s": round(self.expires - now, 3),
            "clock_offset_s": None if self.clock_offset_s is None
            else round(self.clock_offset_s, 1),
        }


@dataclass(frozen=True, slots=True)
class DownMark:
    """Why a member is down: the newest seq we held of it, and when (receiver's clock)."""

    seq: int
    at: float


@dataclass(slots=True)
class PeerTable:
    """Latest ad per peer, and which peers are down. Pure: callers pass ``now``
    (monotonic seconds) and, for clock offsets, ``wall`` (the epoch seconds)."""

    entries: dict[str, PeerEntry] = field(default_factory=dict)
    down: dict[str, DownMark] = field(default_factory=dict)

    def update(self, ad: CapabilityAd, now: float, age: float = 0.0,
               sealed: bytes = b"", wall: float | None = None) -> bool:
        """Store ``ad`` if newer than what we hold; return True if the live list changed.

        ``age`` (seconds) is how long ago a relaying peer received it (ad sync): the ad
        lives ``ttl`` from then, not from now, so relays cannot keep a gone peer alive.
        A down peer comes back only with an ad newer than the one it went down with,
        received (``now - age``) at least DOWN_HOLD_S after it went down: relays hold
        only what it said before."""
        received = now - min(max(age, 0.0), ad.ttl_ms / 1000)
        expires = received + ad.ttl_ms / 1000
        if expires <= now:
            return False
        old = self.entries.get(ad.peer_id)
        if old is not None and old.ad.seq >= ad.seq and old.expires > now:
            return False
        offset = None
        if wall is not None and ad.wall_ms is not None:
            offset = ad.wall_ms / 1000 - (wall - (now - received))
        self.entries[ad.peer_id] = PeerEntry(ad, received, expires, sealed, offset)
        mark = self.down.get(ad.peer_id)
        if mark is None:
            return True
        if ad.seq > mark.seq and received >= mark.at + DOWN_HOLD_S:
            del self.down[ad.peer_id]
            return True
        return False

    def mark_down(self, peer_id: str, now: float) -> bool:
        """We lost our connection to ``peer_id``; return True if it was live."""
        e = self.entries.get(peer_id)
        if e is None or e.expires <= now or peer_id in self.down:
            return False
        self.down[peer_id] = DownMark(e.ad.seq, now)
        return True

    def apply_notice(self, notice: DownNotice, now: float) -> bool:
        """Another member saw ``notice.peer_id`` drop: down here too, unless we hold a
        newer ad of it than the observer did (we heard from it since). Callers connected
        to the peer ignore notices about it: their own keepalive knows better."""
        e = self.entries.get(notice.peer_id)
        if e is None or e.expires <= now or notice.peer_id in self.down:
            return False
        if e.ad.seq > notice.seq:
            return False
        self.down[notice.peer_id] = DownMark(e.ad.seq, now)
        return True

    def mark_up(self, peer_id: str, now: float) -> bool:
        """``peer_id`` is connected again; return True if that made it live."""
        if self.down.pop(peer_id, None) is None:
            return False
        e = self.entries.get(peer_id)
        return e is not None and e.expires > now

    def is_down(self, peer_id: str) -> bool:
        return peer_id in self.down

    def expire(self, now: float) -> list[str]:
        """Drop expired ads (and the down marks that go with them); return the peers that
        left the live list."""
        gone = [p for p, e in self.entries.items() if e.expires <= now]
        left = [p for p in gone if p not in self.down]
        for p in gone:
            del self.entries[p]
            self.down.pop(p, None)
        return left

    def remove(self, peer_id: str) -> None:
        self.entries.pop(peer_id, None)
        self.down.pop(peer_id, None)

    def live(self, now: float) -> list[PeerEntry]:
        return [e for p, e in self.entries.items() if e.expires > now and p not in self.down]

    def down_entries(self, now: float) -> list[tuple[PeerEntry, DownMark]]:
        """Down members whose ad has not expired yet, with when they went down."""
        return [(e, self.down[p]) for p, e in self.entries.items()
                if p in self.down and e.expires > now]

    def get(self, peer_id: str, now: float) -> PeerEntry | None:
        e = self.entries.get(peer_id)
        if e is None or e.expires <= now or peer_id in self.down:
            return None
        return e
