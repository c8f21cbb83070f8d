"""Distance: how the worker path holds up when the executors are 5, 20 and 50 ms away.

Issue 17 asks for executors in network namespaces with netem delays. This kernel has no
``sch_netem``, so the delay comes from the chaos suite's userspace switch
(tests/chaostools.py ``netlab``): three namespaces, each with one TUN device, joined by a
Python process that forwards every IP packet and holds back what each namespace sends by
``delay_ms``. A round trip between two namespaces is therefore 2 x ``delay_ms``.

The shape is the tasks bench's: a submitter daemon (0 slots) and two executor daemons
(1 slot each), here one per namespace. The Python client runs in the submitter's namespace
(``ip netns exec``, as the chaos suite runs the CLI; a child process of this script that
prints one JSON line).

RTT 0 is the same switch with no delay. It is the reference, and it is the switch's
ceiling, not loopback's: every packet still goes through one Python process. So the run
also keeps a second, identical mesh up on 127.0.0.1 (no namespaces, no switch) and measures
it in the same rounds (``loopback_*``): loopback vs RTT 0 is what the switch itself costs,
RTT 0 vs 5/20/50 ms is what distance costs.

Per setting (loopback, then RTT 0, 5, 20, 50 ms), every round: set the delay, wait until
every daemon lists every other, then in one client process: 20 warm-up tasks, then

- ``futures``: N ``executor().submit("base64.encode", 1 KiB)``, then ``.result()`` on each
  in order; N / wall time (first submit to last result).
- ``batch``: one ``POST /v1/tasks/batch`` of N such tasks with ``wait``; N / wall time.
- ``seq_p50``: median round trip of 50 ``client.submit(kind, x, wait=True)`` one after
  another (each waits for its result before the next is sent).

Rounds go over the settings in order, then in reverse order, alternating, so a drift in
the machine's load does not fall on one of them. Each round's figure per setting is also
divided by the same round's figure at RTT 0; reported are medians over rounds with
[min, max]. The switch's CPU time and the packets it forwarded, per task, come with each
RTT (``rttN_switch_cpu_us_per_task``, ``rttN_packets_per_task``).

``python scripts/bench_rtt.py [--quick] [--tasks N] [--rounds R]``; ``scripts/bench rtt``.
Needs root (network namespaces and TUN devices); without them it exits with one line.
"""

from __future__ import annotations

import base64
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

RTTS_MS = (0, 5, 20, 50)
LOOPBACK = "loopback"  # the same three daemons on 127.0.0.1, no switch: the switch's cost
Setting = int | str  # an RTT in ms through the switch, or LOOPBACK
TASKS = 2000
TASKS_QUICK = 500
SEQ = 50
WARM = 20
ROUNDS = 4
ROUNDS_QUICK = 2
KIND = "base64.encode"  # runs in the executor's worker process (hashes run inline)
HEALTHY_S = 90.0  # the mesh must be whole again within this after a delay change
CLIENT_S = 600.0  # one client process (warm-up and the three measurements) at most
SEED = 23

# short name: (figure, unit, what it measures)
FIGURES = {
    "futures": ("futures_tasks_per_s", "tasks/s",
                "N `executor().submit(\"base64.encode\", 1 KiB)` then `.result()` on each in"
                " order; N / wall time"),
    "batch": ("batch_tasks_per_s", "tasks/s",
              "one `POST /v1/tasks/batch` of N such tasks with wait; N / wall time"),
    "seq_p50": ("seq_p50_ms", "ms",
                f"median round trip of {SEQ} sequential `client.submit(kind, x, wait=True)`"),
}


# --- the client, run inside the submitter's namespace -------------------------------------


