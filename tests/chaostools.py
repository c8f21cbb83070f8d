"""Tools for the chaos suite (tests/test_chaos.py): batches whose every output can be checked,
a thread that kills and restarts executors, and a three-namespace network the test owns.

The network. This machine's kernel has no ``sch_netem`` (``tc qdisc add ... netem`` answers
"Specified qdisc kind is unknown"), and neither iptables nor nft is installed, so delay and
loss cannot come from the kernel. Each daemon instead gets its own network namespace with
one TUN device (``tmc0``, 10.77.0.N/24); a small switch process (``python chaostools.py hub``,
run here in the host namespace) reads IP packets from every namespace's TUN and writes each
to the namespace that owns its destination address. Per namespace, the switch can delay and
drop what that namespace sends (what netem on its egress would do) and cut it off entirely
(both directions, as ``loss 100%``). With 50 ms on every namespace, a round trip between two
of them is 100 ms. TUN keeps the switch simple: whole IP packets with their checksums, no
ARP, no segmentation offload. Nothing outside the namespaces is touched; every namespace
is deleted by name when the lab closes (their TUN devices go with them).

Every process started here is ended here, by PID.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtools import CLI, Daemon, init_home, wait_until

# --- batches whose outputs a test can check -----------------------------------------------


@dataclass
class Batch:
    """A JSONL batch file and, per tag, the output each task must produce."""

    file: Path
    bodies: list[dict[str, Any]]
    expected: dict[int, Any]


def mixed_batch(folder: Path, n: int, *, sleep_s: float, seed: int,
                input_bytes: int = 2048) -> Batch:
    """``n`` tasks alternating two kinds, each with a distinct, checkable output.

    Even tags: ``base64.encode`` of ``input_bytes`` of distinct random bytes (always a worker
    process, never the daemon's inline path; the output is the input's base64). Odd tags: ``sleep``
    for ``sleep_s`` plus a per-task offset, whose output echoes the seconds asked for; the
    sleeps make the batch last long enough for kills and cuts to land in the middle of it,
    and the offsets make every output name its own task. All ``no_cache``.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    bodies: list[dict[str, Any]] = []
    expected: dict[int, Any] = {}
    for tag in range(n):
        if tag % 2 == 0:
            data = rng.randbytes(input_bytes)
            name = f"in{tag}.bin"
            (folder / name).write_bytes(data)
            lines.append(json.dumps({"kind": "base64.encode", "input": name, "tag": tag,
                                     "no_cache": True}))
            bodies.append({"kind": "base64.encode", "input_b64": base64.b64encode(data).decode(),
                           "tag": tag, "no_cache": True})
            expected[tag] = base64.b64encode(data).decode()
        else:
            seconds = round(sleep_s + tag * 1e-5, 5)
            spec = {"kind": "sleep", "params": {"seconds": seconds}, "tag": tag,
                    "no_cache": True}
            lines.append(json.dumps(spec))
            bodies.append(spec)
            expected[tag] = {"slept": seconds}
    file = folder / "batch.jsonl"
    file.write_text("\n".join(lines) + "\n")
    return Batch(file, bodies, expected)


def wrong_outputs(batch: Batch, results: list[dict[str, Any]]) -> list[str]:
    """Tasks (by tag) that are not done or whose output differs from the expected one."""
    bad: list[str] = []
    for r in results:
        tag = r.get("tag")
        if r.get("state") != "done":
            bad.append(f"tag {tag} ({r.get('id')}): {r.get('state')}: {r.get('error')}")
        elif tag not in batch.expected or r.get("output") != batch.expected[tag]:
            bad.append(f"tag {tag} ({r.get('id')}): output {str(r.get('output'))[:60]!r}")
    return bad


