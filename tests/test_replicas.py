"""Redundant execution against a member that lies (issue 20, item 5: replica disagreement).

With ``replicas=N`` the submitter runs a task on N distinct members and accepts the
output only when every replica's output digest agrees (node/tasks/service.py,
``_settle_replicas``: unanimity, not a majority; the scheduler simulation checks the
same rule in tests/test_scheduler_sim.py::test_replicas_disagree_is_a_typed_failure).
Here one member is the real daemon patched to return a consistent wrong answer
(tests/lying_member.py): the user must see a failed task naming the disagreement, never
``done`` with either output.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lying_member import LIE
from meshtools import LOOPBACK, Daemon, init_home, mesh, run_cli, wait_for_full_mesh, wait_until
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
