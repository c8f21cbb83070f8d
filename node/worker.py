"""A task worker process: ``python -m teammesh.node.worker``.

Reads framed msgpack ``run`` batches on stdin, runs each task in order, and writes one
framed result per task on stdout as soon as it finishes (so the parent always knows which
task is running, for timeouts and cancellation). Limits: RLIMIT_AS (memory) for the whole
process, and RLIMIT_CPU re-armed before every task, so a runaway task gets SIGXCPU and the
parent reports the CPU limit. Stays warm: one process runs many tasks.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

from teammesh.protocols import wire


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _arm_cpu_limit(cpu_s: int) -> None:
    used = int(_cpu_s()) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = used + cpu_s
    if hard != resource.RLIM_INFINITY and soft > hard:
        soft = hard
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def run_one(kinds: dict[str, Any], task: dict[str, Any], cpu_s: int) -> dict[str, Any]:
    from teammesh.node.kinds import run_guarded

    t0 = time.perf_counter()
    c0 = _cpu_s()
    try:
        _arm_cpu_limit(cpu_s)
    except (ValueError, OSError) as exc:
        ok, output, error = False, None, f"cannot set the CPU time limit: {exc}"
    else:
        ok, output, error = run_guarded(kinds, task["kind"], task["input"], task["params"])
    return {"t": "done", "v": 1, "id": task["id"], "ok": ok, "output": output, "error": error,
            "wall": (time.perf_counter() - t0) * 1000, "cpu": (_cpu_s() - c0) * 1000}


def main() -> None:
    from teammesh.node.kinds import load_kinds

    memory_mb = int(os.environ.get("TEAMMESH_WORKER_MEMORY_MB", "0"))
    cpu_s = int(os.environ.get("TEAMMESH_WORKER_CPU_S", "600"))
    allow = os.environ.get("TEAMMESH_WORKER_ALLOW", "*").split(",")
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    kinds = load_kinds(allow)
    decoder = wire.FrameDecoder()
    out = sys.stdout.buffer
    out.write(wire.frame_message({"t": "ready", "v": 1, "pid": os.getpid()}))
    out.flush()
    while True:
        data = os.read(0, 1 << 20)
        if not data:
            return
        for frame in decoder.feed(data):
            msg = wire.unpack(frame)
            if msg["t"] != "run":
                continue
            last_flush = time.perf_counter()
            for task in msg["tasks"]:
                result = run_one(kinds, task, cpu_s)
                try:
                    payload = wire.frame_message(result)
                except Exception as exc:  # an unserialisable output fails its task
                    result.update(ok=False, output=None,
                                  error=f"{task['kind']} returned an unserialisable value: {exc}")
                    payload = wire.frame_message(result)
                out.write(payload)
                # The parent times each task from the previous result it saw, so results
                # must not sit in the buffer for long; tiny tasks still share a write.
                now = time.perf_counter()
                if now - last_flush > 0.001:
                    out.flush()
                    last_flush = now
            out.flush()


if __name__ == "__main__":
    main()
