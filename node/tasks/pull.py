"""Pull mode: a node nobody can dial takes work from the team's bridge.

`teammesh up --pull` leases queued tasks of the kinds this node runs (up to its free
slots), runs them in its own executor, and posts the results. A lease that is not
completed in time returns to the bridge's queue, so a pull node that dies loses nothing.
Long-polling is approximated by a short back-off when the queue is empty.

The bridge binds each lease to this node's authenticated peer id: only this node can post
the result of a task it leased, and the bridge records it as the executor. A task named by
``input_cid`` is fetched through the files service (peers, then the R2 mirror) like any
file input. Leased tasks come back validated (``BridgeClient.lease``); a malformed lease
answer is treated like an unreachable bridge (back off and retry).
"""

from __future__ import annotations

import base64
import functools
import logging
from typing import TYPE_CHECKING, Any

import trio
from teammesh.node.bridge.client import (
    BridgeError,
    BridgeRateLimited,
    BridgeRejected,
    BridgeUnavailable,
)
from teammesh.node.tasks.executor import Job
from teammesh.protocols.errors import TeammeshError
from teammesh.protocols.tasks import TaskResult, TaskSpec, json_safe

if TYPE_CHECKING:
    from collections.abc import Mapping

    from teammesh.node.bridge.client import BridgeClient
    from teammesh.node.files.service import FilesService
    from teammesh.node.kinds.base import Kind
    from teammesh.node.p2p.mesh import Capacity
    from teammesh.node.tasks.service import TaskService

logger = logging.getLogger("teammesh.pull")

LEASE_S = 120.0
IDLE_BACKOFF_MAX_S = 2.0


class PullWorker:
    def __init__(self, kinds: Mapping[str, Kind], capacity: Capacity, tasks: TaskService,
                 files: FilesService, bridge: BridgeClient) -> None:
        self.kinds = kinds
        self.capacity = capacity
        self.tasks = tasks
        self.files = files
        self.bridge = bridge
        self.completed = 0
        self.failed_posts = 0
        self._results: trio.MemorySendChannel[tuple[str, TaskResult]]
        self._results_in: trio.MemoryReceiveChannel[tuple[str, TaskResult]]
        self._results, self._results_in = trio.open_memory_channel(1024)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poster)
            task_status.started()
            await self._lease_loop()

    async def _lease_loop(self) -> None:
        executor = self.tasks.executor
        kinds = {k.name: k.version for k in self.kinds.values()}
        idle = 0.05
        unreachable = False
        while True:
            cap = self.capacity
            free = cap.slots - cap.busy - cap.queue
            if free <= 0 or not kinds:
                await trio.sleep(0.05)
                continue
            try:
                leased = await self.bridge.lease(kinds, max=free, lease_s=LEASE_S)
                if unreachable:
                    logger.warning("bridge reachable again; pulling work")
                unreachable = False
            except BridgeRateLimited as exc:
                await trio.sleep(max(exc.retry_after, 0.1))
                continue
            except BridgeError as exc:
                if not unreachable:
                    logger.warning("cannot pull from the bridge (%s); retrying", exc)
                unreachable = True
                await trio.sleep(min(10.0, idle * 4))
                idle = min(IDLE_BACKOFF_MAX_S, idle * 2)
                continue
            if not leased:
                await trio.sleep(idle)
                idle = min(IDLE_BACKOFF_MAX_S, idle * 1.5)
                continue
            idle = 0.05
            for t in leased:
                spec = TaskSpec(
                    id=t["id"], kind=t["kind"], version=t.get("version", "1"),
                    input=base64.b64decode(t.get("input_b64") or ""),
                    params=dict(t.get("params") or {}), timeout_ms=int(LEASE_S * 900),
                    priority=t.get("priority", 0), input_cid=t.get("input_cid"))
                job = Job(spec, "bridge", self._done)
                if spec.needs_files:
                    # the submitter has the file; other connected members are asked too
                    sub = t.get("submitter")
                    self._start_with_files(job, [sub] if isinstance(sub, str) and sub else [])
                else:
                    executor.submit_nowait(job)

    def _start_with_files(self, job: Job, peers: list[str]) -> None:
        """The input is a file (input_cid or {"$cid"} params): fetch it first through the
        files service (peers, then the R2 mirror), or fail the task if there is none."""
        try:
            self.files.start_job(functools.partial(self._resolve_and_run, job, peers))
        except TeammeshError as exc:
            # too many transfers now: not the task's fault; its lease expires and the
            # bridge queues it again (posting a failure would fail it for good)
            logger.warning("not running %s now: %s", job.spec.id, exc)

    async def _resolve_and_run(self, job: Job, peers: list[str]) -> None:
        # the input file goes to the spool and the worker reads it there: a big file never
        # sits whole in the daemon (failures reach self._done as the task's result)
        await self.tasks.run_with_files(Job(job.spec, "bridge", self._done), peers)

    def _done(self, job: Job, result: TaskResult) -> None:
        try:
            self._results.send_nowait((job.spec.id, result))
        except trio.WouldBlock:
            # the poster is far behind; the lease will expire and the task be re-queued
            logger.warning("dropping result of %s: too many results waiting", job.spec.id)

    async def _poster(self) -> None:
        async for task_id, result in self._results_in:
            # The bridge takes the executor from the request's authenticated peer id.
            body = {"ok": result.ok, "output": json_safe(result.output), "error": result.error}
            for attempt in range(5):
                try:
                    await self.bridge.complete(task_id, body)
                    self.completed += 1
                    break
                except BridgeRejected as exc:
                    if exc.code == "unencodable" and body.get("ok"):
                        # the output is not JSON (an odd type): the task fails, says why
                        body = {"ok": False, "output": None,
                                "error": f"the output cannot be sent to the bridge as JSON:"
                                         f" {exc.detail}"}
                        continue
                    logger.warning("bridge refused the result of %s: %s", task_id, exc)
                    self.failed_posts += 1
                    break
                except BridgeUnavailable:
                    await trio.sleep(0.2 * 2 ** attempt)
            else:
                self.failed_posts += 1
