"""A task worker process: ``python -m teammesh.node.tasks.worker``.

Reads framed msgpack ``run`` batches on stdin, runs each task in order, and writes one
framed result per task on stdout as soon as it finishes (so the parent always knows which
task is running, for timeouts and cancellation). Limits: RLIMIT_AS (memory) for the whole
process, and RLIMIT_CPU re-armed before every task, so a runaway task gets SIGXCPU and the
parent reports the CPU limit. Stays warm: one process runs many tasks.

Big data never rides a frame: an input the daemon put in the spool arrives as
``input_path`` (and ``param_paths`` for file params), and an output bigger than
``SPILL_BYTES`` is written to a spool file and announced as ``spill``; the daemon adds it
to the block store. An output over the task's ``max_output`` fails the task with the limit.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
from pathlib import Path
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


SPILL_BYTES = 1024 * 1024  # as executor.SPILL_BYTES
MAX_ERROR_CHARS = 4000


def _load_inputs(task: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    data = task["input"]
    if task.get("input_path"):
        data = Path(task["input_path"]).read_bytes()
    params = task["params"]
    if task.get("param_paths"):
        params = dict(params)
        for key, path in task["param_paths"].items():
            params[key] = Path(path).read_bytes()
    return data, params


def run_one(kinds: dict[str, Any], task: dict[str, Any], cpu_s: int) -> dict[str, Any]:
    from teammesh.node.kinds import run_guarded

    t0 = time.perf_counter()
    c0 = _cpu_s()
    error: str | None
    try:
        _arm_cpu_limit(cpu_s)
    except (ValueError, OSError) as exc:
        ok, output, error = False, None, f"cannot set the CPU time limit: {exc}"
    else:
        try:
            data, params = _load_inputs(task)
        except (OSError, MemoryError) as exc:
            ok, output, error = False, None, f"cannot read the task's input file: {exc}"
        else:
            ok, output, error = run_guarded(kinds, task["kind"], data, params)
            del data, params
    if error is not None:
        error = str(error)[:MAX_ERROR_CHARS]
    return {"t": "done", "v": 1, "id": task["id"], "ok": ok, "output": output, "error": error,
            "wall": (time.perf_counter() - t0) * 1000, "cpu": (_cpu_s() - c0) * 1000}


def encode_result(result: dict[str, Any], task: dict[str, Any], spool: str | None) -> bytes:
    """The frame for one result: inline when small, else the output goes to a spool file
    (raw bytes, or JSON for structured outputs, so `teammesh get` gives a usable file)."""
    kind = task["kind"]
    limit = int(task.get("max_output") or 0)
    output = result["output"]
    try:
        payload = wire.frame_message(result)
    except Exception as exc:  # an unserialisable output fails its task
        result.update(ok=False, output=None,
                      error=f"{kind} returned an unserialisable value: {exc}"[:MAX_ERROR_CHARS])
        return wire.frame_message(result)
    if len(payload) <= SPILL_BYTES or not result["ok"]:
        return payload
    del payload
    if isinstance(output, bytes):
        data, fmt = output, "bytes"
    else:
        from teammesh.protocols.tasks import json_safe  # only here: workers start lean

        data, fmt = json.dumps(json_safe(output), separators=(",", ":")).encode(), "json"
    if limit and len(data) > limit:
        result.update(ok=False, output=None,
                      error=f"output of {len(data)} bytes exceeds this node's limit of"
                            f" {limit // (1024 * 1024)} MiB for {kind}"
                            " (executor.kind_max_output_mb or executor.max_output_mb)")
        return wire.frame_message(result)
    if spool is None:
        result.update(ok=False, output=None,
                      error=f"output of {len(data)} bytes is too large to return inline")
        return wire.frame_message(result)
    path = Path(spool) / f"out-{task['id'][:64].replace('/', '_')}-{secrets.token_hex(4)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        path.unlink(missing_ok=True)
        result.update(ok=False, output=None,
                      error=f"cannot write the output ({len(data)} bytes): {exc}")
        return wire.frame_message(result)
    result.update(output=None, spill={"path": str(path), "format": fmt, "size": len(data)})
    return wire.frame_message(result)


def main() -> None:
    from teammesh.node.kinds import load_kinds

    memory_mb = int(os.environ.get("TEAMMESH_WORKER_MEMORY_MB", "0"))
    cpu_s = int(os.environ.get("TEAMMESH_WORKER_CPU_S", "600"))
    allow = os.environ.get("TEAMMESH_WORKER_ALLOW", "*").split(",")
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    kinds = load_kinds(allow)
    spool = os.environ.get("TEAMMESH_WORKER_SPOOL") or None
    # the parent is trusted and bounds its batches by bytes; the limit here only has to
    # hold one task with a 4 MiB inline input
    decoder = wire.FrameDecoder(max_frame=64 * 1024 * 1024)
    out = sys.stdout.buffer
    out.write(wire.frame_message({"t": "ready", "v": 1, "pid": os.getpid()}))
    out.flush()
    while True:
        data = os.read(0, 1 << 20)
        if not data:
            return
        for frame in decoder.feed(data):
            msg = wire.unpack(frame, max_bytes=64 * 1024 * 1024)
            if msg["t"] != "run":
                continue
            last_flush = time.perf_counter()
            for task in msg["tasks"]:
                result = run_one(kinds, task, cpu_s)
                out.write(encode_result(result, task, spool))
                # The parent times each task from the previous result it saw, so results
                # must not sit in the buffer for long; tiny tasks still share a write.
                now = time.perf_counter()
                if now - last_flush > 0.001:
                    out.flush()
                    last_flush = now
            out.flush()


if __name__ == "__main__":
    main()
