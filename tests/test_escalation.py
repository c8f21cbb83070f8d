"""Issue 7 acceptance: escalation to the local Worker, outages, and pull mode."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from meshtools import CLI, Daemon, init_home, run_cli, wait_until
from teammesh.node.bridge.dev import free_port

from teammesh.client import Client

BRIDGE_DIR = Path(__file__).resolve().parent.parent / "bridge"
pytestmark = pytest.mark.skipif(
    not (BRIDGE_DIR / "node_modules" / "wrangler").is_dir(),
    reason="bridge/node_modules is missing: run `bash bridge/run-tests.sh` or `npm ci` in bridge/",
)


@contextmanager
def bridge_dev(home: Path, port: int, state: Path) -> Iterator[str]:
    """`teammesh --home H bridge dev`, as a user runs it; stopped with its process group."""
    log = open(state.parent / f"bridge-{port}.log", "ab")
    proc = subprocess.Popen([*CLI, "--home", str(home), "bridge", "dev", "--port", str(port),
                             "--state", str(state)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, "bridge dev exited early"
            try:
                return httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 120, interval=0.3, what="the local Worker")
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _team(tmp: Path, n: int) -> list[Path]:
    homes = [init_home(tmp / f"n{i}") for i in range(n)]
    run_cli(homes[0], "team", "create", "t")
    return homes


def _join(admin: Daemon, home: Path) -> None:
    invite = run_cli(admin.home, "team", "invite").stdout.strip()
    run_cli(home, "join", invite)


def test_saturated_mesh_escalates_to_bridge(tmp_path: Path) -> None:
    a_home, b_home = _team(tmp_path, 2)
    port = free_port()
    with bridge_dev(a_home, port, tmp_path / "state") as url:
        a = Daemon(a_home, ["--slots", "1", "--bridge", url]).start()
        try:
            _join(a, b_home)
            b = Daemon(b_home, ["--slots", "1", "--bridge", url]).start()
            try:
                wait_until(lambda: len(a.peers()) == 1, 20, what="the mesh")
                with Client.from_home(a.home) as c:
                    holds = [c.submit("sleep", params={"seconds": 20}, no_cache=True)
                             for _ in range(2)]
                    wait_until(lambda: all(c.task(h["id"])["state"] == "running"
                                           and not c.task(h["id"])["waiting_reason"]
                                           for h in holds), 20, what="both slots busy")
                data = tmp_path / "in.bin"
                # over 64 KiB: a smaller hash would run at once on a's own daemon, slot or not
                data.write_bytes(os.urandom(96 * 1024))
                task = json.loads(run_cli(a.home, "submit", "hash.sha256", "--input", str(data),
                                          "--wait", "--json").stdout)
                assert task["state"] == "done"
                assert task["executed_by"] == "bridge"
                assert task["output"] == hashlib.sha256(data.read_bytes()).hexdigest()
                # straight to the bridge: it never waited in b's queue behind the sleeps
                # (how soon is scripts/bench escalation's figure, not a test's bound)
                assert [at["peer"] for at in task["attempts"]] == ["bridge"], task["attempts"]
                # the round trip Rule 6 weighs a busy queue against is measured, not the
                # rules' 1 s guess
                with Client.from_home(a.home) as c:
                    bridge = c.request("GET", "/v1/dashboard")["bridge"]
                assert bridge["configured"] is True
                assert isinstance(bridge["rtt_ms"], float)
                assert bridge["rtt_ms"] != 1000.0, bridge
            finally:
                b.stop()
        finally:
            a.stop()


def test_bridge_outage_loses_nothing(tmp_path: Path) -> None:
    (a_home,) = _team(tmp_path, 1)
    port = free_port()
    state = tmp_path / "state"
    with bridge_dev(a_home, port, state) as url:
        a = Daemon(a_home, ["--slots", "0", "--bridge", url]).start()
    try:
        # the Worker is gone: tasks wait in the journal and say why
        with Client.from_home(a.home) as c:
            submitted = c.submit_batch([{"kind": "text.stats", "input_b64": "aGVsbG8gd29ybGQ=",
                                         "where": "bridge", "no_cache": True, "tag": i}
                                        for i in range(5)])
            wait_until(lambda: "bridge is unreachable" in (
                c.task(submitted[0]["id"])["waiting_reason"] or ""), 30,
                what="the tasks to report the outage")
            assert all(c.task(t["id"])["state"] != "failed" for t in submitted)
        # kill -9 the submitter while it waits: the journal keeps every task
        a.kill9()
        a.start()
        with bridge_dev(a_home, port, state):
            with Client.from_home(a.home, timeout=120) as c:
                done = [c.task(t["id"], wait=90) for t in submitted]
        assert [t["state"] for t in done] == ["done"] * 5
        assert all(t["output"]["words"] == 2 and t["executed_by"] == "bridge" for t in done)
    finally:
        a.stop()


def test_pull_node_completes_bridge_queue(tmp_path: Path) -> None:
    a_home, p_home = _team(tmp_path, 2)
    port = free_port()
    with bridge_dev(a_home, port, tmp_path / "state") as url:
        a = Daemon(a_home, ["--slots", "0", "--bridge", url]).start()
        try:
            _join(a, p_home)
            # a node that nobody can dial: no listening address, only outbound HTTPS
            puller = subprocess.Popen([*CLI, "-v", "--home", str(p_home), "up", "--pull",
                                       "--bridge", url, "--slots", "2"],
                                      stdout=open(tmp_path / "pull.log", "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_until(lambda: (p_home / "api.json").exists(), 60, what="the pull node")
                assert json.loads((p_home / "api.json").read_text())["addrs"] == []
                p_id = json.loads((p_home / "api.json").read_text())["peer_id"]
                with Client.from_home(a.home, timeout=120) as c:
                    # sleep is not portable: the Worker queues it for pull-mode peers
                    ts = c.submit_batch([{"kind": "sleep", "params": {"seconds": 0.2},
                                          "where": "bridge", "no_cache": True}
                                         for _ in range(4)])
                    done = [c.task(t["id"], wait=90) for t in ts]
                assert [t["state"] for t in done] == ["done"] * 4
                assert {t["executed_by"] for t in done} == {p_id}
            finally:
                puller.send_signal(signal.SIGTERM)
                puller.wait(20)
        finally:
            a.stop()


def test_a_cancel_reaches_the_bridge(tmp_path: Path) -> None:
    """A task queued at the bridge (no pull member yet) that its user cancels is cancelled
    at the Worker too, so a pull member that comes later does not run it."""
    import trio
    from meshtools import journal_value
    from teammesh.node.bridge.client import BridgeClient

    (a_home,) = _team(tmp_path, 1)
    port = free_port()
    with bridge_dev(a_home, port, tmp_path / "state") as url:
        a = Daemon(a_home, ["--slots", "0", "--bridge", url]).start()
        try:
            a_id = a.peer_id
            with Client.from_home(a.home, timeout=60) as c:
                t = c.submit("sleep", params={"seconds": 1}, where="bridge", no_cache=True)
                wait_until(lambda: "queued at the bridge" in (c.task(t["id"])["waiting_reason"]
                                                              or ""), 30,
                           what="the task to be queued at the bridge")
                c.cancel(t["id"])
                assert c.task(t["id"])["state"] == "cancelled"
            key = journal_value(a_home, "bridge_key")
            assert isinstance(key, bytes)

            async def at_worker() -> dict[str, object]:
                async with BridgeClient(url, key, a_id) as bridge:
                    return await bridge.get(t["id"])

            wait_until(lambda: trio.run(at_worker)["state"] == "cancelled", 30,
                       what="the Worker to cancel the task")
            task = trio.run(at_worker)
            assert task["error"] == "cancelled by its submitter"
        finally:
            a.stop()
