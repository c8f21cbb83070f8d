"""``TEAMMESH_<SECTION>_<KEY>`` environment variables over config.toml, end to end
(issue 20, item 5; node/core/config.py, ``load_config``).

A daemon started with the variables set reports the overridden values where a user looks
(``status --json``, a task's waiting reason); restarted without them it is back to the
file's values; a bad value stops ``teammesh up`` with the variable named.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from meshtools import CLI, LOOPBACK, Daemon, init_home, run_cli, wait_until

from teammesh.client import Client

FILE = """
[node]
slots = 1

[executor]
allow = ["*"]
"""


def _home(tmp_path: Path) -> Path:
    home = init_home(tmp_path / "node")
    run_cli(home, "team", "create", "envteam")
    (home / "config.toml").write_text(FILE)
    return home


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _home(tmp_path)
    monkeypatch.setenv("TEAMMESH_NODE_SLOTS", "3")
    monkeypatch.setenv("TEAMMESH_EXECUTOR_ALLOW", '["hash.*", "sleep"]')
    monkeypatch.setenv("TEAMMESH_SCHEDULER_KIND_LIMITS", "{ sleep = 1 }")  # a TOML table
    node = Daemon(home).start()
    try:
        status = node.cli("status")
        assert status["slots"] == 3
        assert status["kinds"] == sorted(k for k in status["kinds"]
                                         if k.startswith("hash.") or k == "sleep")
        assert "sleep" in status["kinds"]
        assert "hash.sha256" in status["kinds"]
        assert "base64.encode" not in status["kinds"]
        with Client.from_home(home, timeout=120) as c:
            refused = c.submit("base64.encode", b"x", where="local", wait=60, no_cache=True)
            assert refused["state"] == "failed"
            ts = [c.submit("sleep", params={"seconds": 600}, no_cache=True) for _ in range(2)]
            wait_until(lambda: any(c.task(t["id"])["waiting_reason"] ==
                                   "kind limit: 1 sleep tasks already running" for t in ts),
                       30, what="the second sleep to wait for the kind limit from the env")
            for t in ts:
                c.cancel(t["id"])
    finally:
        node.stop()
    # the same home without the variables: the file's values
    for name in ("TEAMMESH_NODE_SLOTS", "TEAMMESH_EXECUTOR_ALLOW",
                 "TEAMMESH_SCHEDULER_KIND_LIMITS"):
        monkeypatch.delenv(name)
    node = Daemon(home).start()
    try:
        status = node.cli("status")
        assert status["slots"] == 1
        assert "base64.encode" in status["kinds"]
    finally:
        node.stop()
    # a command-line flag beats both
    monkeypatch.setenv("TEAMMESH_NODE_SLOTS", "3")
    node = Daemon(home, ["--slots", "2"]).start()
    try:
        assert node.cli("status")["slots"] == 2
    finally:
        node.stop()


@pytest.mark.parametrize(("name", "value", "message"), [
    ("TEAMMESH_NODE_SLOTS", "many",
     "error: environment TEAMMESH_NODE_SLOTS: node.slots = 'many' is invalid;"
     " it must be an integer from 0 to 1024"),
    ("TEAMMESH_SCHEDULER_CACHE_TTL_S", "0",
     "error: environment TEAMMESH_SCHEDULER_CACHE_TTL_S: scheduler.cache_ttl_s = 0 is"
     " invalid; it must be a number of seconds >= 1"),
    ("TEAMMESH_NODE_SLOTZ", "3", "error: environment TEAMMESH_NODE_SLOTZ: unknown key"
     " node.slotz; known keys: "),
])
def test_a_bad_environment_value_stops_the_daemon_and_names_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str,
        message: str) -> None:
    home = _home(tmp_path)
    monkeypatch.setenv(name, value)
    # in its own process group: if it wrongly starts, the daemon and its workers are
    # ended here, by the group's id
    proc = subprocess.Popen([*CLI, "--home", str(home), "up", "--listen", LOOPBACK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"teammesh up started with {name}={value}") from None
    assert proc.returncode == 1
    assert stderr.startswith(message), stderr
    assert not (home / "api.json").exists()
