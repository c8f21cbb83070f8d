"""Mesh scale benchmark: N `teammesh up` daemons, each its own process, on 127.0.0.1.

Per team size N (default 10, 20, 50) and run:

1. Setup (not timed as a figure, reported as ``setup_s``): N homes (``Home.init``), the
   first creates the team and runs with a fixed loopback port; one one-time invite per node
   from its control API; the joins run in this process a few at a time (``join_parallel``),
   each the same ``membership.join`` the CLI's `teammesh join` calls. The admin is stopped.
2. Formation: every daemon is spawned (`python -m teammesh.node.cli.main up`, fixed loopback
   port, bootstrap = the admin from its invite plus ``extra_bootstrap`` random others),
   at most ``spawn_window`` of them starting at a time. ``form_s`` = first spawn -> every
   node's GET /v1/peers lists the N-1 others; ``all_ready_s`` = first spawn -> last api.json.
3. Idle: ``settle_s`` after formation, then over ``idle_s`` with no API traffic, per daemon
   process CPU (psutil user+system time / wall) and RSS.
4. Propagation: ``changes`` times, POST /v1/capacity {"slots": k} on one node (a different
   one each time), then read every other node's /v1/peers. Arrival on a node is measured
   without fast polling: each peer entry carries ``age_s`` (now - time the entry was stored
   in that daemon), so arrival = (time our response came back) - age_s, an upper bound
   whose error is at most the request round trip (reported as ``poll_rtt_ms``). The
   origin is the moment the POST was sent, so the figure includes the daemon's 50 ms
   coalescing of capacity changes (node/p2p/mesh.py CHANGE_COALESCE_S). The next periodic ad
   of the changed node is 5 s later, so the entry read is the one the change created
   (checked: every node must report the same ``seq``).

Figures are dicts like scripts/bench_baselines.py's: figure, value (median over runs), unit,
runs, min, max. Percentiles over nodes pool all (node, change) arrivals of a run.

CLI: ``python scripts/bench_mesh.py [--sizes 10,20,50] [--runs R] [--quick] [--profile DIR]``
prints one JSON object per figure on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_baselines import figure
from bench_baselines import percentile as base_percentile

CLI = [sys.executable, "-m", "teammesh.node.cli.main"]
HOST = "127.0.0.1"


def percentile(values: list[float], q: float) -> float:
    """q in [0, 1]; NaN when nothing was measured (see bench_baselines.percentile)."""
    return base_percentile(values, q * 100) if values else float("nan")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    index: int
    home: Path
    port: int
    peer_id: str = ""
    token: str = ""
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    spawned_at: float = 0.0
    ready_at: float = 0.0
    full_at: float = 0.0
    extra: list[str] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return f"/ip4/{HOST}/tcp/{self.port}/p2p/{self.peer_id}"

    def spawn(self, bootstrap: list[str], slots: int) -> None:
        self.home.joinpath("api.json").unlink(missing_ok=True)
        args = [*CLI, "--home", str(self.home), "up", "--listen",
                f"/ip4/{HOST}/tcp/{self.port}", "--slots", str(slots)]
        for b in bootstrap:
            args += ["--bootstrap", b]
        with open(self.home / "daemon.log", "ab") as log:
            self.spawned_at = time.monotonic()
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def check_ready(self) -> bool:
        f = self.home / "api.json"
        if not f.exists():
            return False
        try:
            self.url = json.loads(f.read_text())["url"]
        except (ValueError, KeyError):
            return False
        self.token = (self.home / "api.token").read_text().strip()
        self.ready_at = self.ready_at or time.monotonic()
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


def stop_all(nodes: list[Node], timeout: float = 15.0) -> None:
    """SIGTERM every process we started (by its PID), wait, SIGKILL leftovers."""
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            try:
                n.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for n in nodes:
        if n.proc is None:
            continue
        try:
            n.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait(5)


def _wait_file(node: Node, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.check_ready():
            return
        if not node.alive():
            raise RuntimeError(f"daemon {node.index} exited:\n"
                               f"{(node.home / 'daemon.log').read_text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"daemon {node.index} not ready after {timeout} s")


# --- setup: homes, team, invites, joins --------------------------------------------------

def setup_team(tmp: Path, n: int, join_parallel: int = 8) -> list[Node]:
    import httpx
    import trio
    from teammesh.node.core.config import Home
    from teammesh.node.core.journal import Journal
    from teammesh.node.p2p.membership import Membership, join

    ports = free_ports(n)
    nodes = []
    for i in range(n):
        home = Home(tmp / f"n{i}")
        ident, _ = home.init()
        nodes.append(Node(i, home.path, ports[i], peer_id=ident.peer_id))
    admin_home = Home(nodes[0].home)
    journal = Journal(admin_home.journal_file)
    try:
        Membership(admin_home, journal, admin_home.identity()).create_team("bench")
    finally:
        journal.close()
    admin = nodes[0]
    admin.spawn([], 0)
    try:
        _wait_file(admin, 60)
        with httpx.Client(timeout=30) as c:
            invites = [c.post(f"{admin.url}/v1/team/invite", json={"ttl_s": 3600},
                              headers=admin.headers()).raise_for_status().json()["invite"]
                       for _ in range(n - 1)]

        async def join_all() -> None:
            limit = trio.CapacityLimiter(join_parallel)

            async def one(node: Node, invite: str) -> None:
                async with limit:
                    home = Home(node.home)
                    j = Journal(home.journal_file)
                    try:
                        with trio.fail_after(60):
                            await join(home, j, home.identity(), invite)
                    finally:
                        j.close()

            async with trio.open_nursery() as nursery:
                for node, inv in zip(nodes[1:], invites, strict=True):
                    nursery.start_soon(one, node, inv)

        trio.run(join_all)
    finally:
        stop_all([admin])
    admin.proc = None
    admin.ready_at = 0.0
    return nodes


# --- async helpers (trio + httpx) --------------------------------------------------------

async def _peers(client: Any, node: Node) -> tuple[list[dict[str, Any]], float, float]:
    t_send = time.monotonic()
    r = await client.get(f"{node.url}/v1/peers", headers=node.headers())
    t_recv = time.monotonic()
    r.raise_for_status()
    return r.json(), t_send, t_recv


async def _form(nodes: list[Node], slots: int, extra_bootstrap: int, spawn_window: int,
                form_timeout: float, rng: random.Random) -> tuple[float, int, int]:
    """Spawn everything; return (first spawn -> every node lists all others at once,
    times a node that listed all others lost one again before that)."""
    import httpx
    import trio

    ids = {n.peer_id for n in nodes}
    t0 = time.monotonic()
    starting = trio.Semaphore(spawn_window)
    done = trio.Event()

    full: dict[int, bool] = {}
    flaps = [0]

    async def watch(client: Any, node: Node) -> None:
        while not node.check_ready():
            if not node.alive():
                raise RuntimeError(f"daemon {node.index} exited:\n"
                                   f"{(node.home / 'daemon.log').read_text()[-3000:]}")
            await trio.sleep(0.05)
        starting.release()
        want = ids - {node.peer_id}
        while not done.is_set():
            try:
                peers, _, t_recv = await _peers(client, node)
                now_full = {p["peer_id"] for p in peers} == want
                if now_full and not full.get(node.index):
                    node.full_at = t_recv
                elif full.get(node.index) and not now_full:
                    flaps[0] += 1
                full[node.index] = now_full
                if len(full) == len(nodes) and all(full.values()):
                    done.set()
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.5)

    async with httpx.AsyncClient(timeout=10,
                                 limits=httpx.Limits(max_connections=len(nodes) + 4)) as client:
        with trio.move_on_after(form_timeout):
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    await starting.acquire()
                    others = [m for m in nodes if m is not node and m.index != 0]
                    boot = [nodes[0].addr] if node.index != 0 else []
                    boot += [m.addr for m in rng.sample(others, min(extra_bootstrap, len(others)))]
                    node.spawn(boot if node.index != 0 else [], slots)
                    nursery.start_soon(watch, client, node)
    n_full = sum(1 for v in full.values() if v)
    if not done.is_set():  # not formed within the timeout: report how far it got
        return float("nan"), flaps[0], n_full
    return max(n.full_at for n in nodes) - t0, flaps[0], n_full


def _cpu_rss(nodes: list[Node], window: float) -> tuple[list[float], list[float], list[float]]:
    """Per daemon: CPU % over the window, RSS MiB at its end, and child RSS MiB."""
    import psutil

    procs = [psutil.Process(n.proc.pid) for n in nodes if n.proc is not None]
    t_a = time.monotonic()
    a = [p.cpu_times() for p in procs]
    time.sleep(window)
    b = [p.cpu_times() for p in procs]
    wall = time.monotonic() - t_a
    cpu = [100 * ((y.user - x.user) + (y.system - x.system)) / wall for x, y in zip(a, b, strict=True)]
    rss = [p.memory_info().rss / 2**20 for p in procs]
    child = [sum(c.memory_info().rss for c in p.children(recursive=True)) / 2**20 for p in procs]
    return cpu, rss, child


async def _arrival(client: Any, limit: Any, node: Node, src: Node, new: int, t_post: float,
                   deadline: float, arrivals: dict[int, tuple[float, int]],
                   rtts: list[float]) -> None:
    """Read node's view of src until it shows ``new`` slots; arrival from age_s."""
    import httpx
    import trio

    async with limit:
        while time.monotonic() < deadline:
            try:
                peers, t_send, t_recv = await _peers(client, node)
            except httpx.HTTPError:
                await trio.sleep(0.05)
                continue
            for p in peers:
                if p["peer_id"] == src.peer_id and p["slots"] == new:
                    arrivals[node.index] = (t_recv - p["age_s"] - t_post, p["seq"])
                    rtts.append(t_recv - t_send)
                    return
            await trio.sleep(0.05)


