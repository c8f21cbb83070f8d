"""A submission (an HTTP body, a batch line, a control-socket request) checked and turned
into a ``TaskRecord``. Everything a member sends is untrusted: each field is checked, and
a bad one raises ``TaskError`` naming it and what to do, before anything is journaled."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

from teammesh.node.tasks.records import MAX_INPUT, WHERE, TaskRecord, new_task_id
from teammesh.protocols import tasks as tp
from teammesh.protocols.errors import TaskError, TeammeshError


def record_from_request(body: dict[str, Any],
                        known_version: Callable[[str], str | None]) -> TaskRecord:
    """The task ``body`` asks for. ``known_version(kind)``: the version this node or the
    team runs, when the body names none.

    Raises:
        TaskError: a field is missing, of the wrong type, or out of range.
    """
    kind = body.get("kind")
    if not isinstance(kind, str) or not kind:
        raise TaskError("'kind' (string) is required")
    raw = body.get("input_b64")
    data = b""
    if raw is not None:
        if not isinstance(raw, str):
            raise TaskError("'input_b64' must be a base64 string")
        try:
            data = base64.b64decode(raw, validate=True)
        except ValueError as exc:
            raise TaskError("'input_b64' is not valid base64") from exc
    if len(data) > MAX_INPUT:
        raise TaskError(f"input is {len(data)} bytes; inline inputs are limited to"
                        f" {MAX_INPUT} bytes (share larger files by CID)")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise TaskError("'params' must be an object")
    try:
        psize = tp.params_size(params)
    except TeammeshError as exc:
        raise TaskError(f"'params' cannot be encoded: {exc}") from exc
    if psize > tp.MAX_PARAMS_BYTES:
        raise TaskError(f"'params' is {psize} bytes packed; the limit is"
                        f" {tp.MAX_PARAMS_BYTES} (pass big data as the input or by CID)")
    where = body.get("where", "any")
    if where not in WHERE:
        raise TaskError(f"'where' must be one of {', '.join(WHERE)}")
    replicas = body.get("replicas", 1)
    priority = body.get("priority", 0)
    timeout = body.get("timeout_s")
    if not isinstance(replicas, int) or not 1 <= replicas <= 16:
        raise TaskError("'replicas' must be an integer from 1 to 16")
    quorum = body.get("quorum")
    if quorum is None:
        quorum = replicas  # every replica must agree
    elif isinstance(quorum, bool) or not isinstance(quorum, int) \
            or not 1 <= quorum <= replicas:
        raise TaskError(f"'quorum' must be an integer from 1 to 'replicas' ({replicas}):"
                        f" how many of the replicas must agree (got {quorum!r}); lower"
                        " 'quorum' or raise 'replicas'")
    if not isinstance(priority, int):
        raise TaskError("'priority' must be an integer")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise TaskError("'timeout_s' must be a positive number")
    input_cid = body.get("input_cid")
    if input_cid is not None:
        from teammesh.node.files.service import parse_cid

        if not isinstance(input_cid, str):
            raise TaskError("'input_cid' must be a CID string")
        input_cid = str(parse_cid(input_cid))
        if data:
            raise TaskError("give either 'input_b64' or 'input_cid', not both")
    version = body.get("version") or known_version(kind) or "1"
    return TaskRecord(
        id=new_task_id(), kind=kind, version=str(version), input=data, params=params,
        priority=priority, where=where, replicas=replicas, quorum=quorum,
        timeout_s=float(timeout) if timeout else None,
        no_cache=bool(body.get("no_cache", False)), tag=body.get("tag"),
        input_cid=input_cid, submitted=time.time())
