"""node/files/kubo.py against a real Kubo-RPC daemon: js-ipfs 0.66.1 on loopback.

The daemon comes from tests/jsipfs (install it with scripts/setup-jsipfs); these tests
are skipped, saying so, only when it is not installed. One daemon serves the module: a
fresh repo made with ``--profile test`` and rewritten to listen on 127.0.0.1 only, no
bootstrap peers, started with ``--enable-preload=false`` and stopped by PID at the end.

js-ipfs prints CIDv1 in base58btc (``zdj7...``): every comparison is between decoded
:class:`Cid` values, never strings.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import trio
from teammesh.node.files.kubo import (
    KuboCidMismatch,
    KuboError,
    KuboUnavailable,
    KuboWatch,
    open_kubo,
)
from teammesh.storage.cid import Cid
from teammesh.storage.unixfs import cid_of_file

JSIPFS_DIR = Path(__file__).parent / "jsipfs"
JSIPFS_BIN = JSIPFS_DIR / "node_modules" / ".bin" / "jsipfs"
START_TIMEOUT_S = 120.0  # js-ipfs starts in ~5 s; minutes only on an overloaded machine
STOP_TIMEOUT_S = 10.0
DOWN_LIMIT_S = 3.0  # the brief: a configured-but-down node answers every call within this
MIB = 1 << 20

pytestmark = pytest.mark.skipif(
    not JSIPFS_BIN.exists(),
    reason="js-ipfs is not installed in tests/jsipfs/node_modules: run scripts/setup-jsipfs",
)


@dataclass(frozen=True)
class JsIpfs:
    """A running js-ipfs daemon: its PID, RPC API multiaddr and repo."""

    pid: int
    api: str
    api_url: str
    repo: Path



def free_port() -> int:
    """A TCP port nothing listens on right now (bound on 127.0.0.1, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_pid(pid: int) -> None:
    """SIGTERM the process we started, SIGKILL it if it lingers; bounded."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass


@pytest.fixture(scope="module")
def jsipfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JsIpfs]:
    """Start js-ipfs on free loopback ports with a temp repo; stop it by PID afterwards."""
    repo = tmp_path_factory.mktemp("jsipfs") / "repo"
    api_port, swarm_port = free_port(), free_port()
    out = subprocess.run(
        [str(JSIPFS_DIR / "start-jsipfs.sh"), str(repo), str(api_port), str(swarm_port)],
        check=True,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    pid = int(out.stdout.strip().splitlines()[-1])
    node = JsIpfs(pid, f"/ip4/127.0.0.1/tcp/{api_port}", f"http://127.0.0.1:{api_port}", repo)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # bounded by the deadline; the API answering is the readiness signal
            if not psutil.pid_exists(pid):
                log = Path(f"{repo}.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"js-ipfs exited during start-up:\n{log}")
            try:
                httpx.post(f"{node.api_url}/api/v0/version", timeout=1.0).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    pytest.fail(f"js-ipfs did not answer on {node.api} in {START_TIMEOUT_S} s")
                time.sleep(0.2)
        yield node
    finally:
        stop_pid(pid)


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    """10 MiB of seeded random bytes (40 chunks: a two-level DAG)."""
    path = tmp_path / "data.bin"
    path.write_bytes(random.Random(1).randbytes(10 * MIB))
    return path


def rpc(node: JsIpfs, endpoint: str, **params: str) -> httpx.Response:
    """POST to the daemon's RPC API (bypassing the code under test)."""
    r = httpx.post(f"{node.api_url}/api/v0/{endpoint}", params=params, timeout=30.0)
    r.raise_for_status()
    return r


def rpc_add(node: JsIpfs, data: bytes, **params: str) -> str:
    """Add bytes through the daemon's own /api/v0/add; return the CID it prints."""
    r = httpx.post(
        f"{node.api_url}/api/v0/add",
        params=params,
        files={"file": ("blob", data, "application/octet-stream")},
        timeout=60.0,
    )
    r.raise_for_status()
    return str(r.json()["Hash"])


# -- the daemon itself ---------------------------------------------------------------------


def test_daemon_is_loopback_only_without_bootstrap(jsipfs: JsIpfs) -> None:
    listening = [
        c.laddr
        for c in psutil.Process(jsipfs.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "js-ipfs listens on nothing?"
    assert all(addr.ip == "127.0.0.1" for addr in listening), listening
    assert rpc(jsipfs, "bootstrap/list").json()["Peers"] == []
    assert rpc(jsipfs, "swarm/peers").json().get("Peers") in (None, [])


# -- KuboBackend against it ----------------------------------------------------------------


async def test_version_and_is_up(jsipfs: JsIpfs) -> None:
    async with open_kubo(jsipfs.api) as kubo:
        assert await kubo.is_up()
        assert (await kubo.version()).count(".") == 2
        assert kubo.watch.up is True


async def test_add_matches_our_cid_and_cat_round_trips(
    jsipfs: JsIpfs, data_file: Path, tmp_path: Path
) -> None:
    async with open_kubo(jsipfs.api) as kubo:
        text = await kubo.add_file(data_file)
        assert Cid.parse(text) == cid_of_file(data_file)  # decoded: js-ipfs prints zdj7...
        pins = rpc(jsipfs, "pin/ls", arg=text, type="recursive").json()["Keys"]
        assert Cid.parse(next(iter(pins))) == Cid.parse(text)

        dest = tmp_path / "out" / "copy.bin"
        dest.parent.mkdir()
        await kubo.cat_to(text, dest)
        assert dest.read_bytes() == data_file.read_bytes()
        assert not dest.with_name("copy.bin.partial").exists()


async def test_small_and_empty_files(jsipfs: JsIpfs, tmp_path: Path) -> None:
    async with open_kubo(jsipfs.api) as kubo:
        for size in (0, 1, 262_144, 262_145):
            src = tmp_path / f"f{size}"
            src.write_bytes(random.Random(size).randbytes(size))
            text = await kubo.add_file(src)
            assert Cid.parse(text) == cid_of_file(src), size
            dest = tmp_path / f"g{size}"
            await kubo.cat_to(Cid.parse(text), dest)
            assert dest.read_bytes() == src.read_bytes()


async def test_pin(jsipfs: JsIpfs) -> None:
    data = random.Random(7).randbytes(3 * 262_144 + 5)
    text = rpc_add(jsipfs, data, **{"cid-version": "1", "pin": "false"})
    with pytest.raises(httpx.HTTPStatusError):
        rpc(jsipfs, "pin/ls", arg=text)
    async with open_kubo(jsipfs.api) as kubo:
        await kubo.pin(text)
        await kubo.pin(Cid.parse(text))  # idempotent; accepts Cid values
    pins = rpc(jsipfs, "pin/ls", arg=text).json()["Keys"]
    assert [Cid.parse(k) for k in pins] == [Cid.parse(text)]


async def test_cat_file_added_by_jsipfs_itself(
    jsipfs: JsIpfs, data_file: Path, tmp_path: Path
) -> None:
    # Added by js-ipfs with its own defaults (what `jsipfs add` sends): CIDv0 (Qm...) and
    # dag-pb leaves, so cat_to verifies with the CIDv0 importer. (The HTTP API rather than
    # the CLI: the CLI costs a second node start-up, and this install's CLI needs
    # `--api http://...` because it cannot turn the repo's `api` multiaddr into a URL.)
    text = rpc_add(jsipfs, data_file.read_bytes())
    assert text.startswith("Qm")
    assert Cid.parse(text) == cid_of_file(data_file, cid_version=0)
    async with open_kubo(jsipfs.api) as kubo:
        dest = tmp_path / "theirs.bin"
        await kubo.cat_to(text, dest)
        assert dest.read_bytes() == data_file.read_bytes()


async def test_cat_refuses_bytes_it_cannot_verify(jsipfs: JsIpfs, tmp_path: Path) -> None:
    # Added with another chunker: same bytes, a CID our importer cannot reproduce.
    data = random.Random(3).randbytes(300_000)
    text = rpc_add(jsipfs, data, **{"cid-version": "1", "chunker": "size-65536"})
    dest = tmp_path / "other.bin"
    async with open_kubo(jsipfs.api) as kubo:
        with pytest.raises(KuboCidMismatch, match="discarded"):
            await kubo.cat_to(text, dest)
        assert not dest.exists()
        assert not dest.with_name("other.bin.partial").exists()
        await kubo.cat_to(text, dest, verify=False)
        assert dest.read_bytes() == data


async def test_api_errors_are_kubo_errors(jsipfs: JsIpfs, tmp_path: Path) -> None:
    async with open_kubo(jsipfs.api) as kubo:
        with pytest.raises(KuboError) as info:
            await kubo.pin("not-a-cid")
        assert not isinstance(info.value, KuboUnavailable)
        assert kubo.watch.up is True  # it answered
        with pytest.raises(FileNotFoundError):
            await kubo.add_file(tmp_path / "missing")


# -- configured but down -------------------------------------------------------------------


async def test_down_node_fails_fast_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api = f"/ip4/127.0.0.1/tcp/{free_port()}"  # closed: nothing listens there
    src = tmp_path / "x.bin"
    src.write_bytes(b"x" * 300_000)
    cid = str(cid_of_file(src))
    caplog.set_level(logging.INFO, logger="teammesh.kubo")
    async with open_kubo(api) as kubo:
        calls = [
            kubo.version,
            lambda: kubo.add_file(src),
            lambda: kubo.cat_to(cid, tmp_path / "y.bin"),
            lambda: kubo.pin(cid),
            kubo.version,
        ]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(KuboUnavailable) as info:
                await call()
            assert time.monotonic() - start < DOWN_LIMIT_S
            message = str(info.value)
            assert api in message
            assert "\n" not in message
        assert not await kubo.is_up()
        assert not (tmp_path / "y.bin").exists()
        assert not (tmp_path / "y.bin.partial").exists()
    down = [r for r in caplog.records if "is down; carrying on without it" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in caplog.records]
    assert api in down[0].getMessage()


def test_watch_logs_state_changes_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="teammesh.kubo")
    watch = KuboWatch("/ip4/127.0.0.1/tcp/5001")
    assert watch.up is None
    watch.saw_up()  # first contact succeeding is not news
    for _ in range(3):
        watch.saw_down("connection refused")
    for _ in range(3):
        watch.saw_up()
    watch.saw_down("connection refused")
    assert [r.getMessage() for r in caplog.records] == [
        "external IPFS at /ip4/127.0.0.1/tcp/5001 is down; carrying on without it "
        "(connection refused)",
        "external IPFS at /ip4/127.0.0.1/tcp/5001 is back",
        "external IPFS at /ip4/127.0.0.1/tcp/5001 is down; carrying on without it "
        "(connection refused)",
    ]


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class SwitchableProxy:
    """A loopback TCP proxy to js-ipfs's API on a fixed port, which the test switches off
    (listener closed, connections cut: the node is down) and on again, without touching
    the daemon the module shares."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._scope: trio.CancelScope | None = None

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, upstream)
                nursery.start_soon(_pipe, upstream, client)

    async def _serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started()

    async def up(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()


async def test_watch_run_follows_the_node(
    jsipfs: JsIpfs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="teammesh.kubo")
    interval_s = 0.2  # polls often, so each change shows within a few polls

    async def becomes(watch: KuboWatch, state: bool) -> None:
        # bounded (count and time): the change shows within a poll or two; 60 s bounds a hang
        for _ in range(int(60 / (interval_s / 4))):
            if watch.up is state:
                return
            await trio.sleep(interval_s / 4)
        raise AssertionError(f"the watch still says up={watch.up} after 60 s")

    async with trio.open_nursery() as outer:
        proxy = SwitchableProxy(int(jsipfs.api.split("/")[4]))
        await proxy.up(outer)
        address = f"/ip4/127.0.0.1/tcp/{proxy.port}"
        async with open_kubo(address) as kubo, trio.open_nursery() as nursery:
            watch = await nursery.start(
                functools.partial(kubo.watch.run, kubo, interval_s=interval_s))
            assert watch is kubo.watch
            assert watch.up is True  # its first poll reached the node
            proxy.down()  # the node goes away: the watch's own polls must notice
            await becomes(watch, False)
            await proxy.up(outer)  # and comes back on the same address
            await becomes(watch, True)
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    said = [r.getMessage() for r in caplog.records if address in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith(f"external IPFS at {address} is down; carrying on without it (")
    assert said[1] == f"external IPFS at {address} is back"


async def test_bad_address_is_a_config_error() -> None:
    from teammesh.protocols.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[ipfs\] api"):
        async with open_kubo("/unix/tmp/nope"):
            pass



def test_daemon_adds_shared_files_to_external_ipfs_and_survives_it_down(
        jsipfs: JsIpfs, tmp_path: Path) -> None:
    """`[ipfs] api` on a real node: shares are also pinned in the external daemon; with the
    daemon's address closed the node still shares, says so once, and nothing hangs."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from meshtools import Daemon, cli_json, init_home, run_cli

    home = init_home(tmp_path / "n")
    run_cli(home, "team", "create", "t")
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text() + f'\n[ipfs]\napi = "{jsipfs.api}"\n')
    node = Daemon(home).start()
    try:
        f = tmp_path / "f.bin"
        f.write_bytes(random.Random(3).randbytes(MIB + 17))
        shared = cli_json(home, "share", str(f))
        assert shared["ipfs"] == "added"
        pins = rpc(jsipfs, "pin/ls", arg=shared["cid"]).json()["Keys"]
        assert [Cid.parse(k) for k in pins] == [Cid.parse(shared["cid"])]
    finally:
        node.stop()
    cfg.write_text(cfg.read_text().replace(jsipfs.api, f"/ip4/127.0.0.1/tcp/{free_port()}"))
    node = Daemon(home).start()
    try:
        # no wall-clock bound (CLI start-up is in it); cli_json's timeout catches a hang
        again = cli_json(home, "share", str(f))
        assert again["ipfs"].startswith("skipped")
        assert again["cid"] == shared["cid"]
        cli_json(home, "share", str(f))
        assert node.log is not None
        assert node.log.read_text().count("is down; carrying on without it") == 1
    finally:
        node.stop()
