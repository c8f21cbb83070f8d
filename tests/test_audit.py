"""The audit log (hash-chained, who ran what for whom) and structured JSON logs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from meshtools import mesh, run_cli, wait_until
from teammesh.node.core.audit import AuditLog, verify

from teammesh.client import Client


def test_the_chain_continues_across_restarts_and_shows_tampering(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("enrolled", peer="A")
    log.append("ran", task="t1", submitter="A", ok=True)
    log.flush()
    again = AuditLog(path)  # a restart: the chain goes on from the last line
    again.append("revoked", peer="A")
    again.flush()
    assert verify(path) == {"ok": True, "lines": 3, "first_bad": None, "reason": ""}
    assert path.stat().st_mode & 0o077 == 0
    lines = path.read_text().splitlines()
    altered = lines[1].replace('"ok":true', '"ok":false')
    path.write_text("\n".join([lines[0], altered, lines[2]]) + "\n")
    bad = verify(path)
    assert not bad["ok"]
    assert bad["first_bad"] == 2
    assert "altered" in bad["reason"]
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")  # a line removed
    assert verify(path)["first_bad"] == 2


def test_a_team_audits_membership_and_who_ran_what_for_whom(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAMMESH_LOG_FORMAT", "json")
    with mesh(tmp_path, 2, slots=[0, 1]) as (a, b):
        wait_until(lambda: len(a.peers()) == 1, 20, what="the mesh")
        b_id = b.peer_id
        with Client.from_home(a.home) as c:
            t = c.submit("base64.encode", b"audited", wait=True, no_cache=True)
        assert t["state"] == "done"

        def records(home: Path) -> list[dict]:
            p = home / "audit.log"
            return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

        ran = wait_until(lambda: [r for r in records(b.home) if r["event"] == "ran"], 10,
                         what="the executor's audit record")
        assert ran[0]["task"] == t["id"]
        assert ran[0]["submitter"] == a.peer_id
        assert ran[0]["ok"] is True
        res = wait_until(lambda: [r for r in records(a.home) if r["event"] == "result"], 10,
                         what="the submitter's audit record")
        assert res[0]["by"] == b.peer_id
        assert any(r["event"] == "enrolled" and r["peer"] == b.peer_id
                   for r in records(a.home))
        out = json.loads(run_cli(a.home, "audit", "--verify", "--json").stdout)
        assert out["ok"]
        # the daemons log JSON lines with the ids pulled out as fields
        time.sleep(0.2)
        logged = [json.loads(x) for x in b.log.read_text().splitlines()
                  if x.startswith("{")]
        assert logged
        assert all({"ts", "level", "logger", "msg"} <= set(x) for x in logged)
    path = a.home / "audit.log"
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace(b_id, "12D3KooWsomeoneelse")
    path.write_text("\n".join(lines) + "\n")
    broken = run_cli(a.home, "audit", "--verify", check=False)
    assert broken.returncode == 1
    assert "BROKEN" in broken.stdout
