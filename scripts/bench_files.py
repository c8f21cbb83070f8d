"""File-transfer benchmark (issue 8 item 3): teammesh Bitswap vs Helia vs raw TCP, CIDs vs aleph-cid.

One random file (``os.urandom``, written once per run set) is moved over 127.0.0.1 by:

- teammesh: two real `teammesh up` daemons (tests/meshtools.py ``mesh``); node A runs
  `teammesh share FILE`, node B fetches it over Bitswap. ``teammesh_bitswap_mib_per_s``
  times B's ``POST /v1/files/get`` (what `teammesh get` sends: Bitswap fetch into B's store,
  then export to the output file), from the request to the ``done`` line.
  ``teammesh_get_cli_mib_per_s`` times the `teammesh get CID -o OUT` process as a user
  runs it, so it also pays the CLI's interpreter start-up. Between fetches B unpins and
  garbage-collects the file, so every fetch comes from A.
- Helia (the outside IPFS implementation, tests/helia/peer.mjs): node A adds the file with
  Kubo's layout (the same CID, checked), a fresh node B per run connects and cats it to a
  file; timed from sending ``cat`` to its reply.
- raw TCP, the ceiling: a sender process ``sendall``s the same bytes in 1 MiB pieces to a
  receiver process that ``recv_into``s a pre-faulted buffer; timed in the receiver from
  ``accept`` to the last byte.
- CIDs: ``teammesh.storage.unixfs.cid_of_bytes`` and aleph-cid's
  ``CidHasher.for_ipfs_v1_raw_leaves`` (both Kubo `ipfs add --cid-version=1`: raw leaves,
  256 KiB chunks, 174 links) on the same bytes in memory; the CIDs must agree.

Runs are interleaved (run i measures every system once), so the ratios are taken per run,
between figures measured under the same machine load, and reported as median [min, max].
Every output is checked by sha256 against the input.

CLI: ``python scripts/bench_files.py [--size-mib 256] [--runs 3]`` prints one JSON object
per figure on stdout and a table on stderr.

``--from-helia`` (issue 17, files from any peer; default 100 MiB) measures instead a fetch
from an outside IPFS peer: Helia A adds the file with Kubo's layout (256 KiB raw leaves,
174 links), then per run ``teammesh get CID --from <A's multiaddr>`` (a process, no daemon:
the CLI's own host) and, as the baseline in the same run, a fresh Helia B that connects to
A and cats the file. ``teammesh_from_helia_fetch_mib_per_s`` is the fetch alone as the CLI
reports it (``seconds``: Bitswap into a throwaway store + the output file written as
blocks arrive); ``teammesh_from_helia_cli_mib_per_s`` the whole process, start-up included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_baselines import figure  # noqa: E402
from bench_mesh import print_table  # noqa: E402
from meshtools import Daemon, mesh, run_cli, wait_for_full_mesh  # noqa: E402

MiB = 1 << 20
HOST = "127.0.0.1"
HELIA_DIR = ROOT / "tests" / "helia"
Figure = dict[str, Any]


def log(msg: str) -> None:
    print(f"[bench files] {msg}", file=sys.stderr, flush=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for off in range(0, size, MiB):
            f.write(os.urandom(min(MiB, size - off)))


def _end(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """End a process this module started, by its PID: wait a grace period, then kill."""
    if proc.poll() is None:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- teammesh ----


class Api:
    """A daemon's control API over httpx with a bounded read timeout.

    ``Client.stream_lines`` waits forever for the next line; B sends no progress while the
    Bitswap part of a get runs, so a stalled fetch would hang it. Here every read is bounded
    and the whole request has a deadline.
    """

    def __init__(self, daemon: Daemon, timeout: float) -> None:
        token = (daemon.home / "api.token").read_text().strip()
        self.timeout = timeout
        self.http = httpx.Client(base_url=daemon.api["url"],
                                 headers={"authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(30, read=timeout))

    def close(self) -> None:
        self.http.close()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        resp = self.http.post(path, json=body)
        resp.raise_for_status()
        return resp.json()

    def get_file(self, cid: str, dest: Path) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + self.timeout
        t0 = time.perf_counter()
        done: dict[str, Any] | None = None
        with self.http.stream("POST", "/v1/files/get", json={"cid": cid, "dest": str(dest)}) as r:
            r.raise_for_status()
            for raw in r.iter_lines():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"teammesh get took over {self.timeout:.0f} s")
                if not raw:
                    continue
                line = json.loads(raw)
                if "error" in line:
                    raise RuntimeError(f"teammesh get failed: {line['error']}")
                if "done" in line:
                    done = line["done"]
        elapsed = time.perf_counter() - t0
        if done is None:
            raise RuntimeError("the daemon ended the get without a result")
        return elapsed, done

    def forget(self, cid: str) -> None:
        """Unpin and gc, so the next get must come from the peer again."""
        self.post("/v1/files/unpin", {"cid": cid})
        self.post("/v1/files/gc", {})


def _check_output(out: Path, size: int, sha: str, what: str) -> None:
    if out.stat().st_size != size or _sha256_file(out) != sha:
        raise RuntimeError(f"{what}: output differs from the input")
    out.unlink()


# ------------------------------------------------------------------------------ Helia ----


class HeliaPeer:
    """tests/helia/peer.mjs in a subprocess, driven by JSON lines.

    A thread moves stdout lines into a queue so that every wait can have a timeout.
    """

    def __init__(self, log_path: Path, ready_timeout: float = 30.0) -> None:
        self._log: IO[bytes] = open(log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(["node", str(HELIA_DIR / "peer.mjs")], cwd=HELIA_DIR,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, start_new_session=True)
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._id = 0
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            ready = self._next(time.monotonic() + ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.peer_id: str = ready["peer_id"]
        self.addr: str = ready["addrs"][0]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self._lines.put(json.loads(raw))
            except ValueError:
                continue  # a stray non-JSON line (a library warning): not a reply
        self._lines.put(None)

    def _next(self, deadline: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("Helia did not answer in time") from None
        if line is None:
            raise RuntimeError(f"Helia exited ({self.proc.poll()}); see {self._log.name}")
        return line

    def call(self, cmd: str, timeout: float, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self._id += 1
        self.proc.stdin.write((json.dumps({"id": self._id, "cmd": cmd, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while (line := self._next(deadline)).get("id") != self._id:
            pass
        if "error" in line:
            raise RuntimeError(f"Helia {cmd} failed: {line['error']}")
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("stop", 5)
            except (OSError, RuntimeError, TimeoutError):
                pass  # killed below
        _end(self.proc)
        self._log.close()


@contextmanager
def helia_peer(log_path: Path) -> Iterator[HeliaPeer]:
    peer = HeliaPeer(log_path)
    try:
        yield peer
    finally:
        peer.stop()


def helia_versions() -> dict[str, str]:
    out = {}
    for pkg in ("@helia/utils", "@helia/unixfs", "@helia/block-brokers", "libp2p"):
        try:
            meta = json.loads((HELIA_DIR / "node_modules" / pkg / "package.json").read_text())
            out[pkg] = meta["version"]
        except (OSError, ValueError, KeyError):
            out[pkg] = "?"
    return out


# ---------------------------------------------------------------------------- raw TCP ----

# Pre-faulting the buffer keeps page faults out of the ceiling; the clock starts at accept,
# which is before the first byte, so the figure can only err on the slow side.
_RECEIVER = r"""
import hashlib, json, socket, sys, time
size = int(sys.argv[1])
buf = bytearray(b"\x01") * size
view = memoryview(buf)
srv = socket.create_server(("127.0.0.1", 0))
srv.settimeout(float(sys.argv[2]))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[2]))
t0 = time.perf_counter()
got = 0
while got < size:
    n = conn.recv_into(view[got:], min(1 << 20, size - got))
    if not n:
        break
    got += n
