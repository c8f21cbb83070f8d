"""Executor: runs tasks in warm worker processes, one per slot, with limits.

Each slot owns one ``teammesh.node.tasks.worker`` process and feeds it batches from a shared
priority queue (big batches when the queue is long, so tiny tasks cost one pipe write per
batch, not per task). Per task: a wall-clock timeout (the parent kills the worker), a
CPU-time limit (RLIMIT_CPU in the worker: SIGXCPU), and the slot's memory limit
(RLIMIT_AS). A task that crashes, hangs or exceeds a limit is reported failed with the
reason, the worker is replaced, and the rest of its batch goes back to the queue.

Kinds that declare ``inline_max_bytes`` (hashing) run small inputs on the daemon itself,
at submission: the task costs microseconds and the worker round trip half a millisecond.

Data of any size: a pipe frame never carries more than about ``BATCH_BYTES`` of inputs or
``SPILL_BYTES`` of output. A bigger input reaches the worker as a file in the node's spool
directory (``Job.input_path``); a bigger output comes back the same way and the daemon
adds it to the block store (``store``), so the result carries a CID. Each kind's input and
output are bounded (``Limits``); going over fails the task with the limit named.

Fair share: queued jobs wait in one queue per submitter, and slots take from the
submitters in turn (priority orders each submitter's own jobs), so one member's flood
delays that member's work, not everyone's.
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
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from teammesh.node.kinds import Kind, run_guarded
from teammesh.node.p2p.mesh import Capacity
from teammesh.protocols import wire
from teammesh.protocols.errors import RemoteProtocolError, TeammeshError
from teammesh.protocols.tasks import TaskResult, TaskSpec, make_result, params_size

logger = logging.getLogger("teammesh.executor")

MAX_WORKER_BATCH = 64
QUEUE_PER_SLOT = 64  # how many tasks we accept beyond the running ones, per slot
BATCH_MS = 20.0  # a batch holds about this much work: a longer one makes others wait
BATCH_BYTES = 2 * 1024 * 1024  # inputs per pipe frame (one bigger task still goes alone)
SPILL_BYTES = 1024 * 1024  # outputs above this come back as a file, not in a frame
MAX_ERROR_CHARS = 4000
# Environment a worker must not see: a task is code we run on a member's data, and it has
# no business with the node's mirror credentials or bridge key.
SECRET_ENV_PREFIXES = ("TEAMMESH_BRIDGE", "TEAMMESH_R2", "TEAMMESH_S3", "TEAMMESH_MIRROR",
                       "AWS_", "R2_", "CLOUDFLARE_", "CF_")
SECRET_ENV_WORDS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "_KEY")
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """How big a task's input and output may be on this node, per kind (config
    ``executor.max_input_mb``/``max_output_mb`` and their ``kind_*`` tables)."""

    max_input_mb: int = 1024
    max_output_mb: int = 1024
    kind_input_mb: Mapping[str, int] = field(default_factory=dict)
    kind_output_mb: Mapping[str, int] = field(default_factory=dict)

    def input_bytes(self, kind: str) -> int:
        return self.kind_input_mb.get(kind, self.max_input_mb) * MiB

    def output_bytes(self, kind: str) -> int:
        return self.kind_output_mb.get(kind, self.max_output_mb) * MiB

    def input_error(self, kind: str, size: int) -> str:
        return self._error("input", kind, size, self.kind_input_mb, self.max_input_mb)

    def output_error(self, kind: str, size: int) -> str:
        return self._error("output", kind, size, self.kind_output_mb, self.max_output_mb)

    @staticmethod
    def _error(what: str, kind: str, size: int, per_kind: Mapping[str, int],
               default_mb: int) -> str:
        key = f"executor.kind_max_{what}_mb" if kind in per_kind else f"executor.max_{what}_mb"
        return (f"{what} of {size} bytes exceeds this node's limit of"
                f" {per_kind.get(kind, default_mb)} MiB for {kind} ({key})")


def worker_env(base: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment minus anything that looks like a secret."""
    out = {}
    for k, v in base.items():
        up = k.upper()
        if up.startswith(SECRET_ENV_PREFIXES) or any(w in up for w in SECRET_ENV_WORDS):
            continue
        out[k] = v
    return out


