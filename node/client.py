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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from teammesh.protocols.errors import NodeNotRunning, TaskError, TeammeshError

DEFAULT_TIMEOUT_S = 30.0


def _locate(home: str | Path) -> tuple[str, str]:
    home = Path(home).expanduser()
    api_file = home / "api.json"
    try:
        url = json.loads(api_file.read_text())["url"]
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
    return url, token


def _raise_for(resp: httpx.Response) -> Any:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code >= 400:
        message = (body or {}).get("error", {}).get("message") if isinstance(body, dict) else None
        code = (body or {}).get("error", {}).get("code") if isinstance(body, dict) else None
        text = message or resp.text[:200] or f"HTTP {resp.status_code}"
        if code in ("unknown_kind", "task_error", "no_capacity"):
            raise TaskError(text)
        raise TeammeshError(text)
    return body


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
    def __init__(self, url: str, token: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=timeout,
                                  headers={"authorization": f"Bearer {token}"})

    @classmethod
    def from_home(cls, home: str | Path, timeout: float = DEFAULT_TIMEOUT_S) -> Client:
        return cls(*_locate(home), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
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
        try:
            with self._http.stream("POST", "/v1/tasks/batch",
                                   json={"tasks": tasks, "stream": True},
                                   timeout=httpx.Timeout(30, read=None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _raise_for(resp)
                for line in resp.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise NodeNotRunning(f"lost the node at {self.url}: {exc}") from exc

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
        return cls(*_locate(home), timeout=timeout)

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