elapsed = time.perf_counter() - t0
conn.close()
srv.close()
print(json.dumps({"bytes": got, "seconds": elapsed,
                  "sha256": hashlib.sha256(view[:got]).hexdigest()}), flush=True)
"""

# The file is read before connecting, so disk reads are not part of the transfer.
_SENDER = r"""
import socket, sys
with open(sys.argv[1], "rb") as f:
    view = memoryview(f.read())
with socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
    for i in range(0, len(view), 1 << 20):
        s.sendall(view[i:i + (1 << 20)])
"""


def raw_tcp_once(path: Path, size: int, sha: str, timeout: float) -> float:
    recv = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(size), str(timeout)],
                            stdout=subprocess.PIPE, start_new_session=True)
    send: subprocess.Popen[bytes] | None = None
    try:
        assert recv.stdout is not None
        ready, _, _ = select.select([recv.stdout], [], [], 30)
        if not ready:
            raise TimeoutError("the TCP receiver did not start")
        port = int(recv.stdout.readline())
        send = subprocess.Popen([sys.executable, "-c", _SENDER, str(path), str(port),
                                 str(timeout)], start_new_session=True)
        out, _ = recv.communicate(timeout=timeout + 30)
        send.wait(30)
        if send.returncode != 0 or recv.returncode != 0:
            raise RuntimeError(f"raw TCP peers exited {send.returncode}/{recv.returncode}")
        result = json.loads(out)
        if result["bytes"] != size or result["sha256"] != sha:
            raise RuntimeError("raw TCP: received bytes differ from the input")
        return float(result["seconds"])
    finally:
        for p in (send, recv):
            if p is not None:
                _end(p, grace=0)


# ------------------------------------------------------------------------------- CIDs ----


def cid_teammesh(data: bytes) -> tuple[float, str]:
    from teammesh.storage.unixfs import cid_of_bytes

    t0 = time.perf_counter()
    cid = str(cid_of_bytes(data))
    return time.perf_counter() - t0, cid


def cid_aleph(data: bytes) -> tuple[float, str]:
    import aleph_cid

    t0 = time.perf_counter()
    h = aleph_cid.CidHasher.for_ipfs_v1_raw_leaves()
    h.update(data)
    cid = str(h.finalize())
    return time.perf_counter() - t0, cid


# ---------------------------------------------------------------------------- figures ----


def _fig(name: str, vals: list[float], unit: str, **extra: Any) -> Figure:
    return {**figure(name, vals, unit, **extra), "runs": [round(v, 3) for v in vals]}


def _ratio(name: str, num: list[float], den: list[float], **extra: Any) -> Figure:
    return _fig(name, [a / b for a, b in zip(num, den, strict=True)], "x",
                note="per-run ratio (same moment, same load), median [min, max]", **extra)


@dataclass
class Rig:
    """Everything that stays up across runs: the file, both daemons' API, Helia A."""

    tmp: Path
    src: Path
    data: bytes
    sha: str
    cid: str
    b: Daemon
    api: Api
    helia_a: HeliaPeer
    timeout: float

    def run(self, i: int, series: dict[str, list[float]]) -> None:
        """Measure every system once, so the per-run ratios share the machine's load."""
        load = os.getloadavg()[0]
        size, cid, timeout = len(self.data), self.cid, self.timeout
        # teammesh, through the control API (the timed figure)
        out = self.tmp / "tm.out"
        seconds, done = self.api.get_file(cid, out)
        if done["source"] != "peers":
            raise RuntimeError(f"B got the file from {done['source']!r}, not from its peer")
        _check_output(out, size, self.sha, "teammesh get")
        series["tm"].append(seconds)
        self.api.forget(cid)
        # teammesh, the CLI as a user runs it
        t0 = time.perf_counter()
        got = run_cli(self.b.home, "get", cid, "-o", str(out), "--json", timeout=timeout)
        series["tm_cli"].append(time.perf_counter() - t0)
        if json.loads(got.stdout)["source"] != "peers":
            raise RuntimeError("the CLI get did not come from the peer")
        _check_output(out, size, self.sha, "teammesh get (CLI)")
        self.api.forget(cid)
        # Helia: a fresh B each run, so nothing is cached in its memory blockstore
        out = self.tmp / "helia.out"
        with helia_peer(self.tmp / f"helia-b{i}.log") as hb:
            hb.call("connect", 30, addr=self.helia_a.addr)
            t0 = time.perf_counter()
            r = hb.call("cat", timeout, cid=cid, out=str(out), timeout_ms=int(timeout * 1000))
            series["helia"].append(time.perf_counter() - t0)
            series["helia_inner"].append(r["ms"] / 1000)
        if r["bytes"] != size:
            raise RuntimeError(f"Helia cat returned {r['bytes']} bytes, not {size}")
        _check_output(out, size, self.sha, "Helia cat")
        # the ceiling
        series["raw"].append(raw_tcp_once(self.src, size, self.sha, timeout))
        # CIDs on the same bytes, in this process
        s_tm, c_tm = cid_teammesh(self.data)
        s_al, c_al = cid_aleph(self.data)
        if c_tm != c_al or c_tm != cid:
            raise RuntimeError(f"CIDs differ: teammesh {c_tm}, aleph-cid {c_al}, shared {cid}")
        series["cid_tm"].append(s_tm)
        series["cid_aleph"].append(s_al)
        mib = size / MiB
        log(f"run {i + 1}: teammesh {mib / series['tm'][-1]:.1f}"
            f" (CLI {mib / series['tm_cli'][-1]:.1f}), Helia {mib / series['helia'][-1]:.1f},"
            f" raw TCP {mib / series['raw'][-1]:.0f}, CID {mib / s_tm:.0f} vs aleph"
            f" {mib / s_al:.0f} MiB/s (load {load:.2f})")


