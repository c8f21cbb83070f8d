"""The control API's event stream, ``GET /v1/events`` (issue 20, item 5).

A client holding the API token reads server-sent events: ``tasks`` (the recent list)
first, then ``task`` events each time a task's state, waiting reason or attempts change
(node/api/dashboard.py, ``events``). Without the token the stream is refused.

The test reacts to what the stream shows, not to time: on a node with one slot it
submits a long task A, and once the stream shows A running submits B; once B shows as
queued behind A, it cancels A; it stops when B is done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from meshtools import mesh

from teammesh.client import Client

ORDER = ["queued", "running", "done"]


def _events(resp: httpx.Response, deadline: float) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs from an SSE response, until ``deadline`` (monotonic)."""
    event, data = "message", []
    for line in resp.iter_lines():
        assert time.monotonic() < deadline, "the stream did not show the expected events"
        if line.startswith(":"):
            continue  # a keepalive comment
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)


def _collapse(states: list[str]) -> list[str]:
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def test_events_stream_task_state_changes_in_order(tmp_path: Path) -> None:
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        url = node.api["url"]
        token = (node.home / "api.token").read_text().strip()
        for headers in ({}, {"authorization": "Bearer not-the-token"}):
            # streamed: a stream that wrongly opens must fail here, not hang reading it
            with httpx.stream("GET", f"{url}/v1/events", headers=headers, timeout=30,
                              trust_env=False) as r:
                assert r.status_code == 401, (headers, r.status_code)
                assert r.headers["content-type"].startswith("application/json")
                assert "token" in r.read().decode().lower()

        seen: dict[str, list[str]] = {}
        last: dict[str, dict[str, Any]] = {}
        kinds: list[str] = []
        a_id = b_id = ""
        with Client.from_home(node.home, timeout=120) as c, \
                httpx.Client(timeout=httpx.Timeout(60), trust_env=False) as h, \
                h.stream("GET", f"{url}/v1/events",
                         headers={"authorization": f"Bearer {token}"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            for event, data in _events(resp, time.monotonic() + 180):
                kinds.append(event)
                if event == "tasks" and not a_id:
                    a_id = c.submit("sleep", params={"seconds": 600}, no_cache=True)["id"]
                if event != "task":
                    continue
                seen.setdefault(data["id"], []).append(data["state"])
                last[data["id"]] = data
                if data["id"] == a_id and data["state"] == "running" and not b_id:
                    b_id = c.submit("sleep", params={"seconds": 0.2}, no_cache=True)["id"]
                elif data["id"] == b_id and data["state"] == "queued" and \
                        last[a_id]["state"] == "running":
                    c.cancel(a_id)
                elif data["id"] == b_id and data["state"] in ("done", "failed", "cancelled"):
                    break
            shown_b = c.task(b_id)
            shown_a = c.task(a_id)
    assert kinds[0] == "tasks"  # the recent list comes first
    a, b = _collapse(seen[a_id]), _collapse(seen[b_id])
    assert a[-2:] == ["running", "cancelled"], a
    assert a[0] in ("queued", "running"), a
    # B waited behind A, then ran: every change in order, none invented or reversed
    assert b[0] == "queued", b
    assert b[-1] == "done", b
    assert b == [s for s in ORDER if s in b], b
    # the last event carries what the task API shows
    assert last[b_id]["output"] == shown_b["output"] == {"slept": 0.2}
    assert last[b_id]["executed_by"] == shown_b["executed_by"] == "local"
    assert last[a_id]["error"] == shown_a["error"] == "cancelled by the user"
