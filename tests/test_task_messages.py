"""Typed task-protocol messages (protocols/tasks.py ``decode``): every message the
builders make decodes to its dataclass, malformed ones raise RemoteProtocolError, and
unknown types from newer peers are ignorable data, not errors."""

from __future__ import annotations

import pytest
from teammesh.protocols import tasks as tp
from teammesh.protocols import wire
from teammesh.protocols.errors import RemoteProtocolError


def _one(frame: bytes) -> tp.TaskMessage:
    (payload,) = wire.FrameDecoder().feed(frame)
    return tp.decode_frame(payload)


def test_every_builder_round_trips() -> None:
    spec = tp.TaskSpec("id1", "hash.sha256", "1", b"x", {"a": 1}, 5000, 2, None)
    assert _one(tp.assign([spec])) == tp.Assign([spec])
    assert _one(tp.accepted(["a"], [("b", "busy", "full"), ("c", "unknown_kind", "no")])) == \
        tp.Accepted(["a"], [tp.Refusal("b", tp.RefuseCode.BUSY, "full"),
                            tp.Refusal("c", tp.RefuseCode.UNKNOWN_KIND, "no")], None)
    got = _one(tp.accepted(["a", "b"], [], {"a": 0, "b": 3}))
    assert isinstance(got, tp.Accepted)
    assert got.positions == {"a": 0, "b": 3}
    assert _one(tp.progress(["a"], "running")) == tp.Progress(["a"], "running")
    assert _one(tp.ack(["a", "b"])) == tp.Ack(["a", "b"])
    assert _one(tp.cancel(["a"])) == tp.Cancel(["a"])
    assert _one(tp.offer("c1", "k", 5000)) == tp.Offer("c1", "k", tp.MAX_OFFER_FREE)
    assert _one(tp.offer("c1", "k", -3)) == tp.Offer("c1", "k", 0)
    assert tp.decode(wire.unpack(tp.call("c2", "k", "2", 1))) == tp.Call("c2", "k", "2", 1)


def test_refusal_codes_from_newer_executors_are_refusals() -> None:
    got = _one(tp.accepted([], [("x", "quota_exceeded", "later")]))
    assert isinstance(got, tp.Accepted)
    assert got.refused == [tp.Refusal("x", tp.RefuseCode.OTHER, "later")]


def test_unknown_type_is_data() -> None:
    assert tp.decode({"t": "hello-from-the-future", "v": 1}) == \
        tp.Unknown("hello-from-the-future")


@pytest.mark.parametrize("m", [
    {"t": "assign", "v": 1, "tasks": "no"},
    {"t": "assign", "v": 1, "tasks": [{"id": 1}]},
    {"t": "accepted", "v": 1, "ids": [1], "refused": []},
    {"t": "accepted", "v": 1, "ids": ["a"], "refused": [["a", "busy"]]},
    {"t": "accepted", "v": 1, "ids": ["a"], "refused": [], "adm": [["a", -1]]},
    {"t": "accepted", "v": 1, "ids": ["a"], "refused": [], "adm": [["a", True]]},
    {"t": "accepted", "v": 1, "ids": ["a"], "refused": [], "adm": [["a"]]},
    {"t": "results", "v": 1, "sealed": "text"},
    {"t": "progress", "v": 1, "ids": ["a"]},
    {"t": "ack", "v": 1, "ids": ["x" * 65]},
    {"t": "cancel", "v": 1},
    {"t": "offer", "v": 1, "call": "c", "kind": 3, "free": 1},
    {"t": "call", "v": 1, "call": "c", "kind": "k", "n": 1},
    {"v": 1},
])
def test_malformed_is_a_remote_protocol_error(m: wire.Message) -> None:
    with pytest.raises(RemoteProtocolError):
        tp.decode(m)
