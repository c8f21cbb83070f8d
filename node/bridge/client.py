"""Client for the teammesh Cloudflare bridge (bridge/, docs/BRIDGE.md).

Every ``/v1`` request is signed with this node's bridge key: its member key
``K_P = derive_member_key(M, peer_id)`` (protocols/bridgekey.py), or the team's master
key ``M`` itself for an admin::

    X-Teammesh-Peer:           <peer id>
    X-Teammesh-Timestamp:      <unix seconds>
    X-Teammesh-Nonce:          <random hex, fresh per request>
    X-Teammesh-Content-SHA256: hex(sha256(body))
    X-Teammesh-Signature:      hex(HMAC-SHA256(key, "teammesh-bridge-v2" "\\n" METHOD "\\n"
                               PATH_WITH_QUERY "\\n" peer "\\n" timestamp "\\n" nonce "\\n"
                               content_sha256))

The peer id is inside the signed string and the Worker derives ``K_P`` from the master
and that peer id, so the bridge knows which member sent a request.

The client uses ``httpx.AsyncClient``, which runs under trio. Connection failures,
timeouts, 5xx and 429 answers raise :class:`BridgeUnavailable` (worth a retry or a
circuit breaker; 429 as its subclass :class:`BridgeRateLimited` with ``retry_after``); other
4xx answers raise :class:`BridgeRejected` carrying the bridge's error code and
message (retrying the same request will not help); ``401 stale_key`` raises
:class:`BridgeStaleKey` (a :class:`BridgeUnavailable`: retry once this node has its new
key) with the bridge's current key ``epoch``. Answers are untrusted input: a task, lease or list answer that is not the
documented shape raises :class:`BridgeProtocolError` (also a :class:`BridgeRejected`, so
callers that fail a task on a refusal fail it on a malformed answer too).
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx
from teammesh.protocols.bridgekey import derive_member_key
from teammesh.protocols.errors import TeammeshError

__all__ = [
    "BRIDGE_KEY_BYTES",
    "TASK_STATES",
    "BridgeClient",
    "BridgeError",
    "BridgeProtocolError",
    "BridgeRateLimited",
    "BridgeRejected",
    "BridgeStaleKey",
    "BridgeTask",
    "BridgeUnavailable",
    "check_leased_task",
    "check_task",
    "decode_task",
    "derive_member_key",
    "new_bridge_key",
    "sign_request",
]

BRIDGE_KEY_BYTES = 32
DEFAULT_TIMEOUT_S = 30.0
SIGNED_PREFIX = "teammesh-bridge-v2"
TASK_STATES = frozenset({"queued", "running", "done", "failed", "cancelled"})
# A $base64 output is decoded in memory: refuse absurd ones before decoding.
MAX_B64_CHARS = 64 * 1024 * 1024


class BridgeError(TeammeshError):
    """Base of the bridge client's errors."""


class BridgeUnavailable(BridgeError):
    """The bridge could not be reached, timed out, or answered 5xx: try later."""


class BridgeRateLimited(BridgeUnavailable):
    """429: this peer sent too many requests; wait ``retry_after`` seconds and retry."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BridgeRejected(BridgeError):
    """The bridge refused the request (4xx); ``code`` and ``status`` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"bridge refused the request ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.detail = message


class BridgeStaleKey(BridgeUnavailable):
    """401 stale_key: this node's bridge key belongs to an older epoch of the team's
    master key; ``epoch`` is the bridge's current one. Get the new key from an admin.

    A :class:`BridgeUnavailable`: the request is fine, this node's key is not (yet); a
    task waits and is retried once the node has its new key, instead of failing."""

    def __init__(self, message: str, epoch: int | None) -> None:
        super().__init__(f"bridge refused this node's key (401 stale_key): {message}")
        self.status = 401
        self.code = "stale_key"
        self.detail = message
        self.epoch = epoch


