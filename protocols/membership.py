"""Team membership: the team root, member certificates, revocations, invites, the roster.

Theory of operation:
- A team is its root Ed25519 key. The team id is derived from the root public key, so a
  team id cannot be claimed by another key.
- A certificate says "peer P is a member of team T with roles R until E", signed by the
  root key, or by an admin whose own root-signed certificate travels with it (``chain``).
- A revocation says "peer P is no longer a member", signed the same way. Revocations win
  over certificates whatever their order of arrival, and are kept.
- An invite carries a one-time enrollment key. The admin lets that key's peer id through
  its handshake gate and nowhere else; the joiner connects with it, proves possession of
  its real key, and receives a certificate. A used invite stays known so a second use gets
  "already used" instead of a silent refusal.
- A bridge epoch notice says "the team's bridge master key is now at epoch N; ask admin A
  for your key", signed like a revocation. It carries no key: each member fetches its own
  derived key from an admin over a direct (Noise-encrypted) stream, which the admin answers
  only for current members, so a revoked member learns that a rotation happened and
  nothing more.
- Certificates are renewed before they lapse: ``renewal_due`` says when a holder should
  ask (a third of its lifetime before expiry), and an admin re-signs the same roles.
- Nothing here reads a clock: ``now`` (Unix seconds) is passed in.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .errors import BadSignature, InviteError, MalformedMessage, NotAMember, RemoteProtocolError
from .identity import Identity, peer_id_from_public, public_from_peer_id, verify, verify_by_peer

ROLE_ADMIN = "admin"
ROLE_MEMBER = "member"
KNOWN_ROLES = frozenset({ROLE_ADMIN, ROLE_MEMBER})
INVITE_PREFIX = "tminv1."
DOMAIN_CERT = "cert"
DOMAIN_REVOKE = "revoke"
DOMAIN_ENROLL = "enroll"
DOMAIN_EPOCH = "bridge-epoch"
MAX_CERT_BYTES = 4096
RENEW_FRACTION = 1 / 3  # renew once less than this share of the lifetime is left


def team_id_from_root(root_pub: bytes) -> str:
    digest = hashlib.sha256(b"teammesh-team:" + root_pub).digest()
    return "tm" + base64.b32encode(digest[:10]).decode().lower()


def _pack_signed(outer_type: str, body: bytes, sig: bytes, chain: bytes | None) -> bytes:
    """The envelope of a signed team statement (certificate, revocation, epoch notice);
    ``_open_team_signed`` and ``parse_certificate`` read it back."""
    m: dict[str, Any] = {"t": outer_type, "v": 1, "body": body, "sig": sig}
    if chain is not None:
        m["chain"] = chain
    return wire.pack(m)


@dataclass(frozen=True, slots=True)
class TeamInfo:
    team_id: str
    name: str
    root_pub: bytes

    @classmethod
    def create(cls, name: str, root_pub: bytes) -> TeamInfo:
        return cls(team_id_from_root(root_pub), name, root_pub)

    def check(self) -> None:
        if team_id_from_root(self.root_pub) != self.team_id:
            raise MalformedMessage("team id does not match the team root key")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.team_id, "name": self.name, "root": self.root_pub.hex()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeamInfo:
        info = cls(str(d["id"]), str(d["name"]), bytes.fromhex(str(d["root"])))
        info.check()
        return info


@dataclass(frozen=True, slots=True)
class Certificate:
    team_id: str
    peer_id: str
    roles: tuple[str, ...]
    issued: int
    expires: int
    issuer: str
    body: bytes
    sig: bytes
    chain: bytes | None = None  # the issuing admin's packed certificate, if not the root

    @property
    def is_admin(self) -> bool:
        return ROLE_ADMIN in self.roles

    def packed(self) -> bytes:
        return _pack_signed("signed_cert", self.body, self.sig, self.chain)


def _chain_of(chain: Certificate | None) -> bytes | None:
    return chain.packed() if chain is not None else None


def issue_certificate(
    issuer: Identity,
    team: TeamInfo,
    peer_id: str,
    roles: tuple[str, ...],
    now: int,
    ttl_s: int,
    issuer_cert: Certificate | None = None,
) -> Certificate:
    """Sign a certificate. ``issuer`` is the root key, or an admin with ``issuer_cert``."""
    public_from_peer_id(peer_id)
    body = wire.pack(
        {
            "t": "cert",
            "v": 1,
            "team": team.team_id,
            "peer": peer_id,
            "roles": list(roles),
            "issued": now,
            "expires": now + ttl_s,
            "issuer": issuer.peer_id,
        }
    )
    sig = issuer.sign(DOMAIN_CERT, body)
    return Certificate(
        team.team_id, peer_id, roles, now, now + ttl_s, issuer.peer_id, body, sig,
        _chain_of(issuer_cert),
    )


def _check_issuer(team: TeamInfo, issuer: str, chain: bytes | None, now: int) -> None:
    root_peer = peer_id_from_public(team.root_pub)
    if issuer == root_peer:
        return
    if chain is None:
        raise BadSignature(f"issuer {issuer} is not the team root and shows no admin certificate")
    admin = parse_certificate(chain, team, now, allow_chain=False)
    if admin.peer_id != issuer or not admin.is_admin:
        raise BadSignature(f"issuer {issuer} is not an admin of team {team.team_id}")


def parse_certificate(
    data: bytes, team: TeamInfo, now: int, *, allow_chain: bool = True
) -> Certificate:
    """Decode and verify a packed certificate for ``team``; raise if invalid or expired."""
    if len(data) > MAX_CERT_BYTES:
        raise MalformedMessage("certificate too large")
    outer = wire.unpack(data, max_bytes=MAX_CERT_BYTES)
    if outer["t"] != "signed_cert":
        raise MalformedMessage("not a certificate")
    body = wire.field_bytes(outer, "body", max_len=MAX_CERT_BYTES)
    sig = wire.field_bytes(outer, "sig", max_len=64)
    chain = outer.get("chain")
    if chain is not None and (not allow_chain or not isinstance(chain, bytes)):
        raise MalformedMessage("certificate chain must be one admin certificate")
    m = wire.unpack(body, max_bytes=MAX_CERT_BYTES)
    if m["t"] != "cert":
        raise MalformedMessage("certificate body has the wrong type")
    team_id = wire.field_str(m, "team")
    if team_id != team.team_id:
        raise NotAMember(f"certificate is for team {team_id}, not {team.team_id}")
    peer = wire.field_str(m, "peer")
    roles = tuple(wire.field_str_list(m, "roles", max_len=16))
    issued = wire.field_int(m, "issued")
    expires = wire.field_int(m, "expires")
    issuer = wire.field_str(m, "issuer")
    public_from_peer_id(peer)
    verify_by_peer(issuer, DOMAIN_CERT, body, sig)
    _check_issuer(team, issuer, chain, now)
    if expires <= now:
        raise NotAMember(f"certificate of {peer} expired")
    return Certificate(team_id, peer, roles, issued, expires, issuer, body, sig, chain)


def renewal_due(cert: Certificate, now: int, fraction: float = RENEW_FRACTION) -> bool:
    """True once no more than ``fraction`` of ``cert``'s lifetime is left (or it lapsed)."""
    return now >= renewal_at(cert, fraction)


