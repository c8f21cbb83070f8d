"""Certificates renew themselves (issue 15.5), and a lapsed one says how to recover.

The pure rules take ``now``; the daemon tests shorten the lifetime an admin issues with
TEAMMESH_CERT_TTL_S instead of moving the clock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from meshtools import Daemon, init_home, run_cli, wait_for_full_mesh, wait_until
from teammesh.protocols.errors import NotAMember
from teammesh.protocols.identity import Identity
from teammesh.protocols.membership import (
    ROLE_ADMIN,
    ROLE_MEMBER,
    TeamInfo,
    issue_certificate,
    open_own_certificate,
    parse_certificate,
    renewal_at,
    renewal_due,
)

NOW = 1_700_000_000
YEAR = 365 * 24 * 3600
SHORT_TTL_S = 30  # renewal due 20 s after issue, 10 s of margin for it


def ident(n: int) -> Identity:
    return Identity(bytes([n]) * 32)


def test_renewal_is_due_in_the_last_third_of_the_lifetime() -> None:
    root = ident(1)
    team = TeamInfo.create("t", root.public)
    cert = issue_certificate(root, team, ident(2).peer_id, (ROLE_MEMBER,), NOW, YEAR)
    due = renewal_at(cert)
    assert due == NOW + YEAR - YEAR // 3
    assert not renewal_due(cert, NOW)
    assert not renewal_due(cert, due - 1)
    assert renewal_due(cert, due)
    assert renewal_due(cert, NOW + YEAR + 1)  # and of course once it lapsed


def test_a_lapsed_certificate_can_still_be_read_by_its_holder() -> None:
    root = ident(1)
    team = TeamInfo.create("t", root.public)
    cert = issue_certificate(root, team, ident(2).peer_id, (ROLE_ADMIN, ROLE_MEMBER), NOW, 60)
    later = NOW + 3600
    with pytest.raises(NotAMember):
        parse_certificate(cert.packed(), team, later)  # no peer accepts it any more
    own = open_own_certificate(cert.packed(), team, later)
    assert own.expires == NOW + 60
    assert own.roles == (ROLE_ADMIN, ROLE_MEMBER)
    # still only for the right team and signer
    other = TeamInfo.create("o", ident(3).public)
    with pytest.raises(NotAMember):
        open_own_certificate(cert.packed(), other, later)


def cert_expires(d: Daemon) -> int:
    return int(d.cli("status")["team"]["cert_expires"])


@pytest.mark.slow
def test_members_and_the_root_renew_before_expiry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAMMESH_CERT_TTL_S", str(SHORT_TTL_S))
    admin_home = init_home(tmp_path / "admin")
    run_cli(admin_home, "team", "create", "t")
    nodes = [Daemon(admin_home).start()]
    try:
        member = init_home(tmp_path / "member")
        run_cli(member, "join", run_cli(admin_home, "team", "invite").stdout.strip())
        nodes.append(Daemon(member).start())
        wait_for_full_mesh(nodes, timeout=15)
        first = {d.peer_id: cert_expires(d) for d in nodes}
        # Each node renews on its own before its certificate lapses (the admin re-signs
        # the member's, the root its own) ...
        for d in nodes:
            wait_until(lambda d=d: cert_expires(d) > first[d.peer_id], SHORT_TTL_S + 15,
                       interval=0.5, what=f"{d.home.name} to renew its certificate")
        # ... so past the first certificates' expiry the team still meshes
        wait_until(lambda: time.time() > max(first.values()) + 2, SHORT_TTL_S + 5,
                   interval=0.5, what="the first certificates to expire")
        wait_for_full_mesh(nodes, timeout=10)
        members = {m["peer_id"]: m for m in nodes[0].cli("team", "members")["members"]}
        assert members[nodes[1].peer_id]["expires"] > time.time()
        assert "certificate renewed by" in nodes[1].log.read_text()
        for d in nodes:
            assert "Traceback" not in d.log.read_text()
    finally:
        for d in nodes:
            d.stop()


@pytest.mark.slow
def test_a_lapsed_member_is_told_how_to_recover_and_the_root_never_bricks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = 10
    monkeypatch.setenv("TEAMMESH_CERT_TTL_S", str(short))
    admin_home = init_home(tmp_path / "admin")
    run_cli(admin_home, "team", "create", "t")
    admin = Daemon(admin_home).start()
    member = init_home(tmp_path / "member")
    try:
        run_cli(member, "join", run_cli(admin_home, "team", "invite").stdout.strip())
    finally:
        admin.stop()
    # both stay off past their certificates' lifetime (a laptop in a drawer for a year)
    joined = time.time()
    wait_until(lambda: time.time() > joined + short + 1, short + 5, interval=0.5,
               what="the certificates to lapse")
    monkeypatch.delenv("TEAMMESH_CERT_TTL_S")

    proc = run_cli(member, "up", check=False, timeout=30)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line
    assert "certificate" in line
    assert "expired" in line
    assert "teammesh join INVITE" in line
    assert "Traceback" not in proc.stderr

    # the team's root renews its own certificate and starts
    admin = Daemon(admin_home).start()
    try:
        assert cert_expires(admin) > time.time() + 300 * 24 * 3600
        # the lapsed member re-joins with a fresh invite, as the message said
        run_cli(member, "join", run_cli(admin_home, "team", "invite").stdout.strip())
        again = Daemon(member).start()
        try:
            wait_for_full_mesh([admin, again], timeout=15)
            assert json.loads(run_cli(member, "status", "--json").stdout)["team"]["name"] == "t"
        finally:
            again.stop()
    finally:
        admin.stop()
