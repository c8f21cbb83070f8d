"""A task whose input is a file (``input_cid``) gives the same output on every route.

Issue 16: escalation used to send the inline input only, so a CID task that went to the
bridge ran on empty bytes and reported done with a wrong answer. Here, as a user would
run it: an admin node with no slots and the team's bridge (`teammesh bridge dev`), a mesh
executor, and a pull-mode member. The same shared file is hashed on a mesh peer and
through the bridge (the Worker's R2 does not hold it, so the Worker queues it and the
pull member leases it and fetches the file over the mesh); both answers must be the
file's SHA-256, and a second file that differs only in its content gets its own answer.
The same for a file param ({"$cid"}: a .npy matrix for np.matmul), which the Worker never
runs itself.
The Worker reading an input from R2 itself is covered under workerd (bridge/test).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from meshtools import Daemon, wait_until
from teammesh.node.bridge.dev import free_port
from test_escalation import _join, _team, bridge_dev, pytestmark  # noqa: F401

from teammesh.client import Client


def test_a_cid_input_gives_one_answer_on_a_peer_and_through_the_bridge(tmp_path: Path) -> None:
    a_home, e_home, p_home = _team(tmp_path, 3)
    port = free_port()
    with bridge_dev(a_home, port, tmp_path / "state") as url:
        a = Daemon(a_home, ["--slots", "0", "--bridge", url]).start()
        started: list[Daemon] = []
        try:
            _join(a, e_home)
            _join(a, p_home)
            e = Daemon(e_home, ["--slots", "1", "--bootstrap", a.addr]).start()
            started.append(e)
            p = Daemon(p_home, ["--pull", "--bridge", url, "--slots", "1",
                                "--bootstrap", a.addr]).start()
            started.append(p)
            e_id, p_id = e.peer_id, p.peer_id
            wait_until(lambda: len(a.peers()) == 2, 60, what="the mesh")
            files: dict[str, str] = {}
            with Client.from_home(a.home, timeout=180) as c:
                for name in ("one", "two"):
                    path = tmp_path / name
                    path.write_bytes(os.urandom(300 * 1024))  # not an inline input
                    cid = c.request("POST", "/v1/files/share", json={"path": str(path)})["cid"]
                    files[cid] = hashlib.sha256(path.read_bytes()).hexdigest()
                answers: dict[tuple[str, str], dict[str, object]] = {}
                for cid in files:
                    for where in ("any", "bridge"):
                        t = c.submit("hash.sha256", input_cid=cid, where=where, no_cache=True)
                        answers[(cid, where)] = c.task(t["id"], wait=150)
                # a file param ({"$cid"}): a .npy matrix shared by CID, times an inline one
                buf = io.BytesIO()
                np.save(buf, np.array([[1.0, 2.0], [3.0, 4.0]]))
                npy = tmp_path / "a.npy"
                npy.write_bytes(buf.getvalue())
                a_cid = c.request("POST", "/v1/files/share", json={"path": str(npy)})["cid"]
                params = {"a": {"$cid": a_cid}, "b": [[1.0], [10.0]]}
                products = {}
                for where in ("any", "bridge"):
                    t = c.submit("np.matmul", params=params, where=where, no_cache=True)
                    products[where] = c.task(t["id"], wait=150)
        finally:
            for d in reversed(started):
                d.stop()
            a.stop()
    for (cid, where), t in answers.items():
        assert t["state"] == "done", (where, t["error"], t["attempts"])
        assert t["output"] == files[cid], (where, cid)
        if where == "any":
            assert t["executed_by"] in (e_id, p_id), t["attempts"]
        else:
            assert t["executed_by"] == p_id, t["attempts"]  # leased from the Worker
            assert [at["peer"] for at in t["attempts"]] == ["bridge"], t["attempts"]
    assert len({t["output"] for t in answers.values()}) == 2
    for where, t in products.items():
        assert t["state"] == "done", (where, t["error"], t["attempts"])
        assert t["output"] == [[21.0], [43.0]], where
    assert products["any"]["executed_by"] in (e_id, p_id)
    assert products["bridge"]["executed_by"] == p_id, products["bridge"]["attempts"]