class BatchRun:
    """``teammesh batch FILE --json`` as a subprocess (optionally inside a namespace), its
    JSON lines collected by a reader thread as they arrive."""

    def __init__(self, home: Path, file: Path, netns: str | None = None,
                 parallel: int | None = None) -> None:
        cmd = [*CLI, "--home", str(home), "batch", str(file), "--json"]
        if parallel is not None:
            cmd += ["--parallel", str(parallel)]
        self.proc = subprocess.Popen(ns_prefix(netns) + cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self.garbage: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.garbage.append(line)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def wait(self, timeout: float) -> tuple[int, str]:
        """Exit status and stderr, once the CLI ended and every line is read; kills the CLI
        (not the daemon) if it overruns."""
        note = ""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            note = f"(batch CLI killed after {timeout} s)\n"
        for t in self._readers:
            t.join(30)
        return self.proc.returncode, note + "".join(self.err)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- killing and restarting daemons -------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """PIDs still alive in process group ``pgid`` (a daemon started with its own session,
    so its worker processes share its group)."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces or parentheses: fields start after the last ")"
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


@dataclass
class Killer:
    """A thread that kill -9s a random victim every ``lo``..``hi`` seconds and starts it
    again on the same home ``down_s`` later, at most ``max_kills`` times.

    Records each kill's process group so the test can look for orphaned workers and end
    them (they are the killed daemon's children, started by our daemon)."""

    victims: list[Daemon]
    lo: float
    hi: float
    down_s: float
    max_kills: int
    seed: int
    kills: list[tuple[float, str]] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Killer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(self.seed)
        t0 = time.monotonic()
        try:
            while len(self.kills) < self.max_kills:
                if self._stop.wait(rng.uniform(self.lo, self.hi)):
                    return
                victim = rng.choice(self.victims)
                assert victim.proc is not None
                self.groups.append(victim.proc.pid)
                victim.kill9()
                self.kills.append((round(time.monotonic() - t0, 1), victim.home.name))
                time.sleep(self.down_s)
                victim.start(timeout=60)
        except BaseException as exc:  # re-raised in the test's thread by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(90)
        if self.error is not None:
            raise AssertionError(f"the killer thread failed: {self.error!r}") from self.error

    def orphans(self) -> list[int]:
        return [pid for g in self.groups for pid in group_members(g)]

    def end_orphans(self) -> None:
        for g in self.groups:
            for pid in group_members(g):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# --- network namespaces -------------------------------------------------------------------

SUBNET = "10.77.0"
TUN = "tmc0"


def ns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*ns_prefix(netns), "ip", *args], capture_output=True, text=True,
                          timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} (netns {netns}) failed: {proc.stderr.strip()}")
    return proc


def netns_unavailable() -> str | None:
    """Why this machine cannot give the test its own network namespaces, or None."""
    name = f"tmchaosprobe{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    try:
        tun = _ip("tuntap", "add", "dev", TUN, "mode", "tun", netns=name, check=False)
        if tun.returncode != 0:
            return f"cannot make a TUN device in a namespace: {tun.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


