"""Python client for a node's control API, synchronous and async (trio or asyncio).

    from teammesh.client import Client
    with Client.from_home("~/.local/share/teammesh") as c:
        print(c.status()["peer_id"])

    async with AsyncClient.from_home(home) as c:   # works under trio and asyncio
        task = await c.submit("hash.sha256", input=b"abc", wait=True)
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from teammesh.protocols import wire
from teammesh.protocols.errors import NodeNotRunning, TaskError, TeammeshError

DEFAULT_TIMEOUT_S = 30.0
# "http" forces HTTP for everything (for comparing the two in scripts/bench)
TRANSPORT_ENV = "TEAMMESH_API_TRANSPORT"


def _locate(home: str | Path) -> tuple[str, str, str | None]:
    home = Path(home).expanduser()
    api_file = home / "api.json"
    try:
        info = json.loads(api_file.read_text())
        url = info["url"]
        sock = info.get("socket")
        token = (home / "api.token").read_text().strip()
    except FileNotFoundError as exc:
        if not (home / "identity.key").exists():
            raise NodeNotRunning(
                f"{home} is not a teammesh home; run `teammesh --home {home} init`") from exc
        raise NodeNotRunning(
            f"the node in {home} is not running; start it with `teammesh --home {home} up`"
        ) from exc
    except (ValueError, KeyError) as exc:
        raise NodeNotRunning(f"{api_file} is damaged; restart the node") from exc
    return url, token, sock if isinstance(sock, str) else None


def _raise_error(code: Any, text: str) -> None:
    if code in ("unknown_kind", "task_error", "no_capacity"):
        raise TaskError(text)
    raise TeammeshError(text)


def _raise_for(resp: httpx.Response) -> Any:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code >= 400:
        message = (body or {}).get("error", {}).get("message") if isinstance(body, dict) else None
        code = (body or {}).get("error", {}).get("code") if isinstance(body, dict) else None
        _raise_error(code, message or resp.text[:200] or f"HTTP {resp.status_code}")
    return body


_TASK_PATH = re.compile(r"^/v1/tasks/([A-Za-z0-9_.-]{1,128})(/cancel)?$")


def _socket_call(method: str, path: str, kw: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The control-socket call for an HTTP request, if the socket serves it."""
    body = kw.get("json")
    if set(kw) - {"json", "params", "timeout"}:
        return None
    if method == "POST" and path == "/v1/tasks" and isinstance(body, dict):
        return "submit", body
    if method == "POST" and path == "/v1/tasks/batch" and isinstance(body, dict) \
            and not body.get("stream"):
        return "batch", body
    m = _TASK_PATH.match(path)
    if m is None or m.group(1) == "batch":
        return None
    if method == "GET" and not m.group(2):
        params = kw.get("params") or {}
        wait = params.get("wait")
        if set(params) - {"wait"} or not (wait is None or isinstance(wait, (int, float))):
            return None
        return "show", {"id": m.group(1), "wait": wait}
    if method == "POST" and m.group(2) and body is None:
        return "cancel", {"id": m.group(1)}
    return None


class _ControlSocket:
    """Blocking client of the daemon's control socket (node/ctlsock.py): one connection,
    one call at a time, reconnected after any failure."""

    def __init__(self, path: str, token: str, timeout: float) -> None:
        self.path, self.token, self.timeout = path, token, timeout
        self.sock: socket.socket | None = None
        self.decoder = wire.FrameDecoder(1 << 31)
        self.next_id = 0
        self.lock = threading.Lock()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            self.decoder = wire.FrameDecoder(1 << 31)
            sock.sendall(wire.frame_message({"t": "hello", "v": 1, "token": self.token}))
            reply = self._read(sock)
        except BaseException:
            sock.close()
            raise
        if reply.get("t") != "ok":
            sock.close()
            raise TeammeshError(f"control socket refused us: {reply.get('message')}")
        return sock

    def _read(self, sock: socket.socket) -> wire.Message:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the node closed the control socket")
            frames = self.decoder.feed(data)
            if frames:
                # one call in flight, so at most one reply frame arrives
                return wire.unpack(frames[0], max_bytes=1 << 31)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def call(self, op: str, body: dict[str, Any]) -> Any:
        with self.lock:
            if self.sock is None:
                self.sock = self._connect()
            self.next_id += 1
            try:
                # a waiting call lasts as long as the task; the node bounds it
                self.sock.settimeout(None if body.get("wait") else self.timeout)
                self.sock.sendall(wire.frame_message(
                    {"t": "call", "v": 1, "id": self.next_id, "op": op, "body": body}))
                reply = self._read(self.sock)
            except BaseException:
                self.close()  # a reply may still be on its way: never reuse this stream
                raise
        if reply.get("t") == "err":
            self.close()
            raise TeammeshError(f"control socket: {reply.get('message')}")
        if reply.get("id") != self.next_id:
            self.close()
            raise TeammeshError("control socket: reply to another call")
        if not reply.get("ok"):
            _raise_error(reply.get("code"), str(reply.get("message")))
        return reply.get("body")


