"""Results you can trust: signed result sets, digests, and a lying executor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
from meshtools import init_home, mesh, run_cli, wait_until
from teammesh.protocols import tasks as tp
from teammesh.protocols import wire
from teammesh.protocols.envelope import seal
from teammesh.protocols.errors import ResultRejected
from teammesh.protocols.identity import Identity


def _ids() -> tuple[Identity, Identity]:
    return Identity(os.urandom(32)), Identity(os.urandom(32))


def _sealed(frame: bytes) -> bytes:
    (payload,) = wire.FrameDecoder().feed(frame)
    return wire.field_bytes(wire.unpack(payload), "sealed")


def test_result_set_round_trip() -> None:
    executor, submitter = _ids()
    r = tp.make_result("t1", True, {"x": 1}, None, 1.0, 0.5)
    out = tp.open_results(_sealed(tp.seal_results(executor, submitter.peer_id, [r])),
                          executor.peer_id, submitter.peer_id)
    assert out == [r]


def test_forged_signature_is_rejected() -> None:
    executor, submitter = _ids()
    r = tp.make_result("t1", True, "abc", None, 1.0, 0.5)
    sealed = bytearray(_sealed(tp.seal_results(executor, submitter.peer_id, [r])))
    sealed[-5] ^= 0xFF  # inside the signature
    with pytest.raises(ResultRejected, match="signature"):
        tp.open_results(bytes(sealed), executor.peer_id, submitter.peer_id)


def test_altered_output_with_valid_signature_fails_its_digest() -> None:
    executor, submitter = _ids()
    r = tp.make_result("t1", True, "the real answer", None, 1.0, 0.5)
    lie = r.to_wire() | {"output": "a different answer"}  # digest still of the real one
    body = {"t": "resultset", "v": 1, "submitter": submitter.peer_id,
            "executor": executor.peer_id, "results": [lie]}
    with pytest.raises(ResultRejected, match="digest"):
        tp.open_results(seal(executor, tp.DOMAIN_RESULTS, body), executor.peer_id,
                        submitter.peer_id)


def test_result_signed_by_someone_else_is_rejected() -> None:
    executor, submitter = _ids()
    other = Identity(os.urandom(32))
    r = tp.make_result("t1", True, 1, None, 1.0, 0.5)
    sealed = _sealed(tp.seal_results(other, submitter.peer_id, [r]))
    with pytest.raises(ResultRejected, match="signed by"):
        tp.open_results(sealed, executor.peer_id, submitter.peer_id)
    sealed = _sealed(tp.seal_results(executor, other.peer_id, [r]))
    with pytest.raises(ResultRejected, match="not addressed"):
        tp.open_results(sealed, executor.peer_id, submitter.peer_id)


async def test_lying_executor_is_caught_on_the_wire(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A member whose daemon alters outputs after computing them: every attempt is
    rejected, the task never reports the forged value, and the submitter says why."""
    from teammesh.node.core.config import Home, load_config
    from teammesh.node.daemon import UpOptions, run_daemon
    from teammesh.node.tasks import server as taskserver

    from teammesh.client import Client

    real_seal = tp.seal_results

    def lying_seal(identity: Identity, submitter: str, results: list[Any]) -> bytes:
        forged = []
        for r in results:
            m = r.to_wire() | {"output": "forged"}
            forged.append(tp.TaskResult.from_wire(m))  # keeps the honest digest
        return real_seal(identity, submitter, forged)

    monkeypatch.setattr(taskserver.tp, "seal_results", lying_seal)
    with mesh(tmp_path, 1, slots=[0]) as (submitter,):
        liar_home = init_home(tmp_path / "liar")
        invite = run_cli(submitter.home, "team", "invite").stdout.strip()
        run_cli(liar_home, "join", invite)
        home = Home(liar_home)
        options = UpOptions(listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[], api="127.0.0.1:0",
                            slots=1)
        async with trio.open_nursery() as nursery:
            started: list[Any] = []
            nursery.start_soon(run_daemon, home, load_config(home), options, started.append)
            await trio.to_thread.run_sync(lambda: wait_until(
                lambda: any(p["slots"] == 1 for p in submitter.peers()), 20,
                what="the liar to be advertised"))

            def submit() -> dict[str, Any]:
                with Client.from_home(submitter.home, timeout=120) as c:
                    return c.submit("hash.sha256", b"abc", wait=True, no_cache=True)

            task = await trio.to_thread.run_sync(submit)
            started[0].stop_requested.set()
        assert task["state"] == "failed"
        assert task["output"] is None
        assert "does not match its digest" in task["error"]
        assert all("digest" in (a["error"] or "") for a in task["attempts"])


def test_submitter_does_not_collect_an_output_over_its_limit(tmp_path: Path) -> None:
    """A peer's big output comes back as a file the submitter copies; the copy is bounded
    by the submitter's own limit for the kind (executor.kind_max_output_mb), not only by
    files.max_file_mb, and the failure names it."""
    from teammesh.client import Client

    with mesh(tmp_path, 2, slots=[0, 1]) as (sub, ex):
        sub.stop()
        cfg = sub.home / "config.toml"
        cfg.write_text(cfg.read_text() + '\n[executor.kind_max_output_mb]\n"np.matmul" = 1\n')
        sub.start()
        wait_until(lambda: any(p["peer_id"] == ex.peer_id for p in sub.peers()), 30,
                   what="the executor's ad")
        with Client.from_home(sub.home, timeout=120) as c:
            t = c.submit("np.matmul", params={"a": [[1.0]] * 800, "b": [[2.0] * 800]},
                         wait=True, no_cache=True)
            assert t["state"] == "failed"
            assert t["executed_by"] == ex.peer_id
            assert "1 MiB for np.matmul" in t["error"]
            small = c.submit("np.matmul", params={"a": [[1.0]], "b": [[2.0]]}, wait=True,
                             no_cache=True)
            assert small["output"] == [[2.0]]
