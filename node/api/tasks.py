"""Control API routes for tasks: submit, batch (optionally streamed), show, wait, cancel,
list, server-sent progress events, and kinds."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import trio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from teammesh.node.api.body import json_body, parse_json
from teammesh.node.api.http import Request as HttpRequest
from teammesh.protocols.errors import TaskError, TeammeshError

if TYPE_CHECKING:
    from teammesh.node.tasks.records import TaskRecord
    from teammesh.node.tasks.service import TaskService

MAX_WAIT_S = 3600.0
MAX_BATCH_TASKS = 100_000


def _as_json(r: TaskRecord | dict[str, Any]) -> dict[str, Any]:
    return r if isinstance(r, dict) else r.to_json()


def _wait_arg(request: Request, default: float | None = None) -> float | None:
    return _wait_value(request.query_params.get("wait"), default)


def _wait_value(raw: str | None, default: float | None = None) -> float | None:
    if raw is None:
        return default
    try:
        return min(MAX_WAIT_S, max(0.0, float(raw)))
    except ValueError as exc:
        raise TaskError("wait must be a number of seconds") from exc


class SubmitGroup:
    """Single-task submissions that arrive together go into the journal together.

    Each ``submit_many`` is one journal transaction; with many clients each sending one
    task per request (curl, other languages) that transaction was most of the submit cost.
    The first caller waits one scheduling round (shielded, so it submits for the others
    even if its own request goes away), then submits every body that joined meanwhile in
    one call. A body the node refuses fails alone: on a refused group, each body is
    submitted on its own (a refused batch wrote nothing, so none is submitted twice)."""

    def __init__(self, svc: TaskService) -> None:
        self.svc = svc
        self.pending: list[_Joined] = []

    async def submit(self, body: dict[str, Any]) -> TaskRecord:
        me = _Joined(body)
        self.pending.append(me)
        if len(self.pending) == 1:
            with trio.CancelScope(shield=True):
                await trio.lowlevel.checkpoint()  # let requests that arrived join
            group, self.pending = self.pending, []
            self._submit(group)
        else:
            await me.done.wait()
        if me.error is not None:
            raise me.error
        assert me.record is not None
        return me.record

    def _submit(self, group: list[_Joined]) -> None:
        try:
            records = self.svc.submit_many([j.body for j in group])
        except TeammeshError as exc:
            if len(group) == 1:
                group[0].error = exc
            else:
                for j in group:
                    try:
                        (j.record,) = self.svc.submit_many([j.body])
                    except TeammeshError as one:
                        j.error = one
        except BaseException as exc:  # a bug: every waiting request answers it, not hangs
            for j in group:
                j.error = exc
            raise
        else:
            for j, r in zip(group, records, strict=True):
                j.record = r
        finally:
            for j in group:
                j.done.set()


class _Joined:
    __slots__ = ("body", "done", "error", "record")

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.done = trio.Event()
        self.record: TaskRecord | None = None
        self.error: BaseException | None = None


async def op_submit(svc: TaskService, body: dict[str, Any],
                    group: SubmitGroup | None = None) -> dict[str, Any]:
    """POST /v1/tasks, also served on the control socket."""
    if group is not None:
        record = await group.submit(body)
    else:
        (record,) = svc.submit_many([body])
    wait = body.get("wait")
    if wait:
        limit = float(wait) if not isinstance(wait, bool) else MAX_WAIT_S
        with trio.move_on_after(min(limit, MAX_WAIT_S)):
            await svc.wait(record.id)
    return record.to_json()


def batch_bodies(body: dict[str, Any]) -> list[dict[str, Any]]:
    bodies = body.get("tasks")
    if not isinstance(bodies, list) or not all(isinstance(b, dict) for b in bodies):
        raise TaskError("'tasks' must be a list of task objects")
    if len(bodies) > MAX_BATCH_TASKS:
        raise TaskError(f"at most {MAX_BATCH_TASKS} tasks per batch")
    return bodies


async def op_batch(svc: TaskService, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST /v1/tasks/batch without streaming, also served on the control socket."""
    records = svc.submit_many(batch_bodies(body))
    if body.get("wait"):
        with trio.move_on_after(MAX_WAIT_S):
            for r in records:
                await svc.wait(r.id)
        return [r.to_json() for r in records]
    return [{"id": r.id, "state": r.state, "tag": r.tag} for r in records]


async def op_show(svc: TaskService, task_id: str, wait: float | None) -> dict[str, Any]:
    r = svc.get(task_id)
    if wait:
        with trio.move_on_after(min(MAX_WAIT_S, max(0.0, wait))):
            r = await svc.wait(task_id)
    if r is None:
        raise TaskError(f"no task {task_id}")
    return _as_json(r)


# A native route's answer meaning "let the Starlette app serve this one" (a streamed batch)
PASS_ON: Any = object()
NativeCall = Callable[[], Awaitable[Any]]


