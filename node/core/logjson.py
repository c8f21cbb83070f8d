"""Structured logs (``--log-format json``): one JSON object per line, with the peer and
task ids a message names pulled out as fields, so a log collector can filter by them.

Ids are taken from the log call's arguments (our messages pass them as ``%s`` args) or
from ``extra={"peer": ..., "task": ...}``; the message text is never parsed.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

_PEER = re.compile(r"^(12D3KooW[1-9A-HJ-NP-Za-km-z]{44}|Qm[1-9A-HJ-NP-Za-km-z]{44})$")
_TASK = re.compile(r"^[0-9a-f]{23}$")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        peers: list[str] = []
        tasks: list[str] = []
        args = record.args if isinstance(record.args, tuple) else ()
        for a in args:
            if isinstance(a, str) and _PEER.match(a):
                peers.append(a)
            elif isinstance(a, str) and _TASK.match(a):
                tasks.append(a)
        for key, found in (("peer", peers), ("task", tasks)):
            given = getattr(record, key, None)
            if isinstance(given, str):
                out[key] = given
            elif found:
                out[key] = found[0] if len(found) == 1 else found
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