@dataclass(slots=True)
class Job:
    spec: TaskSpec
    submitter: str
    deliver: Callable[[Job, TaskResult], None]
    on_start: Callable[[Job], None] | None = None
    cancelled: bool = False
    started: float | None = None
    order: int = 0
    # files in the spool that stand for the input / params (big data): the worker reads
    # them, and the executor deletes them when the job ends
    input_path: Path | None = None
    param_paths: dict[str, Path] = field(default_factory=dict)
    input_size: int = -1  # bytes, the files included (-1: not measured yet)

    def __lt__(self, other: Job) -> bool:
        return (-self.spec.priority, self.order) < (-other.spec.priority, other.order)

    @property
    def size(self) -> int:
        if self.input_size < 0:
            n = len(self.spec.input)
            try:
                n += params_size(self.spec.params)  # what assign batches count too
            except TeammeshError:
                pass
            self.input_size = n
        return self.input_size

    def to_worker(self, max_output: int) -> dict[str, Any]:
        m: dict[str, Any] = {"id": self.spec.id, "kind": self.spec.kind,
                             "input": self.spec.input, "params": self.spec.params,
                             "max_output": max_output}
        if self.input_path is not None:
            m["input_path"] = str(self.input_path)
        if self.param_paths:
            m["param_paths"] = {k: str(p) for k, p in self.param_paths.items()}
        return m

    def remove_files(self) -> None:
        for p in (self.input_path, *self.param_paths.values()):
            if p is not None:
                p.unlink(missing_ok=True)


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


class _FairQueue:
    """Queued jobs, one priority heap per submitter, served in turn."""

    def __init__(self) -> None:
        self.heaps: dict[str, list[Job]] = {}
        self.turn: deque[str] = deque()  # submitters with queued jobs, next first
        self.count = 0
        self.bytes_by: dict[str, int] = {}
        self.count_by: dict[str, int] = {}

    def __len__(self) -> int:
        return self.count

    def push(self, job: Job) -> None:
        heap = self.heaps.get(job.submitter)
        if heap is None:
            heap = self.heaps[job.submitter] = []
            self.turn.append(job.submitter)
        heapq.heappush(heap, job)
        self.count += 1
        self.count_by[job.submitter] = self.count_by.get(job.submitter, 0) + 1
        self.bytes_by[job.submitter] = self.bytes_by.get(job.submitter, 0) + job.size

    def pop(self) -> Job:
        """The best job of the submitter whose turn it is. Priority orders a submitter's
        own jobs; across members it does not count, or one member's priority 1000 would
        starve everyone else (docs/SECURITY.md)."""
        sub = self.turn[0]
        heap = self.heaps[sub]
        job = heapq.heappop(heap)
        self.turn.popleft()
        if heap:
            self.turn.append(sub)  # back of the line
        else:
            del self.heaps[sub]
        self.count -= 1
        self.count_by[sub] -= 1
        self.bytes_by[sub] -= job.size
        if not self.count_by[sub]:
            del self.count_by[sub], self.bytes_by[sub]
        return job

    def peek_cancelled(self) -> Job | None:
        for heap in self.heaps.values():
            if heap[0].cancelled:
                return heap[0]
        return None

    def remove_head(self, job: Job) -> None:
        heap = self.heaps[job.submitter]
        assert heap[0] is job
        heapq.heappop(heap)
        if not heap:
            del self.heaps[job.submitter]
            self.turn.remove(job.submitter)
        self.count -= 1
        self.count_by[job.submitter] -= 1
        self.bytes_by[job.submitter] -= job.size
        if not self.count_by[job.submitter]:
            del self.count_by[job.submitter], self.bytes_by[job.submitter]