def native_task_routes(svc: TaskService,
                       group: SubmitGroup) -> Callable[[HttpRequest], NativeCall | None]:
    """The hot task routes for node/api/http.py, without Starlette: the same answers as
    ``task_routes`` (which still serves them to cookie-authenticated requests)."""

    async def submit(req: HttpRequest) -> Any:
        return await op_submit(svc, parse_json(req.body), group)

    async def batch(req: HttpRequest) -> Any:
        body = parse_json(req.body)
        if body.get("stream"):
            return PASS_ON
        return await op_batch(svc, body)

    async def show(req: HttpRequest, task_id: str) -> Any:
        wait = None
        if req.query:
            wait = _wait_value(dict(parse_qsl(req.query.decode("latin-1"),
                                              keep_blank_values=True)).get("wait"))
        return await op_show(svc, task_id, wait)

    def route(req: HttpRequest) -> NativeCall | None:
        method, path = req.method, req.raw_path
        if method == "POST":
            if path == b"/v1/tasks":
                return lambda: submit(req)
            if path == b"/v1/tasks/batch":
                return lambda: batch(req)
        elif method == "GET" and path.startswith(b"/v1/tasks/"):
            task_id = path[len(b"/v1/tasks/"):]
            if task_id and b"/" not in task_id and b"%" not in task_id:
                return lambda: show(req, task_id.decode("ascii"))
        return None

    return route


def task_routes(svc: TaskService, endpoint: Any,
                group: SubmitGroup | None = None) -> list[Route]:
    group = group if group is not None else SubmitGroup(svc)

    async def submit(request: Request) -> Any:
        return await op_submit(svc, await json_body(request), group)

    async def batch(request: Request) -> Any:
        body = await json_body(request)
        if body.get("stream"):
            bodies = batch_bodies(body)
            send, receive = trio.open_memory_channel[str](max(1, len(bodies)))
            records = svc.submit_many(bodies)
            for r in records:
                svc.watch(r, send)
            return StreamingResponse(_stream(records, receive, svc),
                                     media_type="application/x-ndjson")
        return await op_batch(svc, body)

    async def show(request: Request) -> Any:
        return await op_show(svc, request.path_params["id"], _wait_arg(request))

    async def cancel(request: Request) -> Any:
        return svc.cancel(request.path_params["id"]).to_json()

    async def listing(request: Request) -> Any:
        state = request.query_params.get("state")
        try:
            limit = int(request.query_params.get("limit", "1000"))
        except ValueError as exc:
            raise TaskError("limit must be an integer") from exc
        return svc.list_tasks(state, max(1, min(limit, 100_000)))

    async def events(request: Request) -> Any:
        task_id = request.path_params["id"]
        r = svc.records.get(task_id)
        if r is None:
            raise TaskError(f"no active task {task_id}")

        async def gen() -> AsyncIterator[str]:
            last = None
            while True:
                snapshot = r.to_json()
                key = (snapshot["state"], snapshot["waiting_reason"], len(snapshot["attempts"]))
                if key != last:
                    last = key
                    yield f"event: task\ndata: {json.dumps(snapshot)}\n\n"
                    # sending awaited: the task may have changed (even ended) meanwhile,
                    # and its change event is spent; look again before waiting
                    continue
                if snapshot["state"] in ("done", "failed", "cancelled"):
                    return  # the last event sent is the terminal one
                with trio.move_on_after(15):
                    await r.changed.wait()

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def kinds(request: Request) -> Any:
        return svc.kinds_json()

    return [
        Route("/v1/tasks", endpoint(submit), methods=["POST"]),
        Route("/v1/tasks", endpoint(listing), methods=["GET"]),
        Route("/v1/tasks/batch", endpoint(batch), methods=["POST"]),
        Route("/v1/tasks/{id}", endpoint(show), methods=["GET"]),
        Route("/v1/tasks/{id}/cancel", endpoint(cancel), methods=["POST"]),
        Route("/v1/tasks/{id}/events", endpoint(events), methods=["GET"]),
        Route("/v1/kinds", endpoint(kinds), methods=["GET"]),
    ]


async def _stream(records: list[TaskRecord], receive: trio.MemoryReceiveChannel[str],
                  svc: TaskService) -> AsyncIterator[str]:
    """One JSON line per task, in completion order, then the stream ends."""
    remaining = {r.id for r in records}
    for r in records:
        if r.state in ("done", "failed", "cancelled"):
            remaining.discard(r.id)
            svc.unwatch(r)
            yield json.dumps(r.to_json()) + "\n"
    async with receive:
        while remaining:
            task_id = await receive.receive()
            if task_id in remaining:
                remaining.discard(task_id)
                r = svc.records[task_id]
                yield json.dumps(r.to_json()) + "\n"