@dataclass
class NetLab:
    """``n`` namespaces joined by the switch process; see the module docstring."""

    n: int
    seed: int = 1
    names: list[str] = field(default_factory=list)
    hub: subprocess.Popen[str] | None = None

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def open(self) -> NetLab:
        for i in range(self.n):
            name = f"tmchaos{os.getpid()}n{i}"
            _ip("netns", "add", name)
            self.names.append(name)
            _ip("link", "set", "lo", "up", netns=name)
            _ip("tuntap", "add", "dev", TUN, "mode", "tun", netns=name)
            _ip("addr", "add", f"{self.addr(i)}/24", "dev", TUN, netns=name)
            _ip("link", "set", TUN, "up", netns=name)
        self.hub = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "hub", str(self.seed), *self.names],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect_ok("start")
        return self

    def _expect_ok(self, what: str) -> None:
        assert self.hub is not None
        assert self.hub.stdout is not None
        line = self.hub.stdout.readline().strip()
        if line != "ok":
            raise RuntimeError(f"the switch failed at {what}: {line!r}")

    def _send(self, command: str) -> None:
        assert self.hub is not None
        assert self.hub.stdin is not None
        self.hub.stdin.write(command + "\n")
        self.hub.stdin.flush()
        self._expect_ok(command)

    def cut(self, i: int) -> None:
        """Drop everything namespace ``i`` sends and everything sent to it."""
        self._send(f"cut {i} 1")

    def heal(self, i: int) -> None:
        self._send(f"cut {i} 0")

    def impair(self, delay_ms: float, loss_pct: float) -> None:
        """Every namespace's outgoing packets: delayed ``delay_ms`` and dropped with
        probability ``loss_pct`` %, as netem on each namespace's egress would."""
        for i in range(self.n):
            self._send(f"impair {i} {delay_ms} {loss_pct}")

    def stats(self) -> dict[str, int]:
        assert self.hub is not None
        assert self.hub.stdin is not None
        assert self.hub.stdout is not None
        self.hub.stdin.write("stats\n")
        self.hub.stdin.flush()
        return dict(json.loads(self.hub.stdout.readline()))

    def close(self) -> None:
        if self.hub is not None:
            if self.hub.poll() is None:
                self.hub.kill()
            self.hub.communicate()
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                              timeout=30).stdout
        stuck = [name for name in self.names if name in left.split()]
        if stuck:
            raise AssertionError(f"namespaces not deleted: {stuck}")


@contextmanager
def netlab(n: int, seed: int = 1) -> Iterator[NetLab]:
    lab = NetLab(n, seed)
    try:
        yield lab.open()
    finally:
        lab.close()


