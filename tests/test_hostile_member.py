"""A node that stays up: big data, bad ads from a member, floods, restarts, secrets.

Each test starts real daemons on loopback. The misbehaving member is the real daemon with
one patch (tests/hostile_member.py), so it speaks every protocol as a member does. Every
scenario reports what it tried and what was lost (``pytest -m hostile`` prints the table).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshtools import CLI, LOOPBACK, Daemon, init_home, mesh, run_cli, wait_until
from teammesh.node.core.journal import Journal
from teammesh.node.tasks.executor import worker_env
from teammesh.protocols import wire
from teammesh.protocols.capability import CapabilityAd
from teammesh.protocols.errors import MalformedMessage

from teammesh.client import Client

pytestmark = pytest.mark.hostile

HERE = Path(__file__).resolve().parent


class HostileDaemon(Daemon):
    """`teammesh up` with the patch named by ``mode`` (see tests/hostile_member.py)."""

    def __init__(self, home: Path, mode: str, args: list[str] | None = None) -> None:
        super().__init__(home, args or [])
        self.mode = mode

    def start(self, timeout: float = 15.0) -> Daemon:
        self.home.joinpath("api.json").unlink(missing_ok=True)
        self.log = self.home / "daemon.log"
        env = {**os.environ, "TEAMMESH_HOSTILE": self.mode}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "hostile_member.py"), "-v", "--home",
                 str(self.home), "up", "--listen", LOOPBACK, *self.args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        wait_until(lambda: self.home.joinpath("api.json").exists() or self.proc.poll() is not None,
                   timeout, what="the hostile daemon to start")
        assert self.proc.poll() is None, self.log.read_text()
        return self


def assert_alive(*daemons: Daemon) -> None:
    for d in daemons:
        assert d.alive(), f"daemon {d.home.name} died:\n{d.log.read_text()[-4000:]}"
        assert "Traceback" not in d.log.read_text(), d.log.read_text()[-4000:]


def joined(tmp: Path, admin: Daemon, name: str) -> Path:
    home = init_home(tmp / name)
    run_cli(home, "join", run_cli(admin.home, "team", "invite").stdout.strip())
    return home


# --- 1. results and inputs of any size ------------------------------------------------------


def test_big_outputs_and_inputs_go_by_cid_and_no_daemon_dies(tmp_path: Path,
                                                              scenario_report) -> None:
    """15.1: a 1300x1 by 1x1300 matmul (15 KB in, ~15 MB out) once killed the executor
    (FrameTooLarge) and crash-looped it at every restart."""
    import numpy as np

    a = [[float(i)] for i in range(1300)]
    b = [[float(j % 7) for j in range(1300)]]
    expected = np.outer(np.arange(1300.0), np.array([j % 7 for j in range(1300)], float))
    tried = lost = 0
    with mesh(tmp_path, 2, slots=[0, 1]) as (sub, ex):
        wait_until(lambda: len(sub.peers()) == 1, 20, what="the mesh")
        with Client.from_home(sub.home, timeout=180) as c:
            for where_home, where in ((sub.home, ex.peer_id), (ex.home, "local")):
                with Client.from_home(where_home, timeout=180) as cc:
                    t = cc.submit("np.matmul", params={"a": a, "b": b}, wait=True,
                                  no_cache=True)
                tried += 1
                assert t["state"] == "done", t["error"]
                assert t["executed_by"] == where
                ref = t["output"]
                assert set(ref) == {"$cid", "size", "format"}
                assert ref["format"] == "json"
                out = tmp_path / f"mm-{where}.json"
                run_cli(where_home, "get", ref["$cid"], "-o", str(out), timeout=120)
                got = np.array(json.loads(out.read_text()))
                lost += not np.array_equal(got, expected)
                assert np.array_equal(got, expected)
            # several multi-MiB inline inputs queued at once once broke the worker's pipe
            blobs = [os.urandom(3 * 1024 * 1024) for _ in range(5)]
            tasks = [{"kind": "hash.sha256", "input_b64": _b64(x), "no_cache": True}
                     for x in blobs]
            results = {r["id"]: r for r in c.submit_batch(tasks)}
            import hashlib

            for tid, blob in zip(list(results), blobs, strict=True):
                r = c.task(tid, wait=120)
                tried += 1
                assert r["state"] == "done", r["error"]
                lost += r["output"] != hashlib.sha256(blob).hexdigest()
            assert lost == 0
        assert_alive(sub, ex)
    scenario_report("big outputs and queued multi-MiB inputs", tried=tried, lost=lost)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_output_over_the_kind_limit_fails_with_the_limit_named(tmp_path: Path,
                                                               scenario_report) -> None:
    with mesh(tmp_path, 1, extra=[]) as (node,):
        node.stop()
        env_cfg = node.home / "config.toml"
        env_cfg.write_text(env_cfg.read_text() + '\n[executor.kind_max_output_mb]\n'
                           '"np.matmul" = 1\n')
        node.start()
        with Client.from_home(node.home, timeout=120) as c:
            t = c.submit("np.matmul", params={"a": [[1.0]] * 800, "b": [[2.0] * 800]},
                         wait=True, no_cache=True)
            assert t["state"] == "failed"
            assert "1 MiB for np.matmul" in t["error"]
            assert "executor.kind_max_output_mb" in t["error"]
            small = c.submit("np.matmul", params={"a": [[1.0]], "b": [[2.0]]}, wait=True)
            assert small["state"] == "done"
            assert small["output"] == [[2.0]]
        assert_alive(node)
    scenario_report("output over a per-kind limit", tried=2, lost=0)


# --- 2. a member's ads are untrusted data -----------------------------------------------------


BAD_ADS = ["cost=-1", "cost=nan", "cost=1e300", "slots=1000000000", "queue=-5", "free=99"]


def test_capability_ads_with_absurd_values_are_refused() -> None:
    base = dict(peer_id="12D3KooWtest", team_id="t", addrs=(), cores=2, slots=2,
                free_slots=1, memory_bytes=1 << 30, gpus=(), kinds={"sleep": "1"}, queue=0,
                cost=1.0, storage=(), software="x", seq=1, ttl_ms=15000, cert=b"c")
    CapabilityAd.from_wire(wire.unpack(wire.pack(CapabilityAd(**base).to_wire())))
    for field, value in [("cost", -1.0), ("cost", math.nan), ("cost", math.inf),
                         ("cost", 1e300), ("slots", 10**9), ("queue", -5), ("free_slots", 3),
                         ("memory_bytes", 1 << 62), ("cores", -1), ("seq", -1)]:
        ad = CapabilityAd(**{**base, field: value})
        with pytest.raises(MalformedMessage):
            CapabilityAd.from_wire(wire.unpack(wire.pack(ad.to_wire())))


def test_a_member_with_hostile_ads_crashes_nobody(tmp_path: Path, scenario_report) -> None:
    """15.2: an ad with cost = -1 made every member that placed a task on peers divide by
    zero in its dispatch loop, and ad sync handed the ad back after a restart."""
    tried = lost = 0
    with mesh(tmp_path, 2, slots=[0, 1]) as (sub, ex):
        wait_until(lambda: len(sub.peers()) == 1, 20, what="the mesh")
        for i, mode in enumerate(BAD_ADS):
            home = joined(tmp_path, sub, f"bad{i}")
            bad = HostileDaemon(home, f"ad:{mode}", ["--slots", "2",
                                                     "--bootstrap", sub.addr])
            bad.start()
            try:
                bad_id = bad.peer_id
                wait_until(lambda bad_id=bad_id: f"rejected capability ad from {bad_id}"
                           in sub.log.read_text(), 30, what=f"the {mode} ad to be refused")
                assert bad_id not in {p["peer_id"] for p in sub.peers()}
                with Client.from_home(sub.home, timeout=120) as c:
                    ids = [t["id"] for t in c.submit_batch(
                        [{"kind": "base64.encode", "input_b64": _b64(f"{mode}{k}".encode()),
                          "no_cache": True} for k in range(10)])]
                    for k, tid in enumerate(ids):
                        r = c.task(tid, wait=60)
                        tried += 1
                        lost += not (r["state"] == "done" and r["executed_by"] == ex.peer_id
                                     and r["output"] == _b64(f"{mode}{k}".encode()))
                assert_alive(sub, ex)
            finally:
                bad.stop()
        # a restart takes ads from ad sync: the bad ads must not come back with them
        sub.stop()
        sub.start()
        wait_until(lambda: len(sub.peers()) >= 1, 30, what="the mesh after a restart")
        with Client.from_home(sub.home, timeout=120) as c:
            r = c.submit("base64.encode", b"after restart", wait=True, no_cache=True)
            tried += 1
            lost += r["state"] != "done"
        assert_alive(sub, ex)
    assert lost == 0
    scenario_report("hostile ads (negative, NaN, huge, free>slots)", tried=tried, lost=lost,
                    note=f"{len(BAD_ADS)} hostile members")


# --- 3. fair share: a member's flood delays its own work ----------------------------------------


def test_a_flooding_member_delays_only_itself(tmp_path: Path, scenario_report) -> None:
    """15 deliverable 4: the executor serves members in turn, so an honest member's tasks
    do not wait behind another member's flood (FIFO would run the queued flood first)."""
    flood_n = 150
    with mesh(tmp_path, 2, slots=[1, 0]) as (ex, honest):
        flooder = HostileDaemon(joined(tmp_path, ex, "flooder"), "pipeline:64",
                                ["--slots", "0", "--bootstrap", ex.addr]).start()
        try:
            for d in (flooder, honest):
                wait_until(lambda d=d: any(p["peer_id"] == ex.peer_id for p in d.peers()),
                           30, what="the executor's ad")
            with Client.from_home(flooder.home, timeout=120) as fc, \
                    Client.from_home(honest.home, timeout=120) as hc:
                flood = [t["id"] for t in fc.submit_batch(
                    [{"kind": "sleep", "params": {"seconds": 0.05}, "no_cache": True,
                      "tag": k} for k in range(flood_n)])]
                wait_until(lambda: ex.cli("status")["queue"] >= 30, 30,
                           what="the flood to fill the executor's queue")
                mine = [t["id"] for t in hc.submit_batch(
                    [{"kind": "sleep", "params": {"seconds": 0.05}, "no_cache": True,
                      "tag": k} for k in range(5)])]
                done = [hc.task(tid, wait=120) for tid in mine]
                assert all(r["state"] == "done" for r in done), [r["error"] for r in done]
                flood_done = sum(1 for t in fc.tasks(limit=1000) if t["state"] == "done")
                assert flood_done < 30, flood_done
                rest = [fc.task(tid, wait=180) for tid in flood]
                lost = sum(r["state"] != "done" for r in rest)
            assert_alive(ex, honest)
        finally:
            flooder.stop()
    assert lost == 0
    scenario_report("task flood from one member", tried=flood_n + 5, lost=lost,
                    note=f"honest tasks done after {flood_done} of the flood")