async def _propagate(nodes: list[Node], changes: int, rng: random.Random,
                     wait_s: float = 15.0) -> dict[str, Any]:
    """Per change: POST /v1/capacity on one node; arrival per other node from age_s."""
    import httpx
    import trio

    lat: list[float] = []
    rtts: list[float] = []
    missing = 0
    seq_mismatch = 0
    slots_now = {n.index: None for n in nodes}
    order = list(range(1, len(nodes))) if len(nodes) > 1 else [0]
    rng.shuffle(order)
    async with httpx.AsyncClient(timeout=10,
                                 limits=httpx.Limits(max_connections=len(nodes) + 4)) as client:
        for k in range(changes):
            src = nodes[order[k % len(order)]]
            new = 2 + (k % 7) if slots_now[src.index] != 2 + (k % 7) else 9
            slots_now[src.index] = new
            t_post = time.monotonic()
            r = await client.post(f"{src.url}/v1/capacity", json={"slots": new},
                                  headers=src.headers())
            r.raise_for_status()
            await trio.sleep(0.3)
            arrivals: dict[int, tuple[float, int]] = {}
            deadline = time.monotonic() + wait_s

            others = [n for n in nodes if n is not src]
            limit = trio.CapacityLimiter(16)
            async with trio.open_nursery() as nursery:
                for n in others:
                    nursery.start_soon(_arrival, client, limit, n, src, new, t_post, deadline,
                                       arrivals, rtts)
            missing += len(others) - len(arrivals)
            seqs = [s for _, s in arrivals.values()]
            if seqs:
                want = min(seqs)
                seq_mismatch += sum(1 for s in seqs if s != want)
            lat += [a * 1000 for a, _ in arrivals.values()]
            await trio.sleep(0.7)  # let the network go quiet before the next change
    return {"lat_ms": lat, "rtt_ms": [x * 1000 for x in rtts], "missing": missing,
            "seq_mismatch": seq_mismatch}


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration",
                             str(int(seconds)), "--rate", "250", "--nonblocking",
                             "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _reap(spies: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    """Wait for our py-spy processes; end any that overran, by PID."""
    deadline = time.monotonic() + timeout
    for s in spies:
        try:
            s.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            s.kill()
            s.wait(5)


def one_run(n: int, *, changes: int, idle_s: float, settle_s: float = 3.0, slots: int = 1,
            extra_bootstrap: int = 2, spawn_window: int = 4, join_parallel: int = 8,
            seed: int = 0, profile_dir: Path | None = None,
            form_timeout_s: float | None = None) -> dict[str, Any]:
    import trio

    rng = random.Random(seed)
    t_wall = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f"tm-mesh{n}-"))
    nodes: list[Node] = []
    try:
        t_setup = time.monotonic()
        nodes = setup_team(tmp, n, join_parallel)
        setup_s = time.monotonic() - t_setup
        form_s, flaps, n_full = trio.run(_form, nodes, slots, extra_bootstrap, spawn_window,
                          form_timeout_s or 60.0 + 4.0 * n, rng)
        t0 = min(x.spawned_at for x in nodes)
        all_ready_s = max(x.ready_at or float("nan") for x in nodes) - t0
        start_to_ready = [x.ready_at - x.spawned_at for x in nodes]
        time.sleep(settle_s)
        spies = []
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            mid = nodes[len(nodes) // 2]
            spies.append(_profile(mid.proc.pid, idle_s, profile_dir / f"idle_n{n}_node.txt"))
            spies.append(_profile(nodes[0].proc.pid, idle_s,
                                  profile_dir / f"idle_n{n}_admin.txt"))
        cpu, rss, child = _cpu_rss(nodes, idle_s)
        _reap(spies)
        spies = []
        if profile_dir is not None:
            mid = nodes[len(nodes) // 2]
            spies.append(_profile(mid.proc.pid, 2.5 * changes + 5,
                                  profile_dir / f"prop_n{n}_node.txt"))
            time.sleep(1.0)
        prop = trio.run(_propagate, nodes, changes, rng)
        _reap(spies)
        alive = sum(1 for x in nodes if x.alive())
        return {
            "n": n, "setup_s": setup_s, "form_s": form_s, "form_flaps": flaps,
            "nodes_full": n_full, "all_ready_s": all_ready_s,
            "start_to_ready_s": start_to_ready, "cpu_pct": cpu, "rss_mib": rss,
            "child_rss_mib": child, "alive": alive, **prop,
            "wall_s": time.monotonic() - t_wall,
        }
    finally:
        stop_all(nodes)
        shutil.rmtree(tmp, ignore_errors=True)


def summarise(n: int, rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    p = f"mesh{n}_"
    out = [
        figure(p + "form_s", [r["form_s"] for r in rs], "s",
             note="first `up` -> every node lists N-1 peers"),
        figure(p + "nodes_full_at_end", [float(r["nodes_full"]) for r in rs], "nodes",
             note="nodes listing all N-1 others when formation ended (= N if formed)"),
        figure(p + "form_flaps", [float(r["form_flaps"]) for r in rs], "node-drops",
             note="a node listing all others lost one again before the mesh was formed"),
        figure(p + "all_ready_s", [r["all_ready_s"] for r in rs], "s",
             note="first `up` -> last node's API ready"),
        figure(p + "start_to_ready_p50_s", [statistics.median(r["start_to_ready_s"]) for r in rs],
             "s"),
        figure(p + "prop_p50_ms", [percentile(r["lat_ms"], 0.5) for r in rs], "ms",
             samples=[len(r["lat_ms"]) for r in rs]),
        figure(p + "prop_p99_ms", [percentile(r["lat_ms"], 0.99) for r in rs], "ms",
             samples=[len(r["lat_ms"]) for r in rs]),
        figure(p + "prop_max_ms", [max(r["lat_ms"], default=float("nan")) for r in rs], "ms"),
        figure(p + "prop_missing", [float(r["missing"]) for r in rs], "node-changes"),
        figure(p + "prop_seq_mismatch", [float(r["seq_mismatch"]) for r in rs], "node-changes"),
        figure(p + "poll_rtt_p50_ms", [percentile(r["rtt_ms"], 0.5) for r in rs], "ms",
             note="upper bound of the arrival-time error"),
        figure(p + "idle_cpu_pct_median", [statistics.median(r["cpu_pct"]) for r in rs],
             "% of one core"),
        figure(p + "idle_cpu_pct_max", [max(r["cpu_pct"]) for r in rs], "% of one core"),
        figure(p + "idle_cpu_pct_total", [sum(r["cpu_pct"]) for r in rs], "% of one core",
             note="all N daemons together; the machine has 200 %"),
        figure(p + "rss_mib_median", [statistics.median(r["rss_mib"]) for r in rs], "MiB"),
        figure(p + "rss_mib_max", [max(r["rss_mib"]) for r in rs], "MiB"),
        figure(p + "child_rss_mib_max", [max(r["child_rss_mib"]) for r in rs], "MiB"),
        figure(p + "setup_s", [r["setup_s"] for r in rs], "s",
             note="homes, team, N-1 invites and joins (not part of form_s)"),
        figure(p + "wall_s", [r["wall_s"] for r in rs], "s"),
    ]
    return out


def bench_mesh(sizes: tuple[int, ...] = (10, 20, 50), runs: int | None = None,
               quick: bool = False, *, changes: int | None = None, idle_s: float | None = None,
               profile_dir: Path | None = None, emit: Any = None,
               **kw: Any) -> list[dict[str, Any]]:
    """Figures for each team size; see the module docstring."""
    if runs is None:
        runs = 1 if quick else 2
    changes = changes if changes is not None else (3 if quick else 5)
    idle_s = idle_s if idle_s is not None else (10.0 if quick else 15.0)
    t0 = time.monotonic()
    figures: list[dict[str, Any]] = []
    for n in sizes:
        rs = [one_run(n, changes=changes, idle_s=idle_s, seed=i,
                      profile_dir=profile_dir if i == 0 else None, **kw)
              for i in range(runs)]
        figs = summarise(n, rs)
        figures += figs
        for f in figs if emit is not None else ():
            emit(f)
    figures.append({"figure": "mesh_total_wall_s", "value": time.monotonic() - t0, "unit": "s",
                    "runs": [], "min": 0, "max": 0})
    return figures


def print_table(figures: list[dict[str, Any]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    t = Table(title=title)
    for c in ("figure", "median", "min", "max", "unit"):
        t.add_column(c)
    for f in figures:
        v = f["value"]
        if isinstance(v, (int, float)):
            t.add_row(f["figure"], f"{v:.4g}", f"{f.get('min', ''):.4g}",
                      f"{f.get('max', ''):.4g}", f["unit"])
    Console(stderr=True).print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,20,50")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--changes", type=int, default=None)
    ap.add_argument("--idle-s", type=float, default=None)
    ap.add_argument("--extra-bootstrap", type=int, default=2)
    ap.add_argument("--spawn-window", type=int, default=4)
    ap.add_argument("--profile", type=Path, default=None,
                    help="directory for py-spy raw profiles of one daemon (first run)")
    a = ap.parse_args()
    sizes = tuple(int(x) for x in a.sizes.split(","))
    figs = bench_mesh(sizes, a.runs, a.quick, changes=a.changes, idle_s=a.idle_s,
                      profile_dir=a.profile, extra_bootstrap=a.extra_bootstrap,
                      spawn_window=a.spawn_window,
                      emit=lambda f: print(json.dumps(f), flush=True))
    print(json.dumps(figs[-1]), flush=True)
    print_table(figs, f"mesh scale: sizes {sizes}, {os.cpu_count()} cpus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
