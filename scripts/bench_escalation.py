"""Escalation benchmark (issue 8, item 4): submit-to-result time of a task that goes to the
local Worker because the mesh is saturated, split into decision time and bridge round trip.

Per run (fresh temp dirs, everything on 127.0.0.1):

- the Worker: `wrangler dev --local` exactly as node/bridge/dev.py starts it, but from a copy
  of bridge/ in the run's temp dir (node_modules symlinked), so its `.dev.vars` carries this
  run's team key without rewriting bridge/.dev.vars under a concurrent test run;
- a submitter daemon (`--slots 0 --bridge URL`) that created the team, and a worker daemon
  (`--slots 1`) that joined it (tests/meshtools.py `Daemon`, as tests/test_escalation.py);
- the worker's one slot is held by a long `sleep` task submitted from the submitter, so the
  submitter's own view says "all 1 matching slots busy" (placement counts the tasks *it*
  has in flight on a peer; see node/tasks/service.py `_candidates`);
- `WARMUP_TASKS` (2, not counted) + `n_tasks` sequential `hash.sha256` tasks of a fresh random 1 KiB each,
  `AsyncClient.submit(..., wait=True, no_cache=True)`; each must come back `done`,
  `executed_by == "bridge"`, with exactly one attempt (peer "bridge") and the right digest;
- after each, the same request shape sent straight to the Worker with `BridgeClient`
  (node/bridge/client.py; the body the daemon sends in `_run_on_bridge`: id, kind, version, params,
  input_b64, priority, submitter) on a connection kept open like the daemon's. Its input is
  another fresh 1 KiB: the same bytes would be answered from the Worker's KV result cache
  (and `no_cache` would skip the cache lookup and write the daemon's request pays for).

Split of one escalated task (daemon and benchmark share the machine's wall clock):

    t_submit (client)  --decision-->  attempt.started  --bridge round trip-->  result (client)

`attempt.started` is `time.time()` in `TaskService._escalate`, the moment the task is handed
to the bridge. Also reported: `daemon_decision` (the task's `timings.submitted`, taken after
the HTTP request is parsed, to `attempt.started`), `bridge_attempt` (`attempt.started` to
`attempt.ended`: the daemon's own BridgeClient call), `api_overhead` (client total minus
`timings.finished - timings.submitted`), and the submitter daemon's CPU per escalated task.

Figures: per run the p50 / p90 over its tasks; the figure value is the median of the runs'
values, with the per-run values, min and max.

CLI: `python scripts/bench_escalation.py [--tasks 50] [--runs 3]`; one JSON object per
figure on stdout. The daemons inherit the environment, so a what-if such as
`TEAMMESH_SCHEDULER_OFFER_WINDOW_S=0.05` applies to them (and to `offer_window_ms`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_baselines import figure, percentile
from meshtools import Daemon, init_home, run_cli, wait_for_full_mesh, wait_until

BRIDGE_DIR = Path(__file__).resolve().parent.parent / "bridge"
INPUT_BYTES = 1024
WARMUP_TASKS = 2  # the first escalation opens the daemon's connection and wakes the DO
WORKER_START_S = 120.0
DAEMON_START_S = 60.0
MESH_FORM_S = 60.0
TASK_TIMEOUT_S = 60.0  # one escalated task: 0.5 s window + a round trip, generous under load
DIRECT_TIMEOUT_S = 30.0
# The worker caps a task at its executor.timeout_s (300 s by default), so a hold is renewed
# between tasks before it can run out mid-measurement rather than being one very long sleep.
HOLD_S = 240.0
HOLD_MARGIN_S = 20.0
HOLD_PRIORITY = 10
TERMINAL = ("done", "failed", "cancelled")

# name -> (unit, what); the order is the order of the emitted figures
SERIES: dict[str, tuple[str, str]] = {
    "escalation_total": ("ms", "client submit (wait=True) -> result, client-side"),
    "decision": ("ms", "client submit -> task handed to the bridge (attempt.started)"),
    "bridge_round_trip": ("ms", "handed to the bridge -> result at the client (total - decision)"),
    "bridge_attempt": ("ms", "the daemon's BridgeClient call: attempt.started -> attempt.ended"),
    "bridgeclient_direct": ("ms", "BridgeClient.submit straight to the Worker, same request shape"),
    "daemon_decision": ("ms", "timings.submitted (request parsed) -> attempt.started"),
    "api_overhead": ("ms", "client total - (timings.finished - timings.submitted)"),
}


# --- the local Worker -------------------------------------------------------------------
def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """wrangler runs in its own session: end the whole group (workerd, esbuild included)."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    # workerd can outlive wrangler.js; the group id is still the leader's pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def local_worker(tmp: Path, key_hex: str) -> Iterator[str]:
    from teammesh.node.bridge.dev import free_port, wrangler_command, wrangler_env, write_dev_vars

    if not (BRIDGE_DIR / "node_modules" / "wrangler" / "bin" / "wrangler.js").exists():
        raise RuntimeError(f"{BRIDGE_DIR}/node_modules is missing: run `npm ci` in bridge/")
    work = tmp / "bridge"
    shutil.copytree(BRIDGE_DIR, work, symlinks=True,
                    ignore=shutil.ignore_patterns("node_modules", ".wrangler", ".dev.vars",
                                                  "test", "*.tmp"))
    (work / "node_modules").symlink_to(BRIDGE_DIR / "node_modules")
    write_dev_vars(work, key_hex)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp / "wrangler.log", "ab") as log:
        proc = subprocess.Popen(wrangler_command(work, port, tmp / "bridge-state"), cwd=work,
                                env=wrangler_env(tmp / "bridge-state"), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                tail = (tmp / "wrangler.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"wrangler dev exited with {proc.returncode}:\n{tail}")
            try:
                return httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, WORKER_START_S, interval=0.2, what="the local Worker")
        yield url
    finally:
        _stop_group(proc)


# --- the mesh -----------------------------------------------------------------------------
def _team_key(home: Path) -> bytes:
    from teammesh.node.core.config import Home
    from teammesh.node.core.journal import Journal

    journal = Journal(Home(home).journal_file)
    try:
        # the Worker holds the team's master; members hold keys derived from it
        key = journal.get("bridge_master") or journal.get("bridge_key")
    finally:
        journal.close()
    if key is None:
        raise RuntimeError(f"{home} has no team bridge key")
    return key


def _offer_window_s(home: Path) -> float:
    from teammesh.node.core.config import Home, load_config

    return float(load_config(Home(home)).get("scheduler", "offer_window_s"))


def _stop_daemon(d: Daemon) -> None:
    """Stop the daemon by its PID, then any of its children (executor workers) it left."""
    if d.proc is None:
        return
    try:
        kids = psutil.Process(d.proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    d.stop()
    for k in kids:
        with contextlib.suppress(psutil.Error):
            k.kill()
            k.wait(5)


@contextlib.contextmanager
def _no_proxy_for_loopback() -> Iterator[None]:
    """The daemons' BridgeClient honours *_PROXY from the environment (trust_env): make
    sure a proxy set on this machine never sees the 127.0.0.1 traffic."""
    saved = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
    for k in saved:
        parts = [p for p in (os.environ.get(k) or "").split(",") if p]
        os.environ[k] = ",".join([*parts, "127.0.0.1", "localhost"])
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- one measured run -----------------------------------------------------------------------
class _Hold:
    """A long `sleep` on the worker's only slot, submitted by the submitter."""

    def __init__(self, api: Any, worker_id: str) -> None:
        self.api = api
        self.worker_id = worker_id
        self.task_id: str | None = None
        self.until = 0.0

    async def ensure(self) -> None:
        if self.task_id is not None and time.monotonic() < self.until - HOLD_MARGIN_S:
            return
        if self.task_id is not None:
            await self.api.cancel(self.task_id)
        # where=peers: the hold itself must never be escalated
        t = await self.api.submit("sleep", params={"seconds": HOLD_S}, where="peers",
                                  no_cache=True, priority=HOLD_PRIORITY, timeout_s=HOLD_S + 30)
        self.task_id, self.until = t["id"], time.monotonic() + HOLD_S
        with trio.fail_after(DAEMON_START_S):
            while True:
                s = await self.api.task(self.task_id)
                if s["state"] in TERMINAL:
                    raise RuntimeError(f"the hold task ended early: {s}")
                # no waiting_reason once the worker reports it running (not just queued)
                if s["state"] == "running" and not s["waiting_reason"]:
                    break
                await trio.sleep(0.05)
        peer = s["attempts"][-1]["peer"]
        if peer != self.worker_id:
            raise RuntimeError(f"the hold runs on {peer}, not on the worker {self.worker_id}")

    async def release(self) -> None:
        if self.task_id is not None:
            with trio.move_on_after(10):
                await self.api.cancel(self.task_id)


def _check_escalated(task: dict[str, Any], digest: str) -> dict[str, Any]:
    attempts = task.get("attempts") or []
    ok = (task.get("state") == "done" and task.get("executed_by") == "bridge"
          and task.get("output") == digest and len(attempts) == 1
          and attempts[0]["peer"] == "bridge" and attempts[0]["error"] is None
          and attempts[0]["ended"] is not None)
    if not ok:
        raise RuntimeError(f"task was not escalated and run correctly by the bridge: {task}")
    return dict(attempts[0])


def _check_direct(task: dict[str, Any], digest: str) -> None:
    if not (task.get("state") == "done" and task.get("executed_by") == "bridge"
            and task.get("output") == digest and task.get("cached") is False):
        raise RuntimeError(f"direct bridge request did not run the task: {task}")


async def _measure(home: Path, url: str, key: bytes, peer_id: str, worker_id: str,
                   n_tasks: int, sub_pid: int) -> dict[str, Any]:
    from teammesh.node.bridge.client import BridgeClient

    from teammesh.client import AsyncClient

    out: dict[str, Any] = {name: [] for name in SERIES}
    sub = psutil.Process(sub_pid)
    async with AsyncClient.from_home(home, timeout=TASK_TIMEOUT_S) as api, \
            BridgeClient(url, key, peer_id, timeout=DIRECT_TIMEOUT_S) as direct:
        hold = _Hold(api, worker_id)
        try:
            cpu0 = 0.0
            for i in range(WARMUP_TASKS + n_tasks):
                await hold.ensure()
                if i == WARMUP_TASKS:
                    c = sub.cpu_times()
                    cpu0, wall0 = c.user + c.system, time.monotonic()
                data = os.urandom(INPUT_BYTES)
                with trio.fail_after(TASK_TIMEOUT_S):
                    t_wall = time.time()
                    t0 = time.perf_counter()
                    task = await api.submit("hash.sha256", data, wait=True, no_cache=True)
                    total = time.perf_counter() - t0
                att = _check_escalated(task, hashlib.sha256(data).hexdigest())

                other = os.urandom(INPUT_BYTES)
                body = {"id": f"{task['id']}.direct", "kind": "hash.sha256",
                        "version": task["version"], "params": {},
                        "input_b64": base64.b64encode(other).decode(), "priority": 0,
                        "submitter": peer_id}
                with trio.fail_after(DIRECT_TIMEOUT_S):
                    d0 = time.perf_counter()
                    answer = await direct.submit(body)
                    direct_s = time.perf_counter() - d0
                _check_direct(answer, hashlib.sha256(other).hexdigest())
                if i < WARMUP_TASKS:
                    continue
                timings = task["timings"]
                decision = att["started"] - t_wall
                out["escalation_total"].append(total * 1000)
                out["decision"].append(decision * 1000)
                out["bridge_round_trip"].append((total - decision) * 1000)
                out["bridge_attempt"].append((att["ended"] - att["started"]) * 1000)
                out["bridgeclient_direct"].append(direct_s * 1000)
                out["daemon_decision"].append((att["started"] - timings["submitted"]) * 1000)
                out["api_overhead"].append(
                    (total - (timings["finished"] - timings["submitted"])) * 1000)
            c = sub.cpu_times()
            out["submitter_cpu_ms_per_task"] = (c.user + c.system - cpu0) * 1000 / n_tasks
            out["submitter_cpu_pct"] = 100 * (c.user + c.system - cpu0) / (time.monotonic() - wall0)
        finally:
            await hold.release()
    return out


def one_run(n_tasks: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tm-bench-esc-") as tmp_name, \
            _no_proxy_for_loopback():
        tmp = Path(tmp_name)
        sub_home, wrk_home = init_home(tmp / "submitter"), init_home(tmp / "worker")
        run_cli(sub_home, "team", "create", "bench")
        key = _team_key(sub_home)
        window = _offer_window_s(sub_home)
        with local_worker(tmp, key.hex()) as url:
            sub = Daemon(sub_home, ["--slots", "0", "--bridge", url])
            wrk = Daemon(wrk_home, ["--slots", "1"])
            try:
                sub.start(DAEMON_START_S)
                run_cli(wrk_home, "join", run_cli(sub_home, "team", "invite").stdout.strip())
                wrk.start(DAEMON_START_S)
                wait_for_full_mesh([sub, wrk], timeout=MESH_FORM_S)
                assert sub.proc is not None
                r = trio.run(_measure, sub_home, url, key, sub.peer_id, wrk.peer_id, n_tasks,
                             sub.proc.pid)
            finally:
                _stop_daemon(wrk)
                _stop_daemon(sub)
    r["offer_window_ms"] = window * 1000
    return r


# --- figures ------------------------------------------------------------------------------
def bench_escalation(n_tasks: int, runs: int,
                     emit: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Figures (see the module docstring), each also passed to ``emit`` once all runs are
    done (a figure is a median over runs, so none is final before that)."""
    if n_tasks < 1 or runs < 1:
        raise ValueError("n_tasks and runs must be at least 1")
    t0 = time.monotonic()
    load_before = os.getloadavg()
    rs = [one_run(n_tasks) for _ in range(runs)]
    figures: list[dict[str, Any]] = []
    for name, (unit, what) in SERIES.items():
        for q in (50, 90):
            figures.append(figure(f"{name}_p{q}_ms", [percentile(r[name], q) for r in rs], unit,
                                n_tasks=n_tasks, what=what))
    window = rs[0]["offer_window_ms"]
    figures.append(figure("submitter_cpu_ms_per_task",
                        [r["submitter_cpu_ms_per_task"] for r in rs], "ms",
                        what="submitter daemon user+system CPU per escalated task"))
    figures.append(figure("submitter_cpu_pct", [r["submitter_cpu_pct"] for r in rs],
                        "% of one core", what="submitter daemon CPU over the measured tasks"))
    figures.append({"figure": "machine",
                    "value": f"{platform.machine()} {platform.python_version()}"
                             f" cpus={os.cpu_count()}",
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "n_tasks": n_tasks, "n_runs": runs, "warmup_tasks": WARMUP_TASKS,
                    "offer_window_ms": window,
                    "elapsed_s": round(time.monotonic() - t0, 1)})
    for f in figures:
        emit(f)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    bench_escalation(a.tasks, a.runs, lambda f: print(json.dumps(f), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
