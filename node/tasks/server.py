"""Task service, executor side: the handler for submitters' ``/teammesh/tasks`` streams.

Every accepted assignment is journaled (table ``exec``) before it is acknowledged, and
every result is journaled before it is sent, in one transaction per batch. An id we have
already run is answered from the journal, never run again; results stay until the
submitter acks them, so a submitter that restarts and re-assigns gets the same answer.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import trio
from teammesh.node.p2p.host import Stream
from teammesh.node.tasks.executor import QUEUE_PER_SLOT, Job
from teammesh.protocols import tasks as tp
from teammesh.protocols import wire
from teammesh.protocols.errors import TeammeshError
from teammesh.protocols.tasks import TaskResult, TaskSpec

if TYPE_CHECKING:
    from teammesh.node.core.audit import AuditLog
    from teammesh.node.files.service import FilesService
    from teammesh.node.kinds.base import Kind
    from teammesh.node.tasks.executor import Executor
    from teammesh.node.tasks.store import TaskStore
    from teammesh.protocols.identity import Identity

logger = logging.getLogger("teammesh.taskserver")

COALESCE_S = 0.002
SPOOL_INPUT_BYTES = 256 * 1024  # queued inputs above this wait in the spool, on disk
MiB = 1024 * 1024


class _Session:
    """One submitter's stream: results waiting to be sealed and sent."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.results: list[TaskResult] = []
        self.started: list[str] = []
        self.frames: list[bytes] = []
        self.wake = trio.Event()
        self.alive = True

    def push_result(self, result: TaskResult) -> None:
        self.results.append(result)
        self.wake.set()

    def push_started(self, task_id: str) -> None:
        self.started.append(task_id)
        self.wake.set()

    def push_frame(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.wake.set()


class TaskServer:
    def __init__(self, *, store: TaskStore, executor: Executor, kinds: Mapping[str, Kind],
                 files: FilesService, identity: Identity, audit: AuditLog,
                 run_with_files: Callable[[Job, list[str]], Awaitable[None]],
                 member_queue: int, member_queue_mb: int) -> None:
        self.store = store
        self.executor = executor
        self.kinds = kinds
        self.files = files
        self.identity = identity
        self.audit = audit
        self.run_with_files = run_with_files  # fetches a job's input files, then queues it
        self.sessions: dict[str, _Session] = {}  # submitter -> its latest stream
        self.member_queue = member_queue
        self.member_queue_bytes = member_queue_mb * MiB
        self.refused_quota = 0

    def _quota_refusal(self, submitter: str, size: int, room: int) -> str | None:
        """Why ``submitter`` may not queue one more task of ``size`` bytes here, or None.

        Fair share: alone, a member may fill the queue; with others waiting, each may hold
        its share of it even if the queue is full, so a flood from one member never
        shuts the others out (and never grows the queue past twice its size)."""
        ex = self.executor
        count, nbytes = ex.queued_by(submitter)
        if nbytes + size > self.member_queue_bytes and count > 0:
            return (f"this member already has {nbytes} bytes of input queued here"
                    f" (executor.member_queue_mb)")
        active = ex.queued_submitters + (0 if count else 1)
        total = max(1, ex.slots) * (1 + QUEUE_PER_SLOT)
        share = self.member_queue or (total if active <= 1 else max(1, total // active))
        if count >= share:
            return f"this member already has {count} tasks queued here (its fair share)"
        if room <= 0 and active <= 1:
            return "all slots and queue places taken"
        return None

    async def handle_stream(self, stream: Stream) -> None:
        session = _Session(stream)
        submitter = stream.peer_id
        old = self.sessions.get(submitter)
        self.sessions[submitter] = session
        if old is not None:
            # A submitter keeps one task stream per executor: a new one means it gave up on
            # the old (a cut link it timed out; ours may not have noticed). Results still
            # waiting there go out here, or the re-assign it sends next ("already running
            # here: its result will come") would wait for them forever.
            self._hand_over(old, session)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, session)
                await self._reader(session, submitter)
                nursery.cancel_scope.cancel()
        finally:
            session.alive = False
            if self.sessions.get(submitter) is session:
                del self.sessions[submitter]
            if session.results:
                # finished but never sent: kept for the submitter's re-assign, and sent on
                # its newer stream if it has one (it may have re-assigned them already)
                self.store.autocommit.exec_done(session.results)
                latest = self.sessions.get(submitter)
                if latest is not None and latest.alive:
                    self._hand_over(session, latest)
            await stream.close()

    @staticmethod
    def _hand_over(old: _Session, new: _Session) -> None:
        """Results not known to have reached the submitter on ``old`` go out on ``new``
        (a duplicate of one that did arrive is ignored by the submitter)."""
        results, old.results = old.results, []
        for res in results:
            new.push_result(res)

    async def _reader(self, session: _Session, submitter: str) -> None:
        decoder = wire.FrameDecoder()
        while True:
            data = await session.stream.read()
            if not data:
                return
            for frame in decoder.feed(data):
                match tp.decode_frame(frame):
                    case tp.Assign(tasks=specs):
                        self._on_assign(session, submitter, specs)
                    case tp.Cancel(ids=ids):
                        for tid in ids:
                            job = self.executor.by_id.get(tid)
                            if job is not None and job.submitter == submitter:  # only its own
                                self.executor.cancel(tid)
                    case tp.Ack(ids=ids):
                        with self.store.transaction() as txn:
                            txn.exec_forget(submitter, ids)
                    case _:
                        pass  # E → S messages, or a newer peer's: ignored on this stream

    def _on_assign(self, session: _Session, submitter: str, specs: list[TaskSpec]) -> None:
        executor = self.executor
        kinds = self.kinds
        accepted: list[str] = []
        refused: list[tuple[str, str, str]] = []
        replay: list[TaskResult] = []
        positions: dict[str, int] = {}  # admission: 0 started, N queued at about N
        fetching = 0  # this batch's jobs that wait for their files (not in the executor yet)
        room = executor.room
        with self.store.transaction() as txn:
            for spec in specs:
                row = txn.exec_get(spec.id)
                if row is not None:
                    if row.submitter != submitter:
                        refused.append((spec.id, "duplicate", "task id used by another member"))
                    elif row.state == "done" and row.result is not None:
                        accepted.append(spec.id)
                        positions[spec.id] = 0  # its result follows at once
                        replay.append(row.result)
                    else:
                        accepted.append(spec.id)  # already running here: its result will come
                    continue
                kind = kinds.get(spec.kind)
                if kind is None:
                    refused.append((spec.id, "unknown_kind",
                                    f"this member does not run {spec.kind}"))
                    continue
                if kind.version != spec.version:
                    refused.append((spec.id, "unknown_kind",
                                    f"this member runs {spec.kind} {kind.version},"
                                    f" not {spec.version}"))
                    continue
                job = Job(spec, submitter, self._done, self._started)
                why = self._quota_refusal(submitter, job.size, room)
                if why is not None:
                    self.refused_quota += 1
                    refused.append((spec.id, "busy", why))
                    continue
                position = executor.admission_position(job, fetching)
                if job.size > SPOOL_INPUT_BYTES or spec.needs_files:
                    # big inputs wait on disk, not in the daemon's memory
                    try:
                        self.files.start_job(
                            functools.partial(self.run_with_files, job, [submitter]))
                    except TeammeshError as exc:
                        # the files service has as many transfers as it takes: a wait for
                        # the submitter (busy), never a reason to drop the stream
                        refused.append((spec.id, "busy", str(exc)))
                        continue
                    fetching += 1
                else:
                    executor.submit_nowait(job)
                room -= 1
                txn.exec_accept(spec.id, submitter, time.time())
                accepted.append(spec.id)
                positions[spec.id] = position
        session.push_frame(tp.accepted(accepted, refused, positions))
        for res in replay:
            session.push_result(res)

    def _started(self, job: Job) -> None:
        session = self.sessions.get(job.submitter)
        if session is not None and session.alive:
            session.push_started(job.spec.id)

    def _done(self, job: Job, result: TaskResult) -> None:
        self.audit.append("ran", task=job.spec.id, kind=job.spec.kind,
                                       submitter=job.submitter, ok=result.ok)
        session = self.sessions.get(job.submitter)
        if session is not None and session.alive:
            session.push_result(result)
        else:
            # nobody to send it to now: keep it for the submitter's re-assign
            self.store.autocommit.exec_done([result])

    async def _writer(self, session: _Session) -> None:
        identity = self.identity
        submitter = session.stream.peer_id
        while True:
            await session.wake.wait()
            if not session.results:
                # Only "accepted"/"progress" to say: a short task's result usually follows
                # within a few hundred microseconds, and one write carrying all three costs
                # a third of three (each write is a yamux frame, a Noise message, a syscall).
                with trio.move_on_after(COALESCE_S):
                    while not session.results:
                        session.wake = trio.Event()
                        await session.wake.wait()
            session.wake = trio.Event()
            frames, session.frames = session.frames, []
            results, session.results = session.results, []
            started, session.started = session.started, []
            done_ids = {r.id for r in results}
            started = [i for i in started if i not in done_ids]  # the result says more
            if started:
                frames.append(tp.progress(started, "running"))
            if results:
                with self.store.transaction() as txn:
                    txn.exec_done(results)
                for chunk in tp.chunks(results, lambda r: r.size_hint):
                    frames.append(tp.seal_results(identity, submitter, chunk))
            if frames:
                try:
                    await session.stream.write(b"".join(frames))
                except BaseException:
                    # not known to be delivered: handed to the submitter's next stream
                    session.results[:0] = results
                    raise

