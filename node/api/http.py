"""The control API's HTTP/1.1 server: keep-alive, one request at a time per connection.

Why our own: with hypercorn and Starlette in front of it, HTTP parsing, the per-request
ASGI plumbing and routing were ~53 % of the submitting daemon's CPU when clients send one
task per request (curl, other languages). Here a request costs one head parse, one
read and one write. The task routes that carry the load are answered by a native
handler (node/api/server.py); everything else (dashboard, SSE, files) goes to the
existing Starlette app through a small ASGI adapter (``_asgi``).

Rules:
- A connection serves one request at a time; bytes of a pipelined next request wait in
  the buffer until the response to the current one is written.
- Heads are at most ``MAX_HEAD_BYTES`` and ``MAX_HEADERS`` lines, bodies at most
  ``Limits.max_body_bytes`` (413 before reading it). A malformed request gets a 400 and
  the connection closes; nothing a client sends raises out of the connection task.
- A request must arrive within ``Limits.head_timeout_s`` (head) and
  ``Limits.body_timeout_s`` (body) from its first byte (slow clients are cut off); an
  idle keep-alive connection closes after ``Limits.idle_timeout_s``; a client that does
  not read its response within ``Limits.write_timeout_s`` is dropped.
- At most ``Limits.max_connections`` connections at once: further ones wait in the
  listen backlog.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import trio

logger = logging.getLogger("teammesh.api.http")

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
READ_BYTES = 64 * 1024
SMALL_BODY_BYTES = 64 * 1024  # up to this, head and body go out in one write
ACCEPT_RETRY_S = 0.1  # out of descriptors: wait this long before accepting again
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 64 * 1024 * 1024
    head_timeout_s: float = 30.0
    body_timeout_s: float = 120.0
    idle_timeout_s: float = 75.0
    write_timeout_s: float = 60.0
    max_connections: int = 512


class BadRequest(Exception):
    """The client broke HTTP/1.1: answer ``status`` with ``message`` and close."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(slots=True)
class Request:
    method: str
    target: bytes  # as sent: path and query
    http_version: str  # "1.0" or "1.1"
    headers: list[tuple[bytes, bytes]]  # names lowercased, in order
    keep_alive: bool
    content_length: int | None
    chunked: bool
    expect_continue: bool
    body: bytes = b""
    raw_path: bytes = field(init=False)
    query: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.raw_path, _, self.query = self.target.partition(b"?")

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


# --- parsing (pure) -------------------------------------------------------------------------


def parse_head(head: bytes) -> Request:
    """Parse a request head (request line and header lines, without the final blank line).

    Raises ``BadRequest`` for anything outside RFC 9112's grammar that matters here:
    obsolete line folding, bad tokens, bytes that cannot be in a value, conflicting or
    malformed framing headers (the request-smuggling cases)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "bad_request", "malformed request line")
    method, target, version = parts
    if not method or not _TOKEN.issuperset(method):
        raise BadRequest(400, "bad_request", "malformed request method")
    if version == b"HTTP/1.1":
        http_version = "1.1"
    elif version == b"HTTP/1.0":
        http_version = "1.0"
    else:
        raise BadRequest(400, "bad_request", "only HTTP/1.0 and HTTP/1.1 are served here")
    if not target.startswith(b"/") or not _visible(target):
        raise BadRequest(400, "bad_request", "the request target must be a path")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, "headers_too_large", f"more than {MAX_HEADERS} header lines")
    headers: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    chunked = False
    connection = b""
    expect = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name):
            raise BadRequest(400, "bad_request", "malformed header line")
        value = value.strip(b" \t")
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise BadRequest(400, "bad_request", "forbidden byte in a header value")
        name = name.lower()
        headers.append((name, value))
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise BadRequest(400, "bad_request", "malformed content-length")
            if content_length is not None and content_length != int(value):
                raise BadRequest(400, "bad_request", "conflicting content-length headers")
            content_length = int(value)
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked" or chunked:
                raise BadRequest(501, "not_implemented",
                                 "only 'transfer-encoding: chunked' is understood")
            chunked = True
        elif name == b"connection":
            connection += b"," + value.lower()
        elif name == b"expect":
            if value.lower() != b"100-continue":
                raise BadRequest(417, "expectation_failed", "only 100-continue is understood")
            expect = True
    if chunked and content_length is not None:
        raise BadRequest(400, "bad_request", "both content-length and transfer-encoding")
    if chunked and http_version == "1.0":
        raise BadRequest(400, "bad_request", "chunked bodies need HTTP/1.1")
    options = {o.strip() for o in connection.split(b",")}
    keep_alive = (b"close" not in options if http_version == "1.1"
                  else b"keep-alive" in options)
    return Request(method.decode("ascii"), target, http_version, headers, keep_alive,
                   content_length, chunked, expect and http_version == "1.1")


def _visible(target: bytes) -> bool:
    return all(0x21 <= b <= 0x7E for b in target)


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def response_head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b""))]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def json_bytes(content: Any) -> bytes:
    """Starlette's JSONResponse encoding, so answers do not change with the server."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


