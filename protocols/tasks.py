"""Task protocol messages: assign, accepted, cancel, results, ack, call and offer.

Theory of operation (the submitter is S, the executor is E, one long-lived stream from S
to E on ``/teammesh/tasks/1.0.0`` carries both directions):

- S → E ``assign``: a batch of tasks. Task ids are globally unique and make every step
  idempotent: E runs an id at most once; a repeated assign for a finished id gets the
  stored result again; a repeated result at S changes nothing.
- E → S ``accepted``: which ids E queued and which it refused (busy, unknown kind, not
  allowed), so S can route refused ones elsewhere at once.
- E → S ``results``: a batch of results sealed (signed) once by E. Each result carries
  the sha256 digest of its packed output; S checks the seal's signer is the peer at the
  other end of the stream, and every digest, before it believes anything.
- E → S ``progress``: these ids started running on a worker (until then they wait in
  E's queue); S shows it in the task's state.
- S → E ``ack``: S has journaled these results; E may forget them.
- S → E ``cancel``: stop these ids if they have not finished.
- Open calls (gossip, ``call``): "who can run kind K?", published when tasks have waited
  longer than the offer window; members with free slots answer with an ``offer`` on a
  ``/teammesh/offer/1.0.0`` stream they open to the caller. An offer is fresher than any
  ad: the caller counts the offered slots as room for one offer window.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from . import wire
from .envelope import open_sealed, seal
from .errors import MalformedMessage, ResultRejected, TeammeshError
from .identity import Identity

DOMAIN_RESULTS = "results"
MAX_BATCH = 4096
MAX_INLINE_INPUT = 4 * 1024 * 1024
MAX_PARAMS_BYTES = 1024 * 1024  # packed; bigger data goes as input or by CID
OUTPUT_INLINE_MAX = 1024 * 1024  # larger byte outputs are stored as files and sent by CID
BATCH_BYTES = 2 * 1024 * 1024  # keep every frame well under wire.MAX_FRAME_BYTES
T = TypeVar("T")


def chunks(items: list[T], size: Callable[[T], int]) -> Iterator[list[T]]:
    """Split a batch so each part holds at most MAX_BATCH items and about BATCH_BYTES."""
    part: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if part and (len(part) >= MAX_BATCH or total + n > BATCH_BYTES):
            yield part
            part, total = [], 0
        part.append(item)
        total += n
    if part:
        yield part


@dataclass(frozen=True, slots=True)
class TaskSpec:
    id: str
    kind: str
    version: str
    input: bytes
    params: dict[str, Any]
    timeout_ms: int
    priority: int = 0
    input_cid: str | None = None  # the input is this file (fetched by the executor)

    @property
    def size_hint(self) -> int:
        return len(self.input) + params_size(self.params) + 256

    def to_wire(self) -> dict[str, Any]:
        m = {"id": self.id, "kind": self.kind, "ver": self.version, "input": self.input,
             "params": self.params, "timeout": self.timeout_ms, "prio": self.priority}
        if self.input_cid is not None:
            m["cid"] = self.input_cid
        return m

    @classmethod
    def from_wire(cls, m: Any) -> TaskSpec:
        if not isinstance(m, dict):
            raise MalformedMessage("a task must be a map")
        return cls(
            id=wire.field_str(m, "id", max_len=64), kind=wire.field_str(m, "kind", max_len=128),
            version=wire.field_str(m, "ver", max_len=32),
            input=wire.field_bytes(m, "input", max_len=MAX_INLINE_INPUT),
            params=wire.field_map(m, "params"), timeout_ms=wire.field_int(m, "timeout"),
            priority=wire.field_int(m, "prio"),
            input_cid=wire.field_str(m, "cid", max_len=128) if "cid" in m else None,
        )

    @property
    def needs_files(self) -> bool:
        return self.input_cid is not None or any(is_cid_ref(v) for v in self.params.values())


def params_size(params: dict[str, Any]) -> int:
    """Bytes of ``params`` packed (0 for the common empty map)."""
    return len(wire.pack({"p": params})) if params else 0


def json_safe(value: Any) -> Any:
    """Task outputs may hold bytes; JSON shows them as {"$base64": ...}."""
    if isinstance(value, bytes):
        import base64

        return {"$base64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def is_cid_ref(value: Any) -> bool:
    """A param given as a file: ``{"$cid": "bafy..."}``."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("$cid"), str)


