"""teammesh's half of the task benchmark: the same workload as scripts/bench_baselines.py.

Two parts. The first (``one_run``, figures ``teammesh_*``) is the FAST PATH and the
older figures: a 1 KiB sha256 runs inline on the executing daemon (no worker process)
and throughput is one batch call, so its ratio to Ray (whose tasks run in worker
processes, one ``.remote()`` each) compares different work. The second
(``bench_worker_path``, figures ``worker_*``) is the like-for-like comparison: base64 of
1 KiB, every task in a worker process on both sides, interleaved rounds.

One submitter daemon with 0 slots and two worker daemons with 1 slot each, all separate
processes on 127.0.0.1 (the shape of Dask's LocalCluster(2 workers x 1 thread) and Ray's
num_cpus=2). Throughput: N sha256-of-1-KiB tasks in one batch request (wait for all);
latency: M sequential submit-and-wait round trips through the Python client (over the
control socket, then the same over HTTP as `p50_http_ms`). A 1 KiB hash runs on the
executing daemon itself (node/kinds: `inline_max_bytes`); `p50_worker_ms` is the same loop
with `base64.encode` of 1 KiB, which goes through the executor's worker process.
"""

from __future__ import annotations

import base64
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_baselines import figure, percentile
from meshtools import mesh, wait_for_full_mesh


def _sequential(client: Any, inputs: list[bytes], kind: str = "hash.sha256") -> list[float]:
    """Submit-and-wait one task at a time; milliseconds per round trip."""
    lat = []
    for x in inputs:
        ts = time.perf_counter()
        r = client.submit(kind, x, wait=True, no_cache=True)
        lat.append((time.perf_counter() - ts) * 1000)
        if r["state"] != "done":
            raise RuntimeError(f"sequential task failed: {r}")
    return lat


def one_run(n_tasks: int, n_seq: int) -> dict[str, Any]:
    from teammesh.client import Client

    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp:
        t0 = time.perf_counter()
        with mesh(Path(tmp), 3, slots=[0, 1, 1]) as nodes:
            wait_for_full_mesh(nodes, timeout=30)
            start_s = time.perf_counter() - t0
            client = Client.from_home(nodes[0].home, timeout=300)
            inputs = [os.urandom(1024) for _ in range(n_tasks)]
            warm = [{"kind": "hash.sha256", "input_b64": base64.b64encode(x).decode(),
                     "no_cache": True} for x in inputs[:50]]
            client.request("POST", "/v1/tasks/batch", json={"tasks": warm, "wait": True})
            bodies = [{"kind": "hash.sha256", "input_b64": base64.b64encode(x).decode(),
                       "no_cache": True} for x in inputs]
            t1 = time.perf_counter()
            results = client.request("POST", "/v1/tasks/batch",
                                     json={"tasks": bodies, "wait": True})
            elapsed = time.perf_counter() - t1
            ok = sum(1 for r, x in zip(results, inputs, strict=True)
                     if r["state"] == "done" and r["output"] == hashlib.sha256(x).hexdigest())
            if ok != n_tasks:
                raise RuntimeError(f"only {ok}/{n_tasks} tasks returned correct digests")
            by = {}
            for r in results:
                by[r["executed_by"]] = by.get(r["executed_by"], 0) + 1
            lat = _sequential(client, inputs[:n_seq])
            lat_worker = _sequential(client, inputs[n_seq:2 * n_seq], "base64.encode")
            client.close()
            # the same round trips over HTTP (what curl or another language pays)
            os.environ["TEAMMESH_API_TRANSPORT"] = "http"
            try:
                http = Client.from_home(nodes[0].home, timeout=300)
            finally:
                del os.environ["TEAMMESH_API_TRANSPORT"]
            lat_http = _sequential(http, inputs[:n_seq])
            http.close()
        return {"tasks_per_s": n_tasks / elapsed, "p50_ms": statistics.median(lat),
                "p99_ms": percentile(lat, 99), "p50_http_ms": statistics.median(lat_http),
                "p50_worker_ms": statistics.median(lat_worker),
                "start_s": start_s, "spread": by}


FAST_PATH_NOTE = ("fast path: sha256 of 1 KiB runs inline on the executing daemon (no"
                  " worker process), submitted as one batch call; not comparable with Ray's"
                  " worker-process figure (see the worker_* figures)")


def bench_teammesh(n_tasks: int, n_seq: int, runs: int) -> list[dict[str, Any]]:
    rs = [one_run(n_tasks, n_seq) for _ in range(runs)]
    out = []
    for key, unit in (("tasks_per_s", "tasks/s"), ("p50_ms", "ms"), ("p99_ms", "ms"),
                      ("p50_http_ms", "ms"), ("p50_worker_ms", "ms"), ("start_s", "s")):
        vals = [float(r[key]) for r in rs]
        extra = {"note": FAST_PATH_NOTE} if key == "tasks_per_s" else {}
        out.append(figure(f"teammesh_{key}", vals, unit, n_tasks=n_tasks, n_seq=n_seq,
                          **extra))
    out.append({"figure": "teammesh_spread", "value": rs[-1]["spread"], "unit": "tasks/peer",
                "runs": [], "min": 0, "max": 0})
    # the like-for-like comparison (worker processes on both sides, interleaved rounds)
    out += bench_worker_path(WORKER_TASKS, WORKER_ROUNDS_QUICK if runs < 3 else WORKER_ROUNDS)
    return out