def error_body(code: str, message: str) -> bytes:
    return json_bytes({"error": {"code": code, "message": message}})


# --- serving ---------------------------------------------------------------------------------

# A native handler answers (status, content type, body), or None to pass the request on.
Native = Callable[[Request], Awaitable[tuple[int, bytes, bytes] | None]]
Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class _Closed(Exception):
    """The client went away, or the connection cannot carry another request."""


class Connection:
    """One client connection: read a request, answer it, repeat while keep-alive holds."""

    def __init__(self, stream: trio.SocketStream, native: Native, app: Asgi,
                 limits: Limits) -> None:
        self.stream = stream
        self.native = native
        self.app = app
        self.limits = limits
        self.buf = bytearray()
        self.eof = False
        self.timer = trio.CancelScope()
        try:
            peer = stream.socket.getpeername()
            local = stream.socket.getsockname()
            self.client: tuple[str, int] | None = (peer[0], peer[1])
            self.server: tuple[str, int] | None = (local[0], local[1])
        except OSError:
            self.client = self.server = None

    async def serve(self) -> None:
        # One cancel scope per connection whose deadline each phase moves (idle, head,
        # body, write; none while a handler runs): cheaper than a scope per operation,
        # which was ~5 % of the submitting daemon's CPU under per-task load.
        with trio.CancelScope() as self.timer:
            try:
                while True:
                    try:
                        req = await self._read_request()
                    except BadRequest as exc:
                        await self._write_error(exc.status, exc.code, str(exc))
                        return
                    if req is None:
                        return
                    self.timer.deadline = math.inf
                    if not await self._respond(req):
                        return
            except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            finally:
                with trio.CancelScope(shield=True):
                    await _close(self.stream)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(READ_BYTES)
        if not data:
            self.eof = True
            raise _Closed
        self.buf += data

    async def _read_request(self) -> Request | None:
        limits = self.limits
        if not self.buf:
            self.timer.deadline = trio.current_time() + limits.idle_timeout_s
            try:
                await self._fill()
            except _Closed:
                return None
        if (end := self.buf.find(b"\r\n\r\n")) < 0:
            self.timer.deadline = trio.current_time() + limits.head_timeout_s
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                if len(self.buf) > MAX_HEAD_BYTES:
                    raise BadRequest(431, "headers_too_large",
                                     f"request head over {MAX_HEAD_BYTES} bytes")
                await self._fill()
        if end > MAX_HEAD_BYTES:
            raise BadRequest(431, "headers_too_large", f"request head over {MAX_HEAD_BYTES} bytes")
        req = parse_head(bytes(self.buf[:end]))
        del self.buf[:end + 4]
        limit = limits.max_body_bytes
        if req.content_length is not None and req.content_length > limit:
            raise BadRequest(413, "payload_too_large",
                             f"request body is {req.content_length} bytes; the limit is"
                             f" {limit} bytes")
        if req.chunked:
            if req.expect_continue:
                await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.timer.deadline = trio.current_time() + limits.body_timeout_s
            req.body = await self._read_chunked(limit)
        elif req.content_length:
            n = req.content_length
            if len(self.buf) < n:
                if req.expect_continue:
                    await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.timer.deadline = trio.current_time() + limits.body_timeout_s
                while len(self.buf) < n:
                    await self._fill()
            req.body = bytes(self.buf[:n])
            del self.buf[:n]
        return req

    async def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > 4096:
                raise BadRequest(400, "bad_request", "malformed chunked body")
            await self._fill()
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    async def _read_chunked(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            size_text = (await self._line()).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest(400, "bad_request", "malformed chunk size") from None
            if size < 0 or not size_text.isalnum():
                raise BadRequest(400, "bad_request", "malformed chunk size")
            if size == 0:
                for _ in range(MAX_HEADERS):  # trailers: read and drop
                    if not await self._line():
                        return bytes(body)
                raise BadRequest(431, "headers_too_large", "too many trailer lines")
            if len(body) + size > limit:
                raise BadRequest(413, "payload_too_large",
                                 f"request body over the limit of {limit} bytes")
            while len(self.buf) < size + 2:
                await self._fill()
            if self.buf[size:size + 2] != b"\r\n":
                raise BadRequest(400, "bad_request", "malformed chunked body")
            body += self.buf[:size]
            del self.buf[:size + 2]

    async def _send(self, data: bytes | bytearray) -> None:
        timer = self.timer
        before = timer.deadline
        timer.deadline = trio.current_time() + self.limits.write_timeout_s
        await self.stream.send_all(data if isinstance(data, bytes) else memoryview(data))
        timer.deadline = before

    async def _write_error(self, status: int, code: str, message: str) -> None:
        body = error_body(code, message)
        head = response_head(status, [(b"content-type", b"application/json"),
                                      (b"content-length", b"%d" % len(body)),
                                      (b"connection", b"close")])
        try:
            await self._send(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _respond(self, req: Request) -> bool:
        """Answer one request; whether the connection can carry another."""
        try:
            answer = await self.native(req)
        except Exception as exc:  # a bug answers 500 and is logged once
            logger.exception("API %s %s failed", req.method, req.raw_path.decode("ascii"))
            answer = (500, b"application/json", error_body(
                "internal", f"internal error ({type(exc).__name__}: {exc}); see the node's log"))
        if answer is None:
            return await self._asgi(req)
        status, content_type, body = answer
        keep = req.keep_alive
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        if not keep:
            headers.append((b"connection", b"close"))
        head = response_head(status, headers)
        if req.method == "HEAD":
            await self._send(head)
        elif len(body) <= SMALL_BODY_BYTES:
            await self._send(head + body)
        else:
            await self._send(head)
            await self._send(body)
        return keep

    # --- the ASGI adapter (Starlette: dashboard, SSE, files, everything not native) -------

    async def _asgi(self, req: Request) -> bool:
        try:
            path = unquote(req.raw_path.decode("ascii"), errors="strict")
        except UnicodeError:
            await self._write_error(400, "bad_request", "the path is not valid UTF-8")
            return False
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.http_version, "method": req.method, "scheme": "http",
            "path": path, "raw_path": req.raw_path, "query_string": req.query,
            "root_path": "", "headers": req.headers, "client": self.client,
            "server": self.server,
        }
        exchange = _Exchange(self, req)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception as exc:
            if exchange.started:
                # part of the answer is out: the client sees a cut response
                if not isinstance(exc, (OSError, trio.BrokenResourceError,
                                        trio.ClosedResourceError)):
                    logger.exception("API %s %s failed", req.method, path)
                return False
            logger.exception("API %s %s failed", req.method, path)
            await self._write_error(500, "internal", f"internal error ({type(exc).__name__}:"
                                    f" {exc}); see the node's log")
            return False
        if not exchange.started:
            await self._write_error(500, "internal", "the handler sent no response")
            return False
        if not exchange.finished:
            return False
        return req.keep_alive and exchange.reusable and not self.eof


class _Exchange:
    """ASGI receive/send for one request on a Connection."""

    def __init__(self, conn: Connection, req: Request) -> None:
        self.conn = conn
        self.req = req
        self.body_sent = False
        self.started = False
        self.finished = False
        self.reusable = True
        self.chunked = False
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_pending = False

    async def receive(self) -> dict[str, Any]:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.req.body, "more_body": False}
        # The app waits for the client to go away (a stream watches for it): read what
        # the client sends meanwhile into the buffer (a pipelined next request) until EOF.
        conn = self.conn
        while not conn.eof:
            if len(conn.buf) > MAX_HEAD_BYTES:
                await trio.sleep_forever()  # enough read ahead: the rest waits in the kernel
            try:
                await conn._fill()
            except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                conn.eof = True
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        try:
            await self._send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # Starlette reads an OSError from send as "the client went away"
            raise OSError(errno.EPIPE, f"client connection lost: {exc}") from exc

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.status = int(message["status"])
            self.headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])]
            self.started = True
            self.head_pending = True
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started or self.finished:
            raise RuntimeError("http.response.body outside a response")
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        no_body = self.req.method == "HEAD" or self.status in (204, 304) or self.status < 200
        out = bytearray()
        if self.head_pending:
            self.head_pending = False
            headers = [h for h in self.headers if h[0] != b"connection"]
            has_length = any(k == b"content-length" for k, _ in headers)
            if any(k == b"transfer-encoding" for k, _ in headers):
                raise RuntimeError("the app must not set transfer-encoding")
            if not has_length and not no_body:
                if not more:
                    headers.append((b"content-length", b"%d" % len(body)))
                elif self.req.http_version == "1.1":
                    headers.append((b"transfer-encoding", b"chunked"))
                    self.chunked = True
                else:
                    self.reusable = False  # HTTP/1.0: the body ends when we close
            if not (self.req.keep_alive and self.reusable):
                headers.append((b"connection", b"close"))
            out += response_head(self.status, headers)
        if not no_body and body:
            if self.chunked:
                out += b"%x\r\n" % len(body) + body + b"\r\n"
            else:
                out += body
        if not more:
            self.finished = True
            if self.chunked and not no_body:
                out += b"0\r\n\r\n"
        if out:
            await self.conn._send(out)


async def _close(stream: trio.SocketStream) -> None:
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def serve_http(sock: socket.socket, native: Native, app: Asgi,
                     limits: Limits = Limits(), *,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve HTTP/1.1 on a bound, listening socket until cancelled (then close it)."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    slots = trio.Semaphore(limits.max_connections)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await Connection(stream, native, app, limits).serve()
        finally:
            slots.release()

    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                    raise
                logger.warning("control API: cannot accept a connection (%s); retrying", exc)
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(handle, stream)