# --- 4. no crash loop ---------------------------------------------------------------------------


def test_a_task_running_when_the_node_dies_runs_at_most_twice_more(tmp_path: Path,
                                                                  scenario_report) -> None:
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        with Client.from_home(node.home) as c:
            tid = c.submit("sleep", params={"seconds": 120}, no_cache=True)["id"]
        for _crash in range(3):
            def running() -> bool:
                with Client.from_home(node.home) as c:
                    return c.task(tid)["state"] == "running"

            wait_until(running, 30, what="the task to run")
            time.sleep(0.5)  # the dispatcher journals a start at the end of its pass
            node.kill9()
            node.start()
        with Client.from_home(node.home) as c:
            t = c.task(tid)
            assert t["state"] == "failed"
            assert "the node stopped while running it" in t["error"]
            # and the node works
            r = c.submit("base64.encode", b"still here", wait=True, no_cache=True)
            assert r["state"] == "done"
        assert node.alive()
    scenario_report("node killed 3 times while a task runs", tried=3, lost=0)


def test_a_clean_stop_does_not_count_against_a_running_task(tmp_path: Path) -> None:
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        with Client.from_home(node.home) as c:
            tid = c.submit("sleep", params={"seconds": 3}, no_cache=True)["id"]
        for _ in range(3):
            wait_until(lambda: Client.from_home(node.home).task(tid)["state"] == "running",
                       30, what="the task to run")
            time.sleep(0.3)
            node.stop()
            node.start()
        with Client.from_home(node.home) as c:
            assert c.task(tid, wait=60)["state"] == "done"


