"""Footprint of one daemon beside a bare py-libp2p host, measured in the same run.

Per run (fresh temp dirs), one after the other so the starts do not compete for CPU:

- bare host: this file run as ``--bare-host READY_FILE``: py-libp2p 0.8.1 with the settings
  of node/p2p/host.py (Noise + yamux only, ``max_connections_per_peer=1``, GossipSub 1.2/1.1/1.0
  D=6/4/12, heartbeat 1 s, adaptive/spam/eclipse protections off), listening on
  127.0.0.1:0, subscribed to one topic; writes READY_FILE once subscribed, then idles.
- teammesh: a home with a team of one (``Home.init`` + ``create_team``), then
  `python -m teammesh.node.cli.main up --listen /ip4/127.0.0.1/tcp/0`.

Figures: start -> ready (spawn -> ready file / api.json present; for teammesh also
spawn -> GET /health answers), then both idle side by side for ``idle_s``: CPU % (psutil
user+system over the window) and RSS / USS at its end; the RSS ratio teammesh / bare.
Medians over runs with min and max.

CLI: ``python scripts/bench_footprint.py [--runs 3] [--idle-s 20] [--quick]``; one JSON
object per figure on stdout, a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "teammesh.node.cli.main"]


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """End a process we started, by its PID: SIGTERM, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait(pred: Any, proc: subprocess.Popen[bytes], timeout: float, what: str) -> float:
    """Poll pred every 5 ms; return the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.005)
    raise RuntimeError(f"{what} not ready after {timeout} s")


def start_bare(tmp: Path) -> tuple[subprocess.Popen[bytes], float]:
    ready = tmp / "bare.ready"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--bare-host",
                             str(ready)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "bare.log", "wb"), start_new_session=True)
    t1 = _wait(ready.exists, proc, 60, "bare host")
    return proc, t1 - t0


def start_teammesh(tmp: Path) -> tuple[subprocess.Popen[bytes], float, float]:
    import httpx
    from teammesh.node.core.config import Home
    from teammesh.node.core.journal import Journal
    from teammesh.node.p2p.membership import Membership

    home = Home(tmp / "tm")
    ident, _ = home.init()
    j = Journal(home.journal_file)
    try:
        Membership(home, j, ident).create_team("footprint")
    finally:
        j.close()
    t0 = time.monotonic()
    proc = subprocess.Popen([*CLI, "--home", str(home.path), "up", "--listen",
                             "/ip4/127.0.0.1/tcp/0"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "tm.log", "wb"), start_new_session=True)
    t_file = _wait(home.api_file.exists, proc, 60, "teammesh daemon")
    url = ""
    while not url:
        try:
            url = json.loads(home.api_file.read_text())["url"]
        except (ValueError, KeyError):
            time.sleep(0.005)
    with httpx.Client(timeout=5) as c:

        def healthy() -> bool:
            try:
                return c.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                return False

        t_api = _wait(healthy, proc, 30, "teammesh API")
    return proc, t_file - t0, t_api - t0


def one_run(idle_s: float) -> dict[str, float]:
    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="tm-footprint-"))
    bare = tm = None
    try:
        bare, bare_ready = start_bare(tmp)
        tm, tm_ready, tm_api = start_teammesh(tmp)
        time.sleep(2.0)  # past the start-up burst (first heartbeats, first ad)
        procs = [psutil.Process(bare.pid), psutil.Process(tm.pid)]
        t_a = time.monotonic()
        a = [p.cpu_times() for p in procs]
        time.sleep(idle_s)
        b = [p.cpu_times() for p in procs]
        wall = time.monotonic() - t_a
        cpu = [100 * ((y.user - x.user) + (y.system - x.system)) / wall for x, y in zip(a, b, strict=True)]
        mem = [p.memory_full_info() for p in procs]
        threads = [p.num_threads() for p in procs]
        return {
            "bare_start_to_ready_s": bare_ready, "teammesh_start_to_ready_s": tm_ready,
            "teammesh_start_to_api_s": tm_api,
            "bare_idle_cpu_pct": cpu[0], "teammesh_idle_cpu_pct": cpu[1],
            "bare_rss_mib": mem[0].rss / 2**20, "teammesh_rss_mib": mem[1].rss / 2**20,
            "bare_uss_mib": mem[0].uss / 2**20, "teammesh_uss_mib": mem[1].uss / 2**20,
            "bare_threads": float(threads[0]), "teammesh_threads": float(threads[1]),
            "rss_ratio_teammesh_vs_bare": mem[1].rss / mem[0].rss,
        }
    finally:
        _stop(tm)
        _stop(bare)
        shutil.rmtree(tmp, ignore_errors=True)


UNITS = {"_s": "s", "_pct": "% of one core", "_mib": "MiB", "_threads": "threads",
         "_bare": "x"}


def bench_footprint(runs: int | None = None, quick: bool = False,
                    idle_s: float | None = None) -> list[dict[str, Any]]:
    # here, not at the top: the bare-host child runs this file and must import nothing extra
    from bench_baselines import figure

    runs = runs or (2 if quick else 3)
    idle_s = idle_s or (10.0 if quick else 20.0)
    rs = [one_run(idle_s) for _ in range(runs)]
    out = []
    for key in rs[0]:
        vals = [r[key] for r in rs]
        unit = next(u for suffix, u in UNITS.items() if key.endswith(suffix))
        out.append(figure(f"footprint_{key}", vals, unit, idle_s=idle_s))
    return out


# --- the bare host (child process) -------------------------------------------------------

def bare_host(ready: Path) -> None:
    import logging

    import multiaddr
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux
    from libp2p.tools.anyio_service import background_trio_service

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    kp = create_new_key_pair(os.urandom(32))
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    host = new_host(
        key_pair=kp,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(
            kp, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    router = GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
        heartbeat_initial_delay=0.1, time_to_live=30, gossip_window=3, gossip_history=5,
        adaptive_gossip_enabled=False, spam_protection_enabled=False,
        eclipse_protection_enabled=False,
    )
    pubsub = Pubsub(host, router, max_inbound_rpc_size=1024 * 1024)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with host.run(listen_addrs=listen):
                async with background_trio_service(pubsub), background_trio_service(router):
                    await pubsub.wait_until_ready()
                    await pubsub.subscribe("footprint/caps")
                    ready.write_text(str(os.getpid()))
                    async for _ in signals:
                        break

    try:
        trio.run(main)
    except BaseException:  # py-libp2p teardown noise; we are exiting anyway
        pass
    os._exit(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--idle-s", type=float, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bare-host", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bare_host is not None:
        bare_host(a.bare_host)
        return 0
    figs = bench_footprint(a.runs, a.quick, a.idle_s)
    for f in figs:
        print(json.dumps(f), flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_mesh import print_table

    print_table(figs, "footprint: one idle daemon vs a bare py-libp2p host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
