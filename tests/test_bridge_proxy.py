"""The bridge through an HTTP proxy: ``[bridge] proxy`` (issue 20, item 5).

A daemon whose config names a proxy reaches the Worker (``wrangler dev``, as in
tests/test_bridge.py) only through it. The proxy is a small forwarding proxy on loopback
in this test that records what it forwarded; it forwards to loopback only.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from meshtools import Daemon, init_home, run_cli
from test_bridge import BRIDGE_DIR, KEY, run_worker

from teammesh.client import Client

pytestmark = pytest.mark.skipif(
    not (BRIDGE_DIR / "node_modules" / "wrangler").is_dir(),
    reason="bridge/node_modules is missing: run `bash bridge/run-tests.sh` or `npm ci` in bridge/",
)

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te",
              "trailer", "transfer-encoding", "upgrade"}


class _Forward(BaseHTTPRequestHandler):
    """Absolute-form requests (``GET http://host:port/path``) forwarded to loopback."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str]]

    def _forward(self) -> None:
        target = urlsplit(self.path)
        if target.scheme != "http" or target.hostname not in ("127.0.0.1", "localhost"):
            self.send_error(403, "this test proxy forwards to loopback only")
            return
        self.seen.append((self.command, target.path))
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            path = target.path + (f"?{target.query}" if target.query else "")
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

    def do_CONNECT(self) -> None:
        self.seen.append(("CONNECT", self.path))
        self.send_error(405, "this test proxy does not tunnel")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def forwarding_proxy() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(proxy URL, the (method, path) of each forwarded request)."""
    seen: list[tuple[str, str]] = []
    handler = type("Handler", (_Forward,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="test-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_bridge_requests_go_through_the_configured_proxy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = init_home(tmp_path / "node")
    run_cli(home, "team", "create", "proxyteam")
    with run_worker(tmp_path / "worker", KEY.hex()) as url, forwarding_proxy() as (proxy, seen):
        cfg = home / "config.toml"
        cfg.write_text(cfg.read_text() + f'\n[bridge]\nproxy = "{proxy}"\n')
        monkeypatch.setenv("TEAMMESH_BRIDGE_KEY", KEY.hex())  # [bridge] key: the master
        node = Daemon(home, ["--slots", "0", "--bridge", url]).start()
        try:
            data = b"through the proxy"
            with Client.from_home(home, timeout=120) as c:
                t = c.submit("hash.sha256", data, where="bridge", no_cache=True, wait=90)
                assert t["state"] == "done", t["error"]
                assert t["output"] == hashlib.sha256(data).hexdigest()
                assert t["executed_by"] == "bridge"
        finally:
            node.stop()
    # the task went to the Worker through the proxy, by plain forwarding (no tunnel)
    assert ("POST", "/v1/tasks") in seen, seen
    assert all(method != "CONNECT" for method, _ in seen), seen