@dataclass
class NsDaemon(Daemon):
    """A daemon run with ``ip netns exec`` (which execs it: the PID is the daemon's own),
    listening on its namespace's address. Its control API's TCP port is on the
    namespace's loopback, so CLI calls run inside the namespace too."""

    netns: str = ""
    ip: str = ""

    def start(self, timeout: float = 30.0) -> NsDaemon:
        self.home.joinpath("api.json").unlink(missing_ok=True)
        self.log = self.home / "daemon.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*ns_prefix(self.netns), *CLI, "-v", "--home", str(self.home), "up",
                 "--listen", f"/ip4/{self.ip}/tcp/0", *self.args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.proc
        wait_until(lambda: self.home.joinpath("api.json").exists() or proc.poll() is not None,
                   timeout, what=f"daemon in {self.home} ({self.netns}) to start")
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}:\n{self.log.read_text()}")
        return self

    def run(self, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli_ns(self.netns, self.home, *args, check=check, timeout=timeout)

    def cli(self, *args: str, timeout: float = 60) -> Any:
        return json.loads(self.run(*args, "--json", timeout=timeout).stdout)


def run_cli_ns(netns: str, home: Path, *args: str, check: bool = True,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*ns_prefix(netns), *CLI, "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"teammesh {' '.join(args)} in {netns} failed ({proc.returncode}):"
                             f"\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def ns_mesh(lab: NetLab, tmp: Path, slots: list[int]) -> Iterator[list[NsDaemon]]:
    """One joined daemon per namespace of ``lab``; the first created the team."""
    daemons: list[NsDaemon] = []
    try:
        first = init_home(tmp / "n0")
        run_cli_ns(lab.names[0], first, "team", "create", "chaosteam")
        daemons.append(NsDaemon(first, ["--slots", str(slots[0])], netns=lab.names[0],
                                ip=lab.addr(0)).start())
        for i in range(1, lab.n):
            home = init_home(tmp / f"n{i}")
            invite = daemons[0].run("team", "invite").stdout.strip()
            run_cli_ns(lab.names[i], home, "join", invite)
            daemons.append(NsDaemon(home, ["--slots", str(slots[i])], netns=lab.names[i],
                                    ip=lab.addr(i)).start())
        yield daemons
    finally:
        for d in daemons:
            d.stop()


def full_mesh(daemons: list[NsDaemon]) -> bool:
    """Every daemon lists every other as a peer."""
    ids = {d.peer_id for d in daemons}
    for d in daemons:
        try:
            seen = {p["peer_id"] for p in d.cli("peers", timeout=30)}
        except (AssertionError, subprocess.TimeoutExpired):
            return False
        if seen != ids - {d.peer_id}:
            return False
    return True


# --- the switch process -------------------------------------------------------------------


def _hub_main(seed: int, names: list[str]) -> None:
    """Forward IP packets between the namespaces' TUN devices; commands on stdin:
    ``cut I 0|1``, ``impair I DELAY_MS LOSS_PCT``, ``stats``; each answered on stdout."""
    import ctypes
    import fcntl
    import heapq
    import select
    import struct

    tunsetiff = 0x400454CA
    iff_tun, iff_no_pi = 0x0001, 0x1000
    clone_newnet = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)

    def enter(fd: int) -> None:
        if libc.setns(fd, clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")

    home_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    fds: list[int] = []
    for name in names:
        target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        enter(target)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", TUN.encode(), iff_tun | iff_no_pi))
            fds.append(fd)
        finally:
            enter(home_ns)
            os.close(target)
    port_of_fd = {fd: i for i, fd in enumerate(fds)}
    port_of_ip = {bytes([10, 77, 0, i + 1]): i for i in range(len(fds))}
    cut = [False] * len(fds)
    delay = [0.0] * len(fds)
    loss = [0.0] * len(fds)
    counts = {"forwarded": 0, "dropped_loss": 0, "dropped_cut": 0, "unroutable": 0}
    rng = random.Random(seed)
    pending: list[tuple[float, int, int, bytes]] = []
    seq = 0
    print("ok", flush=True)

    def deliver(dst: int, packet: bytes) -> None:
        if cut[dst]:
            counts["dropped_cut"] += 1
            return
        try:
            os.write(fds[dst], packet)
            counts["forwarded"] += 1
        except OSError:  # the device is down or its queue is full: a lost packet
            counts["unroutable"] += 1

    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    poller.register(sys.stdin.fileno(), select.POLLIN)
    stdin = sys.stdin.fileno()
    buf = b""
    while True:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, dst, packet = heapq.heappop(pending)
            deliver(dst, packet)
        wait_ms = -1 if not pending else max(0, int((pending[0][0] - now) * 1000) + 1)
        for fd, _ in poller.poll(wait_ms):
            if fd == stdin:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    words = line.decode().split()
                    if words[0] == "cut":
                        cut[int(words[1])] = words[2] == "1"
                    elif words[0] == "impair":
                        delay[int(words[1])] = float(words[2]) / 1000
                        loss[int(words[1])] = float(words[3]) / 100
                    elif words[0] == "stats":
                        print(json.dumps(counts), flush=True)
                        continue
                    print("ok", flush=True)
                continue
            src = port_of_fd[fd]
            for _ in range(256):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(packet) < 20 or packet[0] >> 4 != 4:
                    counts["unroutable"] += 1
                    continue
                to = port_of_ip.get(packet[16:20])
                if to is None or to == src:
                    counts["unroutable"] += 1
                    continue
                if cut[src]:
                    counts["dropped_cut"] += 1
                    continue
                if loss[src] and rng.random() < loss[src]:
                    counts["dropped_loss"] += 1
                    continue
                if delay[src]:
                    seq += 1
                    heapq.heappush(pending, (time.monotonic() + delay[src], seq, to, packet))
                else:
                    deliver(to, packet)


def main(argv: list[str]) -> None:
    if argv[:1] == ["hub"]:
        _hub_main(int(argv[1]), argv[2:])
    else:
        raise SystemExit("usage: chaostools.py hub SEED NETNS...")


if __name__ == "__main__":
    main(sys.argv[1:])

