"""The audit log: an append-only, hash-chained record of membership changes and of who
ran which task for whom (``HOME/audit.log``, JSON lines, 0600).

Each line holds ``prev`` (the previous line's hash) and, last, ``hash`` =
sha256(prev || the line's text before its hash field): editing, removing or
reordering a line breaks the chain from there on, and ``teammesh audit --verify`` names
the first bad line. (Someone who can rewrite the whole file can rewrite the chain too;
ship the log elsewhere, e.g. with journald or a log collector, to guard against that.)

Lines are buffered and written once a second, and at stop: a crash loses at most the
last second, never the chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import trio

logger = logging.getLogger("teammesh.audit")

GENESIS = "0" * 64
FLUSH_S = 1.0
MAX_PENDING = 100_000  # lines held before a forced write (a flood must not grow memory)


_HASH_TAIL = len(',"hash":"') + 64 + 2  # what follows the hashed part of a line


def _seal(prev: str, body: dict[str, Any]) -> tuple[str, str]:
    """The line for ``body`` and its hash: sha256(prev || the line up to its hash field)
    — the exact bytes written, so checking needs no canonical re-encoding."""
    text = json.dumps(body, separators=(",", ":"), default=str)
    h = hashlib.sha256((prev + text).encode()).hexdigest()
    return text[:-1] + ',"hash":"' + h + '"}', h


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: list[str] = []
        self._warned = -1e9
        self._seq, self._prev = self._tail()

    def _tail(self) -> tuple[int, str]:
        """The last line's (seq, hash): the chain continues across restarts."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 65536))
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0, GENESIS
        for raw in reversed(lines):
            try:
                last = json.loads(raw)
                return int(last["seq"]), str(last["hash"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line (power loss): the verifier reports it
        return 0, GENESIS

    def append(self, event: str, **fields: Any) -> None:
        self._seq += 1
        body = {"seq": self._seq, "ts": round(time.time(), 3), "event": event, **fields,
                "prev": self._prev}
        line, self._prev = _seal(self._prev, body)
        self._pending.append(line)
        if len(self._pending) >= MAX_PENDING and time.monotonic() - self._warned > 60:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write("\n".join(lines) + "\n")
        except OSError as exc:
            # a full disk must not stop the node; the records wait (bounded), and a gap
            # they leave if they are dropped shows in --verify as a broken chain
            self._pending = (lines + self._pending)[-MAX_PENDING:]
            now = time.monotonic()
            if now - self._warned > 60:
                self._warned = now
                logger.warning("cannot write the audit log %s: %s (%d records waiting)",
                               self.path, exc, len(self._pending))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await trio.sleep(FLUSH_S)
                self.flush()
        finally:
            self.flush()


def verify(path: Path) -> dict[str, Any]:
    """Check the chain: {"ok", "lines", "first_bad" (seq or line number), "reason"}."""
    prev = GENESIS
    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, 1):
            n = lineno
            raw = raw.rstrip("\n")
            try:
                body = json.loads(raw)
                h = body["hash"]
                hashed = raw[:-_HASH_TAIL] + "}"
                if raw[-_HASH_TAIL:] != ',"hash":"' + h + '"}':
                    raise ValueError("the hash is not the last field")
            except (ValueError, KeyError, TypeError):
                return {"ok": False, "lines": n, "first_bad": lineno,
                        "reason": f"line {lineno} is not an audit record"}
            if body.get("prev") != prev:
                return {"ok": False, "lines": n, "first_bad": lineno,
                        "reason": f"line {lineno} does not follow line {lineno - 1}"
                                  " (a line was removed, inserted or reordered)"}
            if hashlib.sha256((prev + hashed).encode()).hexdigest() != h:
                return {"ok": False, "lines": n, "first_bad": lineno,
                        "reason": f"line {lineno} was altered (its hash does not match)"}
            prev = h
    return {"ok": True, "lines": n, "first_bad": None, "reason": ""}