# --- 5. secrets --------------------------------------------------------------------------------


def test_workers_do_not_inherit_secrets_and_the_home_is_private(tmp_path: Path,
                                                                monkeypatch) -> None:
    secret = "s3cr3t-" + os.urandom(4).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("TEAMMESH_R2_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("MY_API_TOKEN", secret)
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        with Client.from_home(node.home) as c:
            tid = c.submit("sleep", params={"seconds": 20}, no_cache=True)["id"]
            wait_until(lambda: c.task(tid)["state"] == "running", 30, what="the task")
        assert node.proc is not None
        # Workers that have started (exec'd): between fork and exec a child's environ is
        # still the daemon's, which is not what the worker runs with. The daemon's own
        # environment has no TEAMMESH_WORKER_MEMORY_MB; a worker's always does.
        workers = wait_until(lambda: _worker_envs(node.proc.pid), 10, what="a worker process")
        for env in workers:
            assert secret.encode() not in env
        for name in ("config.toml", "journal.db", "api.token", "identity.key"):
            mode = (node.home / name).stat().st_mode & 0o777
            assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
    assert worker_env({"PATH": "/bin", "CF_API_TOKEN": "x", "R2_KEY": "y"}) == {"PATH": "/bin"}


def _worker_envs(pid: int) -> list[bytes]:
    """The environments of ``pid``'s children that are worker processes."""
    envs = []
    for child in _children(pid):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes()
        except OSError:
            continue
        if b"TEAMMESH_WORKER_MEMORY_MB=" in env:
            envs.append(env)
    return envs


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(p.name))
    return out


