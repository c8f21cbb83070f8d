"""Per-member bridge keys, derived from the team's bridge master key.

The Worker and the team's admins hold the master key ``M``; a member holds only its own
key ``K_P = HMAC-SHA256(M, "teammesh-bridge-member-v1\\0" || peer_id)``. The Worker derives
``K_P`` from the peer id a request names (the peer id is inside the signed string), so a
request proves which member sent it, one member cannot act as another, and a revoked
member's key dies with the next rotation of ``M`` (docs/BRIDGE.md, docs/SECURITY.md).
"""

from __future__ import annotations

import hashlib
import hmac

MEMBER_KEY_LABEL = b"teammesh-bridge-member-v1\0"


def derive_member_key(master: bytes, peer_id: str) -> bytes:
    """The bridge key of member ``peer_id`` under master key ``master`` (32 bytes)."""
    return hmac.new(master, MEMBER_KEY_LABEL + peer_id.encode(), hashlib.sha256).digest()