def renewal_at(cert: Certificate, fraction: float = RENEW_FRACTION) -> int:
    """The Unix second from which ``renewal_due`` holds."""
    lifetime = max(1, cert.expires - cert.issued)
    return cert.expires - int(lifetime * fraction)


def open_own_certificate(data: bytes, team: TeamInfo, now: int) -> Certificate:
    """A certificate checked in every way but expiry: a node reads its own lapsed one to
    tell the user what happened and how to recover."""
    cert = parse_certificate(data, team, 0)
    if cert.expires > now:
        return parse_certificate(data, team, now)  # and its admin chain, with the clock
    return cert


@dataclass(frozen=True, slots=True)
class Revocation:
    team_id: str
    peer_id: str
    at: int
    issuer: str
    body: bytes
    sig: bytes
    chain: bytes | None = None

    def packed(self) -> bytes:
        return _pack_signed("signed_revoke", self.body, self.sig, self.chain)


def issue_revocation(
    issuer: Identity, team: TeamInfo, peer_id: str, now: int,
    issuer_cert: Certificate | None = None,
) -> Revocation:
    public_from_peer_id(peer_id)
    body = wire.pack(
        {"t": "revoke", "v": 1, "team": team.team_id, "peer": peer_id, "at": now,
         "issuer": issuer.peer_id}
    )
    sig = issuer.sign(DOMAIN_REVOKE, body)
    return Revocation(team.team_id, peer_id, now, issuer.peer_id, body, sig,
                      _chain_of(issuer_cert))


