"""Python client for a node's control API, synchronous and async (trio or asyncio).

    from teammesh.client import Client
    with Client.from_home("~/.local/share/teammesh") as c:
        print(c.status()["peer_id"])
        fut = c.future("base64.encode", b"abc")        # returns at once
        print(fut.result())                             # 'YWJj'
        outs = list(c.executor().map("base64.encode", [b"a", b"b"]))

    async with AsyncClient.from_home(home) as c:   # works under trio and asyncio
        task = await c.submit("hash.sha256", input=b"abc", wait=True)
        outs = await c.gather(c.map("base64.encode", [b"a", b"b"]))

Futures ride one control-socket connection per client (node/api/ctlsock.py, op ``watch``):
submissions made while the previous frame was on its way go out together as one batch
frame, and the node streams each task back as it ends. Errors: a failed task raises
TaskFailed (a TaskError carrying the node's reason), a cancelled one TaskCancelled (also a
concurrent.futures.CancelledError); closing the client with futures pending settles them
with ClientClosed (the tasks go on on the node).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import json
import os
import re
import selectors
import socket
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
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
    """Blocking client of the daemon's control socket (node/api/ctlsock.py): one connection,
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


# --- futures: submissions coalesced into batch frames, results streamed back ------------

ENDED = frozenset({"done", "failed", "cancelled"})
# A frame of submissions stays well under the socket's 64 MiB request limit, and a batch
# this size is one journal transaction on the node.
MAX_TASKS_PER_FRAME = 2000
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_REPLY_BYTES = 1 << 31


