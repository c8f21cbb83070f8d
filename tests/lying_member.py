"""A member that returns wrong answers it stands behind: the real daemon, patched.

``python tests/lying_member.py ARGS`` runs ``teammesh ARGS``. As an executor it replaces
every successful output with ``"a lie"`` *before* the output digest is taken, so its
signed results are well-formed and self-consistent: only a comparison with another
member's answer (``replicas``) can tell. Compare tests/hostile_member.py's ``forge``,
which alters outputs after signing and is caught by the digest check alone.

It is also slow where it matters: a ``sleep`` task (kind ``HANG_KIND``) never finishes on
it, until it is cancelled (or the task's own timeout ends it). Each cancel its executor
receives for a task it holds is printed to its log (``CANCEL_RECEIVED`` and the id), so a
test can see that a submitter which no longer needs an answer told it to stop.
"""

from __future__ import annotations

import sys
from typing import Any

import trio
from teammesh.node.cli.main import main
from teammesh.node.tasks import executor
from teammesh.protocols.tasks import TaskResult, make_result

LIE = "a lie"
HANG_KIND = "sleep"
CANCEL_RECEIVED = "lying member: cancel received for"


def lying_result(task_id: str, ok: bool, output: Any, error: str | None, wall_ms: float,
                 cpu_ms: float) -> TaskResult:
    return make_result(task_id, ok, LIE if ok else output, error, wall_ms, cpu_ms)


_next_message = executor.Executor._next_message
_cancel = executor.Executor.cancel


async def hanging_next_message(self: executor.Executor, slot: Any) -> Any:
    """The executor waits for its worker's answer here, inside the slot's cancel scope
    (which a cancel and the task's timeout end): for ``HANG_KIND`` it waits for ever."""
    job = slot.current
    if job is not None and job.spec.kind == HANG_KIND:
        await trio.sleep_forever()
    return await _next_message(self, slot)


def reporting_cancel(self: executor.Executor, task_id: str) -> bool:
    """Executor.cancel, logged when it finds the task (queued or running)."""
    found = _cancel(self, task_id)
    if found:
        print(CANCEL_RECEIVED, task_id, flush=True)
    return found

if __name__ == "__main__":
    executor.make_result = lying_result  # type: ignore[assignment]
    executor.Executor._next_message = hanging_next_message  # type: ignore[method-assign]
    executor.Executor.cancel = reporting_cancel  # type: ignore[method-assign]
    sys.argv[0] = "teammesh"
    main()
