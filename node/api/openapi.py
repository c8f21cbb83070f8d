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


TASK = {"$ref": "#/components/schemas/Task"}
SUBMIT = {"$ref": "#/components/schemas/Submit"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "teammesh control API", "version": "1"},
    "servers": [{"url": "http://127.0.0.1"}],
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Submit": {"type": "object", "required": ["kind"], "properties": {
                "kind": {"type": "string"}, "input_b64": {"type": "string"},
                "params": {"type": "object"},
                "where": {"enum": ["any", "local", "peers", "bridge"]},
                "replicas": {"type": "integer", "minimum": 1},
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
    },
}
