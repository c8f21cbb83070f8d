"""`teammesh doctor` against a healthy node and broken ones, as a user runs it (the CLI)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from meshtools import CLI, Daemon, init_home, mesh, run_cli, wait_for_full_mesh, wait_until
from s3server import seaweedfs_server


def doctor(home: Path, *args: str) -> tuple[int, dict[str, Any]]:
    proc = run_cli(home, "doctor", "--json", "--timeout", "2", *args, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    return proc.returncode, report


def by_name(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in report["checks"]}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when we return: nothing listens


def test_doctor_passes_on_a_healthy_running_member(tmp_path: Path) -> None:
    with mesh(tmp_path, 2) as nodes:
        wait_for_full_mesh(nodes, timeout=30)
        code, report = doctor(nodes[1].home)
        checks = by_name(report)
        assert code == 0, report
        assert report["ok"] is True
        for name in ("home", "file permissions", "config", "identity", "team certificate",
                     "node", "bootstrap peers"):
            assert checks[name]["status"] == "pass", checks[name]
        # nobody dialled the member (it dialled the admin): a warning that does not fail
        assert checks["dialable"]["status"] == "warn"
        assert "loopback only" in checks["dialable"]["detail"]
        code, admin = doctor(nodes[0].home)
        assert code == 0, admin
        assert by_name(admin)["dialable"]["status"] == "pass"  # the member dialled it
        assert "none needed" in by_name(admin)["bootstrap peers"]["detail"]
        assert nodes[1].peer_id in checks["identity"]["detail"]
        for name in ("kubo", "s3 mirror", "bridge"):
            assert checks[name]["status"] == "skip"
        # the human form: a table with every check, and the summary line
        human = run_cli(nodes[1].home, "doctor", "--timeout", "2")
        assert "all checks passed" in human.stdout
        assert "team certificate" in human.stdout


def test_doctor_fails_on_loose_permissions_and_unreachable_bootstrap(tmp_path: Path) -> None:
    with mesh(tmp_path, 2) as nodes:
        member: Daemon = nodes[1]
        home = member.home
        member.stop()
        # the only member it knows is gone, and its secrets are readable by everyone
        nodes[0].stop()
        os.chmod(home / "api.token", 0o644)
        code, report = doctor(home)
        checks = by_name(report)
        assert code == 1
        assert report["ok"] is False
        perm = checks["file permissions"]
        assert perm["status"] == "fail"
        assert "api.token" in perm["detail"]
        assert f"chmod 600 {home / 'api.token'}" in perm["fix"]
        boot = checks["bootstrap peers"]
        assert boot["status"] == "fail", boot
        assert "none of" in boot["detail"]
        assert boot["fix"]
        assert checks["node"]["status"] == "warn"  # not running: said, not failed
        # one line per failure with its fix in the table form, exit status 1
        human = run_cli(home, "doctor", "--timeout", "2", check=False)
        assert human.returncode == 1
        assert "fix: chmod 600" in human.stdout
        assert "check(s) failed" in human.stdout


def test_doctor_fails_on_a_home_that_is_not_one(tmp_path: Path) -> None:
    code, report = doctor(tmp_path / "nothing")
    assert code == 1
    assert by_name(report)["home"]["status"] == "fail"
    assert "teammesh --home" in by_name(report)["home"]["fix"]


def test_doctor_checks_s3_credentials_and_the_bridge(tmp_path: Path) -> None:
    home = init_home(tmp_path / "solo")
    run_cli(home, "team", "create", "solo")
    with seaweedfs_server(tmp_path / "weed") as s3:
        base = (home / "config.toml").read_text()

        def configure(secret: str) -> None:
            (home / "config.toml").write_text(
                base + f'\n[r2]\nendpoint = "{s3.url}"\nbucket = "doctor"\n'
                f'access_key_id = "{s3.access_key}"\nsecret_access_key = "{secret}"\n'
                f'region = "{s3.region}"\n'
                f'\n[bridge]\nurl = "http://127.0.0.1:{closed_port()}"\n')
            os.chmod(home / "config.toml", 0o600)

        configure(s3.secret_key)
        code, report = doctor(home)
        checks = by_name(report)
        # good credentials: the bucket is missing, which the node fixes itself (warn)
        assert checks["s3 mirror"]["status"] in ("pass", "warn"), checks["s3 mirror"]
        assert checks["clock"]["status"] == "pass", checks["clock"]
        assert "s3" in checks["clock"]["detail"]
        bridge = checks["bridge health"]
        assert bridge["status"] == "fail"
        assert "unreachable" in bridge["detail"]
        assert code == 1

        configure("wrong-secret")
        code, report = doctor(home)
        s3check = by_name(report)["s3 mirror"]
        assert code == 1
        assert s3check["status"] == "fail", s3check
        assert "refused our credentials" in s3check["detail"]
        assert "secret_access_key" in s3check["fix"]


@pytest.mark.parametrize("bad", ["[node]\nslots = -3\n", "not toml ["])
def test_doctor_names_the_bad_config_key(tmp_path: Path, bad: str) -> None:
    home = init_home(tmp_path / "n")
    (home / "config.toml").write_text(bad)
    os.chmod(home / "config.toml", 0o600)
    code, report = doctor(home)
    cfg = by_name(report)["config"]
    assert code == 1
    assert cfg["status"] == "fail"
    assert str(home / "config.toml") in cfg["detail"]


def test_doctor_json_is_one_document_even_when_everything_fails(tmp_path: Path) -> None:
    # the global --json flag, as scripts use it
    proc = subprocess.run([*CLI, "--home", str(tmp_path / "x"), "--json", "doctor"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["ok"] is False


def test_doctor_checks_the_bridge_health_and_signature(tmp_path: Path) -> None:
    from test_bridge import BRIDGE_DIR, run_worker

    if not (BRIDGE_DIR / "node_modules" / "wrangler").is_dir():
        pytest.skip("bridge/node_modules is missing: run `npm ci` in bridge/")
    home = init_home(tmp_path / "admin")
    run_cli(home, "team", "create", "bridged")
    master = json.loads(run_cli(home, "team", "bridge-key", "--json").stdout)["master"]
    base = (home / "config.toml").read_text()
    for key_hex, good in ((master, True), ("ab" * 32, False)):
        with run_worker(tmp_path / f"worker-{good}", key_hex) as url:
            (home / "config.toml").write_text(base + f'\n[bridge]\nurl = "{url}"\n')
            code, report = doctor(home)
        checks = by_name(report)
        assert checks["bridge health"]["status"] == "pass", checks["bridge health"]
        sig = checks["bridge signature"]
        if good:
            assert sig["status"] == "pass", sig
            assert code == 0, report
        else:
            # a Worker holding another team's key: refused, and the fix names the key
            assert sig["status"] == "fail", sig
            assert code == 1
            assert "BRIDGE_KEY" in sig["fix"] or "join again" in sig["fix"]


SKEW_S = 120  # over doctor's 60 s failure threshold, under the bridge's 300 s


def _with_fast_clock(monkeypatch: pytest.MonkeyPatch, fake: Path) -> None:
    """Processes started now run with time.time() SKEW_S ahead (a machine without NTP)."""
    rest = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(fake) + (os.pathsep + rest if rest else ""))


def test_doctor_measures_clock_skew_against_the_peers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fast-clock"
    fake.mkdir()
    fake.joinpath("sitecustomize.py").write_text(
        "import time\n"
        "_time, _ns = time.time, time.time_ns\n"
        f"time.time = lambda: _time() + {SKEW_S}\n"
        f"time.time_ns = lambda: _ns() + {SKEW_S} * 10**9\n")
    with mesh(tmp_path, 3) as nodes:
        wait_for_full_mesh(nodes, timeout=60)
        code, report = doctor(nodes[1].home)
        clock = by_name(report)["clock"]
        assert code == 0, report
        assert clock["status"] == "pass", clock
        assert "peers (median of 2)" in clock["detail"]
        # one member's machine runs 120 s fast
        skewed = nodes[2]
        skewed.stop()
        with monkeypatch.context() as m:
            _with_fast_clock(m, fake)
            skewed.start()

        def offset() -> float | None:
            for p in nodes[1].peers():
                if p["peer_id"] == skewed.peer_id and p["clock_offset_s"] is not None:
                    return float(p["clock_offset_s"]) if p["clock_offset_s"] > 60 else None
            return None

        seen = wait_until(offset, 60, interval=0.5, what="the fast clock in the peer list")
        assert abs(seen - SKEW_S) < 10
        # On a healthy member: its clock agrees with the team's, and the odd one is named.
        code, report = doctor(nodes[1].home)
        clock = by_name(report)["clock"]
        assert code == 0, report
        assert clock["status"] == "warn", clock
        assert skewed.peer_id in clock["detail"]
        assert "on those peers' machines" in clock["fix"]
        # On the fast machine itself: a failure with the fix.
        with monkeypatch.context() as m:
            _with_fast_clock(m, fake)
            code, report = doctor(skewed.home)
        clock = by_name(report)["clock"]
        assert code == 1, report
        assert clock["status"] == "fail", clock
        off = re.search(r"this clock is (\d+) s off", clock["detail"])
        assert off is not None, clock
        assert abs(int(off.group(1)) - SKEW_S) < 10, clock
        assert "peers (median of 2)" in clock["detail"]
        assert "timedatectl set-ntp true" in clock["fix"]
