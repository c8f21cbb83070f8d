"""The control socket: the task calls of the control API as framed msgpack over a Unix
socket in the home (``api.sock``, 0600, the same bearer token in the first frame).

Why a second transport: a sequential submit-and-wait spent about 2 ms of its ~5 ms in
HTTP (httpx, hypercorn and starlette, both ways), more than the trip across the mesh.
One persistent connection with length-prefixed frames costs a tenth of that. HTTP stays
the documented API (OpenAPI, curl, other languages); the Python client uses the socket
when it can reach it and HTTP otherwise. Both call the same functions in ``taskapi``.

Frames (protocols/wire: varint length + msgpack map with ``t`` and ``v``):
  client: {"t": "hello", "token": ...}                      server: {"t": "ok"}
  client: {"t": "call", "id": n, "op": OP, "body": {...}}  server: {"t": "ret", "id": n,
          "ok": true, "body": ...} or {"ok": false, "status": 4xx, "code": ..., "message": ...}
OPs: submit, batch, show, cancel, watch. Calls on one connection run concurrently;
replies carry the call's id.

``watch`` is the futures client's call (teammesh/client.py): its body is ``{"tasks": [...]}``
as for ``batch``; the reply lists each task's id and state in order (a task already
finished, e.g. from the result cache, comes back whole), and every other task comes back
whole once it ends, in ``{"t": "res", "tasks": [...]}`` frames that are not replies to a
call (one frame carries every task that ended since the last one). A connection holds at
most MAX_WATCHED unfinished watched tasks; closing it stops the watching, not the tasks.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from teammesh.node.api.tasks import batch_bodies, op_batch, op_show, op_submit
from teammesh.node.tasks.records import TERMINAL
from teammesh.protocols import wire
from teammesh.protocols.errors import TaskError, TeammeshError

if TYPE_CHECKING:
    from teammesh.node.daemon import Node
    from teammesh.node.tasks.records import TaskRecord

logger = logging.getLogger("teammesh.ctlsock")

SOCKET_NAME = "api.sock"
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # as the HTTP API's body limit
MAX_CALLS_PER_CONNECTION = 256
# Unfinished tasks one connection may watch. The watch channel is sized to it, so the
# scheduler's send_nowait on a task's end can never block (node/tasks/service.py, _finalise).
MAX_WATCHED = 200_000
MAX_ENDED_PER_FRAME = 1000  # ended tasks per "res" frame (each up to ~1.5 KiB plus output)
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


def socket_path(home: Path) -> Path | None:
    """Where the socket goes, or None if the home's path is too long for a Unix socket
    (then clients use HTTP)."""
    path = home / SOCKET_NAME
    return path if len(os.fsencode(path)) <= _UNIX_PATH_MAX else None


def _bind(path: Path) -> socket.socket:
    # A daemon killed with -9 leaves its socket file behind; only one daemon runs per home
    # (api.json and the journal lock say so), so the file is ours to replace.
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


async def serve_control_socket(node: Node, *,
                               task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    path = socket_path(node.home.path)
    if path is None:
        logger.info("no control socket (home path too long); clients use HTTP")
        task_status.started(None)
        await trio.sleep_forever()
    assert path is not None
    try:
        raw = _bind(path)
    except OSError as exc:
        logger.warning("no control socket at %s (%s); clients use HTTP", path, exc)
        task_status.started(None)
        await trio.sleep_forever()
    token = node.home.token().encode()
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(str(path))
            await trio.serve_listeners(
                lambda stream: _Connection(node, stream, token).run(), [listener],
                handler_nursery=nursery)
    finally:
        path.unlink(missing_ok=True)


class _Connection:
    def __init__(self, node: Node, stream: trio.SocketStream, token: bytes) -> None:
        self.node = node
        self.stream = stream
        self.token = token
        self.send_lock = trio.Lock()
        self.calls = trio.Semaphore(MAX_CALLS_PER_CONNECTION)
        self.watched: dict[str, TaskRecord] = {}
        self.ended_send, self.ended_receive = trio.open_memory_channel[str](MAX_WATCHED)

    async def send(self, msg: dict[str, Any]) -> None:
        data = wire.frame_message({"v": wire.WIRE_VERSION, **msg})
        async with self.send_lock:
            await self.stream.send_all(data)

    async def run(self) -> None:
        try:
            async with self.stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._send_ended)
                problem = await self._read_calls(nursery)
                if problem is not None:
                    # a malformed or oversized frame ends this connection, never the daemon
                    logger.info("control socket: dropping a client: %s", problem)
                    with trio.move_on_after(1):
                        await self.send({"t": "err", "message": problem})
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # one client's connection must never take the daemon down
            logger.exception("control socket connection failed")
        finally:
            self._unwatch_all()

    def _unwatch_all(self) -> None:
        # Synchronous, so no task can end between the unwatching and the channel closing
        # (a send to a closed channel inside the scheduler would break it).
        svc = self.node.tasks
        if svc is not None:
            for r in self.watched.values():
                svc.unwatch(r)
        self.watched.clear()
        self.ended_send.close()

    async def _send_ended(self) -> None:
        """Send watched tasks as they end, every task that ended meanwhile in one frame."""
        svc = self.node.tasks
        assert svc is not None
        while True:
            ids = [await self.ended_receive.receive()]
            while True:
                try:
                    ids.append(self.ended_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            tasks = []
            for task_id in ids:
                r = self.watched.pop(task_id, None)
                # a finished task may leave memory before we look (then the journal has it)
                found = r if r is not None else svc.get(task_id)
                if found is not None:
                    tasks.append(found if isinstance(found, dict) else found.to_json())
            for i in range(0, len(tasks), MAX_ENDED_PER_FRAME):
                await self.send({"t": "res", "tasks": tasks[i:i + MAX_ENDED_PER_FRAME]})

    def watch(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        svc = self.node.tasks
        assert svc is not None
        bodies = batch_bodies(body)
        if len(self.watched) + len(bodies) > MAX_WATCHED:
            raise TaskError(f"at most {MAX_WATCHED} unfinished futures per connection;"
                            " wait for some results before submitting more")
        out = []
        for r in svc.submit_many(bodies):
            if r.state in TERMINAL:
                out.append(r.to_json())
            else:
                self.watched[r.id] = r
                svc.watch(r, self.ended_send)
                out.append({"id": r.id, "state": r.state})
        return out

    async def _read_calls(self, nursery: trio.Nursery) -> str | None:
        """Read frames until the client leaves (None) or breaks the protocol (why)."""
        decoder = wire.FrameDecoder(MAX_REQUEST_BYTES)
        authed = False
        try:
            while True:
                data = await self.stream.receive_some(1 << 20)
                if not data:
                    return None
                for frame in decoder.feed(data):
                    msg = wire.unpack(frame, max_bytes=MAX_REQUEST_BYTES)
                    if not authed:
                        token = msg.get("token")
                        if msg["t"] != "hello" or not isinstance(token, str) or \
                                not hmac.compare_digest(token.encode(), self.token):
                            return "missing or wrong token (see api.token in the home)"
                        authed = True
                        await self.send({"t": "ok"})
                        continue
                    if msg["t"] != "call":
                        return f"unexpected frame type {msg['t']!r}"
                    await self.calls.acquire()
                    nursery.start_soon(self.call, msg)
        except TeammeshError as exc:
            return str(exc)

    async def call(self, msg: dict[str, Any]) -> None:
        from teammesh.node.api.body import status_for

        call_id = msg.get("id")
        try:
            result = await self.dispatch(msg.get("op"), msg.get("body"))
            reply = {"t": "ret", "id": call_id, "ok": True, "body": result}
        except TeammeshError as exc:
            status, code = status_for(exc)
            reply = {"t": "ret", "id": call_id, "ok": False, "status": status, "code": code,
                     "message": str(exc)}
        except Exception as exc:  # a bug answers 500 and is logged once, as over HTTP
            logger.exception("control socket call %r failed", msg.get("op"))
            reply = {"t": "ret", "id": call_id, "ok": False, "status": 500, "code": "internal",
                     "message": f"internal error ({type(exc).__name__}: {exc}); see the"
                                " node's log"}
        finally:
            self.calls.release()
        try:
            await self.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def dispatch(self, op: Any, body: Any) -> Any:
        svc = self.node.tasks
        assert svc is not None
        if not isinstance(body, dict):
            raise TaskError("call body must be a map")
        if op == "submit":
            return await op_submit(svc, body)
        if op == "batch":
            if body.get("stream"):
                raise TaskError("streamed batches are served over HTTP only")
            return await op_batch(svc, body)
        if op == "show":
            wait = body.get("wait")
            if wait is not None and not isinstance(wait, (int, float)):
                raise TaskError("wait must be a number of seconds")
            return await op_show(svc, wire.field_str(body, "id"), wait)
        if op == "cancel":
            return svc.cancel(wire.field_str(body, "id")).to_json()
        if op == "watch":
            return self.watch(body)
        raise TaskError(f"unknown control call {op!r} (known: submit, batch, show, cancel,"
                        " watch)")
