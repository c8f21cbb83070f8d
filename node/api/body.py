"""What every control-API route shares: the bounded JSON body reader and the one map from
our error classes to an HTTP status and a stable error code."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from teammesh.protocols.errors import (
    ConfigError,
    MembershipError,
    NoCapacity,
    StorageError,
    TaskError,
    TeammeshError,
    UnknownKind,
)

MAX_BODY_BYTES = 64 * 1024 * 1024


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def status_for(exc: TeammeshError) -> tuple[int, str]:
    if isinstance(exc, UnknownKind):
        return 422, "unknown_kind"
    if isinstance(exc, NoCapacity):
        return 503, "no_capacity"
    if isinstance(exc, (MembershipError, ConfigError)):
        return 409, "membership"
    if isinstance(exc, TaskError):
        return 422, "task_error"
    if isinstance(exc, StorageError):
        return 404 if type(exc).__name__ == "NotFound" else 422, "storage"
    return 400, "bad_request"


async def json_body(request: Request) -> dict[str, Any]:
    return parse_json(await request.body())


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object (an empty body is ``{}``)."""
    if len(raw) > MAX_BODY_BYTES:
        raise TeammeshError(f"request body over {MAX_BODY_BYTES} bytes")
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise TeammeshError(f"request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise TeammeshError("request body must be a JSON object")
    return body
