"""Bridge load: signed submits against `teammesh bridge dev` (wrangler dev --local, workerd).

``scripts/bench bridge`` starts the Worker once per shard count (the SHARDS var, each in a
fresh state directory) and sends ``n`` signed ``POST /v1/tasks`` with ``concurrency`` in
flight, signed as the node signs them (member keys of ``peers`` simulated members, derived
from one master key: teammesh.node.bridge.client.sign_request). The mix, by request number:

* 0 mod 4: ``hash.sha256`` of fresh bytes (runs in the Worker);
* 1 mod 4: ``text.stats`` of fresh text (runs in the Worker);
* 2 mod 4: ``np.matmul`` (not portable: queued for pull-mode peers);
* 3 mod 4: ``bench.queued`` with an inline input (a kind the Worker does not know: queued);
* every 10th request (once there is one answered) repeats an earlier portable one: a
  result-cache hit, unless the cache has not stored the first answer yet.

Every answer is checked: portable runs against the Python kind's result, cache hits
against the first answer, queued tasks by state and kind. Errors are any other status, a
wrong answer or a transport failure. A 503 from wrangler's dev proxy itself ("Your worker
restarted mid-request", a known wrangler dev fault under load, not an answer of the
Worker), or a connection it closes without an answer, is sent again, same id, up to
PROXY_RETRIES times, and counted apart (``proxy_503_retried``, ``proxy_resets_retried``);
the latency then includes the retry. :func:`drain` leases the queued tasks back and posts
their results, checking inputs and params on the way (tests/test_bridge_load.py).

Figures: submits/s over the whole run, and p50/p99 of one submit's latency.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from teammesh.node.bridge.client import derive_member_key, new_bridge_key, sign_request
from teammesh.node.bridge.dev import DEV_VARS, default_bridge_dir, open_bridge_dev
from teammesh.node.kinds import load_kinds, run_kind

QUEUED_KINDS = ("np.matmul", "bench.queued")
# wrangler dev's ProxyWorker answers 503 with this text when its connection to workerd
# breaks under a request (workers-sdk issue 14641: keep-alive races, "the worker never
# restarted"); it retries only GET and HEAD itself.
PROXY_DROP = "Your worker restarted mid-request"
PROXY_RETRIES = 3
MATMUL = {"a": [[1, 2], [3, 4]], "b": [[5, 6], [7, 8]]}


@dataclass
class Load:
    """What one load run sent and got back."""

    n: int
    concurrency: int
    peers: int
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    cached: int = 0
    repeats: int = 0
    proxy_drops: int = 0
    proxy_resets: int = 0
    # queued task id -> (kind, input bytes, params)
    queued: dict[str, tuple[str, bytes, dict[str, Any]]] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: 0.0)
        return {
            "submits": self.n, "in_flight": self.concurrency, "peers": self.peers,
            "errors": len(self.errors), "wall_s": round(self.wall_s, 3),
            "req_per_s": round(self.n / self.wall_s, 1) if self.wall_s else 0.0,
            "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2),
            "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else 0.0,
            "proxy_503_retried": self.proxy_drops, "proxy_resets_retried": self.proxy_resets,
            "repeats": self.repeats, "cache_hits": self.cached, "queued": len(self.queued), "by_kind": self.by_kind,
        }


def _requests(n: int, seed: int, concurrency: int) -> list[tuple[dict[str, Any], Any]]:
    """``n`` (body, expected) pairs; expected is the output for portable kinds, None for
    queued ones. Deterministic for a seed; ids are unique per run (the seed and a clock).
    A repeat copies a portable request at least 2 x ``concurrency`` earlier, one that has
    been answered by the time the repeat is sent."""
    kinds = load_kinds()
    rng = random.Random(seed)
    run = f"{seed:x}{time.time_ns() & 0xFFFFFFFFFF:x}"
    out: list[tuple[dict[str, Any], Any]] = []
    portable: list[tuple[int, dict[str, Any], Any]] = []
    for i in range(n):
        answered = [p for p in portable if p[0] <= i - 2 * concurrency]
        if i % 10 == 9 and answered:
            _, body, expected = answered[rng.randrange(len(answered))]
            out.append(({**body, "id": f"b{run}-{i}", "repeat": True}, expected))
            continue
        data = rng.randbytes(rng.randrange(256, 4096))
        body: dict[str, Any]
        if i % 4 == 0:
            body = {"kind": "hash.sha256", "params": {}, "input_b64": base64.b64encode(data).decode()}
            expected: Any = hashlib.sha256(data).hexdigest()
        elif i % 4 == 1:
            text = " ".join(f"w{rng.randrange(10_000)}" for _ in range(len(data) // 8)).encode()
            body = {"kind": "text.stats", "params": {}, "input_b64": base64.b64encode(text).decode()}
            expected = run_kind(kinds["text.stats"], text, {})
        elif i % 4 == 2:
            body = {"kind": "np.matmul", "params": {**MATMUL, "n": i}}
            expected = None
        else:
            body = {"kind": "bench.queued", "params": {"i": i}, "input_b64": base64.b64encode(data).decode()}
            expected = None
        body["id"] = f"b{run}-{i}"
        if expected is not None:
            portable.append((i, body, expected))
        out.append((body, expected))
    return out


def _headers(master: bytes, peer: str, method: str, path: str, body: bytes) -> dict[str, str]:
    h = sign_request(derive_member_key(master, peer), peer, method, path, body)
    h["Content-Type"] = "application/json"
    return h


# workerd closes a keep-alive connection 5 s after its last response (kj's HTTP server
# pipeline timeout, not configurable); httpx keeps idle connections for 5 s too. A
# connection picked up again just as workerd closes it loses the request (a reset or
# "Server disconnected without sending a response"): at the end of a round, the fast
# connections wait for the slowest request (p99 several seconds here) and the next round
# starts on them. Idle connections are therefore dropped by the client well before 5 s.
KEEPALIVE_S = 2.0


def _client(url: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                          keepalive_expiry=KEEPALIVE_S)
    return httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False)


async def submit_load(url: str, master: bytes, *, n: int = 2000, concurrency: int = 64,
                      peers: int = 16, seed: int = 7,
                      reqs: list[tuple[dict[str, Any], Any]] | None = None,
                      client: httpx.AsyncClient | None = None) -> Load:
    """``n`` signed submits, ``concurrency`` in flight; every answer checked. ``reqs``:
    prepared requests (else made from ``seed``); ``client``: an open client to reuse."""
    load = Load(n=n, concurrency=concurrency, peers=peers)
    reqs = reqs if reqs is not None else _requests(n, seed, concurrency)
    async with contextlib.AsyncExitStack() as stack:
        http = client or await stack.enter_async_context(_client(url, concurrency))
        send, recv = trio.open_memory_channel[int](n)
        for i in range(n):
            send.send_nowait(i)
        send.close()

        async def one(i: int) -> None:
            body, expected = reqs[i]
            if body.pop("repeat", False):
                load.repeats += 1
            raw = json.dumps(body).encode()
            peer = f"bench-peer-{i % peers}"
            t0 = time.perf_counter()
            for attempt in range(1 + PROXY_RETRIES):
                last = attempt == PROXY_RETRIES
                try:
                    r = await http.post("/v1/tasks", content=raw,
                                        headers=_headers(master, peer, "POST", "/v1/tasks", raw))
                except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                    # the dev proxy dropped the connection without an answer
                    if last:
                        load.errors.append(f"{body['id']}: {type(exc).__name__}: {exc}")
                        return
                    load.proxy_resets += 1
                    continue
                except httpx.HTTPError as exc:
                    load.errors.append(f"{body['id']}: {type(exc).__name__}: {exc}")
                    return
                if last or not (r.status_code == 503 and PROXY_DROP in r.text):
                    break
                # wrangler's dev proxy lost the request, not the Worker: send it again (a
                # new nonce, the same id: submits are idempotent by id)
                load.proxy_drops += 1
            load.latencies.append(time.perf_counter() - t0)
            load.by_kind[body["kind"]] = load.by_kind.get(body["kind"], 0) + 1
            try:
                task = r.json()
            except ValueError:
                task = None
            problem = _check(r.status_code, task, body, expected)
            if problem and task is None:
                problem += f" {r.text[:300]!r}"
            if problem:
                load.errors.append(f"{body['id']} ({body['kind']}): {problem}")
                return
            if expected is None:
                load.queued[body["id"]] = (body["kind"], base64.b64decode(body.get("input_b64", "")),
                                           body["params"])
            elif task["cached"]:
                load.cached += 1

        async def worker() -> None:
            async for i in recv:
                await one(i)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        load.wall_s = time.perf_counter() - t0
    return load


def _check(status: int, task: Any, body: dict[str, Any], expected: Any) -> str | None:
    if not isinstance(task, dict) or ("error" in task and "id" not in task):
        return f"HTTP {status}: {str(task)[:300] if task is not None else 'not JSON'}"
    if task.get("id") != body["id"] or task.get("kind") != body["kind"]:
        return f"HTTP {status}: answer for {task.get('id')!r} ({task.get('kind')!r})"
    if expected is None:
        if status != 202 or task.get("state") != "queued":
            return f"HTTP {status}, state {task.get('state')!r} (expected 202 queued): {task.get('error')}"
        return None
    if status != 200 or task.get("state") != "done":
        return f"HTTP {status}, state {task.get('state')!r}: {task.get('error')}"
    if task.get("output") != expected:
        return f"wrong output {str(task.get('output'))[:80]!r}"
    return None


async def drain(url: str, master: bytes, load: Load, *, peer: str = "bench-puller",
                max_rounds: int = 1000) -> list[str]:
    """Lease every queued task of the run back (checking input and params), post a result
    for each, and read each back. Returns the problems found."""
    problems: list[str] = []
    seen: set[str] = set()
    kinds = list(QUEUED_KINDS)
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as http:
        async def call(method: str, path: str, body: Any = None) -> httpx.Response:
            raw = b"" if body is None else json.dumps(body).encode()
            return await http.request(method, path, content=raw,
                                      headers=_headers(master, peer, method, path, raw))

        for _ in range(max_rounds):
            if len(seen) >= len(load.queued):
                break
            r = await call("POST", "/v1/lease", {"kinds": kinds, "max": 100, "lease_s": 600})
            if r.status_code != 200:
                problems.append(f"lease: HTTP {r.status_code} {r.text[:200]}")
                break
            tasks = r.json()["tasks"]
            if not tasks:
                break
            for t in tasks:
                if t["id"] not in load.queued:
                    continue  # another run's task in the same state directory
                kind, data, params = load.queued[t["id"]]
                if t["id"] in seen:
                    problems.append(f"{t['id']}: leased twice")
                got = base64.b64decode(t["input_b64"])
                if (t["kind"], got, t["params"]) != (kind, data, params):
                    problems.append(f"{t['id']}: lease carries another kind, input or params")
                seen.add(t["id"])
                out = {"sha256": hashlib.sha256(got).hexdigest(), "n": len(got)}
                c = await call("POST", f"/v1/tasks/{t['id']}/result", {"ok": True, "output": out})
                if c.status_code != 200 or c.json().get("output") != out:
                    problems.append(f"{t['id']}: result HTTP {c.status_code} {c.text[:200]}")
        missing = set(load.queued) - seen
        if missing:
            problems.append(f"{len(missing)} queued tasks never leased, e.g. {sorted(missing)[:3]}")
        for tid, (_, data, _) in load.queued.items():
            g = await call("GET", f"/v1/tasks/{tid}")
            want = {"sha256": hashlib.sha256(data).hexdigest(), "n": len(data)}
            if g.status_code != 200 or g.json().get("state") != "done" or g.json().get("output") != want:
                problems.append(f"{tid}: GET gives HTTP {g.status_code} {g.text[:200]}")
    return problems


WARMUP_ROUNDS = 10


async def run_against_dev(shards: int, *, n: int, concurrency: int, peers: int,
                          state_dir: Path, check_drain: bool = False,
                          bridge_dir: Path | None = None) -> dict[str, Any]:
    """Start `teammesh bridge dev` with SHARDS=shards in ``state_dir``, warm it up, load it.

    Warm-up (compiles the Worker, creates the objects): rounds of 200 submits until one
    has no error, at most WARMUP_ROUNDS. wrangler dev runs with a private dev registry
    (:func:`private_registry`)."""
    master = new_bridge_key()
    extra = {**DEV_VARS, "SHARDS": str(shards)}
    # made before the Worker starts: the measured run begins right after the warm-up, on
    # the warm-up's connections
    reqs = _requests(n, 7, concurrency)
    with private_registry(state_dir / "wrangler-registry"):
        return await _run(shards, n=n, concurrency=concurrency, peers=peers, master=master,
                          extra=extra, reqs=reqs, state_dir=state_dir, check_drain=check_drain,
                          bridge_dir=bridge_dir)


@contextlib.contextmanager
def private_registry(path: Path) -> Iterator[None]:
    """Every `wrangler dev` on a machine shares one dev registry (~/.config/.wrangler/
    registry), where each registers and at exit unregisters its Worker by name: concurrent
    runs of "teammesh-bridge" (tests, other benches) would add and remove each other's
    entry. A private registry (WRANGLER_REGISTRY_PATH) keeps this run to itself."""
    old = os.environ.get("WRANGLER_REGISTRY_PATH")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["WRANGLER_REGISTRY_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WRANGLER_REGISTRY_PATH", None)
        else:
            os.environ["WRANGLER_REGISTRY_PATH"] = old


async def _run(shards: int, *, n: int, concurrency: int, peers: int, master: bytes,
               extra: dict[str, str], reqs: list[tuple[dict[str, Any], Any]], state_dir: Path,
               check_drain: bool, bridge_dir: Path | None) -> dict[str, Any]:
    async with open_bridge_dev(bridge_dir or default_bridge_dir(), None, master.hex(), state_dir,
                               extra_vars=extra) as url, _client(url, concurrency) as http:
        warm_errors = 0
        for r in range(WARMUP_ROUNDS):
            warm = await submit_load(url, master, n=200, concurrency=concurrency, peers=peers,
                                     seed=100 + r, client=http)
            warm_errors += len(warm.errors)
            if not warm.errors:
                break
        load = await submit_load(url, master, n=n, concurrency=concurrency, peers=peers,
                                 reqs=reqs, client=http)
        fig = {"bench": "bridge_submit", "shards": shards, **load.figures(),
               "warmup_errors": warm_errors}
        if load.errors:
            fig["first_errors"] = load.errors[:5]
        if check_drain:
            fig["drain_problems"] = await drain(url, master, load)
        return fig


def main(argv: list[str]) -> int:
    import argparse
    import functools
    import platform

    p = argparse.ArgumentParser(prog="scripts/bench bridge")
    p.add_argument("--shards", default="1,8", help="comma-separated shard counts (default 1,8)")
    p.add_argument("-n", type=int, default=2000, help="signed submits per run (default 2000)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    p.add_argument("--peers", type=int, default=16, help="simulated members signing (default 16)")
    p.add_argument("--quick", action="store_true", help="n=500")
    p.add_argument("--bridge-dir", type=Path, default=None,
                   help="another checkout's bridge/ (to compare builds)")
    args = p.parse_args(argv)
    n = 500 if args.quick else args.n
    failed = False
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
          file=sys.stderr)
    for shards in (int(s) for s in args.shards.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
            fig = trio.run(functools.partial(run_against_dev, shards, n=n,
                                             concurrency=args.concurrency, peers=args.peers,
                                             state_dir=Path(tmp), bridge_dir=args.bridge_dir))
        print(json.dumps(fig), flush=True)
        print(f"bridge SHARDS={shards}: {fig['submits']} submits, {fig['errors']} errors, "
              f"{fig['req_per_s']} req/s, p50 {fig['p50_ms']} ms, p99 {fig['p99_ms']} ms",
              file=sys.stderr, flush=True)
        failed = failed or bool(fig["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
