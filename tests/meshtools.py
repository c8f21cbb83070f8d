"""Real daemons for tests: homes, `teammesh up` subprocesses on 127.0.0.1, and waiting.

Every process started here is ended here, by its PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

CLI = [sys.executable, "-m", "teammesh.node.cli.main"]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def run_cli(home: Path, *args: str, check: bool = True, timeout: float = 60,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, "--home", str(home), *args], capture_output=True, text=True,
                          timeout=timeout, input=input.decode() if input else None)
    if check and proc.returncode != 0:
        raise AssertionError(f"teammesh {' '.join(args)} failed ({proc.returncode}):"
                             f"\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(home: Path, *args: str, timeout: float = 60) -> Any:
    return json.loads(run_cli(home, *args, "--json", timeout=timeout).stdout)


@dataclass
class Daemon:
    home: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self, timeout: float = 15.0) -> Daemon:
        self.home.joinpath("api.json").unlink(missing_ok=True)
        self.log = self.home / "daemon.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "-v", "--home", str(self.home), "up", "--listen", LOOPBACK, *self.args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.home.joinpath("api.json").exists() or self.proc.poll() is not None,
                   timeout, what=f"daemon in {self.home} to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
        return self

    @property
    def api(self) -> dict[str, Any]:
        return dict(json.loads(self.home.joinpath("api.json").read_text()))

    @property
    def addr(self) -> str:
        return str(self.api["addrs"][0])

    @property
    def peer_id(self) -> str:
        return str(self.api["peer_id"])

    def cli(self, *args: str, timeout: float = 60) -> Any:
        return cli_json(self.home, *args, timeout=timeout)

    def peers(self) -> list[dict[str, Any]]:
        return list(self.cli("peers"))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def journal_value(home: Path, key: str) -> bytes | None:
    """One key of a node's journal (its kv table), e.g. its bridge key."""
    from teammesh.node.core.journal import Journal

    journal = Journal(home / "journal.db")
    try:
        return journal.get(key)
    finally:
        journal.close()


def init_home(path: Path) -> Path:
    run_cli(path, "init")
    return path


@contextmanager
def mesh(tmp: Path, n: int, *, slots: list[int] | None = None,
         extra: list[str] | None = None) -> Iterator[list[Daemon]]:
    """n joined daemons on loopback; the first created the team."""
    daemons: list[Daemon] = []
    try:
        first = init_home(tmp / "n0")
        run_cli(first, "team", "create", "testteam")
        args0 = ["--slots", str(slots[0])] if slots else []
        daemons.append(Daemon(first, args0 + (extra or [])).start())
        for i in range(1, n):
            home = init_home(tmp / f"n{i}")
            invite = run_cli(first, "team", "invite").stdout.strip()
            run_cli(home, "join", invite)
            args = ["--slots", str(slots[i])] if slots else []
            daemons.append(Daemon(home, args + (extra or [])).start())
        yield daemons
    finally:
        for d in daemons:
            d.stop()


def log_tail(d: Daemon, chars: int = 3000) -> str:
    """The end of a daemon's log, for failure messages."""
    if d.log is None or not d.log.exists():
        return "(no log)"
    return d.log.read_text(errors="replace")[-chars:]


def wait_for_full_mesh(daemons: list[Daemon], timeout: float = 10.0) -> None:
    """Wait until every daemon lists every other one. A daemon that is not running fails
    the wait at once, with its log tail: a mesh of the survivors is not the mesh asked for."""

    def check_alive() -> None:
        for d in daemons:
            if not d.alive():
                code = d.proc.returncode if d.proc is not None else "never started"
                raise AssertionError(f"daemon {d.home.name} is not running (exit {code})"
                                     f" while waiting for the full mesh; its log ends:\n"
                                     f"{log_tail(d)}")

    check_alive()
    ids = {d.peer_id for d in daemons}

    def full() -> bool:
        check_alive()
        for d in daemons:
            try:
                seen = {p["peer_id"] for p in d.peers()}
            except AssertionError:
                check_alive()  # it died during the call: say so, with its log
                raise
            if seen != ids - {d.peer_id}:
                return False
        return True

    wait_until(full, timeout, interval=0.2, what="every node to list every other")


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py (the bench scripts are not a package) as module ``name``."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod
