"""Control API: JSON over HTTP on loopback, bearer-token protected (token in the home, 0600).

Served by our own HTTP/1.1 server (node/api/http.py) on trio inside the daemon's nursery:
the hot task routes (submit, batch, show/wait) are answered natively (``native_handler``)
when the request carries the bearer token; everything else, and requests authenticated
by the dashboard's cookie, go to the Starlette app below. The OpenAPI document is at
``/openapi.json``; Prometheus metrics at ``/metrics`` (node/api/metrics.py); the web
dashboard at ``/`` (node/api/dashboard.py), whose browser session authenticates with a
cookie instead of the bearer token. Every error is JSON
``{"error": {"code": ..., "message": ...}}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from teammesh.node.api.body import error, json_body, status_for
from teammesh.node.api.dashboard import Dashboard
from teammesh.node.api.http import Limits, Native, error_body, json_bytes, serve_http
from teammesh.node.api.http import Request as HttpRequest
from teammesh.node.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from teammesh.node.api.metrics import NodeMetrics
from teammesh.node.api.openapi import OPENAPI
from teammesh.protocols.errors import (
    ConfigError,
    TeammeshError,
)

if TYPE_CHECKING:
    from teammesh.node.api.tasks import SubmitGroup
    from teammesh.node.daemon import Node

Handler = Callable[[Request], Awaitable[Response]]
logger = logging.getLogger("teammesh.api")


UNAUTHORIZED = "missing or wrong bearer token (see api.token in the home)"


def build_app(node: Node, metrics: NodeMetrics | None = None,
              dashboard: Dashboard | None = None,
              group: SubmitGroup | None = None) -> Starlette:
    token = node.home.token().encode()
    metrics = metrics if metrics is not None else NodeMetrics(node)
    dashboard = dashboard if dashboard is not None else Dashboard(node)

    def endpoint(fn: Callable[[Request], Awaitable[Any]], *, auth: bool = True) -> Handler:
        async def handler(request: Request) -> Response:
            if auth:
                header = request.headers.get("authorization", "")
                if header:
                    ok = hmac.compare_digest(header.removeprefix("Bearer ").encode(), token)
                else:
                    ok = dashboard.auth.cookie_allows(request)
                if not ok:
                    return error(401, "unauthorized", UNAUTHORIZED)
            try:
                result = await fn(request)
            except TeammeshError as exc:
                status, code = status_for(exc)
                return error(status, code, str(exc))
            except Exception as exc:  # a bug answers 500 and is logged once
                logger.exception("API %s %s failed", request.method, request.url.path)
                return error(500, "internal", f"internal error ({type(exc).__name__}: {exc});"
                             " see the node's log")
            if isinstance(result, Response):
                return result
            return JSONResponse(result)

        return handler

    async def status(request: Request) -> Any:
        return node.status()

    async def peers(request: Request) -> Any:
        return node.mesh.live_peers()

    async def team(request: Request) -> Any:
        return {"team": node.membership.summary(), "members": node.membership.members()}

    async def invite(request: Request) -> Any:
        body = await json_body(request)
        ttl = body.get("ttl_s", 3600)
        if not isinstance(ttl, int) or not 60 <= ttl <= 30 * 86400:
            raise TeammeshError("ttl_s must be an integer from 60 to 2592000 seconds")
        assert node.host is not None
        from teammesh.node.p2p.mesh import dialable_addrs

        inv = node.membership.create_invite(
            dialable_addrs(node.host.listen_addrs, node.host.peer_id), ttl)
        return {"invite": inv.encode(), "team": inv.team.team_id, "expires": inv.expires,
                "addrs": list(inv.addrs)}

    async def revoke(request: Request) -> Any:
        body = await json_body(request)
        peer = body.get("peer_id")
        if not isinstance(peer, str):
            raise TeammeshError("peer_id (string) is required")
        from teammesh.protocols.identity import is_peer_id

        if not is_peer_id(peer):
            raise TeammeshError(f"{peer!r} is not a peer id")
        node.membership.revoke(peer)
        assert node.host is not None
        await node.host.disconnect(peer)
        node.mesh.forget(peer)
        return {"revoked": peer}

    async def capacity(request: Request) -> Any:
        body = await json_body(request)
        slots = body.get("slots")
        if not isinstance(slots, int) or not 0 <= slots <= 1024:
            raise TeammeshError("slots must be an integer from 0 to 1024")
        node.set_slots(slots)
        return {"slots": node.capacity.slots}

    async def stop(request: Request) -> Any:
        node.stop_requested.set()
        return {"stopping": True}

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def openapi(request: Request) -> Any:
        return OPENAPI

    async def health(request: Request) -> Any:
        return {"ok": True}

    routes = [
        Route("/health", endpoint(health, auth=False)),
        Route("/openapi.json", endpoint(openapi, auth=False)),
        Route("/metrics", endpoint(metrics_text)),
        Route("/v1/status", endpoint(status)),
        Route("/v1/peers", endpoint(peers)),
        Route("/v1/team", endpoint(team)),
        Route("/v1/team/invite", endpoint(invite), methods=["POST"]),
        Route("/v1/team/revoke", endpoint(revoke), methods=["POST"]),
        Route("/v1/capacity", endpoint(capacity), methods=["POST"]),
        Route("/v1/stop", endpoint(stop), methods=["POST"]),
    ]
    if node.tasks is not None:
        from teammesh.node.api.tasks import task_routes

        routes += task_routes(node.tasks, endpoint, group)
    if node.files is not None:
        from teammesh.node.api.files import files_routes

        routes += files_routes(node.files, endpoint)
    routes += dashboard.routes(endpoint)
    return Starlette(routes=routes)


def _bind(spec: str) -> socket.socket:
    host, _, port = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"node.api = {spec!r}: the control API listens on loopback only")
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port or 0)))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot listen for the control API on {spec}: {exc}") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def native_handler(node: Node, group: SubmitGroup | None) -> Native:
    """The task routes that carry per-task load, answered without Starlette when the
    request has an ``authorization`` header; None passes a request to the Starlette app
    (every other route, and the dashboard's cookie-authenticated requests)."""
    if node.tasks is None:
        async def nothing(req: HttpRequest) -> None:
            return None

        return nothing
    from teammesh.node.api.tasks import PASS_ON, native_task_routes

    assert group is not None
    token = node.home.token().encode()
    route = native_task_routes(node.tasks, group)
    json_type = b"application/json"

    async def handle(req: HttpRequest) -> tuple[int, bytes, bytes] | None:
        call = route(req)
        if call is None:
            return None
        header = req.header(b"authorization")
        if header is None:
            return None  # perhaps the dashboard's cookie: Starlette checks it
        if not hmac.compare_digest(header.removeprefix(b"Bearer "), token):
            return 401, json_type, error_body("unauthorized", UNAUTHORIZED)
        try:
            result = await call()
        except TeammeshError as exc:
            status, code = status_for(exc)
            return status, json_type, error_body(code, str(exc))
        if result is PASS_ON:
            return None
        return 200, json_type, json_bytes(result)

    return handle


async def serve_api(node: Node, spec: str, *, limits: Limits | None = None,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    sock = _bind(spec)
    host, port = sock.getsockname()[:2]
    metrics = NodeMetrics(node)
    dashboard = Dashboard(node)
    group = None
    if node.tasks is not None:
        from teammesh.node.api.tasks import SubmitGroup

        group = SubmitGroup(node.tasks)
    app = build_app(node, metrics, dashboard, group)
    url = f"http://{host}:{port}"
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics.run)
        await nursery.start(dashboard.run)
        await nursery.start(serve_http, sock, native_handler(node, group), app,
                            limits or Limits())
        task_status.started(url)
