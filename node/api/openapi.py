"""The control API's OpenAPI 3.1 document (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

_ERR = {"description": "error", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}


def _op(summary: str, resp: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "ok", "content": {"application/json": {
            "schema": resp or {"type": "object"}}}}, "401": _ERR, "400": _ERR},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _page(summary: str, *, status: str = "200") -> dict[str, Any]:
    """A dashboard route: HTML or a redirect for the browser, not JSON; no bearer token
    (the session cookie, or nothing, see node/api/dashboard.py)."""
    return {"summary": summary, "security": [], "responses": {status: {"description": "ok"}}}


COOKIE_OR_BEARER: list[dict[str, list[str]]] = [{"bearer": []}, {"session": []}]
TASK = {"$ref": "#/components/schemas/Task"}
SUBMIT = {"$ref": "#/components/schemas/Submit"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "teammesh control API", "version": "1"},
    "servers": [{"url": "http://127.0.0.1"}],
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            # the dashboard's browser session (HttpOnly, SameSite=Strict); requests other
            # than GET must also carry X-Teammesh-Dashboard: 1
            "session": {"type": "apiKey", "in": "cookie", "name": "teammesh_session"},
        },
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Submit": {"type": "object", "required": ["kind"], "properties": {
                "kind": {"type": "string"}, "input_b64": {"type": "string"},
                "params": {"type": "object"},
                "where": {"enum": ["any", "local", "peers", "bridge"]},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 16,
                             "description": "run on this many distinct members"},
                "quorum": {"type": "integer", "minimum": 1,
                           "description": "done when this many replicas agree (1 to"
                                          " replicas; default: all of them)"},
                "priority": {"type": "integer"}, "timeout_s": {"type": "number"},
                "no_cache": {"type": "boolean"}, "tag": {},
                "wait": {"type": "boolean"}}},
            "Task": {"type": "object", "properties": {
                "id": {"type": "string"}, "kind": {"type": "string"},
                "state": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
                "executed_by": {"type": ["string", "null"]},
                "attempts": {"type": "array"}, "output": {},
                "error": {"type": ["string", "null"]},
                "waiting_reason": {"type": ["string", "null"]},
                "timings": {"type": "object"}}},
        },
    },
    "paths": {
        "/health": {"get": _op("liveness, no token needed")},
        "/metrics": {"get": {"summary": "Prometheus metrics (text)",
                             "responses": {"200": {"description": "metrics"}}}},
        "/v1/status": {"get": _op("this node: peer_id, addrs, api, team, slots, reachability")},
        "/v1/peers": {"get": _op("live team members from capability ads",
                                 {"type": "array", "items": {"type": "object"}})},
        "/v1/team": {"get": _op("team summary and members")},
        "/v1/team/invite": {"post": _op("create a one-time invite", body={
            "type": "object", "properties": {"ttl_s": {"type": "integer"}}})},
        "/v1/team/revoke": {"post": _op("revoke a member", body={
            "type": "object", "required": ["peer_id"],
            "properties": {"peer_id": {"type": "string"}}})},
        "/v1/stop": {"post": _op("stop the daemon")},
        "/v1/capacity": {"post": _op("set this node's slots", body={
            "type": "object", "required": ["slots"],
            "properties": {"slots": {"type": "integer", "minimum": 0, "maximum": 1024}}})},
        "/v1/kinds": {"get": _op("task kinds this node runs and the team offers")},
        "/v1/tasks": {
            "get": _op("list tasks (filters: state, limit)",
                       {"type": "array", "items": TASK}),
            "post": _op("submit a task", TASK, SUBMIT),
        },
        "/v1/tasks/batch": {"post": _op("submit many tasks", {"type": "array", "items": TASK},
                                        {"type": "object", "properties": {
                                            "tasks": {"type": "array", "items": SUBMIT}}})},
        "/v1/tasks/{id}": {"get": _op("one task; ?wait=S blocks until it ends or S pass", TASK)},
        "/v1/tasks/{id}/cancel": {"post": _op("cancel a task", TASK)},
        "/v1/tasks/{id}/events": {"get": {"summary": "progress as server-sent events",
                                          "responses": {"200": {"description": "SSE"}}}},
        "/v1/files": {"get": _op("pinned files and the store's summary")},
        "/v1/files/share": {"post": _op("add a file or folder and pin it", body={
            "type": "object", "required": ["path"], "properties": {
                "path": {"type": "string"}, "mirror": {"type": "boolean"}}})},
        "/v1/files/get": {"post": {
            "summary": "fetch a CID to a path; NDJSON progress lines, then done or error",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["cid", "dest"], "properties": {
                    "cid": {"type": "string"}, "dest": {"type": "string"}}}}}},
            "responses": {"200": {"description": "NDJSON", "content": {
                "application/x-ndjson": {}}}, "401": _ERR, "400": _ERR}}},
        "/v1/files/pin": {"post": _op("pin a CID", body={
            "type": "object", "properties": {"cid": {"type": "string"}}})},
        "/v1/files/unpin": {"post": _op("unpin a CID", body={
            "type": "object", "properties": {"cid": {"type": "string"}}})},
        "/v1/files/gc": {"post": _op("drop unpinned blocks")},
        # the web dashboard (node/api/dashboard.py)
        "/": {"get": _page("the dashboard page (401 page when not logged in)")},
        "/login": {"get": {**_page("redeem a one-time login code: sets the session cookie"
                                   " and redirects to /", status="303"),
                           "parameters": [{"name": "code", "in": "query", "required": True,
                                           "schema": {"type": "string"}}]}},
        "/static/{name}": {"get": _page("the dashboard's static files")},
        "/logout": {"post": {**_op("end the dashboard session"),
                             "security": COOKIE_OR_BEARER}},
        "/v1/dashboard/login": {"post": _op(
            "a one-time login link for the dashboard (url, expires_in_s)", {
                "type": "object", "properties": {"url": {"type": "string"},
                                                 "expires_in_s": {"type": "number"}}})},
        "/v1/dashboard": {"get": {**_op("the dashboard's overview: node, peers, tasks, files,"
                                        " bridge"), "security": COOKIE_OR_BEARER}},
        "/v1/events": {"get": {"summary": "the dashboard's live feed as server-sent events"
                                          " (overview and task events)",
                               "security": COOKIE_OR_BEARER,
                               "responses": {"200": {"description": "SSE", "content": {
                                   "text/event-stream": {}}}, "401": _ERR}}},
    },
}
