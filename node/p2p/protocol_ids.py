"""Every libp2p protocol id and gossip topic teammesh uses (specified in docs/PROTOCOL.md)."""

from __future__ import annotations

ENROLL = "/teammesh/enroll/1.0.0"
ROSTER_SYNC = "/teammesh/roster/1.0.0"
ADS_SYNC = "/teammesh/ads/1.0.0"
TASKS = "/teammesh/tasks/1.0.0"
OFFER = "/teammesh/offer/1.0.0"
BRIDGE_KEY = "/teammesh/bridgekey/1.0.0"
RENEW = "/teammesh/renew/1.0.0"
# libp2p's ping (32 bytes echoed), served by py-libp2p to members only: the keepalive
PING = "/ipfs/ping/1.0.0"
PING_BYTES = 32


def caps_topic(team_id: str) -> str:
    return f"/teammesh/{team_id}/caps/1"


def roster_topic(team_id: str) -> str:
    return f"/teammesh/{team_id}/roster/1"


def tasks_topic(team_id: str) -> str:
    return f"/teammesh/{team_id}/tasks/1"
