"""Membership service: who may connect, enrollment of new members, revocation by gossip.

The roster (pure, protocols/membership.py) decides; this service persists it, answers the
handshake and stream gates, runs the enroll protocol for admins, gossips new certificates
and revocations on the team's roster topic, and syncs rosters with every member it dials.

Bridge keys (docs/BRIDGE.md): the team's master bridge key M lives only on admins
(journal ``bridge_master``); every node keeps its own derived key
K_P = derive_member_key(M, P) in ``bridge_key`` and the master's epoch in ``bridge_epoch``.
A revocation by an admin rotates M: the admin keeps the new master, tells the Worker, and
gossips a signed epoch notice; each remaining member then fetches its new K_P from an
admin over /teammesh/bridgekey/1.0.0, retrying until it has it. A journal from before
(``bridge_key`` holding M itself) is migrated on load: an admin keeps M as its master,
and every node signs with its derived key from then on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

import trio
from teammesh.node.core.config import Home
from teammesh.node.core.journal import Journal
from teammesh.node.p2p.host import (
    PEER_ERRORS,
    STREAM_ERRORS,
    MeshHost,
    Stream,
    open_host,
)
from teammesh.node.p2p.protocol_ids import BRIDGE_KEY, ENROLL, RENEW, ROSTER_SYNC, roster_topic
from teammesh.protocols import wire
from teammesh.protocols.bitswap import BITSWAP_PROTOCOLS
from teammesh.protocols.bridgekey import derive_member_key
from teammesh.protocols.errors import (
    EnrollmentError,
    InviteError,
    MembershipError,
    NotAMember,
    RemoteProtocolError,
    TeammeshError,
)
from teammesh.protocols.identity import Identity
from teammesh.protocols.membership import (
    MAX_CERT_BYTES,
    ROLE_ADMIN,
    ROLE_MEMBER,
    Certificate,
    EpochNotice,
    Invite,
    Roster,
    TeamInfo,
    check_enroll_request,
    enroll_request,
    issue_certificate,
    issue_epoch_notice,
    issue_revocation,
    open_own_certificate,
    parse_certificate,
    parse_epoch_notice,
    renewal_at,
    renewal_due,
)

logger = logging.getLogger("teammesh.membership")
# an admin that no longer counts us as a member is one more admin that cannot renew us
_RENEW_ERRORS: tuple[type[BaseException], ...] = (NotAMember, *PEER_ERRORS)

CERT_TTL_S = 365 * 24 * 3600
# Tests (and operators who want short-lived certificates) set the lifetime an admin issues
# for; a config key [team] cert_ttl_s would be the permanent home of this knob.
CERT_TTL_ENV = "TEAMMESH_CERT_TTL_S"
MIN_CERT_TTL_S = 10
RENEW_RETRY_MAX_S = 600.0
INVITE_GRACE_S = 7 * 24 * 3600  # a used/expired invite is still answered ("already used")
ENROLL_TIMEOUT_S = 10.0
BRIDGE_MASTER_BYTES = 32
KEY_RETRY_MIN_S = 1.0  # a member without its current bridge key asks again this often,
KEY_RETRY_MAX_S = 30.0  # doubling up to this
# Gossip is best effort: an admin repeats a new epoch notice this often, this many times
# (roster sync on every dial carries it too).
NOTICE_REPEAT_S = 10.0
NOTICE_REPEATS = 3


def now_s() -> int:
    return int(time.time())


def cert_ttl_s() -> int:
    """The lifetime of the certificates this node issues (365 days unless overridden)."""
    raw = os.environ.get(CERT_TTL_ENV)
    if not raw:
        return CERT_TTL_S
    try:
        ttl = int(raw)
    except ValueError:
        raise MembershipError(f"{CERT_TTL_ENV} must be a whole number of seconds") from None
    if ttl < MIN_CERT_TTL_S:
        raise MembershipError(f"{CERT_TTL_ENV} must be at least {MIN_CERT_TTL_S} seconds")
    return ttl


async def read_message(stream: Stream, max_bytes: int = wire.MAX_FRAME_BYTES,
                       timeout_s: float | None = None) -> wire.Message:
    """Read exactly one framed message from a request/response stream.

    With ``timeout_s``, a peer that has not sent it by then is a RemoteProtocolError (a
    stream handler reports it as the peer's fault, not as a bug of ours)."""
    if timeout_s is None:
        return await _read_one(stream, max_bytes)
    try:
        with trio.fail_after(timeout_s):
            return await _read_one(stream, max_bytes)
    except trio.TooSlowError:
        raise RemoteProtocolError(f"no complete message within {timeout_s:g} s") from None


async def _read_one(stream: Stream, max_bytes: int) -> wire.Message:
    decoder = wire.FrameDecoder(max_bytes)
    while True:
        chunk = await stream.read()
        if not chunk:
            raise RemoteProtocolError("stream ended before a whole message arrived")
        frames = decoder.feed(chunk)
        if frames:
            return wire.unpack(frames[0], max_bytes=max_bytes)


async def request_reply(host: MeshHost, peer_id: str, protocol: str, request: bytes,
                        timeout_s: float) -> wire.Message:
    """Open a stream, send one framed request, read one framed reply (within timeout_s)."""
    stream = await host.open_stream(peer_id, protocol)
    await stream.write(request)
    reply = await read_message(stream, timeout_s=timeout_s)
    await stream.close()
    return reply


def _utc(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def error_reply(code: str, message: str) -> bytes:
    return wire.frame_message({"t": "error", "v": 1, "code": code, "message": message})


class Membership:
    def __init__(self, home: Home, journal: Journal, identity: Identity, *,
                 bitswap_peers: set[str] | None = None, bitswap_public: bool = False) -> None:
        self.home = home
        self.journal = journal
        self.audit: Any = None  # the node's AuditLog, when a daemon runs
        self.identity = identity
        raw = journal.get("team")
        self.team: TeamInfo | None = None
        self.roster: Roster | None = None
        self.cert: Certificate | None = None
        self.root: Identity | None = None
        self.on_revoked: list[Callable[[str], None]] = []
        self.lapsed: Certificate | None = None  # our own certificate, if it expired
        # revoked peers whose connections and streams the run loop has yet to cut
        self._to_drop: list[str] = []
        self._drop_wanted = trio.Event()
        self.enroll_peers: set[str] = set()
        # outside peers (or anyone, when public) admitted to Bitswap and nothing else
        self.bitswap_peers: set[str] = set(bitswap_peers or ())
        self.bitswap_public = bitswap_public
        # certificates and revocations to gossip on the next publish
        self.new_certs: list[bytes] = []
        self.pending_revocations: list[bytes] = []
        self.changed = trio.Event()
        # the latest bridge epoch notice known (gossiped, and handed on in roster syncs)
        self.epoch_notice: EpochNotice | None = None
        self._key_wanted = trio.Event()
        # set when an admin's rotation waits for the Worker (journal ``bridge_rotation``)
        self._rotation_wanted = trio.Event()
        self._notice_repeats = 0
        # The daemon's BridgeClient, when it has one: told of this node's new key, and used
        # by an admin to rotate the Worker's master (else one is made from [bridge] url).
        self.bridge: Any = None
        self.on_bridge_key: list[Callable[[bytes, int], None]] = []
        if raw is not None:
            self._load(TeamInfo.from_dict(json.loads(raw)))

    def _load(self, team: TeamInfo) -> None:
        self.team = team
        roster = Roster(team)
        roster.merge(self.journal.certs(), self.journal.revocations(), now_s())
        self.roster = roster
        own = roster.certs.get(self.identity.peer_id)
        self.cert = own
        self.lapsed = None
        if own is None and self.identity.peer_id not in roster.revocations:
            self.lapsed = self._own_lapsed_certificate(team)
        if self.home.root_key_file.exists():
            self.root = Identity(self.home.root_key_file.read_bytes())
            # The root renews itself, also after a year switched off: nobody else could.
            if self.cert is None or renewal_due(self.cert, now_s()):
                self.renew_own_as_root()
        self.enroll_peers = set(self.journal.live_invites(now_s(), INVITE_GRACE_S))
        self._migrate_bridge_keys()
        notice = self.journal.get("bridge_notice")
        if notice is not None:
            try:
                self.epoch_notice = parse_epoch_notice(notice, team, now_s())
            except RemoteProtocolError:
                logger.warning("ignoring a damaged bridge epoch notice in the journal")

    def _own_lapsed_certificate(self, team: TeamInfo) -> Certificate | None:
        now = now_s()
        for data in self.journal.certs():
            try:
                cert = open_own_certificate(data, team, now)
            except (RemoteProtocolError, NotAMember):
                continue
            if cert.peer_id == self.identity.peer_id:
                return cert
        return None

    def renew_own_as_root(self) -> Certificate:
        """The root-key node re-signs its own certificate (same roles, a fresh lifetime)."""
        team = self.team
        assert team is not None
        assert self.root is not None
        old = self.cert or self.lapsed
        roles = old.roles if old is not None else (ROLE_ADMIN, ROLE_MEMBER)
        cert = issue_certificate(self.root, team, self.identity.peer_id, roles, now_s(),
                                 cert_ttl_s())
        self._take_own_certificate(cert)
        logger.info("renewed this node's certificate until %s", _utc(cert.expires))
        return cert

    def _take_own_certificate(self, cert: Certificate) -> None:
        assert self.roster is not None
        self.roster.certs[cert.peer_id] = cert
        self.journal.save_cert(cert.peer_id, cert.packed())
        self.cert = cert
        self.lapsed = None
        # gossip it, so members never see this node's old certificate lapse
        self.new_certs.append(cert.packed())
        self.changed.set()

    def _migrate_bridge_keys(self) -> None:
        """Journals from before per-member keys hold the team master in ``bridge_key``."""
        key = self.journal.get("bridge_key")
        if key is None or self.journal.get("bridge_epoch") is not None:
            return
        with self.journal.transaction():
            if self.is_admin and self.journal.get("bridge_master") is None:
                self.journal.put("bridge_master", key)
            # A member signs with its derived key from now on and forgets the master: the
            # Worker derives the same key from the master it holds (epoch 0).
            self.journal.put("bridge_key", derive_member_key(key, self.identity.peer_id))
            self.journal.put("bridge_epoch", b"0")
        logger.info("bridge key migrated to this node's own derived key (epoch 0)")

    # --- state ------------------------------------------------------------------------
    @property
    def is_admin(self) -> bool:
        return self.root is not None

    def require_team(self) -> tuple[TeamInfo, Roster]:
        if self.team is not None and self.roster is not None and \
                self.identity.peer_id in self.roster.revocations:
            raise MembershipError(
                f"this node was revoked from team {self.team.name!r} by an admin; ask an"
                " admin for a new invite and run `teammesh join INVITE`")
        if self.team is not None and self.cert is None and self.lapsed is not None:
            raise MembershipError(
                f"this node's certificate for team {self.team.name!r} expired on"
                f" {_utc(self.lapsed.expires)} (it was off when it was due for renewal);"
                " ask an admin for a new invite and run `teammesh join INVITE`")
        if self.team is None or self.roster is None or self.cert is None:
            raise MembershipError(
                "this node is in no team; run `teammesh team create NAME` or"
                " `teammesh join INVITE` first")
        return self.team, self.roster

    def is_member(self, peer_id: str) -> bool:
        if peer_id == self.identity.peer_id:
            return True
        return self.roster is not None and self.roster.is_member(peer_id, now_s())

    def is_revoked(self, peer_id: str) -> bool:
        return self.roster is not None and peer_id in self.roster.revocations

    def peer_gate(self, peer_id: str) -> bool:
        # A revoked member is refused even where outsiders are let in (serve = "public"):
        # the team said no to this peer by name.
        if self.is_revoked(peer_id):
            return False
        return (self.is_member(peer_id) or peer_id in self.enroll_peers
                or self.bitswap_public or peer_id in self.bitswap_peers)

    def stream_gate(self, peer_id: str, protocol: str) -> bool:
        if self.is_revoked(peer_id):
            return False
        if protocol == ENROLL:
            return peer_id in self.enroll_peers
        if self.is_member(peer_id):
            return True
        return protocol in BITSWAP_PROTOCOLS and (
            self.bitswap_public or peer_id in self.bitswap_peers)

    def summary(self) -> dict[str, Any] | None:
        if self.team is None or self.cert is None:
            return None
        return {
            "id": self.team.team_id, "name": self.team.name,
            "roles": list(self.cert.roles), "admin": self.is_admin,
            "members": len(self.roster.members(now_s())) if self.roster else 0,
            "cert_expires": self.cert.expires,
        }

    def members(self) -> list[dict[str, Any]]:
        _, roster = self.require_team()
        now = now_s()
        out = [{"peer_id": c.peer_id, "roles": list(c.roles), "expires": c.expires,
                "revoked": False} for c in roster.certs.values() if c.expires > now]
        out += [{"peer_id": p, "roles": [], "expires": None, "revoked": True}
                for p in roster.revocations]
        return out

    # --- team creation (offline, by the CLI) -------------------------------------------
    def create_team(self, name: str) -> TeamInfo:
        if self.team is not None:
            raise MembershipError(
                f"this node is already in team {self.team.name!r} ({self.team.team_id});"
                " use another --home for another team")
        if not name or len(name) > 64:
            raise MembershipError("a team name is 1 to 64 characters")
        root = Identity(secrets.token_bytes(32))
        team = TeamInfo.create(name, root.public)
        self.home.write_private(self.home.root_key_file, root.seed)
        cert = issue_certificate(root, team, self.identity.peer_id, (ROLE_ADMIN, ROLE_MEMBER),
                                 now_s(), cert_ttl_s())
        with self.journal.transaction():
            self.journal.put("team", json.dumps(team.to_dict()).encode())
            self.journal.save_cert(self.identity.peer_id, cert.packed())
            # The team's bridge master key: admins keep it; every member gets its own key
            # derived from it when it enrolls (docs/BRIDGE.md). The Worker is set up with
            # the master (`teammesh team bridge-key`): epoch 0.
            master = secrets.token_bytes(BRIDGE_MASTER_BYTES)
            self.journal.put("bridge_master", master)
            self.journal.put("bridge_key", derive_member_key(master, self.identity.peer_id))
            self.journal.put("bridge_epoch", b"0")
        self._load(team)
        return team

    # --- bridge keys ------------------------------------------------------------------
    @property
    def bridge_key(self) -> bytes | None:
        """This node's own bridge signing key (derived from the master)."""
        return self.journal.get("bridge_key")

    @property
    def bridge_master(self) -> bytes | None:
        """The team's master bridge key: on admins only."""
        return self.journal.get("bridge_master")

    @property
    def bridge_epoch(self) -> int:
        raw = self.journal.get("bridge_epoch")
        return int(raw) if raw else 0

    def _store_bridge_key(self, key: bytes, epoch: int, master: bytes | None = None) -> None:
        with self.journal.transaction():
            if master is not None:
                self.journal.put("bridge_master", master)
            self.journal.put("bridge_key", key)
            self.journal.put("bridge_epoch", str(epoch).encode())
        if master is None and self.bridge is not None and hasattr(self.bridge, "key"):
            self.bridge.key = key  # the daemon's client signs with the new key at once
        for hook in self.on_bridge_key:
            hook(key, epoch)

    def rotate_bridge_master(self) -> EpochNotice:
        """An admin makes a new master key and epoch (after a revocation) and keeps them.

        The Worker is told first (``_worker_rotation_loop``, retried until it answers, and
        across restarts); only then does the epoch notice go out, so members never sign
        with a key the Worker cannot check yet."""
        team, _ = self.require_team()
        old = self.bridge_master
        if self.root is None or old is None:
            raise MembershipError("only an admin holding the bridge master key can rotate it")
        master = secrets.token_bytes(BRIDGE_MASTER_BYTES)
        epoch = max(self.bridge_epoch, self.epoch_notice.epoch if self.epoch_notice else 0) + 1
        notice = issue_epoch_notice(self.root, team, epoch, self.identity.peer_id, now_s())
        self._store_bridge_key(derive_member_key(master, self.identity.peer_id), epoch, master)
        self.journal.put("bridge_rotation", wire.pack(
            {"t": "rotation", "v": 1, "master": master, "epoch": epoch, "old": old,
             "notice": notice.packed()}))
        self._rotation_wanted.set()
        logger.warning("bridge master key rotated to epoch %d", epoch)
        return notice

    def learn_epoch_notice(self, data: bytes) -> bool:
        """Take a notice from a peer; True if it is newer than what we knew."""
        team, _ = self.require_team()
        notice = parse_epoch_notice(data, team, now_s())
        if self.epoch_notice is not None and notice.epoch <= self.epoch_notice.epoch:
            return False
        self.journal.put("bridge_notice", data)
        self.epoch_notice = notice
        if self.needs_bridge_key:
            logger.info("bridge key moved to epoch %d; fetching this node's new key",
                        notice.epoch)
            self._key_wanted.set()
        return True

    @property
    def needs_bridge_key(self) -> bool:
        return (self.epoch_notice is not None and self.epoch_notice.epoch > self.bridge_epoch
                and self.bridge_master is None
                and not self.is_revoked(self.identity.peer_id))

    async def handle_bridge_key(self, stream: Stream) -> None:
        """An admin hands a current member its key under the current master."""
        request = await read_message(stream, 4096, ENROLL_TIMEOUT_S)
        if request["t"] != "bridge_key_req":
            raise RemoteProtocolError("expected a bridge key request")
        master = self.bridge_master
        peer = stream.peer_id
        if master is None:
            await stream.write(error_reply("not_admin", "this node holds no bridge master key"))
        elif not self.is_member(peer) or self.is_revoked(peer):
            await stream.write(error_reply("not_a_member", "only members get a bridge key"))
        else:
            await stream.write(wire.frame_message({
                "t": "bridge_key", "v": 1, "epoch": self.bridge_epoch,
                "key": derive_member_key(master, peer)}))
            logger.info("handed member %s its bridge key (epoch %d)", peer, self.bridge_epoch)
        await stream.close()

    async def fetch_bridge_key(self, host: MeshHost) -> bool:
        """Ask the notice's admin (then any other admin) for this node's current key."""
        notice = self.epoch_notice
        if notice is None or self.roster is None:
            return True
        admins = [notice.admin] + [p for p, c in self.roster.certs.items()
                                   if c.is_admin and p not in (notice.admin,
                                                                self.identity.peer_id)]
        request = wire.frame_message({"t": "bridge_key_req", "v": 1})
        for admin in admins:
            try:
                reply = await request_reply(host, admin, BRIDGE_KEY, request, ENROLL_TIMEOUT_S)
                if reply["t"] != "bridge_key":
                    logger.debug("admin %s gave no bridge key: %s", admin, reply.get("message"))
                    continue
                epoch = wire.field_int(reply, "epoch")
                key = wire.field_bytes(reply, "key", max_len=64)
            except PEER_ERRORS as exc:
                logger.debug("bridge key from %s failed: %s", admin, exc)
                continue
            if epoch > self.bridge_epoch and len(key) == 32:
                self._store_bridge_key(key, epoch)
                logger.warning("got this node's bridge key for epoch %d from %s", epoch, admin)
            if not self.needs_bridge_key:
                return True
        return False

    async def _bridge_key_loop(self, host: MeshHost) -> None:
        delay = KEY_RETRY_MIN_S
        while True:
            if not self.needs_bridge_key:
                delay = KEY_RETRY_MIN_S
                await self._key_wanted.wait()
                self._key_wanted = trio.Event()
                continue
            if not await self.fetch_bridge_key(host):
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(KEY_RETRY_MAX_S, delay * 2)

    async def _worker_rotation_loop(self) -> None:
        """Tell the Worker of the newest master until it has taken it, then publish the
        epoch notice that sends members for their new keys."""
        while True:
            raw = self.journal.get("bridge_rotation")
            if not raw:
                await self._rotation_wanted.wait()
                self._rotation_wanted = trio.Event()
                continue
            m = wire.unpack(raw)
            master = wire.field_bytes(m, "master", max_len=64)
            epoch = wire.field_int(m, "epoch")
            delay = KEY_RETRY_MIN_S
            while not await self._rotate_worker(master, epoch,
                                                wire.field_bytes(m, "old", max_len=64)):
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(KEY_RETRY_MAX_S, delay * 2)
            if self.journal.get("bridge_rotation") != raw:
                continue  # a newer rotation came meanwhile: it goes out instead
            notice = wire.field_bytes(m, "notice", max_len=MAX_CERT_BYTES)
            with self.journal.transaction():
                self.journal.put("bridge_notice", notice)
                self.journal.put("bridge_rotation", b"")
            team, _ = self.require_team()
            self.epoch_notice = parse_epoch_notice(notice, team, now_s())
            self.changed.set()  # gossip it with the next roster message
            self._notice_repeats = NOTICE_REPEATS

    async def _notice_repeat_loop(self) -> None:
        while True:
            await trio.sleep(NOTICE_REPEAT_S)
            if self._notice_repeats > 0:
                self._notice_repeats -= 1
                self.changed.set()

    def _bridge_url(self) -> str | None:
        from teammesh.node.core.config import (
            load_config,  # with TEAMMESH_BRIDGE_URL from the environment
        )

        try:
            return str(load_config(self.home).get("bridge", "url") or "") or None
        except (TeammeshError, KeyError):
            return None

    async def _rotate_worker(self, master: bytes, epoch: int, old: bytes) -> bool:
        """One attempt; True when done (or nothing to do), False to retry later."""
        from teammesh.node.bridge.client import BridgeClient, BridgeRejected, BridgeUnavailable

        url = getattr(self.bridge, "url", None) or self._bridge_url()
        if url is None:
            return True  # no bridge configured on this node: members still rotate
        # Signed with the old master: the Worker takes a rotation from an admin only (the
        # daemon's own client signs with this node's derived key).
        own = BridgeClient(url, old, self.identity.peer_id)
        try:
            if not hasattr(own, "rotate"):
                logger.error("this node's bridge client cannot rotate the Worker's key yet;"
                             " rotate it by hand to epoch %d", epoch)
                return True
            await own.rotate(master, epoch)
            logger.warning("the bridge took master key epoch %d", epoch)
            if self.bridge is not None and hasattr(self.bridge, "key"):
                self.bridge.key = derive_member_key(master, self.identity.peer_id)
            return True
        except BridgeUnavailable as exc:
            logger.warning("bridge key rotation to epoch %d failed, will retry: %s", epoch, exc)
            return False
        except BridgeRejected as exc:
            logger.error("the bridge refused key rotation to epoch %d: %s", epoch, exc)
            return True
        finally:
            await own.aclose()

    def accept_enrollment(self, team: TeamInfo, cert_data: bytes, certs: list[bytes],
                          revocations: list[bytes]) -> None:
        now = now_s()
        cert = parse_certificate(cert_data, team, now)
        if cert.peer_id != self.identity.peer_id:
            raise EnrollmentError("the admin issued a certificate for another peer")
        with self.journal.transaction():
            self.journal.put("team", json.dumps(team.to_dict()).encode())
            self.journal.save_cert(cert.peer_id, cert_data)
            roster = Roster(team)
            roster.merge(certs, revocations, now)
            for c in roster.certs.values():
                self.journal.save_cert(c.peer_id, c.packed())
            for r in roster.revocations.values():
                self.journal.save_revocation(r.peer_id, r.packed())
        self._load(team)

    # --- admin actions (daemon) --------------------------------------------------------
    def create_invite(self, addrs: list[str], ttl_s: int) -> Invite:
        team, _ = self.require_team()
        if self.root is None:
            raise MembershipError("only the node that created the team can invite members")
        if not addrs:
            raise MembershipError(
                "this node has no address peers can dial; start it with --listen")
        seed = secrets.token_bytes(32)
        now = now_s()
        invite = Invite(team, self.identity.peer_id, tuple(addrs), seed, now + ttl_s)
        self.journal.add_invite(invite.enroll_peer_id, now, now + ttl_s)
        self.enroll_peers.add(invite.enroll_peer_id)
        return invite

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append(event, **fields)

    def revoke(self, peer_id: str) -> bytes:
        team, _roster = self.require_team()
        if self.root is None:
            raise MembershipError("only the node that created the team can revoke members")
        if peer_id == self.identity.peer_id:
            raise MembershipError("an admin cannot revoke itself")
        rev = issue_revocation(self.root, team, peer_id, now_s())
        data = rev.packed()
        self._audit("revoked", peer=peer_id)
        self._apply(certs=[], revocations=[data])
        self.pending_revocations.append(data)
        if self.bridge_master is not None:
            # the revoked member's bridge key dies with the master it was derived from
            self.rotate_bridge_master()
        self.changed.set()
        return data

    def _apply(self, certs: list[bytes], revocations: list[bytes]) -> tuple[int, list[str]]:
        if self.roster is None:
            return 0, []
        before = set(self.roster.certs)
        added, revoked = self.roster.merge(certs, revocations, now_s())
        if added or revoked:
            with self.journal.transaction():
                for p, c in self.roster.certs.items():
                    if p not in before:
                        self.journal.save_cert(p, c.packed())
                for p in revoked:
                    self.journal.save_revocation(p, self.roster.revocations[p].packed())
        for p in revoked:
            logger.warning("member %s revoked", p)
            self._to_drop.append(p)
            self._drop_wanted.set()
            for cb in self.on_revoked:
                cb(p)
        return added, revoked

    def learn_certificate(self, data: bytes) -> bool:
        added, _ = self._apply([data], [])
        return added > 0

    # --- services ---------------------------------------------------------------------
    async def handle_enroll(self, stream: Stream) -> None:
        team, roster = self.require_team()
        enroll_peer = stream.peer_id
        request = await read_message(stream, 4096, ENROLL_TIMEOUT_S)
        record = self.journal.invite(enroll_peer)
        now = now_s()
        if self.root is None or record is None:
            await stream.write(error_reply("unknown_invite", "this node issued no such invite"))
            return await stream.close()
        expires, used_by = record
        if used_by is not None:
            await stream.write(error_reply("invite_used", "this invite was already used;"
                                           " ask the admin for a new one"))
            return await stream.close()
        if expires <= now:
            await stream.write(error_reply("invite_expired", "this invite expired;"
                                           " ask the admin for a new one"))
            return await stream.close()
        peer = check_enroll_request(wire.pack(request), enroll_peer, team.team_id)
        if not self.journal.use_invite(enroll_peer, peer):
            await stream.write(error_reply("invite_used", "this invite was already used"))
            return await stream.close()
        cert = issue_certificate(self.root, team, peer, (ROLE_MEMBER,), now, cert_ttl_s())
        self._apply([cert.packed()], [])
        certs, revocations = roster.export()
        reply: dict[str, Any] = {
            "t": "enrolled", "v": 1, "cert": cert.packed(), "team": team.to_dict(),
            "certs": certs, "revocations": revocations,
        }
        master = self.bridge_master
        if master is not None:
            # the new member's own key, never the master (the stream is Noise-encrypted)
            reply["bridge_key"] = derive_member_key(master, peer)
            reply["bridge_epoch"] = self.bridge_epoch
        await stream.write(wire.frame_message(reply))
        await stream.close()
        logger.info("enrolled new member %s", peer)
        self._audit("enrolled", peer=peer, roles=[ROLE_MEMBER])
        self.new_certs.append(cert.packed())
        self.changed.set()

    # --- certificate renewal (/teammesh/renew/1.0.0) -------------------------------------
    async def handle_renew(self, stream: Stream) -> None:
        """An admin re-signs a member in good standing: same roles, a fresh lifetime."""
        team, roster = self.require_team()
        request = await read_message(stream, 4096, ENROLL_TIMEOUT_S)
        if request["t"] != "renew":
            raise RemoteProtocolError("expected a renew request")
        peer = stream.peer_id
        current = roster.certs.get(peer)
        if self.root is None:
            await stream.write(error_reply("not_admin", "this node cannot sign certificates"))
        elif current is None or not self.is_member(peer):
            await stream.write(error_reply("not_a_member", "only members are renewed"))
        else:
            cert = issue_certificate(self.root, team, peer, current.roles, now_s(),
                                     cert_ttl_s())
            self._apply([cert.packed()], [])
            self.new_certs.append(cert.packed())
            self.changed.set()
            await stream.write(wire.frame_message({"t": "renewed", "v": 1,
                                                   "cert": cert.packed()}))
            logger.info("renewed the certificate of %s until %s", peer, _utc(cert.expires))
            self._audit("renewed", peer=peer, until=cert.expires)
        await stream.close()

    async def renew_from_admin(self, host: MeshHost) -> bool:
        """Ask each admin in turn for a renewed certificate; True once we hold one."""
        team, roster = self.require_team()
        old = self.cert
        assert old is not None
        admins = [p for p, c in roster.certs.items()
                  if c.is_admin and p != self.identity.peer_id and self.is_member(p)]
        request = wire.frame_message({"t": "renew", "v": 1})
        for admin in admins:
            try:
                reply = await request_reply(host, admin, RENEW, request, ENROLL_TIMEOUT_S)
                if reply["t"] != "renewed":
                    logger.info("admin %s did not renew us: %s", admin, reply.get("message"))
                    continue
                cert = parse_certificate(wire.field_bytes(reply, "cert", max_len=MAX_CERT_BYTES),
                                         team, now_s())
            except _RENEW_ERRORS as exc:
                logger.debug("renewal by %s failed: %s", admin, exc)
                continue
            if cert.peer_id != self.identity.peer_id or cert.expires <= old.expires:
                continue
            self._take_own_certificate(cert)
            logger.warning("certificate renewed by %s until %s", admin, _utc(cert.expires))
            return True
        return False

    async def _renew_loop(self, host: MeshHost) -> None:
        """Renew this node's certificate once a third of its lifetime is left, retrying
        (with backoff) until an admin answers or it lapses."""
        delay = KEY_RETRY_MIN_S
        while True:
            cert = self.cert
            if cert is None or self.is_revoked(self.identity.peer_id):
                return
            now = now_s()
            if not renewal_due(cert, now):
                delay = KEY_RETRY_MIN_S
                await trio.sleep(min(3600, max(1, renewal_at(cert) - now)))
                continue
            if self.root is not None:
                self.renew_own_as_root()
                continue
            if await self.renew_from_admin(host):
                continue
            left = cert.expires - now
            if left <= 0 and delay == KEY_RETRY_MIN_S:
                logger.error("this node's certificate expired on %s and no admin renewed it;"
                             " ask an admin for a new invite and run `teammesh join INVITE`",
                             _utc(cert.expires))
            # while it is still valid, try often enough to succeed before it lapses
            wait = min(delay, left / 4) if left > 4 else delay
            await trio.sleep(max(1.0, wait) * random.uniform(0.8, 1.2))
            delay = min(RENEW_RETRY_MAX_S, delay * 2)

    async def handle_roster_sync(self, stream: Stream) -> None:
        request = await read_message(stream, wire.MAX_FRAME_BYTES, ENROLL_TIMEOUT_S)
        self._merge_wire(request)
        await stream.write(self._roster_message())
        await stream.close()

    def _roster_message(self) -> bytes:
        certs, revocations = self.roster.export() if self.roster else ([], [])
        m: dict[str, Any] = {"t": "roster", "v": 1, "certs": certs, "revocations": revocations}
        if self.epoch_notice is not None:
            m["epoch"] = self.epoch_notice.packed()
        return wire.frame_message(m)

    def _merge_wire(self, m: wire.Message) -> tuple[int, list[str]]:
        if m["t"] != "roster":
            raise RemoteProtocolError("expected a roster message")
        certs = [c for c in wire.field_list(m, "certs") if isinstance(c, bytes)]
        revs = [r for r in wire.field_list(m, "revocations") if isinstance(r, bytes)]
        result = self._apply(certs, revs)
        notice = m.get("epoch")
        if isinstance(notice, bytes):
            try:
                self.learn_epoch_notice(notice)
            except (RemoteProtocolError, MembershipError) as exc:
                logger.warning("ignoring a bridge epoch notice: %s", exc)
        return result

    async def sync_with(self, host: MeshHost, peer_id: str) -> None:
        """Exchange rosters with a member we just connected to."""
        try:
            self._merge_wire(await request_reply(host, peer_id, ROSTER_SYNC,
                                                 self._roster_message(), ENROLL_TIMEOUT_S))
        except PEER_ERRORS as exc:
            logger.debug("roster sync with %s failed: %s", peer_id, exc)

    def gossip_validator(self, origin: str, forwarder: str, data: bytes) -> bool:
        if not (self.is_member(forwarder) and self.is_member(origin)):
            return False
        try:
            m = wire.unpack(data, max_bytes=wire.MAX_GOSSIP_BYTES)
            return bool(m["t"] == "roster")
        except RemoteProtocolError:
            return False

    async def run(self, host: MeshHost, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve enroll and roster-sync; gossip and apply roster changes."""
        team, _ = self.require_team()
        host.set_handler(ENROLL, self.handle_enroll)
        host.set_handler(ROSTER_SYNC, self.handle_roster_sync)
        host.set_handler(BRIDGE_KEY, self.handle_bridge_key)
        host.set_handler(RENEW, self.handle_renew)
        topic = roster_topic(team.team_id)
        host.set_validator(topic, self.gossip_validator)
        async with host.subscribe(topic) as messages, trio.open_nursery() as nursery:
            nursery.start_soon(self._publish_loop, host, topic)
            nursery.start_soon(self._drop_loop, host)
            nursery.start_soon(self._bridge_key_loop, host)
            nursery.start_soon(self._worker_rotation_loop)
            nursery.start_soon(self._renew_loop, host)
            nursery.start_soon(self._notice_repeat_loop)
            task_status.started()
            async for _origin, data in messages:
                try:
                    self._merge_wire(wire.unpack(data, max_bytes=wire.MAX_GOSSIP_BYTES))
                except RemoteProtocolError as exc:
                    logger.warning("bad roster gossip: %s", exc)

    async def _drop_loop(self, host: MeshHost) -> None:
        """Cut off every peer revoked since the last pass, however the revocation came
        (gossip, roster sync, our own `team revoke`): its open task, Bitswap and sync
        streams are reset and its connection closed, on every member alike."""
        while True:
            await self._drop_wanted.wait()
            self._drop_wanted = trio.Event()
            peers, self._to_drop = self._to_drop, []
            for peer in peers:
                if peer == self.identity.peer_id:
                    continue
                n = host.inbound_streams(peer)
                await host.drop_peer(peer)
                logger.warning("cut off revoked member %s (%d open streams reset)", peer, n)
                self._audit("cut_off", peer=peer, streams=n)

    async def _publish_loop(self, host: MeshHost, topic: str) -> None:
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            certs, self.new_certs = self.new_certs, []
            revs = list(self.pending_revocations)
            self.pending_revocations.clear()
            m: dict[str, Any] = {"t": "roster", "v": 1, "certs": certs, "revocations": revs}
            if self.epoch_notice is not None:
                m["epoch"] = self.epoch_notice.packed()
            msg = wire.pack(m)
            try:
                await host.publish(topic, msg)
            except STREAM_ERRORS:
                logger.debug("roster publish failed", exc_info=True)



async def join(home: Home, journal: Journal, identity: Identity, invite_text: str,
               progress: Callable[[str], None] = lambda s: None) -> TeamInfo:
    """Enroll with the inviting admin over a temporary host using the invite's one-time key."""
    invite = Invite.decode(invite_text)
    membership = Membership(home, journal, identity)
    # a node whose certificate lapsed re-joins its own team with a fresh invite
    rejoin = (membership.team is not None and membership.cert is None
              and membership.lapsed is not None
              and membership.team.team_id == invite.team.team_id)
    if membership.team is not None and not rejoin:
        raise MembershipError(
            f"this node is already in team {membership.team.name!r}; use another --home")
    if invite.expires <= now_s():
        raise InviteError("this invite has expired; ask the admin for a new one")
    admin = invite.admin
    last_error = "no address in the invite"
    async with open_host(invite.key_seed, ["/ip4/127.0.0.1/tcp/0"],
                         peer_gate=lambda p: p == admin,
                         stream_gate=lambda p, proto: False, gossip=False) as host:
        for addr in invite.addrs:
            progress(f"dialing {addr}")
            try:
                with trio.fail_after(ENROLL_TIMEOUT_S):
                    await host.connect(addr)
                    stream = await host.open_stream(admin, ENROLL)
                    await stream.write(wire.frame(
                        enroll_request(identity, host.peer_id, invite.team.team_id)))
                    reply = await read_message(stream)
                    await stream.close()
            except PEER_ERRORS as exc:
                last_error = str(exc) or type(exc).__name__
                continue
            if reply["t"] == "error":
                raise InviteError(str(reply.get("message", "the admin refused the invite")))
            if reply["t"] != "enrolled":
                raise EnrollmentError("the admin sent an unexpected reply")
            membership.accept_enrollment(
                invite.team, wire.field_bytes(reply, "cert"),
                [c for c in wire.field_list(reply, "certs") if isinstance(c, bytes)],
                [r for r in wire.field_list(reply, "revocations") if isinstance(r, bytes)])
            journal.put("bootstrap", json.dumps(list(invite.addrs)).encode())
            key = reply.get("bridge_key")
            epoch = reply.get("bridge_epoch")
            if isinstance(key, bytes) and len(key) == 32:
                with journal.transaction():
                    journal.put("bridge_key", key)
                    if isinstance(epoch, int) and epoch >= 0:
                        journal.put("bridge_epoch", str(epoch).encode())
                    # else an admin from before per-member keys sent the master itself:
                    # the next start derives this node's own key from it and drops it
            return invite.team
    raise EnrollmentError(
        f"no admin reachable at {', '.join(invite.addrs)} ({last_error}); is the inviting"
        " node running (`teammesh up`)?")
