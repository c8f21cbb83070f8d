"""Redundant execution against a member that lies (issue 20, item 5; issue 16, k-of-n).

With ``replicas=N`` the submitter runs a task on N distinct members; with ``quorum=K``
(default N: unanimity) it accepts an output as soon as K replicas' output digests agree,
and fails the task as soon as no digest can reach K (node/tasks/service.py,
``_settle_replicas``, applying protocols/scheduler_rules.py's ``settle_quorum``, the
scheduler's Rule 9). Replicas still running then are cancelled. Here one member is the
real daemon patched to return a consistent wrong answer, and to never finish a ``sleep``
task until cancelled (tests/lying_member.py): the user must see either the honest
majority's output, with only the honest members in ``executed_by``, or a failed task
naming the disagreement, never ``done`` with the lie.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lying_member import CANCEL_RECEIVED, LIE
from meshtools import (
    LOOPBACK,
    Daemon,
    init_home,
    log_tail,
    mesh,
    run_cli,
    wait_for_full_mesh,
    wait_until,
)
from teammesh.protocols.errors import TaskError
from teammesh.protocols.tasks import output_digest

from teammesh.client import Client, TaskFailed

HERE = Path(__file__).resolve().parent


class LyingDaemon(Daemon):
    """`teammesh up` through tests/lying_member.py."""

    def start(self, timeout: float = 15.0) -> Daemon:
        self.home.joinpath("api.json").unlink(missing_ok=True)
        self.log = self.home / "daemon.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "lying_member.py"), "-v", "--home",
                 str(self.home), "up", "--listen", LOOPBACK, *self.args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.home.joinpath("api.json").exists() or self.proc.poll() is not None,
                   timeout, what="the lying daemon to start")
        assert self.proc.poll() is None, self.log.read_text()
        return self


def test_replicas_that_disagree_fail_the_task_and_nothing_is_accepted(tmp_path: Path) -> None:
    with mesh(tmp_path, 2, slots=[0, 1]) as (sub, honest):
        home = init_home(tmp_path / "liar")
        run_cli(home, "join", run_cli(sub.home, "team", "invite").stdout.strip())
        liar = LyingDaemon(home, ["--slots", "1", "--bootstrap", sub.addr]).start()
        try:
            wait_for_full_mesh([sub, honest, liar], timeout=30)
            data = b"which of you is right?"
            with Client.from_home(sub.home, timeout=120) as c:
                t = c.submit("hash.sha256", data, replicas=2, wait=60)
                assert t["state"] == "failed", t
                assert t["output"] is None
                assert t["error"].startswith("replicas disagree: ")
                # each member named with the digest of what it answered
                truth = output_digest(True, hashlib.sha256(data).hexdigest(), None).hex()[:12]
                lie = output_digest(True, LIE, None).hex()[:12]
                assert f"{honest.peer_id} -> {truth}" in t["error"]
                assert f"{liar.peer_id} -> {lie}" in t["error"]
                assert set(t["executed_by"].split(",")) == {honest.peer_id, liar.peer_id}
                assert c.task(t["id"])["state"] == "failed"  # the journal agrees
                # the futures API raises, with the same reason
                with pytest.raises(TaskFailed, match="replicas disagree") as info:
                    c.future("hash.sha256", data, replicas=2).result(60)
                assert liar.peer_id in info.value.reason
            # and the CLI exits non-zero, saying why
            (tmp_path / "in.bin").write_bytes(data)
            proc = run_cli(sub.home, "submit", "hash.sha256", "--input", str(tmp_path / "in.bin"),
                           "--replicas", "2", "--wait", "--json", check=False)
            assert proc.returncode != 0
            shown = json.loads(proc.stdout)
            assert shown["state"] == "failed"
            assert "replicas disagree" in shown["error"]
        finally:
            liar.stop()


# --- k-of-n: a submitter, two honest members and a liar ------------------------------------
@dataclass
class Team:
    sub: Daemon  # submits; runs nothing (0 slots), so every replica goes to a member
    honest: tuple[Daemon, Daemon]
    liar: Daemon


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    tmp = tmp_path_factory.mktemp("quorum")
    with mesh(tmp, 3, slots=[0, 1, 1]) as (sub, h1, h2):
        home = init_home(tmp / "liar")
        run_cli(home, "join", run_cli(sub.home, "team", "invite").stdout.strip())
        liar = LyingDaemon(home, ["--slots", "1", "--bootstrap", sub.addr]).start()
        try:
            wait_for_full_mesh([sub, h1, h2, liar], timeout=30)
            yield Team(sub, (h1, h2), liar)
        finally:
            liar.stop()


def digest12(output: str) -> str:
    return output_digest(True, output, None).hex()[:12]


def test_two_of_three_accept_the_honest_answer_despite_a_liar(team: Team, tmp_path: Path
                                                              ) -> None:
    honest = {d.peer_id for d in team.honest}
    data = b"two of three is enough"
    truth = hashlib.sha256(data).hexdigest()
    with Client.from_home(team.sub.home, timeout=120) as c:
        t = c.submit("hash.sha256", data, replicas=3, quorum=2, wait=60)
        assert t["state"] == "done", t
        assert t["output"] == truth
        # whichever answered first, only the two that agree are named
        assert set(t["executed_by"].split(",")) == honest
        assert (t["replicas"], t["quorum"]) == (3, 2)
        # every member got the task: the liar's attempt is there, its answer was not taken
        assert team.liar.peer_id in {a["peer"] for a in t["attempts"]}
        shown = c.task(t["id"])
        assert (shown["state"], shown["output"], shown["quorum"]) == ("done", truth, 2)
        assert c.future("hash.sha256", data + b"!", replicas=3, quorum=2).result(60) == \
            hashlib.sha256(data + b"!").hexdigest()
    # the CLI asks for the same with --quorum
    (tmp_path / "in.bin").write_bytes(data)
    proc = run_cli(team.sub.home, "submit", "hash.sha256", "--input", str(tmp_path / "in.bin"),
                   "--replicas", "3", "--quorum", "2", "--no-cache", "--wait", "--json")
    shown = json.loads(proc.stdout)
    assert (shown["state"], shown["output"]) == ("done", truth)
    assert set(shown["executed_by"].split(",")) == honest


def test_the_replica_still_running_when_the_quorum_agrees_is_cancelled(team: Team) -> None:
    """The liar never finishes a sleep: the two honest answers settle the task, and the
    submitter tells the liar to stop (its executor logs each cancel it receives)."""
    honest = {d.peer_id for d in team.honest}
    with Client.from_home(team.sub.home, timeout=120) as c:
        t = c.submit("sleep", params={"seconds": 0.2}, replicas=3, quorum=2, timeout_s=600,
                     wait=60)
        assert t["state"] == "done", t
        assert t["output"] == {"slept": 0.2}
        assert set(t["executed_by"].split(",")) == honest
        (mine,) = [a for a in t["attempts"] if a["peer"] == team.liar.peer_id]
        assert mine["error"] == "cancelled: the task settled on 2 of 3 replicas"
        assert mine["ended"] is not None
    log = team.liar.log
    assert log is not None
    wait_until(lambda: f"{CANCEL_RECEIVED} {t['id']}" in log.read_text(errors="replace"),
               60, what=f"the liar to be told to stop {t['id']}:\n{log_tail(team.liar)}")


def test_all_three_with_a_liar_fail_naming_the_disagreement(team: Team) -> None:
    data = b"all three must agree"
    truth, lie = digest12(hashlib.sha256(data).hexdigest()), digest12(LIE)
    with Client.from_home(team.sub.home, timeout=120) as c:
        t = c.submit("hash.sha256", data, replicas=3, quorum=3, wait=60)
        assert t["state"] == "failed", t
        assert t["output"] is None
        error = t["error"]
        assert error.startswith("replicas disagree: ")
        # the liar and at least one honest member (the third may not have answered: once
        # the liar has, 3 equal answers are impossible and the task fails at once)
        assert f"{team.liar.peer_id} -> {lie}" in error
        assert any(f"{d.peer_id} -> {truth}" in error for d in team.honest), error
        assert "no answer can reach the quorum of 3 of 3 replicas" in error
        assert team.liar.peer_id in t["executed_by"].split(",")
        assert c.task(t["id"])["state"] == "failed"
        with pytest.raises(TaskFailed, match="replicas disagree"):
            c.future("hash.sha256", data + b"!", replicas=3, quorum=3).result(60)


def test_a_quorum_outside_1_to_replicas_is_refused_before_anything_runs(team: Team) -> None:
    with Client.from_home(team.sub.home, timeout=120) as c:
        before = len(c.tasks(limit=1000))
        for quorum in (3, 0, "2", True):
            answer = c._http.post("/v1/tasks", json={"kind": "hash.sha256", "replicas": 2,
                                                     "quorum": quorum})
            assert answer.status_code == 422, (quorum, answer.text)
            message = answer.json()["error"]["message"]
            assert message.startswith("'quorum' must be an integer from 1 to 'replicas' (2)")
        with pytest.raises(TaskError, match="'quorum' must be an integer from 1"):
            c.submit("hash.sha256", b"x", replicas=2, quorum=3)  # the control socket too
        with pytest.raises(TaskError, match="'quorum'"):
            c.submit_batch([{"kind": "hash.sha256", "replicas": 1},
                            {"kind": "hash.sha256", "replicas": 1, "quorum": 2}])
        assert len(c.tasks(limit=1000)) == before  # all or nothing: none was journaled
    proc = run_cli(team.sub.home, "submit", "hash.sha256", "--replicas", "2", "--quorum", "3",
                   check=False)
    assert proc.returncode == 2, proc.stderr  # click's usage error
    assert "--quorum" in proc.stderr
    assert "3 is more than --replicas 2" in proc.stderr
    proc = run_cli(team.sub.home, "submit", "hash.sha256", "--quorum", "0", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "--quorum" in proc.stderr


def test_a_task_journaled_before_quorums_resumes_needing_every_replica(team: Team) -> None:
    """A replicated task in a journal written before ``quorum`` existed (its options say
    replicas 3 and nothing else) resumes after a restart as it was submitted: all three
    must agree, so with the liar among them it fails, where 2 of 3 would have passed.
    Runs last: it restarts the submitter."""
    data = b"submitted by an older node"
    tid = "oldjournal-quorum"
    options = {"priority": 0, "where": "any", "replicas": 3, "timeout_s": None,
               "no_cache": False, "tag": "old", "cached": False, "input_cid": None}
    assert team.sub.stop() == 0
    db = sqlite3.connect(team.sub.home / "journal.db")
    with db:
        db.execute("INSERT INTO tasks(id, kind, version, input, params, options, state,"
                   " attempts, submitted) VALUES(?, 'hash.sha256', '1', ?, '{}', ?, 'queued',"
                   " '[]', ?)", (tid, data, json.dumps(options), time.time()))
    db.close()
    team.sub.start()
    wait_for_full_mesh([team.sub, *team.honest, team.liar], timeout=30)
    with Client.from_home(team.sub.home, timeout=120) as c:
        t = c.task(tid, wait=60)
    assert (t["replicas"], t["quorum"], t["tag"]) == (3, 3, "old")
    assert t["state"] == "failed", t
    assert t["error"].startswith("replicas disagree: ")
    assert f"{team.liar.peer_id} -> {digest12(LIE)}" in t["error"]
    assert "the quorum of 3 of 3 replicas" in t["error"]