def client_main(home: str, n: int, n_seq: int, task_ms: float = 0.0) -> int:
    """Warm up, then measure futures, batch and sequential; one JSON line on stdout.

    ``task_ms`` 0: base64 of 1 KiB (about 0.05 ms in the worker). Otherwise ``sleep`` of
    that many milliseconds (a task that takes a known time; each asks a slightly
    different time, so every output names its task)."""
    from teammesh.client import Client

    def jobs(k: int) -> list[tuple[str, bytes | None, dict[str, Any], Any]]:
        """(kind, input, params, expected output) for k tasks."""
        if task_ms > 0:
            out = []
            for _ in range(k):
                s = round(task_ms / 1000 + random.randrange(1000) * 1e-9, 9)
                out.append(("sleep", None, {"seconds": s}, {"slept": s}))
            return out
        xs = [os.urandom(1024) for _ in range(k)]
        return [(KIND, x, {}, base64.b64encode(x).decode()) for x in xs]

    def body(kind: str, x: bytes | None, params: dict[str, Any]) -> dict[str, Any]:
        b: dict[str, Any] = {"kind": kind, "params": params, "no_cache": True}
        if x is not None:
            b["input_b64"] = base64.b64encode(x).decode()
        return b

    client = Client.from_home(home, timeout=CLIENT_S)
    try:
        client.gather([client.future(k, x, p, no_cache=True) for k, x, p, _ in jobs(WARM)])
        work = jobs(n)
        t0 = time.perf_counter()
        with client.executor() as ex:
            futs = [ex.submit(k, x, p, no_cache=True) for k, x, p, _ in work]
            outs = [f.result() for f in futs]
        futures_s = time.perf_counter() - t0
        if outs != [want for *_, want in work]:
            raise RuntimeError("futures: wrong results")

        work = jobs(n)
        bodies = [body(k, x, p) for k, x, p, _ in work]
        t0 = time.perf_counter()
        res = client.request("POST", "/v1/tasks/batch", json={"tasks": bodies, "wait": True})
        batch_s = time.perf_counter() - t0
        if [r.get("output") for r in res] != [want for *_, want in work]:
            raise RuntimeError("batch: wrong results")
        spread: dict[str, int] = {}
        for r in res:
            spread[r["executed_by"]] = spread.get(r["executed_by"], 0) + 1

        lat: list[float] = []
        for k, x, p, want in jobs(n_seq):
            t0 = time.perf_counter()
            r = client.submit(k, x, p, wait=True, no_cache=True)
            lat.append((time.perf_counter() - t0) * 1000)
            if r.get("output") != want:
                raise RuntimeError(f"sequential: task came back {r.get('state')}")
    finally:
        client.close()
    print(json.dumps({"futures_tasks_per_s": n / futures_s, "batch_tasks_per_s": n / batch_s,
                      "seq_p50_ms": statistics.median(lat), "spread": spread}), flush=True)
    return 0


# --- the lab ------------------------------------------------------------------------------


def _tag(key: Setting) -> str:
    return "loopback" if key == LOOPBACK else f"rtt{key}"


def _label(key: Setting) -> str:
    return "loopback" if key == LOOPBACK else f"RTT {key} ms"


def _measure(netns: str | None, home: Path, n: int, n_seq: int,
             task_ms: float = 0.0) -> dict[str, Any]:
    """One client process (in ``netns``, or here for the loopback mesh)."""
    from chaostools import ns_prefix

    proc = subprocess.run([*ns_prefix(netns), sys.executable, __file__, "_client",
                           str(home), str(n), str(n_seq), str(task_ms)],
                          capture_output=True, text=True, timeout=CLIENT_S + 60)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"the client in {netns} failed ({proc.returncode}): {tail[0]}")
    return dict(json.loads(lines[-1]))


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def bench_rtt(n: int, n_seq: int, rounds: int,
              emit: Callable[[dict[str, Any]], None], *,
              task_ms: float = 0.0) -> list[dict[str, Any]]:
    """Every figure (emitted at the end, and returned); ``task_ms`` as in client_main."""
    from bench_baselines import figure
    from chaostools import full_mesh, netlab, netns_unavailable, ns_mesh
    from meshtools import mesh, wait_for_full_mesh, wait_until

    reason = netns_unavailable()
    if reason is not None:
        raise RuntimeError(f"needs network namespaces (run as root): {reason}")
    keys = [LOOPBACK, *RTTS_MS]
    got: dict[Setting, dict[str, list[float]]] = {s: {k: [] for k in FIGURES} for s in keys}
    load: list[float] = []
    switch_us: dict[Setting, list[float]] = {r: [] for r in RTTS_MS}
    packets: dict[Setting, list[float]] = {r: [] for r in RTTS_MS}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tm-bench-rtt-") as tmp, \
            mesh(Path(tmp) / "lo", 3, slots=[0, 1, 1]) as lo_nodes, \
            netlab(3, seed=SEED) as lab, \
            ns_mesh(lab, Path(tmp) / "ns", slots=[0, 1, 1]) as nodes:
        wait_for_full_mesh(lo_nodes, timeout=HEALTHY_S)
        wait_until(lambda: full_mesh(nodes), HEALTHY_S, interval=1.0,
                   what="the namespaced mesh")
        load.append(os.getloadavg()[0])
        for rnd in range(rounds):
            for key in (keys if rnd % 2 == 0 else keys[::-1]):
                if key == LOOPBACK:
                    res = _measure(None, lo_nodes[0].home, n, n_seq, task_ms)
                else:
                    assert isinstance(key, int)
                    assert lab.hub is not None
                    lab.impair(key / 2, 0)
                    wait_until(lambda: full_mesh(nodes), HEALTHY_S, interval=1.0,
                               what=f"the mesh at RTT {key} ms")
                    cpu0, pk0 = _cpu_s(lab.hub.pid), lab.stats()["forwarded"]
                    res = _measure(lab.names[0], nodes[0].home, n, n_seq, task_ms)
                    # per task of the client run (warm-up and all three parts), to set
                    # beside the time per task at RTT 0: what the switch itself costs
                    tasks = WARM + 2 * n + n_seq
                    switch_us[key].append((_cpu_s(lab.hub.pid) - cpu0) * 1e6 / tasks)
                    packets[key].append((lab.stats()["forwarded"] - pk0) / tasks)
                for k, (name, _, _) in FIGURES.items():
                    got[key][k].append(float(res[name]))
                load.append(os.getloadavg()[0])
                print(f"bench rtt: round {rnd + 1}/{rounds} {_label(key)}: futures"
                      f" {res['futures_tasks_per_s']:,.0f}/s, batch"
                      f" {res['batch_tasks_per_s']:,.0f}/s, seq p50 {res['seq_p50_ms']:.1f} ms,"
                      f" spread {sorted(res['spread'].values())}", file=sys.stderr, flush=True)
        switch = lab.stats()
    out: list[dict[str, Any]] = []
    for key in keys:
        tag = _tag(key)
        for k, (name, unit, what) in FIGURES.items():
            out.append(figure(f"{tag}_{name}", got[key][k], unit, setting=_label(key),
                              n_tasks=n, rounds=rounds, measures=what,
                              work=f"sleep {task_ms:g} ms" if task_ms > 0 else "base64 1 KiB"))
            if key != 0:
                # per round: this setting's figure over the same round's figure at RTT 0
                per_round = [a / b for a, b in zip(got[key][k], got[0][k], strict=True)]
                out.append(figure(f"{tag}_{k}_ratio_vs_rtt0", per_round, "x",
                                  setting=_label(key),
                                  measures=f"per-round {name} {_label(key)} / at RTT 0"))
        if key == LOOPBACK:
            continue
        out.append(figure(f"{tag}_switch_cpu_us_per_task", switch_us[key], "us",
                          setting=_label(key),
                          measures="CPU time (user + system) of the switch process during the"
                          " client run, per task (warm-up, futures, batch and sequential)"))
        out.append(figure(f"{tag}_packets_per_task", packets[key], "packets",
                          setting=_label(key),
                          measures="IP packets the switch forwarded during the client run,"
                          " per task (all parts, both directions, keepalives included)"))
    import platform

    out.append({"figure": "rtt_machine", "value": f"{platform.machine()}"
                f" {platform.python_version()} cpus={os.cpu_count()}", "unit": "",
                "load_avg_1m": [round(x, 2) for x in load],
                "elapsed_s": round(time.monotonic() - t_start, 1), "switch": switch})
    for f in out:
        emit(f)
    return out