def _open_team_signed(data: bytes, outer_type: str, body_type: str, team: TeamInfo,
                      what: str) -> tuple[wire.Message, bytes, bytes, bytes | None]:
    """The envelope every team-signed statement shares (revocations, epoch notices):
    (body fields, body bytes, signature, issuer's chain); the caller verifies."""
    outer = wire.unpack(data, max_bytes=MAX_CERT_BYTES)
    if outer["t"] != outer_type:
        raise MalformedMessage(f"not a {what}")
    body = wire.field_bytes(outer, "body", max_len=MAX_CERT_BYTES)
    sig = wire.field_bytes(outer, "sig", max_len=64)
    chain = outer.get("chain")
    if chain is not None and not isinstance(chain, bytes):
        raise MalformedMessage(f"{what} chain must be bytes")
    m = wire.unpack(body, max_bytes=MAX_CERT_BYTES)
    if m["t"] != body_type:
        raise MalformedMessage(f"{what} body has the wrong type")
    if wire.field_str(m, "team") != team.team_id:
        raise NotAMember(f"{what} is for another team")
    return m, body, sig, chain


def parse_revocation(data: bytes, team: TeamInfo, now: int) -> Revocation:
    m, body, sig, chain = _open_team_signed(data, "signed_revoke", "revoke", team,
                                            "revocation")
    peer = wire.field_str(m, "peer")
    issuer = wire.field_str(m, "issuer")
    at = wire.field_int(m, "at")
    verify_by_peer(issuer, DOMAIN_REVOKE, body, sig)
    _check_issuer(team, issuer, chain, now)
    return Revocation(team.team_id, peer, at, issuer, body, sig, chain)


@dataclass(frozen=True, slots=True)
class EpochNotice:
    """The team's bridge master key moved to ``epoch``; ``admin`` hands out members' keys."""

    team_id: str
    epoch: int
    admin: str
    at: int
    issuer: str
    body: bytes
    sig: bytes
    chain: bytes | None = None

    def packed(self) -> bytes:
        return _pack_signed("signed_epoch", self.body, self.sig, self.chain)


def issue_epoch_notice(
    issuer: Identity, team: TeamInfo, epoch: int, admin: str, now: int,
    issuer_cert: Certificate | None = None,
) -> EpochNotice:
    """Sign "the bridge key is at ``epoch``; ask ``admin``" (root key, or an admin's)."""
    public_from_peer_id(admin)
    body = wire.pack({"t": "epoch", "v": 1, "team": team.team_id, "epoch": epoch,
                      "admin": admin, "at": now, "issuer": issuer.peer_id})
    sig = issuer.sign(DOMAIN_EPOCH, body)
    return EpochNotice(team.team_id, epoch, admin, now, issuer.peer_id, body, sig,
                       _chain_of(issuer_cert))


def parse_epoch_notice(data: bytes, team: TeamInfo, now: int) -> EpochNotice:
    """Decode and verify a bridge epoch notice for ``team``."""
    m, body, sig, chain = _open_team_signed(data, "signed_epoch", "epoch", team,
                                            "bridge epoch notice")
    epoch = wire.field_int(m, "epoch")
    if epoch < 0:
        raise MalformedMessage("bridge epoch must not be negative")
    admin = wire.field_str(m, "admin", max_len=100)
    public_from_peer_id(admin)
    issuer = wire.field_str(m, "issuer")
    at = wire.field_int(m, "at")
    verify_by_peer(issuer, DOMAIN_EPOCH, body, sig)
    _check_issuer(team, issuer, chain, now)
    return EpochNotice(team.team_id, epoch, admin, at, issuer, body, sig, chain)