def _check_args(size_mib: int, runs: int) -> None:
    if runs < 1 or size_mib < 1:
        raise ValueError("size_mib and runs must be >= 1")
    if not (HELIA_DIR / "node_modules" / "@helia" / "utils").is_dir() or not shutil.which("node"):
        raise RuntimeError("Helia is not installed: run scripts/setup-helia (needs node/npm)")


def bench_files(size_mib: int, runs: int, emit: Callable[[Figure], None]) -> list[Figure]:
    """Move ``size_mib`` MiB ``runs`` times with each system; return (and emit) the figures."""
    _check_args(size_mib, runs)
    t_start = time.monotonic()
    load_start = os.getloadavg()
    size = size_mib * MiB
    # generous bounds: anything slower than 1 MiB/s (plus start-up) is a failure here
    timeout = 60.0 + size_mib
    tmp = Path(tempfile.mkdtemp(prefix="teammesh-bench-files-"))
    series: dict[str, list[float]] = {k: [] for k in (
        "tm", "tm_cli", "helia", "helia_inner", "raw", "cid_tm", "cid_aleph")}
    try:
        src = tmp / "data.bin"
        _write_random(src, size)
        data = src.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        log(f"{size_mib} MiB test file written; starting 2 daemons and Helia A")
        with mesh(tmp / "mesh", 2) as (a, b), helia_peer(tmp / "helia-a.log") as ha:
            wait_for_full_mesh([a, b], timeout=30)
            shared = a.cli("share", str(src), timeout=timeout)
            cid = shared["cid"]
            added = ha.call("add", timeout, path=str(src), kubo=True)
            if added["cid"] != cid:
                raise RuntimeError(f"Helia's CID {added['cid']} differs from teammesh's {cid}")
            rig = Rig(tmp, src, data, sha, cid, b, Api(b, timeout), ha, timeout)
            try:
                for i in range(runs):
                    rig.run(i, series)
            finally:
                rig.api.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mib = float(size_mib)
    speeds = {k: [mib / s for s in v] for k, v in series.items()}
    common = {"size_mib": size_mib}
    figs: list[Figure] = [
        _fig("teammesh_bitswap_mib_per_s", speeds["tm"], "MiB/s", **common,
             note="2 daemons; POST /v1/files/get on B (what `teammesh get` sends): Bitswap"
                  " into B's store + export to the output file"),
        _fig("teammesh_get_cli_mib_per_s", speeds["tm_cli"], "MiB/s", **common,
             note="wall time of the `teammesh get CID -o OUT` process (+ CLI start-up)"),
        _fig("helia_bitswap_mib_per_s", speeds["helia"], "MiB/s", **common,
             note="2 Helia nodes, cat to a file, timed from sending `cat` to its reply",
             versions=helia_versions()),
        _fig("helia_bitswap_inner_mib_per_s", speeds["helia_inner"], "MiB/s", **common,
             note="the same cats, timed inside Helia (no JSON-lines round trip)"),
        _fig("raw_tcp_mib_per_s", speeds["raw"], "MiB/s", **common,
             note="sender and receiver processes, sendall 1 MiB pieces / recv_into"),
        _fig("teammesh_cid_mib_per_s", speeds["cid_tm"], "MiB/s", **common,
             note="storage.unixfs.cid_of_bytes, CIDv1 raw leaves, 256 KiB, 174 links"),
        _fig("aleph_cid_mib_per_s", speeds["cid_aleph"], "MiB/s", **common,
             note="aleph_cid.CidHasher.for_ipfs_v1_raw_leaves (Rust), same CID checked"),
    ]
    vs_helia = _ratio("bitswap_ratio_vs_helia", speeds["tm"], speeds["helia"],
                      target=">= 1.0 (at least Helia's throughput)")
    vs_helia["met"] = vs_helia["value"] >= 1.0
    vs_raw = _ratio("bitswap_ratio_vs_raw_tcp", speeds["tm"], speeds["raw"],
                    target=">= 0.333 (within 3x of the ceiling)")
    vs_raw["x_of_ceiling"] = 1 / vs_raw["value"]
    vs_raw["note"] += f"; teammesh is {vs_raw['x_of_ceiling']:.1f}x below raw TCP"
    vs_raw["met"] = vs_raw["x_of_ceiling"] <= 3.0
    figs += [vs_helia, vs_raw,
             _ratio("cid_ratio_vs_aleph", speeds["cid_tm"], speeds["cid_aleph"])]
    figs.append({"figure": "machine",
                 "value": f"{platform.machine()} {platform.python_version()}"
                          f" cpus={os.cpu_count()}",
                 "node": _node_version(), "loadavg_start": [round(x, 2) for x in load_start],
                 "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                 "elapsed_s": round(time.monotonic() - t_start, 1)})
    for f in figs:
        emit(f)
    return figs


def bench_from_helia(size_mib: int, runs: int, emit: Callable[[Figure], None]) -> list[Figure]:
    """``teammesh get --from`` a Helia node against Helia B from Helia A, interleaved."""
    _check_args(size_mib, runs)
    t_start = time.monotonic()
    load_start = os.getloadavg()
    size = size_mib * MiB
    timeout = 60.0 + size_mib
    tmp = Path(tempfile.mkdtemp(prefix="teammesh-bench-from-helia-"))
    series: dict[str, list[float]] = {k: [] for k in ("tm", "tm_cli", "helia", "helia_inner")}
    try:
        src = tmp / "data.bin"
        _write_random(src, size)
        sha = _sha256_file(src)
        home = tmp / "home"  # never initialised: --from needs no node
        with helia_peer(tmp / "helia-a.log") as ha:
            cid = ha.call("add", timeout, path=str(src), kubo=True)["cid"]
            log(f"{size_mib} MiB added to Helia A as {cid} (Kubo layout)")
            for i in range(runs):
                load = os.getloadavg()[0]
                out = tmp / "tm.out"
                t0 = time.perf_counter()
                got = run_cli(home, "get", cid, "--from", ha.addr, "-o", str(out), "--json",
                              timeout=timeout)
                series["tm_cli"].append(time.perf_counter() - t0)
                result = json.loads(got.stdout)
                series["tm"].append(float(result["seconds"]))
                _check_output(out, size, sha, "teammesh get --from")
                out = tmp / "helia.out"
                with helia_peer(tmp / f"helia-b{i}.log") as hb:
                    hb.call("connect", 30, addr=ha.addr)
                    t0 = time.perf_counter()
                    r = hb.call("cat", timeout, cid=cid, out=str(out),
                                timeout_ms=int(timeout * 1000))
                    series["helia"].append(time.perf_counter() - t0)
                    series["helia_inner"].append(r["ms"] / 1000)
                _check_output(out, size, sha, "Helia cat")
                mib = size / MiB
                log(f"run {i + 1}: teammesh get --from {mib / series['tm'][-1]:.1f}"
                    f" (process {mib / series['tm_cli'][-1]:.1f}),"
                    f" Helia -> Helia {mib / series['helia'][-1]:.1f} MiB/s (load {load:.2f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mib = float(size_mib)
    speeds = {k: [mib / s for s in v] for k, v in series.items()}
    common = {"size_mib": size_mib, "chunks": "256 KiB raw leaves, 174 links (Kubo)"}
    figs: list[Figure] = [
        _fig("teammesh_from_helia_fetch_mib_per_s", speeds["tm"], "MiB/s", **common,
             target=">= 60", note="`teammesh get --from` Helia A: the fetch as the CLI"
                                  " reports it (Bitswap + output file)"),
        _fig("teammesh_from_helia_cli_mib_per_s", speeds["tm_cli"], "MiB/s", **common,
             note="wall time of the `teammesh get CID --from ADDR` process"),
        _fig("helia_from_helia_mib_per_s", speeds["helia"], "MiB/s", **common,
             note="a fresh Helia B connects to A and cats to a file (timed from `cat`)",
             versions=helia_versions()),
        _fig("helia_from_helia_inner_mib_per_s", speeds["helia_inner"], "MiB/s", **common,
             note="the same cats, timed inside Helia"),
    ]
    ratio = _ratio("from_helia_ratio_vs_helia", speeds["tm"], speeds["helia"],
                   target=">= 1.0")
    ratio["met"] = ratio["value"] >= 1.0
    figs.append(ratio)
    figs[0]["met"] = figs[0]["value"] >= 60
    figs.append({"figure": "machine",
                 "value": f"{platform.machine()} {platform.python_version()}"
                          f" cpus={os.cpu_count()}",
                 "node": _node_version(), "loadavg_start": [round(x, 2) for x in load_start],
                 "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                 "elapsed_s": round(time.monotonic() - t_start, 1)})
    for f in figs:
        emit(f)
    return figs


def _node_version() -> str:
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=None,
                    help="file size (default 256; 100 with --from-helia)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--from-helia", action="store_true",
                    help="teammesh get --from a Helia node vs Helia from Helia")
    a = ap.parse_args()
    if a.from_helia:
        size = a.size_mib or 100
        figs = bench_from_helia(size, a.runs,
                                emit=lambda f: print(json.dumps(f), flush=True))
        print_table(figs, f"files from Helia: {size} MiB, {a.runs} runs, {os.cpu_count()} cpus")
        return 0
    a.size_mib = a.size_mib or 256
    figs = bench_files(a.size_mib, a.runs, emit=lambda f: print(json.dumps(f), flush=True))
    print_table(figs, f"files: {a.size_mib} MiB, {a.runs} runs, {os.cpu_count()} cpus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
