"""`teammesh top`: a live terminal view of the team's peers and this node's tasks.

It polls the control API (``/v1/dashboard`` for the overview the web dashboard shows,
``/v1/tasks`` for the newest tasks) and redraws with rich's Live display; the node does
no extra work for it beyond answering those two requests.
"""

from __future__ import annotations

import time
from typing import Any

TASK_ROWS = 15


def snapshot(client: Any) -> dict[str, Any]:
    """One frame's data: the dashboard overview plus the newest tasks."""
    overview = dict(client.request("GET", "/v1/dashboard"))
    overview["recent_tasks"] = list(client.request("GET", "/v1/tasks",
                                                   params={"limit": TASK_ROWS}))
    return overview


def _short(peer: str | None) -> str:
    if not peer:
        return ""
    return peer if len(peer) <= 14 else f"{peer[:6]}…{peer[-6:]}"


def frame(data: dict[str, Any]) -> Any:
    """The rich renderable for one snapshot."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    node = data["node"]
    team = node.get("team") or {}
    counters = data.get("tasks", {}).get("counters", {})
    files = data.get("files", {})
    bridge = data.get("bridge", {})
    head = Text.assemble(
        ("teammesh ", "bold"), f"{team.get('name', '?')} · {_short(node['peer_id'])} · ",
        f"{node['free_slots']}/{node['slots']} slots free · {node['live_peers']} live peers · ",
        f"tasks {counters.get('submitted', 0)} submitted, {counters.get('done', 0)} done, ",
        (f"{counters.get('failed', 0)} failed", "red" if counters.get("failed") else ""),
    )
    extra = []
    if files.get("enabled"):
        s = files["summary"]
        extra.append(f"files: {s['pins']} pinned, mirror {s['mirror']},"
                     f" backlog {files['mirror_backlog']}")
    extra.append("bridge: " + ("not configured" if not bridge.get("configured") else
                               "ok" if (bridge.get("health") or {}).get("ok") else
                               f"down ({bridge.get('error') or 'checking'})"))
    peers = Table("peer", "free/slots", "load", "queue", "health", "reachability", "kinds",
                  title="peers", title_justify="left", expand=True)
    for p in data.get("peers", []):
        reach = ("this node" if p.get("self") else "pull mode" if p.get("pull") else
                 "connected" if p.get("connected") else "not connected")
        health = ("–" if p.get("self") else "breaker open" if p.get("breaker") == "open" else
                  "–" if p.get("health") is None else f"{p['health'] * 100:.0f}%")
        peers.add_row(_short(p["peer_id"]) + (" (you)" if p.get("self") else ""),
                      f"{p['free_slots']}/{p['slots']}", f"{p.get('load', 0) * 100:.0f}%",
                      str(p["queue"]), health, reach, str(len(p.get("kinds", []))))
    tasks = Table("id", "kind", "state", "where / by", "detail", title="tasks (newest first)",
                  title_justify="left", expand=True)
    styles = {"done": "green", "failed": "red", "cancelled": "red", "running": "blue",
              "queued": "yellow"}
    for t in data.get("recent_tasks", []):
        running = [a["peer"] for a in t.get("attempts") or [] if a.get("ended") is None]
        where = (f"on {', '.join(map(_short, running))}" if t["state"] == "running" and running
                 else f"by {_short(t['executed_by'])}" if t.get("executed_by") else t["where"])
        detail = (t.get("error") if t["state"] in ("failed", "cancelled") else
                  t.get("waiting_reason") if t["state"] in ("queued", "running") else "")
        tasks.add_row(t["id"], t["kind"], Text(t["state"], style=styles.get(t["state"], "")),
                      where, detail or "")
    return Group(head, Text(" · ".join(extra), style="dim"), peers, tasks)


def run_top(client: Any, console: Any, *, interval_s: float = 1.0, once: bool = False) -> None:
    """Redraw every ``interval_s`` until Ctrl-C (or one frame with ``once``)."""
    if once:
        console.print(frame(snapshot(client)))
        return
    from rich.live import Live

    try:
        with Live(frame(snapshot(client)), console=console, screen=False,
                  auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(frame(snapshot(client)), refresh=True)
    except KeyboardInterrupt:
        return
