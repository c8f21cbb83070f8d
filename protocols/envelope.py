"""Signed envelopes: a body, the signer's peer id, and its signature under a domain.

Used for everything that must be attributable after it leaves the connection it arrived
on: capability ads (gossip is relayed, so the forwarder is not the author) and task results
(the submitter keeps them as evidence of who computed what).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire
from .errors import MalformedMessage
from .identity import Identity, verify_by_peer


@dataclass(frozen=True, slots=True)
class Opened:
    signer: str
    body: wire.Message
    raw_body: bytes


def seal(identity: Identity, domain: str, body: wire.Message) -> bytes:
    raw = wire.pack(body)
    return wire.pack(
        {"t": "signed", "v": 1, "d": domain, "body": raw, "signer": identity.peer_id,
         "sig": identity.sign(domain, raw)}
    )


def open_sealed(data: bytes, domain: str, *, max_bytes: int) -> Opened:
    """Decode, check the domain and the signature; raise a RemoteProtocolError otherwise."""
    outer = wire.unpack(data, max_bytes=max_bytes)
    if outer["t"] != "signed":
        raise MalformedMessage("expected a signed envelope")
    if wire.field_str(outer, "d", max_len=64) != domain:
        raise MalformedMessage(f"expected a {domain!r} envelope")
    raw = wire.field_bytes(outer, "body", max_len=max_bytes)
    signer = wire.field_str(outer, "signer", max_len=100)
    sig = wire.field_bytes(outer, "sig", max_len=64)
    verify_by_peer(signer, domain, raw, sig)
    return Opened(signer, wire.unpack(raw, max_bytes=max_bytes), raw)