class BridgeProtocolError(BridgeRejected):
    """The bridge's answer is not the documented shape (a bug or a tampered bridge).
    A subclass of :class:`BridgeRejected` so that the task it concerns fails instead of
    being retried against the same answer."""

    def __init__(self, message: str, status: int = 200) -> None:
        super().__init__(status, "bad_response", message)


def new_bridge_key() -> bytes:
    """A fresh random master bridge key (32 bytes). The admin makes one per team (and one
    per rotation)."""
    return secrets.token_bytes(BRIDGE_KEY_BYTES)


def sign_request(key: bytes, peer_id: str, method: str, path_with_query: str, body: bytes, *,
                 timestamp: int | None = None, nonce: str | None = None) -> dict[str, str]:
    """All authentication headers (X-Teammesh-Peer included) for one request."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_hex(16)
    body_hash = hashlib.sha256(body).hexdigest()
    message = "\n".join(
        [SIGNED_PREFIX, method.upper(), path_with_query, peer_id, ts, nonce, body_hash]).encode()
    mac = hmac.new(key, message, hashlib.sha256).hexdigest()
    return {"X-Teammesh-Peer": peer_id, "X-Teammesh-Timestamp": ts, "X-Teammesh-Nonce": nonce,
            "X-Teammesh-Content-SHA256": body_hash, "X-Teammesh-Signature": mac}


# --- validation of the bridge's answers -------------------------------------------------


def _check_output(value: Any, where: str) -> None:
    """Every {"$base64": X} in an output must hold a valid base64 string (iteratively: the
    JSON parser already bounded the depth)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if set(v) == {"$base64"}:
                text = v["$base64"]
                if not isinstance(text, str) or len(text) > MAX_B64_CHARS:
                    raise BridgeProtocolError(f"{where}: output has a {{\"$base64\"}} that is not"
                                              " a base64 string")
                try:
                    base64.b64decode(text, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise BridgeProtocolError(f"{where}: output has invalid base64 ({exc})") from None
            else:
                stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _opt_str(task: dict[str, Any], field: str, where: str) -> None:
    if task.get(field) is not None and not isinstance(task[field], str):
        raise BridgeProtocolError(f"{where}: '{field}' must be a string or null, not"
                                  f" {type(task[field]).__name__}")


def check_task(task: Any, expect_id: str | None = None, *,
               check_output: bool = True) -> dict[str, Any]:
    """Validate one task JSON from the bridge; returns it unchanged or raises
    :class:`BridgeProtocolError`. ``check_output=False`` skips the output (an echo of
    what this node itself posted)."""
    if not isinstance(task, dict):
        raise BridgeProtocolError(f"the bridge answered {type(task).__name__} where a task"
                                  " object was expected")
    tid = task.get("id")
    if not isinstance(tid, str) or not tid:
        raise BridgeProtocolError("the bridge's task has no string 'id'")
    where = f"bridge task {tid[:80]!r}"
    if expect_id is not None and tid != expect_id:
        raise BridgeProtocolError(f"{where}: the bridge answered for another task than {expect_id!r}")
    if task.get("state") not in TASK_STATES:
        raise BridgeProtocolError(f"{where}: unknown state {str(task.get('state'))[:40]!r}")
    for field in ("kind", "error", "executed_by", "waiting_reason"):
        _opt_str(task, field, where)
    if task["state"] == "failed" and not isinstance(task.get("error"), str):
        raise BridgeProtocolError(f"{where}: a failed task without an error message")
    if "cached" in task and not isinstance(task["cached"], bool):
        raise BridgeProtocolError(f"{where}: 'cached' must be a boolean")
    if check_output:
        _check_output(task.get("output"), where)
    return task


def check_leased_task(task: Any) -> dict[str, Any]:
    """Validate one task of a lease answer (id, kind, version, input_b64, params, ...)."""
    if not isinstance(task, dict) or not isinstance(task.get("id"), str) or not task["id"]:
        raise BridgeProtocolError("the bridge leased a task without a string 'id'")
    where = f"leased task {task['id'][:80]!r}"
    if not isinstance(task.get("kind"), str) or not task["kind"]:
        raise BridgeProtocolError(f"{where}: 'kind' must be a string")
    if not isinstance(task.get("version", "1"), str):
        raise BridgeProtocolError(f"{where}: 'version' must be a string")
    if not isinstance(task.get("params", {}), dict):
        raise BridgeProtocolError(f"{where}: 'params' must be an object")
    prio = task.get("priority", 0)
    if not isinstance(prio, int) or isinstance(prio, bool):
        raise BridgeProtocolError(f"{where}: 'priority' must be an integer")
    _opt_str(task, "input_cid", where)
    data = task.get("input_b64")
    if data is not None:
        if not isinstance(data, str):
            raise BridgeProtocolError(f"{where}: 'input_b64' must be a base64 string")
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BridgeProtocolError(f"{where}: 'input_b64' is not valid base64 ({exc})") from None
    return task


@dataclass(frozen=True, slots=True)
class BridgeTask:
    """A validated task from the bridge, with its output decoded (a top-level
    {"$base64": ...} becomes bytes, as ``teammesh.client.decode_output`` does)."""

    id: str
    kind: str | None
    state: str
    output: Any
    error: str | None
    executed_by: str | None
    cached: bool
    raw: dict[str, Any]


def decode_task(task: Any, expect_id: str | None = None) -> BridgeTask:
    """Validate a task JSON from the bridge and decode it; raises :class:`BridgeProtocolError`
    (a TeammeshError) with a clear message on anything malformed."""
    t = check_task(task, expect_id)
    output = t.get("output")
    if isinstance(output, dict) and set(output) == {"$base64"}:
        output = base64.b64decode(output["$base64"], validate=True)
    return BridgeTask(id=t["id"], kind=t.get("kind"), state=t["state"], output=output,
                      error=t.get("error"), executed_by=t.get("executed_by"),
                      cached=bool(t.get("cached", False)), raw=t)


KEEPALIVE_S = 2.0  # see docs/BRIDGE.md, "Why not wrangler dev"


class BridgeClient:
    """Signed requests to one bridge. Use as ``async with BridgeClient(...) as bridge:``
    or call :meth:`aclose` when done.

    ``key``: this node's member key (``derive_member_key(master, peer_id)``), or the
    team's master key for an admin (admin requests: :meth:`rotate`).
    ``proxy``: an explicit proxy URL; by default HTTPS_PROXY / HTTP_PROXY / ALL_PROXY are
    honoured (and NO_PROXY, through httpx).
    """

    def __init__(self, url: str, key: bytes, peer_id: str, *, proxy: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) < 16:
            raise ValueError("the bridge key must be at least 16 bytes")
        self.url = url.rstrip("/")
        self.key = bytes(key)
        self.peer_id = peer_id
        self.proxy = proxy
        self.timeout = timeout
        # trust_env=True lets httpx apply NO_PROXY and the *_PROXY variables itself.
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            proxy=proxy,
            trust_env=proxy is None,
            headers={"User-Agent": "teammesh-bridge-client/2"},
            # idle connections dropped well before a server's 5 s keep-alive limit
            # (workerd's): a request sent just as the server closes one is lost
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S),
        )

    async def __aenter__(self) -> BridgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- transport ---------------------------------------------------------------------
    async def request(self, method: str, path: str, body: Any = None, *,
                      params: dict[str, Any] | None = None, signed: bool = True,
                      raw_body: bytes | None = None) -> Any:
        """Send one request; returns the decoded JSON answer."""
        if raw_body is not None:
            data = raw_body
        elif body is None:
            data = b""
        else:
            try:
                data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            except (TypeError, ValueError) as exc:  # task data, not a bug of the caller's
                raise BridgeRejected(0, "unencodable",
                                     f"the request body cannot be sent as JSON: {exc}") from None
        req = self._client.build_request(
            method, path, params=params, content=data or None,
            headers={"Content-Type": "application/json"} if data else None,
        )
        if signed:
            target = req.url.raw_path.decode("ascii")
            req.headers.update(sign_request(self.key, self.peer_id, method, target, data))
        try:
            resp = await self._client.send(req)
        except httpx.TimeoutException as exc:
            raise BridgeUnavailable(f"bridge {self.url} timed out after {self.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise BridgeUnavailable(f"bridge {self.url} is unreachable: {exc}") from exc
        return self._decode(resp)

    def _decode(self, resp: httpx.Response) -> Any:
        try:
            payload = resp.json()
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            payload = None
        if resp.status_code >= 500 or (resp.status_code >= 400 and payload is None):
            message = _error_message(payload) or resp.text[:200] or resp.reason_phrase
            if resp.status_code >= 500:
                raise BridgeUnavailable(f"bridge {self.url} answered {resp.status_code}: {message}")
        if resp.status_code == 429:
            try:
                retry_after = float(resp.headers.get("Retry-After", "1"))
            except ValueError:
                retry_after = 1.0
            raise BridgeRateLimited(
                f"bridge {self.url} rate-limited this peer: {_error_message(payload)}", retry_after)
        if resp.status_code >= 400:
            err = payload.get("error") if isinstance(payload, dict) else None
            code = str(err.get("code", "error")) if isinstance(err, dict) else "error"
            message = _error_message(payload) or resp.text[:200]
            if code == "stale_key":
                epoch = payload.get("epoch") if isinstance(payload, dict) else None
                raise BridgeStaleKey(message, epoch if isinstance(epoch, int) else None)
            raise BridgeRejected(resp.status_code, code, message)
        if resp.status_code >= 300 or payload is None:
            raise BridgeProtocolError(f"bridge {self.url} answered {resp.status_code} without"
                                      " a JSON body", resp.status_code)
        return payload

    # --- API ---------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """``GET /health`` (unsigned): {ok, version, bindings: {queue, cache, mirror}, ...}."""
        result = await self.request("GET", "/health", signed=False)
        if not isinstance(result, dict):
            raise BridgeProtocolError("the bridge's /health answer is not an object")
        return result

    async def submit(self, task_json: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/tasks``: the mesh submit schema (id?, kind, version?, input_b64?,
        input_cid?, params, priority?, submitter?, queue?). Returns the validated task
        JSON: state "done"/"failed" for portable kinds, "queued" for the rest."""
        body = dict(task_json)
        body.setdefault("submitter", self.peer_id)
        result = await self.request("POST", "/v1/tasks", body)
        return check_task(result, body.get("id") if isinstance(body.get("id"), str) else None)

    async def get(self, task_id: str) -> dict[str, Any]:
        """``GET /v1/tasks/{id}``: the validated task JSON."""
        return check_task(await self.request("GET", f"/v1/tasks/{task_id}"), task_id)

    async def list(self, state: str | None = None, *, kind: str | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if kind:
            params["kind"] = kind
        result = await self.request("GET", "/v1/tasks", params=params)
        tasks = result.get("tasks") if isinstance(result, dict) else None
        if not isinstance(tasks, list):
            raise BridgeProtocolError("the bridge's list answer has no 'tasks' list")
        return [check_task(t) for t in tasks]

    async def lease(self, kinds: builtins.list[str] | dict[str, str], max: int = 1,
                    lease_s: float = 60.0) -> builtins.list[dict[str, Any]]:
        """``POST /v1/lease``: up to ``max`` queued tasks of these kinds, highest priority
        first, each with ``input_b64`` and ``params``; finish them with :meth:`complete`
        before ``lease_until`` or they return to the queue. Only this peer may complete
        them."""
        result = await self.request("POST", "/v1/lease",
                                    {"kinds": kinds, "max": max, "lease_s": lease_s})
        tasks = result.get("tasks") if isinstance(result, dict) else None
        if not isinstance(tasks, list):
            raise BridgeProtocolError("the bridge's lease answer has no 'tasks' list")
        return [check_leased_task(t) for t in tasks]

    async def complete(self, task_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/tasks/{id}/result`` with {ok, output, error, signature?}; this peer
        must hold the task's lease (else ``BridgeRejected`` 403 not_lease_holder, 409
        not_leased / lease_expired / already_finished). The bridge records this
        (authenticated) peer as the executor; an ``executor`` field is ignored.

        ``output`` is JSON; bytes must already be in the {"$base64": ...} form
        (``teammesh.node.tasks.service.json_safe``)."""
        body = {k: v for k, v in result.items() if k != "executor"}
        return check_task(await self.request("POST", f"/v1/tasks/{task_id}/result", body),
                          task_id, check_output=False)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """``POST /v1/tasks/{id}/cancel``: this peer submitted it (or holds the master).
        A queued or leased task ends as cancelled; one that already ended is answered as
        it is. ``BridgeRejected`` 403 not_submitter, 404 not_found."""
        return check_task(await self.request("POST", f"/v1/tasks/{task_id}/cancel", {}),
                          task_id, check_output=False)

    async def invalidate_cache(self, prefix: str = "") -> dict[str, Any]:
        """``POST /v1/cache/invalidate``: prefix "" (all), "<kind>" or "<kind>/<version>".
        Returns {"scope", "generation"}."""
        result = await self.request("POST", "/v1/cache/invalidate", {"prefix": prefix})
        if not isinstance(result, dict):
            raise BridgeProtocolError("the bridge's invalidate answer is not an object")
        return result

    async def rotate(self, new_master: bytes, epoch: int) -> None:
        """Admin only (this client's key must be the current master): make ``new_master``
        the team's master bridge key as of ``epoch`` (greater than the current one). From
        then on the bridge derives member keys from ``new_master`` and refuses keys of
        older epochs with ``401 stale_key``. This client then signs with ``new_master``.
        Repeating the same rotation is harmless, also after the bridge already took it
        (then the old key gets stale_key and the rotation is confirmed with the new one).
        Raises :class:`BridgeRejected` ``epoch_conflict`` if the bridge is at this or a
        later epoch with another key, ``admin_only`` if this client's key is a member key."""
        if len(new_master) != BRIDGE_KEY_BYTES:
            raise ValueError(f"the new master key must be {BRIDGE_KEY_BYTES} bytes")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise ValueError("the epoch must be an integer >= 1")
        old_key = self.key
        body = {"epoch": epoch, "key": bytes(new_master).hex()}
        try:
            result = await self.request("POST", "/v1/admin/rotate", body)
        except BridgeStaleKey as exc:
            if exc.epoch != epoch:
                raise BridgeRejected(409, "epoch_conflict",
                                     f"this admin's master key is stale: the bridge is at epoch"
                                     f" {exc.epoch}; get the current master from another admin"
                                     ) from None
            # The bridge is at this epoch already (an earlier attempt went through but its
            # answer was lost?): the same rotation signed with the new master confirms it
            # only if the bridge holds exactly this key.
            self.key = bytes(new_master)
            try:
                result = await self.request("POST", "/v1/admin/rotate", body)
            except BridgeError as again:
                self.key = old_key
                if isinstance(again, BridgeRejected | BridgeStaleKey):
                    raise BridgeRejected(409, "epoch_conflict",
                                         f"the bridge is already at epoch {epoch} with another"
                                         " master key") from None
                raise
        if not isinstance(result, dict) or result.get("epoch") != epoch:
            raise BridgeProtocolError("the bridge did not confirm the rotation's epoch")
        self.key = bytes(new_master)


def _error_message(payload: Any) -> str | None:
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    return None