class TaskFailed(TaskError):
    """A task ended in the failed state; ``reason`` is the node's error text for it.

    Part of the tree in protocols/errors.py: TeammeshError > TaskError > TaskFailed."""

    def __init__(self, message: str, *, task_id: str | None = None, reason: str = "",
                 record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.reason = reason
        self.record = record


class TaskCancelled(TaskError, concurrent.futures.CancelledError):
    """The task was cancelled on the node (by this client or anyone else). Also a
    ``concurrent.futures.CancelledError``, so code written for executors catches it."""

    def __init__(self, message: str, *, task_id: str | None = None,
                 record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.record = record


class ClientClosed(TeammeshError):
    """The client was closed while the future was pending. The task itself goes on on
    the node: read it with ``Client.task(id)``."""


def _outcome(record: dict[str, Any]) -> tuple[Any, BaseException | None]:
    """A finished task's JSON -> (output, None) or (None, the error to raise)."""
    state, task_id = record.get("state"), record.get("id")
    if state == "done":
        return decode_output(record.get("output")), None
    if state == "cancelled":
        return None, TaskCancelled(f"task {task_id} ({record.get('kind')}) was cancelled",
                                   task_id=task_id, record=record)
    reason = str(record.get("error") or "no reason given")
    return None, TaskFailed(f"task {task_id} ({record.get('kind')}) failed: {reason}",
                            task_id=task_id, reason=reason, record=record)


def _call_error(reply: dict[str, Any]) -> TeammeshError:
    code, text = reply.get("code"), str(reply.get("message"))
    if code in ("unknown_kind", "task_error", "no_capacity"):
        return TaskError(text)
    return TeammeshError(text)


class _Handle(Protocol):
    """What the session settles: a future of either client."""

    def _acked(self, task_id: str) -> None: ...

    def _settle(self, record: dict[str, Any] | None, exc: BaseException | None) -> None: ...


Action = Callable[[], None]
Reply = Callable[[dict[str, Any]], None]


class _Session:
    """The futures protocol on one control-socket connection, without I/O (both clients
    drive it): queued submissions out as ``watch`` frames, replies and ``res`` frames in.

    ``feed`` and ``fail_all`` return the settling as actions for the caller to run outside
    its lock, since settling a future runs the user's done-callbacks."""

    def __init__(self, token: str) -> None:
        self.decoder = wire.FrameDecoder(MAX_REPLY_BYTES)
        self.out: list[bytes] = [wire.frame_message({"t": "hello", "v": 1, "token": token})]
        self.authed = False
        self.queued: list[tuple[dict[str, Any], _Handle, bool]] = []
        self.calls: dict[int, list[tuple[dict[str, Any], _Handle, bool]]] = {}  # watch
        self.replies: dict[int, Reply | None] = {}  # other calls (cancel)
        self.watching: dict[str, _Handle] = {}
        self.early: dict[str, dict[str, Any]] = {}  # results that beat their call's reply
        self.cancel_on_ack: set[_Handle] = set()
        self.next_call = 0
        self.failed: BaseException | None = None

    def queue(self, body: dict[str, Any], handle: _Handle) -> None:
        if self.failed is not None:
            raise self.failed
        self.queued.append((body, handle, False))

    def unqueue(self, handle: _Handle) -> bool:
        for i, (_, h, _alone) in enumerate(self.queued):
            if h is handle:
                del self.queued[i]
                return True
        return False

    def call(self, op: str, body: dict[str, Any], on_reply: Reply | None) -> None:
        self.next_call += 1
        self.replies[self.next_call] = on_reply
        self.out.append(wire.frame_message(
            {"t": "call", "v": 1, "id": self.next_call, "op": op, "body": body}))

    def cancel(self, handle: _Handle, task_id: str | None) -> Action | None:
        """Cancel on the node once we know the task's id; an unsent one never leaves."""
        if self.unqueue(handle):
            return functools.partial(handle._settle, None, TaskCancelled(
                "cancelled before it was sent to the node"))
        if task_id is None:
            self.cancel_on_ack.add(handle)
        elif task_id in self.watching:
            self.call("cancel", {"id": task_id}, None)
        return None

    def take_output(self) -> bytes:
        while self.queued:
            n = size = 0
            # a submission sent alone (after its batch was refused) goes in a frame of one
            while n < len(self.queued) and n < MAX_TASKS_PER_FRAME and size < MAX_FRAME_BYTES \
                    and not (n and (self.queued[n][2] or self.queued[0][2])):
                size += len(self.queued[n][0].get("input_b64") or "")
                n += 1
            chunk = self.queued[:n]
            del self.queued[:n]
            self.next_call += 1
            self.calls[self.next_call] = chunk
            self.out.append(wire.frame_message(
                {"t": "call", "v": 1, "id": self.next_call, "op": "watch",
                 "body": {"tasks": [b for b, _, _ in chunk]}}))
        data = b"".join(self.out)
        self.out.clear()
        return data

    def feed(self, data: bytes) -> list[Action]:
        """Raises TeammeshError when the node ends the conversation."""
        actions: list[Action] = []
        for raw in self.decoder.feed(data):
            msg = wire.unpack(raw, max_bytes=MAX_REPLY_BYTES)
            t = msg.get("t")
            if t == "res":
                for record in msg.get("tasks") or ():
                    handle = self.watching.pop(record.get("id"), None)
                    if handle is None:
                        self.early[record.get("id")] = record
                    else:
                        actions.append(functools.partial(handle._settle, record, None))
            elif t == "ret":
                actions += self._reply(msg)
            elif t == "ok" and not self.authed:
                self.authed = True
            elif t == "err":
                raise TeammeshError(f"control socket: {msg.get('message')}")
            else:
                raise TeammeshError(f"control socket: unexpected frame {t!r}")
        return actions

    def _reply(self, msg: dict[str, Any]) -> list[Action]:
        call_id = msg.get("id")
        if not isinstance(call_id, int) or not (call_id in self.calls
                                                or call_id in self.replies):
            raise TeammeshError(f"control socket: a reply to no call of ours ({call_id!r})")
        if call_id in self.replies:
            on_reply = self.replies.pop(call_id)
            return [] if on_reply is None else [functools.partial(on_reply, msg)]
        chunk = self.calls.pop(call_id)
        actions: list[Action] = []
        if not msg.get("ok"):
            if len(chunk) > 1 and msg.get("code") in ("task_error", "unknown_kind"):
                # one bad submission refuses its whole batch: send each alone, so only
                # the bad ones fail (the node refused them all, so none runs twice)
                self.queued[:0] = [(b, h, True) for b, h, _ in chunk]
                return actions
            exc = _call_error(msg)
            return [functools.partial(h._settle, None, exc) for _, h, _ in chunk]
        entries = msg.get("body") or []
        for (_, handle, _alone), entry in zip(chunk, entries, strict=True):
            task_id = entry["id"]
            actions.append(functools.partial(handle._acked, task_id))
            if entry.get("state") in ENDED:
                actions.append(functools.partial(handle._settle, entry, None))
                continue
            early = self.early.pop(task_id, None)
            if early is not None:
                actions.append(functools.partial(handle._settle, early, None))
                continue
            self.watching[task_id] = handle
            if handle in self.cancel_on_ack:
                self.cancel_on_ack.discard(handle)
                self.call("cancel", {"id": task_id}, None)
        return actions

    def fail_all(self, exc: BaseException) -> list[Action]:
        """Every future still pending gets ``exc``; later submissions raise it."""
        self.failed = exc
        handles = [h for _, h, _ in self.queued]
        handles += self.watching.values()
        actions: list[Action] = []
        for chunk in self.calls.values():
            handles += [h for _, h, _ in chunk]
        for on_reply in self.replies.values():
            if on_reply is not None:
                actions.append(functools.partial(on_reply, {"ok": False, "code": "closed",
                                                            "message": str(exc)}))
        self.queued.clear()
        self.watching.clear()
        self.calls.clear()
        self.replies.clear()
        self.cancel_on_ack.clear()
        return actions + [functools.partial(h._settle, None, exc) for h in handles]


def _run_all(actions: list[Action]) -> None:
    for act in actions:
        act()


class TaskFuture(concurrent.futures.Future[Any]):
    """One task on the team: a standard ``concurrent.futures.Future`` of its output.

    ``result()`` returns the task's output (bytes for byte outputs), or raises TaskFailed
    (with the node's reason), TaskCancelled, ClientClosed or NodeNotRunning. ``cancel()``
    cancels the task on the node too. ``id`` is the node's task id (it waits for the
    node's acknowledgement, a few milliseconds after the submission is sent)."""

    def __init__(self, io: _SyncIO, timeout: float) -> None:
        super().__init__()
        self._io = io
        self._timeout = timeout
        self._task_id: str | None = None
        self._id_known = threading.Event()
        self._settled = False
        self._settle_lock = threading.Lock()
        self._record: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<TaskFuture {self._task_id or '(not acknowledged)'} {self._state}>"

    @property
    def id(self) -> str:
        if not self._id_known.wait(self._timeout):
            raise TeammeshError(f"the node did not acknowledge the submission in"
                                f" {self._timeout} s; is it overloaded?")
        if self._task_id is None:
            exc = self.exception(0)
            raise exc if exc is not None else TeammeshError("the task was never submitted")
        return self._task_id

    def record(self, timeout: float | None = None) -> dict[str, Any]:
        """The whole task (state, executed_by, attempts, timings) once it has ended."""
        try:
            self.result(timeout)
        except (TaskFailed, TaskCancelled):
            pass
        except concurrent.futures.CancelledError:
            pass
        if self._record is None:
            raise TeammeshError("no record: the task never reached the node, or the"
                                " connection was lost")
        return self._record

    def cancel(self) -> bool:
        """Cancel the task: locally, and on the node unless it already ended there.
        Returns False if the future has already settled."""
        if not super().cancel():
            return False
        self._io.cancel(self)
        return True

    def _acked(self, task_id: str) -> None:
        self._task_id = task_id
        self._id_known.set()

    def _settle(self, record: dict[str, Any] | None, exc: BaseException | None) -> None:
        with self._settle_lock:
            if self._settled:
                return
            self._settled = True
        if record is not None:
            self._record = record
            self._task_id = self._task_id or record.get("id")
            value, exc = _outcome(record)
        else:
            value = None
        self._id_known.set()
        if not self.set_running_or_notify_cancel():
            return  # cancelled here first: waiters are notified now
        if exc is None:
            self.set_result(value)
        else:
            self.set_exception(exc)


class _SyncIO:
    """The futures connection of a sync Client: one socket and one background thread
    (selector loop) that sends queued submissions and settles futures as results come.
    Started on the first future, stopped and joined by ``Client.close``."""

    def __init__(self, path: str, token: str, timeout: float) -> None:
        self.path = path
        self.session = _Session(token)
        self.lock = threading.Lock()
        self.woken = False
        self.stopping = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise NodeNotRunning(f"cannot reach the node's control socket {path}: {exc};"
                                 " is the node running?") from exc
        self.sock = sock
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.thread = threading.Thread(target=self._run, name="teammesh-client-io",
                                       daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.session.failed is None

    def _wake(self) -> None:
        # under self.lock: one wake byte per round of the I/O thread is enough
        if not self.woken:
            self.woken = True
            # a full pipe wakes the thread anyway; a closed one means the thread has ended
            with contextlib.suppress(OSError):
                self.wake_w.send(b"\0")

    def submit(self, body: dict[str, Any], fut: TaskFuture) -> None:
        with self.lock:
            self.session.queue(body, fut)
            self._wake()

    def cancel(self, fut: TaskFuture) -> None:
        with self.lock:
            act = self.session.cancel(fut, fut._task_id)
            self._wake()
        if act is not None:
            act()

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self._wake()
        if self.thread is not threading.current_thread():
            self.thread.join()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self.wake_r, selectors.EVENT_READ)
        out = bytearray()
        writing = False
        failure: BaseException | None = None
        try:
            while True:
                for key, mask in sel.select():
                    if key.fileobj is self.wake_r:
                        with contextlib.suppress(BlockingIOError):
                            self.wake_r.recv(4096)
                    elif mask & selectors.EVENT_READ:
                        data = self.sock.recv(1 << 20)
                        if not data:
                            raise ConnectionError("the node closed the control socket")
                        with self.lock:
                            actions = self.session.feed(data)
                        _run_all(actions)
                with self.lock:
                    self.woken = False
                    if self.stopping:
                        break
                    out += self.session.take_output()
                if out:
                    with contextlib.suppress(BlockingIOError):
                        del out[:self.sock.send(out)]
                if bool(out) != writing:
                    writing = bool(out)
                    sel.modify(self.sock, selectors.EVENT_READ | (
                        selectors.EVENT_WRITE if writing else 0))
        except (OSError, TeammeshError) as exc:
            failure = exc
        except Exception as exc:
            # a bug here must not leave every future pending forever: fail them, then raise
            failure = TeammeshError(f"the client's I/O thread failed ({exc!r}); please"
                                    " report it")
            raise
        finally:
            sel.close()
            self.sock.close()
            self.wake_r.close()
            self.wake_w.close()
            if failure is None:
                exc_out: BaseException = ClientClosed(
                    "the client was closed before the task ended; the task goes on on the"
                    " node (read it with Client.task(id))")
            elif isinstance(failure, TeammeshError):
                exc_out = failure
            else:
                exc_out = NodeNotRunning(
                    f"lost the node at {self.path}: {failure}; its tasks may still finish"
                    " (read them with Client.task(id))")
            with self.lock:
                actions = self.session.fail_all(exc_out)
            _run_all(actions)


class TeamExecutor(concurrent.futures.Executor):
    """``concurrent.futures.Executor`` over the team: ``submit(kind, input, params=None,
    **options)`` returns a TaskFuture (a standard Future), so ``executor.map(kind,
    inputs)`` runs each input as a task. ``shutdown`` does not close the client."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._shutdown = False
        self._outstanding: set[TaskFuture] = set()
        self._lock = threading.Lock()

    def submit(self, fn: str, /, *args: Any, **kwargs: Any  # type: ignore[override]
               ) -> TaskFuture:
        """Args: fn is the task kind; then input (bytes or None) and params (dict)."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
        fut = self._client.future(fn, *args, **kwargs)
        with self._lock:
            self._outstanding.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._outstanding.discard(fut)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._outstanding)
        if cancel_futures:
            for f in pending:
                f.cancel()
        if wait:
            concurrent.futures.wait(pending)


class Client:
    """Synchronous client. Task calls (submit, batch, show, cancel) go over the daemon's
    control socket when it has one (a tenth of HTTP's cost per call); everything else,
    and everything when ``TEAMMESH_API_TRANSPORT=http``, over HTTP.

    Futures (``future``, ``map``, ``executor``) always use the control socket: one
    connection and one background thread per client, started with the first future and
    stopped by ``close()``; submissions made meanwhile go out together as one batch, and
    each result comes back as its task ends."""

    def __init__(self, url: str, token: str, timeout: float = DEFAULT_TIMEOUT_S,
                 socket_path: str | None = None) -> None:
        self.url = url
        self._token = token
        self._timeout = timeout
        self._socket_path = socket_path
        self._http = httpx.Client(base_url=url, timeout=timeout,
                                  headers={"authorization": f"Bearer {token}"})
        self._ctl: _ControlSocket | None = None
        if socket_path and os.environ.get(TRANSPORT_ENV, "auto") != "http":
            self._ctl = _ControlSocket(socket_path, token, timeout)
        self._io: _SyncIO | None = None
        self._io_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_home(cls, home: str | Path, timeout: float = DEFAULT_TIMEOUT_S) -> Client:
        url, token, sock = _locate(home)
        return cls(url, token, timeout=timeout, socket_path=sock)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the futures thread. Futures still pending raise
        ClientClosed; their tasks go on on the node."""
        with self._io_lock:
            self._closed = True
            io, self._io = self._io, None
        if io is not None:
            io.close()
        self._http.close()
        if self._ctl is not None:
            self._ctl.close()

    # --- futures ---------------------------------------------------------------------
    def _futures_io(self) -> _SyncIO:
        with self._io_lock:
            if self._closed:
                raise ClientClosed("this client is closed; make a new one")
            if self._io is None or not self._io.alive:
                if self._socket_path is None:
                    raise TeammeshError(
                        "futures need the node's control socket (api.sock in its home), and"
                        " this node serves none (its home path is too long for a Unix"
                        " socket): use a shorter --home, or submit_batch")
                if self._io is not None:
                    self._io.close()
                self._io = _SyncIO(self._socket_path, self._token, self._timeout)
            return self._io

    def future(self, kind: str, input: bytes | None = None,
               params: dict[str, Any] | None = None, **options: Any) -> TaskFuture:
        """Submit a task and return at once with its future.

        Args:
            kind: the task kind (``teammesh kinds`` lists them).
            input: the task's input bytes (inline, at most 4 MiB; larger files by CID
                with ``input_cid=...``).
            params: the kind's parameters.
            **options: priority, where, replicas, quorum, timeout_s, no_cache, tag,
                input_cid, version (as for ``submit``).

        Returns:
            A TaskFuture; ``.result()`` is the task's output.

        Raises:
            NodeNotRunning: the node's control socket cannot be reached.
            ClientClosed: the client is closed.
        """
        options.pop("wait", None)
        io = self._futures_io()
        fut = TaskFuture(io, self._timeout)
        io.submit(_submit_body(kind, input, params, options), fut)
        return fut

    def map(self, kind: str, inputs: Iterable[bytes | None],
            params: dict[str, Any] | None = None, **options: Any) -> list[TaskFuture]:
        """One future per input, in order (all submitted together)."""
        return [self.future(kind, x, params, **options) for x in inputs]

    @staticmethod
    def gather(futures: Iterable[TaskFuture], *, return_exceptions: bool = False,
               timeout: float | None = None) -> list[Any]:
        """The futures' results in order. The first failure raises, unless
        ``return_exceptions``, which puts each error in its place instead."""
        out: list[Any] = []
        for f in futures:
            if return_exceptions:
                try:
                    out.append(f.result(timeout))
                except (TeammeshError, concurrent.futures.CancelledError) as exc:
                    out.append(exc)
            else:
                out.append(f.result(timeout))
        return out

    @staticmethod
    def as_completed(futures: Iterable[TaskFuture],
                     timeout: float | None = None) -> Iterator[TaskFuture]:
        """Each future once, as it settles (``concurrent.futures.as_completed``)."""
        for f in concurrent.futures.as_completed(list(futures), timeout):
            assert isinstance(f, TaskFuture)
            yield f

    def executor(self) -> TeamExecutor:
        """A ``concurrent.futures.Executor`` whose ``submit(kind, input, **options)``
        runs a task on the team: ``list(client.executor().map("base64.encode", inputs))``.
        """
        return TeamExecutor(self)

    # --- one call at a time ----------------------------------------------------------
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
        """Submit one task; its JSON (with ``wait=True`` or a number of seconds, once it
        has ended or the wait is over).

        Args:
            kind: the task kind (``teammesh kinds`` lists them).
            input: the task's input bytes (inline, at most 4 MiB).
            params: the kind's parameters.
            **options: priority; where ("any", "local", "peers", "bridge"); replicas
                (run it on N distinct members, 1-16); quorum (done when K of those agree,
                1 to replicas; default: all of them); timeout_s; no_cache; tag;
                input_cid; version; wait. None values are left out.

        Raises:
            TaskError: the node refused it (the message says which option and why).
        """
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




class AsyncTaskFuture:
    """One task on the team, for async code (trio or asyncio): ``await fut`` (or ``await
    fut.result(timeout)``) gives its output or raises as TaskFuture.result does. Bound waits at the call site
    (``with trio.fail_after(10): out = await fut``)."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._acked_event = anyio.Event()
        self._task_id: str | None = None
        self._value: Any = None
        self._exc: BaseException | None = None
        self._record: dict[str, Any] | None = None
        self._callbacks: list[Callable[[AsyncTaskFuture], None]] = []
        self._cancel: Callable[[AsyncTaskFuture], None] | None = None

    def __repr__(self) -> str:
        state = "pending" if not self.done() else "failed" if self._exc else "done"
        return f"<AsyncTaskFuture {self._task_id or '(not acknowledged)'} {state}>"

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()

    @property
    def id(self) -> str | None:
        """The node's task id, once the node acknowledged the submission (else None;
        ``await fut.submitted()`` waits for it)."""
        return self._task_id

    async def submitted(self) -> str:
        """Wait for the node's acknowledgement; the task id."""
        await self._acked_event.wait()
        if self._task_id is None:
            assert self._exc is not None
            raise self._exc
        return self._task_id

    def done(self) -> bool:
        return self._event.is_set()

    async def result(self) -> Any:
        """The task's output (bound the wait with trio.fail_after / anyio.fail_after)."""
        await self._event.wait()
        if self._exc is not None:
            raise self._exc
        return self._value

    async def exception(self) -> BaseException | None:
        await self._event.wait()
        return self._exc

    async def record(self) -> dict[str, Any]:
        """The whole task (state, executed_by, attempts, timings) once it has ended."""
        await self.exception()
        if self._record is None:
            raise TeammeshError("no record: the task never reached the node, or the"
                                " connection was lost")
        return self._record

    def cancel(self) -> bool:
        """Cancel the task here at once, and on the node unless it already ended there.
        Returns False if the future has already settled."""
        if self.done():
            return False
        if self._cancel is not None:
            self._cancel(self)
        self._settle(None, TaskCancelled(f"task {self._task_id or ''} was cancelled"
                                         " by this client".replace("  ", " "),
                                         task_id=self._task_id))
        return True

    def add_done_callback(self, fn: Callable[[AsyncTaskFuture], None]) -> None:
        if self.done():
            fn(self)
        else:
            self._callbacks.append(fn)

    def _acked(self, task_id: str) -> None:
        self._task_id = task_id
        self._acked_event.set()

    def _settle(self, record: dict[str, Any] | None, exc: BaseException | None) -> None:
        if self._event.is_set():
            return
        if record is not None:
            self._record = record
            self._task_id = self._task_id or record.get("id")
            self._value, exc = _outcome(record)
        self._exc = exc
        self._event.set()
        self._acked_event.set()
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