def test_an_old_home_is_made_private_at_start(tmp_path: Path) -> None:
    home = init_home(tmp_path / "old")
    os.chmod(home / "config.toml", 0o644)
    run_cli(home, "team", "create", "t")
    os.chmod(home / "journal.db", 0o644)
    d = Daemon(home, ["--slots", "0"]).start()
    try:
        for name in ("config.toml", "journal.db"):
            assert (home / name).stat().st_mode & 0o077 == 0, name
    finally:
        d.stop()


# --- 6. the journal stays bounded ----------------------------------------------------------------


def test_journal_forgets_old_finished_tasks_and_cache_entries(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.db")
    now = time.time()
    day = 86400.0
    rows = [("old-done", "done", now - 40 * day), ("old-failed", "failed", now - 40 * day),
            ("old-queued", "queued", now - 40 * day), ("new-done", "done", now - day)]
    for tid, state, t in rows:
        j.db.execute("INSERT INTO tasks(id, kind, version, input, params, options, state,"
                     " attempts, submitted, finished) VALUES(?,?,?,?,?,?,?,?,?,?)",
                     (tid, "k", "1", b"", "{}", "{}", state, "[]", t, t))
    j.db.execute("INSERT INTO cache(key, output, created) VALUES('a', x'00', ?)",
                 (now - 10 * day,))
    j.db.execute("INSERT INTO cache(key, output, created) VALUES('b', x'00', ?)", (now,))
    gone = j.prune(now, 30 * day, 7 * day)
    assert gone["tasks"] == 2
    assert gone["cache"] == 1
    left = {r[0] for r in j.db.execute("SELECT id FROM tasks")}
    assert left == {"old-queued", "new-done"}  # an unfinished task is never forgotten
    assert [r[0] for r in j.db.execute("SELECT key FROM cache")] == ["b"]
    j.close()


def test_result_cache_entries_expire(tmp_path: Path) -> None:
    with mesh(tmp_path, 1, slots=[1]) as (node,):
        node.stop()
        cfg = node.home / "config.toml"
        # long enough that the repeat below is still a hit on a loaded machine
        cfg.write_text(cfg.read_text().replace("[scheduler]", "[scheduler]\ncache_ttl_s = 5", 1)
                       if "[scheduler]" in cfg.read_text()
                       else cfg.read_text() + "\n[scheduler]\ncache_ttl_s = 5\n")
        node.start()
        with Client.from_home(node.home) as c:
            first = c.submit("base64.encode", b"cache me", wait=True)
            again = c.submit("base64.encode", b"cache me", wait=True)
            assert not first["cached"]
            assert again["cached"]
            time.sleep(5.5)  # past the TTL: the entry must be gone, whatever the load
            later = c.submit("base64.encode", b"cache me", wait=True)
            assert later["state"] == "done"
            assert not later["cached"]


assert CLI  # the module runs the same CLI as meshtools


# --- 7. a member at the stream level -------------------------------------------------------------


def _rss_kib(d: Daemon) -> int:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _honest_batch(home: Path, n: int, tag: str) -> tuple[int, int]:
    """Submit n tasks from ``home``; (tried, lost): lost = not done or a wrong output."""
    with Client.from_home(home, timeout=120) as c:
        ids = [t["id"] for t in c.submit_batch(
            [{"kind": "base64.encode", "input_b64": _b64(f"{tag}-{k}".encode()),
              "no_cache": True} for k in range(n)])]
        results = [c.task(tid, wait=120) for tid in ids]
    lost = sum(not (r["state"] == "done" and r["output"] == _b64(f"{tag}-{k}".encode()))
               for k, r in enumerate(results))
    return n, lost


def test_forged_results_are_refused_and_the_forger_penalised(tmp_path: Path,
                                                             scenario_report) -> None:
    with mesh(tmp_path, 2, slots=[0, 1]) as (sub, ex):
        forger = HostileDaemon(joined(tmp_path, sub, "forger"), "forge",
                               ["--slots", "4", "--bootstrap", sub.addr]).start()
        try:
            wait_until(lambda: len(sub.peers()) == 2, 30, what="the forger's ad")
            tried, lost = _honest_batch(sub.home, 40, "forged")
            with Client.from_home(sub.home) as c:
                by = {t["executed_by"] for t in c.tasks(limit=100)}
            assert forger.peer_id not in by
            log = sub.log.read_text()
            assert f"dropping link to {forger.peer_id}" in log
            assert "does not match its digest" in log
            assert_alive(sub, ex)
        finally:
            forger.stop()
    assert lost == 0
    scenario_report("forged results (altered outputs, foreign ids)", tried=tried, lost=lost)


def test_replays_bombs_and_slow_streams_on_the_task_protocol(tmp_path: Path,
                                                             scenario_report) -> None:
    import msgpack
    import trio
    from teammesh.node.p2p.host import STREAM_ERRORS, DialError, open_host
    from teammesh.node.p2p.protocol_ids import PING, TASKS
    from teammesh.protocols import tasks as tp
    from teammesh.protocols.identity import Identity

    with mesh(tmp_path, 2, slots=[0, 1]) as (sub, ex):
        wait_until(lambda: len(sub.peers()) == 1, 20, what="the mesh")
        member = joined(tmp_path, sub, "member")
        seed = (member / "identity.key").read_bytes()
        me = Identity(seed).peer_id
        # an honest task of the submitter's, running on the executor: a member that
        # learns its id cannot take it over (once acked, an id is forgotten: reusing it
        # then only runs the reuser's own task, for the reuser)
        with Client.from_home(sub.home) as c:
            honest = c.submit("sleep", params={"seconds": 8}, no_cache=True)
            wait_until(lambda: c.task(honest["id"])["state"] == "running", 30,
                       what="the honest task to run")
        rss_before = _rss_kib(ex)
        addr, ex_id = ex.addr, ex.peer_id
        seen: dict[str, object] = {}

        async def read_until(stream, decoder, want: str):  # type: ignore[no-untyped-def]
            with trio.fail_after(60):  # behind the honest 8 s task, on a loaded CI machine
                while True:
                    data = await stream.read()
                    assert data, "the executor closed the stream"
                    for f in decoder.feed(data):
                        m = wire.unpack(f)
                        if m["t"] == want:
                            return m

        async def attack() -> None:
            # it answers keepalive pings, as every node does: otherwise the executor cuts it
            # off as silent while it waits its turn behind the honest 8 s task
            async with open_host(seed, [LOOPBACK], peer_gate=lambda p: True,
                                 stream_gate=lambda p, proto: proto == PING, gossip=False) as host:
                with trio.fail_after(10):
                    await host.connect(addr)
                stream = await host.open_stream(ex_id, TASKS)
                dec = wire.FrameDecoder()
                mine = tp.TaskSpec("replay-" + os.urandom(4).hex(), "base64.encode", "1",
                                   b"mine", {}, 10_000)
                stolen = tp.TaskSpec(honest["id"], "base64.encode", "1", b"stolen", {}, 10_000)
                await stream.write(tp.assign([mine, stolen]))
                acc = await read_until(stream, dec, "accepted")
                assert acc["ids"] == [mine.id]
                assert acc["refused"][0][:2] == [stolen.id, "duplicate"]
                res = await read_until(stream, dec, "results")
                first = tp.open_results(res["sealed"], ex_id, me)
                # the same assignment again: answered from the journal, not run again
                await stream.write(tp.assign([mine]))
                res = await read_until(stream, dec, "results")
                again = tp.open_results(res["sealed"], ex_id, me)
                assert [r.digest for r in again] == [r.digest for r in first]
                seen["replays"] = 2
                await stream.reset()
                # bombs: 8 MiB of empty maps, and 100,000 levels of nesting
                n = wire.MAX_FRAME_BYTES - 64
                bomb = (b"\x83" + msgpack.packb("t") + msgpack.packb("assign")
                        + msgpack.packb("v") + msgpack.packb(1) + msgpack.packb("tasks")
                        + b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n)
                deep = (b"\x83" + msgpack.packb("t") + msgpack.packb("assign")
                        + msgpack.packb("v") + msgpack.packb(1) + msgpack.packb("tasks")
                        + b"\x91" * 100_000 + b"\xc0")
                for payload in (bomb, deep):
                    s = await host.open_stream(ex_id, TASKS)
                    try:
                        await s.write(wire.frame(payload))
                        with trio.fail_after(30):
                            while await s.read():
                                pass
                    except STREAM_ERRORS:
                        pass
                seen["bombs"] = 2
                # slow loris: many streams, each holding half a frame (the executor may
                # have dropped our connection after the bombs: come back first)
                with trio.fail_after(10):
                    await host.connect(addr)
                slow = []
                for _ in range(100):
                    try:
                        s = await host.open_stream(ex_id, TASKS)
                        await s.write(b"\x85")  # a varint that promises more
                        slow.append(s)
                    except (*STREAM_ERRORS, DialError):
                        break
                seen["slow"] = len(slow)
                # honest traffic flows meanwhile
                tried, lost = await trio.to_thread.run_sync(_honest_batch, sub.home, 20, "loris")
                seen["honest"] = (tried, lost)
                for s in slow:
                    await s.reset()

        trio.run(attack)
        rss_after = _rss_kib(ex)
        assert_alive(sub, ex)
        tried, lost = seen["honest"]  # type: ignore[misc]
        assert lost == 0
        # the 8 MiB bomb once cost ~620 MB; allow the executor its normal working set
        assert rss_after - rss_before < 150 * 1024, (rss_before, rss_after)
    scenario_report("replayed and stolen assignments", tried=3, lost=0)
    scenario_report("msgpack bombs (8 MiB of maps, 100k nesting)", tried=2, lost=0,
                    note=f"RSS {rss_before // 1024} -> {rss_after // 1024} MiB")
    scenario_report("slow-loris task streams + honest batch", tried=tried, lost=lost,
                    note=f"{seen['slow']} half-open streams")


def test_oversized_params_and_a_100k_kind_ad_are_refused(tmp_path: Path,
                                                         scenario_report) -> None:
    import trio
    from teammesh.node.p2p.host import open_host
    from teammesh.node.p2p.protocol_ids import ADS_SYNC, PING
    from teammesh.protocols.errors import TeammeshError
    from teammesh.protocols.identity import Identity

    with mesh(tmp_path, 2, slots=[0, 1]) as (sub, ex):
        wait_until(lambda: len(sub.peers()) == 1, 20, what="the mesh")
        with Client.from_home(sub.home) as c:
            with pytest.raises(TeammeshError, match=r"params.*limit"):
                c.submit("np.stats", params={"values": list(range(400_000))})
            assert c.submit("base64.encode", b"fine", wait=True)["state"] == "done"
        member = joined(tmp_path, sub, "member")
        ident = Identity((member / "identity.key").read_bytes())
        team = sub.cli("status")["team"]["id"]
        huge = CapabilityAd(peer_id=ident.peer_id, team_id=team, addrs=(), cores=2, slots=2,
                            free_slots=2, memory_bytes=1 << 30, gpus=(),
                            kinds={f"k{i}": "1" for i in range(100_000)}, queue=0, cost=1.0,
                            storage=(), software="x", seq=1, ttl_ms=15_000, cert=b"")
        from teammesh.protocols.envelope import seal

        sealed = seal(ident, "cap", huge.to_wire())
        addr, peer = sub.addr, sub.peer_id

        async def push() -> None:
            async with open_host(ident.seed, [LOOPBACK], peer_gate=lambda p: True,
                                 stream_gate=lambda p, proto: proto == PING, gossip=False) as host:
                with trio.fail_after(10):
                    await host.connect(addr)
                s = await host.open_stream(peer, ADS_SYNC)
                await s.write(wire.frame_message({"t": "ads", "v": 1, "ads": [[sealed, 0]]}))
                with trio.move_on_after(5):
                    while await s.read():
                        pass

        trio.run(push)
        assert ident.peer_id not in {p["peer_id"] for p in sub.peers()}
        with Client.from_home(sub.home) as c:
            kinds = {k["name"] for k in c.kinds()}
        assert "k99999" not in kinds
        assert_alive(sub, ex)
    scenario_report("oversized params, an ad with 100,000 kinds", tried=2, lost=0)


def test_a_member_sending_malformed_streams_is_benched(tmp_path: Path, scenario_report) -> None:
    """15 deliverable 2: peer input resets the stream, penalises the peer, and is logged
    with its id; honest members are not affected."""
    import trio
    from teammesh.node.p2p.host import STREAM_ERRORS, DialError, open_host
    from teammesh.node.p2p.protocol_ids import PING, ROSTER_SYNC
    from teammesh.protocols.identity import Identity

    with mesh(tmp_path, 2, slots=[0, 1]) as (sub, ex):
        wait_until(lambda: len(sub.peers()) == 1, 20, what="the mesh")
        member = joined(tmp_path, sub, "member")
        seed = (member / "identity.key").read_bytes()
        bad_id = Identity(seed).peer_id
        addr, peer = ex.addr, ex.peer_id
        outcome: dict[str, int] = {"sent": 0, "refused_after": 0}

        async def attack() -> None:
            async with open_host(seed, [LOOPBACK], peer_gate=lambda p: True,
                                 stream_gate=lambda p, proto: proto == PING, gossip=False) as host:
                with trio.fail_after(10):
                    await host.connect(addr)
                for _ in range(12):
                    try:
                        s = await host.open_stream(peer, ROSTER_SYNC)
                        await s.write(wire.frame(b"\xc1 not msgpack"))
                        with trio.fail_after(5):
                            while await s.read():
                                pass
                        outcome["sent"] += 1
                    except (*STREAM_ERRORS, DialError):
                        outcome["sent"] += 1
                # benched: a well-formed request is refused now
                try:
                    with trio.fail_after(10):
                        await host.connect(addr)
                    s = await host.open_stream(peer, ROSTER_SYNC)
                    await s.write(wire.frame_message({"t": "roster", "v": 1, "certs": [],
                                                      "revocations": []}))
                    with trio.fail_after(5):
                        got = await s.read()
                    outcome["refused_after"] = int(not got)
                except (*STREAM_ERRORS, DialError, trio.TooSlowError):
                    outcome["refused_after"] = 1

        trio.run(attack)
        assert outcome["refused_after"] == 1
        assert f"penalising {bad_id}" in ex.log.read_text()
        assert ex.cli("status")["refused"]["penalised"] >= 1
        tried, lost = _honest_batch(sub.home, 10, "after-bench")
        assert lost == 0
        assert_alive(sub, ex)
    scenario_report("malformed streams from one member (benched)", tried=outcome["sent"] + tried,
                    lost=lost)


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 6 MiB tmpfs the test mounts itself (root works on this machine kind)."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_refuses_new_tasks_clearly_and_keeps_the_accepted(
        small_disk: Path, scenario_report) -> None:
    from teammesh.protocols.errors import TeammeshError

    home = init_home(small_disk / "n0")
    run_cli(home, "team", "create", "t")
    node = Daemon(home, ["--slots", "0"]).start()
    accepted: list[str] = []
    refusal = ""
    try:
        with Client.from_home(home, timeout=60) as c:
            for _ in range(40):  # 40 x 512 KiB is past the 6 MiB disk
                try:
                    accepted.append(c.submit("base64.encode", os.urandom(512 * 1024),
                                             no_cache=True)["id"])
                except TeammeshError as exc:
                    refusal = str(exc)
                    break
            assert refusal, "the disk never filled"
            assert "free disk space" in refusal
            assert node.alive(), node.log.read_text()[-3000:]
            listed = {t["id"]: t["state"] for t in c.tasks(limit=100)}
            lost = sum(1 for tid in accepted if listed.get(tid) != "queued")
            assert lost == 0
    finally:
        node.stop()
    # the journal on the full disk still holds every accepted task
    import sqlite3

    db = sqlite3.connect(f"file:{home / 'journal.db'}?mode=ro", uri=True)
    try:
        stored = {row[0] for row in db.execute("SELECT id FROM tasks")}
    finally:
        db.close()
    lost = sum(1 for tid in accepted if tid not in stored)
    assert lost == 0
    scenario_report("a full disk under a submitter", tried=len(accepted) + 1, lost=lost,
                    note=f"{len(accepted)} accepted, then a clear refusal")