@dataclass(slots=True)
class Roster:
    """Who is a member right now, as far as this node knows."""

    team: TeamInfo
    certs: dict[str, Certificate] = field(default_factory=dict)
    revocations: dict[str, Revocation] = field(default_factory=dict)

    def add_certificate(self, data: bytes, now: int) -> Certificate | None:
        """Verify and store; return the certificate if it taught us something new."""
        cert = parse_certificate(data, self.team, now)
        if cert.peer_id in self.revocations:
            return None
        old = self.certs.get(cert.peer_id)
        if old is not None and old.expires >= cert.expires and set(old.roles) >= set(cert.roles):
            return None
        self.certs[cert.peer_id] = cert
        return cert

    def add_revocation(self, data: bytes, now: int) -> Revocation | None:
        rev = parse_revocation(data, self.team, now)
        if rev.peer_id in self.revocations:
            return None
        self.revocations[rev.peer_id] = rev
        self.certs.pop(rev.peer_id, None)
        return rev

    def merge(self, certs: list[bytes], revocations: list[bytes], now: int) -> tuple[int, list[str]]:
        """Apply a batch; returns (count of new certificates, peers newly revoked).

        Invalid entries are skipped, not fatal: one bad entry from a peer must not stop the
        good ones (each was signed independently).
        """
        revoked: list[str] = []
        for r in revocations:
            try:
                rev = self.add_revocation(r, now)
            except (RemoteProtocolError, NotAMember):
                # another team's revocation, or one whose admin chain lapsed: skipping it
                # must not hold back the valid ones after it
                continue
            if rev is not None:
                revoked.append(rev.peer_id)
        added = 0
        for c in certs:
            try:
                if self.add_certificate(c, now) is not None:
                    added += 1
            except (RemoteProtocolError, NotAMember):
                continue
        return added, revoked

    def is_member(self, peer_id: str, now: int) -> bool:
        cert = self.certs.get(peer_id)
        return cert is not None and cert.expires > now and peer_id not in self.revocations

    def members(self, now: int) -> list[str]:
        return [p for p in self.certs if self.is_member(p, now)]

    def export(self) -> tuple[list[bytes], list[bytes]]:
        return [c.packed() for c in self.certs.values()], [
            r.packed() for r in self.revocations.values()
        ]


@dataclass(frozen=True, slots=True)
class Invite:
    team: TeamInfo
    admin: str
    addrs: tuple[str, ...]
    key_seed: bytes  # one-time enrollment key
    expires: int

    @property
    def enroll_peer_id(self) -> str:
        return Identity(self.key_seed).peer_id

    def encode(self) -> str:
        body = wire.pack(
            {
                "t": "invite", "v": 1, "team": self.team.team_id, "name": self.team.name,
                "root": self.team.root_pub, "admin": self.admin, "addrs": list(self.addrs),
                "key": self.key_seed, "expires": self.expires,
            }
        )
        return INVITE_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Invite:
        text = text.strip()
        if not text.startswith(INVITE_PREFIX):
            raise InviteError(f"not a teammesh invite (it should start with {INVITE_PREFIX!r})")
        raw = text[len(INVITE_PREFIX):]
        try:
            body = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
            m = wire.unpack(body, max_bytes=16 * 1024)
            team = TeamInfo(wire.field_str(m, "team"), wire.field_str(m, "name"),
                            wire.field_bytes(m, "root", max_len=32))
            team.check()
            inv = cls(team, wire.field_str(m, "admin"),
                      tuple(wire.field_str_list(m, "addrs", max_len=64)),
                      wire.field_bytes(m, "key", max_len=32), wire.field_int(m, "expires"))
            Identity(inv.key_seed)
        except (ValueError, MalformedMessage) as exc:
            raise InviteError(f"invite is damaged ({exc}); copy it again in one piece") from exc
        return inv


def enroll_request(real: Identity, enroll_peer_id: str, team_id: str) -> bytes:
    """What the joiner sends on the enroll stream: proves it holds its real key."""
    proof_body = (enroll_peer_id + "\0" + team_id).encode()
    return wire.pack(
        {"t": "enroll", "v": 1, "peer": real.peer_id,
         "proof": real.sign(DOMAIN_ENROLL, proof_body)}
    )


def check_enroll_request(data: bytes, enroll_peer_id: str, team_id: str) -> str:
    """Return the joiner's real peer id if its proof holds."""
    m = wire.unpack(data, max_bytes=4096)
    if m["t"] != "enroll":
        raise MalformedMessage("expected an enroll request")
    peer = wire.field_str(m, "peer", max_len=100)
    proof = wire.field_bytes(m, "proof", max_len=64)
    proof_body = (enroll_peer_id + "\0" + team_id).encode()
    verify(public_from_peer_id(peer), DOMAIN_ENROLL, proof_body, proof)
    return peer
