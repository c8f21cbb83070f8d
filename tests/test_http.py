"""The control API's HTTP/1.1 server (node/api/http.py): on its own on a loopback socket
with a native handler and a Starlette app, then in a real daemon."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
from meshtools import Daemon, init_home, run_cli
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from teammesh.node.api.http import (
    BadRequest,
    Limits,
    Request,
    parse_head,
    serve_http,
)

BOUND_S = 30  # a bound on waiting, not an expectation of speed

# --- the parser alone -------------------------------------------------------------------------


def test_a_head_parses_into_method_target_headers_and_framing() -> None:
    req = parse_head(b"POST /v1/tasks?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n"
                     b"Authorization:  Bearer t \r\nConnection: keep-alive")
    assert (req.method, req.raw_path, req.query) == ("POST", b"/v1/tasks", b"x=1")
    assert req.content_length == 12
    assert req.header(b"authorization") == b"Bearer t"
    assert req.keep_alive
    assert not parse_head(b"GET / HTTP/1.0").keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nconnection: Keep-Alive").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive


@pytest.mark.parametrize("head", [
    b"GET /\r\nHost: a",  # two parts in the request line
    b"GET / HTTP/2.0",
    b"GET http://evil/ HTTP/1.1",  # absolute form
    b"G(T / HTTP/1.1",
    b"GET / HTTP/1.1\r\n folded: line",
    b"GET / HTTP/1.1\r\nName : value",
    b"GET / HTTP/1.1\r\nno colon",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6",
    b"POST / HTTP/1.1\r\nContent-Length: -5",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked",
])
def test_malformed_heads_are_refused(head: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        parse_head(head)
    assert 400 <= info.value.status < 600


# --- the server alone on loopback ------------------------------------------------------------


async def native(req: Request) -> tuple[int, bytes, bytes] | None:
    if req.raw_path == b"/echo":
        return 200, b"application/json", json.dumps(
            {"method": req.method, "body": req.body.decode()}).encode()
    return None


async def sse(request: StarletteRequest) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        for i in range(3):
            yield f"event: tick\ndata: {i}\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


async def cookie(request: StarletteRequest) -> JSONResponse:
    resp = JSONResponse({"seen": request.cookies.get("s"), "path": request.url.path,
                         "q": request.query_params.get("q")})
    resp.set_cookie("s", "new", httponly=True)
    return resp


APP = Starlette(routes=[Route("/sse", sse), Route("/cookie/{x}", cookie)])


@pytest.fixture
async def server(nursery: trio.Nursery) -> tuple[str, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    addr = sock.getsockname()
    limits = Limits(max_body_bytes=1000, head_timeout_s=0.5, body_timeout_s=0.5)
    await nursery.start(serve_http, sock, native, APP, limits)
    return addr[0], addr[1]


async def connect(addr: tuple[str, int]) -> trio.SocketStream:
    return await trio.open_tcp_stream(*addr)


async def read_response(stream: trio.SocketStream, buf: bytearray) -> tuple[int, dict[str, str],
                                                                              bytes]:
    """One response off ``stream`` (content-length or chunked); leftovers stay in buf."""
    with trio.fail_after(BOUND_S):
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            assert data, f"connection closed mid-head: {bytes(buf)!r}"
            buf += data
        end = buf.index(b"\r\n\r\n")
        lines = bytes(buf[:end]).split(b"\r\n")
        del buf[:end + 4]
        status = int(lines[0].split(b" ")[1])
        headers = {k.decode().lower(): v.decode().strip()
                   for k, _, v in (ln.partition(b":") for ln in lines[1:])}
        if status < 200:
            return status, headers, b""
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(buf) < n:
                data = await stream.receive_some(65536)
                assert data
                buf += data
            body = bytes(buf[:n])
            del buf[:n]
            return status, headers, body
        assert headers.get("transfer-encoding") == "chunked"
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += await stream.receive_some(65536)
            line_end = buf.index(b"\r\n")
            size = int(bytes(buf[:line_end]), 16)
            while len(buf) < line_end + 2 + size + 2:
                buf += await stream.receive_some(65536)
            body += bytes(buf[line_end + 2:line_end + 2 + size])
            del buf[:line_end + 2 + size + 2]
            if size == 0:
                return status, headers, body


async def read_eof(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    with trio.fail_after(BOUND_S):
        while data := await stream.receive_some(65536):
            out += data
    return out


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
            + extra + b"\r\n" + body)


async def test_keep_alive_serves_many_requests_on_one_connection(server: Any) -> None:
    stream = await connect(server)
    buf = bytearray()
    for i in range(5):
        await stream.send_all(post("/echo", f"n{i}".encode()))
        status, headers, body = await read_response(stream, buf)
        assert status == 200
        assert json.loads(body) == {"method": "POST", "body": f"n{i}"}
        assert headers.get("connection") != "close"
    # the ASGI path keeps the connection too
    await stream.send_all(b"GET /cookie/a HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(stream, buf)
    assert status == 200
    await stream.send_all(post("/echo", b"after"))
    assert json.loads((await read_response(stream, buf))[2])["body"] == "after"
    await stream.aclose()


async def test_pipelined_requests_are_answered_in_order(server: Any) -> None:
    stream = await connect(server)
    # all at once, native and ASGI mixed, then a GET without a body
    await stream.send_all(post("/echo", b"one") + b"GET /cookie/b?q=2 HTTP/1.1\r\nHost: x\r\n"
                          b"Cookie: s=old\r\n\r\n" + post("/echo", b"three")
                          + b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n" + post("/echo", b"five"))
    buf = bytearray()
    answers = [await read_response(stream, buf) for _ in range(5)]
    assert json.loads(answers[0][2])["body"] == "one"
    assert json.loads(answers[1][2]) == {"seen": "old", "path": "/cookie/b", "q": "2"}
    assert "s=new" in answers[1][1]["set-cookie"]
    assert json.loads(answers[2][2])["body"] == "three"
    assert answers[3][2] == b"".join(f"event: tick\ndata: {i}\n\n".encode() for i in range(3))
    assert json.loads(answers[4][2])["body"] == "five"
    await stream.aclose()


async def test_chunked_request_bodies_and_expect_continue(server: Any) -> None:
    stream = await connect(server)
    await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n")
    buf = bytearray()
    assert json.loads((await read_response(stream, buf))[2])["body"] == "abcde"
    await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                          b"Expect: 100-continue\r\n\r\n")
    status, _, _ = await read_response(stream, buf)
    assert status == 100
    await stream.send_all(b"ok")
    assert json.loads((await read_response(stream, buf))[2])["body"] == "ok"
    await stream.aclose()


async def test_an_oversized_body_gets_413_and_the_server_keeps_serving(server: Any) -> None:
    stream = await connect(server)
    await stream.send_all(post("/echo", b"x" * 1001))
    out = await read_eof(stream)
    assert out.startswith(b"HTTP/1.1 413 ")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "payload_too_large"
    stream = await connect(server)
    await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + b"3e9\r\n" + b"y" * 1001 + b"\r\n0\r\n\r\n")
    assert (await read_eof(stream)).startswith(b"HTTP/1.1 413 ")
    stream = await connect(server)
    await stream.send_all(post("/echo", b"fine"))
    assert json.loads((await read_response(stream, bytearray()))[2])["body"] == "fine"


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nContent-Length: zz\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
])
async def test_malformed_requests_get_an_error_and_close(server: Any, raw: bytes) -> None:
    stream = await connect(server)
    await stream.send_all(raw)
    out = await read_eof(stream)
    status = int(out.split(b" ", 2)[1])
    assert 400 <= status < 500 or status == 501
    assert b"connection: close" in out.lower()
    stream = await connect(server)
    await stream.send_all(post("/echo", b"still"))
    assert json.loads((await read_response(stream, bytearray()))[2])["body"] == "still"


async def test_a_slow_client_is_cut_off(server: Any) -> None:
    """Slow loris: a head that never ends, then a body that never ends (limits 0.5 s)."""
    stream = await connect(server)
    await stream.send_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
    with trio.fail_after(BOUND_S):
        while await stream.receive_some(100):  # one byte now and then would not help
            pass
    stream = await connect(server)
    await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert await read_eof(stream) == b""


async def test_http_1_0_without_keep_alive_closes_after_the_answer(server: Any) -> None:
    stream = await connect(server)
    await stream.send_all(b"GET /sse HTTP/1.0\r\n\r\n")
    out = await read_eof(stream)
    assert out.startswith(b"HTTP/1.1 200 ")
    assert out.endswith(b"data: 2\n\n")  # no chunk framing for HTTP/1.0


async def test_connections_over_the_limit_wait_for_a_free_one(nursery: trio.Nursery) -> None:
    served: list[bytes] = []

    async def record(req: Request) -> tuple[int, bytes, bytes]:
        served.append(req.body)
        return 200, b"text/plain", req.body

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    addr = sock.getsockname()
    await nursery.start(serve_http, sock, record, APP, Limits(max_connections=1))
    a = await connect(addr)
    buf_a = bytearray()
    await a.send_all(post("/", b"a1"))
    assert (await read_response(a, buf_a))[2] == b"a1"
    b = await connect(addr)  # the kernel accepts it; the server does not take it yet
    await b.send_all(post("/", b"b1"))
    for i in range(2, 20):  # a's round trips go on while b waits its turn
        await a.send_all(post("/", b"a%d" % i))
        assert (await read_response(a, buf_a))[2] == b"a%d" % i
    assert b"b1" not in served
    await a.aclose()
    assert (await read_response(b, bytearray()))[2] == b"b1"


# --- in a real daemon ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = init_home(tmp_path_factory.mktemp("http") / "n0")
    run_cli(home, "team", "create", "httpteam")
    d = Daemon(home, ["--slots", "1"]).start()
    try:
        yield d
    finally:
        d.stop()


def _open(d: Daemon) -> tuple[socket.socket, bytes]:
    host, port = d.api["url"].removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=BOUND_S)
    return s, (d.home / "api.token").read_text().strip().encode()


def _exchange(s: socket.socket, raw: bytes, n: int = 1) -> list[tuple[int, bytes]]:
    """Send raw, read n content-length responses off the blocking socket."""
    s.sendall(raw)
    buf = b""
    out = []
    for _ in range(n):
        while b"\r\n\r\n" not in buf:
            data = s.recv(65536)
            assert data, f"closed: {buf!r}"
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                      if ln.lower().startswith(b"content-length:"))
        while len(buf) < length:
            buf += s.recv(65536)
        out.append((int(head.split(b" ")[1]), buf[:length]))
        buf = buf[length:]
    return out


def _submit(token: bytes, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)
            + data)


def test_tasks_over_one_keep_alive_connection_pipelined(daemon: Daemon) -> None:
    s, token = _open(daemon)
    with s:
        raw = b"".join(_submit(token, {"kind": "base64.encode", "wait": True, "no_cache": True,
                                       "input_b64": base64.b64encode(b"x%d" % i).decode()})
                       for i in range(4))
        answers = _exchange(s, raw, 4)
        assert [st for st, _ in answers] == [200] * 4
        records = [json.loads(b) for _, b in answers]
        assert [r["output"] for r in records] == [base64.b64encode(b"x%d" % i).decode()
                                                  for i in range(4)]
        # show and wait on the same connection
        ((st, b),) = _exchange(s, b"GET /v1/tasks/%s?wait=5 HTTP/1.1\r\nHost: x\r\n"
                               b"Authorization: Bearer %s\r\n\r\n"
                               % (records[0]["id"].encode(), token))
        assert st == 200
        assert json.loads(b)["state"] == "done"
        ((st, b),) = _exchange(s, _submit(b"wrong", {"kind": "base64.encode"}))
        assert st == 401
        assert json.loads(b)["error"]["code"] == "unauthorized"
        ((st, b),) = _exchange(s, _submit(token, {"kind": "x"}).replace(b'{"kind"', b'{"kind '))
        assert st == 400
        assert json.loads(b)["error"]["code"] == "bad_request"
        assert "not JSON" in json.loads(b)["error"]["message"]


def test_an_oversized_body_gets_413_and_the_node_stays_up(daemon: Daemon) -> None:
    s, token = _open(daemon)
    with s:
        s.sendall(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
                  + b"\r\nContent-Length: %d\r\n\r\n" % (64 * 1024 * 1024 + 1))
        out = b""
        while data := s.recv(65536):
            out += data
    assert out.startswith(b"HTTP/1.1 413 ")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "payload_too_large"
    s, token = _open(daemon)
    with s:
        ((st, b),) = _exchange(s, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n"
                               b"Authorization: Bearer " + token + b"\r\n\r\n")
        assert st == 200
        assert json.loads(b)["peer_id"] == daemon.peer_id


def test_a_malformed_request_gets_400_and_the_node_stays_up(daemon: Daemon) -> None:
    s, _ = _open(daemon)
    with s:
        s.sendall(b"HELLO THERE\r\n\r\n")
        out = s.recv(65536)
    assert out.startswith(b"HTTP/1.1 400 ")
    s, _ = _open(daemon)
    with s:
        ((st, b),) = _exchange(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (st, json.loads(b)) == (200, {"ok": True})


def test_server_sent_events_still_flow_through_the_starlette_app(daemon: Daemon) -> None:
    s, token = _open(daemon)
    with s:
        ((st, b),) = _exchange(s, _submit(token, {"kind": "base64.encode", "input_b64": "eA=="}))
        assert st == 200
        task_id = json.loads(b)["id"]
        s.sendall(b"GET /v1/tasks/%s/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s"
                  b"\r\n\r\n" % (task_id.encode(), token))
        out = b""
        while not out.endswith(b"0\r\n\r\n"):  # the last chunk: the task ended
            data = s.recv(65536)
            assert data, out
            out += data
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"text/event-stream" in head
    assert b"transfer-encoding: chunked" in head.lower()
    assert b'"state":"done"' in body.replace(b" ", b"") or b'"state": "done"' in body


def test_the_openapi_document_lists_the_dashboard_routes(daemon: Daemon) -> None:
    s, _ = _open(daemon)
    with s:
        ((st, b),) = _exchange(s, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert st == 200
    paths = json.loads(b)["paths"]
    for p in ("/", "/login", "/logout", "/static/{name}", "/v1/dashboard/login",
              "/v1/dashboard", "/v1/events"):
        assert p in paths, p
