"""`teammesh demo`: a real local mesh on 127.0.0.1 in temporary homes, with no external
services. Starts N daemons as subprocesses (the first creates the team, the others join
with invites), waits until every node sees every other, runs real tasks from the first
node (whose own slots are 0, so the work crosses the mesh), prints who ran what, and
stops every process it started."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from teammesh.protocols.errors import TeammeshError

CLI = [sys.executable, "-m", "teammesh.node.cli.main"]


def _cli(home: Path, *args: str) -> str:
    proc = subprocess.run([*CLI, "--home", str(home), *args], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise TeammeshError(f"demo step `teammesh {' '.join(args)}` failed: "
                            f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _start(home: Path, slots: int) -> subprocess.Popen[bytes]:
    log = open(home / "daemon.log", "ab")
    proc = subprocess.Popen([*CLI, "-v", "--home", str(home), "up", "--listen",
                             "/ip4/127.0.0.1/tcp/0", "--slots", str(slots)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60  # generous: a loaded 2-core machine starts slowly
    while not (home / "api.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:  # never leave a half-started node behind
                proc.kill()
                proc.wait()
            raise TeammeshError(f"demo node in {home} did not start; see {home}/daemon.log")
        time.sleep(0.05)
    return proc


def run_demo(n: int, *, keep: bool, quiet: bool) -> dict[str, Any]:
    from teammesh.client import Client

    console = Console(stderr=True, quiet=quiet)
    procs: list[subprocess.Popen[bytes]] = []
    root = Path(tempfile.mkdtemp(prefix="teammesh-demo-"))
    homes = [root / f"node{i}" for i in range(n)]
    t0 = time.monotonic()
    try:
        with console.status("starting a local mesh") as status:
            for h in homes:
                _cli(h, "init")
            _cli(homes[0], "team", "create", "demo")
            procs.append(_start(homes[0], 0))
            for h in homes[1:]:
                status.update(f"enrolling {h.name}")
                invite = _cli(homes[0], "team", "invite").strip()
                _cli(h, "join", invite)
                procs.append(_start(h, 2))
            status.update("waiting for every node to see every other")
            clients = [Client.from_home(h) for h in homes]
            ids = [c.status()["peer_id"] for c in clients]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                seen = [{p["peer_id"] for p in c.peers()} for c in clients]
                if all(s >= set(ids) - {me} for s, me in zip(seen, ids, strict=True)):
                    break
                time.sleep(0.2)
            else:
                raise TeammeshError("the demo mesh did not form within 60 s; see the"
                                    f" daemon.log files under {root}")
        formed = time.monotonic() - t0
        table = Table(title=f"mesh of {n} nodes formed in {formed:.1f} s")
        table.add_column("node")
        table.add_column("peer id")
        table.add_column("sees")
        for h, c, me in zip(homes, clients, ids, strict=True):
            table.add_row(h.name, me, str(len(c.peers())))
        console.print(table)

        payloads = [os.urandom(1024) for _ in range(200)]
        tasks = [{"kind": "hash.sha256", "input_b64": base64.b64encode(p).decode(),
                  "tag": i} for i, p in enumerate(payloads)]
        tasks.append({"kind": "np.montecarlo_pi", "params": {"samples": 200_000, "seed": 7},
                      "tag": "pi"})
        tasks.append({"kind": "text.stats", "input_b64": base64.b64encode(
            b"the quick brown fox jumps over the lazy dog the end").decode(), "tag": "text"})
        results: list[dict[str, Any]] = []
        t1 = time.monotonic()
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("running tasks across the mesh", total=len(tasks))
            for line in clients[0].stream_batch(tasks):
                results.append(line)
                progress.advance(bar)
        elapsed = time.monotonic() - t1
        ok = sum(1 for r in results if r["state"] == "done")
        correct = sum(1 for r in results if isinstance(r["tag"], int) and
                      r["output"] == hashlib.sha256(payloads[r["tag"]]).hexdigest())
        by_peer: dict[str, int] = {}
        for r in results:
            by_peer[r["executed_by"] or "-"] = by_peer.get(r["executed_by"] or "-", 0) + 1
        t = Table(title=f"{len(tasks)} tasks submitted on node0 in {elapsed:.2f} s")
        t.add_column("executed by")
        t.add_column("tasks", justify="right")
        names = dict(zip(ids, (h.name for h in homes), strict=True))
        for peer, count in sorted(by_peer.items()):
            t.add_row(f"{names.get(peer, peer)} {peer[-8:]}", str(count))
        console.print(t)
        extra = {r["tag"]: r["output"] for r in results if r["tag"] in ("pi", "text")}
        console.print(f"sha256 results verified: {correct}/200; montecarlo pi ≈"
                      f" {extra.get('pi', {}).get('pi')}; text words:"
                      f" {extra.get('text', {}).get('words')}")
        summary = {"nodes": n, "peer_ids": ids, "mesh_formed_s": round(formed, 2),
                   "tasks": len(tasks), "done": ok, "sha256_correct": correct,
                   "executed_by": by_peer, "tasks_s": round(elapsed, 3), "homes": str(root)}
        if keep:
            console.print(f"mesh running (homes under {root}); Ctrl-C to stop")
            try:
                while all(p.poll() is None for p in procs):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        if ok != len(tasks) or correct != 200:
            raise TeammeshError(f"demo: only {ok}/{len(tasks)} tasks succeeded; see {root}")
        return summary
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


