"""Scheduling behaviours a user relies on, checked on real daemons (issue 20, item 5).

* priority: on a node with one slot, queued tasks start highest priority first;
* per-kind concurrency limits (``[scheduler] kind_limits``): no more of a kind run at once
  than its limit, the rest wait and say why, other kinds are not held back;
* deadlines: a task whose ``timeout_s`` runs out while it waits in the queue fails with
  the deadline named and never starts;
* result-cache expiry (``[scheduler] cache_ttl_s``): a repeat is served from the cache
  within the TTL and run again after it.

The scheduler's own simulation covers placement across many members
(tests/test_scheduler_sim.py); these check the daemon that implements it
(node/tasks/service.py: the dispatch loop's heap, ``kind_limits`` and deadline checks).
Replica disagreement needs a lying member: tests/test_replicas.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from meshtools import mesh, wait_until

from teammesh.client import Client

BLOCKER_S = 600  # a sleep that holds a slot until the test cancels it


def _write_config(home: Path, section: str, lines: str) -> None:
    """Add ``lines`` to ``[section]`` of the home's config.toml (the node is stopped)."""
    cfg = home / "config.toml"
    text = cfg.read_text()
    if f"[{section}]" in text:
        text = text.replace(f"[{section}]", f"[{section}]\n{lines}", 1)
    else:
        text += f"\n[{section}]\n{lines}\n"
    cfg.write_text(text)


def _hold_the_slot(c: Client) -> dict[str, Any]:
    blocker = c.submit("sleep", params={"seconds": BLOCKER_S}, no_cache=True)
    wait_until(lambda: c.task(blocker["id"])["state"] == "running", 30,
               what="the blocker to take the only slot")
    return blocker


def test_queued_tasks_start_in_priority_order(tmp_path: Path) -> None:
    priorities = [0, 5, -2, 9, 3, 1]
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        with Client.from_home(node.home, timeout=120) as c:
            blocker = _hold_the_slot(c)
            queued = [c.submit("sleep", params={"seconds": 0.2}, priority=p, no_cache=True,
                               tag=p) for p in priorities]
            # all of them wait behind the blocker (a positive sign, not a pause)
            wait_until(lambda: all(c.task(t["id"])["waiting_reason"] for t in queued), 30,
                       what="every task to say why it waits")
            assert all(c.task(t["id"])["state"] == "queued" for t in queued)
            c.cancel(blocker["id"])
            done = [c.task(t["id"], wait=120) for t in queued]
    assert [t["state"] for t in done] == ["done"] * len(priorities), [t["error"] for t in done]
    # (finished breaks a tie in started: with one slot they end 0.2 s apart, in run order)
    by_start = sorted(done, key=lambda t: (t["timings"]["started"], t["timings"]["finished"]))
    assert [t["priority"] for t in by_start] == sorted(priorities, reverse=True)
    assert all(t["executed_by"] == "local" for t in done)


def test_a_kind_limit_caps_how_many_of_that_kind_run(tmp_path: Path) -> None:
    with mesh(tmp_path, 1, slots=[3]) as (node,):
        node.stop()
        _write_config(node.home, "scheduler", 'kind_limits = { "sleep" = 1 }')
        node.start()
        with Client.from_home(node.home, timeout=120) as c:
            sleeps = [c.submit("sleep", params={"seconds": BLOCKER_S}, no_cache=True, tag=i)
                      for i in range(3)]

            def held() -> list[dict[str, Any]] | None:
                ts = [c.task(t["id"]) for t in sleeps]
                waiting = [t for t in ts if "kind limit" in (t["waiting_reason"] or "")]
                return ts if len(waiting) == 2 else None

            ts = wait_until(held, 30, what="two sleeps held back by the kind limit")
            assert sorted(t["state"] for t in ts) == ["queued", "queued", "running"]
            assert all(t["waiting_reason"] == "kind limit: 1 sleep tasks already running"
                       for t in ts if t["state"] == "queued")
            # the node has two free slots: other kinds are not held back by the limit
            other = c.submit("np.stats", params={"values": [1, 2, 3]}, wait=60, no_cache=True)
            assert other["state"] == "done"
            assert other["output"]["mean"] == 2.0
            # each cancel lets exactly the next one start, and never two
            for left in (2, 1, 0):
                states = {t["id"]: c.task(t["id"])["state"] for t in sleeps}
                running = [i for i, st in states.items() if st == "running"]
                assert len(running) == 1, states
                c.cancel(running[0])

                def one_more_running(n: int = left) -> bool:
                    now = [c.task(t["id"])["state"] for t in sleeps]
                    assert now.count("running") <= 1, now
                    return now.count("cancelled") == 3 - n and now.count("running") == min(n, 1)

                wait_until(one_more_running, 30, what="the next sleep to start")


def test_a_deadline_that_passes_in_the_queue_fails_the_task_unrun(tmp_path: Path) -> None:
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        with Client.from_home(node.home, timeout=120) as c:
            blocker = _hold_the_slot(c)
            late = c.submit("sleep", params={"seconds": 0.1}, timeout_s=1, no_cache=True)
            t = c.task(late["id"], wait=60)
            assert t["state"] == "failed"
            assert t["error"] == "deadline of 1 s exceeded"
            assert t["attempts"] == []  # never handed to an executor
            assert t["timings"]["started"] is None
            assert c.task(blocker["id"])["state"] == "running"  # the blocker was not disturbed
            listed = {x["id"]: x for x in c.tasks(state="failed")}
            assert listed[late["id"]]["error"] == "deadline of 1 s exceeded"
            c.cancel(blocker["id"])
            # without the wait, the same task runs
            ok = c.submit("sleep", params={"seconds": 0.1}, timeout_s=30, wait=60,
                          no_cache=True)
            assert ok["state"] == "done"


def test_cache_entries_serve_repeats_within_the_ttl_and_not_after(tmp_path: Path) -> None:
    ttl_s = 8
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        node.stop()
        _write_config(node.home, "scheduler", f"cache_ttl_s = {ttl_s}")
        node.start()
        with Client.from_home(node.home, timeout=120) as c:
            first = c.submit("text.stats", b"one two two", wait=60)
            assert first["state"] == "done"
            assert not first["cached"]
            again = c.submit("text.stats", b"one two two", wait=60)
            assert again["cached"]
            assert again["output"] == first["output"]
            # Repeat until one is run again: within the TTL each repeat is a hit, so the
            # loop ends only when the entry expires (bounded: 120 repeats, over 60 s).
            later: dict[str, Any] = {}
            for _ in range(120):
                later = c.submit("text.stats", b"one two two", wait=60)
                if not later["cached"]:
                    break
                time.sleep(0.5)
            assert not later["cached"], f"still served from the cache after {ttl_s} s TTL"
            assert later["state"] == "done"
            assert later["output"] == first["output"]
            assert later["executed_by"] == "local"
            # the fresh result is cached again
            assert c.submit("text.stats", b"one two two", wait=60)["cached"]