class Executor:
    def __init__(self, capacity: Capacity, *, allow: list[str], memory_mb: int, cpu_s: int,
                 timeout_s: float, kinds: Mapping[str, Kind] | None = None,
                 limits: Limits | None = None, spool: Path | None = None,
                 store: Callable[[Path], Awaitable[dict[str, Any]]] | None = None) -> None:
        self.capacity = capacity
        self.kinds: Mapping[str, Kind] = kinds or {}
        self.allow = allow
        self.memory_mb = memory_mb
        self.cpu_s = cpu_s
        self.default_timeout_s = timeout_s
        self.limits = limits or Limits()
        self.spool = spool
        self.store = store  # adds a spilled output file to the block store -> {"$cid", ...}
        self._queue = _FairQueue()
        self._order = itertools.count()
        self._wake = trio.Event()
        self._slots: list[_Slot] = []
        self._resize = trio.Event()
        self.by_id: dict[str, Job] = {}
        self.kind_ms: dict[str, float] = {}  # recent run time per kind, from the workers
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

    def queued_by(self, submitter: str) -> tuple[int, int]:
        """(tasks, input bytes) ``submitter`` has waiting here."""
        q = self._queue
        return q.count_by.get(submitter, 0), q.bytes_by.get(submitter, 0)

    @property
    def queued_submitters(self) -> int:
        return len(self._queue.heaps)

    def submit_nowait(self, job: Job) -> None:
        """Queue ``job``, or run it now if its kind runs small inputs inline."""
        if job.input_path is None and not job.param_paths and self._run_inline(job):
            return
        if job.size > self.limits.input_bytes(job.spec.kind):
            job.remove_files()
            self._finish(job, make_result(job.spec.id, False, None,
                                          self.limits.input_error(job.spec.kind, job.size),
                                          0.0, 0.0))
            return
        job.order = next(self._order)
        self.by_id[job.spec.id] = job
        self._queue.push(job)
        self._update_capacity()
        self._wake.set()

    def admission_position(self, job: Job, pending: int = 0) -> int:
        """Where ``job`` would wait if queued now (before ``submit_nowait``), for the
        admission reply: 0 when it starts at once (a free slot, or it runs inline), N >= 1
        when about N - 1 tasks are ahead of it. ``pending``: jobs accepted but still
        fetching their files, which will queue first. An estimate: the queue is served
        round-robin across submitters, so a submitter's own tasks may go sooner."""
        spec = job.spec
        if not spec.needs_files and self.runs_inline(spec.kind, len(spec.input)):
            return 0
        ahead = len(self.by_id) + pending - self.slots
        return 0 if ahead < 0 else ahead + 1

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
        self._wake.set()
        return True

    def _update_capacity(self) -> None:
        busy = sum(1 for s in self._slots if s.current is not None)
        queued = len(self._queue)
        if (busy, queued) != (self.capacity.busy, self.capacity.queue):
            self.capacity.busy, self.capacity.queue = busy, queued
            self.capacity.notify_load()

    def _finish(self, job: Job, result: TaskResult) -> None:
        self.by_id.pop(job.spec.id, None)
        job.remove_files()
        if result.ok:
            self.completed += 1
        else:
            self.failed += 1
        job.deliver(job, result)

    def _fail(self, job: Job, error: str, wall_ms: float = 0.0) -> None:
        self._finish(job, make_result(job.spec.id, False, None, error, wall_ms, 0.0))

    async def _take_batch(self, slot: _Slot) -> list[Job]:
        q = self._queue
        while not slot.retired:
            while (c := q.peek_cancelled()) is not None:
                q.remove_head(c)
                self._fail(c, "cancelled")
            if q:
                n = max(1, min(MAX_WORKER_BATCH, math.ceil(len(q) / max(1, self.slots))))
                batch: list[Job] = []
                size = 0
                work_ms = 0.0
                while q and len(batch) < n:
                    job = q.pop()
                    if job.cancelled:
                        self._fail(job, "cancelled")
                        continue
                    batch.append(job)
                    size += job.size
                    # a kind we have not timed yet counts as long: one job per batch
                    work_ms += self.kind_ms.get(job.spec.kind, BATCH_MS)
                    if size >= BATCH_BYTES or work_ms >= BATCH_MS:
                        break
                if batch:
                    return batch
                continue
            wake = self._wake
            await wake.wait()
            # Only the first slot up replaces the event: a later one replacing it again
            # would drop a wake-up set in between (a queued job with idle slots)
            if self._wake is wake:
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
        env = worker_env(os.environ)
        env.update(TEAMMESH_WORKER_MEMORY_MB=str(self.memory_mb),
                   TEAMMESH_WORKER_CPU_S=str(self.cpu_s),
                   TEAMMESH_WORKER_ALLOW=",".join(self.allow))
        if self.spool is not None:
            env["TEAMMESH_WORKER_SPOOL"] = str(self.spool)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "teammesh.node.tasks.worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env)
        return proc

    async def _next_message(self, slot: _Slot) -> wire.Message:
        while not slot.pending:
            data = await slot.proc.stdout.receive_some(1 << 20)
            if not data:
                raise WorkerDied
            try:
                slot.pending.extend(wire.unpack(f) for f in slot.decoder.feed(data))
            except RemoteProtocolError as exc:
                # our own worker, but it runs task code: a frame it should never send
                # costs the task and the process, never the daemon
                raise WorkerBroken(f"the worker sent a malformed result ({exc})") from exc
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
                try:
                    if slot.proc is None:
                        slot.proc = await self._spawn()
                        ready = await self._next_message(slot)
                        if ready.get("t") != "ready":
                            raise WorkerDied
                    frame = wire.frame_message({"t": "run", "v": 1, "tasks": [
                        j.to_worker(self.limits.output_bytes(j.spec.kind)) for j in batch]})
                    await slot.proc.stdin.send_all(frame)
                except (WorkerDied, WorkerBroken, OSError, trio.BrokenResourceError,
                        TeammeshError) as exc:
                    # the worker could not start or take the batch: the tasks are not to
                    # blame; put them back and try with a fresh process (bounded by the
                    # jobs' own failure below if it keeps happening)
                    code = await self._kill(slot)
                    logger.warning("worker for slot %d failed to take a batch: %s (%s)",
                                   slot.index, exc, self._death_reason(code))
                    self._fail(batch[0], f"could not hand the task to a worker: "
                               f"{self._death_reason(code)}")
                    for rest in batch[1:]:
                        self._queue.push(rest)
                    await trio.sleep(0.1)
                    continue
                await self._collect(slot, batch)
        finally:
            await self._kill(slot)

    async def _result(self, job: Job, msg: wire.Message) -> TaskResult:
        """A worker's ``done`` message as a result; a spilled output goes to the store."""
        try:
            ok = bool(msg["ok"])
            wall, cpu = float(msg["wall"]), float(msg["cpu"])
            error = msg.get("error")
            if error is not None:
                error = str(error)[:MAX_ERROR_CHARS]
            output = msg.get("output")
            spill = msg.get("spill")
        except (KeyError, TypeError, ValueError) as exc:
            return make_result(job.spec.id, False, None,
                               f"the worker sent a malformed result ({exc!r})", 0.0, 0.0)
        old = self.kind_ms.get(job.spec.kind, wall)
        self.kind_ms[job.spec.kind] = 0.8 * old + 0.2 * wall
        if ok and isinstance(spill, dict):
            output, error = await self._store_spill(job, spill)
            ok = error is None
        return make_result(job.spec.id, ok, output if ok else None, error, wall, cpu)

    async def _store_spill(self, job: Job, spill: dict[str, Any]) -> tuple[Any, str | None]:
        path = Path(str(spill.get("path", "")))
        try:
            if self.spool is None or path.parent != self.spool:
                return None, "the worker spilled its output outside the spool directory"
            size = path.stat().st_size
            if size > self.limits.output_bytes(job.spec.kind):
                return None, self.limits.output_error(job.spec.kind, size)
            if self.store is None:
                return None, (f"output of {size} bytes is too large to return inline and"
                              " this node has no file store")
            ref = dict(await self.store(path))
            if spill.get("format") == "json":  # raw bytes need no note: they are the file
                ref["format"] = "json"
            return ref, None
        except (OSError, TeammeshError) as exc:
            return None, f"cannot keep the output of {job.spec.kind}: {exc}"
        finally:
            path.unlink(missing_ok=True)

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
            broken: str | None = None
            with trio.CancelScope() as scope:
                slot.scope = scope
                if job.cancelled:  # cancelled after it was taken, before its scope opened
                    scope.cancel()
                scope.deadline = trio.current_time() + timeout
                try:
                    msg = await self._next_message(slot)
                except WorkerDied:
                    died = await self._kill(slot)
                except WorkerBroken as exc:
                    broken = str(exc)
                    await self._kill(slot)
            slot.scope = None
            if msg is not None and msg.get("id") == job.spec.id:
                result = await self._result(job, msg)
                slot.current = None
                self._finish(job, result)
                continue
            slot.current = None
            wall = (trio.current_time() - job.started) * 1000
            if broken is not None:
                self._fail(job, broken, wall)
            elif died is not None:
                self._fail(job, self._death_reason(died), wall)
            else:
                await self._kill(slot)
                if job.cancelled:
                    self._fail(job, "cancelled", wall)
                elif msg is not None:
                    self._fail(job, "the worker answered for another task", wall)
                else:
                    self._fail(job, f"timed out after {timeout:g} s", wall)
            for rest in batch[i + 1:]:  # unaffected tasks go back to the queue
                self._queue.push(rest)
            self._wake.set()
            break
        self._update_capacity()


class WorkerBroken(Exception):
    """The worker process sent something that is not a result frame."""
