"""The plugin interface: what a kind is and what one run of it needs. Kind modules (ours and
third-party) import these from ``teammesh.node.kinds``; this module exists so that the
registry in ``__init__`` and the built-in kind modules do not import each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Resources:
    """What one run of a kind needs; the scheduler matches it against free capacity."""

    cpu: float = 1.0
    memory_mb: int = 256
    gpu: bool = False


@dataclass(frozen=True, slots=True)
class Kind:
    """One task kind. ``fn`` receives the raw input bytes and already-validated params."""

    name: str
    version: str
    description: str
    fn: Callable[[bytes, dict[str, Any]], Any]
    params_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    resources: Resources = field(default_factory=Resources)
    # True if a JavaScript Cloudflare Worker can reproduce the output bit-identically.
    portable: bool = False
    # Inputs up to this many bytes run on the executing daemon itself instead of a worker
    # process. Only for kinds whose cost is a short linear pass over the input (hashing):
    # at 64 KiB that is tens of microseconds, while the round trip to a worker process
    # costs 0.3-0.5 ms and the worker's limits (memory, CPU time, wall clock) cannot be
    # reached. 0: always a worker process.
    inline_max_bytes: int = 0
