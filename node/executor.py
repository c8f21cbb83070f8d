"""Executor: runs tasks in warm worker processes, one per slot, with limits.

Each slot owns one ``teammesh.node.worker`` process and feeds it batches from a shared
priority queue (big batches when the queue is long, so tiny tasks cost one pipe write per
batch, not per task). Per task: a wall-clock timeout (the parent kills the worker), a
CPU-time limit (RLIMIT_CPU in the worker: SIGXCPU), and the slot's memory limit
(RLIMIT_AS). A task that crashes, hangs or exceeds a limit is reported failed with the
reason, the worker is replaced, and the rest of its batch goes back to the queue.

Kinds that declare ``inline_max_bytes`` (hashing) run small inputs on the daemon itself,
at submission: the task costs microseconds and the worker round trip half a millisecond.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from teammesh.protocols import wire
from teammesh.protocols.tasks import TaskResult, TaskSpec, make_result

from .kinds import Kind, run_guarded
from .mesh import Capacity

logger = logging.getLogger("teammesh.executor")

MAX_WORKER_BATCH = 64
QUEUE_PER_SLOT = 64  # how many tasks we accept beyond the running ones, per slot


@dataclass(slots=True)
class Job:
    spec: TaskSpec
    submitter: str
    deliver: Callable[[Job, TaskResult], None]
    on_start: Callable[[Job], None] | None = None
    cancelled: bool = False
    started: float | None = None
    order: int = 0

    def __lt__(self, other: Job) -> bool:
        return (-self.spec.priority, self.order) < (-other.spec.priority, other.order)


@dataclass(slots=True)
class _Slot:
    index: int
    current: Job | None = None
    scope: trio.CancelScope | None = None
    proc: Any = None
    decoder: wire.FrameDecoder = field(default_factory=wire.FrameDecoder)
    pending: list[wire.Message] = field(default_factory=list)
    retired: bool = False


class WorkerDied(Exception):
    pass


class Executor:
    def __init__(self, capacity: Capacity, *, allow: list[str], memory_mb: int, cpu_s: int,
                 timeout_s: float, kinds: Mapping[str, Kind] | None = None) -> None:
        self.capacity = capacity
        self.kinds: Mapping[str, Kind] = kinds or {}
        self.allow = allow
        self.memory_mb = memory_mb
        self.cpu_s = cpu_s
        self.default_timeout_s = timeout_s
        self._heap: list[Job] = []
        self._order = itertools.count()
        self._wake = trio.Event()
        self._slots: list[_Slot] = []
        self._resize = trio.Event()
        self.by_id: dict[str, Job] = {}
        self.completed = 0
        self.failed = 0

    @property
    def slots(self) -> int:
        return self.capacity.slots

    @property
    def room(self) -> int:
        """How many more tasks we accept now (running + queued are bounded)."""
        if self.slots == 0:
            return 0
        return self.slots * (1 + QUEUE_PER_SLOT) - len(self.by_id)

    def submit_nowait(self, job: Job) -> None:
        """Queue ``job``, or run it now if its kind runs small inputs inline."""
        if self._run_inline(job):
            return
        job.order = next(self._order)
        self.by_id[job.spec.id] = job
        heapq.heappush(self._heap, job)
        self._update_capacity()
        self._wake.set()

    def runs_inline(self, kind_name: str, input_bytes: int) -> bool:
        """Would a task of this kind and input size run at once, without a slot?"""
        kind = self.kinds.get(kind_name)
        return kind is not None and 0 < kind.inline_max_bytes and \
            input_bytes <= kind.inline_max_bytes

    def _run_inline(self, job: Job) -> bool:
        spec = job.spec
        if not self.runs_inline(spec.kind, len(spec.input)):
            return False
        t0 = time.perf_counter()
        c0 = time.thread_time()
        ok, output, error = run_guarded(self.kinds, spec.kind, spec.input, spec.params)
        if ok:
            try:
                wire.pack(output)  # what a worker checks before sending, so must we
            except Exception as exc:
                ok, output, error = False, None, \
                    f"{spec.kind} returned an unserialisable value: {exc}"
        self._finish(job, make_result(spec.id, ok, output, error,
                                      (time.perf_counter() - t0) * 1000,
                                      (time.thread_time() - c0) * 1000))
        return True

    def cancel(self, task_id: str) -> bool:
        job = self.by_id.get(task_id)
        if job is None:
            return False
        job.cancelled = True
        for slot in self._slots:
            if slot.current is job and slot.scope is not None:
                slot.scope.cancel()
        return True

    def _update_capacity(self) -> None:
        busy = sum(1 for s in self._slots if s.current is not None)
        queued = len(self._heap)
        if (busy, queued) != (self.capacity.busy, self.capacity.queue):
            self.capacity.busy, self.capacity.queue = busy, queued
            self.capacity.notify_load()

    def _finish(self, job: Job, result: TaskResult) -> None:
        self.by_id.pop(job.spec.id, None)
        if result.ok:
            self.completed += 1
        else:
            self.failed += 1
        job.deliver(job, result)

    def _fail(self, job: Job, error: str, wall_ms: float = 0.0) -> None:
        self._finish(job, make_result(job.spec.id, False, None, error, wall_ms, 0.0))

    async def _take_batch(self, slot: _Slot) -> list[Job]:
        while not slot.retired:
            while self._heap and self._heap[0].cancelled:
                self._fail(heapq.heappop(self._heap), "cancelled")
            if self._heap:
                n = max(1, min(MAX_WORKER_BATCH,
                               math.ceil(len(self._heap) / max(1, self.slots))))
                batch = [heapq.heappop(self._heap) for _ in range(min(n, len(self._heap)))]
                return [j for j in batch if not j.cancelled or self._fail(j, "cancelled")]
            await self._wake.wait()
            self._wake = trio.Event()
            if slot.retired:
                self._wake.set()  # pass the wake-up on to a live slot
        return []

    def resize(self, slots: int) -> None:
        """Grow or shrink the pool; a removed slot finishes its current batch first."""
        self.capacity.slots = slots
        self._resize.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while len(self._slots) < self.slots:
                    slot = _Slot(len(self._slots))
                    self._slots.append(slot)
                    nursery.start_soon(self._run_slot, slot)
                while len(self._slots) > self.slots:
                    slot = self._slots.pop()
                    slot.retired = True
                self._wake.set()
                await self._resize.wait()
                self._resize = trio.Event()


    async def _spawn(self) -> Any:
        env = dict(os.environ)
        env.update(TEAMMESH_WORKER_MEMORY_MB=str(self.memory_mb),
                   TEAMMESH_WORKER_CPU_S=str(self.cpu_s),
                   TEAMMESH_WORKER_ALLOW=",".join(self.allow))
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "teammesh.node.worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env)
        return proc

    async def _next_message(self, slot: _Slot) -> wire.Message:
        while not slot.pending:
            data = await slot.proc.stdout.receive_some(1 << 20)
            if not data:
                raise WorkerDied
            slot.pending.extend(wire.unpack(f) for f in slot.decoder.feed(data))
        return slot.pending.pop(0)

    async def _kill(self, slot: _Slot) -> int | None:
        proc, slot.proc = slot.proc, None
        slot.pending.clear()
        slot.decoder = wire.FrameDecoder()
        if proc is None:
            return None
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        return int(proc.returncode)

    def _death_reason(self, code: int | None) -> str:
        if code == -signal.SIGXCPU:
            return f"CPU time limit exceeded ({self.cpu_s} s, executor.cpu_s)"
        if code == -signal.SIGKILL:
            return f"worker killed (out of memory? limit {self.memory_mb} MiB)"
        if code is not None and code < 0:
            return f"worker died from signal {signal.Signals(-code).name}"
        return f"worker exited with status {code}"

    async def _run_slot(self, slot: _Slot) -> None:
        try:
            while not slot.retired:
                batch = await self._take_batch(slot)
                if not batch:
                    continue
                if slot.proc is None:
                    slot.proc = await self._spawn()
                    ready = await self._next_message(slot)
                    if ready.get("t") != "ready":
                        raise WorkerDied
                await slot.proc.stdin.send_all(wire.frame_message(
                    {"t": "run", "v": 1, "tasks": [
                        {"id": j.spec.id, "kind": j.spec.kind, "input": j.spec.input,
                         "params": j.spec.params} for j in batch]}))
                await self._collect(slot, batch)
        finally:
            await self._kill(slot)

    async def _collect(self, slot: _Slot, batch: list[Job]) -> None:
        for i, job in enumerate(batch):
            slot.current = job
            job.started = trio.current_time()
            if job.on_start is not None:
                job.on_start(job)
            self._update_capacity()
            # a submitter may ask for less time than our operator allows, never more
            timeout = self.default_timeout_s
            if job.spec.timeout_ms > 0:
                timeout = min(timeout, job.spec.timeout_ms / 1000)
            msg: wire.Message | None = None
            died: int | None = None
            with trio.CancelScope() as scope:
                slot.scope = scope
                scope.deadline = trio.current_time() + timeout
                try:
                    msg = await self._next_message(slot)
                except WorkerDied:
                    died = await self._kill(slot)
            slot.scope = None
            slot.current = None
            if msg is not None and msg.get("id") == job.spec.id:
                self._finish(job, make_result(job.spec.id, bool(msg["ok"]), msg["output"],
                                              msg["error"], float(msg["wall"]),
                                              float(msg["cpu"])))
                continue
            wall = (trio.current_time() - job.started) * 1000
            if died is not None:
                self._fail(job, self._death_reason(died), wall)
            else:
                await self._kill(slot)
                if job.cancelled:
                    self._fail(job, "cancelled", wall)
                else:
                    self._fail(job, f"timed out after {timeout:g} s", wall)
            for rest in batch[i + 1:]:  # unaffected tasks go back to the queue
                heapq.heappush(self._heap, rest)
            self._wake.set()
            break
        self._update_capacity()
