"""Client for the teammesh Cloudflare bridge (bridge/, docs/BRIDGE.md).

Every ``/v1`` request is signed with the team bridge key::

    X-Teammesh-Peer:      <member peer id>
    X-Teammesh-Timestamp: <unix seconds>
    X-Teammesh-Nonce:     <random hex, fresh per request>
    X-Teammesh-Signature: hex(HMAC-SHA256(key, METHOD "\\n" PATH_WITH_QUERY "\\n"
                          timestamp "\\n" nonce "\\n" hex(sha256(body))))

The client uses ``httpx.AsyncClient``, which runs under trio. Connection failures,
timeouts, 5xx and 429 answers raise :class:`BridgeUnavailable` (worth a retry or a
circuit breaker; 429 as its subclass :class:`BridgeRateLimited` with ``retry_after``); other
4xx answers raise :class:`BridgeRejected` carrying the bridge's error code and
message (retrying the same request will not help).

The bridge key is a random 32-byte secret the team admin creates with
:func:`new_bridge_key` at team creation and hands to members in the enrollment reply; it
cannot be derived from anything public (see docs/BRIDGE.md, "The team bridge key").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import httpx
from teammesh.protocols.errors import TeammeshError

__all__ = [
    "BRIDGE_KEY_BYTES",
    "BridgeClient",
    "BridgeError",
    "BridgeRateLimited",
    "BridgeRejected",
    "BridgeUnavailable",
    "new_bridge_key",
    "sign_request",
]

BRIDGE_KEY_BYTES = 32
DEFAULT_TIMEOUT_S = 30.0


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


def new_bridge_key() -> bytes:
    """A fresh random team bridge key (32 bytes). The admin makes one per team."""
    return secrets.token_bytes(BRIDGE_KEY_BYTES)


def sign_request(key: bytes, method: str, path_with_query: str, body: bytes, *,
                 timestamp: int | None = None, nonce: str | None = None) -> dict[str, str]:
    """The signature headers (without X-Teammesh-Peer) for one request."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_hex(16)
    message = "\n".join(
        [method.upper(), path_with_query, ts, nonce, hashlib.sha256(body).hexdigest()]
    ).encode()
    mac = hmac.new(key, message, hashlib.sha256).hexdigest()
    return {"X-Teammesh-Timestamp": ts, "X-Teammesh-Nonce": nonce, "X-Teammesh-Signature": mac}


class BridgeClient:
    """Signed requests to one bridge. Use as ``async with BridgeClient(...) as bridge:``
    or call :meth:`aclose` when done.

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
            headers={"User-Agent": "teammesh-bridge-client/1"},
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
            data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        req = self._client.build_request(
            method, path, params=params, content=data or None,
            headers={"Content-Type": "application/json"} if data else None,
        )
        if signed:
            target = req.url.raw_path.decode("ascii")
            req.headers["X-Teammesh-Peer"] = self.peer_id
            req.headers.update(sign_request(self.key, method, target, data))
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
        except ValueError:
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
            raise BridgeRejected(resp.status_code, code, message)
        return payload

    # --- API ---------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """``GET /health`` (unsigned): {ok, version, bindings: {queue, cache, mirror}, ...}."""
        result: dict[str, Any] = await self.request("GET", "/health", signed=False)
        return result

    async def submit(self, task_json: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/tasks``: the mesh submit schema (id?, kind, version?, input_b64?,
        input_cid?, params, priority?, submitter?, queue?). Returns the task JSON: state
        "done"/"failed" for portable kinds, "queued" for the rest."""
        body = dict(task_json)
        body.setdefault("submitter", self.peer_id)
        result: dict[str, Any] = await self.request("POST", "/v1/tasks", body)
        return result

    async def get(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/tasks/{task_id}")
        return result

    async def list(self, state: str | None = None, *, kind: str | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if kind:
            params["kind"] = kind
        result = await self.request("GET", "/v1/tasks", params=params)
        tasks: list[dict[str, Any]] = result["tasks"]
        return tasks

    async def lease(self, kinds: list[str] | dict[str, str], max: int = 1,
                    lease_s: float = 60.0) -> list[dict[str, Any]]:
        """``POST /v1/lease``: up to ``max`` queued tasks of these kinds, highest priority
        first, each with ``input_b64`` and ``params``; finish them with :meth:`complete`
        before ``lease_until`` or they return to the queue."""
        result = await self.request("POST", "/v1/lease",
                                    {"kinds": kinds, "max": max, "lease_s": lease_s})
        tasks: list[dict[str, Any]] = result["tasks"]
        return tasks

    async def complete(self, task_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/tasks/{id}/result`` with {ok, output, error, executor, signature?}.

        ``output`` is JSON; bytes must already be in the {"$base64": ...} form
        (``teammesh.node.tasks.json_safe``)."""
        body = dict(result)
        body.setdefault("executor", self.peer_id)
        answer: dict[str, Any] = await self.request("POST", f"/v1/tasks/{task_id}/result", body)
        return answer

    async def invalidate_cache(self, prefix: str = "") -> dict[str, Any]:
        """``POST /v1/cache/invalidate``: prefix "" (all), "<kind>" or "<kind>/<version>"."""
        result: dict[str, Any] = await self.request("POST", "/v1/cache/invalidate",
                                                    {"prefix": prefix})
        return result


def _error_message(payload: Any) -> str | None:
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    return None