# --- worker path: the same work on both sides, interleaved rounds ------------------------

WORKER_TASKS = 2000
WORKER_ROUNDS = 5
WORKER_ROUNDS_QUICK = 3
HTTP_PARALLEL = 64  # keep-alive connections curl keeps busy at once
ASYNC_IN_FLIGHT = 64
WORKER_KIND = "base64.encode"  # runs in the executor's worker process (hashes run inline)

# (figure, unit, what it measures)
WORKER_FIGURES = {
    "futures": "N `executor().submit(\"base64.encode\", x)` then `.result()` on each, in order"
               " (Python client, control socket; submissions coalesced into batch frames)",
    "batch": "one `POST /v1/tasks/batch` of N tasks with wait (Python client, control socket)",
    "async_submit": f"N `await AsyncClient.submit(kind, x, wait=True)` under trio,"
                    f" {ASYNC_IN_FLIGHT} in flight (the one-call-per-task idiom)",
    "http": f"N `POST /v1/tasks` with wait, one request per task, curl --parallel with"
            f" {HTTP_PARALLEL} keep-alive connections (what another language pays)",
    "ray": "N `f.remote(x)` then one `ray.get` of the list (ray.init(num_cpus=2),"
           " num_cpus=1 per task)",
    "dask_submit": "N `client.submit(f, x)` then `client.gather` (LocalCluster 2 x 1 thread)",
    "dask_map": "`client.map(f, xs)` then `client.gather`",
}


def _curl_round(url: str, token: str, xs: list[bytes], tmp: Path) -> float:
    """N single-task HTTP requests through curl (keep-alive, HTTP_PARALLEL at once)."""
    import json
    import subprocess

    out = tmp / "curl-out"
    out.mkdir(exist_ok=True)
    groups = []
    for i, x in enumerate(xs):
        body = json.dumps({"kind": WORKER_KIND, "input_b64": base64.b64encode(x).decode(),
                           "no_cache": True, "wait": True})
        groups.append("\n".join([
            f'url = "{url}/v1/tasks"', f'header = "authorization: Bearer {token}"',
            'header = "content-type: application/json"', f"data = {json.dumps(body)}",
            f'output = "{out}/{i}.json"']))
    cfg = tmp / "curl.cfg"
    cfg.write_text("\nnext\n".join(groups) + "\n")
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sS", "--no-progress-meter", "--fail-with-body", "--parallel",
                    "--parallel-max",
                    str(HTTP_PARALLEL), "-K", str(cfg)], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    for i, x in enumerate(xs):
        r = json.loads((out / f"{i}.json").read_text())
        if r.get("output") != base64.b64encode(x).decode():
            raise RuntimeError(f"curl round: task {i} came back {r.get('state')}: {r}")
    return len(xs) / wall


