"""The web dashboard: login by one-time link, a live overview over server-sent events.

Login: ``teammesh dashboard`` asks the API (with the bearer token) for a one-time code
and opens ``/login?code=...``. The code is good once, for ``LOGIN_CODE_TTL_S``; the
answer sets an HttpOnly, SameSite=Strict session cookie and redirects to ``/``, so
neither the token nor the code stays in the address bar or the history. Sessions live
in the daemon's memory: a restart logs the browser out (run ``teammesh dashboard``
again).

A cookie is ambient authority, so requests authenticated by it get two more checks
(``cookie_allows``): the Host header must name loopback (a DNS-rebinding page cannot
use the cookie), and anything but GET must carry ``X-Teammesh-Dashboard: 1`` (a
cross-site form cannot set a header; a cross-site fetch that sets one needs a CORS
preflight, which this API never grants).

Live data: ``GET /v1/events`` streams ``overview`` (peers, files, bridge, counters; sent
when it changes, checked every ``OVERVIEW_EVERY_S``) and ``task`` (one task's JSON each
time its state, waiting reason or attempts change) events. The page is plain HTML and
JS from ``node/api/static`` with no build step.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

if TYPE_CHECKING:
    from teammesh.node.daemon import Node

LOGIN_CODE_TTL_S = 120.0
SESSION_TTL_S = 7 * 86400.0
MAX_CODES = 64
MAX_SESSIONS = 256
COOKIE = "teammesh_session"
CSRF_HEADER = "x-teammesh-dashboard"
OVERVIEW_EVERY_S = 1.0
TASK_SCAN_EVERY_S = 0.25
BRIDGE_CHECK_EVERY_S = 15.0
BRIDGE_CHECK_TIMEOUT_S = 5.0
RECENT_TASKS = 100
MAX_FILES_LISTED = 200
KEEPALIVE_S = 15.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
TERMINAL = ("done", "failed", "cancelled")

LOGGED_OUT_PAGE = """<!doctype html><meta charset="utf-8"><title>teammesh</title>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto">
<h1>teammesh</h1><p>{message}</p>
<p>Run <code>teammesh dashboard</code> on this machine to get a fresh login link.</p>"""


class DashboardAuth:
    """One-time login codes and the sessions they open (in memory)."""

    def __init__(self) -> None:
        self._codes: dict[str, float] = {}  # code -> expiry (unix seconds)
        self._sessions: dict[str, float] = {}  # session id -> expiry

    def new_code(self) -> str:
        now = time.time()
        self._codes = {c: t for c, t in self._codes.items() if t > now}
        if len(self._codes) >= MAX_CODES:
            # unused codes pile up only if someone asks for links and never opens them
            self._codes.pop(min(self._codes, key=self._codes.__getitem__))
        code = secrets.token_urlsafe(24)
        self._codes[code] = now + LOGIN_CODE_TTL_S
        return code

    def redeem(self, code: str) -> str | None:
        """A new session id for a valid, unused code; None otherwise."""
        expires = self._codes.pop(code, None)
        now = time.time()
        if expires is None or expires <= now:
            return None
        self._sessions = {s: t for s, t in self._sessions.items() if t > now}
        if len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(min(self._sessions, key=self._sessions.__getitem__))
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + SESSION_TTL_S
        return session

    def valid(self, session: str | None) -> bool:
        if not session:
            return False
        for known, expires in self._sessions.items():
            if hmac.compare_digest(known.encode(), session.encode()):
                return expires > time.time()
        return False

    def end(self, session: str | None) -> None:
        if session:
            self._sessions.pop(session, None)

    def cookie_allows(self, request: Request) -> bool:
        """Whether the request's session cookie authenticates it (see the module doc)."""
        if not self.valid(request.cookies.get(COOKIE)):
            return False
        host = request.headers.get("host", "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in LOOPBACK_HOSTS:
            return False
        return request.method in ("GET", "HEAD") or request.headers.get(CSRF_HEADER) == "1"


class Dashboard:
    """What the page shows, assembled from the services' own state."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.auth = DashboardAuth()
        self.bridge_health: dict[str, Any] | None = None
        self.bridge_error: str | None = None
        self.bridge_checked: float | None = None

    # --- the overview -------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        node = self.node
        st = node.status()
        return {
            "node": {k: st[k] for k in ("peer_id", "addrs", "team", "slots", "free_slots",
                                        "queue", "kinds", "version", "uptime_s",
                                        "live_peers", "connected_peers")}
            | {"reachable": st["reachability"]["reachable"],
               "reachability_note": st["reachability"]["note"]},
            "peers": self.peers(),
            "tasks": self.task_counts(),
            "files": self.files(),
            "bridge": self.bridge(),
        }

    def peers(self) -> list[dict[str, Any]]:
        node = self.node
        now = trio.current_time()
        connected = set(node.host.connected_peers()) if node.host is not None else set()
        inbound = node.host.stats.inbound_peers if node.host is not None else set()
        svc = node.tasks
        out = []
        for e in node.mesh.table.live(now):
            p = e.to_json(now)
            peer = p["peer_id"]
            link = svc.links.get(peer) if svc is not None else None
            breaker = svc.breakers.get(peer) if svc is not None else None
            load = 0.0 if not p["slots"] else (p["slots"] - p["free_slots"]) / p["slots"]
            p.update({
                "self": peer == node.identity.peer_id,
                "connected": peer in connected,
                "dialled_us": peer in inbound,
                "load": round(load, 3),
                "health": round(link.health, 3) if link is not None else None,
                "rtt_ms": round(link.rtt_ms, 1) if link is not None else None,
                "inflight": len(link.inflight) if link is not None else 0,
                "breaker": None if breaker is None else
                ("open" if not breaker.allows(now) else "closed"),
                "kinds": sorted(p["kinds"]),
            })
            out.append(p)
        out.append(self._own_row())
        out.sort(key=lambda p: (not p["self"], p["peer_id"]))
        return out

    def _own_row(self) -> dict[str, Any]:
        import os

        import teammesh

        node = self.node
        cap = node.capacity
        return {"peer_id": node.identity.peer_id, "self": True, "slots": cap.slots,
                "free_slots": cap.free_slots, "queue": cap.queue, "cores": os.cpu_count() or 1,
                "kinds": sorted(cap.kinds), "version": teammesh.__version__, "pull": cap.pull,
                "connected": True, "dialled_us": False, "health": None, "rtt_ms": None,
                "inflight": 0, "breaker": None,
                "load": 0.0 if not cap.slots else round(cap.busy / cap.slots, 3),
                "addrs": node.host.addrs if node.host is not None else []}

    def task_counts(self) -> dict[str, Any]:
        svc = self.node.tasks
        if svc is None:
            return {}
        states: dict[str, int] = {}
        for r in list(svc.records.values()):
            states[r.state] = states.get(r.state, 0) + 1
        return {"counters": dict(svc.counters), "queued_here": svc.queued_count,
                "in_memory": states,
                "kinds": [k["name"] for k in svc.kinds_json()]}

    def files(self) -> dict[str, Any]:
        files = self.node.files
        if files is None:
            return {"enabled": False}
        summary = files.summary()
        pins = []
        for root in list(files.store.pins())[:MAX_FILES_LISTED]:
            pins.append({"cid": str(root)})
        return {"enabled": True, "summary": summary, "pins": pins,
                "mirror_backlog": summary.get("mirror_pending", 0)}

    def bridge(self) -> dict[str, Any]:
        node = self.node
        client = node.bridge
        svc = node.tasks
        breaker = svc.breakers.get("bridge") if svc is not None else None
        return {
            "configured": client is not None,
            "url": client.url if client is not None else None,
            "pull": node.options.pull,
            "health": self.bridge_health,
            "error": self.bridge_error,
            "checked": self.bridge_checked,
            "breaker": None if breaker is None else
            ("open" if not breaker.allows(trio.current_time()) else "closed"),
            # what Rule 6 compares a busy member's queue with (measured; 1 s until then)
            "rtt_ms": None if client is None or svc is None else
            round(svc.bridge_rtt_s * 1000, 1),
        }

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the bridge's health fresh for the page (it is an HTTPS call away)."""
        task_status.started()
        client = self.node.bridge
        if client is None:
            return
        from teammesh.node.bridge.client import BridgeError

        while True:
            try:
                with trio.fail_after(BRIDGE_CHECK_TIMEOUT_S):
                    self.bridge_health = await client.health()
                self.bridge_error = None
            except (BridgeError, trio.TooSlowError) as exc:
                self.bridge_health = None
                self.bridge_error = str(exc) or "no answer within"\
                    f" {BRIDGE_CHECK_TIMEOUT_S:g} s"
            self.bridge_checked = time.time()
            await trio.sleep(BRIDGE_CHECK_EVERY_S)

    # --- the event stream ---------------------------------------------------------------
    async def events(self) -> AsyncIterator[str]:
        svc = self.node.tasks
        last_overview = ""
        last_overview_at = -1e9
        last_ping = trio.current_time()
        known: dict[str, tuple[Any, ...]] = {}
        if svc is not None:
            recent = svc.list_tasks(None, RECENT_TASKS)
            yield _sse("tasks", recent)
            for t in recent:
                known[t["id"]] = _task_key(t)
        while True:
            now = trio.current_time()
            if now - last_overview_at >= OVERVIEW_EVERY_S:
                last_overview_at = now
                text = json.dumps(self.overview(), default=str)
                if text != last_overview:
                    last_overview = text
                    last_ping = now
                    yield f"event: overview\ndata: {text}\n\n"
            if svc is not None:
                for task_id, r in list(svc.records.items()):
                    key = (r.state, r.waiting_reason, len(r.attempts), r.executed_by)
                    if known.get(task_id) != key:
                        known[task_id] = key
                        last_ping = now
                        yield _sse("task", r.to_json())
                if len(known) > 4 * len(svc.records) + RECENT_TASKS:
                    known = {i: k for i, k in known.items() if i in svc.records}
            if now - last_ping >= KEEPALIVE_S:
                last_ping = now
                yield ": keepalive\n\n"  # lets proxies and the browser see a live stream
            await trio.sleep(TASK_SCAN_EVERY_S)

    # --- routes -------------------------------------------------------------------------
    def routes(self, endpoint: Callable[..., Any]) -> list[Route]:
        async def login_code(request: Request) -> Any:
            code = self.auth.new_code()
            return {"url": f"{self.node.api_url}/login?code={code}",
                    "expires_in_s": LOGIN_CODE_TTL_S}

        async def login(request: Request) -> Response:
            session = self.auth.redeem(request.query_params.get("code", ""))
            if session is None:
                return HTMLResponse(LOGGED_OUT_PAGE.format(
                    message="This login link was used already or has expired."),
                    status_code=401)
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(COOKIE, session, max_age=int(SESSION_TTL_S), httponly=True,
                            samesite="strict", path="/")
            resp.headers["Cache-Control"] = "no-store"
            resp.headers["Referrer-Policy"] = "no-referrer"
            return resp

        async def logout(request: Request) -> Any:
            self.auth.end(request.cookies.get(COOKIE))
            return {"logged_out": True}

        async def index(request: Request) -> Response:
            if not self.auth.valid(request.cookies.get(COOKIE)):
                return HTMLResponse(LOGGED_OUT_PAGE.format(message="You are not logged in."),
                                    status_code=401)
            return _static_response("index.html")

        async def static(request: Request) -> Response:
            return _static_response(request.path_params["name"])

        async def overview(request: Request) -> Any:
            return self.overview()

        async def events(request: Request) -> Any:
            return StreamingResponse(self.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store",
                                              "X-Accel-Buffering": "no"})

        plain: Callable[[Callable[[Request], Awaitable[Any]]], Any] = \
            lambda fn: endpoint(fn, auth=False)  # noqa: E731
        return [
            Route("/", plain(index), methods=["GET"]),
            Route("/login", plain(login), methods=["GET"]),
            Route("/logout", endpoint(logout), methods=["POST"]),
            Route("/static/{name}", plain(static), methods=["GET"]),
            Route("/v1/dashboard/login", endpoint(login_code), methods=["POST"]),
            Route("/v1/dashboard", endpoint(overview), methods=["GET"]),
            Route("/v1/events", endpoint(events), methods=["GET"]),
        ]


def open_browser(url: str) -> bool:
    """Open ``url`` in the user's browser when there is one to open (a desktop session);
    on a headless server, webbrowser would start a text browser in the terminal."""
    import os
    import sys
    import webbrowser

    if sys.platform not in ("darwin", "win32") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        return webbrowser.open(url, new=2)
    except webbrowser.Error:
        return False


def _task_key(t: dict[str, Any]) -> tuple[Any, ...]:
    return (t["state"], t.get("waiting_reason"), len(t.get("attempts") or []),
            t.get("executed_by"))


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def _static_response(name: str) -> Response:
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    missing = PlainTextResponse(f"no static file {name!r}", status_code=404)
    if "/" in name or "\\" in name or name.startswith(".") or suffix not in STATIC_TYPES:
        return missing
    try:
        body = resources.files("teammesh.node.api").joinpath("static", name).read_bytes()
    except FileNotFoundError:
        return missing
    return Response(body, media_type=STATIC_TYPES[suffix], headers={
        "Cache-Control": "no-cache",
        "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self';"
                                   " connect-src 'self'; img-src 'self' data:;"
                                   " frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
    })