def print_table(figs: list[dict[str, Any]], title: str) -> None:
    """One row per setting: each figure as median [min-max], and its ratio to RTT 0."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    by = {f["figure"]: f for f in figs}
    t = Table(title=title)
    t.add_column("setting")
    for k, (_, unit, _) in FIGURES.items():
        t.add_column(f"{k} ({unit})")
        t.add_column("vs RTT 0")
    t.add_column("switch CPU (us/task)")
    t.add_column("packets/task")

    def cell(f: dict[str, Any] | None) -> str:
        if f is None or f["value"] is None:
            return ""
        fmt = "{:,.0f}" if f["value"] >= 100 else "{:.3g}"
        return f"{fmt.format(f['value'])} [{fmt.format(f['min'])}-{fmt.format(f['max'])}]"

    for key in (LOOPBACK, *RTTS_MS):
        tag = _tag(key)
        row = [_label(key)]
        for k, (name, _, _) in FIGURES.items():
            row += [cell(by.get(f"{tag}_{name}")), cell(by.get(f"{tag}_{k}_ratio_vs_rtt0"))]
        row += [cell(by.get(f"{tag}_switch_cpu_us_per_task")),
                cell(by.get(f"{tag}_packets_per_task"))]
        t.add_row(*row)
    Console(stderr=True, width=200).print(t)


def main(argv: list[str] | None = None) -> int:
    """``scripts/bench_rtt.py [--quick] [--tasks N] [--rounds R]``: the worker path with
    the executors 0, 5, 20 and 50 ms of round trip away (network namespaces joined by the
    chaos suite's userspace switch; RTT 0 is the switch's own ceiling, not loopback's)."""
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        return client_main(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--quick", action="store_true",
                   help=f"{TASKS_QUICK} tasks, {ROUNDS_QUICK} rounds")
    p.add_argument("--tasks", type=int, default=None, help=f"tasks per figure ({TASKS})")
    p.add_argument("--rounds", type=int, default=None, help=f"rounds ({ROUNDS})")
    p.add_argument("--task-ms", type=float, default=0.0,
                   help="tasks of this many ms (the sleep kind) instead of 1 KiB base64")
    a = p.parse_args(argv)
    n = a.tasks or (TASKS_QUICK if a.quick else TASKS)
    rounds = a.rounds or (ROUNDS_QUICK if a.quick else ROUNDS)
    try:
        figs = bench_rtt(n, SEQ, rounds, lambda f: print(json.dumps(f), flush=True),
                         task_ms=a.task_ms)
    except RuntimeError as exc:
        print(f"error: bench rtt: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    work = f"{a.task_ms:g} ms sleeps" if a.task_ms > 0 else "1 KiB base64"
    print_table(figs, f"distance: worker path, {n} tasks of {work}, {rounds} rounds,"
                      f" userspace switch (RTT 0 = the switch's ceiling)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