@dataclass(frozen=True, slots=True)
class TaskResult:
    id: str
    ok: bool
    output: Any
    error: str | None
    digest: bytes
    wall_ms: float
    cpu_ms: float

    @property
    def size_hint(self) -> int:
        out = self.output
        n = len(out) if isinstance(out, (bytes, str)) else 0
        if n == 0 and out is not None and not isinstance(out, (int, float, bool)):
            n = len(wire.pack({"o": out}))
        return n + 256

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "ok": self.ok, "output": self.output, "error": self.error,
                "digest": self.digest, "wall": self.wall_ms, "cpu": self.cpu_ms}

    @classmethod
    def from_wire(cls, m: Any) -> TaskResult:
        if not isinstance(m, dict):
            raise MalformedMessage("a result must be a map")
        ok = m.get("ok")
        err = m.get("error")
        if not isinstance(ok, bool) or not (err is None or isinstance(err, str)):
            raise MalformedMessage("result fields 'ok'/'error' have the wrong types")
        return cls(id=wire.field_str(m, "id", max_len=64), ok=ok, output=m.get("output"),
                   error=err, digest=wire.field_bytes(m, "digest", max_len=32),
                   wall_ms=wire.field_float(m, "wall"), cpu_ms=wire.field_float(m, "cpu"))


def output_digest(ok: bool, output: Any, error: str | None) -> bytes:
    return hashlib.sha256(wire.pack({"ok": ok, "output": output, "error": error})).digest()


def make_result(task_id: str, ok: bool, output: Any, error: str | None, wall_ms: float,
                cpu_ms: float) -> TaskResult:
    return TaskResult(task_id, ok, output, error, output_digest(ok, output, error),
                      round(wall_ms, 3), round(cpu_ms, 3))


def assign(tasks: list[TaskSpec]) -> bytes:
    return wire.frame_message({"t": "assign", "v": 1, "tasks": [t.to_wire() for t in tasks]})


def accepted(ids: list[str], refused: list[tuple[str, str, str]],
             positions: dict[str, int] | None = None) -> bytes:
    """``refused`` holds (id, code, message); code is busy, unknown_kind or not_allowed.
    ``positions``: the admission of each accepted id (see ``Accepted``)."""
    m: dict[str, Any] = {"t": "accepted", "v": 1, "ids": ids,
                         "refused": [list(r) for r in refused]}
    if positions is not None:
        m["adm"] = [[i, p] for i, p in positions.items()]
    return wire.frame_message(m)


def seal_results(identity: Identity, submitter: str, results: list[TaskResult]) -> bytes:
    body = {"t": "resultset", "v": 1, "submitter": submitter, "executor": identity.peer_id,
            "results": [r.to_wire() for r in results]}
    return wire.frame_message({"t": "results", "v": 1, "sealed": seal(identity, DOMAIN_RESULTS,
                                                                       body)})


def open_results(sealed: bytes, executor: str, submitter: str) -> list[TaskResult]:
    """Verify a sealed result batch from ``executor`` meant for ``submitter``."""
    try:
        opened = open_sealed(sealed, DOMAIN_RESULTS, max_bytes=wire.MAX_FRAME_BYTES)
    except MalformedMessage as exc:
        raise ResultRejected(f"result batch from {executor} is malformed: {exc}") from exc
    except TeammeshError as exc:  # BadSignature and friends: name the peer
        raise ResultRejected(f"result batch from {executor} has a bad signature") from exc
    if opened.signer != executor:
        raise ResultRejected(f"result batch on {executor}'s stream signed by {opened.signer}")
    body = opened.body
    if body.get("t") != "resultset" or body.get("submitter") != submitter:
        raise ResultRejected(f"result batch from {executor} is not addressed to us")
    out: list[TaskResult] = []
    for m in wire.field_list(body, "results", max_len=MAX_BATCH):
        r = TaskResult.from_wire(m)
        if output_digest(r.ok, r.output, r.error) != r.digest:
            raise ResultRejected(f"result {r.id} from {executor} does not match its digest")
        out.append(r)
    return out


def progress(ids: list[str], state: str) -> bytes:
    """E → S: these tasks changed state on the executor (``running``: a worker took them)."""
    return wire.frame_message({"t": "progress", "v": 1, "ids": ids, "state": state})


def ack(ids: list[str]) -> bytes:
    return wire.frame_message({"t": "ack", "v": 1, "ids": ids})


def cancel(ids: list[str]) -> bytes:
    return wire.frame_message({"t": "cancel", "v": 1, "ids": ids})


def offer(call_id: str, kind: str, free: int) -> bytes:
    return wire.frame_message({"t": "offer", "v": 1, "call": call_id, "kind": kind,
                               "free": free})


def call(call_id: str, kind: str, version: str, count: int) -> bytes:
    """An open call, published on the team's tasks topic (no frame: gossip is a message)."""
    return wire.pack({"t": "call", "v": 1, "call": call_id, "kind": kind, "ver": version,
                      "n": count})


def id_list(m: wire.Message, key: str = "ids") -> list[str]:
    ids = wire.field_list(m, key, max_len=MAX_BATCH)
    if not all(isinstance(i, str) and len(i) <= 64 for i in ids):
        raise MalformedMessage(f"field {key!r} must be a list of task ids")
    return ids


