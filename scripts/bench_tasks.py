"""teammesh's half of the task benchmark: the same workload as scripts/bench_baselines.py.

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


def bench_teammesh(n_tasks: int, n_seq: int, runs: int) -> list[dict[str, Any]]:
    rs = [one_run(n_tasks, n_seq) for _ in range(runs)]
    out = []
    for key, unit in (("tasks_per_s", "tasks/s"), ("p50_ms", "ms"), ("p99_ms", "ms"),
                      ("p50_http_ms", "ms"), ("p50_worker_ms", "ms"), ("start_s", "s")):
        vals = [float(r[key]) for r in rs]
        out.append(figure(f"teammesh_{key}", vals, unit, n_tasks=n_tasks, n_seq=n_seq))
    out.append({"figure": "teammesh_spread", "value": rs[-1]["spread"], "unit": "tasks/peer",
                "runs": [], "min": 0, "max": 0})
    return out
