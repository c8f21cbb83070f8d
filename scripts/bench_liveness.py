"""Liveness benchmark: how long a member that dies or freezes stays listed by the others.

N `teammesh up` daemons on 127.0.0.1 (the harness of scripts/bench_mesh.py), every one with
gossip.ad_ttl_s = 300, the TTL a 50-member team stretches to, so ad expiry cannot be
what removes anybody within the measurement. Then ``reps`` times each, on a different
member each time (never the team's creator):

- ``kill``: SIGKILL. The OS closes its sockets, so the others see the connection close.
  Then it is spawned again on the same port (``back`` = spawn -> every other lists it).
- ``stop``: SIGSTOP. Its sockets stay open and silent: only the keepalive ping can tell.
  Then SIGCONT (``back`` = SIGCONT -> every other lists it).

``down`` per watcher = signal sent -> the first GET /v1/peers (what `teammesh peers`
prints) without it; polled every ``poll_s`` on every other node, so each figure is an
upper bound whose error is at most one poll interval plus the request round trip.
Figures: median and max over all (watcher, repetition) pairs, and the worst per
repetition ("every member knows"), with min/max over repetitions.

CLI: ``python scripts/bench_liveness.py [--sizes 3,10] [--reps 3] [--poll-s 0.2]``
prints one JSON object per figure on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_baselines import figure
from bench_mesh import Node, _form, _peers, print_table, setup_team, stop_all

LONG_TTL_S = 300
TIMEOUT_S = 60.0  # a member still listed after this counts as not detected (NaN)


async def _watch(nodes: list[Node], peer: str, listed: bool, t0: float, poll_s: float
                 ) -> list[float]:
    """Seconds from t0 until each live node's peer list does (or does not) hold ``peer``;
    NaN for a node that never got there within TIMEOUT_S."""
    import httpx
    import trio

    out: dict[int, float] = {}

    async def one(client: Any, node: Node) -> None:
        # t0 is time.monotonic(); trio's clock has another origin
        with trio.move_on_after(t0 + TIMEOUT_S - time.monotonic()):
            while True:
                if not node.check_ready():  # a respawned node has a new API address
                    await trio.sleep(poll_s)
                    continue
                try:
                    peers, _, t_recv = await _peers(client, node)
                    if (peer in {p["peer_id"] for p in peers}) == listed:
                        out[node.index] = t_recv - t0
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(poll_s)

    async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(one, client, node)
    return [out.get(n.index, float("nan")) for n in nodes]


def one_size(n: int, reps: int, poll_s: float, keep: bool = False) -> dict[str, Any]:
    import random

    import trio

    os.environ["TEAMMESH_GOSSIP_AD_TTL_S"] = str(LONG_TTL_S)
    tmp = Path(tempfile.mkdtemp(prefix=f"tm-live{n}-"))
    nodes: list[Node] = []
    res: dict[str, Any] = {k: [] for k in ("kill_down", "kill_back", "kill_sees", "stop_down",
                                           "stop_back", "stop_sees")}
    try:
        nodes = setup_team(tmp, n)
        form_s, _, _ = trio.run(_form, nodes, 1, 2, 4, 60.0 + 4.0 * n, random.Random(0))
        if form_s != form_s:
            raise RuntimeError(f"the {n}-node mesh did not form")
        time.sleep(3.0)
        victims = [nodes[1 + i % (n - 1)] for i in range(2 * reps)]
        for i, victim in enumerate(victims):
            others = [x for x in nodes if x is not victim]
            assert victim.proc is not None
            mode = "kill" if i % 2 == 0 else "stop"
            t0 = time.monotonic()
            if mode == "kill":
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
            else:
                os.kill(victim.proc.pid, signal.SIGSTOP)
            res[f"{mode}_down"].append(trio.run(_watch, others, victim.peer_id, False, t0,
                                                poll_s))
            t1 = time.monotonic()
            if mode == "kill":
                boot = [nodes[0].addr]
                victim.ready_at = 0.0
                victim.spawn(boot, 1)
            else:
                os.kill(victim.proc.pid, signal.SIGCONT)
            res[f"{mode}_back"].append(trio.run(_watch, others, victim.peer_id, True, t1,
                                                poll_s))
            # and the victim's own view: it lists every other member again
            res[f"{mode}_sees"].append([max(trio.run(_watch, [victim], x.peer_id, True, t1,
                                                     poll_s)) for x in others])
            print(f"n={n} {mode} #{i // 2}: down max {_worst(res[f'{mode}_down'][-1]):.2f} s,"
                  f" back max {_worst(res[f'{mode}_back'][-1]):.2f} s, it sees all after"
                  f" {_worst(res[f'{mode}_sees'][-1]):.2f} s", file=sys.stderr)
            time.sleep(2.0)
        return res
    finally:
        for x in nodes:  # a stopped process cannot act on SIGTERM
            if x.proc is not None and x.proc.poll() is None:
                os.kill(x.proc.pid, signal.SIGCONT)
        stop_all(nodes)
        if keep:
            print(f"homes and daemon logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _worst(rep: list[float]) -> float:
    """The last watcher's time, NaN if one never saw it (NaN is not ordered by max)."""
    return float("nan") if any(v != v for v in rep) else max(rep)


def summarise(n: int, res: dict[str, Any]) -> list[dict[str, Any]]:
    figs = []
    notes = {"kill_down": "SIGKILL -> not in a watcher's GET /v1/peers",
             "stop_down": "SIGSTOP -> not in a watcher's GET /v1/peers (keepalive)",
             "kill_back": "respawn -> listed again (includes the daemon's start)",
             "stop_back": "SIGCONT -> listed again",
             "kill_sees": "respawn -> it lists every other member",
             "stop_sees": "SIGCONT -> it lists every other member"}
    for key, note in notes.items():
        per_rep: list[list[float]] = res[key]
        pooled = [v for rep in per_rep for v in rep if v == v]
        missed = sum(1 for rep in per_rep for v in rep if v != v)
        figs.append(figure(f"live{n}_{key}_median_s",
                           [statistics.median(pooled) if pooled else float("nan")], "s",
                           note=note + ", median over watchers and repetitions",
                           not_within_s={TIMEOUT_S: missed}))
        figs.append(figure(f"live{n}_{key}_max_s", [_worst(rep) for rep in per_rep], "s",
                           note="the last watcher to see it, per repetition"))
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="3,10")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--poll-s", type=float, default=0.2)
    ap.add_argument("--keep", action="store_true", help="keep the homes and daemon logs")
    a = ap.parse_args()
    figs: list[dict[str, Any]] = []
    for n in (int(x) for x in a.sizes.split(",")):
        for f in summarise(n, one_size(n, a.reps, a.poll_s, a.keep)):
            print(json.dumps(f), flush=True)
            figs.append(f)
    print_table(figs, f"liveness: sizes {a.sizes}, {a.reps} reps, {os.cpu_count()} cpus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