def refused_list(m: wire.Message) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for r in wire.field_list(m, "refused", max_len=MAX_BATCH):
        if not (isinstance(r, list) and len(r) == 3 and all(isinstance(x, str) for x in r)):
            raise MalformedMessage("field 'refused' must hold [id, code, message] triples")
        out.append((r[0], r[1], r[2]))
    return out


# --- typed messages ---------------------------------------------------------------------------
# One dataclass per message of the task protocol and ``decode``, the one place that reads a
# message's fields: handlers dispatch on the type (``match``), never on ``m["t"]``.


class RefuseCode(enum.Enum):
    """Why an executor refused an assigned task. ``BUSY`` is a wait, not a failure."""

    BUSY = "busy"
    UNKNOWN_KIND = "unknown_kind"
    NOT_ALLOWED = "not_allowed"
    DUPLICATE = "duplicate"  # the id is another member's
    OTHER = "other"  # a code from a newer executor: a refusal all the same


@dataclass(frozen=True, slots=True)
class Refusal:
    id: str
    code: RefuseCode
    message: str


@dataclass(frozen=True, slots=True)
class Assign:
    """S → E: run these."""

    tasks: list[TaskSpec]


@dataclass(frozen=True, slots=True)
class Accepted:
    """E → S, one per assign: which ids E took and which it refused.

    ``positions`` (admission, protocol note in docs/PROTOCOL.md): for each accepted id, 0
    when it started at once (a free slot, or it ran inline) and N ≥ 1 when it waits in
    E's queue with about N - 1 tasks ahead of it. None from an executor that predates it.
    """

    ids: list[str]
    refused: list[Refusal]
    positions: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Results:
    """E → S: a sealed batch (``open_results`` checks it)."""

    sealed: bytes


@dataclass(frozen=True, slots=True)
class Progress:
    """E → S: these queued ids started running (``state`` is "running")."""

    ids: list[str]
    state: str


@dataclass(frozen=True, slots=True)
class Ack:
    ids: list[str]


@dataclass(frozen=True, slots=True)
class Cancel:
    ids: list[str]


@dataclass(frozen=True, slots=True)
class Offer:
    """E → S on the offer protocol: ``free`` slots for ``kind`` (clamped to 0..1024)."""

    call_id: str
    kind: str
    free: int


@dataclass(frozen=True, slots=True)
class Call:
    """Gossip: who can run ``kind`` at ``version``?"""

    call_id: str
    kind: str
    version: str
    count: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message type this version does not know (a newer peer's): ignored on the tasks
    stream, so a version that adds a message does not reset older peers' streams."""

    t: str


TaskMessage = Assign | Accepted | Results | Progress | Ack | Cancel | Offer | Call | Unknown
MAX_OFFER_FREE = 1024


def decode(m: wire.Message) -> TaskMessage:
    """Validate an unpacked task-protocol message and return it typed.

    Raises MalformedMessage (a RemoteProtocolError) for a known type with bad fields."""
    t = m.get("t")
    if not isinstance(t, str):
        raise MalformedMessage("a task message needs a type 't'")
    if t == "assign":
        raw = wire.field_list(m, "tasks", max_len=MAX_BATCH)
        return Assign([TaskSpec.from_wire(x) for x in raw])
    if t == "accepted":
        return Accepted(id_list(m), [Refusal(i, _refuse_code(c), msg)
                                     for i, c, msg in refused_list(m)], _positions(m))
    if t == "results":
        return Results(wire.field_bytes(m, "sealed"))
    if t == "progress":
        return Progress(id_list(m), wire.field_str(m, "state", max_len=32))
    if t == "ack":
        return Ack(id_list(m))
    if t == "cancel":
        return Cancel(id_list(m))
    if t == "offer":
        return Offer(wire.field_str(m, "call", max_len=64), wire.field_str(m, "kind", max_len=128),
                     max(0, min(wire.field_int(m, "free"), MAX_OFFER_FREE)))
    if t == "call":
        return Call(wire.field_str(m, "call", max_len=64), wire.field_str(m, "kind", max_len=128),
                    wire.field_str(m, "ver", max_len=32), wire.field_int(m, "n"))
    return Unknown(t[:32])


def decode_frame(frame: bytes, *, max_bytes: int = wire.MAX_FRAME_BYTES) -> TaskMessage:
    return decode(wire.unpack(frame, max_bytes=max_bytes))


def _refuse_code(code: str) -> RefuseCode:
    try:
        return RefuseCode(code)
    except ValueError:
        return RefuseCode.OTHER


def _positions(m: wire.Message) -> dict[str, int] | None:
    if "adm" not in m:
        return None
    out: dict[str, int] = {}
    for item in wire.field_list(m, "adm", max_len=MAX_BATCH):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and len(item[0]) <= 64 and isinstance(item[1], int)
                and not isinstance(item[1], bool) and 0 <= item[1] <= 1 << 31):
            raise MalformedMessage("field 'adm' must hold [id, position] pairs")
        out[item[0]] = item[1]
    return out
