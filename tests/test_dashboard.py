"""The web dashboard and the server-sent event streams, against a real 3-node mesh.

The browser test drives Debian's headless Chromium through chromedriver's WebDriver HTTP
API (plain JSON over HTTP, so no browser automation package is needed): it logs in with
the link `teammesh dashboard` prints, waits for the peers, submits a task from the
form and waits for it to show as done, and saves a screenshot in the test's tmp path.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from meshtools import Daemon, mesh, run_cli, wait_for_full_mesh, wait_until
from s3server import free_ports

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element key


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Daemon]]:
    with mesh(tmp_path_factory.mktemp("dash"), 3) as nodes:
        wait_for_full_mesh(nodes, timeout=30)
        yield nodes


def bearer(d: Daemon) -> dict[str, str]:
    return {"authorization": f"Bearer {(d.home / 'api.token').read_text().strip()}"}


def login_link(d: Daemon) -> str:
    out = run_cli(d.home, "dashboard", "--no-open", "--json").stdout
    return str(json.loads(out)["url"])


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs from a text/event-stream."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_task_events_stream_follows_one_task_to_done_then_ends(team: list[Daemon]) -> None:
    d = team[0]
    url = d.api["url"]
    assert httpx.get(f"{url}/v1/tasks/x/events").status_code == 401
    task = httpx.post(f"{url}/v1/tasks", headers=bearer(d), json={
        "kind": "np.montecarlo_pi", "params": {"samples": 200_000}, "where": "peers"}).json()
    states = []
    with httpx.stream("GET", f"{url}/v1/tasks/{task['id']}/events", headers=bearer(d),
                      timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for event, data in sse_events(resp.iter_lines()):
            assert event == "task"
            assert data["id"] == task["id"]
            states.append(data["state"])
    # the stream ended by itself, on the terminal state, with every change in order
    assert states[-1] == "done", states
    assert states.count("done") == 1
    assert set(states) <= {"queued", "running", "done"}
    final = httpx.get(f"{url}/v1/tasks/{task['id']}", headers=bearer(d)).json()
    assert final["executed_by"] in {team[1].peer_id, team[2].peer_id}
    unknown = httpx.get(f"{url}/v1/tasks/nope/events", headers=bearer(d))
    assert unknown.status_code == 422
    assert "no active task" in unknown.json()["error"]["message"]


def test_login_link_is_one_time_and_the_session_cookie_is_guarded(team: list[Daemon]) -> None:
    d = team[0]
    url = d.api["url"]
    assert httpx.get(f"{url}/").status_code == 401  # not logged in: a page saying how
    link = login_link(d)
    token = (d.home / "api.token").read_text().strip()
    assert token not in link
    with httpx.Client() as browser:
        first = browser.get(link, follow_redirects=False)
        assert first.status_code == 303
        assert first.headers["location"] == "/"
        cookie = first.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        assert browser.get(link).status_code == 401  # the link works once
        page = browser.get(f"{url}/")
        assert page.status_code == 200
        assert "<title>teammesh</title>" in page.text
        assert browser.get(f"{url}/static/app.js").status_code == 200
        assert browser.get(f"{url}/static/..%2Fapi.py").status_code == 404
        assert browser.get(f"{url}/v1/status").json()["peer_id"] == d.peer_id
        body = {"kind": "hash.sha256", "input_b64": base64.b64encode(b"x").decode()}
        # a cookie alone does not authorise a write (a cross-site form could send one)
        assert browser.post(f"{url}/v1/tasks", json=body).status_code == 401
        ok = browser.post(f"{url}/v1/tasks", json=body, headers={"X-Teammesh-Dashboard": "1"})
        assert ok.status_code == 200
        # nor a request whose Host is not loopback (DNS rebinding)
        assert browser.get(f"{url}/v1/status",
                           headers={"host": "evil.example"}).status_code == 401
        assert browser.post(f"{url}/logout",
                            headers={"X-Teammesh-Dashboard": "1"}).status_code == 200
        assert browser.get(f"{url}/v1/status").status_code == 401


def test_events_stream_shows_peers_and_a_task_reaching_done(team: list[Daemon]) -> None:
    d = team[0]
    url = d.api["url"]
    with httpx.Client(timeout=60) as browser:
        browser.get(login_link(d))
        seen: dict[str, str] = {}
        task_id = ""
        deadline = time.monotonic() + 60
        with browser.stream("GET", f"{url}/v1/events") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for event, data in sse_events(resp.iter_lines()):
                assert time.monotonic() < deadline, f"no done task in 60 s: {seen}"
                if event == "overview" and not task_id:
                    peers = {p["peer_id"] for p in data["peers"]}
                    assert peers == {n.peer_id for n in team}
                    assert all(p["slots"] >= 1 for p in data["peers"])
                    assert data["files"]["enabled"] is True
                    assert data["bridge"]["configured"] is False
                    task_id = httpx.post(f"{url}/v1/tasks", headers=bearer(d), json={
                        "kind": "text.stats", "input_b64": base64.b64encode(b"a b c").decode(),
                        "where": "peers"}).json()["id"]
                elif event == "task" and data["id"] == task_id:
                    seen[data["state"]] = data.get("executed_by") or ""
                    if data["state"] in ("done", "failed"):
                        break
        assert "done" in seen, seen
        assert seen["done"] in {team[1].peer_id, team[2].peer_id}


class WebDriver:
    """The few W3C WebDriver commands the test needs, over chromedriver's HTTP API."""

    def __init__(self, tmp: Path) -> None:
        (port,) = free_ports(1)
        self.log = tmp / "chromedriver.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(timeout=60, trust_env=False)
        wait_until(self._ready, 30, what="chromedriver to start")
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1400,1500"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _ready(self) -> bool:
        try:
            return bool(self.http.get(f"{self.base}/status").json()["value"]["ready"])
        except (httpx.HTTPError, ValueError, KeyError):
            return self.proc.poll() is not None  # exited: stop waiting, fail below

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        assert self.proc.poll() is None, self.log.read_text()
        resp = self.http.request(method, self.base + path, json=body)
        value = resp.json()["value"]
        assert resp.status_code == 200, value
        return value

    def cmd(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def js(self, script: str, *args: Any) -> Any:
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def element(self, css: str) -> str:
        ref = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        assert isinstance(ref, dict), ref
        assert ELEMENT in ref, ref
        return str(ref[ELEMENT])

    def close(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.http.close()
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()


@pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                    reason="needs Debian's chromium and chromium-driver (scripts/test installs them)")
def test_dashboard_in_headless_chromium(team: list[Daemon], tmp_path: Path) -> None:
    d = team[0]
    url = d.api["url"]
    wd = WebDriver(tmp_path)
    try:
        wd.cmd("POST", "/url", {"url": login_link(d)})
        # logged in, and neither the code nor the token stays in the address bar
        assert wd.cmd("GET", "/url") == f"{url}/"
        rows = "return [...document.querySelectorAll('#peers tbody tr')].map(r => r.dataset.peer)"
        wait_until(lambda: set(wd.js(rows)) == {n.peer_id for n in team}, 30,
                   what="the three peers in the page")
        assert wd.js("return document.querySelector('#live').textContent") == "live"
        wait_until(lambda: wd.js("return [...document.querySelectorAll('#kind option')]"
                                 ".map(o => o.value)"), 10, what="the kinds list")
        wd.js("document.querySelector('#kind').value = 'text.stats';"
              "document.querySelector('#where').value = 'peers'")
        box = wd.element("#input")
        wd.cmd("POST", f"/element/{box}/clear", {})
        wd.cmd("POST", f"/element/{box}/value", {"text": "the quick brown fox jumps"})
        wd.cmd("POST", f"/element/{wd.element('#submit-button')}/click", {})
        task_id = wait_until(lambda: wd.js(
            "return document.querySelector('#submit-result').dataset.task"), 30,
            what="the page to report the submitted task")
        state = f"return document.querySelector('tr[data-task=\"{task_id}\"]')?.dataset.state"
        wait_until(lambda: wd.js(state) in ("done", "failed"), 60,
                   what="the task to end in the page")
        assert wd.js(state) == "done"
        # running where: a task that takes a while shows the peer it runs on
        wd.js("document.querySelector('#kind').value = 'sleep';"
              "document.querySelector('#params').value = '{\"seconds\": 2}'")
        wd.cmd("POST", f"/element/{wd.element('#submit-button')}/click", {})
        sleeper = wait_until(lambda: (lambda t: t if t and t != task_id else None)(wd.js(
            "return document.querySelector('#submit-result').dataset.task")), 30,
            what="the second submission")
        row = f"document.querySelector('tr[data-task=\"{sleeper}\"]')"
        where = wait_until(lambda: wd.js(f"const r = {row}; return r && r.dataset.state =="
                                         " 'running' ? r.cells[3].textContent : null"), 30,
                           what="the page to show the task running")
        assert where.startswith("on 12D3")
        # failed with the reason: the error the API reports is in the row
        failing = httpx.post(f"{url}/v1/tasks", headers=bearer(d), timeout=60, json={
            "kind": "sleep", "params": {"seconds": 30}, "timeout_s": 0.5, "where": "peers",
            "wait": 60}).json()
        assert failing["state"] == "failed"
        frow = f"document.querySelector('tr[data-task=\"{failing['id']}\"]')"
        shown = wait_until(lambda: wd.js(f"const r = {frow}; return r && r.dataset.state =="
                                         " 'failed' ? r.cells[4].textContent : null"), 30,
                           what="the failed task in the page")
        assert shown == failing["error"]
        wait_until(lambda: wd.js(f"return {row}.dataset.state") == "done", 60,
                   what="the sleeping task to end")
        # a long task is cancelled from its row
        long = httpx.post(f"{url}/v1/tasks", headers=bearer(d), json={
            "kind": "sleep", "params": {"seconds": 600}, "where": "peers"}).json()
        button = f"[data-cancel=\"{long['id']}\"]"
        wait_until(lambda: wd.js(f"return !!document.querySelector('{button}')"), 30,
                   what="the cancel button of the long task")
        wd.cmd("POST", f"/element/{wd.element(button)}/click", {})
        lrow = f"document.querySelector('tr[data-task=\"{long['id']}\"]')"
        wait_until(lambda: wd.js(f"return {lrow}.dataset.state") == "cancelled", 30,
                   what="the page to show the task cancelled")
        assert httpx.get(f"{url}/v1/tasks/{long['id']}",
                         headers=bearer(d)).json()["state"] == "cancelled"
        counts = "return document.querySelector('#counts').dataset"
        wait_until(lambda: int(wd.js(counts)["done"]) >= 2
                   and int(wd.js(counts)["cancelled"]) >= 1, 10, what="the counters")
        # the cancelled task stopped on its executor: every slot is free again
        free = ("return [...document.querySelectorAll('#peers tbody tr')]"
                ".every(r => { const [f, s] = r.cells[1].textContent.split('/');"
                " return f.trim() === s.trim(); })")
        wait_until(lambda: wd.js(free), 30, what="every slot to be free again")
        shot = tmp_path / "dashboard.png"
        shot.write_bytes(base64.b64decode(wd.cmd("GET", "/screenshot")))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot: {shot}")
    finally:
        wd.close()
    task = httpx.get(f"{url}/v1/tasks/{task_id}", headers=bearer(d)).json()
    assert task["state"] == "done"
    assert task["kind"] == "text.stats"
    assert task["executed_by"] in {team[1].peer_id, team[2].peer_id}
    assert task["output"]["words"] == 5


def test_a_node_with_a_dashboard_open_stops_cleanly(tmp_path: Path) -> None:
    with mesh(tmp_path, 1) as (d,):
        browser = httpx.Client(timeout=30)
        browser.get(login_link(d))
        with browser.stream("GET", f"{d.api['url']}/v1/events") as resp:
            events = sse_events(resp.iter_lines())
            assert next(events)[0] == "tasks"
            assert next(events)[0] == "overview"
            # SIGTERM with the stream open: a clean exit (stop() kills after 10 s: -9)
            assert d.stop() == 0
        browser.close()
