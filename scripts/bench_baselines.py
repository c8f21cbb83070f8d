"""Baseline task-throughput benchmark: Dask distributed and Ray on one machine.

This is the "baseline half" of teammesh's many-small-tasks benchmark.  It measures
the same trivial workload on Dask distributed and on Ray so that teammesh's own
measurement can later be reported beside them in the same run.

Workload
    Each task computes the SHA-256 hex digest of its own 1 KiB ``bytes`` input
    (``os.urandom(1024)``, prepared up front, outside every timed region).

Figures (per framework ``fw`` in ``dask`` / ``ray``)
    ``{fw}_tasks_per_s``   N tasks submitted as fast as possible, all results
                           gathered; N / (first submit -> last result).
    ``{fw}_p50_ms``        median round trip of M sequential tasks (submit one,
    ``{fw}_p99_ms``        wait for its result, then the next) and its p99.
    ``{fw}_start_s``       seconds for the cluster start call(s), imports
                           excluded (Dask: LocalCluster + Client +
                           wait_for_workers(2); Ray: ray.init(), which returns
                           before its worker processes are all ready).
    ``{fw}_first_task_ms`` extra: round trip of the very first task right after
                           start (shows lazy worker start-up that ``start_s``
                           does not include).

Each figure is the median over R runs, with min and max.  Every run happens in a
fresh child process (this file run with ``--child``) so Ray/Dask state never
leaks into the caller, a crash only fails that framework, and the task function
lives in ``__main__`` of the child (pickled by value, so workers need not be
able to import this file).  The child reports JSON back through a temp file.
After the start, one first task (``first_task_ms``) and 2 * n_workers warm-up
tasks run before the timed throughput burst; results are checked outside timing.

Cluster settings: 2 workers x 1 thread (Dask: ``processes=True``; Ray:
``num_cpus=2`` and ``num_cpus=1`` per task), everything bound to 127.0.0.1.
Each child also lists the TCP/UDP sockets its process tree listens on and
reports any that are not loopback; after shutdown it checks that no process it
started is still alive (and kills such leftovers by pid).

CLI::

    python scripts/bench_baselines.py [--quick] [--only dask|ray]

prints one JSON object per figure per line on stdout and a rich table on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

FRAMEWORKS: tuple[str, ...] = ("dask", "ray")
INPUT_SIZE = 1024
N_WORKERS = 2
WARMUP_TASKS = 2 * N_WORKERS
HOST = "127.0.0.1"

DEFAULT_N_TASKS = 2_000
DEFAULT_N_SEQ = 200
DEFAULT_RUNS = 3
QUICK_N_TASKS = 1_000
QUICK_N_SEQ = 100
QUICK_RUNS = 2
DEFAULT_RUN_TIMEOUT_S = 180.0

_FIGURES: tuple[tuple[str, str, str], ...] = (
    # (key in the per-run result, figure suffix, unit)
    ("tasks_per_s", "tasks_per_s", "tasks/s"),
    ("p50_ms", "p50_ms", "ms"),
    ("p99_ms", "p99_ms", "ms"),
    ("start_s", "start_s", "s"),
    ("first_task_ms", "first_task_ms", "ms"),
)


class BaselineError(RuntimeError):
    """A baseline child run failed (crashed, timed out or returned no result)."""


# --------------------------------------------------------------------------- #
# The task and small helpers (used in the child process)
# --------------------------------------------------------------------------- #


def sha256_task(data: bytes) -> str:
    """The benchmark task: SHA-256 hex digest of a 1 KiB input."""
    return hashlib.sha256(data).hexdigest()


def make_inputs(n: int) -> list[bytes]:
    """``n`` distinct random 1 KiB inputs."""
    return [os.urandom(INPUT_SIZE) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    """Percentile ``q`` (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of empty list")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def figure(name: str, vals: list[float], unit: str, **extra: Any) -> dict[str, Any]:
    """One benchmark figure: the median over runs, with every run and the min/max.
    A NaN run (not measured) is reported as None and left out of the statistics."""
    ok = [v for v in vals if v == v]  # a NaN never equals itself
    if not ok:
        return {"figure": name, "value": None, "unit": unit, "runs": [None] * len(vals),
                "min": None, "max": None, **extra}
    return {"figure": name, "value": statistics.median(ok), "unit": unit,
            "runs": [v if v == v else None for v in vals], "min": min(ok), "max": max(ok),
            **extra}


def _is_loopback(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _listening_sockets() -> list[dict[str, Any]]:
    """Listening TCP sockets and bound UDP sockets of this process and its descendants."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    out: list[dict[str, Any]] = []
    for proc in procs:
        try:
            name = proc.name()
            cmd = " ".join(proc.cmdline())[:160]
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if not c.laddr:
                continue
            is_tcp_listen = c.status == psutil.CONN_LISTEN
            is_udp_bound = c.type == 2 and not c.raddr  # SOCK_DGRAM, unconnected
            if not (is_tcp_listen or is_udp_bound):
                continue
            out.append(
                {
                    "pid": proc.pid,
                    "name": name,
                    "cmd": cmd,
                    "proto": "tcp" if is_tcp_listen else "udp",
                    "addr": c.laddr.ip,
                    "port": c.laddr.port,
                    "loopback": _is_loopback(c.laddr.ip),
                }
            )
    return out


# Helpers that Python's own multiprocessing starts for this process; they exit when
# this process exits, so they are not cluster leftovers.
_OWN_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _descendant_pids() -> set[int]:
    """Pids of processes the cluster started (excluding multiprocessing's own helpers)."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    pids: set[int] = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not any(h in cmd for h in _OWN_HELPERS):
            pids.add(p.pid)
    return pids


def _reap_leftovers(pids: set[int], grace_s: float = 10.0) -> list[dict[str, Any]]:
    """Wait for processes this child started to exit; kill (by pid) those that don't."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    leftovers: list[dict[str, Any]] = []
    for p in alive:
        try:
            leftovers.append({"pid": p.pid, "cmd": " ".join(p.cmdline())[:200]})
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return leftovers


def _measure(
    submit_many: Callable[[list[bytes]], list[str]],
    submit_one: Callable[[bytes], str],
    n_tasks: int,
    n_seq: int,
) -> dict[str, Any]:
    """Time the workload given two closures.

    ``submit_many(inputs) -> list[str]`` submits all inputs, returns all results.
    ``submit_one(data) -> str`` submits one input and waits for its result.
    """
    warm = make_inputs(WARMUP_TASKS)
    first = make_inputs(1)[0]
    burst = make_inputs(n_tasks)
    seq = make_inputs(n_seq)
    want_burst = [sha256_task(d) for d in burst]
    want_seq = [sha256_task(d) for d in seq]

    t0 = time.perf_counter()
    got_first = submit_one(first)
    first_task_ms = (time.perf_counter() - t0) * 1e3
    if got_first != sha256_task(first):
        raise AssertionError("wrong result for first task")
    if submit_many(warm) != [sha256_task(d) for d in warm]:
        raise AssertionError("wrong results in warm-up")

    t0 = time.perf_counter()
    got = submit_many(burst)
    wall = time.perf_counter() - t0
    if got != want_burst:
        raise AssertionError("wrong results in throughput burst")
    del got
    time.sleep(0.5)  # let the scheduler release the burst's futures/objects

    lat_ms: list[float] = []
    for data, want in zip(seq, want_seq, strict=True):
        t0 = time.perf_counter()
        r = submit_one(data)
        lat_ms.append((time.perf_counter() - t0) * 1e3)
        if r != want:
            raise AssertionError("wrong result in latency loop")

    return {
        "tasks_per_s": n_tasks / wall,
        "burst_wall_s": wall,
        "p50_ms": percentile(lat_ms, 50),
        "p99_ms": percentile(lat_ms, 99),
        "first_task_ms": first_task_ms,
    }


# --------------------------------------------------------------------------- #
# One run per framework (executed inside the child process)
# --------------------------------------------------------------------------- #


def _run_dask(n_tasks: int, n_seq: int) -> dict[str, Any]:
    import logging
    from importlib.metadata import version

    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=N_WORKERS,
        threads_per_worker=1,
        processes=True,
        host=HOST,
        dashboard_address=None,
        silence_logs=logging.WARNING,
    )
    client = Client(cluster)  # type: ignore[no-untyped-call]
    client.wait_for_workers(N_WORKERS)
    start_s = time.perf_counter() - t0
    children = _descendant_pids()
    try:

        def submit_many(inputs: list[bytes]) -> list[str]:
            futs = [client.submit(sha256_task, d, pure=False) for d in inputs]
            res: list[str] = client.gather(futs)  # type: ignore[no-untyped-call]
            return res

        def submit_one(data: bytes) -> str:
            res: str = client.submit(sha256_task, data, pure=False).result()
            return res

        res = _measure(submit_many, submit_one, n_tasks, n_seq)
        sockets = _listening_sockets()
        children |= _descendant_pids()
    finally:
        client.close()  # type: ignore[no-untyped-call]
        cluster.close()
    res.update(
        start_s=start_s,
        sockets=sockets,
        leftovers=_reap_leftovers(children),
        version=f"dask {version('dask')}, distributed {version('distributed')}",
    )
    return res


def _run_ray(n_tasks: int, n_seq: int) -> dict[str, Any]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(
        num_cpus=N_WORKERS,
        include_dashboard=False,
        _node_ip_address=HOST,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    start_s = time.perf_counter() - t0
    children = _descendant_pids()
    try:
        remote_task = ray.remote(num_cpus=1)(sha256_task)

        def submit_many(inputs: list[bytes]) -> list[str]:
            res: list[str] = ray.get([remote_task.remote(d) for d in inputs])
            return res

        def submit_one(data: bytes) -> str:
            res: str = ray.get(remote_task.remote(data))
            return res

        res = _measure(submit_many, submit_one, n_tasks, n_seq)
        sockets = _listening_sockets()
        children |= _descendant_pids()
    finally:
        ray.shutdown()
    res.update(
        start_s=start_s,
        sockets=sockets,
        leftovers=_reap_leftovers(children),
        version=f"ray {ray.__version__}",
    )
    return res


_RUNNERS = {"dask": _run_dask, "ray": _run_ray}


# --------------------------------------------------------------------------- #
# Serve mode: one cluster kept up for interleaved rounds (scripts/bench_tasks.py)
# --------------------------------------------------------------------------- #


def b64_task(data: bytes) -> str:
    """The worker-path task: base64 of a 1 KiB input, as teammesh's base64.encode."""
    import base64

    return base64.b64encode(data).decode()


def _serve(framework: str) -> int:
    """Start ``framework``, then run rounds on request: stdin lines ``MODE N``, one JSON
    line back per round; ``quit`` (or end of input) shuts the cluster down.

    Modes: ray ``remote`` (N ``.remote()`` calls, then one ``ray.get`` of the list);
    dask ``submit`` (N ``client.submit``, then ``client.gather``) and ``map``
    (``client.map`` of the list, then ``client.gather``). Every task runs in a worker
    process; results are checked outside the timed part."""
    import base64
    from importlib.metadata import version

    t0 = time.perf_counter()
    if framework == "ray":
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        import logging

        import ray

        ray.init(num_cpus=N_WORKERS, include_dashboard=False, _node_ip_address=HOST,
                 logging_level=logging.WARNING, configure_logging=True)
        remote = ray.remote(num_cpus=1)(b64_task)

        def run(mode: str, xs: list[bytes]) -> list[str]:
            res: list[str] = ray.get([remote.remote(x) for x in xs])
            return res

        def stop() -> None:
            ray.shutdown()

        ver = f"ray {ray.__version__}"
    else:
        import logging

        from distributed import Client, LocalCluster

        cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=N_WORKERS, threads_per_worker=1, processes=True, host=HOST,
            dashboard_address=None, silence_logs=logging.WARNING)
        client = Client(cluster)  # type: ignore[no-untyped-call]
        client.wait_for_workers(N_WORKERS)

        def run(mode: str, xs: list[bytes]) -> list[str]:
            if mode == "map":
                futs = client.map(b64_task, xs, pure=False)  # type: ignore[no-untyped-call]
            else:
                futs = [client.submit(b64_task, x, pure=False) for x in xs]
            res: list[str] = client.gather(futs)  # type: ignore[no-untyped-call]
            return res

        def stop() -> None:
            client.close()  # type: ignore[no-untyped-call]
            cluster.close()

        ver = f"dask {version('dask')}, distributed {version('distributed')}"
    start_s = time.perf_counter() - t0
    children = _descendant_pids()
    try:
        run("submit", make_inputs(200))  # warm-up: every worker process started
        print(json.dumps({"ready": True, "version": ver, "start_s": start_s}), flush=True)
        for line in sys.stdin:
            if line.strip() in ("", "quit"):
                break
            mode, n = line.split()
            xs = make_inputs(int(n))
            t1 = time.perf_counter()
            got = run(mode, xs)
            wall = time.perf_counter() - t1
            if got != [base64.b64encode(x).decode() for x in xs]:
                raise AssertionError(f"{framework} {mode}: wrong results")
            print(json.dumps({"mode": mode, "n": len(xs), "tasks_per_s": len(xs) / wall}),
                  flush=True)
        children |= _descendant_pids()
    finally:
        stop()
        _reap_leftovers(children)
    return 0


class Server:
    """A baseline cluster in a child process (``--serve``) for interleaved rounds."""

    def __init__(self, framework: str, timeout: float = DEFAULT_RUN_TIMEOUT_S) -> None:
        self.framework = framework
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", framework],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True)
        hello = self._line()
        self.version = str(hello["version"])
        self.start_s = float(hello["start_s"])

    def _line(self) -> dict[str, Any]:
        import selectors

        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(self.timeout):
                self.close()
                raise BaselineError(f"{self.framework}: no answer in {self.timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise BaselineError(f"{self.framework}: the cluster process ended")
        result: dict[str, Any] = json.loads(line)
        return result

    def round(self, mode: str, n: int) -> float:
        """One round of n tasks; tasks per second."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{mode} {n}\n")
        self.proc.stdin.flush()
        return float(self._line()["tasks_per_s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                _kill_tree(self.proc.pid)


def _child_main(framework: str, n_tasks: int, n_seq: int, result_file: str) -> int:
    result = _RUNNERS[framework](n_tasks, n_seq)
    Path(result_file).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- #
# Parent side: spawn children, aggregate
# --------------------------------------------------------------------------- #


def _kill_tree(pid: int) -> None:
    """Kill a child and every process it started, by pid."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def run_child(
    framework: str,
    n_tasks: int,
    n_seq: int,
    *,
    timeout: float = DEFAULT_RUN_TIMEOUT_S,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run one measurement of ``framework`` in a fresh child process; return its raw JSON."""
    if framework not in _RUNNERS:
        raise ValueError(f"unknown framework {framework!r}")
    fd, result_file = tempfile.mkstemp(prefix=f"bench_{framework}_", suffix=".json")
    os.close(fd)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        framework,
        "--n-tasks",
        str(n_tasks),
        "--n-seq",
        str(n_seq),
        "--result-file",
        result_file,
    ]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=None if verbose else subprocess.PIPE,
            stderr=None if verbose else subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.communicate()
            raise BaselineError(f"{framework}: child timed out after {timeout:.0f} s") from None
        text = Path(result_file).read_text()
        if proc.returncode != 0 or not text:
            tail = "\n".join((output or "").splitlines()[-30:])
            raise BaselineError(f"{framework}: child exited with {proc.returncode}\n{tail}")
        result: dict[str, Any] = json.loads(text)
        return result
    finally:
        Path(result_file).unlink(missing_ok=True)


def aggregate(framework: str, run_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn per-run raw results into figure dicts (median, min, max over runs)."""
    figures: list[dict[str, Any]] = []
    version = run_results[0].get("version", "") if run_results else ""
    for key, suffix, unit in _FIGURES:
        vals = [float(r[key]) for r in run_results]
        figures.append(figure(f"{framework}_{suffix}", vals, unit, version=version))
    return figures


def _bench(
    framework: str,
    n_tasks: int,
    n_seq: int,
    runs: int,
    timeout: float,
    verbose: bool,
) -> list[dict[str, Any]]:
    if runs < 1 or n_tasks < 1 or n_seq < 1:
        raise ValueError("n_tasks, n_seq and runs must be >= 1")
    results: list[dict[str, Any]] = []
    for _ in range(runs):
        r = run_child(framework, n_tasks, n_seq, timeout=timeout, verbose=verbose)
        socks = r.get("sockets", [])
        bad = [s for s in socks if not s["loopback"]]
        if bad:
            print(f"warning: {framework} listened on non-loopback sockets: {bad}", file=sys.stderr)
        else:
            addrs = sorted({s["addr"] for s in socks})
            print(
                f"{framework}: {len(socks)} listening sockets, all loopback ({', '.join(addrs)})",
                file=sys.stderr,
            )
        if r.get("leftovers"):
            print(
                f"warning: {framework} left processes behind (killed): {r['leftovers']}",
                file=sys.stderr,
            )
        results.append(r)
    figs = aggregate(framework, results)
    for f in figs:
        f["n_tasks"] = n_tasks
        f["n_seq"] = n_seq
    return figs


def bench_dask(
    n_tasks: int = DEFAULT_N_TASKS,
    n_seq: int = DEFAULT_N_SEQ,
    runs: int = DEFAULT_RUNS,
    *,
    timeout: float = DEFAULT_RUN_TIMEOUT_S,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Measure Dask distributed; ``runs`` fresh child processes. Raises BaselineError."""
    return _bench("dask", n_tasks, n_seq, runs, timeout, verbose)


def bench_ray(
    n_tasks: int = DEFAULT_N_TASKS,
    n_seq: int = DEFAULT_N_SEQ,
    runs: int = DEFAULT_RUNS,
    *,
    timeout: float = DEFAULT_RUN_TIMEOUT_S,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Measure Ray; ``runs`` fresh child processes. Raises BaselineError."""
    return _bench("ray", n_tasks, n_seq, runs, timeout, verbose)


BENCHES = {"dask": bench_dask, "ray": bench_ray}


def render_table(figures: list[dict[str, Any]]) -> None:
    """Print a readable table of figures on stderr."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Baselines: SHA-256 of 1 KiB, 2 workers x 1 thread, 127.0.0.1")
    for col, justify in (
        ("figure", "left"),
        ("median", "right"),
        ("min", "right"),
        ("max", "right"),
        ("unit", "left"),
        ("runs", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]

    def fmt(v: float) -> str:
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}" if v < 10 else f"{v:.1f}"

    for f in figures:
        table.add_row(
            f["figure"],
            fmt(f["value"]),
            fmt(f["min"]),
            fmt(f["max"]),
            f["unit"],
            str(len(f["runs"])),
        )
    Console(stderr=True).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes (1000 tasks, 100 sequential), 2 runs each",
    )
    p.add_argument("--only", choices=FRAMEWORKS, help="measure one framework only")
    p.add_argument("--n-tasks", type=int, help="tasks in the throughput burst")
    p.add_argument("--n-seq", type=int, help="sequential tasks for latency")
    p.add_argument("--runs", type=int, help="runs per framework (fresh cluster each)")
    p.add_argument("--timeout", type=float, default=DEFAULT_RUN_TIMEOUT_S, help="per run, s")
    p.add_argument("--verbose", action="store_true", help="pass child output through")
    p.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--serve", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    n_tasks = (
        a.n_tasks if a.n_tasks is not None else (QUICK_N_TASKS if a.quick else DEFAULT_N_TASKS)
    )
    n_seq = a.n_seq if a.n_seq is not None else (QUICK_N_SEQ if a.quick else DEFAULT_N_SEQ)

    if a.serve:
        return _serve(a.serve)
    if a.child:
        if not a.result_file:
            p.error("--child needs --result-file")
        return _child_main(a.child, n_tasks, n_seq, a.result_file)

    runs = a.runs if a.runs is not None else (QUICK_RUNS if a.quick else DEFAULT_RUNS)
    frameworks = [a.only] if a.only else list(FRAMEWORKS)
    all_figs: list[dict[str, Any]] = []
    failed = False
    t0 = time.perf_counter()
    for fw in frameworks:
        try:
            figs = BENCHES[fw](n_tasks, n_seq, runs, timeout=a.timeout, verbose=a.verbose)
        except (BaselineError, OSError, ValueError) as e:
            print(f"error: {fw} baseline failed: {e}", file=sys.stderr)
            failed = True
            continue
        for f in figs:
            print(json.dumps(f), flush=True)
        all_figs.extend(figs)
    if all_figs:
        render_table(all_figs)
    print(
        f"n_tasks={n_tasks} n_seq={n_seq} runs={runs}; total {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