def decode_output(value: Any) -> Any:
    """Undo the task JSON convention for bytes: {"$base64": ...} back to bytes."""
    if isinstance(value, dict) and set(value) == {"$base64"}:
        return base64.b64decode(value["$base64"])
    return value


def encode_input(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _submit_body(kind: str, input: bytes | None, params: dict[str, Any] | None,
                 options: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": kind, "params": params or {}}
    if input is not None:
        body["input_b64"] = encode_input(input)
    body.update({k: v for k, v in options.items() if v is not None})
    return body


class Client:
    """Synchronous client. Task calls (submit, batch, show, cancel) go over the daemon's
    control socket when it has one (a tenth of HTTP's cost per call); everything else,
    and everything when ``TEAMMESH_API_TRANSPORT=http``, over HTTP."""

    def __init__(self, url: str, token: str, timeout: float = DEFAULT_TIMEOUT_S,
                 socket_path: str | None = None) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=timeout,
                                  headers={"authorization": f"Bearer {token}"})
        self._ctl: _ControlSocket | None = None
        if socket_path and os.environ.get(TRANSPORT_ENV, "auto") != "http":
            self._ctl = _ControlSocket(socket_path, token, timeout)

    @classmethod
    def from_home(cls, home: str | Path, timeout: float = DEFAULT_TIMEOUT_S) -> Client:
        url, token, sock = _locate(home)
        return cls(url, token, timeout=timeout, socket_path=sock)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        if self._ctl is not None:
            self._ctl.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        call = _socket_call(method, path, kw) if self._ctl is not None else None
        if call is not None and self._ctl is not None:
            try:
                return self._ctl.call(*call)
            except (FileNotFoundError, ConnectionRefusedError):
                self._ctl = None  # the node serves no socket (any more): HTTP from now on
            except OSError as exc:
                raise NodeNotRunning(f"lost the node at {self._ctl.path}: {exc}") from exc
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise NodeNotRunning(f"cannot reach the node at {self.url}: {exc}") from exc
        return _raise_for(resp)

    def status(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/status"))

    def peers(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/peers"))

    def submit(self, kind: str, input: bytes | None = None,
               params: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/tasks",
                                 json=_submit_body(kind, input, params, options)))

    def submit_batch(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self.request("POST", "/v1/tasks/batch", json={"tasks": tasks}))

    def task(self, task_id: str, wait: float | None = None) -> dict[str, Any]:
        params = {"wait": wait} if wait is not None else None
        timeout = None if wait is None else wait + 30
        return dict(self.request("GET", f"/v1/tasks/{task_id}", params=params,
                                 timeout=timeout))

    def stream_lines(self, method: str, path: str, **kw: Any) -> Iterator[dict[str, Any]]:
        """An NDJSON response, one parsed line at a time (progress, then a result)."""
        try:
            with self._http.stream(method, path, timeout=httpx.Timeout(30, read=None),
                                   **kw) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for(resp)
                for line in resp.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise NodeNotRunning(f"lost the node at {self.url}: {exc}") from exc

    def stream_batch(self, tasks: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Submit a batch; yield each task's JSON as it finishes (completion order)."""
        return self.stream_lines("POST", "/v1/tasks/batch", json={"tasks": tasks, "stream": True})

    def tasks(self, **filters: Any) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/tasks", params=filters))

    def cancel(self, task_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/tasks/{task_id}/cancel"))

    def kinds(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/kinds"))


class AsyncClient:
    def __init__(self, url: str, token: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout,
                                       headers={"authorization": f"Bearer {token}"})

    @classmethod
    def from_home(cls, home: str | Path, timeout: float = DEFAULT_TIMEOUT_S) -> AsyncClient:
        url, token, _ = _locate(home)
        return cls(url, token, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise NodeNotRunning(f"cannot reach the node at {self.url}: {exc}") from exc
        return _raise_for(resp)

    async def status(self) -> dict[str, Any]:
        return dict(await self.request("GET", "/v1/status"))

    async def peers(self) -> list[dict[str, Any]]:
        return list(await self.request("GET", "/v1/peers"))

    async def submit(self, kind: str, input: bytes | None = None,
                     params: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        return dict(await self.request("POST", "/v1/tasks",
                                       json=_submit_body(kind, input, params, options)))

    async def submit_batch(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(await self.request("POST", "/v1/tasks/batch", json={"tasks": tasks}))

    async def task(self, task_id: str, wait: float | None = None) -> dict[str, Any]:
        params = {"wait": wait} if wait is not None else None
        return dict(await self.request("GET", f"/v1/tasks/{task_id}", params=params))

    async def tasks(self, **filters: Any) -> list[dict[str, Any]]:
        return list(await self.request("GET", "/v1/tasks", params=filters))

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return dict(await self.request("POST", f"/v1/tasks/{task_id}/cancel"))
