"""Admission replies on the wire (issue 16): an executor answers each assignment with
"started" or "queued at position N", and a submitter never leaves a task in a busy
member's queue, behind that member's own work, while another member has a free slot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshtools import mesh, wait_for_full_mesh, wait_until

from teammesh.client import Client


def _free(c: Client, peer_id: str) -> int | None:
    for p in c.peers():
        if p["peer_id"] == peer_id:
            return int(p["free_slots"])
    return None


def test_queued_task_shows_its_position(tmp_path: Path) -> None:
    """b's one slot runs b's own 30 s task; a task a sends there (nothing else runs the
    kind) waits in b's queue, and a says where: at position 1 on b."""
    with mesh(tmp_path, 2, slots=[0, 1]) as (a, b):
        wait_for_full_mesh([a, b], timeout=30)
        with Client.from_home(a.home) as ca, Client.from_home(b.home) as cb:
            hold = cb.submit("sleep", params={"seconds": 30}, where="local", no_cache=True)
            wait_until(lambda: cb.task(hold["id"])["state"] == "running", 20,
                       what="b's own task to run")
            wait_until(lambda: _free(ca, b.peer_id) == 0, 20, what="a to see b busy")
            task = ca.submit("sleep", params={"seconds": 0.1}, no_cache=True)

            def queued() -> bool:
                return ca.task(task["id"])["waiting_reason"] == \
                    f"queued on {b.peer_id} at position 1"

            wait_until(queued, 20, what="a to learn the task's place in b's queue")
            cb.request("POST", f"/v1/tasks/{hold['id']}/cancel")
            done = ca.task(task["id"], wait=60)
            assert done["state"] == "done"
            assert done["executed_by"] == b.peer_id


def test_task_moves_off_a_busy_members_queue(tmp_path: Path) -> None:
    """b starts its own 30 s task at the moment a places two short ones: a's view of b
    is stale, so one may be sent to b and queued behind b's task. b's admission reply
    says so within a round trip and a moves the task to c, which has room once its
    first task ends: both of a's tasks finish on c while b's task still runs.

    (If b's new ad reaches a first, a never sends there and the test checks the plain
    path; it cannot pass by leaving a task behind b's 30 s.)"""
    with mesh(tmp_path, 3, slots=[0, 1, 1]) as (a, b, c):
        wait_for_full_mesh([a, b, c], timeout=30)
        with Client.from_home(a.home) as ca, Client.from_home(b.home) as cb:
            wait_until(lambda: _free(ca, b.peer_id) == 1 and _free(ca, c.peer_id) == 1, 20,
                       what="a to see b and c free")
            hold = cb.submit("sleep", params={"seconds": 30}, where="local", no_cache=True)
            mine: list[dict[str, Any]] = ca.submit_batch(
                [{"kind": "sleep", "params": {"seconds": 1}, "no_cache": True}
                 for _ in range(2)])
            finished = [ca.task(t["id"], wait=60) for t in mine]
            assert [t["state"] for t in finished] == ["done", "done"]
            assert {t["executed_by"] for t in finished} == {c.peer_id}
            assert cb.task(hold["id"])["state"] == "running"  # never waited behind it
            moved = [at for t in finished for at in t["attempts"] if at["peer"] == b.peer_id]
            assert all((at["error"] or "").startswith("moved: ") for at in moved)
            cb.request("POST", f"/v1/tasks/{hold['id']}/cancel")
