"""Capacity across submitters: a busy member's queue is not a place to wait in.

Issue 16's saturation case, run as a new user would: two members with one slot each and
the team's bridge; each keeps its own slot busy with a long sleep; one then submits a task
that no member can start now. It must go to the bridge with the right answer, not wait in
the other member's queue behind a 60 s sleep.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from meshtools import Daemon, wait_until
from teammesh.node.bridge.dev import free_port
from test_escalation import _join, _team, bridge_dev, pytestmark  # noqa: F401

from teammesh.client import Client


def test_a_busy_member_is_skipped_for_the_bridge(tmp_path: Path) -> None:
    homes = _team(tmp_path, 3)
    port = free_port()
    with bridge_dev(homes[0], port, tmp_path / "state") as url:
        a = Daemon(homes[0], ["--slots", "1", "--bridge", url]).start()
        others: list[Daemon] = []
        try:
            for h in homes[1:]:
                _join(a, h)
                others.append(Daemon(h, ["--slots", "1", "--bridge", url, "--bootstrap",
                                         a.addr]).start())
            b, c = others
            for d in (a, b, c):
                wait_until(lambda d=d: len(d.peers()) == 2, 30, what="the mesh")
            # every member's only slot runs its own long task
            for d in (a, b, c):
                with Client.from_home(d.home) as cl:
                    cl.submit("sleep", params={"seconds": 60}, where="local", no_cache=True)
            for d in (a, b, c):
                wait_until(lambda d=d: all(p["free_slots"] == 0 for p in d.peers()), 30,
                           what="every member to advertise its slot busy")
            data = os.urandom(200 * 1024)  # above the inline-hash size: it needs a slot
            # two submitters at once, three members: nobody may queue behind a sleep
            with Client.from_home(a.home) as ca, Client.from_home(b.home) as cb:
                ta = ca.submit("hash.sha256", data, no_cache=True)
                tb = cb.submit("hash.sha256", data[::-1], no_cache=True)
                ra = ca.task(ta["id"], wait=20)
                rb = cb.task(tb["id"], wait=20)
            for r, blob in ((ra, data), (rb, data[::-1])):
                assert r["state"] == "done", (r["error"], r["attempts"])
                assert r["executed_by"] == "bridge", r["attempts"]
                assert r["output"] == hashlib.sha256(blob).hexdigest()
                assert not any(at["peer"] not in ("bridge",) for at in r["attempts"]), \
                    r["attempts"]
        finally:
            for d in (a, *others):
                d.stop()


def test_a_cancel_right_after_submit_frees_the_slot_and_idle_slots_wake(tmp_path: Path) -> None:
    from meshtools import mesh

    with mesh(tmp_path, 1, slots=[3]) as (node,):
        with Client.from_home(node.home) as c:
            # three long tasks on three slots: every slot must pick one up (a lost
            # wake-up once left two idle with two queued)
            long = [c.submit("sleep", params={"seconds": 60 + i}, no_cache=True)["id"]
                    for i in range(3)]
            wait_until(lambda: node.cli("status")["free_slots"] == 0, 30,
                       what="all three slots busy")
            for tid in long:
                c.cancel(tid)
            wait_until(lambda: node.cli("status")["free_slots"] == 3, 30,
                       what="the cancelled tasks to free their slots")
            # a cancel that lands before the worker takes the task must stop it too
            for _ in range(5):
                tid = c.submit("sleep", params={"seconds": 60}, no_cache=True)["id"]
                c.cancel(tid)
            quick = c.submit("base64.encode", b"next", wait=True, no_cache=True)
            assert quick["state"] == "done"
            wait_until(lambda: node.cli("status")["free_slots"] == 3, 30,
                       what="no cancelled task holding a slot")


def test_a_task_queued_behind_a_members_own_work_leaves_for_the_bridge(tmp_path: Path) -> None:
    """Rule 6 with the bridge (protocols/scheduler_rules.leave_queue_for_bridge): b starts
    its own 30 s task at the moment a (no slots of its own) places short ones, so a's
    view of b may be stale and one may be queued on b behind that task. Its wait there is
    unknown (a never ran a task on b), so once it has waited an offer window a takes it
    back and the bridge runs it; every task is done with the right digest well before
    b's task ends. (If b's new ad reaches a first, nothing is sent to b and the tasks
    escalate directly: the test cannot pass by leaving one behind b's 30 s.)"""
    homes = _team(tmp_path, 2)
    port = free_port()
    with bridge_dev(homes[0], port, tmp_path / "state") as url:
        a = Daemon(homes[0], ["--slots", "0", "--bridge", url]).start()
        b: Daemon | None = None
        try:
            _join(a, homes[1])
            b = Daemon(homes[1], ["--slots", "1", "--bootstrap", a.addr]).start()
            wait_until(lambda: any(p["free_slots"] == 1 for p in a.peers()), 30,
                       what="a to see b's free slot")
            blobs = [os.urandom(200 * 1024) for _ in range(3)]
            with Client.from_home(a.home) as ca, Client.from_home(b.home) as cb:
                hold = cb.submit("sleep", params={"seconds": 30}, where="local", no_cache=True)
                mine = ca.submit_batch([{"kind": "hash.sha256", "input_b64": _b64(blob),
                                         "no_cache": True} for blob in blobs])
                finished = [ca.task(t["id"], wait=20) for t in mine]
                for r, blob in zip(finished, blobs, strict=True):
                    assert r["state"] == "done", (r["error"], r["attempts"])
                    assert r["output"] == hashlib.sha256(blob).hexdigest()
                    on_b = [at for at in r["attempts"] if at["peer"] == b.peer_id]
                    if r["executed_by"] != b.peer_id:
                        assert r["executed_by"] == "bridge", r["attempts"]
                        assert all((at["error"] or "").startswith("moved: ") for at in on_b)
                assert cb.task(hold["id"])["state"] == "running"  # none waited behind it
                cb.request("POST", f"/v1/tasks/{hold['id']}/cancel")
        finally:
            for d in (a, b):
                if d is not None:
                    d.stop()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