class AsyncClient:
    """Async client, under trio or asyncio (through anyio). One-call methods go over
    HTTP. Futures (``future``, ``map``) use the control socket, read by one background
    task that the ``async with`` block owns: use the client as ``async with``."""

    def __init__(self, url: str, token: str, timeout: float = DEFAULT_TIMEOUT_S,
                 socket_path: str | None = None) -> None:
        self.url = url
        self._token = token
        self._socket_path = socket_path
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout,
                                       headers={"authorization": f"Bearer {token}"})
        self._tg: anyio.abc.TaskGroup | None = None
        self._session: _Session | None = None
        self._wake: anyio.Event | None = None
        self._closed = False

    @classmethod
    def from_home(cls, home: str | Path, timeout: float = DEFAULT_TIMEOUT_S) -> AsyncClient:
        url, token, sock = _locate(home)
        return cls(url, token, timeout=timeout, socket_path=sock)

    async def __aenter__(self) -> AsyncClient:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                # the reader is ours to stop; the block's own exception, if any, goes on
                # as it is (not wrapped in the task group's exception group)
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            if self._session is not None:
                _run_all(self._session.fail_all(ClientClosed(
                    "the client was closed before the task ended; the task goes on on"
                    " the node (read it with AsyncClient.task(id))")))
            await self._http.aclose()

    # --- futures ---------------------------------------------------------------------
    def _futures_session(self) -> _Session:
        if self._closed:
            raise ClientClosed("this client is closed; make a new one")
        if self._tg is None:
            raise TeammeshError("futures need `async with AsyncClient.from_home(...) as c:`"
                                " (the block owns the task that reads results)")
        if self._socket_path is None:
            raise TeammeshError(
                "futures need the node's control socket (api.sock in its home), and this"
                " node serves none (its home path is too long for a Unix socket): use a"
                " shorter --home, or submit_batch")
        if self._session is None or self._session.failed is not None:
            self._session = _Session(self._token)
            self._wake = anyio.Event()
            self._tg.start_soon(self._run_io, self._session, self._socket_path)
        return self._session

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _cancel_on_node(self, fut: AsyncTaskFuture) -> None:
        session = self._session
        if session is not None and session.failed is None:
            session.cancel(fut, fut._task_id)  # the future settles itself as cancelled
            self._kick()

    def future(self, kind: str, input: bytes | None = None,
               params: dict[str, Any] | None = None, **options: Any) -> AsyncTaskFuture:
        """Submit a task and return at once with its awaitable future (see
        Client.future). Call it inside the ``async with`` block."""
        options.pop("wait", None)
        session = self._futures_session()
        fut = AsyncTaskFuture()
        fut._cancel = self._cancel_on_node
        session.queue(_submit_body(kind, input, params, options), fut)
        self._kick()
        return fut

    def map(self, kind: str, inputs: Iterable[bytes | None],
            params: dict[str, Any] | None = None, **options: Any) -> list[AsyncTaskFuture]:
        """One future per input, in order (all submitted together)."""
        return [self.future(kind, x, params, **options) for x in inputs]

    @staticmethod
    async def gather(futures: Iterable[AsyncTaskFuture], *,
                     return_exceptions: bool = False) -> list[Any]:
        """The futures' results in order (see Client.gather)."""
        out: list[Any] = []
        for f in futures:
            if return_exceptions:
                exc = await f.exception()
                out.append(exc if exc is not None else await f.result())
            else:
                out.append(await f.result())
        return out

    @staticmethod
    async def as_completed(futures: Iterable[AsyncTaskFuture]
                           ) -> AsyncIterator[AsyncTaskFuture]:
        """Each future once, as it settles."""
        unique = list(dict.fromkeys(futures))
        send, receive = anyio.create_memory_object_stream[AsyncTaskFuture](
            max(1, len(unique)))
        with send, receive:
            for f in unique:
                f.add_done_callback(send.send_nowait)
            for _ in unique:
                yield await receive.receive()

    async def _run_io(self, session: _Session, path: str) -> None:
        failure: BaseException | None = None
        try:
            stream = await anyio.connect_unix(path)
        except OSError as exc:
            _run_all(session.fail_all(NodeNotRunning(
                f"cannot reach the node's control socket {path}: {exc}; is the node"
                " running?")))
            return
        try:
            async with stream, anyio.create_task_group() as tg:
                tg.start_soon(self._write, stream, session, tg.cancel_scope)
                try:
                    while True:
                        _run_all(session.feed(await stream.receive(1 << 20)))
                        if session.queued or session.out:
                            self._kick()  # resubmissions, or cancels of acknowledged tasks
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError,
                        TeammeshError) as exc:
                    failure = exc
                    tg.cancel_scope.cancel()
        finally:
            if isinstance(failure, TeammeshError):
                exc_out: BaseException = failure
            elif failure is not None:
                exc_out = NodeNotRunning(
                    f"lost the node at {path}: {failure or 'connection closed'}; its tasks"
                    " may still finish (read them with AsyncClient.task(id))")
            else:
                exc_out = ClientClosed(
                    "the client was closed before the task ended; the task goes on on the"
                    " node (read it with AsyncClient.task(id))")
            _run_all(session.fail_all(exc_out))

    async def _write(self, stream: anyio.abc.ByteStream, session: _Session,
                     scope: anyio.CancelScope) -> None:
        try:
            while True:
                data = session.take_output()
                if data:
                    await stream.send(data)
                    continue  # more may have been queued while we sent
                assert self._wake is not None
                await self._wake.wait()
                self._wake = anyio.Event()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            scope.cancel()  # the reader sees the end too and fails what is pending

    # --- one call at a time ----------------------------------------------------------
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
        """Submit one task; its JSON (with ``wait=True``, once it has ended). Options as
        for ``Client.submit`` (replicas, quorum, where, priority, timeout_s, ...).

        Inside ``async with``, ``wait=True`` rides the futures connection, so many
        concurrent submits go out together instead of one HTTP request each."""
        if options.get("wait") is True and self._tg is not None and not self._closed \
                and self._socket_path is not None:
            fut = self.future(kind, input, params, **options)
            exc = await fut.exception()
            if fut._record is None:
                assert exc is not None
                raise exc  # refused, or the connection or client went away
            return fut._record
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
