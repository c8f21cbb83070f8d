"""The futures client's protocol core (teammesh/client.py ``_Session``) without I/O: frames
out, replies in, as the node's control socket (node/api/ctlsock.py, op ``watch``) sends them."""

from __future__ import annotations

from typing import Any

import pytest
from teammesh.protocols import wire
from teammesh.protocols.errors import TaskError

from teammesh.client import (
    MAX_TASKS_PER_FRAME,
    ClientClosed,
    TaskCancelled,
    TaskFailed,
    _Session,
)


class Handle:
    def __init__(self) -> None:
        self.task_id: str | None = None
        self.settled: list[tuple[dict[str, Any] | None, BaseException | None]] = []

    def _acked(self, task_id: str) -> None:
        self.task_id = task_id

    def _settle(self, record: dict[str, Any] | None, exc: BaseException | None) -> None:
        self.settled.append((record, exc))


def calls(data: bytes) -> list[dict[str, Any]]:
    return [wire.unpack(f, max_bytes=1 << 30) for f in wire.FrameDecoder(1 << 30).feed(data)]


def frame(msg: dict[str, Any]) -> bytes:
    return wire.frame_message({"v": 1, **msg})


def run(actions: list[Any]) -> None:
    for act in actions:
        act()


def started() -> _Session:
    s = _Session("tok")
    (hello,) = calls(s.take_output())
    assert hello["t"] == "hello"
    assert hello["token"] == "tok"
    run(s.feed(frame({"t": "ok"})))
    return s


def body(i: int) -> dict[str, Any]:
    return {"kind": "base64.encode", "params": {}, "input_b64": "eA==", "tag": i}


def test_submissions_made_together_go_out_as_one_batch_frame() -> None:
    s = started()
    handles = [Handle() for _ in range(MAX_TASKS_PER_FRAME + 5)]
    for i, h in enumerate(handles):
        s.queue(body(i), h)
    first, second = calls(s.take_output())
    assert first["op"] == second["op"] == "watch"
    assert [t["tag"] for t in first["body"]["tasks"]] == list(range(MAX_TASKS_PER_FRAME))
    assert len(second["body"]["tasks"]) == 5
    assert s.take_output() == b""


def test_results_settle_their_futures_in_any_order_even_before_the_reply() -> None:
    s = started()
    a, b, c = Handle(), Handle(), Handle()
    for i, h in enumerate((a, b, c)):
        s.queue(body(i), h)
    (call,) = calls(s.take_output())
    # b ends before the node's reply reaches us; c was a cache hit (whole in the reply)
    run(s.feed(frame({"t": "res", "tasks": [{"id": "B", "state": "done", "output": "x"}]})))
    assert b.settled == []
    run(s.feed(frame({"t": "ret", "id": call["id"], "ok": True, "body": [
        {"id": "A", "state": "queued"}, {"id": "B", "state": "queued"},
        {"id": "C", "state": "done", "output": "z"}]})))
    assert (a.task_id, b.task_id, c.task_id) == ("A", "B", "C")
    assert b.settled == [({"id": "B", "state": "done", "output": "x"}, None)]
    assert c.settled[0][0] == {"id": "C", "state": "done", "output": "z"}
    assert a.settled == []
    run(s.feed(frame({"t": "res", "tasks": [{"id": "A", "state": "failed", "error": "boom"}]})))
    assert a.settled == [({"id": "A", "state": "failed", "error": "boom"}, None)]
    assert not s.watching
    assert not s.early


def test_a_refused_batch_is_sent_again_one_by_one_so_only_the_bad_one_fails() -> None:
    s = started()
    good, bad = Handle(), Handle()
    s.queue(body(0), good)
    s.queue({"kind": "base64.encode", "where": "nowhere"}, bad)
    (call,) = calls(s.take_output())
    run(s.feed(frame({"t": "ret", "id": call["id"], "ok": False, "status": 422,
                      "code": "task_error", "message": "'where' must be one of ..."})))
    assert good.settled == bad.settled == []
    one, two = calls(s.take_output())
    assert [len(c["body"]["tasks"]) for c in (one, two)] == [1, 1]
    run(s.feed(frame({"t": "ret", "id": one["id"], "ok": True,
                      "body": [{"id": "G", "state": "queued"}]})))
    run(s.feed(frame({"t": "ret", "id": two["id"], "ok": False, "status": 422,
                      "code": "task_error", "message": "'where' must be one of ..."})))
    assert good.task_id == "G"
    assert good.settled == []
    ((record, exc),) = bad.settled
    assert record is None
    assert isinstance(exc, TaskError)
    assert "'where'" in str(exc)


def test_cancel_before_sending_never_reaches_the_node_and_after_the_reply_does() -> None:
    s = started()
    unsent, sent = Handle(), Handle()
    s.queue(body(0), unsent)
    act = s.cancel(unsent, None)
    assert act is not None
    act()
    assert isinstance(unsent.settled[0][1], TaskCancelled)
    s.queue(body(1), sent)
    (call,) = calls(s.take_output())
    assert len(call["body"]["tasks"]) == 1
    assert s.cancel(sent, None) is None  # not acknowledged yet: cancelled on the reply
    run(s.feed(frame({"t": "ret", "id": call["id"], "ok": True,
                      "body": [{"id": "S", "state": "queued"}]})))
    (cancel,) = calls(s.take_output())
    assert cancel["op"] == "cancel"
    assert cancel["body"] == {"id": "S"}


def test_losing_the_connection_fails_every_pending_future() -> None:
    s = started()
    acked, unacked, queued = Handle(), Handle(), Handle()
    s.queue(body(0), acked)
    s.queue(body(1), unacked)
    (call,) = calls(s.take_output())
    run(s.feed(frame({"t": "ret", "id": call["id"], "ok": True,
                      "body": [{"id": "A", "state": "queued"}, {"id": "U", "state": "queued"}]})))
    s.queue(body(2), queued)
    run(s.fail_all(ClientClosed("closed")))
    for h in (acked, unacked, queued):
        assert isinstance(h.settled[0][1], ClientClosed)
    with pytest.raises(ClientClosed):
        s.queue(body(3), Handle())


def test_outcomes_are_typed_errors() -> None:
    from teammesh.client import _outcome

    assert _outcome({"id": "t", "state": "done", "output": {"$base64": "eA=="}}) == (b"x", None)
    _, failed = _outcome({"id": "t", "kind": "k", "state": "failed", "error": "why"})
    assert isinstance(failed, TaskFailed)
    assert failed.reason == "why"
    assert failed.task_id == "t"
    _, cancelled = _outcome({"id": "t", "state": "cancelled"})
    assert isinstance(cancelled, TaskCancelled)