def _cpu_s(pid: int | None) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def bench_worker_path(n_tasks: int, rounds: int) -> list[dict[str, Any]]:
    """teammesh (futures, batch, per-task HTTP) against Ray and Dask, all kept up for the
    whole run, in interleaved rounds (the order reversed every other round); each round
    gets its own ratios, and the figures are medians over rounds."""
    import shutil
    import subprocess

    from bench_baselines import BaselineError, Server

    from teammesh.client import Client

    def xs() -> list[bytes]:
        return [os.urandom(1024) for _ in range(n_tasks)]

    rates: dict[str, list[float]] = {k: [] for k in WORKER_FIGURES}
    http_cpu: list[float] = []
    versions: dict[str, str] = {}
    servers: dict[str, Server] = {}
    has_curl = shutil.which("curl") is not None
    if has_curl:
        versions["curl"] = subprocess.run(["curl", "--version"], capture_output=True,
                                          text=True).stdout.split("\n")[0][:40]
    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp:
        try:
            for name in ("ray", "dask"):
                try:
                    servers[name] = Server(name)
                    versions[name] = servers[name].version
                except (BaselineError, OSError) as exc:
                    print(f"bench: {name} baseline unavailable: {exc}", file=sys.stderr)
            with mesh(Path(tmp), 3, slots=[0, 1, 1]) as nodes:
                wait_for_full_mesh(nodes, timeout=30)
                from importlib.metadata import version

                versions["teammesh"] = version("teammesh")
                client = Client.from_home(nodes[0].home, timeout=300)
                token = (nodes[0].home / "api.token").read_text().strip()
                url = nodes[0].api["url"]
                client.gather(client.map(WORKER_KIND, [os.urandom(1024) for _ in range(200)],
                                         no_cache=True))  # warm-up: worker processes up

                def futures() -> float:
                    inputs = xs()
                    t0 = time.perf_counter()
                    with client.executor() as ex:
                        futs = [ex.submit(WORKER_KIND, x, no_cache=True) for x in inputs]
                        outs = [f.result() for f in futs]
                    wall = time.perf_counter() - t0
                    if outs != [base64.b64encode(x).decode() for x in inputs]:
                        raise RuntimeError("futures round: wrong results")
                    return n_tasks / wall

                def batch() -> float:
                    inputs = xs()
                    bodies = [{"kind": WORKER_KIND, "input_b64": base64.b64encode(x).decode(),
                               "no_cache": True} for x in inputs]
                    t0 = time.perf_counter()
                    res = client.request("POST", "/v1/tasks/batch",
                                         json={"tasks": bodies, "wait": True})
                    wall = time.perf_counter() - t0
                    if [r["output"] for r in res] != [base64.b64encode(x).decode()
                                                      for x in inputs]:
                        raise RuntimeError("batch round: wrong results")
                    return n_tasks / wall

                def async_submit() -> float:
                    import trio

                    from teammesh.client import AsyncClient

                    inputs = xs()
                    outs: list[Any] = [None] * len(inputs)

                    async def main() -> float:
                        limit = trio.Semaphore(ASYNC_IN_FLIGHT)
                        async with AsyncClient.from_home(nodes[0].home, timeout=300) as ac:

                            async def one(i: int) -> None:
                                async with limit:
                                    r = await ac.submit(WORKER_KIND, inputs[i], wait=True,
                                                        no_cache=True)
                                outs[i] = r["output"]

                            t0 = time.perf_counter()
                            async with trio.open_nursery() as nursery:
                                for i in range(len(inputs)):
                                    nursery.start_soon(one, i)
                            return time.perf_counter() - t0

                    wall = trio.run(main)
                    if outs != [base64.b64encode(x).decode() for x in inputs]:
                        raise RuntimeError("async submit round: wrong results")
                    return n_tasks / wall

                steps: list[tuple[str, Any]] = [("futures", futures),
                                                ("async_submit", async_submit)]
                if "ray" in servers:
                    steps.append(("ray", lambda: servers["ray"].round("remote", n_tasks)))
                if has_curl:
                    def http() -> float:
                        # the submitting daemon's CPU time per request: a figure the other
                        # processes on a shared machine barely move, unlike the rate
                        cpu0 = _cpu_s(nodes[0].proc.pid)
                        rate = _curl_round(url, token, xs(), Path(tmp))
                        http_cpu.append((_cpu_s(nodes[0].proc.pid) - cpu0) * 1e6 / n_tasks)
                        return rate

                    steps.append(("http", http))
                steps.append(("batch", batch))
                if "dask" in servers:
                    steps.append(("dask_submit",
                                  lambda: servers["dask"].round("submit", n_tasks)))
                    steps.append(("dask_map", lambda: servers["dask"].round("map", n_tasks)))
                for r in range(rounds):
                    for name, fn in (steps if r % 2 == 0 else steps[::-1]):
                        rates[name].append(fn())
                    print(f"bench: worker path round {r + 1}/{rounds}: " + ", ".join(
                        f"{k} {v[-1]:,.0f}" for k, v in rates.items() if v), file=sys.stderr)
                client.close()
        finally:
            for srv in servers.values():
                srv.close()
    out: list[dict[str, Any]] = []
    for name, what in WORKER_FIGURES.items():
        if rates[name]:
            out.append(figure(f"worker_{name}_tasks_per_s", rates[name], "tasks/s",
                              n_tasks=n_tasks, rounds=rounds, measures=what))
    if http_cpu:
        out.append(figure("worker_http_submitter_cpu_us_per_task", http_cpu, "us",
                          n_tasks=n_tasks, rounds=rounds,
                          measures="CPU time (user + system) of the submitting daemon per"
                                   " request in the per-task HTTP round"))
    for base in ("ray", "dask_submit"):
        for name in ("futures", "async_submit", "http", "batch"):
            if rates[name] and rates[base]:
                per_round = [a / b for a, b in zip(rates[name], rates[base], strict=True)]
                out.append(figure(f"worker_{name}_ratio_vs_{base}", per_round, "x",
                                  measures=f"per-round {name} / {base}, median of rounds"))
    out.append({"figure": "worker_versions", "value": "; ".join(
        f"{k}: {v}" for k, v in versions.items()), "unit": "", "runs": [], "min": 0, "max": 0})
    return out


def main() -> int:
    """``scripts/bench_tasks.py [--quick] [--tasks N] [--rounds R]``: the worker-path
    comparison alone (``scripts/bench tasks`` runs it after the fast-path figures)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--quick", action="store_true", help=f"{WORKER_ROUNDS_QUICK} rounds")
    p.add_argument("--tasks", type=int, default=WORKER_TASKS)
    p.add_argument("--rounds", type=int, default=None)
    a = p.parse_args()
    rounds = a.rounds or (WORKER_ROUNDS_QUICK if a.quick else WORKER_ROUNDS)
    for f in bench_worker_path(a.tasks, rounds):
        print(json.dumps(f), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
